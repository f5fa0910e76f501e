"""Barcode rules (FACTS.md): prefix 1-4 A-Z, barcode 5-16 A-Z0-9, never reused."""

from __future__ import annotations

import pytest

from vtl.errors import InvalidRequest
from vtl.library import barcodes


@pytest.mark.parametrize("good", ["ABCDE", "VT0000001", "A" * 16, "12345", " vt00001 "])
def test_valid_barcodes(good: str) -> None:
    assert barcodes.validate_barcode(good) == good.strip().upper()


@pytest.mark.parametrize("bad", ["", "ABCD", "A" * 17, "VT-0001", "VT 0001", "VTÄ0001", "VT_0001"])
def test_invalid_barcodes(bad: str) -> None:
    with pytest.raises(InvalidRequest, match="5-16 characters"):
        barcodes.validate_barcode(bad)


@pytest.mark.parametrize("bad", ["", "ABCDE", "A1", "1", "A-"])
def test_invalid_prefixes(bad: str) -> None:
    with pytest.raises(InvalidRequest, match="1-4 letters"):
        barcodes.validate_prefix(bad)


def test_generate_continues_after_the_highest_ever_used() -> None:
    assert barcodes.generate("VT", 3, []) == ["VT0000001", "VT0000002", "VT0000003"]
    used = ["VT0000001", "VT0000007", "VTX0000100", "VTABCDE"]
    assert barcodes.generate("vt", 2, used) == ["VT0000008", "VT0000009"]


def test_generate_never_returns_a_used_barcode() -> None:
    used = [f"A{n:07d}" for n in range(1, 50)]
    out = barcodes.generate("A", 10, used)
    assert not set(out) & set(used) and len(set(out)) == 10
    assert all(5 <= len(b) <= 16 for b in out)


def test_generate_longest_prefix_fits() -> None:
    assert barcodes.generate("ABCD", 1, []) == ["ABCD0000001"]
