"""The tape library over iSCSI: a real ``vtl serve``, tapes made with the CLI, and two real
initiators -- the ctypes libiscsi binding (raw CDBs, raw sense, iSCSI residuals) and pyscsi's
changer command classes over our own initiator (READ ELEMENT STATUS / MOVE MEDIUM).

Every SMC command of the changer and every SSC command of the drive is sent over TCP here; the
unit tests in tests/library cover the same state machines in-process.

Not reachable over iSCSI: early warning / VOLUME OVERFLOW. The smallest tape is 100 GiB (AWS
limit, enforced by CreateTapes), so reaching the early-warning point would mean writing ~100 GiB
through the initiator. tests/library/test_drive.py covers EOM 00/02 and VOLUME OVERFLOW on small
cartridges; here we only check that a fresh tape reports no early warning (BPEW clear) and its
full capacity in the MAM attributes.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.appliance import ApplianceProcess
from tests.support.libiscsi import Result, Session, Status, library_available, parse_element_status

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not library_available(), reason="libiscsi.so.7 is not installed"),
]

GiB = 1 << 30
MiB = 1 << 20
TAPE_SIZE = "100GiB"

# element address map (elements.py defaults)
TRANSPORT, DRIVE0, IE0, SLOT0 = 0x0000, 0x0100, 0x0300, 0x1000
N_DRIVES, N_SLOTS, N_IE = 10, 1600, 1600
# element type codes
MT, ST, IE, DT = 1, 2, 3, 4

# sense keys
NO_SENSE, NOT_READY, MEDIUM_ERROR, ILLEGAL_REQUEST = 0x0, 0x2, 0x3, 0x5
UNIT_ATTENTION, DATA_PROTECT, BLANK_CHECK = 0x6, 0x7, 0x8

_slots = itertools.count(SLOT0)


# --- helpers ------------------------------------------------------------------------------------
def status_json(app: ApplianceProcess) -> dict:
    result = app.cli("library", "status", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def create_tape(app: ApplianceProcess, *extra: str) -> dict:
    """`vtl tape create` one tape; returns its JSON (it sits in an I/E slot)."""
    result = app.cli("tape", "create", "--prefix", "ITST", "--size", TAPE_SIZE, "--json", *extra)
    assert result.exit_code == 0, result.output
    (tape,) = json.loads(result.output)
    assert tape["location"]["type"] == "ie"
    return tape


def show_tape(app: ApplianceProcess, barcode: str) -> dict:
    result = app.cli("tape", "show", barcode, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def changer_session(app: ApplianceProcess, **kw: Any) -> Session:
    return Session((app.portal, status_json(app)["changer"]["target_iqn"], 0), **kw)


def drive_session(app: ApplianceProcess, index: int, **kw: Any) -> Session:
    return Session((app.portal, status_json(app)["drives"][index]["target_iqn"], 0), **kw)


def expect(result: Result, key: int, asc: int, ascq: int) -> Result:
    assert result.check_condition, result.describe()
    assert (result.sense_key, result.asc, result.ascq) == (key, asc, ascq), result.describe()
    return result


def good(result: Result) -> Result:
    assert result.good, result.describe()
    return result


def field_pointer(result: Result) -> tuple[bool, int, int | None]:
    """(C/D, field pointer, bit pointer or None) from the sense-key specific bytes 15-17."""
    sense = result.sense
    assert len(sense) >= 18 and sense[15] & 0x80, f"SKSV not set: {result.describe()}"
    bit = sense[15] & 0x07 if sense[15] & 0x08 else None
    return bool(sense[15] & 0x40), int.from_bytes(sense[16:18], "big"), bit


def elements(ch: Session, element_type: int = 0, start: int = 0, count: int = 0xFFFF,
             **kw: Any) -> list:
    res = good(ch.read_element_status(element_type, start, count, alloc=1 << 20, **kw))
    return parse_element_status(res.data)


def element_at(ch: Session, address: int):
    (el,) = [e for e in elements(ch, 0, address, 1)]
    assert el.address == address
    return el


def block(tag: int, size: int) -> bytes:
    """Deterministic, distinct content for block ``tag``."""
    seed = struct.pack(">Q", tag) * 8
    return (seed * (size // len(seed) + 1))[:size]


# --- CDBs the binding has no helper for ---------------------------------------------------------
def mode_sense6(s: Session, page: int, *, dbd: bool = False, alloc: int = 255) -> Result:
    return s.execute(bytes([0x1A, 0x08 if dbd else 0, page, 0, alloc, 0]), expect_in=alloc)


def mode_sense10(s: Session, page: int, alloc: int = 1024) -> Result:
    return s.execute(struct.pack(">BBBBxxxHB", 0x5A, 0, page, 0, alloc, 0), expect_in=alloc)


def mode_select6(s: Session, data: bytes) -> Result:
    return s.execute(bytes([0x15, 0x10, 0, 0, len(data), 0]), data_out=data)


def set_block_length(s: Session, length: int, density: int = 0) -> Result:
    """MODE SELECT(6): header + one block descriptor (SSC-3 8.3.1)."""
    desc = bytes([density, 0, 0, 0, 0]) + length.to_bytes(3, "big")
    return mode_select6(s, bytes([0, 0, 0x10, 8]) + desc)


def read_block_limits(s: Session) -> Result:
    return s.execute(bytes([0x05, 0, 0, 0, 0, 0]), expect_in=6)


def space16(s: Session, count: int, code: int = 0) -> Result:
    return s.execute(struct.pack(">BBxxqHxx", 0x91, code, count, 0))


def locate16(s: Session, target: int, dest_type: int = 0) -> Result:
    return s.execute(struct.pack(">BBxxQxxxx", 0x92, dest_type << 3, target))


def erase(s: Session, long: bool = False) -> Result:
    return s.execute(bytes([0x19, int(long), 0, 0, 0, 0]))


def prevent(s: Session, on: bool) -> Result:
    return s.execute(bytes([0x1E, 0, 0, 0, int(on), 0]))


def report_density(s: Session, media: bool = False) -> Result:
    return s.execute(struct.pack(">BBxxxxxHB", 0x44, int(media), 1024, 0), expect_in=1024)


def log_sense(s: Session, page: int) -> Result:
    return s.execute(struct.pack(">BBBBxxxHB", 0x4D, 0, 0x40 | page, 0, 4096, 0),
                     expect_in=4096)


def read_attribute(s: Session, first: int = 0, action: int = 0) -> Result:
    cdb = struct.pack(">BBxxxBxBHIBx", 0x8C, action, 0, 0, first, 8192, 0)
    return s.execute(cdb, expect_in=8192)


def parse_attributes(data: bytes) -> dict[int, bytes]:
    total = int.from_bytes(data[:4], "big")
    out, pos = {}, 4
    while pos + 5 <= min(len(data), 4 + total):
        ident, _fmt, length = struct.unpack_from(">HBH", data, pos)
        out[ident] = data[pos + 5:pos + 5 + length]
        pos += 5 + length
    return out


def position(s: Session) -> tuple[int, int]:
    """READ POSITION short, long and extended must agree; returns (object, file)."""
    short = good(s.read_position(0)).data
    long_ = good(s.read_position(6)).data
    ext = good(s.read_position(8)).data
    first, last = struct.unpack_from(">II", short, 4)
    assert first == last, short.hex()
    partition, obj, file = struct.unpack_from(">IQQ", long_, 4)
    assert partition == 0 and obj == first, (short.hex(), long_.hex())
    assert int.from_bytes(ext[8:16], "big") == first == int.from_bytes(ext[16:24], "big")
    assert bool(short[0] & 0x80) == (first == 0) == bool(long_[0] & 0x80)  # BOP
    assert not short[0] & 0x01 and not short[0] & 0x40  # no early warning, not EOP on 100 GiB
    return first, file


# --- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app(appliance_session: ApplianceProcess) -> ApplianceProcess:
    return appliance_session


class Loaded:
    """A fresh tape moved I/E -> storage slot -> drive ``index``, and a session on that drive."""

    def __init__(self, app: ApplianceProcess, index: int, worm: bool = False) -> None:
        self.app = app
        self.index = index
        self.tape = create_tape(app, *(["--worm"] if worm else []))
        self.barcode = self.tape["barcode"]
        self.slot = next(_slots)
        self.changer = changer_session(app)
        good(self.changer.move_medium(self.tape["location"]["address"], self.slot))
        good(self.changer.move_medium(self.slot, DRIVE0 + index))
        self.drive = drive_session(app, index)  # login clears UA 28/00 with TEST UNIT READY

    def unload(self) -> None:
        prevent(self.drive, False)
        self.drive.execute(bytes([0x17, 0, 0, 0, 0, 0]))  # RELEASE(6)
        self.drive.close()
        good(self.changer.move_medium(DRIVE0 + self.index, self.slot))
        self.changer.close()


@pytest.fixture
def loaded(app: ApplianceProcess) -> Iterator[Loaded]:
    tape = Loaded(app, 0)
    try:
        yield tape
    finally:
        tape.unload()


@pytest.fixture
def drive(loaded: Loaded) -> Session:
    return loaded.drive


# =================================================================================================
# changer
# =================================================================================================
def test_changer_inquiry_default_and_set_changer_type(app: ApplianceProcess) -> None:
    ch = changer_session(app)
    try:
        inq = good(ch.inquiry()).data
        assert inq[0] & 0x1F == 0x08  # medium changer
        assert (inq[8:16], inq[16:32], inq[32:36]) == (b"STK     ", b"L700".ljust(16), b"0105")
        result = app.cli("library", "set-changer-type", "IBM-03584L32-0402")
        assert result.exit_code == 0, result.output
        # the open session is told (UNIT ATTENTION 3F/03 INQUIRY DATA HAS CHANGED) ...
        expect(ch.test_unit_ready(), UNIT_ATTENTION, 0x3F, 0x03)
        good(ch.test_unit_ready())
        inq = good(ch.inquiry()).data
        assert (inq[8:16], inq[16:32], inq[32:36]) == (b"IBM     ", b"03584L32".ljust(16),
                                                       b"0402")
        # ... and a new session sees the new identity too
        with changer_session(app) as other:
            assert good(other.inquiry()).data[8:36] == b"IBM     03584L32        0402"
    finally:
        app.cli("library", "set-changer-type", "STK-L700")
        ch.close()
    with changer_session(app) as ch:
        assert good(ch.inquiry()).data[8:36] == b"STK     L700            0105"


def test_read_element_status_all_types(app: ApplianceProcess) -> None:
    tape = create_tape(app)
    with changer_session(app) as ch:
        res = good(ch.read_element_status(0, 0, 0xFFFF, alloc=1 << 20))
        first, count = struct.unpack_from(">HH", res.data)
        els = parse_element_status(res.data)
        assert count == len(els) == 1 + N_DRIVES + N_IE + N_SLOTS
        assert first == TRANSPORT
        assert [e.address for e in els] == sorted(e.address for e in els)
        by_type: dict[int, list[int]] = {}
        for e in els:
            assert not e.truncated
            by_type.setdefault(e.element_type, []).append(e.address)
        assert by_type[MT] == [TRANSPORT]
        assert by_type[DT] == list(range(DRIVE0, DRIVE0 + N_DRIVES))
        assert by_type[IE] == list(range(IE0, IE0 + N_IE))
        assert by_type[ST] == list(range(SLOT0, SLOT0 + N_SLOTS))
        # VOLTAG: every full element carries its barcode, and they agree with the catalog
        listed = json.loads(app.cli("tape", "list", "--json").output)
        catalog = {t["barcode"]: t["location"]["address"] for t in listed
                   if t["location"]["address"] is not None}
        seen = {e.barcode: e.address for e in els if e.full}
        assert None not in seen
        assert seen == catalog
        assert seen[tape["barcode"]] == tape["location"]["address"]
        # VOLTAG=0: no volume tags at all (PVOLTAG clear in every page)
        bare = parse_element_status(good(ch.read_element_status(0, voltag=False,
                                                                alloc=1 << 20)).data)
        assert len(bare) == len(els) and all(e.barcode is None for e in bare)


@pytest.mark.parametrize("etype,first,n", [(MT, TRANSPORT, 1), (ST, SLOT0, N_SLOTS),
                                           (IE, IE0, N_IE), (DT, DRIVE0, N_DRIVES)])
def test_read_element_status_each_type(app: ApplianceProcess, etype: int, first: int,
                                       n: int) -> None:
    with changer_session(app) as ch:
        els = elements(ch, etype)
        assert [e.address for e in els] == list(range(first, first + n))
        assert {e.element_type for e in els} == {etype}
        # a starting address inside the range and NUMBER OF ELEMENTS
        some = elements(ch, etype, first + n - 1 if n < 3 else first + 1, 2)
        assert [e.address for e in some] == (
            [first + n - 1] if n < 3 else [first + 1, first + 2])
        # a starting address past every element of the type: 21/01
        past = 0xFFF0
        expect(ch.read_element_status(etype, past, 1), ILLEGAL_REQUEST, 0x21, 0x01)


def _vpd83_t10(s: Session) -> tuple[int, int, bytes]:
    data = good(s.inquiry(evpd=True, page=0x83, alloc=255)).data
    end = 4 + int.from_bytes(data[2:4], "big")
    pos = 4
    while pos + 4 <= end:
        code_set, kind, length = data[pos] & 0x0F, data[pos + 1] & 0x3F, data[pos + 3]
        if kind == 0x01:  # T10 vendor ID, associated with the LU
            return code_set, kind & 0x0F, data[pos + 4:pos + 4 + length]
        pos += 4 + length
    raise AssertionError(f"no T10 vendor designator in VPD 0x83: {data.hex()}")


def test_read_element_status_dvcid_matches_drive_vpd83(app: ApplianceProcess) -> None:
    st = status_json(app)
    with changer_session(app) as ch:
        res = good(ch.read_element_status(DT, voltag=True, dvcid=True, alloc=1 << 16))
        data = res.data
        assert data[8] == DT and data[9] & 0x80  # page: data transfer, PVOLTAG
        desc_len = int.from_bytes(data[10:12], "big")
        ids = []
        for i in range(N_DRIVES):
            desc = data[16 + i * desc_len:16 + (i + 1) * desc_len]
            assert int.from_bytes(desc[:2], "big") == DRIVE0 + i
            ident = desc[12 + 36:]
            length = ident[3]
            ids.append((ident[0] & 0x0F, ident[1] & 0x0F, ident[4:4 + length]))
    for i, drive in enumerate(st["drives"]):
        with Session((app.portal, drive["target_iqn"], 0)) as s:
            assert ids[i] == _vpd83_t10(s)
            assert drive["serial"].encode() in ids[i][2]
    assert len({i[2] for i in ids}) == N_DRIVES
    # all element types with DVCID: pages of different descriptor lengths parse back whole
    with changer_session(app) as ch:
        res = good(ch.read_element_status(0, dvcid=True, alloc=1 << 20))
        els = parse_element_status(res.data)
        assert len(els) == 1 + N_DRIVES + N_IE + N_SLOTS and not any(e.truncated for e in els)


def test_prevent_is_dropped_when_the_session_ends(app: ApplianceProcess) -> None:
    """A backup host that dies holding PREVENT MEDIUM REMOVAL must not pin the tape forever:
    the reservation of the I_T nexus ends with its session (logout or dropped connection)."""
    tape = create_tape(app)
    slot = next(_slots)
    with changer_session(app) as ch:
        good(ch.move_medium(tape["location"]["address"], DRIVE0 + 7))
        dr = drive_session(app, 7)
        good(prevent(dr, True))
        expect(ch.move_medium(DRIVE0 + 7, slot), ILLEGAL_REQUEST, 0x53, 0x02)
        dr.close()  # logout
        good(ch.move_medium(DRIVE0 + 7, slot))
        good(ch.move_medium(slot, DRIVE0 + 7))
        dr = drive_session(app, 7)
        good(prevent(dr, True))
        dr._destroy()  # no logout: the TCP connection just goes away
        for _ in range(300):  # the target notices the closed socket asynchronously
            res = ch.move_medium(DRIVE0 + 7, slot)
            if res.good:
                break
            expect(res, ILLEGAL_REQUEST, 0x53, 0x02)
            time.sleep(0.1)
        good(res)
        assert element_at(ch, slot).barcode == tape["barcode"]


def test_read_element_status_allocation_length(app: ApplianceProcess) -> None:
    with changer_session(app) as ch:
        full = good(ch.read_element_status(ST, alloc=1 << 20)).data
        first, count, byte_count = struct.unpack_from(">HHI", full)
        assert (first, count, len(full)) == (SLOT0, N_SLOTS, 8 + byte_count)
        desc_len = int.from_bytes(full[10:12], "big")
        # only the header fits: the header still reports the whole report
        head = ch.read_element_status(ST, alloc=8)
        good(head)
        assert head.data == full[:8] and head.residual_kind == "none"
        # header + page header + 3 descriptors (and a partial fourth): cut, not re-counted
        alloc = 16 + 3 * desc_len + 5
        cut = good(ch.read_element_status(ST, alloc=alloc))
        assert cut.data == full[:alloc]
        els = parse_element_status(cut.data)
        assert [e.address for e in els if not e.truncated] == [SLOT0, SLOT0 + 1, SLOT0 + 2]
        # NUMBER OF ELEMENTS limits the report and the header counts what is reported
        five = good(ch.read_element_status(ST, SLOT0 + 10, 5, alloc=1 << 16)).data
        assert struct.unpack_from(">HH", five) == (SLOT0 + 10, 5)
        assert int.from_bytes(five[5:8], "big") == 8 + 5 * desc_len == len(five) - 8
        # allocation length 0 transfers nothing and is not an error
        assert good(ch.read_element_status(ST, alloc=0)).data == b""


def test_move_medium_ie_slot_drive_slot_with_pyscsi(app: ApplianceProcess) -> None:
    """I/E -> slot -> drive -> slot, with pyscsi's MOVE MEDIUM and READ ELEMENT STATUS classes
    over our own initiator; every step checked against READ ELEMENT STATUS and the catalog."""
    from pyscsi.pyscsi.scsi import SCSI

    from vtl.iscsi.initiator import PyscsiDevice, open_session

    tape = create_tape(app)
    code, ie = tape["barcode"], tape["location"]["address"]
    slot = next(_slots)
    drive_addr = DRIVE0 + 3
    st = status_json(app)
    ini = open_session(app.host, app.port, st["changer"]["target_iqn"], timeout=30)
    with PyscsiDevice(ini) as dev:
        scsi = SCSI(dev)
        assert dev.devicetype == 0x08

        def where() -> dict[int, str]:
            cmd = scsi.readelementstatus(0, 0xFFFF, element_type=0, voltag=1, curdata=1,
                                         alloclen=1 << 20)
            out = {}
            for page in cmd.result["element_status_pages"]:
                for d in page["element_descriptors"]:
                    if d.get("full"):
                        tag = bytes(d["primary_volume_tag"][:32]).decode().strip(" \0")
                        out[d["element_address"]] = tag
            return out

        def check(address: int, kind: str) -> None:
            inv = where()
            assert inv.get(address) == code
            assert [a for a, b in inv.items() if b == code] == [address]
            loc = show_tape(app, code)["location"]
            assert (loc["type"], loc["address"]) == (kind, address)

        def unit_attention_ok(fn) -> None:  # a UA from another test may be pending
            try:
                fn()
            except dev.CheckCondition as exc:
                assert exc.sense_key == UNIT_ATTENTION
                fn()

        unit_attention_ok(lambda: scsi.testunitready())
        check(ie, "ie")
        scsi.movemedium(TRANSPORT, ie, slot)
        check(slot, "slot")
        scsi.movemedium(TRANSPORT, slot, drive_addr)
        check(drive_addr, "drive")
        assert show_tape(app, code)["target_iqn"] == st["drives"][3]["target_iqn"]
        with drive_session(app, 3) as dr:
            good(dr.test_unit_ready())
            assert parse_attributes(good(read_attribute(dr, 0x0806)).data)[0x0806] \
                .decode().strip() == code
        scsi.movemedium(TRANSPORT, drive_addr, slot)
        check(slot, "slot")
        # errors through pyscsi: the check condition carries the sense
        with pytest.raises(dev.CheckCondition) as exc_info:
            scsi.movemedium(TRANSPORT, drive_addr, slot)
        assert (exc_info.value.sense_key, exc_info.value.asc,
                exc_info.value.ascq) == (ILLEGAL_REQUEST, 0x3B, 0x0E)


def test_move_medium_errors(app: ApplianceProcess) -> None:
    a, b = create_tape(app), create_tape(app)
    slot_a, slot_b, empty = next(_slots), next(_slots), next(_slots)
    with changer_session(app) as ch:
        good(ch.move_medium(a["location"]["address"], slot_a))
        good(ch.move_medium(b["location"]["address"], slot_b))
        expect(ch.move_medium(empty, DRIVE0 + 5), ILLEGAL_REQUEST, 0x3B, 0x0E)  # source empty
        expect(ch.move_medium(slot_a, slot_b), ILLEGAL_REQUEST, 0x3B, 0x0D)  # destination full
        expect(ch.move_medium(0x0050, slot_b), ILLEGAL_REQUEST, 0x21, 0x01)  # no such element
        expect(ch.move_medium(slot_a, 0x9999), ILLEGAL_REQUEST, 0x21, 0x01)
        expect(ch.move_medium(slot_a, TRANSPORT), ILLEGAL_REQUEST, 0x21, 0x01)
        res = expect(ch.move_medium(slot_a, slot_b + 0x2000), ILLEGAL_REQUEST, 0x21, 0x01)
        assert field_pointer(res)[:2] == (True, 6)
        # a drive whose session holds PREVENT MEDIUM REMOVAL keeps its tape: 53/02
        good(ch.move_medium(slot_a, DRIVE0 + 5))
        with drive_session(app, 5) as dr:
            good(prevent(dr, True))
            expect(ch.move_medium(DRIVE0 + 5, slot_a), ILLEGAL_REQUEST, 0x53, 0x02)
            assert element_at(ch, DRIVE0 + 5).barcode == a["barcode"]
            # the drive itself refuses LOAD UNLOAD (unload) too
            expect(dr.load_unload(False), ILLEGAL_REQUEST, 0x53, 0x02)
            good(prevent(dr, False))
            good(ch.move_medium(DRIVE0 + 5, slot_a))
            expect(dr.test_unit_ready(), NOT_READY, 0x3A, 0x00)
        assert show_tape(app, a["barcode"])["location"]["address"] == slot_a
        assert element_at(ch, slot_a).barcode == a["barcode"]
        assert not element_at(ch, DRIVE0 + 5).full


def test_initialize_element_status_and_position_to_element(app: ApplianceProcess) -> None:
    with changer_session(app) as ch:
        good(ch.execute(bytes([0x07, 0, 0, 0, 0, 0])))  # INITIALIZE ELEMENT STATUS
        # WITH RANGE: a valid range, and a starting address that is no element
        good(ch.execute(struct.pack(">BBHxxHxx", 0x37, 0x01, SLOT0, 10)))
        good(ch.execute(struct.pack(">BBHxxHxx", 0x37, 0x00, 0, 0)))  # RANGE=0: all
        expect(ch.execute(struct.pack(">BBHxxHxx", 0x37, 0x01, 0x0050, 1)),
               ILLEGAL_REQUEST, 0x21, 0x01)
        # POSITION TO ELEMENT: nothing moves, the addresses are checked
        good(ch.execute(struct.pack(">BxHHxxBx", 0x2B, TRANSPORT, SLOT0, 0)))
        good(ch.execute(struct.pack(">BxHHxxBx", 0x2B, TRANSPORT, DRIVE0, 0)))
        expect(ch.execute(struct.pack(">BxHHxxBx", 0x2B, TRANSPORT, 0x9999, 0)),
               ILLEGAL_REQUEST, 0x21, 0x01)
        expect(ch.execute(struct.pack(">BxHHxxBx", 0x2B, SLOT0, SLOT0 + 1, 0)),
               ILLEGAL_REQUEST, 0x21, 0x01)  # the transport must be a transport element
        res = expect(ch.execute(struct.pack(">BxHHxxBx", 0x2B, TRANSPORT, SLOT0, 1)),
                     ILLEGAL_REQUEST, 0x24, 0x00)  # INVERT: media have one side
        assert field_pointer(res)[:2] == (True, 8)


def test_changer_mode_pages(app: ApplianceProcess) -> None:
    with changer_session(app) as ch:
        data = good(mode_sense6(ch, 0x1D)).data
        assert data[3] == 0  # no block descriptor on a changer
        page = data[4:]
        assert page[0] & 0x3F == 0x1D and page[1] == 0x12
        assert struct.unpack_from(">8H", page, 2) == (TRANSPORT, 1, SLOT0, N_SLOTS, IE0, N_IE,
                                                       DRIVE0, N_DRIVES)
        for code, length in ((0x1E, None), (0x1F, 0x12)):
            page = good(mode_sense6(ch, code)).data[4:]
            assert page[0] & 0x3F == code
            if length is not None:
                assert page[1] == length
        caps = good(mode_sense6(ch, 0x1F)).data[4:]
        assert caps[2] & 0x0E == 0x0E  # storage capable: ST, IE, DT
        # all pages at once, in MODE SENSE(10) as well
        data = good(mode_sense10(ch, 0x3F)).data
        codes, pos = [], 8 + int.from_bytes(data[6:8], "big")
        while pos < len(data):
            codes.append(data[pos] & 0x3F)
            pos += 2 + data[pos + 1]
        assert {0x1D, 0x1E, 0x1F} <= set(codes)
        expect(mode_sense6(ch, 0x0F), ILLEGAL_REQUEST, 0x24, 0x00)  # a tape page is not here


def test_unit_attention_after_tape_create(app: ApplianceProcess) -> None:
    with changer_session(app) as ch:
        good(ch.test_unit_ready())
        tape = create_tape(app)
        res = ch.test_unit_ready()
        assert res.check_condition and res.sense_key == UNIT_ATTENTION, res.describe()
        assert (res.asc, res.ascq) == (0x28, 0x01)  # IMPORT OR EXPORT ELEMENT ACCESSED
        good(ch.test_unit_ready())
        el = element_at(ch, tape["location"]["address"])
        assert el.full and el.barcode == tape["barcode"] and el.element_type == IE


def test_changer_prevent_allow_reserve_and_request_sense(app: ApplianceProcess) -> None:
    with changer_session(app) as ch:
        good(prevent(ch, True))
        assert status_json(app)["removal_prevented"] is True
        good(prevent(ch, False))
        assert status_json(app)["removal_prevented"] is False
        expect(ch.execute(bytes([0x1E, 0, 0, 0, 0x02, 0])), ILLEGAL_REQUEST, 0x24, 0x00)
        data = good(ch.execute(bytes([0x03, 0, 0, 0, 252, 0]), expect_in=252)).data
        assert data[0] & 0x7F == 0x70 and data[2] & 0x0F == NO_SENSE


# =================================================================================================
# drive
# =================================================================================================
def test_drive_inquiry_and_not_ready_without_medium(app: ApplianceProcess) -> None:
    with drive_session(app, 9) as dr:
        inq = good(dr.inquiry()).data
        assert inq[0] & 0x1F == 0x01 and inq[1] & 0x80  # sequential access, removable
        assert inq[8:36] == b"IBM     ULT3580-TD5     G9N1"
        expect(dr.test_unit_ready(), NOT_READY, 0x3A, 0x00)
        expect(dr.read6(512), NOT_READY, 0x3A, 0x00)
        expect(dr.write6(b"x" * 512), NOT_READY, 0x3A, 0x00)
        expect(dr.read_position(), NOT_READY, 0x3A, 0x00)
        # without medium the block descriptor reports density 0
        data = good(mode_sense6(dr, 0x0F)).data
        assert data[3] == 8 and data[4] == 0x00


def test_unit_attention_28_after_load(app: ApplianceProcess) -> None:
    tape = create_tape(app)
    slot = next(_slots)
    with changer_session(app) as ch, drive_session(app, 2) as dr:
        expect(dr.test_unit_ready(), NOT_READY, 0x3A, 0x00)
        good(ch.move_medium(tape["location"]["address"], slot))
        good(ch.move_medium(slot, DRIVE0 + 2))
        expect(dr.test_unit_ready(), UNIT_ATTENTION, 0x28, 0x00)
        good(dr.test_unit_ready())
        assert position(dr) == (0, 0)
        # LOAD UNLOAD: unload leaves the tape in the drive, not ready; load makes it ready
        good(dr.load_unload(False))
        expect(dr.test_unit_ready(), NOT_READY, 0x3A, 0x00)
        assert element_at(ch, DRIVE0 + 2).barcode == tape["barcode"]
        good(dr.load_unload(True))
        good(dr.test_unit_ready())
        good(ch.move_medium(DRIVE0 + 2, slot))
        expect(dr.test_unit_ready(), NOT_READY, 0x3A, 0x00)


def test_read_block_limits(drive: Session) -> None:
    data = good(read_block_limits(drive)).data
    assert data[0] & 0x1F == 0
    assert int.from_bytes(data[1:4], "big") == 1 * MiB
    assert int.from_bytes(data[4:6], "big") == 1


def test_variable_block_write_read_ili_and_residuals(drive: Session) -> None:
    sizes = [65536, 10000, 1, 1 * MiB]
    for i, size in enumerate(sizes):
        good(drive.write6(block(i, size)))
    good(drive.write_filemarks(1))
    good(drive.rewind())
    # exact length
    assert good(drive.read6(65536)).data == block(0, 65536)
    # asking for more than the block: ILI, INFORMATION = residue, iSCSI underflow residual
    res = expect(drive.read6(20000), NO_SENSE, 0x00, 0x00)
    assert res.ili and res.information == 10000
    assert res.data == block(1, 10000)
    assert (res.residual_kind, res.residual) == ("underflow", 10000)
    assert good(drive.read6(1)).data == block(2, 1)  # a 1-byte block
    # asking for less: ILI, negative residue, only the requested bytes (rest of block skipped)
    res = expect(drive.read6(1000), NO_SENSE, 0x00, 0x00)
    assert res.ili and res.information == 1000 - (1 * MiB)
    assert res.data == block(3, 1 * MiB)[:1000]
    assert res.residual_kind == "none"
    assert position(drive) == (4, 0)
    # SILI: a shorter block than requested is no error (residual still reported)
    good(drive.space(-3))
    res = good(drive.read6(30000, sili=True))
    assert res.data == block(1, 10000) and (res.residual_kind, res.residual) == ("underflow",
                                                                                  20000)
    res = good(drive.read6(0))  # zero length reads nothing and does not move
    assert res.data == b"" and position(drive) == (2, 0)
    # SILI in variable mode (block length 0) also suppresses ILI for a longer block (SSC-3
    # READ(6) SILI rules): the requested bytes, GOOD, positioned after the block
    assert good(drive.read6(1)).data == block(2, 1)
    res = good(drive.read6(1000, sili=True))
    assert res.data == block(3, 1 * MiB)[:1000] and res.residual_kind == "none"
    assert position(drive) == (4, 0)


def test_variable_block_short_read(drive: Session) -> None:
    good(drive.write6(block(7, 4096)))
    good(drive.rewind())
    res = expect(drive.read6(100), NO_SENSE, 0x00, 0x00)
    assert res.ili and res.information == 100 - 4096 and res.sense[0] & 0x80  # VALID
    assert res.data == block(7, 4096)[:100]
    assert position(drive) == (1, 0)  # the whole block was passed


def test_fixed_block_mode(drive: Session) -> None:
    # variable mode: FIXED=1 is refused
    expect(drive.write6(bytes(512), fixed=True, block_size=512), ILLEGAL_REQUEST, 0x24, 0x00)
    good(set_block_length(drive, 4096))
    data = good(mode_sense6(drive, 0x0F)).data
    assert data[3] == 8 and data[4] == 0x58 and int.from_bytes(data[9:12], "big") == 4096
    try:
        payload = b"".join(block(100 + i, 4096) for i in range(3))
        good(drive.write6(payload, fixed=True, block_size=4096))
        good(drive.write_filemarks(1))
        good(drive.write6(block(200, 1000)))  # a variable block in fixed mode
        good(drive.rewind())
        assert good(drive.read6(2, fixed=True, block_size=4096)).data == payload[:8192]
        # 3 blocks asked, 1 read, then the filemark: FILEMARK, INFORMATION = blocks not read
        res = expect(drive.read6(3, fixed=True, block_size=4096), NO_SENSE, 0x00, 0x01)
        assert res.filemark and res.information == 2
        assert res.data == payload[8192:]
        assert (res.residual_kind, res.residual) == ("underflow", 2 * 4096)
        assert position(drive) == (4, 1)
        # a block of the wrong length in fixed mode: ILI, INFORMATION = blocks not read
        res = expect(drive.read6(1, fixed=True, block_size=4096), NO_SENSE, 0x00, 0x00)
        assert res.ili and res.information == 1
        # FIXED and SILI together are invalid
        res = expect(drive.execute(bytes([0x08, 0x03, 0, 0, 1, 0]), expect_in=4096),
                     ILLEGAL_REQUEST, 0x24, 0x00)
        assert field_pointer(res) == (True, 1, 1)
        # a block length above the maximum is refused in MODE SELECT (parameter list)
        res = expect(set_block_length(drive, 2 * MiB), ILLEGAL_REQUEST, 0x26, 0x00)
        assert field_pointer(res)[0] is False
    finally:
        good(set_block_length(drive, 0))
    assert int.from_bytes(good(mode_sense6(drive, 0x0F)).data[9:12], "big") == 0
    expect(drive.read6(1, fixed=True, block_size=4096), ILLEGAL_REQUEST, 0x24, 0x00)


def test_filemark_and_end_of_data_reads(drive: Session) -> None:
    good(drive.write6(block(1, 512)))
    good(drive.write_filemarks(1))
    good(drive.write6(block(2, 512)))
    good(drive.rewind())
    assert good(drive.read6(512)).data == block(1, 512)
    res = expect(drive.read6(512), NO_SENSE, 0x00, 0x01)
    assert res.filemark and res.information == 512 and res.data == b""
    assert (res.residual_kind, res.residual) == ("underflow", 512)
    assert position(drive) == (2, 1)  # past the filemark
    assert good(drive.read6(512)).data == block(2, 512)
    res = expect(drive.read6(512), BLANK_CHECK, 0x00, 0x05)
    assert res.information == 512 and not res.eom and res.sense[0] & 0x80
    assert position(drive) == (3, 1)
    expect(drive.read6(512), BLANK_CHECK, 0x00, 0x05)  # still at EOD


def _three_files(drive: Session) -> None:
    """objects: b0 b1 b2 FM3 | b4 b5 FM6 | b7 b8 b9 b10 | EOD 11"""
    for n in (3, 2, 4):
        for _ in range(n):
            good(drive.write6(block(position(drive)[0], 2048)))
        if n != 4:
            good(drive.write_filemarks(1))
    assert position(drive) == (11, 2)
    good(drive.rewind())


@pytest.mark.parametrize("space", [lambda s, n, c=0: s.space(n, c), space16],
                         ids=["space6", "space16"])
def test_space_blocks_filemarks_eod(drive: Session, space) -> None:
    _three_files(drive)
    good(space(drive, 2))
    assert position(drive) == (2, 0)
    # blocks forward over a filemark: stops after it, FILEMARK, residue = blocks not spaced
    res = expect(space(drive, 3), NO_SENSE, 0x00, 0x01)
    assert res.filemark and res.information == 2
    assert position(drive) == (4, 1)
    assert good(drive.read6(2048)).data == block(4, 2048)
    good(space(drive, 1, 1))  # one filemark forward
    assert position(drive) == (7, 2)
    good(space(drive, 0, 3))  # end of data
    assert position(drive) == (11, 2)
    res = expect(space(drive, 5), BLANK_CHECK, 0x00, 0x05)
    assert res.information == 5
    assert position(drive) == (11, 2)
    # backward
    good(space(drive, -2))
    assert position(drive) == (9, 2)
    assert good(drive.read6(2048)).data == block(9, 2048)
    good(space(drive, -1, 1))  # back over the filemark FM6: before it (BOP side)
    assert position(drive) == (6, 1)
    res = expect(space(drive, -3), NO_SENSE, 0x00, 0x01)  # b5 b4 then FM3
    assert res.filemark and res.information == 1
    assert position(drive) == (3, 0)
    # one block forward from just before FM3 meets the filemark at once: residue 1, after it
    res = expect(space(drive, 1), NO_SENSE, 0x00, 0x01)
    assert res.filemark and res.information == 1
    assert position(drive) == (4, 1)
    res = expect(space(drive, -10), NO_SENSE, 0x00, 0x01)  # FM3 is the first object met
    assert res.information == 10 and position(drive) == (3, 0)
    good(space(drive, -1))  # back over b2
    res = expect(space(drive, -5), NO_SENSE, 0x00, 0x04)  # beginning of partition
    assert res.eom and res.information == 3
    assert position(drive) == (0, 0)
    res = expect(space(drive, 5, 1), BLANK_CHECK, 0x00, 0x05)  # only 2 filemarks
    assert res.information == 3
    assert position(drive) == (11, 2)
    res = expect(space(drive, -5, 1), NO_SENSE, 0x00, 0x04)
    assert res.information == 3 and position(drive) == (0, 0)
    good(space(drive, 0))  # count 0: no motion
    assert position(drive) == (0, 0)
    expect(space(drive, 1, 5), ILLEGAL_REQUEST, 0x24, 0x00)  # unknown code


def test_locate_and_read_position(drive: Session) -> None:
    _three_files(drive)
    good(drive.locate(5))
    assert position(drive) == (5, 1)
    assert good(drive.read6(2048)).data == block(5, 2048)
    good(drive.locate(0))
    assert position(drive) == (0, 0)
    good(drive.locate(8, partition=0))
    assert position(drive) == (8, 2)
    good(locate16(drive, 2))
    assert position(drive) == (2, 0)
    good(locate16(drive, 2, dest_type=1))  # logical file 2: after the second filemark
    assert position(drive) == (7, 2)
    good(locate16(drive, 0, dest_type=3))  # end of data
    assert position(drive) == (11, 2)
    good(locate16(drive, 10))
    assert good(drive.read6(2048)).data == block(10, 2048)
    good(drive.locate(11))  # EOD itself is a valid position
    assert position(drive) == (11, 2)
    expect(drive.locate(50), BLANK_CHECK, 0x00, 0x05)
    assert position(drive) == (11, 2)
    expect(locate16(drive, 1000), BLANK_CHECK, 0x00, 0x05)
    expect(drive.locate(3, partition=1), ILLEGAL_REQUEST, 0x24, 0x00)
    # READ POSITION: an unknown service action; the extended form honours the allocation length
    expect(drive.execute(bytes([0x34, 0x02, 0, 0, 0, 0, 0, 0, 0, 0]), expect_in=32),
           ILLEGAL_REQUEST, 0x24, 0x00)
    short_ext = good(drive.execute(struct.pack(">BB5xHB", 0x34, 8, 8, 0), expect_in=8)).data
    assert len(short_ext) == 8 and short_ext[3] == 0x1C


def test_write_filemarks_immed_and_zero(drive: Session) -> None:
    good(drive.write6(block(0, 100)))
    good(drive.write_filemarks(2, immed=True))
    assert position(drive) == (3, 2)
    good(drive.write_filemarks(0))  # flush only
    assert position(drive) == (3, 2)
    good(drive.rewind())
    good(drive.space(2, 1))
    assert position(drive) == (3, 2)
    expect(drive.read6(100), BLANK_CHECK, 0x00, 0x05)
    # WSMK (setmarks) is not supported
    res = expect(drive.execute(bytes([0x10, 0x02, 0, 0, 1, 0])), ILLEGAL_REQUEST, 0x24, 0x00)
    assert field_pointer(res) == (True, 1, 1)


def test_erase_makes_a_new_end_of_data(drive: Session) -> None:
    for i in range(4):
        good(drive.write6(block(i, 1000)))
    good(drive.locate(2))
    good(erase(drive, long=True))
    assert position(drive) == (2, 0)
    expect(drive.read6(1000), BLANK_CHECK, 0x00, 0x05)
    good(drive.rewind())
    good(drive.space(0, 3))
    assert position(drive) == (2, 0)


def test_write_mid_tape_sets_new_end_of_data(drive: Session) -> None:
    for i in range(5):
        good(drive.write6(block(i, 1000)))
    good(drive.write_filemarks(1))
    good(drive.locate(2))
    good(drive.write6(block(99, 700)))
    assert position(drive) == (3, 0)
    expect(drive.read6(1000), BLANK_CHECK, 0x00, 0x05)
    good(drive.space(0, 3))
    assert position(drive) == (3, 0)
    good(drive.rewind())
    assert [good(drive.read6(1000)).data for _ in range(2)] == [block(0, 1000), block(1, 1000)]
    assert good(drive.read6(700)).data == block(99, 700)
    expect(drive.read6(1000), BLANK_CHECK, 0x00, 0x05)
    # a filemark written mid-tape also truncates
    good(drive.locate(1))
    good(drive.write_filemarks(1))
    good(drive.space(0, 3))
    assert position(drive) == (2, 1)


def test_tape_mode_pages(drive: Session) -> None:
    data = good(mode_sense6(drive, 0x3F)).data
    assert data[3] == 8 and data[4] == 0x58  # block descriptor: LTO-5 density, variable
    assert int.from_bytes(data[9:12], "big") == 0
    assert data[2] & 0x80 == 0 and data[2] & 0x10  # not write protected; buffered mode 1
    codes, pos = [], 4 + data[3]
    while pos < len(data):
        codes.append(data[pos] & 0x3F)
        pos += 2 + data[pos + 1]
    assert {0x0F, 0x10, 0x11, 0x1C} <= set(codes)
    for code in (0x0F, 0x10, 0x11, 0x1C):
        page = good(mode_sense6(drive, code, dbd=True)).data
        assert page[3] == 0 and page[4] & 0x3F == code
        assert len(page) == 4 + 2 + page[5]
    # MODE SENSE(10) agrees on the block descriptor
    ten = good(mode_sense10(drive, 0x0F)).data
    assert int.from_bytes(ten[6:8], "big") == 8 and ten[8] == 0x58
    # MODE SELECT page 0Fh: turn data compression (DCE) off and on again
    comp = bytearray(good(mode_sense6(drive, 0x0F, dbd=True)).data[4:])
    assert comp[2] == 0x40  # DCC (compression capable), DCE off by default
    comp[0] &= 0x3F
    comp[2] |= 0x80
    good(mode_select6(drive, bytes(4) + bytes(comp)))
    assert good(mode_sense6(drive, 0x0F, dbd=True)).data[6] & 0x80
    comp[2] &= 0x7F
    good(mode_select6(drive, bytes(4) + bytes(comp)))
    assert not good(mode_sense6(drive, 0x0F, dbd=True)).data[6] & 0x80
    # changing a bit that is not changeable: 26/00 in the parameter list
    bad = bytearray(comp)
    bad[3] |= 0x01
    res = expect(mode_select6(drive, bytes(4) + bytes(bad)), ILLEGAL_REQUEST, 0x26, 0x00)
    assert field_pointer(res)[0] is False
    # page 10h: sending it back unchanged is accepted; an unknown compression algorithm is not
    devconf = bytearray(good(mode_sense6(drive, 0x10, dbd=True)).data[4:])
    devconf[0] &= 0x3F
    good(mode_select6(drive, bytes(4) + bytes(devconf)))
    devconf[14] = 0x02
    res = expect(mode_select6(drive, bytes(4) + bytes(devconf)), ILLEGAL_REQUEST, 0x26, 0x02)
    assert field_pointer(res)[:2] == (False, 4 + 14)  # PARAMETER VALUE INVALID at that byte
    # changeable values (PC=01) of page 0F: DCE only
    ch = good(drive.execute(bytes([0x1A, 0x08, 0x4F, 0, 255, 0]), expect_in=255)).data
    assert ch[4] & 0x3F == 0x0F and ch[6] == 0x80
    # an unsupported density is refused
    expect(set_block_length(drive, 0, density=0x99), ILLEGAL_REQUEST, 0x26, 0x00)
    good(set_block_length(drive, 0, density=0x58))


def test_report_density_support(drive: Session) -> None:
    def densities(media: bool) -> list[int]:
        data = good(report_density(drive, media)).data
        total = int.from_bytes(data[:2], "big")
        return [data[pos] for pos in range(4, 2 + total, 52)]

    assert densities(False) == [0x58, 0x46]
    assert densities(True) == [0x58]


def test_log_sense_pages(drive: Session) -> None:
    good(drive.write6(block(0, 1 * MiB)))
    good(drive.write_filemarks(1))
    data = good(log_sense(drive, 0x00)).data
    assert data[0] & 0x3F == 0
    pages = list(data[4:4 + int.from_bytes(data[2:4], "big")])
    assert {0x00, 0x0C, 0x2E} <= set(pages)
    seq = good(log_sense(drive, 0x0C)).data
    assert seq[0] & 0x3F == 0x0C and int.from_bytes(seq[2:4], "big") > 0
    alerts = good(log_sense(drive, 0x2E)).data
    assert alerts[0] & 0x3F == 0x2E and int.from_bytes(alerts[2:4], "big") == 64 * 5
    flags = [alerts[4 + 5 * i + 4] & 1 for i in range(64)]
    assert not any(flags)  # a healthy drive raises no TapeAlert flag
    expect(log_sense(drive, 0x33), ILLEGAL_REQUEST, 0x24, 0x00)


def test_read_attribute_barcode_and_capacity(loaded: Loaded) -> None:
    drive = loaded.drive
    attrs = parse_attributes(good(read_attribute(drive)).data)
    assert attrs[0x0806].decode("ascii").rstrip() == loaded.barcode
    assert len(attrs[0x0806]) == 32
    maximum = int.from_bytes(attrs[0x0001], "big")
    assert maximum == 100 * GiB // MiB
    assert int.from_bytes(attrs[0x0000], "big") <= maximum
    assert attrs[0x0401].decode().strip() == loaded.barcode  # medium serial number
    assert attrs[0x0408] == b"\x00"  # data medium, not WORM
    # FIRST ATTRIBUTE ID starts the list there
    some = parse_attributes(good(read_attribute(drive, first=0x0806)).data)
    assert min(some) == 0x0806
    # ATTRIBUTE LIST: the identifiers only
    data = good(read_attribute(drive, action=1)).data
    ids = {int.from_bytes(data[p:p + 2], "big")
           for p in range(4, 4 + int.from_bytes(data[:4], "big"), 2)}
    assert {0x0000, 0x0001, 0x0806} <= ids
    expect(read_attribute(drive, action=0x1F), ILLEGAL_REQUEST, 0x24, 0x00)
    # a fresh 100 GiB tape is far from early warning (see module docstring)
    assert not good(drive.read_position()).data[0] & 0x01


def test_reserve_release_conflict(loaded: Loaded, app: ApplianceProcess) -> None:
    drive = loaded.drive
    good(drive.execute(bytes([0x16, 0, 0, 0, 0, 0])))  # RESERVE(6)
    with drive_session(app, 0, initiator_name="iqn.2026-11.org.vtl.test:other",
                       consume_unit_attention=False) as other:
        res = other.test_unit_ready()
        if res.check_condition:  # the new nexus's UA (power on / reset) is reported first
            assert (res.sense_key, res.asc) == (UNIT_ATTENTION, 0x29), res.describe()
            res = other.test_unit_ready()
        assert res.status == Status.RESERVATION_CONFLICT, res.describe()
        assert other.write6(b"x" * 10).status == Status.RESERVATION_CONFLICT
        assert other.execute(bytes([0x16, 0, 0, 0, 0, 0])).status == Status.RESERVATION_CONFLICT
        good(drive.write6(b"y" * 10))  # the holder carries on
        good(drive.execute(bytes([0x17, 0, 0, 0, 0, 0])))  # RELEASE(6)
        res = other.test_unit_ready()
        if res.check_condition:  # a UA for the new nexus (power on / medium) comes first
            assert res.sense_key == UNIT_ATTENTION, res.describe()
            res = other.test_unit_ready()
        good(res)
        good(other.read_position())


def test_block_larger_than_limit_and_reserved_bits(drive: Session) -> None:
    res = expect(drive.write6(bytes(1 * MiB + 1)), ILLEGAL_REQUEST, 0x24, 0x00)
    assert field_pointer(res)[:2] == (True, 2)
    assert position(drive) == (0, 0)
    # reserved bits: ILLEGAL REQUEST 24/00 with a field pointer at the offending bit
    res = expect(drive.execute(bytes([0x08, 0x10, 0, 0, 16, 0]), expect_in=16),
                 ILLEGAL_REQUEST, 0x24, 0x00)
    assert field_pointer(res) == (True, 1, 4)
    res = expect(drive.execute(bytes([0x01, 0x80, 0, 0, 0, 0])), ILLEGAL_REQUEST, 0x24, 0x00)
    assert field_pointer(res) == (True, 1, 7)
    res = expect(drive.execute(bytes([0x11, 0x40, 0, 0, 1, 0])), ILLEGAL_REQUEST, 0x24, 0x00)
    assert field_pointer(res) == (True, 1, 6)
    res = expect(drive.execute(bytes([0x05, 0x01, 0, 0, 0, 0]), expect_in=6),
                 ILLEGAL_REQUEST, 0x24, 0x00)
    assert field_pointer(res) == (True, 1, 0)
    res = expect(drive.execute(bytes([0x1E, 0, 0, 0, 0x02, 0])), ILLEGAL_REQUEST, 0x24, 0x00)
    assert field_pointer(res) == (True, 4, 1)
    # an unknown opcode
    expect(drive.execute(bytes([0xE7, 0, 0, 0, 0, 0])), ILLEGAL_REQUEST, 0x20, 0x00)


def test_prevent_allow_drive(loaded: Loaded) -> None:
    good(prevent(loaded.drive, True))
    expect(loaded.changer.move_medium(DRIVE0, next(_slots)), ILLEGAL_REQUEST, 0x53, 0x02)
    # the changer shows the drive without ACCESS while removal is prevented
    data = good(loaded.changer.read_element_status(DT, DRIVE0, 1, alloc=1024)).data
    assert data[16 + 2] & 0x08 == 0 and data[16 + 2] & 0x01
    good(prevent(loaded.drive, False))
    data = good(loaded.changer.read_element_status(DT, DRIVE0, 1, alloc=1024)).data
    assert data[16 + 2] & 0x08


def test_worm_tape_overwrite_is_data_protect(app: ApplianceProcess) -> None:
    tape = Loaded(app, 4, worm=True)
    try:
        dr = tape.drive
        assert good(mode_sense6(dr, 0x0F)).data[1] == 0x01  # MEDIUM TYPE: WORM
        assert parse_attributes(good(read_attribute(dr)).data)[0x0408] == b"\x80"
        for i in range(3):
            good(dr.write6(block(i, 4096)))
        good(dr.write_filemarks(1))
        good(dr.rewind())
        expect(dr.write6(block(9, 4096)), DATA_PROTECT, 0x30, 0x0C)
        good(dr.locate(1))
        expect(dr.write_filemarks(1), DATA_PROTECT, 0x30, 0x0C)
        expect(erase(dr), DATA_PROTECT, 0x30, 0x0C)
        # appending at end of data is allowed
        good(dr.space(0, 3))
        good(dr.write6(block(3, 4096)))
        good(dr.rewind())
        assert [good(dr.read6(4096)).data for _ in range(3)] == [block(i, 4096) for i in range(3)]
        # the WORM overwrite attempt raised TapeAlert flag 0x0F? (read-and-clear page)
        alerts = good(log_sense(dr, 0x2E)).data
        assert any(alerts[4 + 5 * i + 4] & 1 for i in range(64))
    finally:
        tape.unload()


def test_read_only_retrieved_tape_is_write_protected(tmp_path: Path) -> None:
    """A RETRIEVED tape loads read-only: WP in MODE SENSE, DATA PROTECT 27/00 on writes.
    There is no control op that makes a tape RETRIEVED yet, so the catalog is edited while the
    appliance is stopped."""
    data_dir = tmp_path / "data"
    with ApplianceProcess(data_dir) as app:
        tape = create_tape(app)
        slot = SLOT0 + 7
        with changer_session(app) as ch:
            good(ch.move_medium(tape["location"]["address"], slot))
            good(ch.move_medium(slot, DRIVE0))
        with drive_session(app, 0) as dr:
            good(dr.write6(block(1, 4096)))
            good(dr.write_filemarks(1))
        with changer_session(app) as ch:
            good(ch.move_medium(DRIVE0, slot))
    with sqlite3.connect(data_dir / "catalog.db") as db:
        db.execute("update tapes set status = 'RETRIEVED' where barcode = ?", (tape["barcode"],))
    with ApplianceProcess(data_dir) as app:
        assert show_tape(app, tape["barcode"])["status"] == "RETRIEVED"
        with changer_session(app) as ch:
            good(ch.move_medium(slot, DRIVE0 + 1))
            with drive_session(app, 1) as dr:
                assert good(mode_sense6(dr, 0x0F)).data[2] & 0x80  # WP
                expect(dr.write6(block(2, 4096)), DATA_PROTECT, 0x27, 0x00)
                expect(dr.write_filemarks(1), DATA_PROTECT, 0x27, 0x00)
                expect(erase(dr), DATA_PROTECT, 0x27, 0x00)
                assert good(dr.read6(4096)).data == block(1, 4096)
                expect(dr.read6(4096), NO_SENSE, 0x00, 0x01)
                expect(dr.read6(4096), BLANK_CHECK, 0x00, 0x05)
            good(ch.move_medium(DRIVE0 + 1, slot))


def test_tape_survives_clean_restart_in_drive(tmp_path: Path) -> None:
    """A tape left in a drive at SIGTERM is back in the same drive after a restart, readable."""
    data_dir = tmp_path / "data"
    with ApplianceProcess(data_dir) as app:
        tape = create_tape(app)
        with changer_session(app) as ch:
            good(ch.move_medium(tape["location"]["address"], DRIVE0 + 6))
        with drive_session(app, 6) as dr:
            good(dr.write6(block(5, 3000)))
            good(dr.write_filemarks(1, immed=True))
    with ApplianceProcess(data_dir) as app:
        with changer_session(app) as ch:
            assert element_at(ch, DRIVE0 + 6).barcode == tape["barcode"]
        with drive_session(app, 6) as dr:
            assert position(dr) == (0, 0)
            assert good(dr.read6(3000)).data == block(5, 3000)
            expect(dr.read6(3000), NO_SENSE, 0x00, 0x01)
        assert os.path.isdir(data_dir)
