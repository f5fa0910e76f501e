"""Element map and element status codec (SMC-3 6.11, 7.3.3)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from vtl.library.elements import (
    DeviceIdentifier,
    ElementDescriptor,
    ElementLayout,
    ElementType,
    Flag,
    VolumeTag,
)


def test_default_map() -> None:
    layout = ElementLayout()
    assert layout.addresses(ElementType.MEDIUM_TRANSPORT) == range(0, 1)
    assert layout.addresses(ElementType.DATA_TRANSFER) == range(0x100, 0x10A)
    assert layout.addresses(ElementType.IMPORT_EXPORT) == range(0x300, 0x300 + 1600)
    assert layout.addresses(ElementType.STORAGE) == range(0x1000, 0x1000 + 1600)
    assert len(list(layout.all_addresses())) == 3211


def test_mtx_numbering_storage_first_then_ie() -> None:
    layout = ElementLayout()
    assert layout.mtx_number(0x1000) == 1 and layout.mtx_number(0x1000 + 1599) == 1600
    assert layout.mtx_number(0x300) == 1601 and layout.mtx_number(0x300 + 1599) == 3200
    assert layout.mtx_number(0x105) == 5 and layout.mtx_number(0) is None
    for kind, n in ((ElementType.STORAGE, 12), (ElementType.IMPORT_EXPORT, 1700),
                    (ElementType.DATA_TRANSFER, 9)):
        assert layout.mtx_number(layout.address_of_mtx(kind, n)) == n
    with pytest.raises(ValueError):
        layout.address_of_mtx(ElementType.STORAGE, 1601)


def test_counts_configurable_and_overlap_rejected() -> None:
    small = ElementLayout(storage=2400, import_export=0)
    assert small.count(ElementType.STORAGE) == 2400
    with pytest.raises(ValueError, match="overlap"):
        ElementLayout(import_export=4000)
    with pytest.raises(ValueError):
        ElementLayout(drives=0)


def test_flags_checked_per_type() -> None:
    with pytest.raises(ValueError):
        ElementDescriptor(0x1000, ElementType.STORAGE, flags=Flag.IMPEXP)
    ElementDescriptor(0x300, ElementType.IMPORT_EXPORT, flags=Flag.IMPEXP | Flag.FULL)


@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=5, max_size=16),
       st.integers(0, 0xFFFF))
def test_volume_tag_round_trip(ident: str, seq: int) -> None:
    raw = VolumeTag(ident, seq).encode()
    assert len(raw) == 36 and VolumeTag.decode(raw) == VolumeTag(ident, seq)


def test_descriptor_padded_to_page_identifier_length() -> None:
    d = ElementDescriptor(0x100, ElementType.DATA_TRANSFER,
                          identifier=DeviceIdentifier(2, 1, b"IBM     12"))
    raw = d.encode(pvoltag=False, identifier_len=14)
    assert len(raw) == 12 + 4 + 14
    assert raw[12:16] == bytes([2, 1, 0, 10]) and raw[16:26] == b"IBM     12"
    assert raw[26:] == bytes(4)
    with pytest.raises(ValueError):
        d.encode(pvoltag=False, identifier_len=4)


def test_pure_modules_import_no_io() -> None:
    """The changer core stays pure (STYLE.md): no sqlite, os, time, sockets, threads."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "vtl" / "library"
    forbidden = {"os", "time", "sqlite3", "sqlite_utils", "socket", "threading", "asyncio",
                 "shutil", "catalog", "click"}
    for name in ("changer.py", "elements.py", "barcodes.py", "lifecycle.py", "identities.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for mod in mods:
                assert mod.split(".")[0] not in forbidden, f"{name} imports {mod}"
