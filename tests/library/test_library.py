"""Library with a real catalog in tmp_path: tapes appear in I/E slots, moves are persisted,
state survives a restart, limits and errors say what is wrong."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from catalog import tapes as q
from catalog.db import Catalog, open_catalog
from vtl.errors import Conflict, InvalidRequest, LimitExceeded, NotFound
from vtl.iscsi.target import Targets
from vtl.library.elements import ElementLayout
from vtl.library.library import GiB, TiB, Library, Limits
from vtl.scsi.command import ScsiCommand, ScsiResult
from vtl.scsi.inquiry import decode_designators
from vtl.scsi.sense import DecodedSense

AUTH = "iqn.2026-11.org.vtl"
GW = "sgw-12AB34CD"
NEXUS = "iqn.1994-05.com.redhat:host,i,0x1"
CHANGER = f"{AUTH}:sgw-12ab34cd-mediachanger"
LAYOUT = ElementLayout(drives=10, storage=8, import_export=4)


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    cat = open_catalog(tmp_path / "catalog.db")
    yield cat
    cat.close()


def make(catalog: Catalog, tmp_path: Path, **kw: object) -> tuple[Library, Targets]:
    targets = Targets()
    kw.setdefault("layout", LAYOUT)
    lib = Library(catalog, tmp_path, targets, AUTH, GW, **kw)  # type: ignore[arg-type]
    lib.start()
    return lib, targets


def scsi(targets: Targets, iqn: str, cdb: bytes) -> ScsiResult:
    target = targets.lookup(iqn)
    assert target is not None
    result = target.device.execute(ScsiCommand(lun=0, cdb=cdb, nexus=NEXUS, expected_in=1 << 24))
    if result.status == 2 and DecodedSense.decode(result.sense).key == 6:  # unit attention
        result = target.device.execute(ScsiCommand(lun=0, cdb=cdb, nexus=NEXUS,
                                                   expected_in=1 << 24))
    return result


def move(targets: Targets, src: int, dst: int) -> ScsiResult:
    return scsi(targets, CHANGER, struct.pack(">BBHHHHBB", 0xA5, 0, 0, src, dst, 0, 0, 0))


def sense(result: ScsiResult) -> tuple[int, int, int]:
    s = DecodedSense.decode(result.sense)
    return s.key, s.asc, s.ascq


def create(lib: Library, count: int = 2, size: int = 100 * GiB, **kw: object) -> list[dict]:
    return lib.ops()["CreateTapes"]({"prefix": "VT", "count": count, "size_bytes": size, **kw})["tapes"]


def test_start_registers_eleven_targets_drive_zero_first(catalog: Catalog, tmp_path: Path) -> None:
    lib, targets = make(catalog, tmp_path)
    names = [t.name for t in targets.targets()]
    assert len(names) == 11 and CHANGER in names
    drives = sorted((n for n in names if "tapedrive" in n))
    assert drives[0] == f"{AUTH}:sgw-12ab34cd-tapedrive-01"
    assert drives[-1] == f"{AUTH}:sgw-12ab34cd-tapedrive-10"
    inq = bytes(scsi(targets, CHANGER, bytes([0x12, 0, 0, 0, 96, 0])).data_in)
    assert inq[0] == 0x08 and inq[8:12] == b"STK "
    inq = bytes(scsi(targets, drives[0], bytes([0x12, 0, 0, 0, 96, 0])).data_in)
    assert inq[0] == 0x01 and inq[16:27] == b"ULT3580-TD5"
    lib.close()
    assert targets.targets() == []


def test_create_tapes_appear_in_ie_slots(catalog: Catalog, tmp_path: Path) -> None:
    lib, targets = make(catalog, tmp_path)
    dev = targets.lookup(CHANGER).device  # type: ignore[union-attr]
    assert sense(dev.execute(ScsiCommand(lun=0, cdb=bytes(6), nexus=NEXUS))) == (6, 0x29, 0)
    assert dev.execute(ScsiCommand(lun=0, cdb=bytes(6), nexus=NEXUS)).ok
    tapes = create(lib, 3, 200 * GiB, pool="deep-archive", worm=True)
    assert [t["barcode"] for t in tapes] == ["VT0000001", "VT0000002", "VT0000003"]
    first = tapes[0]
    assert first["status"] == "AVAILABLE" and first["size_bytes"] == 200 * GiB
    assert first["pool"] == "deep-archive" and first["worm"] is True
    assert first["location"] == {"type": "ie", "address": 0x300, "mtx": 9}
    assert first["target_iqn"] is None and first["used_bytes"] == 0 and first["created_at"]
    assert (tmp_path / "cache" / "tapes" / "VT0000001").is_dir()
    # the changer announces the new tapes to the session already logged in
    assert sense(dev.execute(ScsiCommand(lun=0, cdb=bytes(6), nexus=NEXUS))) == (6, 0x28, 0x01)
    assert dev.execute(ScsiCommand(lun=0, cdb=bytes(6), nexus=NEXUS)).ok
    assert [e["kind"] for e in q.events(catalog.db, "VT0000001")] == ["tape.create"]
    assert create(lib, 1)[0]["barcode"] == "VT0000004"


def test_moves_are_persisted_and_survive_restart(catalog: Catalog, tmp_path: Path) -> None:
    lib, targets = make(catalog, tmp_path)
    create(lib, 2)
    assert move(targets, 0x300, 0x1000).ok
    assert move(targets, 0x301, 0x1001).ok
    assert move(targets, 0x1000, 0x0100).ok
    row = q.get_tape(catalog.db, "VT0000001")
    assert row["element_address"] == 0x0100 and row["source_address"] == 0x1000
    info = lib.ops()["DescribeTape"]({"barcode": "vt0000001"})
    assert info["location"] == {"type": "drive", "address": 0x100, "mtx": 0}
    assert info["target_iqn"] == f"{AUTH}:sgw-12ab34cd-tapedrive-01"
    assert lib.drives[0].barcode == "VT0000001"
    # write something through the drive so used_bytes moves
    drive0 = f"{AUTH}:sgw-12ab34cd-tapedrive-01"
    assert scsi(targets, drive0, bytes(6)).ok
    w = targets.lookup(drive0).device.execute(  # type: ignore[union-attr]
        ScsiCommand(lun=0, cdb=bytes([0x0A, 0, 0, 0x10, 0, 0]), data_out=b"x" * 4096, nexus=NEXUS))
    assert w.ok, DecodedSense.decode(w.sense)
    lib.close()

    lib2, targets2 = make(catalog, tmp_path)
    assert lib2.drives[0].barcode == "VT0000001"
    status = lib2.ops()["LibraryStatus"]({})
    assert status["drives"][0]["barcode"] == "VT0000001"
    assert status["slots"] == {"total": 8, "full": 1} and status["ie"] == {"total": 4, "full": 0}
    assert move(targets2, 0x0100, 0x1007).ok
    assert lib2.drives[0].barcode is None
    row = q.get_tape(catalog.db, "VT0000001")
    assert row["element_address"] == 0x1007 and row["used_bytes"] >= 4096
    kinds = [e["kind"] for e in q.events(catalog.db, "VT0000001")]
    assert kinds == ["tape.create", "tape.move", "tape.move", "tape.move"]
    lib2.close()


def test_export_to_ie_and_cancel_and_archive(catalog: Catalog, tmp_path: Path) -> None:
    lib, targets = make(catalog, tmp_path)
    create(lib, 1)
    assert move(targets, 0x300, 0x1000).ok
    assert q.get_tape(catalog.db, "VT0000001")["status"] == "AVAILABLE"
    assert move(targets, 0x1000, 0x302).ok
    assert q.get_tape(catalog.db, "VT0000001")["status"] == "IN TRANSIT TO VTS"
    assert move(targets, 0x302, 0x1001).ok  # moved back: export cancelled
    assert q.get_tape(catalog.db, "VT0000001")["status"] == "AVAILABLE"
    assert move(targets, 0x1001, 0x303).ok
    # an initiator holding PREVENT MEDIUM REMOVAL keeps the tape in the library
    assert scsi(targets, CHANGER, bytes([0x1E, 0, 0, 0, 1, 0])).ok
    with pytest.raises(Conflict, match="prevents"):
        lib.take_for_archive("VT0000001")
    assert scsi(targets, CHANGER, bytes([0x1E, 0, 0, 0, 0, 0])).ok
    lib.take_for_archive("VT0000001")
    info = lib.ops()["DescribeTape"]({"barcode": "VT0000001"})
    assert info["status"] == "ARCHIVING" and info["location"]["type"] == "shelf"
    assert lib.changer is not None and lib.changer.locate("VT0000001") is None


def test_tape_in_drive_cannot_be_deleted_and_barcode_stays_reserved(
        catalog: Catalog, tmp_path: Path) -> None:
    lib, targets = make(catalog, tmp_path)
    ops = lib.ops()
    ops["CreateTapeWithBarcode"]({"barcode": "ABC12345", "size_bytes": 100 * GiB})
    assert move(targets, 0x300, 0x0101).ok
    with pytest.raises(Conflict, match="drive 1"):
        ops["DeleteTape"]({"barcode": "ABC12345"})
    assert move(targets, 0x0101, 0x1000).ok
    deleted = ops["DeleteTape"]({"barcode": "ABC12345"})
    assert deleted["status"] == "DELETED" and deleted["location"]["type"] == "none"
    assert not (tmp_path / "cache" / "tapes" / "ABC12345").exists()
    assert ops["ListTapes"]({})["tapes"] == []
    assert [t["barcode"] for t in ops["ListTapes"]({"status": "DELETED"})["tapes"]] == ["ABC12345"]
    with pytest.raises(Conflict, match="never reused"):
        ops["CreateTapeWithBarcode"]({"barcode": "ABC12345", "size_bytes": 100 * GiB})
    with pytest.raises(NotFound):
        ops["DescribeTape"]({"barcode": "ABC12345"})
    assert lib.changer is not None and lib.changer.occupancy(lib.changer.layout.types()[1]) == 0


@pytest.mark.parametrize("args, error, text", [
    ({"prefix": "VT", "count": 0, "size_bytes": 100 * GiB}, InvalidRequest, "1 to 10"),
    ({"prefix": "VT", "count": 11, "size_bytes": 100 * GiB}, InvalidRequest, "1 to 10"),
    ({"prefix": "V1", "count": 1, "size_bytes": 100 * GiB}, InvalidRequest, "1-4 letters"),
    ({"prefix": "VT", "count": 1, "size_bytes": 99 * GiB}, InvalidRequest, "whole GiB"),
    ({"prefix": "VT", "count": 1, "size_bytes": 16 * TiB}, InvalidRequest, "15 TiB"),
    ({"prefix": "VT", "count": 1, "size_bytes": 100 * GiB + 1}, InvalidRequest, "whole GiB"),
    ({"prefix": "VT", "count": 1, "size_bytes": 100 * GiB, "pool": "s3"}, InvalidRequest, "pool"),
    ({"prefix": "VT", "count": 5, "size_bytes": 100 * GiB}, LimitExceeded, "import/export"),
])
def test_create_errors(catalog: Catalog, tmp_path: Path, args: dict, error: type,
                       text: str) -> None:
    lib, _ = make(catalog, tmp_path)
    with pytest.raises(error, match=text):
        lib.ops()["CreateTapes"](args)
    assert lib.ops()["ListTapes"]({})["tapes"] == []


def test_bad_barcode_is_refused(catalog: Catalog, tmp_path: Path) -> None:
    lib, _ = make(catalog, tmp_path)
    with pytest.raises(InvalidRequest, match="5-16"):
        lib.ops()["CreateTapeWithBarcode"]({"barcode": "AB-1", "size_bytes": 100 * GiB})


def test_library_limits(catalog: Catalog, tmp_path: Path) -> None:
    lib, _ = make(catalog, tmp_path, limits=Limits(max_tapes=3, max_total_bytes=500 * GiB))
    create(lib, 2, 200 * GiB)
    with pytest.raises(LimitExceeded, match="1 PiB"):
        create(lib, 1, 200 * GiB)
    create(lib, 1, 100 * GiB)
    with pytest.raises(LimitExceeded, match="at most 3 tapes"):
        create(lib, 1, 100 * GiB)


def test_list_tapes_filter(catalog: Catalog, tmp_path: Path) -> None:
    lib, targets = make(catalog, tmp_path)
    create(lib, 2)
    assert move(targets, 0x300, 0x1000).ok and move(targets, 0x1000, 0x303).ok
    ops = lib.ops()
    assert [t["barcode"] for t in ops["ListTapes"]({"status": "in transit to vts"})["tapes"]] \
        == ["VT0000001"]
    assert len(ops["ListTapes"]({})["tapes"]) == 2
    with pytest.raises(InvalidRequest, match="unknown status"):
        ops["ListTapes"]({"status": "LOST"})


def test_set_changer_type_is_persisted_and_raises_inquiry_changed(
        catalog: Catalog, tmp_path: Path) -> None:
    lib, targets = make(catalog, tmp_path)
    dev = targets.lookup(CHANGER).device  # type: ignore[union-attr]
    dev.execute(ScsiCommand(lun=0, cdb=bytes(6), nexus=NEXUS))  # power on UA
    assert lib.ops()["SetChangerType"]({"type": "AWS-Gateway-VTL"}) == {
        "changer_type": "AWS-Gateway-VTL"}
    assert sense(dev.execute(ScsiCommand(lun=0, cdb=bytes(6), nexus=NEXUS))) == (6, 0x3F, 0x03)
    inq = bytes(scsi(targets, CHANGER, bytes([0x12, 0, 0, 0, 96, 0])).data_in)
    assert inq[8:16] == b"AWS     " and inq[16:27] == b"Gateway-VTL"
    with pytest.raises(InvalidRequest, match="STK-L700"):
        lib.ops()["SetChangerType"]({"type": "HP-MSL"})
    lib.close()
    lib2, _ = make(catalog, tmp_path)
    assert lib2.ops()["LibraryStatus"]({})["changer_type"] == "AWS-Gateway-VTL"
    lib2.close()
    lib3, _ = make(catalog, tmp_path, changer_type="IBM-03584L32-0402")
    status = lib3.ops()["LibraryStatus"]({})
    assert status["changer"]["product"] == "03584L32" and status["changer"]["revision"] == "0402"


def test_dvcid_matches_the_drives_own_vpd_designator(catalog: Catalog, tmp_path: Path) -> None:
    lib, targets = make(catalog, tmp_path)
    res = bytes(scsi(targets, CHANGER, struct.pack(">BBHHB", 0xB8, 0x04, 0x100, 10, 0x01)
                     + (1 << 16).to_bytes(3, "big") + b"\x00\x00").data_in)
    dlen = struct.unpack(">H", res[10:12])[0]
    for i in range(10):
        desc = res[16 + i * dlen:16 + (i + 1) * dlen]
        ident = desc[16:16 + desc[15]]
        vpd = bytes(scsi(targets, lib.drive_iqn(i), bytes([0x12, 1, 0x83, 0, 255, 0])).data_in)
        designators = decode_designators(vpd[4:])
        t10 = [d for d in designators if d.designator_type == desc[13] and d.code_set == desc[12]]
        assert t10 and t10[0].value == ident
        serial = bytes(scsi(targets, lib.drive_iqn(i), bytes([0x12, 1, 0x80, 0, 255, 0])).data_in)
        assert serial[4:].decode().strip() in ident.decode()


def test_status_reports_drive_counters(catalog: Catalog, tmp_path: Path) -> None:
    lib, _ = make(catalog, tmp_path)
    status = lib.ops()["LibraryStatus"]({})
    assert status["changer"]["target_iqn"] == CHANGER
    assert [d["index"] for d in status["drives"]] == list(range(10))
    assert status["drives"][0] == {"index": 0, "target_iqn": lib.drive_iqn(0),
                                   "serial": status["drives"][0]["serial"], "barcode": None,
                                   "bytes_written": 0, "bytes_read": 0,
                                   # live rates and worker come from drive workers only
                                   "write_bytes_per_s": None, "read_bytes_per_s": None,
                                   "worker": None, "worker_pid": None}


def test_move_out_of_a_drive_held_by_prevent_is_53_02(catalog: Catalog, tmp_path: Path) -> None:
    lib, targets = make(catalog, tmp_path)
    create(lib, 1)
    assert move(targets, 0x300, 0x0100).ok
    drive0 = lib.drive_iqn(0)
    assert scsi(targets, drive0, bytes([0x1E, 0, 0, 0, 1, 0])).ok  # PREVENT on the drive
    assert sense(move(targets, 0x0100, 0x1000)) == (5, 0x53, 0x02)
    assert q.get_tape(catalog.db, "VT0000001")["element_address"] == 0x0100
    assert lib.drives[0].barcode == "VT0000001"
    assert scsi(targets, drive0, bytes([0x1E, 0, 0, 0, 0, 0])).ok  # ALLOW
    assert move(targets, 0x0100, 0x1000).ok
    assert q.get_tape(catalog.db, "VT0000001")["element_address"] == 0x1000


def test_shrunk_element_map_rehomes_tapes_into_free_slots(catalog: Catalog, tmp_path: Path) -> None:
    """Restarting with fewer slots must not lose tapes: they move to free slots, not off-line."""
    lib, _ = make(catalog, tmp_path)
    lib.ops()["CreateTapes"]({"prefix": "RH", "count": 4, "size_bytes": 100 * GiB})
    lib.close()
    small = ElementLayout(drives=10, storage=3, import_export=1)
    lib, _ = make(catalog, tmp_path, layout=small)
    tapes = lib.ops()["ListTapes"]({})["tapes"]
    assert sorted(t["location"]["type"] for t in tapes) == ["ie", "slot", "slot", "slot"]
    addresses = {t["location"]["address"] for t in tapes}
    assert len(addresses) == 4
    lib.close()
    tiny = ElementLayout(drives=10, storage=1, import_export=1)
    lib, _ = make(catalog, tmp_path, layout=tiny)
    placed = [t for t in lib.ops()["ListTapes"]({})["tapes"] if t["location"]["type"] != "shelf"]
    assert len(placed) == 2  # the other two wait off-line; the catalog still has all four
    assert len(lib.ops()["ListTapes"]({})["tapes"]) == 4
    lib.close()
