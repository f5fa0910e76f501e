"""ScsiTarget: REPORT LUNS, missing LUNs, LUN changes and resets (SPC-4 6.33, SAM-5)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtl.scsi.command import ScsiStatus
from vtl.scsi.sense import SenseKey
from vtl.scsi.target import ScsiTarget, decode_lun, encode_lun

from .devices import DiskLike, TapeLike, check, run, settle

ILLEGAL = SenseKey.ILLEGAL_REQUEST
UA = SenseKey.UNIT_ATTENTION
TUR = bytes(6)


def report_luns(select: int = 0, alloc: int = 4096) -> bytes:
    return bytes([0xA0, 0, select, 0, 0, 0]) + struct.pack(">I", alloc) + bytes(2)


@pytest.fixture()
def target() -> ScsiTarget:
    return ScsiTarget({0: TapeLike(), 1: DiskLike(), 300: TapeLike(serial="SN300")})


def test_lun_encoding() -> None:
    assert encode_lun(0) == bytes(8)
    assert encode_lun(255) == bytes([0x00, 0xFF]) + bytes(6)
    assert encode_lun(300) == bytes([0x41, 0x2C]) + bytes(6)
    assert encode_lun(0x3FFF) == bytes([0x7F, 0xFF]) + bytes(6)
    with pytest.raises(ValueError):
        encode_lun(0x4000)
    with pytest.raises(ValueError):
        decode_lun(bytes([0x00, 0x01, 0x00, 0x02]) + bytes(4))  # second level


@given(st.integers(0, 0x3FFF))
def test_lun_roundtrip(lun: int) -> None:
    assert decode_lun(encode_lun(lun) + b"junk") == lun


def test_report_luns_bytes(target: ScsiTarget) -> None:
    r = run(target, report_luns())
    assert bytes(r.data_in) == (bytes([0, 0, 0, 24, 0, 0, 0, 0]) + bytes(8)
                                + bytes([0, 1]) + bytes(6) + bytes([0x41, 0x2C]) + bytes(6))


def test_report_luns_answers_on_any_lun_and_truncates(target: ScsiTarget) -> None:
    r = run(target, report_luns(alloc=16), lun=77)
    assert bytes(r.data_in) == bytes([0, 0, 0, 24, 0, 0, 0, 0]) + bytes(8)


def test_report_luns_select_report(target: ScsiTarget) -> None:
    assert bytes(run(target, report_luns(1)).data_in) == bytes(8)
    assert len(run(target, report_luns(2)).data_in) == 32
    check(run(target, report_luns(3)), ILLEGAL, (0x24, 0x00), bytes([0xC0, 0, 2]))


def test_report_luns_allocation_length_below_16(target: ScsiTarget) -> None:
    check(run(target, report_luns(alloc=15)), ILLEGAL, (0x24, 0x00), bytes([0xC0, 0, 6]))
    check(run(target, bytes([0xA0, 0, 0])), ILLEGAL, (0x24, 0x00))


def test_missing_lun_inquiry(target: ScsiTarget) -> None:
    r = run(target, bytes([0x12, 0, 0, 0, 255, 0]), lun=5)
    assert r.status == ScsiStatus.GOOD
    assert bytes(r.data_in) == (bytes([0x7F, 0x00, 0x06, 0x12, 31, 0, 0, 0x02])
                                + b"VTL     " + b"TESTDEV         " + b"0001")
    r = run(target, bytes([0x12, 1, 0, 0, 255, 0]), lun=5)
    assert bytes(r.data_in) == bytes([0x7F, 0x00, 0x00, 0x01, 0x00])
    check(run(target, bytes([0x12, 1, 0x80, 0, 255, 0]), lun=5), ILLEGAL, (0x24, 0x00))


def test_missing_lun_request_sense(target: ScsiTarget) -> None:
    r = run(target, bytes([0x03, 0, 0, 0, 252, 0]), lun=5)
    assert r.status == ScsiStatus.GOOD
    assert bytes(r.data_in) == bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x25, 0]) + bytes(4)
    r = run(target, bytes([0x03, 1, 0, 0, 252, 0]), lun=5)
    assert bytes(r.data_in) == bytes([0x72, 0x05, 0x25, 0x00, 0, 0, 0, 0])


def test_missing_lun_other_commands(target: ScsiTarget) -> None:
    check(run(target, TUR, lun=5), ILLEGAL, (0x25, 0x00))
    check(run(target, bytes([0x1A, 0, 0x3F, 0, 255, 0]), lun=5), ILLEGAL, (0x25, 0x00))
    check(run(target, b"", lun=5), ILLEGAL, (0x25, 0x00))
    assert not target.has_lun(5) and target.has_lun(300)


def test_empty_target_inquiry_has_blank_identity() -> None:
    r = run(ScsiTarget(), bytes([0x12, 0, 0, 0, 255, 0]))
    assert bytes(r.data_in)[0] == 0x7F and bytes(r.data_in)[8:36] == b" " * 28


def test_adding_a_lun_raises_reported_luns_changed(target: ScsiTarget) -> None:
    settle(target, "a", lun=0)
    settle(target, "a", lun=1)
    target.add_lun(2, TapeLike(serial="SN2"))
    check(run(target, TUR, nexus="a", lun=0), UA, (0x3F, 0x0E))
    assert run(target, TUR, nexus="a", lun=0).status == ScsiStatus.GOOD
    # the new LU starts with POWER ON, not 3F/0E
    check(run(target, TUR, nexus="a", lun=2), UA, (0x29, 0x00))
    assert run(target, TUR, nexus="a", lun=2).status == ScsiStatus.GOOD
    # REPORT LUNS clears the pending 3F/0E on the other LUs
    assert run(target, report_luns(), nexus="a").status == ScsiStatus.GOOD
    assert run(target, TUR, nexus="a", lun=1).status == ScsiStatus.GOOD
    with pytest.raises(ValueError):
        target.add_lun(2, TapeLike())


def test_removing_a_lun(target: ScsiTarget) -> None:
    settle(target, "a", lun=0)
    removed = target.remove_lun(300)
    assert removed is not None and target.remove_lun(300) is None
    check(run(target, TUR, nexus="a", lun=0), UA, (0x3F, 0x0E))
    check(run(target, TUR, nexus="a", lun=300), ILLEGAL, (0x25, 0x00))
    assert target.luns() == [0, 1]


def test_ua_ordering_power_on_before_lun_change(target: ScsiTarget) -> None:
    run(target, report_luns(), nexus="b")  # the target now knows nexus b
    target.add_lun(9, DiskLike())
    check(run(target, TUR, nexus="b", lun=0), UA, (0x29, 0x00))
    check(run(target, TUR, nexus="b", lun=0), UA, (0x3F, 0x0E))
    assert run(target, TUR, nexus="b", lun=0).status == ScsiStatus.GOOD


def test_resets(target: ScsiTarget) -> None:
    for lun in (0, 1):
        settle(target, "a", lun=lun)
    target.reset_lun(0)
    target.reset_lun(42)  # no such LUN: nothing to do
    check(run(target, TUR, nexus="a", lun=0), UA, (0x29, 0x03))
    assert run(target, TUR, nexus="a", lun=1).status == ScsiStatus.GOOD
    target.reset_target(cold=False)
    check(run(target, TUR, nexus="a", lun=1), UA, (0x29, 0x03))
    target.reset_target(cold=True)
    check(run(target, TUR, nexus="a", lun=1), UA, (0x29, 0x01))
    assert run(target, TUR, nexus="a", lun=1).status == ScsiStatus.GOOD


def test_nexus_lost(target: ScsiTarget) -> None:
    settle(target, "a", lun=0)
    lu = target.lu(0)
    assert isinstance(lu, TapeLike)
    run(target, bytes([0x16, 0, 0, 0, 0, 0]), nexus="a")
    assert lu.reserved_by == "a"
    target.nexus_lost("a")
    assert lu.reserved_by is None
    check(run(target, TUR, nexus="a", lun=0), UA, (0x29, 0x00))


def test_satisfies_the_iscsi_protocol() -> None:
    from vtl.iscsi.target import ScsiDevice

    device: ScsiDevice = ScsiTarget()  # structural typing: checked by mypy, exercised here
    assert not device.has_lun(0)
