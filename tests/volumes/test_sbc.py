"""BlockDevice (SBC-3) against the in-memory backend, byte for byte."""

from __future__ import annotations

import errno
import struct

import pytest

from tests.volumes.helpers import (
    NEXUS, cdb10, cdb12, cdb16, clear_ua, compare_and_write, get_lba_status, info, read6,
    read10, read_capacity10, read_capacity16, run, sense, unmap_cdb, unmap_list, write6, write10,
)
from volumes.memory import MemoryBackend
from volumes.sbc import (
    BlockDevice, INVALID_FIELD_IN_COMMAND_IU, block_device_characteristics_page,
    expected_data_out, logical_block_provisioning_page, parse_unmap_parameters,
)
from vtl.scsi.command import ScsiStatus
from vtl.scsi.sense import DecodedSense, SenseError

BS = 512
BLOCKS = 2048  # 1 MiB
LBA_OOB = (0x5, 0x21, 0x00)
INVALID_CDB = (0x5, 0x24, 0x00)
INVALID_PARAM = (0x5, 0x26, 0x00)
WRITE_PROTECTED = (0x7, 0x27, 0x00)
MISCOMPARE = (0xE, 0x1D, 0x00)
SHORT_DATA_OUT = (0x5, *INVALID_FIELD_IN_COMMAND_IU)


def pattern(blocks: int, seed: int = 1, bs: int = BS) -> bytes:
    return bytes((seed + i * 7 + i // bs) & 0xFF for i in range(blocks * bs))


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend(BLOCKS * BS)


@pytest.fixture
def dev(backend: MemoryBackend) -> BlockDevice:
    d = BlockDevice(backend, serial="TESTSERIAL01")
    clear_ua(d)
    return d


def read_back(dev: BlockDevice, lba: int, blocks: int) -> bytes:
    res = run(dev, read10(lba, blocks))
    assert res.ok, res
    return bytes(res.data_in)


# --- READ CAPACITY ------------------------------------------------------------------------------
def test_read_capacity10_reports_last_lba_and_block_length(dev: BlockDevice) -> None:
    res = run(dev, read_capacity10())
    assert res.ok
    assert bytes(res.data_in) == struct.pack(">II", BLOCKS - 1, BS)


def test_read_capacity10_saturates_for_large_volumes() -> None:
    d = BlockDevice(MemoryBackend((1 << 32) * BS + 4 * BS), serial="BIG")
    clear_ua(d)
    res = run(d, read_capacity10())
    assert bytes(res.data_in) == struct.pack(">II", 0xFFFFFFFF, BS)
    res16 = run(d, read_capacity16())
    assert struct.unpack_from(">Q", bytes(res16.data_in))[0] == (1 << 32) + 3


def test_read_capacity10_pmi0_with_lba_is_invalid(dev: BlockDevice) -> None:
    assert sense(run(dev, read_capacity10(lba=5))) == INVALID_CDB
    assert run(dev, read_capacity10(lba=5, pmi=1)).ok


def test_read_capacity16_fields(dev: BlockDevice) -> None:
    data = bytes(run(dev, read_capacity16()).data_in)
    assert len(data) == 32
    last, bs, prot, exp, lbp = struct.unpack_from(">QIBBH", data)
    assert (last, bs, prot) == (BLOCKS - 1, BS, 0)
    assert exp & 0x0F == 0  # physical block = logical block by default
    assert lbp & 0x8000 and lbp & 0x4000  # LBPME, LBPRZ
    assert bytes(run(dev, read_capacity16(alloc=12)).data_in) == data[:12]


def test_block_size_4096_option() -> None:
    d = BlockDevice(MemoryBackend(64 * 4096), serial="X", block_size=4096)
    clear_ua(d)
    assert bytes(run(d, read_capacity10()).data_in) == struct.pack(">II", 63, 4096)
    data = bytes(run(d, read_capacity16()).data_in)
    assert data[13] & 0x0F == 0
    assert run(d, write10(63, 1), b"\x5a" * 4096).ok
    assert bytes(run(d, read10(63, 1)).data_in) == b"\x5a" * 4096
    assert d.block_descriptor().block_length == 4096  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        BlockDevice(MemoryBackend(4096), serial="X", block_size=1024)


def test_unknown_service_action_in(dev: BlockDevice) -> None:
    cdb = bytearray(read_capacity16())
    cdb[1] = 0x11
    assert sense(run(dev, bytes(cdb))) == INVALID_CDB


# --- READ / WRITE -------------------------------------------------------------------------------
@pytest.mark.parametrize("rd,wr", [
    (lambda l, n: cdb10(0x28, l, n), lambda l, n: cdb10(0x2A, l, n)),
    (lambda l, n: cdb12(0xA8, l, n), lambda l, n: cdb12(0xAA, l, n)),
    (lambda l, n: cdb16(0x88, l, n), lambda l, n: cdb16(0x8A, l, n)),
    (read6, write6),
])
def test_write_then_read_round_trip(dev: BlockDevice, backend: MemoryBackend, rd, wr) -> None:
    data = pattern(3)
    assert run(dev, wr(100, 3), data).ok
    assert backend.read(100 * BS, 3 * BS) == data
    assert bytes(run(dev, rd(100, 3)).data_in) == data
    assert bytes(run(dev, rd(99, 1)).data_in) == bytes(BS)


def test_read6_zero_length_means_256_blocks(dev: BlockDevice) -> None:
    assert len(run(dev, read6(0, 0)).data_in) == 256 * BS
    assert expected_data_out(write6(0, 0), BS) == 256 * BS


def test_zero_block_transfers(dev: BlockDevice, backend: MemoryBackend) -> None:
    assert run(dev, read10(0, 0)).data_in == b""
    assert run(dev, write10(0, 0)).ok
    assert run(dev, cdb16(0x88, BLOCKS - 1, 0)).ok
    assert backend.pages == {}


@pytest.mark.parametrize("lba,blocks", [(BLOCKS, 1), (BLOCKS - 1, 2), (BLOCKS + 1, 0),
                                        (0xFFFFFFFF, 1), (0x80000000, 0), (0xFFFFFFFF, 0)])
def test_read_write_out_of_range(dev: BlockDevice, backend: MemoryBackend, lba: int,
                                 blocks: int) -> None:
    assert sense(run(dev, read10(lba, blocks))) == LBA_OOB
    assert sense(run(dev, write10(lba, blocks), bytes(blocks * BS))) == LBA_OOB
    assert sense(run(dev, cdb16(0x88, lba, blocks))) == LBA_OOB
    assert backend.pages == {}


def test_read16_lba_beyond_2_64_wraps_never(dev: BlockDevice) -> None:
    assert sense(run(dev, cdb16(0x88, (1 << 64) - 1, 2))) == LBA_OOB
    assert sense(run(dev, cdb16(0x8A, (1 << 64) - 1, 1), bytes(BS))) == LBA_OOB


def test_last_block_is_addressable(dev: BlockDevice) -> None:
    assert run(dev, write10(BLOCKS - 1, 1), b"\xee" * BS).ok
    assert read_back(dev, BLOCKS - 1, 1) == b"\xee" * BS


def test_protection_fields_are_refused(dev: BlockDevice) -> None:
    res = run(dev, read10(0, 1, flags=0x20))
    assert sense(res) == INVALID_CDB
    assert DecodedSense.decode(res.sense).sks == bytes([0xCF, 0x00, 0x01])  # C/D, BPV, bit 7, byte 1
    assert sense(run(dev, write10(0, 1, flags=0x40), bytes(BS))) == INVALID_CDB
    assert sense(run(dev, cdb10(0x2F, 0, 1, flags=0x20))) == INVALID_CDB


def test_dpo_fua_accepted_and_fua_flushes(dev: BlockDevice, backend: MemoryBackend) -> None:
    assert run(dev, read10(0, 1, flags=0x18)).ok
    assert run(dev, write10(0, 1, flags=0x10), bytes(BS)).ok
    assert backend.flushes == 0  # write-back cache: plain writes are not flushed
    assert run(dev, write10(0, 1, flags=0x08), bytes(BS)).ok
    assert backend.flushes == 1
    assert run(dev, cdb16(0x8A, 0, 1, flags=0x0A), bytes(BS)).ok  # FUA + FUA_NV
    assert backend.flushes == 2
    assert dev.device_specific_parameter() & 0x10  # DPOFUA


def test_write_cache_disabled_makes_every_write_durable(dev: BlockDevice,
                                                        backend: MemoryBackend) -> None:
    caching = next(p for p in dev.mode_pages() if p.code == 0x08)
    assert caching.current is not None and caching.current[0] & 0x04  # WCE=1 by default
    assert caching.changeable[0] == 0x04
    assert caching.apply is not None
    caching.apply(bytes([0x08, 0x12]) + bytes(18))  # MODE SELECT with WCE=0
    assert dev.write_cache_enabled is False
    assert run(dev, write10(0, 1), bytes(BS)).ok
    assert backend.flushes == 1


def test_max_transfer_length(backend: MemoryBackend) -> None:
    d = BlockDevice(backend, serial="X", max_transfer_bytes=16 * BS)
    clear_ua(d)
    assert run(d, read10(0, 16)).ok
    res = run(d, read10(0, 17))
    assert sense(res) == INVALID_CDB
    assert struct.unpack(">H", DecodedSense.decode(res.sense).sks[1:])[0] == 7
    assert sense(run(d, write10(0, 17), bytes(17 * BS))) == INVALID_CDB


# --- data-out length vs CDB (residuals) --------------------------------------------------------
def test_short_data_out_writes_the_whole_blocks_that_arrived(dev: BlockDevice,
                                                             backend: MemoryBackend) -> None:
    """FCP-4 9.4.2 a): EDTL < transfer length writes the EDTL worth of whole blocks, GOOD."""
    res = run(dev, write10(0, 2), b"\x11" * BS)
    assert res.ok and res.data_out_expected == 2 * BS
    assert backend.read(0, 2 * BS) == b"\x11" * BS + bytes(BS)
    res = run(dev, write10(4, 1), b"")  # EDTL 0
    assert res.ok and res.data_out_expected == BS
    assert backend.read(4 * BS, BS) == bytes(BS)
    res = run(dev, cdb10(0x2E, 8, 3), b"\x12" * 2 * BS)  # WRITE AND VERIFY
    assert res.ok and res.data_out_expected == 3 * BS
    assert backend.read(8 * BS, 3 * BS) == b"\x12" * 2 * BS + bytes(BS)


def test_partial_block_data_out_writes_nothing(dev: BlockDevice, backend: MemoryBackend) -> None:
    """FCP-4 9.4.2 b): a partial block is refused with 0E/03 and nothing is written."""
    res = run(dev, write10(0, 1), b"\x11" * 200)
    assert sense(res) == SHORT_DATA_OUT and res.data_out_expected == BS
    res = run(dev, write10(0, 2), b"\x11" * (BS + 1))
    assert sense(res) == SHORT_DATA_OUT and res.data_out_expected == 2 * BS
    assert backend.pages == {}


def test_long_data_out_writes_only_what_the_cdb_says(dev: BlockDevice) -> None:
    res = run(dev, write10(0, 1), b"\x22" * 10000)
    assert res.ok and res.data_out_expected == BS
    assert read_back(dev, 0, 2) == b"\x22" * BS + bytes(BS)


def test_exact_data_out_reports_nothing(dev: BlockDevice) -> None:
    assert run(dev, write10(0, 1), bytes(BS)).data_out_expected is None
    assert run(dev, read10(0, 1)).data_out_expected is None


def test_expected_data_out_table() -> None:
    assert expected_data_out(write10(0, 4), BS) == 4 * BS
    assert expected_data_out(cdb10(0x2F, 0, 4, flags=0x02), BS) == 4 * BS  # BYTCHK=01
    assert expected_data_out(cdb10(0x2F, 0, 4, flags=0x06), BS) == BS  # BYTCHK=11
    assert expected_data_out(cdb10(0x2F, 0, 4), BS) == 0
    assert expected_data_out(cdb10(0x41, 0, 4), BS) == BS
    assert expected_data_out(cdb16(0x93, 0, 4, flags=0x01), BS) == 0  # NDOB
    assert expected_data_out(unmap_cdb(40), BS) == 40
    assert expected_data_out(compare_and_write(0, 1), BS) == 2 * BS
    assert expected_data_out(read10(0, 4), BS) is None
    assert expected_data_out(b"\x2a\x00", BS) is None  # short CDB: no answer, no exception
    assert expected_data_out(b"", BS) is None


# --- write protection ---------------------------------------------------------------------------
def test_read_only_volume_refuses_every_write(backend: MemoryBackend) -> None:
    backend.write(0, b"\x33" * BS)
    d = BlockDevice(backend, serial="RO", read_only=True)
    clear_ua(d)
    assert d.device_specific_parameter() & 0x80
    assert bytes(run(d, read10(0, 1)).data_in) == b"\x33" * BS
    assert sense(run(d, write10(0, 1), bytes(BS))) == WRITE_PROTECTED
    assert sense(run(d, write6(0, 1), bytes(BS))) == WRITE_PROTECTED
    assert sense(run(d, cdb16(0x8A, 0, 1), bytes(BS))) == WRITE_PROTECTED
    assert sense(run(d, cdb10(0x2E, 0, 1), bytes(BS))) == WRITE_PROTECTED
    assert sense(run(d, cdb10(0x41, 0, 1, flags=0x08), bytes(BS))) == WRITE_PROTECTED
    assert sense(run(d, cdb10(0x41, 0, 1, flags=0x08))) == WRITE_PROTECTED  # no data-out
    assert sense(run(d, cdb16(0x93, 0, 1, flags=0x09))) == WRITE_PROTECTED
    lst = unmap_list((0, 1))
    assert sense(run(d, unmap_cdb(len(lst)), lst)) == WRITE_PROTECTED
    assert sense(run(d, compare_and_write(0, 1), b"\x33" * BS + bytes(BS))) == WRITE_PROTECTED
    assert backend.read(0, BS) == b"\x33" * BS
    assert run(d, cdb10(0x35, 0, 0)).ok  # SYNCHRONIZE CACHE is fine


# --- VERIFY, WRITE AND VERIFY, COMPARE AND WRITE -----------------------------------------------
@pytest.mark.parametrize("build", [lambda l, n, f: cdb10(0x2F, l, n, f),
                                   lambda l, n, f: cdb12(0xAF, l, n, f),
                                   lambda l, n, f: cdb16(0x8F, l, n, f)])
def test_verify(dev: BlockDevice, build) -> None:
    data = pattern(4, seed=9)
    assert run(dev, write10(10, 4), data).ok
    assert run(dev, build(10, 4, 0x00)).ok  # BYTCHK=0: medium verification
    assert run(dev, build(10, 4, 0x02), data).ok
    bad = bytearray(data)
    bad[1000] ^= 0x58
    res = run(dev, build(10, 4, 0x02), bytes(bad))
    assert sense(res) == MISCOMPARE
    assert info(res) == 1000
    assert sense(run(dev, build(10, 4, 0x04), data)) == INVALID_CDB  # BYTCHK=10b reserved
    assert sense(run(dev, build(BLOCKS - 2, 4, 0x02), bytes(4 * BS))) == LBA_OOB
    assert run(dev, build(10, 0, 0x02)).ok


def test_verify_bytchk_11_compares_one_block_with_each(dev: BlockDevice) -> None:
    assert run(dev, write10(0, 3), b"\x44" * 3 * BS).ok
    assert run(dev, cdb10(0x2F, 0, 3, 0x06), b"\x44" * BS).ok
    res = run(dev, cdb10(0x2F, 0, 4, 0x06), b"\x44" * BS)
    assert sense(res) == MISCOMPARE and info(res) == 3 * BS


def test_verify_short_data_out(dev: BlockDevice) -> None:
    res = run(dev, cdb10(0x2F, 0, 2, 0x02), bytes(BS))
    assert sense(res) == SHORT_DATA_OUT and res.data_out_expected == 2 * BS


def test_write_and_verify(dev: BlockDevice, backend: MemoryBackend) -> None:
    data = pattern(2, seed=3)
    for build in (lambda: cdb10(0x2E, 5, 2), lambda: cdb12(0xAE, 5, 2), lambda: cdb16(0x8E, 5, 2)):
        flushes = backend.flushes
        assert run(dev, build(), data).ok
        assert backend.read(5 * BS, 2 * BS) == data
        assert backend.flushes == flushes + 1
    assert sense(run(dev, cdb10(0x2E, BLOCKS - 1, 2), data)) == LBA_OOB


def test_compare_and_write(dev: BlockDevice, backend: MemoryBackend) -> None:
    old, new = b"\x01" * BS, b"\x02" * BS
    assert run(dev, write10(7, 1), old).ok
    assert run(dev, compare_and_write(7, 1), old + new).ok
    assert backend.read(7 * BS, BS) == new
    res = run(dev, compare_and_write(7, 1), old + b"\x03" * BS)
    assert sense(res) == MISCOMPARE and info(res) == 0
    assert backend.read(7 * BS, BS) == new  # not written after a miscompare
    assert sense(run(dev, compare_and_write(7, 2), (old + new) * 2)) == INVALID_CDB  # > max 1
    assert sense(run(dev, compare_and_write(BLOCKS, 1), old + new)) == LBA_OOB
    res = run(dev, compare_and_write(7, 1), new)
    assert sense(res) == SHORT_DATA_OUT and res.data_out_expected == 2 * BS
    assert sense(run(dev, compare_and_write(7, 1), new * 3)) == SHORT_DATA_OUT
    assert run(dev, compare_and_write(7, 0)).ok
    # 256 blocks wrap to NUMBER OF LOGICAL BLOCKS 0: the data-out gives the mistake away
    assert sense(run(dev, compare_and_write(0, 256), bytes(512 * BS))) == INVALID_CDB


def test_physical_block_exponent_option() -> None:
    d = BlockDevice(MemoryBackend(64 * BS), serial="X", physical_block_size=4096)
    clear_ua(d)
    assert bytes(run(d, read_capacity16()).data_in)[13] & 0x0F == 3
    with pytest.raises(ValueError):
        BlockDevice(MemoryBackend(64 * BS), serial="X", physical_block_size=768)


# --- SYNCHRONIZE CACHE, PRE-FETCH, START STOP UNIT ----------------------------------------------
def test_synchronize_cache(dev: BlockDevice, backend: MemoryBackend) -> None:
    assert run(dev, cdb10(0x35, 0, 0)).ok
    assert run(dev, cdb16(0x91, BLOCKS - 1, 1, flags=0x02)).ok  # IMMED
    assert backend.flushes == 2
    assert sense(run(dev, cdb10(0x35, BLOCKS, 1))) == LBA_OOB
    assert sense(run(dev, cdb16(0x91, BLOCKS - 1, 2))) == LBA_OOB
    assert backend.flushes == 2


def test_pre_fetch(dev: BlockDevice) -> None:
    assert run(dev, cdb10(0x34, 0, 256)).status == ScsiStatus.GOOD
    assert run(dev, cdb16(0x90, BLOCKS - 1, 1)).status == ScsiStatus.GOOD
    assert sense(run(dev, cdb10(0x34, BLOCKS, 1))) == LBA_OOB
    assert sense(run(dev, cdb16(0x90, BLOCKS - 5, 6))) == LBA_OOB


def test_start_stop_unit(dev: BlockDevice, backend: MemoryBackend) -> None:
    assert run(dev, bytes([0x1B, 0, 0, 0, 0x01, 0])).ok  # START
    assert backend.flushes == 0
    assert run(dev, bytes([0x1B, 0, 0, 0, 0x00, 0])).ok  # STOP flushes
    assert backend.flushes == 1
    assert run(dev, bytes([0x1B, 0, 0, 0, 0x04, 0])).ok  # STOP, NO_FLUSH
    assert backend.flushes == 1
    assert run(dev, read10(0, 1)).ok  # still serving


# --- WRITE SAME ---------------------------------------------------------------------------------
@pytest.mark.parametrize("op", [0x41, 0x93])
def test_write_same_pattern(dev: BlockDevice, backend: MemoryBackend, op: int) -> None:
    build = cdb10 if op == 0x41 else cdb16
    block = pattern(1, seed=77)
    assert run(dev, build(op, 20, 300), block).ok
    assert backend.read(20 * BS, 300 * BS) == block * 300
    assert backend.read(19 * BS, BS) == bytes(BS)
    assert backend.read(320 * BS, BS) == bytes(BS)
    assert run(dev, build(op, BLOCKS - 1, 1), block).ok
    assert sense(run(dev, build(op, BLOCKS - 1, 2), block)) == LBA_OOB


def test_write_same_large_is_chunked(backend: MemoryBackend) -> None:
    big = MemoryBackend(8192 * BS)
    d = BlockDevice(big, serial="X")
    clear_ua(d)
    assert run(d, cdb16(0x93, 0, 8192), b"\x7f" * BS).ok
    assert big.read(0, 8192 * BS) == b"\x7f" * 8192 * BS


@pytest.mark.parametrize("op,flags", [(0x41, 0x08), (0x93, 0x08), (0x41, 0x00)])
def test_write_same_zero_block_deallocates(dev: BlockDevice, backend: MemoryBackend,
                                           op: int, flags: int) -> None:
    build = cdb10 if op == 0x41 else cdb16
    assert run(dev, write10(0, 64), b"\xff" * 64 * BS).ok
    assert run(dev, build(op, 0, 32, flags), bytes(BS)).ok
    assert read_back(dev, 0, 64) == bytes(32 * BS) + b"\xff" * 32 * BS
    assert backend.extents(0, 64 * BS) == [(0, 32 * BS, False), (32 * BS, 32 * BS, True)]


def test_write_same16_ndob(dev: BlockDevice, backend: MemoryBackend) -> None:
    assert run(dev, write10(0, 16), b"\xff" * 16 * BS).ok
    res = run(dev, cdb16(0x93, 0, 16, 0x09))  # UNMAP + NDOB, no data-out
    assert res.ok and res.data_out_expected is None
    assert backend.pages == {}
    assert sense(run(dev, cdb10(0x41, 0, 16, 0x01), bytes(BS))) == INVALID_CDB  # no NDOB on 10


def test_write_same_invalid_fields(dev: BlockDevice) -> None:
    blk = bytes(BS)
    assert sense(run(dev, cdb10(0x41, 0, 1, 0x10), blk)) == INVALID_CDB  # ANCHOR
    assert sense(run(dev, cdb16(0x93, 0, 1, 0x18), blk)) == INVALID_CDB  # ANCHOR + UNMAP
    assert sense(run(dev, cdb10(0x41, 0, 1, 0x04), blk)) == INVALID_CDB  # PBDATA
    assert sense(run(dev, cdb10(0x41, 0, 1, 0x02), blk)) == INVALID_CDB  # LBDATA
    assert sense(run(dev, cdb10(0x41, 0, 0), blk)) == INVALID_CDB  # WSNZ
    assert sense(run(dev, cdb10(0x41, 0, 1, 0x20), blk)) == INVALID_CDB  # WRPROTECT


def test_write_same_limit(backend: MemoryBackend) -> None:
    d = BlockDevice(MemoryBackend(1 << 31), serial="X")  # 2 GiB: 4 Mi blocks
    clear_ua(d)
    limit = d.limits.max_write_same_length
    assert limit == 0xFFFF
    assert sense(run(d, cdb16(0x93, 0, limit + 1), bytes(BS))) == INVALID_CDB
    assert run(d, cdb16(0x93, 0, limit, 0x08), bytes(BS)).ok


@pytest.mark.parametrize("size", [0, BS // 2, BS * 2])
def test_write_same_needs_exactly_one_block(dev: BlockDevice, backend: MemoryBackend,
                                            size: int) -> None:
    res = run(dev, cdb10(0x41, 0, 4, 0x08), b"\x01" * size)
    assert sense(res) == SHORT_DATA_OUT
    assert res.data_out_expected == BS
    assert backend.pages == {}


# --- UNMAP --------------------------------------------------------------------------------------
def test_unmap_deallocates_and_reads_zeros(dev: BlockDevice, backend: MemoryBackend) -> None:
    assert run(dev, write10(0, 64), b"\xaa" * 64 * BS).ok
    lst = unmap_list((0, 8), (40, 16))
    res = run(dev, unmap_cdb(len(lst)), lst)
    assert res.ok and res.data_out_expected is None
    assert read_back(dev, 0, 64) == (bytes(8 * BS) + b"\xaa" * 32 * BS + bytes(16 * BS)
                                     + b"\xaa" * 8 * BS)
    assert backend.allocated_bytes == 40 * BS


def test_unmap_parameter_list_checks(dev: BlockDevice, backend: MemoryBackend) -> None:
    assert run(dev, write10(0, 8), b"\xaa" * 8 * BS).ok
    assert run(dev, unmap_cdb(0)).ok  # no parameter list: nothing to do
    assert sense(run(dev, unmap_cdb(4), bytes(4))) == (0x5, 0x1A, 0x00)
    assert run(dev, unmap_cdb(8), unmap_list()).ok  # header only
    assert sense(run(dev, unmap_cdb(24, anchor=1), unmap_list((0, 1)))) == INVALID_CDB
    # one descriptor in range, one not: nothing is unmapped
    lst = unmap_list((0, 8), (BLOCKS - 1, 2))
    assert sense(run(dev, unmap_cdb(len(lst)), lst)) == LBA_OOB
    assert read_back(dev, 0, 8) == b"\xaa" * 8 * BS
    # 0 blocks at the end of the LUN is fine (libiscsi unmap_0blocks)
    lst = unmap_list((BLOCKS, 0))
    assert run(dev, unmap_cdb(len(lst)), lst).ok
    # a descriptor length that runs past the list
    bad = bytearray(unmap_list((0, 1)))
    bad[2:4] = struct.pack(">H", 32)
    assert sense(run(dev, unmap_cdb(len(bad)), bytes(bad))) == INVALID_PARAM
    # an incomplete trailing descriptor is ignored
    lst = unmap_list((0, 1)) + bytes(8)
    lst = struct.pack(">HH", len(lst) - 2, len(lst) - 8) + lst[4:]
    assert run(dev, unmap_cdb(len(lst)), lst).ok
    assert read_back(dev, 0, 2) == bytes(BS) + b"\xaa" * BS
    # the list is shorter than PARAMETER LIST LENGTH says
    lst = unmap_list((0, 1))
    res = run(dev, unmap_cdb(len(lst) + 16), lst)
    assert sense(res) == SHORT_DATA_OUT and res.data_out_expected == len(lst) + 16


def test_unmap_limits(backend: MemoryBackend) -> None:
    d = BlockDevice(backend, serial="X", max_unmap_descriptors=2, max_unmap_lba_count=10)
    clear_ua(d)
    lst = unmap_list((0, 1), (2, 1), (4, 1))
    res = run(d, unmap_cdb(len(lst)), lst)
    assert sense(res) == INVALID_PARAM
    assert DecodedSense.decode(res.sense).sks[0] & 0x40 == 0  # pointer into the parameter list
    lst = unmap_list((0, 11))
    assert sense(run(d, unmap_cdb(len(lst)), lst)) == INVALID_PARAM
    lst = unmap_list((0, 6), (10, 6))
    assert sense(run(d, unmap_cdb(len(lst)), lst)) == INVALID_PARAM
    lst = unmap_list((0, 5), (10, 5))
    assert run(d, unmap_cdb(len(lst)), lst).ok


def test_parse_unmap_parameters() -> None:
    assert parse_unmap_parameters(unmap_list((1, 2), (3, 4))) == [(1, 2), (3, 4)]
    with pytest.raises(SenseError):
        parse_unmap_parameters(b"\x00" * 7)


# --- GET LBA STATUS -----------------------------------------------------------------------------
def _lba_status(data: bytes) -> list[tuple[int, int, int]]:
    length = struct.unpack_from(">I", data)[0]
    assert length == len(data) - 4
    return [struct.unpack_from(">QIB", data, at) for at in range(8, len(data), 16)]


def test_get_lba_status(dev: BlockDevice) -> None:
    # fresh volume: everything deallocated
    res = run(dev, get_lba_status(0))
    assert _lba_status(bytes(res.data_in)) == [(0, BLOCKS, 1)]
    assert run(dev, write10(16, 16), b"\x01" * 16 * BS).ok
    assert _lba_status(bytes(run(dev, get_lba_status(0)).data_in)) == [
        (0, 16, 1), (16, 16, 0), (32, BLOCKS - 32, 1)]
    assert _lba_status(bytes(run(dev, get_lba_status(20)).data_in)) == [
        (20, 12, 0), (32, BLOCKS - 32, 1)]
    # allocation length 24 holds one descriptor
    data = bytes(run(dev, get_lba_status(0, alloc=24)).data_in)
    assert len(data) == 24 and struct.unpack_from(">QIB", data, 8) == (0, 16, 1)
    assert sense(run(dev, get_lba_status(BLOCKS))) == LBA_OOB


def test_get_lba_status_partial_page_is_mapped(dev: BlockDevice) -> None:
    assert run(dev, write10(9, 1), b"\x01" * BS).ok  # page of 8 blocks: LBAs 8-15 mapped
    assert _lba_status(bytes(run(dev, get_lba_status(0)).data_in))[:3] == [
        (0, 8, 1), (8, 8, 0), (16, BLOCKS - 16, 1)]


# --- VPD and mode pages -------------------------------------------------------------------------
def test_block_limits_vpd(dev: BlockDevice) -> None:
    page = dev.vpd_pages()[0xB0]
    assert len(page) == 0x3C
    (wsnz, caw, otlg, mtl, otl, _pf, mulc, mubdc, oug, uga,
     mwsl) = struct.unpack_from(">BBHIIIIIIIQ", page)
    assert wsnz == 1 and caw == 1 and otlg == 8
    assert mtl == 8 * 1024 * 1024 // BS and otl == 1024 * 1024 // BS
    assert mulc == 0xFFFFFFFF and mubdc == 256 and oug == 8 and uga == 0
    assert mwsl == 0xFFFF


def test_block_device_characteristics_and_provisioning_vpd(dev: BlockDevice) -> None:
    pages = dev.vpd_pages()
    assert pages[0xB1] == block_device_characteristics_page()
    assert pages[0xB1][:2] == b"\x00\x01" and len(pages[0xB1]) == 0x3C
    lbp = pages[0xB2]
    assert lbp == logical_block_provisioning_page()
    assert lbp[1] & 0x80 and lbp[1] & 0x40 and lbp[1] & 0x20 and lbp[1] & 0x04  # LBPU/WS/WS10/RZ
    assert not lbp[1] & 0x02  # ANC_SUP
    assert lbp[2] & 0x07 == 0x02  # thin provisioned


def test_mode_pages_and_block_descriptor(dev: BlockDevice) -> None:
    keys = sorted(p.key for p in dev.mode_pages())
    assert keys == [(0x01, 0), (0x08, 0), (0x0A, 0), (0x0A, 1)]
    control = next(p for p in dev.mode_pages() if p.key == (0x0A, 0))
    assert control.current is not None and not control.current[2] & 0x08  # SWP clear
    desc = dev.block_descriptor()
    assert desc is not None and (desc.number_of_blocks, desc.block_length) == (BLOCKS, BS)
    from vtl.scsi.modepages import BlockDescriptor
    dev.apply_block_descriptor(BlockDescriptor(number_of_blocks=0, block_length=BS))
    with pytest.raises(SenseError):
        dev.apply_block_descriptor(BlockDescriptor(number_of_blocks=0, block_length=4096))
    ro = BlockDevice(MemoryBackend(BS * 8), serial="RO", read_only=True)
    controls = [p for p in ro.mode_pages() if p.key == (0x0A, 0)]
    assert len(controls) == 1
    assert controls[0].current is not None and controls[0].current[2] & 0x08  # SWP set


# --- failures -----------------------------------------------------------------------------------
class _FailingBackend(MemoryBackend):
    def __init__(self, size: int, err: int) -> None:
        super().__init__(size)
        self.err = err

    def read(self, offset: int, length: int) -> bytes:
        raise OSError(self.err, "boom")

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise OSError(self.err, "boom")


def test_backend_errors_become_medium_errors() -> None:
    d = BlockDevice(_FailingBackend(BLOCKS * BS, errno.EIO), serial="X")
    clear_ua(d)
    res = run(d, read10(5, 1))
    assert sense(res) == (0x3, 0x11, 0x00) and info(res) == 5
    assert sense(run(d, write10(6, 1), bytes(BS))) == (0x3, 0x0C, 0x00)


def test_out_of_space_is_space_allocation_failed() -> None:
    d = BlockDevice(_FailingBackend(BLOCKS * BS, errno.ENOSPC), serial="X")
    clear_ua(d)
    assert sense(run(d, write10(6, 1), bytes(BS))) == (0x7, 0x27, 0x07)


def test_closed_device_is_not_ready(dev: BlockDevice) -> None:
    dev.close()
    assert sense(run(dev, read10(0, 1))) == (0x2, 0x04, 0x00)
    assert sense(run(dev, write10(0, 1), bytes(BS))) == (0x2, 0x04, 0x00)
    assert sense(run(dev, read_capacity10())) == (0x2, 0x04, 0x00)


def test_unit_attention_first(backend: MemoryBackend) -> None:
    d = BlockDevice(backend, serial="X")
    assert sense(run(d, read10(0, 1), nexus="other")) == (0x6, 0x29, 0x00)
    assert run(d, read10(0, 1), nexus="other").ok
    assert NEXUS  # the fixture nexus is separate


def test_memory_backend_extents() -> None:
    m = MemoryBackend(10 * 4096)
    assert m.extents(0, 10 * 4096) == [(0, 10 * 4096, False)]
    m.write(4096 + 5, b"x")
    m.write(2 * 4096, b"y")
    m.write(7 * 4096, b"z")
    assert m.extents(100, 9 * 4096) == [(100, 4096 - 100, False), (4096, 2 * 4096, True),
                                        (3 * 4096, 4 * 4096, False), (7 * 4096, 4096, True),
                                        (8 * 4096, 4096 + 100, False)]
    m.discard(0, 3 * 4096)
    assert m.pages.keys() == {7}
    assert m.extents(0, 0) == []


def test_miscompare_offset_deep_in_a_large_verify(dev: BlockDevice) -> None:
    data = pattern(1024, seed=5)
    assert run(dev, write10(0, 1024), data).ok
    bad = bytearray(data)
    bad[300_001] ^= 1
    res = run(dev, cdb10(0x2F, 0, 1024, 0x02), bytes(bad))
    assert sense(res) == MISCOMPARE and info(res) == 300_001
