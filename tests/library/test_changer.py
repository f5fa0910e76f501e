"""MediaChanger through execute(ScsiCommand): READ ELEMENT STATUS byte for byte, MOVE MEDIUM and
its sense, unit attentions, PREVENT ALLOW MEDIUM REMOVAL, mode pages (SMC-3)."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from vtl.library.changer import InventoryError, MediaChanger, Medium
from vtl.library.elements import DeviceIdentifier, ElementLayout, ElementStatusHeader
from vtl.library.identities import CHANGER_TYPES, changer_identity
from vtl.scsi.command import ScsiCommand, ScsiResult, ScsiStatus
from vtl.scsi.sense import DecodedSense, SenseError, SenseKey, Asc

N1 = "iqn.1994-05.com.redhat:a,i,0x1"
N2 = "iqn.1994-05.com.redhat:b,i,0x2"

# Small map with the default bases: transport 0x0000, drives 0x0100-0x0101,
# I/E 0x0300-0x0301, storage 0x1000-0x1003.
LAYOUT = ElementLayout(drives=2, storage=4, import_export=2)
DRIVE_IDS = [DeviceIdentifier(2, 1, b"IBM     0000000001"),
             DeviceIdentifier(2, 1, b"IBM     0000000002")]


class FakeDrive:
    def __init__(self) -> None:
        self.cartridge: Any = None
        self.read_only = False
        self.removal_prevented = False

    def load(self, cartridge: Any, *, read_only: bool = False) -> None:
        assert self.cartridge is None
        self.cartridge, self.read_only = cartridge, read_only

    def unload(self, *, force: bool = False) -> Any:
        if self.removal_prevented and not force:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, Asc.MEDIUM_REMOVAL_PREVENTED)
        cart, self.cartridge = self.cartridge, None
        return cart


class FakeStore:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.fail_moved = False
        self.read_only: set[str] = set()

    def mount(self, barcode: str) -> tuple[Any, bool]:
        self.calls.append(("mount", barcode))
        return f"cart:{barcode}", barcode in self.read_only

    def unmount(self, barcode: str, cartridge: Any) -> None:
        self.calls.append(("unmount", barcode, cartridge))

    def moved(self, medium: Medium, source: int, destination: int) -> None:
        if self.fail_moved:
            raise RuntimeError("disk full")
        self.calls.append(("moved", medium, source, destination))


def make(contents: dict[int, Medium] | None = None, layout: ElementLayout = LAYOUT,
         ids: list[DeviceIdentifier] | None = None) -> tuple[MediaChanger, list[FakeDrive], FakeStore]:
    drives = [FakeDrive() for _ in range(layout.drives)]
    store = FakeStore()
    ids = ids if ids is not None else DRIVE_IDS
    changer = MediaChanger(identity=changer_identity(None), serial="1234567890", layout=layout,
                           drives=drives, drive_identifiers=ids, store=store,
                           contents=contents or {}, device_name="iqn.2026-11.org.vtl:gw-mediachanger")
    for nexus in (N1, N2):  # consume POWER ON RESET
        run(changer, bytes(6), nexus)
    return changer, drives, store


def run(changer: MediaChanger, cdb: bytes, nexus: str = N1) -> ScsiResult:
    return changer.execute(ScsiCommand(lun=0, cdb=cdb, nexus=nexus, expected_in=1 << 24))


def res_cdb(etype: int, start: int, count: int, alloc: int = 0xFFFFFF, *, voltag: bool = False,
            dvcid: bool = False) -> bytes:
    return struct.pack(">BBHHB", 0xB8, (0x10 if voltag else 0) | etype, start, count,
                       0x01 if dvcid else 0) + alloc.to_bytes(3, "big") + b"\x00\x00"


def move_cdb(src: int, dst: int, transport: int = 0, invert: bool = False) -> bytes:
    return struct.pack(">BBHHHHBB", 0xA5, 0, transport, src, dst, 0, 0x01 if invert else 0, 0)


def sense_of(result: ScsiResult) -> tuple[int, int, int]:
    assert result.status == ScsiStatus.CHECK_CONDITION
    s = DecodedSense.decode(result.sense)
    return s.key, s.asc, s.ascq


def tag(barcode: str) -> bytes:
    return barcode.encode().ljust(32, b" ") + bytes(4)


# --- READ ELEMENT STATUS, byte for byte ----------------------------------------------------

def test_res_storage_with_voltag_byte_exact() -> None:
    ch, _, _ = make({0x1000: Medium("VT0000001"), 0x1002: Medium("VT0000002", source=0x0300)})
    r = run(ch, res_cdb(2, 0, 0xFFFF, voltag=True))
    assert r.ok
    desc_len = 12 + 36 + 4
    expected = (
        struct.pack(">HHBBH", 0x1000, 4, 0, 0, 4 * desc_len + 8)          # data header
        + struct.pack(">BBHBBH", 2, 0x80, desc_len, 0, 0, 4 * desc_len)  # page header
        # slot 1: FULL|ACCESS, medium type data, no SVALID, tag, empty identifier
        + bytes.fromhex("1000 09 00 0000 000000 01 0000".replace(" ", "")) + tag("VT0000001")
        + bytes(4)
        + bytes.fromhex("1001 08 00 0000 000000 00 0000".replace(" ", "")) + bytes(36) + bytes(4)
        # slot 3: SVALID with source 0x0300 (came from I/E 1)
        + bytes.fromhex("1002 09 00 0000 000000 81 0300".replace(" ", "")) + tag("VT0000002")
        + bytes(4)
        + bytes.fromhex("1003 08 00 0000 000000 00 0000".replace(" ", "")) + bytes(36) + bytes(4)
    )
    assert bytes(r.data_in) == expected


def test_res_transport_without_voltag_byte_exact() -> None:
    ch, _, _ = make()
    r = run(ch, res_cdb(1, 0, 1))
    assert bytes(r.data_in) == bytes.fromhex(
        "0000 0001 00 000018"          # first 0, one element, 24 bytes follow
        "01 00 0010 00 000010"         # type 1, no tags, descriptor length 16, 16 bytes
        "0000 00 00 0000 000000 00 0000 00000000".replace(" ", ""))


def test_res_data_transfer_with_dvcid_and_voltag_byte_exact() -> None:
    ch, drives, _ = make({0x1001: Medium("VT0000007", worm=True)})
    assert run(ch, move_cdb(0x1001, 0x0101)).ok
    r = run(ch, res_cdb(4, 0x0100, 2, voltag=True, dvcid=True))
    ident_len = 18
    desc_len = 12 + 36 + 4 + ident_len
    page = struct.pack(">BBHBBH", 4, 0x80, desc_len, 0, 0, 2 * desc_len)
    drive0 = (bytes.fromhex("0100 08 00 0000 000000 00 0000".replace(" ", "")) + bytes(36)
              + bytes([2, 1, 0, 18]) + b"IBM     0000000001")
    drive1 = (bytes.fromhex("0101 09 00 0000 000000 83 1001".replace(" ", "")) + tag("VT0000007")
              + bytes([2, 1, 0, 18]) + b"IBM     0000000002")
    header = struct.pack(">HHBBH", 0x0100, 2, 0, 0, len(page) + 2 * desc_len)
    assert bytes(r.data_in) == header + page + drive0 + drive1
    assert drives[1].cartridge == "cart:VT0000007"


def test_res_data_transfer_without_dvcid_has_no_identifier() -> None:
    ch, _, _ = make()
    r = bytes(run(ch, res_cdb(4, 0, 10)).data_in)
    assert r[8 + 2:8 + 4] == b"\x00\x10"  # descriptor length 16
    assert len(r) == 8 + 8 + 2 * 16


def test_res_import_export_flags() -> None:
    ch, _, _ = make({0x0300: Medium("VT0000001", imported=True),
                     0x0301: Medium("VT0000002", source=0x1000, imported=False)})
    r = bytes(run(ch, res_cdb(3, 0, 2, voltag=True)).data_in)
    d0, d1 = r[16:16 + 52], r[16 + 52:16 + 104]
    # INENAB|EXENAB|ACCESS|IMPEXP|FULL for an imported tape, no IMPEXP for an exported one
    assert d0[2] == 0x20 | 0x10 | 0x08 | 0x02 | 0x01
    assert d1[2] == 0x20 | 0x10 | 0x08 | 0x01
    assert d1[9] & 0x80 and d1[10:12] == b"\x10\x00"
    assert d0[12:21] == b"VT0000001"


def test_res_all_types_pages_in_address_order() -> None:
    ch, _, _ = make({0x1003: Medium("VT0000004")})
    r = bytes(run(ch, res_cdb(0, 0, 0xFFFF, voltag=True)).data_in)
    head = ElementStatusHeader.decode(r)
    assert (head.first_address, head.count, head.byte_count) == (0, 9, len(r) - 8)
    pos, seen = 8, []
    while pos < len(r):
        etype, flags, dlen, count = struct.unpack(">BBHI", r[pos:pos + 8])
        seen.append((etype, count // dlen))
        assert flags == 0x80 and dlen == 52
        pos += 8 + count
    assert seen == [(1, 1), (4, 2), (3, 2), (2, 4)]


def test_res_starting_address_and_number_of_elements() -> None:
    ch, _, _ = make({0x1002: Medium("VT0000003")})
    r = bytes(run(ch, res_cdb(2, 0x1001, 2, voltag=True)).data_in)
    head = ElementStatusHeader.decode(r)
    assert (head.first_address, head.count) == (0x1001, 2)
    assert r[16:18] == b"\x10\x01" and r[16 + 52:16 + 54] == b"\x10\x02"
    # ALL from the middle of the drives: second drive, then I/E and storage
    r = bytes(run(ch, res_cdb(0, 0x0101, 3)).data_in)
    assert ElementStatusHeader.decode(r).first_address == 0x0101
    assert ElementStatusHeader.decode(r).count == 3


def test_res_number_of_elements_zero_reports_nothing() -> None:
    ch, _, _ = make()
    r = bytes(run(ch, res_cdb(2, 0x1000, 0)).data_in)
    assert r == bytes(8)


def test_res_truncated_to_allocation_length_header_reports_full_size() -> None:
    ch, _, _ = make({0x1000: Medium("VT0000001")})
    full = bytes(run(ch, res_cdb(0, 0, 0xFFFF, voltag=True)).data_in)
    assert ElementStatusHeader.decode(full).byte_count == len(full) - 8
    for alloc in (8, 20, 100, len(full) - 1):
        part = bytes(run(ch, res_cdb(0, 0, 0xFFFF, alloc, voltag=True)).data_in)
        assert part == full[:alloc]
    assert bytes(run(ch, res_cdb(0, 0, 0xFFFF, 0)).data_in) == b""


def test_res_default_layout_counts() -> None:
    layout = ElementLayout()
    ch, _, _ = make(layout=layout, ids=[DeviceIdentifier(2, 1, b"IBM     %010d" % i)
                                        for i in range(10)])
    r = bytes(run(ch, res_cdb(0, 0, 0xFFFF, voltag=True, dvcid=True)).data_in)
    head = ElementStatusHeader.decode(r)
    assert head.count == 1 + 10 + 1600 + 1600
    assert head.byte_count == len(r) - 8 == 4 * 8 + (1 + 3200) * 52 + 10 * (52 + 18)
    r = bytes(run(ch, res_cdb(3, 0, 0xFFFF)).data_in)
    assert ElementStatusHeader.decode(r).first_address == 0x0300
    assert ElementStatusHeader.decode(r).count == 1600


def test_res_bad_type_and_address() -> None:
    ch, _, _ = make()
    assert sense_of(run(ch, res_cdb(5, 0, 1))) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
    assert sense_of(run(ch, res_cdb(4, 0x0200, 1))) == (SenseKey.ILLEGAL_REQUEST, 0x21, 0x01)
    assert sense_of(run(ch, res_cdb(0, 0x1004, 1))) == (SenseKey.ILLEGAL_REQUEST, 0x21, 0x01)


# --- MOVE MEDIUM ---------------------------------------------------------------------------

def test_move_slot_to_drive_and_back() -> None:
    ch, drives, store = make({0x1000: Medium("VT0000001")})
    assert run(ch, move_cdb(0x1000, 0x0100)).ok
    assert drives[0].cartridge == "cart:VT0000001"
    assert store.calls[-1] == ("moved", Medium("VT0000001", source=0x1000), 0x1000, 0x0100)
    assert ch.locate("VT0000001") == 0x0100
    assert run(ch, move_cdb(0x0100, 0x1003)).ok
    assert drives[0].cartridge is None
    assert ("unmount", "VT0000001", "cart:VT0000001") in store.calls
    # the source stays the last storage element the tape came from
    assert ch.contents[0x1003] == Medium("VT0000001", source=0x1000)


def test_move_read_only_tape_loads_read_only() -> None:
    ch, drives, store = make({0x1000: Medium("VT0000001")})
    store.read_only.add("VT0000001")
    assert run(ch, move_cdb(0x1000, 0x0101, transport=0x0000)).ok
    assert drives[1].read_only


def test_move_ie_to_slot_clears_impexp() -> None:
    ch, _, store = make({0x0300: Medium("VT0000001", imported=True)})
    assert run(ch, move_cdb(0x0300, 0x1001)).ok
    assert ch.contents[0x1001] == Medium("VT0000001", source=0x0300, imported=False)


@pytest.mark.parametrize("cdb, sense", [
    (move_cdb(0x1001, 0x1002), (SenseKey.ILLEGAL_REQUEST, 0x3B, 0x0E)),   # source empty
    (move_cdb(0x1000, 0x0300), (SenseKey.ILLEGAL_REQUEST, 0x3B, 0x0D)),   # destination full
    (move_cdb(0x0000, 0x1002), (SenseKey.ILLEGAL_REQUEST, 0x3B, 0x0E)),   # transport is empty
    (move_cdb(0x1000, 0x0000), (SenseKey.ILLEGAL_REQUEST, 0x21, 0x01)),   # into the transport
    (move_cdb(0x2000, 0x1002), (SenseKey.ILLEGAL_REQUEST, 0x21, 0x01)),   # no such source
    (move_cdb(0x1000, 0x0102), (SenseKey.ILLEGAL_REQUEST, 0x21, 0x01)),   # no such destination
    (move_cdb(0x1000, 0x1002, transport=0x0100), (SenseKey.ILLEGAL_REQUEST, 0x21, 0x01)),
    (move_cdb(0x1000, 0x1002, invert=True), (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)),
])
def test_move_errors(cdb: bytes, sense: tuple[int, int, int]) -> None:
    ch, _, store = make({0x1000: Medium("VT0000001"), 0x0300: Medium("VT0000002")})
    before = dict(ch.contents)
    assert sense_of(run(ch, cdb)) == sense
    assert dict(ch.contents) == before
    assert not [c for c in store.calls if c[0] == "moved"]


def test_move_from_drive_with_removal_prevented_is_53_02() -> None:
    ch, drives, store = make({0x1000: Medium("VT0000001")})
    assert run(ch, move_cdb(0x1000, 0x0100)).ok
    drives[0].removal_prevented = True
    assert sense_of(run(ch, move_cdb(0x0100, 0x1000))) == (SenseKey.ILLEGAL_REQUEST, 0x53, 0x02)
    assert ch.locate("VT0000001") == 0x0100
    assert drives[0].cartridge == "cart:VT0000001"
    # the drive element no longer reports ACCESS while removal is prevented
    r = bytes(run(ch, res_cdb(4, 0x0100, 1)).data_in)
    assert r[16 + 2] == 0x01


def test_move_persist_failure_leaves_everything_as_it_was() -> None:
    ch, drives, store = make({0x1000: Medium("VT0000001")})
    store.fail_moved = True
    assert sense_of(run(ch, move_cdb(0x1000, 0x0100)))[0] == SenseKey.HARDWARE_ERROR
    assert ch.locate("VT0000001") == 0x1000
    assert drives[0].cartridge is None
    assert store.calls[-1] == ("unmount", "VT0000001", "cart:VT0000001")


def test_move_drive_to_drive() -> None:
    ch, drives, _ = make({0x1000: Medium("VT0000001")})
    assert run(ch, move_cdb(0x1000, 0x0100)).ok
    assert run(ch, move_cdb(0x0100, 0x0101)).ok
    assert drives[0].cartridge is None and drives[1].cartridge == "cart:VT0000001"
    assert ch.contents[0x0101].source == 0x1000


def test_move_to_same_element_is_a_no_op() -> None:
    ch, _, store = make({0x1000: Medium("VT0000001")})
    assert run(ch, move_cdb(0x1000, 0x1000)).ok
    assert store.calls == []


# --- unit attentions and inventory ---------------------------------------------------------

def test_insert_raises_import_export_unit_attention_on_every_nexus() -> None:
    ch, _, _ = make()
    assert ch.insert(Medium("VT0000001", imported=True)) == 0x0300
    for nexus in (N1, N2):
        assert sense_of(run(ch, bytes(6), nexus)) == (SenseKey.UNIT_ATTENTION, 0x28, 0x01)
        assert run(ch, bytes(6), nexus).ok
    r = bytes(run(ch, res_cdb(3, 0x0300, 1, voltag=True)).data_in)
    assert r[16 + 12:16 + 21] == b"VT0000001"


def test_remove_from_storage_raises_not_ready_to_ready_change() -> None:
    ch, _, _ = make({0x1000: Medium("VT0000001")})
    assert ch.remove(0x1000) == Medium("VT0000001")
    assert sense_of(run(ch, res_cdb(2, 0, 1))) == (SenseKey.UNIT_ATTENTION, 0x28, 0x00)


def test_inventory_errors() -> None:
    ch, _, _ = make({0x0300: Medium("A0001"), 0x0301: Medium("A0002"), 0x1000: Medium("A0003")})
    with pytest.raises(InventoryError):
        ch.insert(Medium("A0004"))  # no free I/E slot
    with pytest.raises(InventoryError):
        ch.insert(Medium("A0001"), 0x1001)  # already inside
    run(ch, move_cdb(0x1000, 0x0100))
    with pytest.raises(InventoryError):
        ch.remove(0x0100)  # in a drive
    with pytest.raises(InventoryError):
        ch.remove(0x1003)


def test_set_identity_changes_inquiry_and_raises_3f_03() -> None:
    ch, _, _ = make()
    ch.set_identity(CHANGER_TYPES["IBM-03584L32-0402"])
    assert sense_of(run(ch, bytes(6))) == (SenseKey.UNIT_ATTENTION, 0x3F, 0x03)
    data = bytes(run(ch, bytes([0x12, 0, 0, 0, 96, 0])).data_in)
    assert data[0] == 0x08
    assert data[8:16] == b"IBM     " and data[16:32] == b"03584L32        " and data[32:36] == b"0402"


def test_inquiry_is_a_changer() -> None:
    ch, _, _ = make()
    data = bytes(run(ch, bytes([0x12, 0, 0, 0, 96, 0])).data_in)
    assert data[0] == 0x08 and data[1] & 0x80
    assert data[8:16] == b"STK     " and data[16:32] == b"L700            "


# --- other commands --------------------------------------------------------------------------

def test_prevent_allow_medium_removal_per_nexus() -> None:
    ch, _, _ = make()
    assert run(ch, bytes([0x1E, 0, 0, 0, 1, 0])).ok
    assert ch.removal_prevented
    assert run(ch, bytes([0x1E, 0, 0, 0, 0, 0]), N2).ok
    assert ch.removal_prevented  # N2's ALLOW does not lift N1's PREVENT
    assert run(ch, bytes([0x1E, 0, 0, 0, 0, 0])).ok
    assert not ch.removal_prevented
    assert run(ch, bytes([0x1E, 0, 0, 0, 1, 0])).ok
    ch.forget_nexus(N1)
    assert not ch.removal_prevented
    assert sense_of(run(ch, bytes([0x1E, 0, 0, 0, 2, 0]), N2)) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0)


def test_initialize_element_status_and_with_range_and_position() -> None:
    ch, _, _ = make()
    assert run(ch, bytes([0x07, 0, 0, 0, 0, 0])).ok
    assert run(ch, struct.pack(">BBHHHBB", 0x37, 1, 0x1000, 0, 4, 0, 0)).ok
    assert sense_of(run(ch, struct.pack(">BBHHHBB", 0x37, 1, 0x0200, 0, 4, 0, 0))) == \
        (SenseKey.ILLEGAL_REQUEST, 0x21, 0x01)
    assert run(ch, struct.pack(">BBHHHBB", 0x37, 0, 0x0200, 0, 4, 0, 0)).ok  # RANGE=0: all
    assert run(ch, struct.pack(">BBHHHBB", 0x2B, 0, 0, 0x0100, 0, 0, 0)).ok
    assert sense_of(run(ch, struct.pack(">BBHHHBB", 0x2B, 0, 0, 0x0999, 0, 0, 0))) == \
        (SenseKey.ILLEGAL_REQUEST, 0x21, 0x01)


def _mode_sense_page(ch: MediaChanger, page: int) -> bytes:
    r = run(ch, bytes([0x1A, 0x08, page, 0, 255, 0]))  # DBD=1
    assert r.ok, DecodedSense.decode(r.sense)
    data = bytes(r.data_in)
    assert data[3] == 0  # no block descriptor
    return data[4:]


def test_mode_page_1d_element_address_assignment() -> None:
    ch, _, _ = make()
    assert _mode_sense_page(ch, 0x1D) == bytes.fromhex(
        "1d12" "0000 0001" "1000 0004" "0300 0002" "0100 0002" "0000".replace(" ", ""))


def test_mode_pages_1e_1f() -> None:
    ch, _, _ = make()
    assert _mode_sense_page(ch, 0x1E) == bytes.fromhex("1e020000")
    page = _mode_sense_page(ch, 0x1F)
    assert page[:2] == b"\x1f\x12" and len(page) == 20
    assert page[2] == 0x0E and page[4:8] == bytes([0, 0x0E, 0x0E, 0x0E])  # MT never holds media
    all_pages = bytes(run(ch, bytes([0x1A, 0x08, 0x3F, 0, 255, 0])).data_in)
    assert b"\x1d\x12" in all_pages and b"\x1e\x02" in all_pages


def test_unknown_opcode_is_illegal_request() -> None:
    ch, _, _ = make()
    assert sense_of(run(ch, bytes([0xA6] + [0] * 11))) == (SenseKey.ILLEGAL_REQUEST, 0x20, 0x00)
