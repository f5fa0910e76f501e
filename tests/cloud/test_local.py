"""LocalStore specifics: on-disk layout, persistence, crash leftovers, damage, key safety."""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtl.cloud.clock import ManualClock
from vtl.cloud.local import LocalStore
from vtl.cloud.store import (
    ObjectArchived,
    RestoreState,
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    RestoreTier,
    StorageClass,
    StoreError,
    validate_key,
)


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_layout_and_persistence(tmp_path: Path) -> None:
    root = tmp_path / "store"
    s = LocalStore(root, clock=ManualClock())
    s.put_object("tapes/T1/seg", b"abc", metadata={"barcode": "T1"})
    s.put_object("tapes", b"a file beside the directory")
    names = files_under(root)
    assert "vtl-store.json" in names
    assert "objects/tapes.d/T1.d/seg.m" in names and "objects/tapes.m" in names
    sidecar = json.loads((root / "objects/tapes.d/T1.d/seg.m").read_text())
    assert sidecar["format"] == "vtl-object" and sidecar["version"] == 1
    assert (root / "objects/tapes.d/T1.d" / sidecar["blob"]).read_bytes() == b"abc"
    assert not [n for n in names if n.endswith(".tmp")]
    reopened = LocalStore(root)
    assert reopened.get_object("tapes/T1/seg") == b"abc"
    assert dict(reopened.head_object("tapes/T1/seg").metadata) == {"barcode": "T1"}
    assert [e.key for e in reopened.list_objects() if isinstance(e, ObjectInfo)] == ["tapes", "tapes/T1/seg"]


def test_overwrite_and_delete_leave_no_garbage(tmp_path: Path) -> None:
    root = tmp_path / "store"
    s = LocalStore(root)
    for i in range(3):
        s.put_object("a/b/c", bytes([i]) * 10)
    assert len([n for n in files_under(root) if n.endswith(".b")]) == 1
    s.copy_object("a/b/c", "a/b/c", storage_class=StorageClass.GLACIER)
    assert len([n for n in files_under(root) if n.endswith(".b")]) == 1
    s.delete_object("a/b/c")
    assert files_under(root) == ["vtl-store.json"]
    assert list((root / "objects").iterdir()) == []  # empty directories pruned


def test_copy_shares_the_immutable_blob(tmp_path: Path) -> None:
    s = LocalStore(tmp_path / "store")
    s.put_object("src", b"x" * 1000)
    s.copy_object("src", "dst", storage_class=StorageClass.DEEP_ARCHIVE)
    blob = json.loads((tmp_path / "store/objects/dst.m").read_text())["blob"]
    assert (tmp_path / "store/objects" / blob).stat().st_nlink == 2
    s.put_object("src", b"changed")  # replacing src must not touch dst
    assert s.head_object("dst").size == 1000


def test_crash_leftovers_are_collected(tmp_path: Path) -> None:
    root = tmp_path / "store"
    s = LocalStore(root)
    s.put_object("k/obj", b"keep me")
    leftovers = [root / "objects/k.d/obj.0123456789abcdef0123456789abcdef.b", root / "objects/k.d/.deadbeef.tmp"]
    for p in leftovers:
        p.write_bytes(b"half written")
    assert s.collect_garbage() == 0  # too young: could be an upload in progress
    old = time.time() - 7200
    for p in leftovers:
        os.utime(p, (old, old))
    assert s.collect_garbage() == 2
    assert s.get_object("k/obj") == b"keep me"
    assert [n for n in files_under(root) if n.endswith((".b", ".tmp"))] == [
        n for n in files_under(root) if n.endswith(".b")
    ]


def test_damaged_blob_is_detected(tmp_path: Path) -> None:
    root = tmp_path / "store"
    s = LocalStore(root)
    s.put_object("k", b"precious data")
    blob = root / "objects" / json.loads((root / "objects/k.m").read_text())["blob"]
    blob.write_bytes(b"Precious data")
    with pytest.raises(StoreError) as exc:
        s.get_object("k")
    assert exc.value.code == "BadDigest"
    blob.write_bytes(b"short")
    with pytest.raises(StoreError) as exc:
        s.get_object("k")
    assert exc.value.code == "CorruptStore"


def test_foreign_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "vtl-store.json").write_text(json.dumps({"format": "something-else", "version": 9}))
    with pytest.raises(StoreError) as exc:
        LocalStore(tmp_path)
    assert exc.value.code == "CorruptStore"


def test_long_component_rejected(tmp_path: Path) -> None:
    s = LocalStore(tmp_path / "store")
    with pytest.raises(InvalidKey):
        s.put_object("a/" + "x" * 221, b"x")
    s.put_object("a/" + "x" * 220, b"ok")


def test_restore_windows_follow_s3_tiers(tmp_path: Path) -> None:
    clock = ManualClock()
    s = LocalStore(tmp_path / "store", clock=clock)
    s.put_object("g", b"1", storage_class=StorageClass.GLACIER)
    s.put_object("d", b"2", storage_class=StorageClass.DEEP_ARCHIVE)
    s.restore_object("g", days=1, tier=RestoreTier.EXPEDITED)
    s.restore_object("d", days=1, tier=RestoreTier.STANDARD)
    g_ready = s.head_object("g").restore.ready_at  # type: ignore[union-attr]
    d_ready = s.head_object("d").restore.ready_at  # type: ignore[union-attr]
    assert g_ready is not None and d_ready is not None
    assert timedelta(minutes=1) <= g_ready - clock.now() <= timedelta(minutes=5)
    assert timedelta(hours=9) <= d_ready - clock.now() <= timedelta(hours=12)
    with pytest.raises(StoreError) as exc:
        s.put_object("d2", b"3", storage_class=StorageClass.DEEP_ARCHIVE)
        s.restore_object("d2", days=1, tier=RestoreTier.EXPEDITED)
    assert exc.value.code == "InvalidArgument"


def test_concurrent_writers_same_key(tmp_path: Path) -> None:
    root = tmp_path / "store"
    s = LocalStore(root, durable=False)
    payloads = [bytes([i]) * 50_000 for i in range(8)]
    errors: list[BaseException] = []

    def writer(data: bytes) -> None:
        try:
            for _ in range(10):
                s.put_object("hot/key", data)
                got = s.get_object("hot/key")
                assert got in payloads
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert s.get_object("hot/key") in payloads
    assert len([n for n in files_under(root) if n.endswith(".b")]) == 1  # no orphan blobs


def test_delete_races_with_put_in_same_directory(tmp_path: Path) -> None:
    s = LocalStore(tmp_path / "store", durable=False)
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            while not stop.is_set():
                s.put_object("d/e/x", b"x")
                s.delete_object("d/e/x")
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    t = threading.Thread(target=churn)
    t.start()
    try:
        for i in range(80):
            s.put_object(f"d/e/y{i % 3}", b"y")
    finally:
        stop.set()
        t.join()
    assert not errors
    assert sorted(e.key for e in s.list_objects("d/") if isinstance(e, ObjectInfo)) == ["d/e/y0", "d/e/y1", "d/e/y2"]


# ------------------------------------------------------------------------- key safety (hypothesis)

_key_alphabet = st.sampled_from(list("ab/.\\\x00\n é~-_") + ["..", "/..", "../", "\udcff"])
_keys = st.lists(_key_alphabet, min_size=0, max_size=12).map("".join) | st.text(max_size=40)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=_keys)
def test_any_key_is_stored_inside_root_or_rejected(tmp_path: Path, key: str) -> None:
    root = tmp_path / "h"
    s = LocalStore(root, durable=False)
    try:
        validate_key(key)
    except InvalidKey:
        with pytest.raises(InvalidKey):
            s.put_object(key, b"v")
        return
    try:
        s.put_object(key, b"v")
    except InvalidKey:
        assert any(len(part.encode()) > 220 for part in key.split("/"))
        return
    try:
        assert s.get_object(key) == b"v"
        assert key in [e.key for e in s.list_objects() if isinstance(e, ObjectInfo)]
        resolved_root = root.resolve()
        for p in root.rglob("*"):
            assert resolved_root in p.resolve().parents or p.resolve() == resolved_root
        assert not list(tmp_path.glob("*.m"))  # nothing escaped next to the root
    finally:
        s.delete_object(key)
    with pytest.raises(ObjectNotFound):
        s.head_object(key)
    assert list((root / "objects").iterdir()) == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=st.sets(st.text(alphabet="ab/-0é", min_size=1, max_size=6), max_size=8))
def test_listing_matches_a_sorted_model(tmp_path: Path, keys: set[str]) -> None:
    """Whatever the keys, the listing equals S3's: sorted, and delimiter roll-ups by model."""
    import shutil

    root = tmp_path / "m"
    shutil.rmtree(root, ignore_errors=True)
    s = LocalStore(root, durable=False)
    valid = set()
    for k in keys:
        try:
            validate_key(k)
        except InvalidKey:
            continue
        s.put_object(k, b"")
        valid.add(k)
    for prefix in ["", "a", "a/", "b/"]:
        expected_flat = sorted(k for k in valid if k.startswith(prefix))
        assert [e.key for e in s.list_objects(prefix) if isinstance(e, ObjectInfo)] == expected_flat
        model: dict[str, str] = {}
        for k in expected_flat:
            cut = k.find("/", len(prefix))
            model[k if cut < 0 else k[: cut + 1]] = "obj" if cut < 0 else "pre"
        got = [(e.key, "obj") if isinstance(e, ObjectInfo) else (e.prefix, "pre") for e in s.list_objects(prefix, "/")]
        assert got == sorted(model.items())


def test_restore_expires_back_to_archived(tmp_path: Path) -> None:
    """moto never expires restored copies, so this part of the model is checked here only."""
    clock = ManualClock()
    s = LocalStore(tmp_path / "store", clock=clock)
    s.put_object("t", b"x", storage_class=StorageClass.GLACIER)
    s.restore_object("t", days=1)
    ready = s.head_object("t").restore.ready_at  # type: ignore[union-attr]
    assert ready is not None
    clock.advance(ready - clock.now() - timedelta(seconds=1))
    assert s.head_object("t").restore.state is RestoreState.ONGOING  # type: ignore[union-attr]
    clock.advance(2)
    assert s.get_object("t") == b"x"
    assert s.restore_object("t", days=3) is False  # extends the expiry
    clock.advance(timedelta(days=2, hours=12))
    assert s.get_object("t") == b"x"
    clock.advance(timedelta(days=1))
    assert s.head_object("t").restore is None
    with pytest.raises(ObjectArchived):
        s.get_object("t")


_CRASHER = """
import os, sys
from pathlib import Path
import vtl.cloud.local as local

point = sys.argv[2]
real_replace = os.replace

def crashing_replace(src, dst):
    if str(dst).endswith(".m"):
        if point == "after-rename":
            real_replace(src, dst)
        os._exit(9)  # power cut: no cleanup, no finally
    real_replace(src, dst)

local.os.replace = crashing_replace
store = local.LocalStore(Path(sys.argv[1]))
store.put_object("tapes/T1/seg", b"new version")
"""


@pytest.mark.parametrize(("point", "survivor"), [("before-rename", b"old version"), ("after-rename", b"new version")])
def test_crash_during_put_keeps_an_intact_object(tmp_path: Path, point: str, survivor: bytes) -> None:
    import subprocess
    import sys

    root = tmp_path / "store"
    LocalStore(root).put_object("tapes/T1/seg", b"old version")
    child = subprocess.run(
        [sys.executable, "-c", _CRASHER, str(root), point],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        timeout=60,
    )
    assert child.returncode == 9, child.stderr.decode()
    reopened = LocalStore(root)
    assert reopened.get_object("tapes/T1/seg") == survivor  # verified against its checksum too
    assert reopened.head_object("tapes/T1/seg").size == len(survivor)
    blobs = [p for p in root.rglob("*.b")]
    assert len(blobs) == 2  # the loser is an orphan, nothing is half-visible
    assert reopened.collect_garbage(older_than=timedelta(0)) >= 1
    assert len(list(root.rglob("*.b"))) == 1 and not list(root.rglob("*.tmp"))
    assert reopened.get_object("tapes/T1/seg") == survivor
