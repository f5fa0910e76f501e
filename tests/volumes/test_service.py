"""VolumeService with a real catalog in tmp_path: operations, limits, errors, restart."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from catalog.db import Catalog, open_catalog
from tests.volumes.helpers import clear_ua, read10, read_capacity10, run, sense, write10
from volumes import service as service_mod
from volumes.service import GIB, TIB, VolumeService
from vtl.errors import ApplianceError, Conflict, InvalidRequest, LimitExceeded, NotFound
from vtl.iscsi.target import Targets
from vtl.scsi.command import ScsiCommand

AUTH = "iqn.2025-01.org.vtl.test"


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    cat = open_catalog(tmp_path / "catalog.db")
    yield cat
    cat.close()


@pytest.fixture
def targets() -> Targets:
    return Targets()


@pytest.fixture
def svc(catalog: Catalog, tmp_path: Path, targets: Targets) -> VolumeService:
    s = VolumeService(catalog, tmp_path, targets, AUTH)
    s.start()
    yield s
    s.close()


def call(svc: VolumeService, op: str, **args: object) -> object:
    return svc.ops()[op](dict(args))


def lu0(targets: Targets, name: str) -> object:
    target = targets.lookup(f"{AUTH}:{name}")
    assert target is not None
    return target.device


def test_create_list_describe(svc: VolumeService, targets: Targets, tmp_path: Path) -> None:
    vol = call(svc, "CreateStorediSCSIVolume", name="db-1", size_bytes=2 * GIB)
    assert isinstance(vol, dict)
    assert {k: vol[k] for k in ("name", "type", "size_bytes", "status", "target_iqn", "lun")} == {
        "name": "db-1", "type": "stored", "size_bytes": 2 * GIB, "status": "AVAILABLE",
        "target_iqn": f"{AUTH}:db-1", "lun": 0}
    assert vol["created_at"] and vol["used_bytes"] < 1024 * 1024
    path = tmp_path / "volumes" / "db-1.img"
    assert path.stat().st_size == 2 * GIB
    assert call(svc, "ListVolumes") == [vol]
    assert call(svc, "DescribeVolume", name="db-1") == vol
    json.dumps(call(svc, "ListVolumes"))  # JSON-able
    target = targets.lookup(f"{AUTH}:db-1")
    assert target is not None and target.alias == "db-1"


def test_volume_is_served_as_lun0(svc: VolumeService, targets: Targets) -> None:
    call(svc, "CreateStorediSCSIVolume", name="v", size_bytes=GIB)
    device = lu0(targets, "v")
    cmd = ScsiCommand(0, read_capacity10(), nexus="n")
    device.execute(cmd)  # unit attention
    res = device.execute(cmd)
    assert bytes(res.data_in) == (GIB // 512 - 1).to_bytes(4, "big") + (512).to_bytes(4, "big")
    data = b"\x42" * 512
    assert device.execute(ScsiCommand(0, write10(7, 1), data, nexus="n")).ok
    assert bytes(device.execute(ScsiCommand(0, read10(7, 1), nexus="n")).data_in) == data
    used = call(svc, "DescribeVolume", name="v")["used_bytes"]  # type: ignore[index]
    assert used >= 512


@pytest.mark.parametrize("name", ["", "UPPER", "a b", "x" * 201, ".hidden", "-x", "a/b", "..",
                                  "ä", 5, None])
def test_invalid_names(svc: VolumeService, name: object) -> None:
    with pytest.raises(InvalidRequest):
        call(svc, "CreateStorediSCSIVolume", name=name, size_bytes=GIB)


def test_valid_name_edges(svc: VolumeService) -> None:
    call(svc, "CreateStorediSCSIVolume", name="a", size_bytes=GIB)
    call(svc, "CreateStorediSCSIVolume", name="0.vol-x." + "z" * 192, size_bytes=GIB)


@pytest.mark.parametrize("size", [GIB - 512, 0, -1, 16 * TIB + 512, GIB + 1, "1", 1.5, True])
def test_invalid_sizes(svc: VolumeService, size: object) -> None:
    with pytest.raises(InvalidRequest) as err:
        call(svc, "CreateStorediSCSIVolume", name="v", size_bytes=size)
    assert "\n" not in err.value.message


def test_invalid_arguments(svc: VolumeService) -> None:
    with pytest.raises(InvalidRequest, match="size_bytes"):
        call(svc, "CreateStorediSCSIVolume", name="v")
    with pytest.raises(InvalidRequest, match="unknown argument 'sise'"):
        call(svc, "CreateStorediSCSIVolume", name="v", size_bytes=GIB, sise=1)
    with pytest.raises(InvalidRequest, match="stored"):
        call(svc, "CreateStorediSCSIVolume", name="v", size_bytes=GIB, type="cached")
    assert call(svc, "ListVolumes") == []


def test_duplicate_name_conflicts(svc: VolumeService) -> None:
    call(svc, "CreateStorediSCSIVolume", name="v", size_bytes=GIB, type="stored")
    with pytest.raises(Conflict, match="exists"):
        call(svc, "CreateStorediSCSIVolume", name="v", size_bytes=GIB)


def test_target_name_taken_by_someone_else(svc: VolumeService, targets: Targets) -> None:
    from vtl.iscsi.target import IscsiTarget
    from vtl.scsi.target import ScsiTarget
    targets.add(IscsiTarget(name=f"{AUTH}:taken", device=ScsiTarget()))
    with pytest.raises(Conflict):
        call(svc, "CreateStorediSCSIVolume", name="taken", size_bytes=GIB)
    assert call(svc, "ListVolumes") == []


def test_at_most_32_volumes(svc: VolumeService) -> None:
    for i in range(32):
        call(svc, "CreateStorediSCSIVolume", name=f"v{i}", size_bytes=GIB)
    with pytest.raises(LimitExceeded, match="delete one"):
        call(svc, "CreateStorediSCSIVolume", name="v32", size_bytes=GIB)
    assert len(call(svc, "ListVolumes")) == 32  # type: ignore[arg-type]


def test_total_size_limit(svc: VolumeService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_mod, "MAX_TOTAL_BYTES", 3 * GIB)
    call(svc, "CreateStorediSCSIVolume", name="a", size_bytes=2 * GIB)
    with pytest.raises(LimitExceeded, match="TiB"):
        call(svc, "CreateStorediSCSIVolume", name="b", size_bytes=2 * GIB)
    call(svc, "CreateStorediSCSIVolume", name="b", size_bytes=GIB)


def test_file_system_too_small_for_the_file(svc: VolumeService,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def efbig(path: object, size: int) -> None:
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(service_mod.StoredBackend, "create", staticmethod(efbig))
    with pytest.raises(InvalidRequest, match="XFS"):
        call(svc, "CreateStorediSCSIVolume", name="huge", size_bytes=16 * TIB)
    assert call(svc, "ListVolumes") == []


def test_describe_and_delete_unknown(svc: VolumeService) -> None:
    with pytest.raises(NotFound):
        call(svc, "DescribeVolume", name="nope")
    with pytest.raises(NotFound):
        call(svc, "DeleteVolume", name="nope")


def test_delete_removes_target_file_and_row(svc: VolumeService, targets: Targets,
                                            tmp_path: Path, catalog: Catalog) -> None:
    call(svc, "CreateStorediSCSIVolume", name="gone", size_bytes=GIB)
    call(svc, "SetVolumeChap", name="gone", chap_user="u", chap_secret="s" * 12)
    device = lu0(targets, "gone")
    clear_ua(device)
    assert call(svc, "DeleteVolume", name="gone") == {"name": "gone", "status": "DELETED"}
    assert targets.lookup(f"{AUTH}:gone") is None
    assert not (tmp_path / "volumes" / "gone.img").exists()
    assert call(svc, "ListVolumes") == []
    assert catalog.db.execute("select count(*) from target_auth").fetchone()[0] == 0
    # a session still holding the device gets a clean error, not a crash
    assert sense(run(device, read10(0, 1))) == (0x2, 0x04, 0x00)
    # the name can be used again
    call(svc, "CreateStorediSCSIVolume", name="gone", size_bytes=GIB)


def test_restart_reloads_volumes(catalog: Catalog, tmp_path: Path) -> None:
    t1 = Targets()
    s1 = VolumeService(catalog, tmp_path, t1, AUTH)
    s1.start()
    call(s1, "CreateStorediSCSIVolume", name="keep", size_bytes=GIB)
    dev = lu0(t1, "keep")
    clear_ua(dev)
    assert run(dev, write10(3, 1, flags=0x08), b"\x99" * 512).ok
    before = call(s1, "DescribeVolume", name="keep")
    s1.close()
    assert t1.lookup(f"{AUTH}:keep") is None
    t2 = Targets()
    s2 = VolumeService(catalog, tmp_path, t2, AUTH)
    s2.start()
    dev2 = lu0(t2, "keep")
    clear_ua(dev2)
    assert bytes(run(dev2, read10(3, 1)).data_in) == b"\x99" * 512
    after = call(s2, "DescribeVolume", name="keep")
    assert {**after, "used_bytes": 0} == {**before, "used_bytes": 0}  # type: ignore[dict-item]
    s2.close()


def _insert_row(catalog: Catalog, tmp_path: Path, name: str, status: str, size: int = GIB) -> None:
    catalog.db.execute(
        "insert into volumes (name, type, size_bytes, status, target_iqn, lun, path, created_at,"
        " updated_at) values (?, 'stored', ?, ?, ?, 0, ?, 'x', 'x')",
        [name, size, status, f"{AUTH}:{name}", str(tmp_path / "volumes" / f"{name}.img")])


def test_start_completes_or_cleans_interrupted_creations(catalog: Catalog, tmp_path: Path) -> None:
    vdir = tmp_path / "volumes"
    vdir.mkdir()
    # crashed after the file was made: completed
    _insert_row(catalog, tmp_path, "done", "CREATING")
    with open(vdir / "done.img", "wb") as f:
        f.truncate(GIB)
    # crashed before/while making the file: cleaned
    _insert_row(catalog, tmp_path, "half", "CREATING")
    with open(vdir / "half.img", "wb") as f:
        f.truncate(4096)
    _insert_row(catalog, tmp_path, "none", "CREATING")
    # crashed while deleting: finished
    _insert_row(catalog, tmp_path, "del", "DELETING")
    (vdir / "del.img").write_bytes(b"x")
    # the file of an available volume vanished, another one was cut short
    _insert_row(catalog, tmp_path, "lost", "AVAILABLE")
    _insert_row(catalog, tmp_path, "short", "AVAILABLE")
    with open(vdir / "short.img", "wb") as f:
        f.truncate(GIB // 2)
    targets = Targets()
    s = VolumeService(catalog, tmp_path, targets, AUTH)
    s.start()
    vols = {v["name"]: v["status"] for v in call(s, "ListVolumes")}  # type: ignore[union-attr]
    assert vols == {"done": "AVAILABLE", "lost": "IRRECOVERABLE", "short": "IRRECOVERABLE"}
    assert not (vdir / "half.img").exists() and not (vdir / "del.img").exists()
    assert [t.name for t in targets.targets()] == [f"{AUTH}:done"]
    call(s, "DeleteVolume", name="lost")  # an irrecoverable volume can still be deleted
    s.close()


def test_stray_file_without_row_is_replaced(svc: VolumeService, tmp_path: Path) -> None:
    (tmp_path / "volumes" / "stray.img").write_bytes(b"old data")
    call(svc, "CreateStorediSCSIVolume", name="stray", size_bytes=GIB)
    assert (tmp_path / "volumes" / "stray.img").stat().st_size == GIB


# --- CHAP ---------------------------------------------------------------------------------------
def test_set_volume_chap_applies_live_and_persists(svc: VolumeService, targets: Targets,
                                                   catalog: Catalog, tmp_path: Path) -> None:
    call(svc, "CreateStorediSCSIVolume", name="c", size_bytes=GIB)
    out = call(svc, "SetVolumeChap", name="c", chap_user="alice", chap_secret="0123456789ab",
               mutual_user="target", mutual_secret="ba9876543210xyz",
               initiators=["iqn.1994-05.com.redhat:x", "iqn.1994-05.com.redhat:x"])
    assert out == {"name": "c", "target_iqn": f"{AUTH}:c", "chap_user": "alice",
                   "mutual_user": "target", "initiators": ["iqn.1994-05.com.redhat:x"]}
    assert "secret" not in json.dumps(out)
    auth = targets.lookup(f"{AUTH}:c").auth  # type: ignore[union-attr]
    assert auth.chap is not None and auth.chap.user == "alice"
    assert auth.chap.secret == b"0123456789ab"
    assert auth.mutual is not None and auth.mutual.secret == b"ba9876543210xyz"
    assert auth.allows("iqn.1994-05.com.redhat:x") and not auth.allows("iqn.other")
    svc.close()
    t2 = Targets()
    s2 = VolumeService(catalog, tmp_path, t2, AUTH)
    s2.start()
    auth2 = t2.lookup(f"{AUTH}:c").auth  # type: ignore[union-attr]
    assert auth2 == auth
    # replacing the settings drops the mutual secret and the initiator list
    call(s2, "SetVolumeChap", name="c", chap_user="bob", chap_secret="x" * 16)
    auth3 = t2.lookup(f"{AUTH}:c").auth  # type: ignore[union-attr]
    assert auth3.chap.user == "bob" and auth3.mutual is None  # type: ignore[union-attr]
    assert auth3.allowed_initiators is None
    s2.close()


@pytest.mark.parametrize("args", [
    {"chap_user": "u", "chap_secret": "short"},
    {"chap_user": "u", "chap_secret": "x" * 17},
    {"chap_user": "", "chap_secret": "x" * 12},
    {"chap_user": "a b", "chap_secret": "x" * 12},
    {"chap_user": "u", "chap_secret": "x" * 12, "mutual_user": "t"},
    {"chap_user": "u", "chap_secret": "x" * 12, "mutual_user": "t", "mutual_secret": "x" * 12},
    {"chap_user": "u", "chap_secret": "x" * 12, "mutual_user": "t", "mutual_secret": "y"},
    {"chap_user": "u", "chap_secret": "x" * 12, "initiators": "iqn.x"},
    {"chap_user": "u", "chap_secret": "x" * 12, "initiators": []},
    {"chap_user": "u"},
])
def test_set_volume_chap_validation(svc: VolumeService, targets: Targets,
                                    args: dict[str, object]) -> None:
    call(svc, "CreateStorediSCSIVolume", name="c", size_bytes=GIB)
    with pytest.raises(InvalidRequest):
        call(svc, "SetVolumeChap", name="c", **args)
    assert targets.lookup(f"{AUTH}:c").auth.chap is None  # type: ignore[union-attr]


def test_set_volume_chap_unknown_volume(svc: VolumeService) -> None:
    with pytest.raises(NotFound):
        call(svc, "SetVolumeChap", name="x", chap_user="u", chap_secret="x" * 12)


def test_ops_names(svc: VolumeService) -> None:
    assert sorted(svc.ops()) == ["CreateStorediSCSIVolume", "DeleteVolume", "DescribeVolume",
                                 "ListVolumes", "SetVolumeChap"]


def test_used_bytes_of_unserved_volume(catalog: Catalog, tmp_path: Path) -> None:
    s = VolumeService(catalog, tmp_path, Targets(), AUTH)
    s.start()
    call(s, "CreateStorediSCSIVolume", name="u", size_bytes=GIB)
    s.close()
    with open(tmp_path / "volumes" / "u.img", "r+b") as f:
        f.write(b"\x01" * 65536)
        os.fsync(f.fileno())
    assert call(s, "DescribeVolume", name="u")["used_bytes"] >= 65536  # type: ignore[index]


class _Crash(BaseException):
    pass


def test_crash_before_available_is_completed_on_restart(catalog: Catalog, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    s1 = VolumeService(catalog, tmp_path, Targets(), AUTH)
    s1.start()

    def crash(self: VolumeService, name: str, status: object) -> None:
        raise _Crash()

    monkeypatch.setattr(VolumeService, "_set_status", crash)
    with pytest.raises(_Crash):
        call(s1, "CreateStorediSCSIVolume", name="mid", size_bytes=GIB)
    monkeypatch.undo()
    row = catalog.db.execute("select status from volumes where name = 'mid'").fetchone()
    assert row == ("CREATING",)
    t2 = Targets()
    s2 = VolumeService(catalog, tmp_path, t2, AUTH)
    s2.start()
    assert call(s2, "DescribeVolume", name="mid")["status"] == "AVAILABLE"  # type: ignore[index]
    assert t2.lookup(f"{AUTH}:mid") is not None
    s2.close()


def test_failed_file_creation_leaves_nothing(svc: VolumeService, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(path: object, size: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(service_mod.StoredBackend, "create", staticmethod(boom))
    with pytest.raises(ApplianceError, match="I/O error") as err:
        call(svc, "CreateStorediSCSIVolume", name="x", size_bytes=GIB)
    assert err.value.code == "InternalServerError"
    assert call(svc, "ListVolumes") == []


def test_sixteen_tib_volume_on_this_file_system(svc: VolumeService, targets: Targets,
                                                tmp_path: Path) -> None:
    """AWS's largest stored volume; ext4 cannot hold it in one file, so it takes two."""
    vol = call(svc, "CreateStorediSCSIVolume", name="max", size_bytes=16 * TIB)
    assert vol["size_bytes"] == 16 * TIB  # type: ignore[index]
    assert (tmp_path / "volumes" / "max.img.1").exists()
    dev = lu0(targets, "max")
    clear_ua(dev)
    from tests.volumes.helpers import cdb16, read_capacity16
    last = int.from_bytes(bytes(run(dev, read_capacity16()).data_in)[:8], "big")
    assert last == 16 * TIB // 512 - 1
    assert run(dev, cdb16(0x8A, last, 1), b"\x77" * 512).ok
    assert bytes(run(dev, cdb16(0x88, last, 1)).data_in) == b"\x77" * 512
    call(svc, "DeleteVolume", name="max")
    assert list((tmp_path / "volumes").iterdir()) == []
