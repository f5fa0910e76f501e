"""SpcDevice commands: TEST UNIT READY, REQUEST SENSE, RSOC, RESERVE/RELEASE, unit attentions."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtl.scsi.command import ScsiStatus
from vtl.scsi.sense import DecodedSense, SenseKey, descriptor_sense, encode_fixed_sense
from vtl.scsi.sense import Asc, FieldPointer

from .devices import DiskLike, TapeLike, check, run, settle

ILLEGAL = SenseKey.ILLEGAL_REQUEST
TUR = bytes(6)


def request_sense(desc: bool = False, alloc: int = 252) -> bytes:
    return bytes([0x03, 0x01 if desc else 0, 0, 0, alloc, 0])


def rsoc(option: int, op: int = 0, sa: int = 0, alloc: int = 4096, rctd: bool = False) -> bytes:
    return (bytes([0xA3, 0x0C, (0x80 if rctd else 0) | option, op]) + struct.pack(">HI", sa, alloc)
            + bytes(2))


# --- unit attentions ------------------------------------------------------------------------
def test_new_nexus_sees_power_on_then_ready() -> None:
    dev = TapeLike()
    check(run(dev, TUR), SenseKey.UNIT_ATTENTION, (0x29, 0x00))
    assert run(dev, TUR).status == ScsiStatus.GOOD


def test_unit_attentions_are_reported_oldest_first_per_nexus() -> None:
    dev = TapeLike()
    settle(dev, "a")
    settle(dev, "b")
    dev.unit_attention(Asc.MODE_PARAMETERS_CHANGED)
    dev.unit_attention(Asc.NOT_READY_TO_READY_CHANGE, "a")
    dev.unit_attention(Asc.MODE_PARAMETERS_CHANGED)  # duplicate: reported once
    check(run(dev, TUR, nexus="a"), SenseKey.UNIT_ATTENTION, (0x2A, 0x01))
    check(run(dev, TUR, nexus="a"), SenseKey.UNIT_ATTENTION, (0x28, 0x00))
    assert run(dev, TUR, nexus="a").status == ScsiStatus.GOOD
    check(run(dev, TUR, nexus="b"), SenseKey.UNIT_ATTENTION, (0x2A, 0x01))
    assert run(dev, TUR, nexus="b").status == ScsiStatus.GOOD


def test_reset_gives_29_03_and_forget_nexus_starts_fresh() -> None:
    dev = TapeLike()
    settle(dev)
    dev.reset()
    check(run(dev, TUR), SenseKey.UNIT_ATTENTION, (0x29, 0x03))
    dev.forget_nexus("n1")
    check(run(dev, TUR), SenseKey.UNIT_ATTENTION, (0x29, 0x00))


# --- TEST UNIT READY / REQUEST SENSE --------------------------------------------------------
def test_test_unit_ready_not_ready() -> None:
    dev = TapeLike()
    settle(dev)
    dev.loaded = False
    check(run(dev, TUR), SenseKey.NOT_READY, (0x3A, 0x00))


def test_request_sense_reports_and_clears_unit_attention() -> None:
    dev = TapeLike()
    r = run(dev, request_sense())
    assert r.status == ScsiStatus.GOOD
    assert bytes(r.data_in) == encode_fixed_sense(SenseKey.UNIT_ATTENTION, Asc.POWER_ON_RESET)
    assert bytes(r.data_in)[:3] == bytes([0x70, 0x00, 0x06])
    assert run(dev, TUR).status == ScsiStatus.GOOD


def test_request_sense_no_sense_and_not_ready() -> None:
    dev = TapeLike()
    settle(dev)
    r = run(dev, request_sense())
    assert bytes(r.data_in) == bytes([0x70, 0, 0, 0, 0, 0, 0, 10]) + bytes(10)
    dev.loaded = False
    r = run(dev, request_sense())
    s = DecodedSense.decode(bytes(r.data_in))
    assert r.status == ScsiStatus.GOOD and (s.key, s.asc, s.ascq) == (2, 0x3A, 0)


def test_request_sense_descriptor_format() -> None:
    dev = TapeLike()
    r = run(dev, request_sense(desc=True))
    assert bytes(r.data_in) == bytes([0x72, 0x06, 0x29, 0x00, 0, 0, 0, 0])


def test_request_sense_allocation_length_and_reserved_bits() -> None:
    dev = TapeLike()
    assert bytes(run(dev, request_sense(alloc=3)).data_in) == bytes([0x70, 0x00, 0x06])
    check(run(dev, bytes([0x03, 0x02, 0, 0, 18, 0])), ILLEGAL, (0x24, 0x00), bytes([0xC9, 0, 1]))


def test_descriptor_sense_conversion() -> None:
    fixed = encode_fixed_sense(SenseKey.NO_SENSE, Asc.FILEMARK_DETECTED, information=0x1234,
                               filemark=True, ili=True)
    assert descriptor_sense(fixed) == (
        bytes([0x72, 0x00, 0x00, 0x01, 0, 0, 0, 16])
        + bytes([0x00, 0x0A, 0x80, 0x00, 0, 0, 0, 0, 0, 0, 0x12, 0x34])
        + bytes([0x04, 0x02, 0x00, 0xA0]))
    fixed = encode_fixed_sense(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB,
                               field=FieldPointer(2, None))
    assert descriptor_sense(fixed) == (bytes([0x72, 0x05, 0x24, 0x00, 0, 0, 0, 8])
                                       + bytes([0x02, 0x06, 0, 0, 0xC0, 0x00, 0x02, 0x00]))


# --- REPORT SUPPORTED OPERATION CODES -------------------------------------------------------
def _descriptors(data: bytes) -> list[tuple[int, int, int, int]]:
    length = struct.unpack_from(">I", data)[0]
    assert length == len(data) - 4
    out = []
    pos = 4
    while pos < len(data):
        op, sa, flags, cdb_len = struct.unpack_from(">BxHxBH", data, pos)
        out.append((op, sa, flags, cdb_len))
        pos += 20 if flags & 0x02 else 8
    return out


def test_rsoc_all_commands() -> None:
    dev = TapeLike()
    settle(dev)
    got = _descriptors(bytes(run(dev, rsoc(0)).data_in))
    assert got == [
        (0x00, 0, 0, 6), (0x03, 0, 0, 6), (0x12, 0, 0, 6), (0x15, 0, 0, 6), (0x16, 0, 0, 6),
        (0x17, 0, 0, 6), (0x1A, 0, 0, 6), (0x55, 0, 0, 10), (0x56, 0, 0, 10),
        (0x57, 0, 0, 10), (0x5A, 0, 0, 10), (0xA0, 0, 0, 12), (0xA3, 0x0C, 1, 12),
    ]


def test_rsoc_without_reserve_support_and_with_timeouts() -> None:
    dev = DiskLike()
    settle(dev)
    data = bytes(run(dev, rsoc(0, rctd=True)).data_in)
    got = _descriptors(data)
    assert [d[0] for d in got] == [0x00, 0x03, 0x12, 0x15, 0x1A, 0x55, 0x5A, 0xA0, 0xA3]
    assert all(d[2] & 0x02 for d in got)
    assert data[12:24] == bytes([0, 0x0A]) + bytes(10)  # first command timeouts descriptor


def test_rsoc_one_command() -> None:
    dev = TapeLike()
    settle(dev)
    r = run(dev, rsoc(1, op=0x12))
    assert bytes(r.data_in) == bytes([0, 0x03, 0, 6, 0x12, 0x01, 0xFF, 0xFF, 0xFF, 0x05])
    r = run(dev, rsoc(1, op=0xC5))
    assert bytes(r.data_in) == bytes([0, 0x01, 0, 0])
    r = run(dev, rsoc(2, op=0xA3, sa=0x0C, rctd=True))
    data = bytes(r.data_in)
    assert data[:4] == bytes([0, 0x83, 0, 12]) and data[4:6] == bytes([0xA3, 0x0C])
    assert data[16:] == bytes([0, 0x0A]) + bytes(10)
    assert bytes(run(dev, rsoc(2, op=0xA3, sa=0x05)).data_in) == bytes([0, 0x01, 0, 0])
    assert bytes(run(dev, rsoc(3, op=0x12)).data_in)[:2] == bytes([0, 0x03])


def test_rsoc_errors() -> None:
    dev = TapeLike()
    settle(dev)
    check(run(dev, rsoc(1, op=0xA3)), ILLEGAL, (0x24, 0x00), bytes([0xCA, 0, 2]))
    check(run(dev, rsoc(2, op=0x12)), ILLEGAL, (0x24, 0x00), bytes([0xCA, 0, 2]))
    check(run(dev, rsoc(5)), ILLEGAL, (0x24, 0x00), bytes([0xCA, 0, 2]))
    check(run(dev, bytes([0xA3, 0x0D]) + bytes(10)), ILLEGAL, (0x24, 0x00), bytes([0xCC, 0, 1]))


def test_rsoc_allocation_length() -> None:
    dev = TapeLike()
    settle(dev)
    assert bytes(run(dev, rsoc(0, alloc=6)).data_in) == bytes([0, 0, 0, 13 * 8, 0x00, 0x00])


# --- RESERVE(6) / RELEASE(6) ----------------------------------------------------------------
def test_reserve_conflicts_for_other_nexus() -> None:
    dev = TapeLike()
    settle(dev, "a")
    settle(dev, "b")
    assert run(dev, bytes([0x16, 0, 0, 0, 0, 0]), nexus="a").status == ScsiStatus.GOOD
    assert run(dev, TUR, nexus="b").status == ScsiStatus.RESERVATION_CONFLICT
    assert run(dev, bytes([0x16, 0, 0, 0, 0, 0]), nexus="b").status == ScsiStatus.RESERVATION_CONFLICT
    assert run(dev, bytes([0x12, 0, 0, 0, 36, 0]), nexus="b").status == ScsiStatus.GOOD
    assert run(dev, bytes([0x03, 0, 0, 0, 18, 0]), nexus="b").status == ScsiStatus.GOOD
    # RELEASE from a non-holder is GOOD and releases nothing
    assert run(dev, bytes([0x17, 0, 0, 0, 0, 0]), nexus="b").status == ScsiStatus.GOOD
    assert run(dev, TUR, nexus="b").status == ScsiStatus.RESERVATION_CONFLICT
    assert run(dev, TUR, nexus="a").status == ScsiStatus.GOOD
    assert run(dev, bytes([0x17, 0, 0, 0, 0, 0]), nexus="a").status == ScsiStatus.GOOD
    assert run(dev, TUR, nexus="b").status == ScsiStatus.GOOD


def test_unit_attention_before_reservation_conflict() -> None:
    dev = TapeLike()
    settle(dev, "a")
    assert run(dev, bytes([0x16, 0, 0, 0, 0, 0]), nexus="a").status == ScsiStatus.GOOD
    check(run(dev, TUR, nexus="b"), SenseKey.UNIT_ATTENTION, (0x29, 0x00))
    assert run(dev, TUR, nexus="b").status == ScsiStatus.RESERVATION_CONFLICT


def test_reservation_released_by_reset_and_nexus_loss() -> None:
    dev = TapeLike()
    settle(dev, "a")
    run(dev, bytes([0x56]) + bytes(9), nexus="a")
    assert dev.reserved_by == "a"
    dev.reset()
    assert dev.reserved_by is None
    run(dev, bytes([0x16, 0, 0, 0, 0, 0]), nexus="a")
    run(dev, bytes([0x16, 0, 0, 0, 0, 0]), nexus="a")
    assert dev.reserved_by == "a"
    dev.forget_nexus("a")
    assert dev.reserved_by is None


def test_reserve_variants_rejected() -> None:
    dev = TapeLike()
    settle(dev)
    check(run(dev, bytes([0x56, 0x10]) + bytes(8)), ILLEGAL, (0x24, 0x00), bytes([0xCC, 0, 1]))
    check(run(dev, bytes([0x16, 0x01, 0, 0, 0, 0])), ILLEGAL, (0x24, 0x00), bytes([0xC8, 0, 1]))
    disk = DiskLike()
    settle(disk)
    check(run(disk, bytes([0x16, 0, 0, 0, 0, 0])), ILLEGAL, (0x20, 0x00))


# --- robustness -----------------------------------------------------------------------------
KNOWN = [0x00, 0x03, 0x12, 0x15, 0x16, 0x17, 0x1A, 0x55, 0x56, 0x57, 0x5A, 0xA0, 0xA3]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cdb=st.one_of(
        st.binary(min_size=0, max_size=16),
        st.tuples(st.sampled_from(KNOWN), st.binary(min_size=0, max_size=15)).map(
            lambda t: bytes([t[0]]) + t[1]),
    ),
    data=st.binary(max_size=64),
    nexus=st.sampled_from(["a", "b"]),
    disk=st.booleans(),
)
def test_arbitrary_cdbs_never_raise(cdb: bytes, data: bytes, nexus: str, disk: bool) -> None:
    dev = DiskLike() if disk else TapeLike()
    for n in ("a", "b"):
        settle(dev, n)
    r = run(dev, cdb, data, nexus=nexus)
    assert r.status in (ScsiStatus.GOOD, ScsiStatus.CHECK_CONDITION)
    if r.status == ScsiStatus.CHECK_CONDITION:
        assert len(r.sense) == 18 and r.sense[0] == 0x70 and r.sense[7] == 10
        s = DecodedSense.decode(r.sense)
        assert s.key != SenseKey.HARDWARE_ERROR
        assert s.key in (SenseKey.ILLEGAL_REQUEST, SenseKey.NOT_READY)
    else:
        assert r.sense == b""


def test_stand_alone_lu_answers_report_luns() -> None:
    dev = TapeLike()
    cdb = bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0])
    r = run(dev, cdb, lun=3)
    assert bytes(r.data_in) == bytes([0, 0, 0, 8, 0, 0, 0, 0, 0, 3]) + bytes(6)
    assert bytes(run(dev, cdb, lun=0x4000).data_in) == bytes(8)
