"""Tape barcode rules (AWS Tape Gateway, FACTS.md) and generation.

- A prefix is 1-4 letters A-Z; a full barcode is 5-16 characters of A-Z and 0-9.
- Generated barcodes are prefix + a zero-padded decimal sequence (``VT0000001``).
- A barcode is never reused, even after deletion: callers pass every barcode ever issued with
  that prefix (the catalog's ``barcodes_used``), and generation continues after the highest.

Invariant: pure functions; errors are :class:`vtl.errors.InvalidRequest` with a message a user
can act on.
"""

from __future__ import annotations

import re
from typing import Iterable

from vtl.errors import InvalidRequest

PREFIX_RE = re.compile(r"[A-Z]{1,4}")
BARCODE_RE = re.compile(r"[A-Z0-9]{5,16}")
SEQUENCE_DIGITS = 7
#: SMC-3 volume tags are 32 bytes; our barcodes are at most 16 characters.
MAX_BARCODE_LEN = 16


def normalize(text: str) -> str:
    """Strip surrounding blanks and upper-case (users type ``vt0001``)."""
    return text.strip().upper()


def validate_prefix(prefix: str) -> str:
    """Return the normalized prefix or raise InvalidRequest."""
    value = normalize(prefix)
    if not PREFIX_RE.fullmatch(value):
        raise InvalidRequest(f"invalid barcode prefix {prefix!r}: use 1-4 letters A-Z")
    return value


def validate_barcode(barcode: str) -> str:
    """Return the normalized barcode or raise InvalidRequest."""
    value = normalize(barcode)
    if not BARCODE_RE.fullmatch(value):
        raise InvalidRequest(
            f"invalid barcode {barcode!r}: use 5-16 characters A-Z and 0-9 (e.g. VT0000001)")
    return value


def generate(prefix: str, count: int, used: Iterable[str]) -> list[str]:
    """``count`` new barcodes ``prefix + NNNNNNN`` after the highest sequence ever used.

    ``used`` holds every barcode ever issued (at least those starting with ``prefix``);
    barcodes that do not follow the pattern are ignored for the sequence but never produced.
    """
    prefix = validate_prefix(prefix)
    pattern = re.compile(re.escape(prefix) + r"(\d+)")
    taken = set()
    highest = 0
    for code in used:
        taken.add(code)
        m = pattern.fullmatch(code)
        if m:
            highest = max(highest, int(m.group(1)))
    out: list[str] = []
    seq = highest
    while len(out) < count:
        seq += 1
        code = f"{prefix}{seq:0{SEQUENCE_DIGITS}d}"
        if len(code) > MAX_BARCODE_LEN:
            raise InvalidRequest(f"barcode prefix {prefix!r} has no unused sequence numbers left")
        if code not in taken:
            out.append(code)
    return out
