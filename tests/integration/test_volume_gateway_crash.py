"""Crash tests of the volume gateway: ``kill -9`` of ``vtl serve`` during a snapshot upload and
during cached-volume writes, then a restart on the same data directory.

What must hold: nothing acknowledged as durable (a write followed by a GOOD SYNCHRONIZE CACHE)
is lost, and a snapshot either completes (bit for bit the point in time it was taken at) or is
absent, never listed with a missing manifest nor present in the store without its row.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from tests.integration.test_volume_gateway import (
    MiB, cli_json, create, read_mib, session, sync_cache, wait_status, write_mib,
)
from tests.support.appliance import ApplianceProcess
from tests.support.libiscsi import LibiscsiError, library_available
from volumes.chunks import ChunkStore
from vtl.cloud.local import LocalStore

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not library_available(), reason="libiscsi is not installed"),
]


def manifests(data_dir: Path) -> list[str]:
    return ChunkStore(LocalStore(data_dir / "store")).list_manifests()


def snapshot_rows(app: ApplianceProcess) -> dict[str, dict]:
    return {s["snapshot_id"]: s for s in cli_json(app, "snapshot", "list")}


def test_kill9_during_snapshot_upload(tmp_path: Path) -> None:
    rnd = random.Random(9)
    app = ApplianceProcess(tmp_path / "data", extra_args=["--workers", "0"]).start()
    try:
        vol = create(app, "crashy", "--size", "1GiB")
        cli_json(app, "volume", "schedule", "crashy", "--every", "8h", "--start-hour", "2")
        image = {i: rnd.randbytes(MiB) for i in range(160)}
        with session(app, vol) as s:
            for i, chunk in image.items():
                write_mib(s, i, chunk)
            sync_cache(s)
            reply = app.call("CreateSnapshot", name="crashy", description="crash")
            assert reply["ok"], reply
            sid = reply["result"]["snapshot_id"]
            # written after the point in time: must not be in the snapshot (copy-on-write)
            after = {i: rnd.randbytes(MiB) for i in (0, 1, 150)}
            for i, chunk in after.items():
                write_mib(s, i, chunk)
            sync_cache(s)
            seen = None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                seen = app.call("DescribeSnapshots", snapshot_id=sid)["result"]
                if seen["status"] != "PENDING" or seen["progress"] > 5:
                    break
                time.sleep(0.005)
        app.kill9()
        assert seen is not None
    finally:
        if app.running:
            app.kill()
    app.restart()
    try:
        sched = cli_json(app, "volume", "schedule", "crashy")  # persisted, reloaded at start
        assert (sched["every_hours"], sched["start_hour"]) == (8, 2), sched
        assert sched["next_run_at"] and int(sched["next_run_at"][11:13]) in (2, 10, 18)
        deadline = time.monotonic() + 60
        while True:
            rows = snapshot_rows(app)
            if sid not in rows or rows[sid]["status"] == "COMPLETED":
                break
            assert rows[sid]["status"] == "PENDING", rows[sid]
            assert time.monotonic() < deadline, rows[sid]
            time.sleep(0.1)
        # never half-visible: a manifest in the store has a COMPLETED row, and vice versa
        stored = set(manifests(app.data_dir))
        completed = {k for k, v in snapshot_rows(app).items() if v["status"] == "COMPLETED"}
        assert stored == completed, (stored, completed)
        # the acknowledged writes are on the volume
        with session(app, vol) as s:
            for i, chunk in {**image, **after}.items():
                assert read_mib(s, i) == chunk, f"MiB {i} of the volume"
        if sid in completed:  # resumed after the restart: exactly the point in time
            rest = create(app, "restored", "--from-snapshot", sid)
            with session(app, rest) as s:
                for i, chunk in image.items():
                    assert read_mib(s, i) == chunk, f"MiB {i} of the snapshot"
        # either way the volume snapshots again afterwards
        again = cli_json(app, "volume", "snapshot", "crashy", "--wait")
        assert again["status"] == "COMPLETED"
    finally:
        assert app.stop() == 0, app.log_tail()


def test_kill9_during_cached_writes(tmp_path: Path) -> None:
    """A writer flushes after every batch; kill -9 mid-stream; every batch acknowledged by a
    GOOD SYNCHRONIZE CACHE reads back after the restart, and reaches the store."""
    app = ApplianceProcess(tmp_path / "data", extra_args=["--workers", "0"]).start()
    acked: list[tuple[int, bytes]] = []
    stop = threading.Event()
    errors: list[BaseException] = []
    try:
        vol = create(app, "cw", "--type", "cached", "--size", "1GiB", "--cache-size", "16MiB",
                     "--upload-buffer-size", "48MiB")

        def writer() -> None:
            rnd = random.Random(10)
            try:
                with session(app, vol) as s:
                    k = 0
                    while not stop.is_set() and k < 400:
                        batch = [(k * 2 + j, rnd.randbytes(MiB)) for j in range(2)]
                        for i, chunk in batch:
                            write_mib(s, i, chunk)
                        sync_cache(s)
                        acked.extend(batch)
                        k += 1
            except (LibiscsiError, OSError, Exception) as exc:  # the kill cuts the session
                errors.append(exc)

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        deadline = time.monotonic() + 60
        while len(acked) < 40 and time.monotonic() < deadline and t.is_alive():
            time.sleep(0.01)
        assert len(acked) >= 40, errors
        app.kill9()
        stop.set()
        t.join(30)
        assert not t.is_alive()
    finally:
        if app.running:
            app.kill()
    expected = dict(acked)  # every batch writes new MiB indexes
    app.restart()
    try:
        with session(app, vol) as s:
            for i, chunk in sorted(expected.items()):
                assert read_mib(s, i) == chunk, f"MiB {i} lost"
        # the journal's dirty chunks resume uploading; once drained, a snapshot of the
        # volume restored elsewhere holds the same bytes
        deadline = time.monotonic() + 60
        while cli_json(app, "volume", "show", "cw")["upload_buffer_used_bytes"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        snap = cli_json(app, "volume", "snapshot", "cw", "--wait")
        rest = create(app, "cw-r", "--from-snapshot", snap["snapshot_id"])
        with session(app, rest) as s:
            for i, chunk in sorted(expected.items())[:20]:
                assert read_mib(s, i) == chunk, f"MiB {i} of the restored copy"
        wait_status(app, "cw-r", "AVAILABLE")
    finally:
        assert app.stop() == 0, app.log_tail()


def test_kill9_during_restore(tmp_path: Path) -> None:
    """A volume restoring from a snapshot is killed mid-fill: after the restart it is still
    served (RESTORING, then AVAILABLE) and holds the snapshot bit for bit, plus what was
    written to it and flushed before the kill."""
    rnd = random.Random(11)
    app = ApplianceProcess(tmp_path / "data", extra_args=["--workers", "0"]).start()
    try:
        vol = create(app, "origin", "--size", "1GiB")
        image = {i * 5: rnd.randbytes(MiB) for i in range(120)}
        with session(app, vol) as s:
            for i, chunk in image.items():
                write_mib(s, i, chunk)
            sync_cache(s)
        snap = cli_json(app, "volume", "snapshot", "origin", "--wait")
        rest = create(app, "copy", "--from-snapshot", snap["snapshot_id"])
        mine = rnd.randbytes(MiB)
        with session(app, rest) as s:
            write_mib(s, 3, mine)  # a chunk of zeros in the snapshot, overwritten
            sync_cache(s)
        app.kill9()
    finally:
        if app.running:
            app.kill()
    app.restart()
    try:
        assert cli_json(app, "volume", "show", "copy")["status"] in ("RESTORING", "AVAILABLE")
        with session(app, rest) as s:
            assert read_mib(s, 3) == mine
            for i, chunk in image.items():
                assert read_mib(s, i) == chunk, f"MiB {i}"
        wait_status(app, "copy", "AVAILABLE")
    finally:
        assert app.stop() == 0, app.log_tail()
