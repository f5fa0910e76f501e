"""BlockDevice through the SPC commands it inherits (INQUIRY, MODE SENSE/SELECT, RSOC, TUR) and
behind a ScsiTarget, plus random CDBs that must never break the device."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.volumes.helpers import (
    NEXUS, clear_ua, read10, read_capacity10, run, sense, write10,
)
from volumes.memory import MemoryBackend
from volumes.sbc import SBC_CDB_USAGE, BlockDevice
from vtl.scsi.cdb import cdb_length
from vtl.scsi.command import ScsiCommand, ScsiStatus
from vtl.scsi.sense import DecodedSense
from vtl.scsi.target import ScsiTarget

BS = 512
BLOCKS = 4096


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend(BLOCKS * BS)


@pytest.fixture
def dev(backend: MemoryBackend) -> BlockDevice:
    d = BlockDevice(backend, serial="VOLSERIAL0001", device_name="iqn.2025-01.org.vtl:vol1")
    clear_ua(d)
    return d


def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255) -> bytes:
    return struct.pack(">BBBHB", 0x12, evpd, page, alloc, 0)


def mode_sense6(page: int = 0x3F, dbd: int = 0, pc: int = 0, alloc: int = 255) -> bytes:
    return bytes([0x1A, dbd << 3, (pc << 6) | page, 0, alloc, 0])


def mode_sense10(page: int = 0x3F, llbaa: int = 0, alloc: int = 1024) -> bytes:
    return struct.pack(">BBBBxxxHB", 0x5A, llbaa << 4, page, 0, alloc, 0)


def mode_select6(data: bytes) -> bytes:
    return bytes([0x15, 0x10, 0, 0, len(data), 0])


def rsoc_one(opcode: int, sa: int | None = None) -> bytes:
    option = 1 if sa is None else 2
    return struct.pack(">BBBBHIBB", 0xA3, 0x0C, option, opcode, sa or 0, 1024, 0, 0)


def test_standard_inquiry_is_a_disk(dev: BlockDevice) -> None:
    data = bytes(run(dev, inquiry()).data_in)
    assert data[0] == 0x00  # connected, direct-access block device
    assert not data[1] & 0x80  # not removable
    descriptors = struct.unpack_from(">8H", data, 58)
    assert 0x04C0 in descriptors  # SBC-3


def test_vpd_pages_listed_and_served(dev: BlockDevice) -> None:
    supported = bytes(run(dev, inquiry(1, 0x00)).data_in)
    pages = list(supported[4:4 + supported[3]])
    assert pages == sorted(pages)
    assert {0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2} <= set(pages)
    bl = bytes(run(dev, inquiry(1, 0xB0)).data_in)
    assert bl[1] == 0xB0 and bl[3] == 0x3C and len(bl) == 0x40  # SBC-3 page length
    bdc = bytes(run(dev, inquiry(1, 0xB1)).data_in)
    assert bdc[4:6] == b"\x00\x01"  # non-rotating
    lbp = bytes(run(dev, inquiry(1, 0xB2)).data_in)
    assert lbp[5] & 0xE4 == 0xE4 and lbp[6] & 0x07 == 0x02


def test_mode_sense_reports_header_descriptor_and_pages(dev: BlockDevice) -> None:
    data = bytes(run(dev, mode_sense6()).data_in)
    assert data[0] == len(data) - 1
    assert data[2] == 0x10  # DPOFUA, not write protected
    assert data[3] == 8
    blocks, length = struct.unpack_from(">II", data, 4)
    assert (blocks, length & 0xFFFFFF) == (BLOCKS, BS)
    codes = []
    at = 12
    while at < len(data):
        codes.append(data[at] & 0x3F)
        at += 2 + data[at + 1]
    assert codes == [0x01, 0x08, 0x0A]
    caching = bytes(run(dev, mode_sense6(page=0x08, dbd=1)).data_in)
    assert caching[4:6] == b"\x08\x12" and caching[6] & 0x04  # WCE=1
    changeable = bytes(run(dev, mode_sense6(page=0x08, dbd=1, pc=1)).data_in)
    assert changeable[6] == 0x04


def test_mode_sense10_long_lba_descriptor(dev: BlockDevice) -> None:
    data = bytes(run(dev, mode_sense10(page=0x08, llbaa=1)).data_in)
    assert data[4] & 0x01 and struct.unpack_from(">H", data, 6)[0] == 16
    blocks, length = struct.unpack_from(">Q4xI", data, 8)
    assert (blocks, length) == (BLOCKS, BS)


def test_mode_select_write_cache_off_flushes_every_write(dev: BlockDevice,
                                                         backend: MemoryBackend) -> None:
    page = bytes([0x08, 0x12]) + bytes(18)  # WCE=0
    res = run(dev, mode_select6(bytes(4) + page), bytes(4) + page)
    assert res.ok, DecodedSense.decode(res.sense)
    assert dev.write_cache_enabled is False
    assert run(dev, write10(0, 1), bytes(BS)).ok
    assert backend.flushes == 1
    sensed = bytes(run(dev, mode_sense6(page=0x08, dbd=1)).data_in)
    assert not sensed[6] & 0x04


def test_mode_select_cannot_change_block_length(dev: BlockDevice) -> None:
    desc = struct.pack(">II", 0, 4096)
    data = bytes([0, 0, 0, 8]) + desc
    res = run(dev, mode_select6(data), data)
    assert sense(res) == (0x5, 0x26, 0x00)
    same = bytes([0, 0, 0, 8]) + struct.pack(">II", 0, BS)
    assert run(dev, mode_select6(same), same).ok


def test_read_only_mode_sense_sets_wp(backend: MemoryBackend) -> None:
    d = BlockDevice(backend, serial="RO", read_only=True)
    clear_ua(d)
    data = bytes(run(d, mode_sense6()).data_in)
    assert data[2] & 0x80


def test_report_supported_opcodes_usage(dev: BlockDevice) -> None:
    data = bytes(run(dev, rsoc_one(0x28)).data_in)
    assert data[1] & 0x07 == 0x03  # supported, standard
    usage = data[4:4 + struct.unpack_from(">H", data, 2)[0]]
    assert usage[0] == 0x28 and usage[1] & 0x18 == 0x18  # DPO and FUA evaluated
    data = bytes(run(dev, rsoc_one(0x9E, 0x12)).data_in)
    assert data[1] & 0x07 == 0x03 and data[4:6] == b"\x9e\x12"
    data = bytes(run(dev, rsoc_one(0x9E, 0x11)).data_in)
    assert data[1] & 0x07 == 0x01  # not supported


def test_cdb_usage_lengths_match_opcodes() -> None:
    for (opcode, _sa), usage in SBC_CDB_USAGE.items():
        assert len(usage) == cdb_length(opcode), hex(opcode)
        assert usage[0] == opcode


def test_test_unit_ready_and_close(dev: BlockDevice) -> None:
    tur = bytes(6)
    assert run(dev, tur).ok
    dev.close()
    assert sense(run(dev, tur)) == (0x2, 0x04, 0x00)


def test_behind_a_scsi_target(backend: MemoryBackend) -> None:
    target = ScsiTarget({0: BlockDevice(backend, serial="T0")})
    cmd = ScsiCommand(0, read_capacity10(), nexus="n")
    first = target.execute(cmd)
    assert first.status == ScsiStatus.CHECK_CONDITION  # power on UA
    res = target.execute(cmd)
    assert bytes(res.data_in) == struct.pack(">II", BLOCKS - 1, BS)
    report = target.execute(ScsiCommand(0, struct.pack(">BBBxxxIBB", 0xA0, 0, 0, 64, 0, 0),
                                        nexus="n"))
    assert bytes(report.data_in)[:16] == struct.pack(">I4x", 8) + bytes(8)
    missing = target.execute(ScsiCommand(1, read10(0, 1), nexus="n"))
    assert DecodedSense.decode(missing.sense).asc == 0x25


# --- random CDBs ------------------------------------------------------------------------------
_OPCODES = sorted({op for op, _ in SBC_CDB_USAGE} | {0x00, 0x03, 0x12, 0x15, 0x1A, 0x55, 0x5A,
                                                     0xA0, 0xA3})


@st.composite
def cdbs(draw: st.DrawFn) -> bytes:
    op = draw(st.sampled_from(_OPCODES))
    length = cdb_length(op) or 16
    length = draw(st.sampled_from([length, length, length, 1, length - 1, length + 4]))
    body = draw(st.binary(min_size=max(length - 1, 0), max_size=max(length - 1, 0)))
    return bytes([op]) + body


_SMALL = 64  # blocks: keeps random WRITE SAME / VERIFY ranges cheap


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cdb=cdbs(), data=st.one_of(st.just(b""), st.binary(max_size=2048)),
       read_only=st.booleans())
def test_random_cdbs_never_break_the_device(cdb: bytes, data: bytes, read_only: bool) -> None:
    backend = MemoryBackend(_SMALL * BS)
    dev = BlockDevice(backend, serial="FUZZ", read_only=read_only, max_transfer_bytes=_SMALL * BS)
    clear_ua(dev)
    res = dev.execute(ScsiCommand(0, cdb, data, expected_in=4096, nexus=NEXUS))
    assert res.status in (ScsiStatus.GOOD, ScsiStatus.CHECK_CONDITION)
    if res.status == ScsiStatus.CHECK_CONDITION:
        decoded = DecodedSense.decode(res.sense)
        assert decoded.key != 0x4, (cdb.hex(), decoded)  # never HARDWARE ERROR: that is a bug
    if read_only:
        assert backend.pages == {}
    # the device still answers afterwards
    assert dev.execute(ScsiCommand(0, read_capacity10(), nexus=NEXUS)).ok
