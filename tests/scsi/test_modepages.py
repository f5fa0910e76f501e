"""Mode parameters: codecs, MODE SENSE / MODE SELECT and every error path (SPC-4 6.9-6.12, 7.5)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtl.scsi.command import ScsiStatus
from vtl.scsi.modepages import (
    BlockDescriptor,
    DescriptorFormat,
    ModePage,
    ModeParameterHeader,
    control_mode_page,
)
from vtl.scsi.sense import SenseKey

from .devices import DiskLike, TapeLike, check, run, settle

ILLEGAL = SenseKey.ILLEGAL_REQUEST
CONTROL = bytes.fromhex("0a0a" "0210" "0000" "0000" "ffff" "0000")
CONTROL_EXT = bytes([0x4A, 0x01, 0x00, 0x1C]) + bytes(0x1C)
TEST_PAGE = bytes.fromhex("1004" "0040" "0000")
SUB_PAGE = bytes.fromhex("d0010004" "11223344")  # PS (saveable) | SPF | 10h, subpage 1
TAPE_BD = bytes.fromhex("58000000" "00000000")


def sense6(page: int, sub: int = 0, pc: int = 0, dbd: bool = False, alloc: int = 255) -> bytes:
    return bytes([0x1A, 0x08 if dbd else 0, (pc << 6) | page, sub, alloc, 0])


def sense10(page: int, sub: int = 0, pc: int = 0, dbd: bool = False, llbaa: bool = False,
            alloc: int = 0xFFFF) -> bytes:
    b1 = (0x08 if dbd else 0) | (0x10 if llbaa else 0)
    return bytes([0x5A, b1, (pc << 6) | page, sub, 0, 0, 0, alloc >> 8, alloc & 0xFF, 0])


def select6(data: bytes, pf: bool = True, sp: bool = False, pll: int | None = None) -> bytes:
    n = len(data) if pll is None else pll
    return bytes([0x15, (0x10 if pf else 0) | (0x01 if sp else 0), 0, 0, n, 0])


def select10(data: bytes, pf: bool = True, sp: bool = False) -> bytes:
    n = len(data)
    return bytes([0x55, (0x10 if pf else 0) | (0x01 if sp else 0), 0, 0, 0, 0, 0, n >> 8,
                  n & 0xFF, 0])


@pytest.fixture()
def tape() -> TapeLike:
    dev = TapeLike()
    settle(dev)
    return dev


# --- codecs ---------------------------------------------------------------------------------
@given(st.integers(0, 255), st.integers(0, 0xFFFFFF), st.integers(0, 0xFFFFFF))
def test_general_descriptor_roundtrip(density: int, blocks: int, length: int) -> None:
    d = BlockDescriptor(density, blocks, length)
    raw = d.encode()
    assert len(raw) == 8 and BlockDescriptor.decode(raw + b"xx") == d


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1))
def test_long_lba_descriptor_roundtrip(blocks: int, length: int) -> None:
    d = BlockDescriptor(0, blocks, length)
    raw = d.encode(DescriptorFormat.LONG_LBA)
    assert len(raw) == 16 and BlockDescriptor.decode(raw, DescriptorFormat.LONG_LBA) == d


def test_short_lba_descriptor_saturates() -> None:
    raw = BlockDescriptor(number_of_blocks=2**40, block_length=4096).encode(DescriptorFormat.SHORT_LBA)
    assert raw == bytes.fromhex("ffffffff" "00001000")


def test_headers_roundtrip() -> None:
    h = ModeParameterHeader(medium_type=0x18, device_specific=0x90, block_descriptor_length=8,
                            mode_data_length=0x33)
    assert h.encode6() == bytes([0x33, 0x18, 0x90, 8])
    assert ModeParameterHeader.decode6(h.encode6()) == h
    h10 = ModeParameterHeader(medium_type=1, device_specific=2, block_descriptor_length=16,
                              mode_data_length=0x1234, long_lba=True)
    assert h10.encode10() == bytes.fromhex("1234" "01" "02" "01" "00" "0010")
    assert ModeParameterHeader.decode10(h10.encode10()) == h10


def test_mode_page_construction_checks() -> None:
    with pytest.raises(ValueError):
        ModePage(0x3F, default=b"")
    with pytest.raises(ValueError):
        ModePage(0x10, default=bytes(4), changeable=bytes(3))
    with pytest.raises(ValueError):
        ModePage(0x10, default=bytes(256))
    assert control_mode_page().encode() == CONTROL


# --- MODE SENSE ------------------------------------------------------------------------------
def test_mode_sense6_all_pages_bytes(tape: TapeLike) -> None:
    r = run(tape, sense6(0x3F))
    body = TAPE_BD + CONTROL + TEST_PAGE
    assert bytes(r.data_in) == bytes([3 + len(body), 0x00, 0x00, 8]) + body


def test_mode_sense10_all_pages_and_subpages_bytes(tape: TapeLike) -> None:
    r = run(tape, sense10(0x3F, 0xFF))
    body = TAPE_BD + CONTROL + CONTROL_EXT + TEST_PAGE + SUB_PAGE
    head = (6 + len(body)).to_bytes(2, "big") + bytes([0, 0, 0, 0, 0, 8])
    assert bytes(r.data_in) == head + body


def test_mode_sense_dbd_and_single_page(tape: TapeLike) -> None:
    r = run(tape, sense6(0x10, dbd=True))
    assert bytes(r.data_in) == bytes([3 + 6, 0, 0, 0]) + TEST_PAGE


def test_mode_sense_all_subpages_of_one_page(tape: TapeLike) -> None:
    r = run(tape, sense6(0x10, 0xFF, dbd=True))
    assert bytes(r.data_in)[4:] == TEST_PAGE + SUB_PAGE


def test_mode_sense_changeable_and_default(tape: TapeLike) -> None:
    assert bytes(run(tape, sense6(0x10, pc=1, dbd=True)).data_in)[4:] == bytes.fromhex("1004" "0040" "0f00")
    assert bytes(run(tape, sense6(0x10, pc=2, dbd=True)).data_in)[4:] == TEST_PAGE


def test_mode_sense_saved(tape: TapeLike) -> None:
    check(run(tape, sense6(0x10, pc=3)), ILLEGAL, (0x39, 0x00))
    check(run(tape, sense6(0x3F, pc=3)), ILLEGAL, (0x39, 0x00))
    r = run(tape, sense6(0x10, 0x01, pc=3, dbd=True))
    assert bytes(r.data_in)[4:] == SUB_PAGE


def test_mode_sense_unsupported_page_and_subpage(tape: TapeLike) -> None:
    check(run(tape, sense6(0x22)), ILLEGAL, (0x24, 0x00), bytes([0xC0, 0, 2]))
    check(run(tape, sense6(0x10, 0x05)), ILLEGAL, (0x24, 0x00), bytes([0xC0, 0, 3]))
    check(run(tape, sense6(0x3F, 0x05)), ILLEGAL, (0x24, 0x00), bytes([0xC0, 0, 3]))


def test_mode_sense_reserved_bits(tape: TapeLike) -> None:
    check(run(tape, bytes([0x1A, 0x10, 0x3F, 0, 255, 0])), ILLEGAL, (0x24, 0x00),
          bytes([0xCC, 0, 1]))  # LLBAA does not exist in MODE SENSE(6)


def test_mode_sense_allocation_length(tape: TapeLike) -> None:
    full = bytes(run(tape, sense6(0x3F)).data_in)
    assert bytes(run(tape, sense6(0x3F, alloc=7)).data_in) == full[:7]
    assert bytes(run(tape, sense6(0x3F, alloc=0)).data_in) == b""


def test_mode_sense_disk_descriptors() -> None:
    disk = DiskLike()
    settle(disk)
    short = bytes(run(disk, sense6(0x0A)).data_in)
    assert short[3] == 8 and short[4:12] == bytes.fromhex("ffffffff" "00000200")
    long = bytes(run(disk, sense10(0x0A, llbaa=True)).data_in)
    assert long[4] == 0x01 and long[6:8] == b"\x00\x10"
    assert long[8:24] == bytes.fromhex("0000000100000000" "00000000" "00000200")
    assert long[24:] == CONTROL


# --- MODE SELECT -----------------------------------------------------------------------------
def test_mode_select6_roundtrip(tape: TapeLike) -> None:
    data = bytes([0, 0, 0x10, 8]) + bytes.fromhex("58000000" "00000400") + bytes.fromhex("1004" "0040" "0300")
    r = run(tape, select6(data), data)
    assert r.status == ScsiStatus.GOOD
    assert tape.block == BlockDescriptor(0x58, 0, 0x400)
    assert tape.header_seen == (0, 0x10)
    assert tape.applied == [bytes.fromhex("1004" "0040" "0300")]
    got = bytes(run(tape, sense6(0x10)).data_in)
    assert got[4:12] == bytes.fromhex("58000000" "00000400")
    assert got[12:] == bytes.fromhex("1004" "0040" "0300")


def test_mode_select10_subpage_roundtrip(tape: TapeLike) -> None:
    page = bytes.fromhex("50010004" "aa223344")  # PS ignored on select; SPF set
    data = bytes(8) + page
    assert run(tape, select10(data), data).status == ScsiStatus.GOOD
    got = bytes(run(tape, sense10(0x10, 0x01, dbd=True)).data_in)
    assert got[8:] == bytes.fromhex("d0010004" "aa223344")


def test_mode_select_zero_length_is_a_no_op(tape: TapeLike) -> None:
    assert run(tape, select6(b"")).status == ScsiStatus.GOOD


def test_mode_select_changes_raise_ua_on_other_nexus(tape: TapeLike) -> None:
    settle(tape, "n2")
    data = bytes(4) + bytes.fromhex("1004" "0040" "0100")
    assert run(tape, select6(data), data).status == ScsiStatus.GOOD
    check(run(tape, bytes(6), nexus="n2"), SenseKey.UNIT_ATTENTION, (0x2A, 0x01))
    assert run(tape, bytes(6), nexus="n1").status == ScsiStatus.GOOD


def test_mode_select_same_values_raise_no_ua(tape: TapeLike) -> None:
    settle(tape, "n2")
    data = bytes(4) + TEST_PAGE
    assert run(tape, select6(data), data).status == ScsiStatus.GOOD
    assert run(tape, bytes(6), nexus="n2").status == ScsiStatus.GOOD


@pytest.mark.parametrize(("data", "asc", "sks"), [
    # non-changeable bit (page byte 2 bit 0) at list offset 4+2=6
    (bytes(4) + bytes.fromhex("1004" "0140" "0000"), (0x26, 0x00), bytes([0x88, 0, 6])),
    # validator: page byte 4 bit 3, rebased to 4+4=8
    (bytes(4) + bytes.fromhex("1004" "0040" "0f00"), (0x26, 0x02), bytes([0x8B, 0, 8])),
    # wrong page length: the page length byte at offset 5
    (bytes(4) + bytes.fromhex("1005" "0040" "000000"), (0x26, 0x00), bytes([0x80, 0, 5])),
    # unknown page code at offset 4
    (bytes(4) + bytes.fromhex("2202" "0000"), (0x26, 0x00), bytes([0x80, 0, 4])),
    # known page code, unknown subpage: the subpage byte at offset 5
    (bytes(4) + bytes.fromhex("50070004" "00000000"), (0x26, 0x00), bytes([0x80, 0, 5])),
    # block descriptor length not 8: BLOCK DESCRIPTOR LENGTH field, header byte 3
    (bytes([0, 0, 0, 4]) + bytes(4), (0x26, 0x00), bytes([0x80, 0, 3])),
    # descriptor value the device rejects (block length, descriptor byte 5 -> 4+5=9)
    (bytes([0, 0, 0, 8]) + bytes.fromhex("58000000" "00020000"), (0x26, 0x00), bytes([0x80, 0, 9])),
    # page truncated by the parameter list
    (bytes(4) + bytes.fromhex("1004" "0040"), (0x1A, 0x00), None),
    # header shorter than 4 bytes
    (bytes(3), (0x1A, 0x00), None),
    # descriptor length runs past the list
    (bytes([0, 0, 0, 8]) + bytes(4), (0x1A, 0x00), None),
    # lone byte where a page header should be
    (bytes(4) + b"\x10", (0x1A, 0x00), None),
])
def test_mode_select_errors(tape: TapeLike, data: bytes, asc: tuple[int, int],
                            sks: bytes | None) -> None:
    before = (tape.block, tape.test_page.current)
    check(run(tape, select6(data), data), ILLEGAL, asc, sks)
    assert (tape.block, tape.test_page.current) == before and tape.applied == []


def test_mode_select_is_all_or_nothing(tape: TapeLike) -> None:
    data = bytes(4) + bytes.fromhex("1004" "0040" "0100") + bytes.fromhex("2202" "0000")
    check(run(tape, select6(data), data), ILLEGAL, (0x26, 0x00), bytes([0x80, 0, 10]))
    assert tape.test_page.current == bytes.fromhex("0040" "0000")


def test_mode_select_pf0_with_pages_is_rejected(tape: TapeLike) -> None:
    data = bytes(4) + TEST_PAGE
    check(run(tape, select6(data, pf=False), data), ILLEGAL, (0x26, 0x00), bytes([0x80, 0, 4]))
    header_only = bytes(4)
    assert run(tape, select6(header_only, pf=False), header_only).status == ScsiStatus.GOOD


def test_mode_select_save_pages(tape: TapeLike) -> None:
    data = bytes(4) + TEST_PAGE
    check(run(tape, select6(data, sp=True), data), ILLEGAL, (0x24, 0x00), bytes([0xC8, 0, 1]))
    sub = bytes(4) + bytes.fromhex("50010004" "55223344")
    assert run(tape, select6(sub, sp=True), sub).status == ScsiStatus.GOOD
    assert tape.sub_page.current == bytes.fromhex("55223344")


def test_mode_select_long_lba_on_general_device(tape: TapeLike) -> None:
    data = bytes([0, 0, 0, 0, 1, 0, 0, 16]) + bytes(16)
    check(run(tape, select10(data), data), ILLEGAL, (0x26, 0x00), bytes([0x88, 0, 4]))


def test_mode_select_reserved_cdb_bits(tape: TapeLike) -> None:
    check(run(tape, bytes([0x15, 0x02, 0, 0, 0, 0])), ILLEGAL, (0x24, 0x00), bytes([0xC9, 0, 1]))


def test_mode_select_short_data_out_reports_expected_length(tape: TapeLike) -> None:
    data = bytes(4) + TEST_PAGE
    r = run(tape, select6(data, pll=20), data)
    assert r.status == ScsiStatus.GOOD and r.data_out_expected == 20


def test_mode_select_disk_long_lba_descriptor() -> None:
    disk = DiskLike()
    settle(disk)
    bd = BlockDescriptor(number_of_blocks=0x1_0000_0000, block_length=512)
    data = bytes([0, 0, 0, 0, 1, 0, 0, 16]) + bd.encode(DescriptorFormat.LONG_LBA)
    assert run(disk, select10(data), data).status == ScsiStatus.GOOD
    other = bytes([0, 0, 0, 0, 1, 0, 0, 16]) + BlockDescriptor(0, 5, 512).encode(DescriptorFormat.LONG_LBA)
    check(run(disk, select10(other), other), ILLEGAL, (0x26, 0x00), bytes([0x80, 0, 8]))


def test_mode_sense6_leaves_out_pages_that_do_not_fit() -> None:
    class Many(TapeLike):
        def mode_pages(self) -> list[ModePage]:
            return [ModePage(0x20 + i, default=bytes(60)) for i in range(6)]

    dev = Many()
    settle(dev)
    data = bytes(run(dev, sense6(0x3F, dbd=True)).data_in)
    assert len(data) == 4 + 4 * 62 and data[0] == len(data) - 1
    data10 = bytes(run(dev, sense10(0x3F, dbd=True)).data_in)
    assert len(data10) == 8 + 6 * 62 and int.from_bytes(data10[:2], "big") == len(data10) - 2


@given(st.binary(max_size=80), st.booleans(), st.booleans())
def test_parameter_list_parser_raises_only_sense(data: bytes, ten: bool, lba: bool) -> None:
    from vtl.scsi.modepages import parse_mode_select
    from vtl.scsi.sense import SenseError

    dev = TapeLike()
    fmt = DescriptorFormat.SHORT_LBA if lba else DescriptorFormat.GENERAL
    try:
        parsed = parse_mode_select(data, ten=ten, pages=dev.mode_pages(), descriptor_format=fmt)
    except SenseError as err:
        assert err.key == SenseKey.ILLEGAL_REQUEST and err.asc[0] in (0x1A, 0x26)
        return
    assert all(u.page in dev.mode_pages() for u in parsed.updates)


@given(st.binary(max_size=20))
def test_header_and_descriptor_decoders_reject_short_input(buf: bytes) -> None:
    for decode, need in ((ModeParameterHeader.decode6, 4), (ModeParameterHeader.decode10, 8),
                         (BlockDescriptor.decode, 8)):
        if len(buf) < need:
            with pytest.raises(ValueError):
                decode(buf)
        else:
            decode(buf)
