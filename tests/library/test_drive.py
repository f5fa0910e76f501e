"""TapeDrive driven through execute(ScsiCommand), as the transport does: byte-exact sense."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vtl.library.cartridge import Cartridge
from vtl.library.drive import TapeDrive
from vtl.scsi.command import ScsiCommand, ScsiResult, ScsiStatus
from vtl.scsi.sense import DecodedSense, SenseError

MiB = 1024 * 1024
N1 = "iqn.1993-08.org.debian:01:host,i,0x1"
N2 = "iqn.1993-08.org.debian:01:other,i,0x2"


def run(drive: TapeDrive, cdb: bytes | list[int], data: bytes = b"", nexus: str = N1,
        expected_in: int = 1 << 24) -> ScsiResult:
    return drive.execute(ScsiCommand(lun=0, cdb=bytes(cdb), data_out=data,
                                     expected_in=expected_in, nexus=nexus))


def ok(drive: TapeDrive, cdb: bytes | list[int], data: bytes = b"", nexus: str = N1) -> bytes:
    res = run(drive, cdb, data, nexus)
    assert res.status == ScsiStatus.GOOD, DecodedSense.decode(res.sense) if res.sense else res
    return bytes(res.data_in)


def sense(res: ScsiResult) -> DecodedSense:
    assert res.status == ScsiStatus.CHECK_CONDITION
    return DecodedSense.decode(res.sense)


def expect(res: ScsiResult, key: int, asc: int, ascq: int, *, info: int | None = None,
           fm: bool = False, eom: bool = False, ili: bool = False) -> DecodedSense:
    s = sense(res)
    assert (s.key, s.asc, s.ascq) == (key, asc, ascq), s
    assert (s.filemark, s.eom, s.ili) == (fm, eom, ili), s
    if info is None:
        assert not s.valid, s
    else:
        assert s.valid and s.information == info & 0xFFFFFFFF, s
    return s


# --- CDB builders ------------------------------------------------------------------------------

def read6(n: int, *, fixed: bool = False, sili: bool = False) -> bytes:
    return bytes([0x08, (1 if fixed else 0) | (2 if sili else 0)]) + n.to_bytes(3, "big") + b"\0"


def write6(n: int, *, fixed: bool = False) -> bytes:
    return bytes([0x0A, 1 if fixed else 0]) + n.to_bytes(3, "big") + b"\0"


def wfm(n: int, *, immed: bool = False) -> bytes:
    return bytes([0x10, 1 if immed else 0]) + n.to_bytes(3, "big") + b"\0"


def space6(code: int, count: int) -> bytes:
    return bytes([0x11, code]) + (count & 0xFFFFFF).to_bytes(3, "big") + b"\0"


def space16(code: int, count: int) -> bytes:
    return bytes([0x91, code, 0, 0]) + (count & (2**64 - 1)).to_bytes(8, "big") + bytes(4)


def locate10(obj: int, *, bt: bool = False) -> bytes:
    return bytes([0x2B, 4 if bt else 0, 0]) + obj.to_bytes(4, "big") + bytes(3)


def locate16(obj: int, dest: int = 0) -> bytes:
    return bytes([0x92, dest << 3, 0, 0]) + obj.to_bytes(8, "big") + bytes(4)


def read_pos(sa: int = 0, alloc: int = 0) -> bytes:
    return bytes([0x34, sa, 0, 0, 0, 0, 0]) + alloc.to_bytes(2, "big") + b"\0"


REWIND = bytes(6)[:0] + bytes([0x01, 0, 0, 0, 0, 0])
TUR = bytes(6)


def position(drive: TapeDrive) -> tuple[int, int, int]:
    """(flags byte, first, last) of READ POSITION short form."""
    data = ok(drive, read_pos())
    assert len(data) == 20
    return data[0], struct.unpack(">I", data[4:8])[0], struct.unpack(">I", data[8:12])[0]


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture
def cart(tmp_path: Path) -> Cartridge:
    c = Cartridge.create(tmp_path / "T", "VTL001L5", 256 * MiB)
    yield c
    c.close()


@pytest.fixture
def drive(cart: Cartridge) -> TapeDrive:
    d = TapeDrive(index=0, serial="DRV0000001")
    expect(run(d, TUR), 0x6, 0x29, 0x00)  # first command of a nexus: POWER ON, RESET
    expect(run(d, TUR), 0x2, 0x3A, 0x00)
    d.load(cart)
    expect(run(d, TUR), 0x6, 0x28, 0x00)
    ok(d, TUR)
    return d


def harness_layout(drive: TapeDrive) -> list[list[bytes]]:
    """The VM harness layout: 16 x 64 KiB, FM, 20 x 10000 B, FM, 4 x 256 KiB, FM, EOD = 43."""
    files = [[bytes([i]) * 65536 for i in range(16)],
             [bytes([i + 20]) * 10000 for i in range(20)],
             [bytes([i + 50]) * 262144 for i in range(4)]]
    for blocks in files:
        for b in blocks:
            ok(drive, write6(len(b)), b)
        ok(drive, wfm(1))
    return files


# --- identity, readiness, load/unload -------------------------------------------------------------

def test_inquiry_identity() -> None:
    d = TapeDrive(index=3, serial="DRV0000004")
    data = ok(d, [0x12, 0, 0, 0, 96, 0])
    assert data[0] == 0x01 and data[1] & 0x80  # sequential access, removable
    assert data[8:16] == b"IBM     " and data[16:32] == b"ULT3580-TD5     "
    assert data[32:36] == b"G9N1"
    serial = ok(d, [0x12, 1, 0x80, 0, 255, 0])
    assert b"DRV0000004" in serial


def test_not_ready_without_medium_and_block_limits() -> None:
    d = TapeDrive(index=0, serial="S", max_block_size=4 * MiB)
    expect(run(d, TUR), 0x6, 0x29, 0x00)
    expect(run(d, TUR), 0x2, 0x3A, 0x00)
    expect(run(d, read6(10)), 0x2, 0x3A, 0x00)
    assert ok(d, [0x05, 0, 0, 0, 0, 0]) == bytes([0, 0x40, 0, 0, 0, 1])
    assert not d.medium_present and d.barcode is None
    with pytest.raises(ValueError):
        TapeDrive(index=0, serial="S", max_block_size=8 * MiB)


def test_load_unload_by_initiator_and_changer(drive: TapeDrive, cart: Cartridge) -> None:
    assert drive.barcode == "VTL001L5" and drive.medium_present
    assert cart.meta.load_count == 1
    ok(drive, write6(4), b"abcd")
    ok(drive, [0x1B, 0, 0, 0, 0, 0])  # unload
    assert drive.unloaded_by_initiator and drive.medium_present
    expect(run(drive, TUR), 0x2, 0x3A, 0x00)
    ok(drive, [0x1B, 0, 0, 0, 1, 0])  # load again: BOT, ready
    ok(drive, TUR)
    assert position(drive)[1] == 0 and not drive.unloaded_by_initiator
    ok(drive, [0x1B, 0, 0, 0, 0, 0])
    out = drive.unload()
    assert out is cart and not drive.medium_present
    expect(run(drive, TUR), 0x2, 0x3A, 0x00)
    assert drive.unload() is None
    expect(run(drive, [0x1B, 0, 0, 0, 1, 0]), 0x2, 0x3A, 0x00)


def test_load_unload_field_checks(drive: TapeDrive) -> None:
    s = expect(run(drive, [0x1B, 0, 0, 0, 0x05, 0]), 0x5, 0x24, 0x00)  # LOAD + EOT
    assert s.sks == bytes([0xCA, 0x00, 0x04])
    s = expect(run(drive, [0x1B, 0, 0, 0, 0x10, 0]), 0x5, 0x24, 0x00)
    assert s.sks == bytes([0xCC, 0x00, 0x04])


def test_prevent_medium_removal(drive: TapeDrive) -> None:
    ok(drive, [0x1E, 0, 0, 0, 1, 0])
    assert drive.removal_prevented
    with pytest.raises(SenseError) as err:
        drive.unload()
    assert err.value.asc == (0x53, 0x02)
    expect(run(drive, [0x1B, 0, 0, 0, 0, 0]), 0x5, 0x53, 0x02)
    ok(drive, [0x1E, 0, 0, 0, 0, 0])
    assert not drive.removal_prevented
    ok(drive, [0x1E, 0, 0, 0, 1, 0])
    assert drive.unload(force=True) is not None
    assert not drive.removal_prevented
    expect(run(drive, [0x1E, 0, 0, 0, 2, 0]), 0x5, 0x24, 0x00)


def test_prevent_dropped_on_nexus_loss(drive: TapeDrive) -> None:
    ok(drive, [0x1E, 0, 0, 0, 1, 0])
    drive.forget_nexus(N1)
    assert not drive.removal_prevented


# --- READ / WRITE ---------------------------------------------------------------------------------

def test_variable_write_read_round_trip(drive: TapeDrive) -> None:
    ok(drive, write6(5), b"hello")
    ok(drive, write6(3), b"abc")
    ok(drive, REWIND)
    assert ok(drive, read6(5)) == b"hello"
    assert ok(drive, read6(3)) == b"abc"
    expect(run(drive, read6(100)), 0x8, 0x00, 0x05, info=100)  # BLANK CHECK at EOD
    assert drive.bytes_written == 8 and drive.bytes_read == 8


def test_read_shorter_block_ili(drive: TapeDrive) -> None:
    ok(drive, write6(10000), b"x" * 10000)
    ok(drive, write6(10), b"y" * 10)
    ok(drive, REWIND)
    res = run(drive, read6(262144))
    expect(res, 0x0, 0x00, 0x00, ili=True, info=262144 - 10000)
    assert bytes(res.data_in) == b"x" * 10000
    assert position(drive)[1] == 1


def test_read_longer_block_negative_residue(drive: TapeDrive) -> None:
    ok(drive, write6(100), bytes(range(100)))
    ok(drive, write6(1), b"z")
    ok(drive, REWIND)
    res = run(drive, read6(40))
    s = expect(res, 0x0, 0x00, 0x00, ili=True, info=-60)
    assert s.information == 0xFFFFFFC4
    assert bytes(res.data_in) == bytes(range(40))
    assert ok(drive, read6(1)) == b"z"  # positioned after the long block


def test_sili_suppresses_ili_in_variable_mode(drive: TapeDrive) -> None:
    ok(drive, write6(10), b"a" * 10)
    ok(drive, write6(10), b"b" * 10)
    ok(drive, REWIND)
    assert ok(drive, read6(64, sili=True)) == b"a" * 10
    assert ok(drive, read6(4, sili=True)) == b"b" * 4


def test_read_filemark(drive: TapeDrive) -> None:
    ok(drive, write6(4), b"data")
    ok(drive, wfm(1))
    ok(drive, write6(4), b"next")
    ok(drive, REWIND)
    ok(drive, read6(4))
    res = run(drive, read6(65536))
    expect(res, 0x0, 0x00, 0x01, fm=True, info=65536)
    assert res.data_in == b""
    assert position(drive)[1] == 2  # after the filemark
    assert ok(drive, read6(4)) == b"next"


def test_fixed_mode(drive: TapeDrive) -> None:
    expect(run(drive, read6(1, fixed=True)), 0x5, 0x24, 0x00)  # no block length set
    ok(drive, [0x15, 0x10, 0, 0, 12, 0], bytes([0, 0, 0x10, 8, 0x58, 0, 0, 0, 0, 0, 0x02, 0]))
    assert drive.block_length == 512
    ok(drive, write6(3, fixed=True), bytes(range(256)) * 6)
    ok(drive, write6(100), b"v" * 100)  # a variable block among fixed ones
    ok(drive, wfm(1))
    ok(drive, REWIND)
    res = run(drive, read6(5, fixed=True))
    expect(res, 0x0, 0x00, 0x00, ili=True, info=2)  # 3 read, the 4th has the wrong length
    assert bytes(res.data_in) == bytes(range(256)) * 6
    res = run(drive, read6(2, fixed=True))
    expect(res, 0x0, 0x00, 0x01, fm=True, info=2)
    res = run(drive, read6(2, fixed=True))
    expect(res, 0x8, 0x00, 0x05, info=2)
    s = expect(run(drive, read6(1, fixed=True, sili=True)), 0x5, 0x24, 0x00)
    assert s.sks == bytes([0xC9, 0x00, 0x01])  # byte 1 bit 1


def test_mode_sense_block_descriptor(drive: TapeDrive, cart: Cartridge) -> None:
    data = ok(drive, [0x1A, 0, 0x3F, 0, 255, 0])
    assert data[1] == 0x00 and data[2] == 0x10 and data[3] == 8  # buffered, not WP
    assert data[4:12] == bytes([0x58, 0, 0, 0, 0, 0, 0, 0])
    pages = data[12:]
    codes = []
    i = 0
    while i < len(pages):
        codes.append(pages[i] & 0x3F)
        i += 2 + pages[i + 1]
    assert {0x0A, 0x0F, 0x10, 0x11, 0x1C} <= set(codes)
    drive.unload()
    drive.load(cart, read_only=True)
    run(drive, TUR)
    data = ok(drive, [0x1A, 0, 0x0F, 0, 255, 0])
    assert data[2] == 0x90  # WP + buffered
    assert data[12:14] == bytes([0x0F, 0x0E])


def test_mode_select_compression_and_bad_block_length(drive: TapeDrive) -> None:
    page = ok(drive, [0x1A, 0x08, 0x0F, 0, 255, 0])[4:]
    assert page[2] & 0x40 and not page[2] & 0x80  # DCC, DCE off
    new = bytearray(page)
    new[2] |= 0x80
    ok(drive, [0x15, 0x10, 0, 0, 4 + 16, 0], bytes([0, 0, 0x10, 0]) + bytes(new))
    assert ok(drive, [0x1A, 0x08, 0x0F, 0, 255, 0])[4 + 2] & 0x80
    too_big = (8 * MiB).to_bytes(3, "big")
    res = run(drive, [0x15, 0x10, 0, 0, 12, 0], bytes([0, 0, 0x10, 8, 0, 0, 0, 0, 0]) + too_big)
    expect(res, 0x5, 0x26, 0x00)
    assert drive.block_length == 0


def test_write_too_large_block(drive: TapeDrive) -> None:
    s = expect(run(drive, write6(MiB + 1), b"x" * (MiB + 1)), 0x5, 0x24, 0x00)
    assert s.sks[0] & 0xC0 == 0xC0 and s.sks[1:] == b"\x00\x02"
    ok(drive, write6(MiB), b"x" * MiB)


def test_write_reserved_bits(drive: TapeDrive) -> None:
    s = expect(run(drive, [0x0A, 0x02, 0, 0, 1, 0], b"x"), 0x5, 0x24, 0x00)
    assert s.sks == bytes([0xC9, 0x00, 0x01])
    s = expect(run(drive, [0x08, 0x80, 0, 0, 1, 0]), 0x5, 0x24, 0x00)
    assert s.sks == bytes([0xCF, 0x00, 0x01])


def test_write_protected(cart: Cartridge) -> None:
    d = TapeDrive(index=0, serial="S")
    d.load(cart, read_only=True)
    run(d, TUR)
    run(d, TUR)
    expect(run(d, write6(1), b"x"), 0x7, 0x27, 0x00)
    expect(run(d, wfm(1)), 0x7, 0x27, 0x00)
    expect(run(d, [0x19, 1, 0, 0, 0, 0]), 0x7, 0x27, 0x00)
    expect(run(d, read6(1)), 0x8, 0x00, 0x05, info=1)  # reading is fine
    alerts = ok(d, [0x4D, 0, 0x6E, 0, 0, 0, 0, 0x01, 0x44, 0])
    assert alerts[4 + 8 * 5 + 4] == 1  # flag 9 WRITE PROTECT (param 0x0009)


def test_worm_overwrite(tmp_path: Path) -> None:
    c = Cartridge.create(tmp_path / "W", "WORM01L5", 64 * MiB, worm=True)
    d = TapeDrive(index=0, serial="S")
    d.load(c)
    run(d, TUR)
    run(d, TUR)
    ok(d, write6(3), b"one")
    ok(d, wfm(1))
    ok(d, REWIND)
    expect(run(d, write6(3), b"two"), 0x7, 0x30, 0x0C)
    expect(run(d, wfm(1)), 0x7, 0x30, 0x0C)
    expect(run(d, [0x19, 0, 0, 0, 0, 0]), 0x7, 0x30, 0x0C)
    ok(d, space6(3, 0))
    ok(d, write6(3), b"two")  # append at EOD
    assert ok(d, [0x1A, 0, 0x3F, 0, 255, 0])[1] == 0x01  # medium type: WORM
    c.close()


def test_early_warning_and_volume_overflow(tmp_path: Path) -> None:
    cap = 4 * MiB
    c = Cartridge.create(tmp_path / "S", "SMALL1L5", cap)
    d = TapeDrive(index=0, serial="S")
    d.load(c)
    run(d, TUR)
    run(d, TUR)
    blk = b"q" * 65536
    n = 0
    while True:
        res = run(d, write6(len(blk)), blk)
        n += 1
        if res.status != ScsiStatus.GOOD:
            break
    expect(res, 0x0, 0x00, 0x02, eom=True, info=0)  # early warning: data written
    assert c.eod == n
    assert position(d)[0] & 0x01  # BPEW
    while True:
        res = run(d, write6(len(blk)), blk)
        if sense(res).key != 0x0:
            break
        n += 1
    expect(res, 0xD, 0x00, 0x02, eom=True, info=65536)  # not written
    assert c.eod == n  # the overflowing block was not written
    expect(run(d, wfm(1)), 0x0, 0x00, 0x02, eom=True, info=0)
    c.close()


# --- filemarks, space, locate, position -------------------------------------------------------

def test_harness_tell_seek_eod(drive: TapeDrive) -> None:
    files = harness_layout(drive)
    assert position(drive)[1] == 43
    ok(drive, REWIND)
    assert position(drive) == (0x80, 0, 0)  # BOP
    ok(drive, space6(1, 2))  # mt fsf 2
    assert position(drive) == (0, 38, 38)  # mt tell: block 38
    ok(drive, locate10(17))  # mt seek 17
    assert ok(drive, read6(10000)) == files[1][0]
    ok(drive, REWIND)
    # mt eod (st): space 0x7fffff filemarks -> BLANK CHECK, residue = not spaced
    expect(run(drive, space6(1, 0x7FFFFF)), 0x8, 0x00, 0x05, info=0x7FFFFF - 3)
    assert position(drive)[1] == 43
    ok(drive, write6(30000), b"n" * 30000)  # append at EOD
    ok(drive, wfm(1))
    ok(drive, REWIND)
    ok(drive, space6(1, 3))
    assert ok(drive, read6(30000)) == b"n" * 30000


def test_bsf_fsf_sequence(drive: TapeDrive) -> None:
    files = harness_layout(drive)
    ok(drive, REWIND)
    ok(drive, space6(1, 3))
    ok(drive, space6(1, -2))  # bsf 2: BOP side of filemark 37
    assert position(drive)[1] == 37
    ok(drive, space6(1, 1))
    assert ok(drive, read6(262144)) == files[2][0]


def test_read_larger_bs_through_file(drive: TapeDrive) -> None:
    files = harness_layout(drive)
    ok(drive, REWIND)
    ok(drive, space6(1, 1))
    got = []
    while True:
        res = run(drive, read6(262144))
        s = sense(res)
        if s.filemark:
            assert s.information == 262144
            break
        assert s.ili and s.information == 262144 - 10000
        got.append(bytes(res.data_in))
    assert got == files[1]


@pytest.mark.parametrize("space", [space6, space16])
def test_space_blocks_sense(drive: TapeDrive, space) -> None:
    harness_layout(drive)
    ok(drive, REWIND)
    ok(drive, space(0, 10))
    assert position(drive)[1] == 10
    expect(run(drive, space(0, 10)), 0x0, 0x00, 0x01, fm=True, info=4)  # 6 spaced, FM
    assert position(drive)[1] == 17
    expect(run(drive, space(0, -2)), 0x0, 0x00, 0x01, fm=True, info=2)
    assert position(drive)[1] == 16  # BOP side of the filemark
    ok(drive, space(0, -3))
    assert position(drive)[1] == 13
    expect(run(drive, space(0, -20)), 0x0, 0x00, 0x04, eom=True, info=7)  # BOP
    assert position(drive)[1] == 0
    ok(drive, locate10(41))
    expect(run(drive, space(0, 5)), 0x0, 0x00, 0x01, fm=True, info=4)
    expect(run(drive, space(0, 5)), 0x8, 0x00, 0x05, info=5)  # at EOD
    assert position(drive)[1] == 43


@pytest.mark.parametrize("space", [space6, space16])
def test_space_filemarks_and_eod(drive: TapeDrive, space) -> None:
    harness_layout(drive)
    ok(drive, space(1, -1))
    assert position(drive)[1] == 42
    expect(run(drive, space(1, -5)), 0x0, 0x00, 0x04, eom=True, info=3)
    assert position(drive)[1] == 0
    ok(drive, space(3, 0))
    assert position(drive)[1] == 43
    s = expect(run(drive, space(2, 1)), 0x5, 0x24, 0x00)
    assert s.sks == bytes([0xCB, 0x00, 0x01])


def test_locate_past_eod_and_16(drive: TapeDrive) -> None:
    harness_layout(drive)
    expect(run(drive, locate10(1000)), 0x8, 0x00, 0x05)
    assert position(drive)[1] == 43
    ok(drive, locate10(5, bt=True))
    assert position(drive)[1] == 5
    ok(drive, locate16(20))
    assert position(drive)[1] == 20
    ok(drive, locate16(2, dest=1))  # logical file 2
    assert position(drive)[1] == 38
    ok(drive, locate16(0, dest=3))
    assert position(drive)[1] == 43
    expect(run(drive, [0x2B, 0x02, 0, 0, 0, 0, 1, 0, 1, 0]), 0x5, 0x24, 0x00)  # partition 1


def test_read_position_forms(drive: TapeDrive) -> None:
    harness_layout(drive)
    ok(drive, locate10(38))
    long = ok(drive, read_pos(6))
    assert len(long) == 32 and long[0] == 0
    assert struct.unpack(">IQQQ", long[4:32]) == (0, 38, 2, 0)
    ext = ok(drive, read_pos(8, 32))
    assert len(ext) == 32 and struct.unpack(">H", ext[2:4])[0] == 0x1C
    assert struct.unpack(">QQQ", ext[8:32]) == (38, 38, 0)
    assert len(ok(drive, read_pos(8, 8))) == 8
    expect(run(drive, read_pos(3)), 0x5, 0x24, 0x00)
    ok(drive, REWIND)
    assert ok(drive, read_pos(6))[0] == 0x80


def test_write_in_middle_sets_eod(drive: TapeDrive) -> None:
    harness_layout(drive)
    ok(drive, locate10(17))
    ok(drive, write6(5), b"fresh")
    ok(drive, wfm(1))
    ok(drive, space6(3, 0))
    assert position(drive)[1] == 19
    ok(drive, locate10(17))
    assert ok(drive, read6(5)) == b"fresh"
    expect(run(drive, read6(5)), 0x0, 0x00, 0x01, fm=True, info=5)
    expect(run(drive, read6(5)), 0x8, 0x00, 0x05, info=5)


def test_write_filemarks_variants(drive: TapeDrive, cart: Cartridge) -> None:
    ok(drive, wfm(0))  # flush only
    ok(drive, wfm(2, immed=True))
    assert cart.filemark_count == 2
    s = expect(run(drive, [0x10, 0x02, 0, 0, 1, 0]), 0x5, 0x24, 0x00)  # setmarks
    assert s.sks == bytes([0xC9, 0x00, 0x01])
    cdb16 = bytes([0x80, 0, 0, 0]) + (2).to_bytes(8, "big") + (1).to_bytes(3, "big") + b"\0"
    ok(drive, cdb16)
    assert cart.filemark_count == 3
    bad = bytes([0x80, 0, 0, 0]) + (0).to_bytes(8, "big") + (1).to_bytes(3, "big") + b"\0"
    expect(run(drive, bad), 0x5, 0x24, 0x00)


def test_erase(drive: TapeDrive, cart: Cartridge) -> None:
    harness_layout(drive)
    ok(drive, locate10(17))
    ok(drive, [0x19, 1, 0, 0, 0, 0])  # long erase from here
    assert cart.eod == 17
    ok(drive, REWIND)
    ok(drive, [0x19, 0, 0, 0, 0, 0])
    assert cart.eod == 0
    expect(run(drive, read6(1)), 0x8, 0x00, 0x05, info=1)


# --- density, log pages, attributes -------------------------------------------------------------

def test_report_density_support(drive: TapeDrive) -> None:
    data = ok(drive, [0x44, 0, 0, 0, 0, 0, 0, 0x04, 0, 0])
    assert struct.unpack(">H", data[:2])[0] == 2 + 2 * 52
    assert data[4] == 0x58 and data[4 + 2] & 0xA0 == 0xA0  # WRTOK + DEFLT
    assert data[4 + 52] == 0x46
    media = ok(drive, [0x44, 1, 0, 0, 0, 0, 0, 0x04, 0, 0])
    assert struct.unpack(">H", media[:2])[0] == 54 and media[4] == 0x58
    assert len(ok(drive, [0x44, 0, 0, 0, 0, 0, 0, 0, 10, 0])) == 10


def test_log_sense_pages(drive: TapeDrive) -> None:
    assert ok(drive, [0x4D, 0, 0x40, 0, 0, 0, 0, 0, 255, 0]) == bytes([0, 0, 0, 3, 0, 0x0C, 0x2E])
    ok(drive, write6(1000), b"w" * 1000)
    ok(drive, REWIND)
    ok(drive, read6(1000))
    page = ok(drive, [0x4D, 0, 0x4C, 0, 0, 0, 0, 0, 255, 0])
    assert page[0] == 0x0C
    params = {}
    i = 4
    while i < len(page):
        code, _ctl, ln = struct.unpack(">HBB", page[i:i + 4])
        params[code] = int.from_bytes(page[i + 4:i + 4 + ln], "big")
        i += 4 + ln
    assert params[0] == 1000 and params[1] == 1000 and params[2] == 1000 and params[3] == 1000
    ta = ok(drive, [0x4D, 0, 0x6E, 0, 0, 0, 0, 0x01, 0x44, 0])
    assert ta[0] == 0x2E and struct.unpack(">H", ta[2:4])[0] == 64 * 5
    assert all(ta[4 + 5 * k + 4] == 0 for k in range(64))
    expect(run(drive, [0x4D, 0, 0x41, 0, 0, 0, 0, 0, 255, 0]), 0x5, 0x24, 0x00)


def attrs_of(data: bytes) -> dict[int, bytes]:
    total = struct.unpack(">I", data[:4])[0]
    assert total == len(data) - 4
    out = {}
    i = 4
    while i < len(data):
        ident, _flags, ln = struct.unpack(">HBH", data[i:i + 5])
        out[ident] = data[i + 5:i + 5 + ln]
        i += 5 + ln
    return out


def test_read_attribute(drive: TapeDrive) -> None:
    cdb = bytes([0x8C, 0, 0, 0, 0, 0, 0, 0, 0, 0]) + (4096).to_bytes(4, "big") + b"\0\0"
    attrs = attrs_of(ok(drive, cdb))
    assert attrs[0x0806] == b"VTL001L5" + b" " * 24
    assert int.from_bytes(attrs[0x0001], "big") == 256
    assert int.from_bytes(attrs[0x0000], "big") == 256
    assert int.from_bytes(attrs[0x0003], "big") == 1
    assert attrs[0x0405] == b"\x58"
    assert len(attrs[0x0406]) == 8 and attrs[0x0406].isdigit()
    assert attrs[0x0400] == b"VTL     "
    only = attrs_of(ok(drive, cdb[:8] + b"\x08\x00" + cdb[10:]))
    assert min(only) >= 0x0800
    lst = ok(drive, bytes([0x8C, 1]) + cdb[2:])
    ids = [struct.unpack(">H", lst[i:i + 2])[0] for i in range(4, len(lst), 2)]
    assert ids == sorted(ids) and {0, 1, 3, 0x400, 0x401, 0x405, 0x406, 0x806} <= set(ids)
    expect(run(drive, bytes([0x8C, 0, 0, 0, 0, 0, 0, 1]) + cdb[8:]), 0x5, 0x24, 0x00)


# --- unit attentions, reservations -------------------------------------------------------------

def test_load_ua_to_every_nexus(cart: Cartridge) -> None:
    d = TapeDrive(index=0, serial="S")
    run(d, TUR, nexus=N1)
    run(d, TUR, nexus=N2)
    d.load(cart)
    expect(run(d, TUR, nexus=N1), 0x6, 0x28, 0x00)
    expect(run(d, TUR, nexus=N2), 0x6, 0x28, 0x00)
    ok(d, TUR, nexus=N2)


def test_reserve_release(drive: TapeDrive) -> None:
    ok(drive, [0x16, 0, 0, 0, 0, 0])
    run(drive, TUR, nexus=N2)
    run(drive, TUR, nexus=N2)
    assert run(drive, TUR, nexus=N2).status == ScsiStatus.RESERVATION_CONFLICT
    ok(drive, [0x17, 0, 0, 0, 0, 0])
    ok(drive, TUR, nexus=N2)


def test_durability_points(drive: TapeDrive, monkeypatch: pytest.MonkeyPatch) -> None:
    import vtl.library.cartridge as cartridge_mod

    calls: list[int] = []
    real = cartridge_mod.os.fsync
    monkeypatch.setattr(cartridge_mod.os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    ok(drive, write6(6), b"stable")
    assert calls == []  # WRITE may stay in the page cache
    ok(drive, wfm(1, immed=True))
    assert calls == []
    ok(drive, [0x01, 1, 0, 0, 0, 0])  # REWIND (Immed) flushes
    assert calls
    calls.clear()
    ok(drive, write6(6), b"again!")
    ok(drive, wfm(1))  # WRITE FILEMARKS without Immed flushes
    assert calls
    calls.clear()
    ok(drive, write6(1), b"x")
    drive.unload()
    assert calls


def test_write_attribute_host_values(drive: TapeDrive, cart: Cartridge) -> None:
    def wattr(body: bytes) -> tuple[bytes, bytes]:
        data = len(body).to_bytes(4, "big") + body
        return bytes([0x8D, 0, 0, 0, 0, 0, 0, 0, 0, 0]) + len(data).to_bytes(4, "big") + b"\0\0", data

    vendor = struct.pack(">HBH", 0x0800, 0x01, 8) + b"BACULA  "
    cdb, data = wattr(vendor)
    ok(drive, cdb, data)
    read = bytes([0x8C, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x00]) + (4096).to_bytes(4, "big") + b"\0\0"
    attrs = attrs_of(ok(drive, read))
    assert attrs[0x0800] == b"BACULA  "
    assert cart.meta.attributes["host"]["0800"]["value"] == b"BACULA  ".hex()
    cdb, data = wattr(struct.pack(">HBH", 0x0000, 0x00, 8) + bytes(8))  # read-only attribute
    s = expect(run(drive, cdb, data), 0x5, 0x26, 0x00)
    assert s.sks == bytes([0x80, 0x00, 0x04])
    cdb, data = wattr(struct.pack(">HBH", 0x0800, 0x01, 0))  # delete
    ok(drive, cdb, data)
    assert 0x0800 not in attrs_of(ok(drive, read))


def test_vpd_b0(drive: TapeDrive) -> None:
    page = ok(drive, [0x12, 1, 0xB0, 0, 255, 0])
    assert page[:4] == bytes([0x01, 0xB0, 0x00, 0x02]) and page[4] & 0x01
    assert 0xB0 in ok(drive, [0x12, 1, 0x00, 0, 255, 0])[4:]


def test_drive_modules_stay_pure() -> None:
    """The SSC state machine and codecs read no clock and open no sockets (STYLE.md)."""
    import ast

    import vtl.library.drive as drive_mod
    import vtl.library.ssc as ssc_mod
    import vtl.library.tapelog as tapelog_mod

    banned = {"time", "socket", "asyncio", "threading", "boto3", "sqlite_utils", "click"}
    for mod in (drive_mod, ssc_mod, tapelog_mod):
        tree = ast.parse(Path(mod.__file__).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            else:
                continue
            assert not banned & set(names), (mod.__name__, names)
