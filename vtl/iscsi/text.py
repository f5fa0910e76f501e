"""iSCSI text key=value encoding (RFC 7143 6.1, 6.2).

A text data segment is a sequence of ``key=value`` strings each terminated by a NUL. Keys are
at most 63 bytes of ``[A-Za-z0-9.-+@_]``; values at most 255 bytes except the few binary-ish keys
(CHAP challenge/response, SendTargets replies) bounded by ``MAX_LONG_VALUE``. Invariant: decode
accepts only well-formed text within the limits and raises :class:`TextError` otherwise.
"""

from __future__ import annotations

import base64
import binascii
import re

from vtl.iscsi.errors import TextError

MAX_KEY = 63
MAX_VALUE = 255
MAX_LONG_VALUE = 8192
MAX_PAIRS = 256
MAX_TEXT = 65536  # a whole (possibly continued) text exchange
LONG_KEYS = frozenset({"CHAP_C", "CHAP_R", "CHAP_N", "TargetAddress", "TargetName",
                       "InitiatorName", "SendTargets", "TargetAlias", "InitiatorAlias"})
_KEY_RE = re.compile(rb"(X#)?[A-Za-z0-9.\-+@_]+\Z")  # X# = IANA-registered (RFC 7143 6.1)


def decode_text(data: bytes | bytearray | memoryview) -> list[tuple[str, str]]:
    """Decode ``key=value\\0...`` into ordered pairs (RFC 7143 6.1).

    A missing final NUL is tolerated (some initiators omit it); empty strings between NULs are
    skipped (padding).
    """
    raw = bytes(data)
    if len(raw) > MAX_TEXT:
        raise TextError(f"text of {len(raw)} bytes exceeds {MAX_TEXT}")
    pairs: list[tuple[str, str]] = []
    for item in raw.split(b"\0"):
        if not item:
            continue
        key, sep, value = item.partition(b"=")
        if not sep:
            raise TextError(f"no '=' in text item {item[:40]!r}")
        if not key or len(key) > MAX_KEY or not _KEY_RE.match(key):
            raise TextError(f"bad key {key[:40]!r}")
        k = key.decode("ascii")
        limit = MAX_LONG_VALUE if k in LONG_KEYS else MAX_VALUE
        if len(value) > limit:
            raise TextError(f"value of {k} longer than {limit}")
        try:
            v = value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise TextError(f"value of {k} is not UTF-8") from err
        pairs.append((k, v))
        if len(pairs) > MAX_PAIRS:
            raise TextError(f"more than {MAX_PAIRS} keys")
    return pairs


def encode_text(pairs: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> bytes:
    """Encode pairs as ``key=value\\0`` strings (RFC 7143 6.1)."""
    out = bytearray()
    for key, value in pairs:
        k = key.encode("ascii")
        if not k or len(k) > MAX_KEY or not _KEY_RE.match(k):
            raise TextError(f"bad key {key!r}")
        out += k + b"=" + value.encode("utf-8") + b"\0"
    return bytes(out)


def decode_binary(value: str, *, max_len: int = 1024) -> bytes:
    """Decode a binary value: ``0x`` hex or ``0b`` base64 (RFC 7143 6.1, 'binary-value')."""
    if len(value) < 3 or value[0] != "0" or value[1] not in "xXbB":
        raise TextError("binary value must start with 0x or 0b")
    body = value[2:]
    try:
        if value[1] in "xX":
            if len(body) % 2:
                body = "0" + body
            out = binascii.unhexlify(body)
        else:
            out = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as err:
        raise TextError("malformed binary value") from err
    if not out or len(out) > max_len:
        raise TextError(f"binary value of {len(out)} bytes out of range")
    return out


def encode_hex(data: bytes) -> str:
    return "0x" + data.hex()


def parse_number(value: str, lo: int, hi: int) -> int:
    """A decimal (or 0x hex) numerical value within [lo, hi] (RFC 7143 6.1)."""
    try:
        n = int(value, 16) if value[:2].lower() == "0x" else int(value, 10)
    except ValueError as err:
        raise TextError(f"not a number: {value[:20]!r}") from err
    if not value.isascii() or not lo <= n <= hi:
        raise TextError(f"{n} out of range [{lo}, {hi}]")
    return n
