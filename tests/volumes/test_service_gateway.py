"""VolumeService with an object store (LocalStore in tmp_path): cached volumes, limits,
snapshots as jobs on an event loop, schedules, restore and clone, restart of PENDING jobs."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from catalog import volumes as vq
from catalog.db import Catalog, open_catalog
from volumes import service as service_mod
from volumes.chunks import CHUNK_BYTES
from volumes.service import GIB, TIB, VolumeService
from volumes.snapservice import schedule_hours, validate_schedule
from vtl.cloud.local import LocalStore
from vtl.errors import Conflict, InvalidRequest, LimitExceeded, NotFound
from vtl.iscsi.target import Targets

AUTH = "iqn.2025-01.org.vtl.test"
MiB = 1 << 20


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    cat = open_catalog(tmp_path / "catalog.db")
    yield cat
    cat.close()


def make(catalog: Catalog, tmp_path: Path) -> VolumeService:
    store = LocalStore(tmp_path / "store")
    return VolumeService(catalog, tmp_path, Targets(), AUTH, store=store,
                         cache_bytes=16 * MiB, upload_buffer_bytes=16 * MiB)


def call(svc: VolumeService, op: str, **args: object) -> Any:
    return svc.ops()[op](dict(args))


def backend(svc: VolumeService, name: str) -> Any:
    return svc._live[name].backend


async def wait_for(pred: Any, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline
        await asyncio.sleep(0.02)


def test_ops_with_a_store(catalog: Catalog, tmp_path: Path) -> None:
    svc = make(catalog, tmp_path)
    assert sorted(svc.ops()) == sorted([
        "CloneVolume", "CreateCachediSCSIVolume", "CreateSnapshot", "CreateStorediSCSIVolume",
        "DeleteSnapshot", "DeleteSnapshotSchedule", "DeleteVolume", "DescribeEBSExport",
        "DescribeSnapshotSchedule", "ExportSnapshotToEBS",
        "DescribeSnapshots", "DescribeVolume", "ListSnapshots", "ListVolumeRecoveryPoints",
        "ListVolumes", "SetVolumeChap", "UpdateSnapshotSchedule"])


def test_cached_limits(catalog: Catalog, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    svc = make(catalog, tmp_path)
    svc.start()
    try:
        vol = call(svc, "CreateCachediSCSIVolume", name="c32", size_bytes=32 * TIB)
        assert vol["type"] == "cached" and vol["status"] == "AVAILABLE"
        assert vol["cache_bytes"] == 16 * MiB and vol["upload_buffer_bytes"] == 16 * MiB
        for bad in (32 * TIB + 512, GIB - 512, 0, "1"):
            with pytest.raises(InvalidRequest):
                call(svc, "CreateCachediSCSIVolume", name="x", size_bytes=bad)
        with pytest.raises(InvalidRequest, match="cache_bytes"):
            call(svc, "CreateCachediSCSIVolume", name="x", size_bytes=GIB, cache_bytes=MiB)
        with pytest.raises(InvalidRequest, match="CreateCachediSCSIVolume"):
            call(svc, "CreateStorediSCSIVolume", name="x", size_bytes=GIB, type="cached")
        # the totals are per type: 1,024 TiB cached, 512 TiB stored
        monkeypatch.setattr(service_mod, "MAX_TOTAL_CACHED_BYTES", 33 * TIB)
        with pytest.raises(LimitExceeded, match="cached"):
            call(svc, "CreateCachediSCSIVolume", name="c2", size_bytes=2 * TIB)
        call(svc, "CreateStorediSCSIVolume", name="s", size_bytes=2 * TIB)
        call(svc, "CreateCachediSCSIVolume", name="c1", size_bytes=TIB)
        listed = {v["name"]: v for v in call(svc, "ListVolumes")}
        assert listed["s"]["snapshot_schedule"]["every_hours"] == 24  # stored: daily
        assert "snapshot_schedule" not in listed["c1"]
        call(svc, "DeleteVolume", name="c32")
        assert not (tmp_path / "volumes" / "c32.cached").exists()
    finally:
        svc.close()


def test_schedule_validation() -> None:
    assert schedule_hours(24, 3) == [3]
    assert schedule_hours(8, 3) == [3, 11, 19]
    assert schedule_hours(12, 20) == [8, 20]
    assert schedule_hours(1, 5) == list(range(24))
    for every, start in ((3, 0), (0, 0), (24, 24), (24, -1), (True, 0), (24, "3")):
        with pytest.raises(InvalidRequest):
            validate_schedule(every, start)


def test_snapshot_restore_and_restart(catalog: Catalog, tmp_path: Path) -> None:
    """The whole path in one event loop: snapshot job, restore, clone, delete with GC, and a
    PENDING snapshot resumed by a new service on the same data."""
    data = os.urandom(3 * CHUNK_BYTES)

    async def first() -> tuple[str, str]:
        svc = make(catalog, tmp_path)
        svc.start()
        try:
            call(svc, "CreateStorediSCSIVolume", name="v", size_bytes=GIB)
            backend(svc, "v").write(5 * CHUNK_BYTES, data)
            snap = call(svc, "CreateSnapshot", name="v", description="one")
            assert snap["status"] == "PENDING" and snap["snapshot_id"].startswith("snap-")
            backend(svc, "v").write(5 * CHUNK_BYTES, bytes(4096))  # after the point in time
            sid = snap["snapshot_id"]
            await wait_for(lambda: call(svc, "DescribeSnapshots", snapshot_id=sid)["status"]
                           == "COMPLETED")
            done = call(svc, "DescribeSnapshots", snapshot_id=sid)
            assert done["uploaded_chunks"] == 3 and done["progress"] == 100.0
            with pytest.raises(NotFound):
                call(svc, "DeleteSnapshot", snapshot_id="snap-missing")
            # restore into a stored and a cached volume: readable at once
            r = call(svc, "CreateStorediSCSIVolume", name="r", snapshot_id=sid)
            assert r["status"] == "RESTORING" and r["source_snapshot"] == sid
            assert backend(svc, "r").read(5 * CHUNK_BYTES, len(data)) == data
            c = call(svc, "CreateCachediSCSIVolume", name="c", snapshot_id=sid,
                     size_bytes=2 * GIB)
            assert c["status"] == "BOOTSTRAPPING" and c["size_bytes"] == 2 * GIB
            assert backend(svc, "c").read(5 * CHUNK_BYTES, len(data)) == data
            await wait_for(lambda: call(svc, "DescribeVolume", name="r")["status"]
                           == "AVAILABLE")
            await wait_for(lambda: call(svc, "DescribeVolume", name="c")["status"]
                           == "AVAILABLE")
            clone = call(svc, "CloneVolume", name="v", new_name="k")
            assert backend(svc, "k").read(5 * CHUNK_BYTES, len(data)) == data
            assert clone["source_snapshot"] == sid
            # a second snapshot left PENDING: the service closes before its job runs
            pending = call(svc, "CreateSnapshot", name="v", description="two")
            return sid, pending["snapshot_id"]
        finally:
            svc.close()

    sid, pending = asyncio.run(first())
    row = vq.get_snapshot(catalog.db, pending)
    assert row is not None and row["status"] == "PENDING"

    async def second() -> None:
        svc = make(catalog, tmp_path)
        svc.start()
        try:
            await wait_for(lambda: call(svc, "DescribeSnapshots", snapshot_id=pending)["status"]
                           == "COMPLETED")
            listed = call(svc, "ListSnapshots", name="v")["snapshots"]
            assert [s["snapshot_id"] for s in listed] == [sid, pending]
            r2 = call(svc, "CreateStorediSCSIVolume", name="r2", snapshot_id=pending)
            got = backend(svc, "r2").read(5 * CHUNK_BYTES, len(data))
            assert got == bytes(4096) + data[4096:]
            assert call(svc, "DeleteSnapshot", snapshot_id=sid)["status"] == "DELETING"
            await wait_for(lambda: vq.get_snapshot(catalog.db, sid) is None)
            with pytest.raises(NotFound):
                call(svc, "DescribeSnapshots", snapshot_id=sid)
        finally:
            svc.close()

    asyncio.run(second())


def test_snapshot_needs_the_event_loop_and_a_served_volume(catalog: Catalog,
                                                           tmp_path: Path) -> None:
    svc = make(catalog, tmp_path)
    svc.start()
    try:
        with pytest.raises(NotFound):
            call(svc, "CreateSnapshot", name="nope")
        call(svc, "CreateStorediSCSIVolume", name="v", size_bytes=GIB)
        with pytest.raises(Conflict, match="event loop"):
            call(svc, "CreateSnapshot", name="v")
        with pytest.raises(InvalidRequest):
            call(svc, "CreateSnapshot", name="v", description="x" * 256)
        with pytest.raises(InvalidRequest):
            call(svc, "UpdateSnapshotSchedule", name="v", every_hours=5, start_hour=0)
        out = call(svc, "UpdateSnapshotSchedule", name="v", every_hours=12, start_hour=6)
        assert out["every_hours"] == 12 and out["start_hour"] == 6
        assert call(svc, "DeleteSnapshotSchedule", name="v")["every_hours"] is None
        with pytest.raises(Conflict, match="no completed snapshot"):
            call(svc, "CloneVolume", name="v", new_name="w")
    finally:
        svc.close()


def test_chunk_refs_for_garbage_collection_leave_the_loops_catalog_handle_alone(
        catalog: Catalog, tmp_path: Path) -> None:
    """live_chunk_refs runs in a pool thread while the event loop keeps using the service's
    catalog handle: it reads through a handle of its own (sharing one connection across
    threads interleaved sqlite-utils savepoints: "no such savepoint", a failed DeleteSnapshot)."""
    import concurrent.futures

    svc = make(catalog, tmp_path)
    svc.start()
    try:
        call(svc, "CreateStorediSCSIVolume", name="v", size_bytes=GIB)
        loop_db = svc.catalog.db

        class LoopOnly:
            def __getattr__(self, name: str) -> Any:
                raise AssertionError(f"catalog.db.{name} used from a pool thread")

        svc.catalog.db = LoopOnly()  # type: ignore[assignment]
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                refs = pool.submit(svc.live_chunk_refs).result(30)
        finally:
            svc.catalog.db = loop_db
        assert isinstance(refs, set)
    finally:
        svc.close()
