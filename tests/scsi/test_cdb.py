"""CDB vocabulary: group lengths, field readers, usage data (SPC-4 4.2)."""

from __future__ import annotations

from vtl.scsi.cdb import (
    SPC_CDB_USAGE,
    SpcOpcode,
    allocation_length,
    cdb_length,
    generic_cdb_usage,
    parameter_list_length,
    service_action,
)


def test_cdb_length_by_group() -> None:
    assert [cdb_length(op) for op in (0x12, 0x28, 0x5A, 0x7F, 0x88, 0xA3, 0xC0, 0xE0)] == [
        6, 10, 10, None, 16, 12, None, None]


def test_field_readers() -> None:
    assert allocation_length(bytes([0x12, 1, 0x83, 0x01, 0x02, 0])) == 0x102
    assert allocation_length(bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0])) == 0x100
    assert allocation_length(bytes([0x12, 1])) is None
    assert allocation_length(b"") is None
    assert parameter_list_length(bytes([0x55, 0x10, 0, 0, 0, 0, 0, 0x01, 0x00, 0])) == 0x100
    assert service_action(bytes([0xA3, 0xEC])) == 0x0C
    assert service_action(bytes([0x12, 0x0C])) is None


def test_usage_tables_are_consistent() -> None:
    for (op, sa), usage in SPC_CDB_USAGE.items():
        assert usage[0] == op and len(usage) == cdb_length(op)
        if sa is not None:
            assert usage[1] & 0x1F == sa
    generic = generic_cdb_usage(SpcOpcode.MAINTENANCE_IN, 0x0A)
    assert generic is not None and generic[:2] == bytes([0xA3, 0x0A]) and len(generic) == 12
