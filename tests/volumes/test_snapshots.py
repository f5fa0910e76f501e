"""Snapshots of stored volumes (volumes/snapshots.py): point in time while writes go on,
incremental, crash-safe (kill -9 included), restore lazily into a new volume, GC of shared chunks.

Every image check is bit for bit against a copy taken at the moment the snapshot was begun.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cloud.conftest import _fake_aws_env, boto_session, moto_s3  # noqa: F401 (fixtures)
from tests.volumes.test_chunks import Probe, backing  # noqa: F401 (fixture)
from vtl.cloud.clock import ManualClock
from vtl.cloud.local import LocalStore
from vtl.cloud.store import ObjectNotFound, ObjectStore, StoreUnavailable
from volumes.chunks import CHUNK_BYTES, ChunkStore, Manifest
from volumes.snapshots import (RestoringBackend, SnapshotBusy, SnapshotError, SnapshotTracker,
                               UploadStopped, delete_snapshot, iter_chunks, live_refs,
                               manifest_from_refs, new_snapshot_id, restoring, state_refs)
from volumes.stored import StoredBackend

ROOT = Path(__file__).resolve().parents[2]
SIZE = 6 * CHUNK_BYTES + 8192  # the last chunk is short
NCHUNKS = 7
T0 = "2026-11-25T23:00:00+00:00"


@pytest.fixture
def local(tmp_path: Path) -> ObjectStore:
    return LocalStore(tmp_path / "store", clock=ManualClock())


def chunk_objects(store: ObjectStore) -> tuple[int, int]:
    """(count, bytes) of chunk objects in the store."""
    infos = [e for e in store.list_objects("vol/chunks/")]
    return len(infos), sum(e.size for e in infos)  # type: ignore[union-attr]


def rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def new_volume(path: Path, size: int = SIZE) -> StoredBackend:
    return StoredBackend.create(path, size)


def image(backend: Any) -> bytes:
    return backend.read(0, backend.size)


def restore_eager(chunks: ChunkStore, m: Manifest) -> bytes:
    return b"".join(data for _, data in iter_chunks(chunks, m))


def fill_random(vol: Any, seed: int, chunks: Iterator[int] | list[int]) -> None:
    for i in chunks:
        n = min(CHUNK_BYTES, vol.size - i * CHUNK_BYTES)
        vol.write(i * CHUNK_BYTES, rnd(n, seed * 1000 + i))


def snapshot(tr: SnapshotTracker, chunks: ChunkStore, sid: str, **kw: Any) -> Manifest:
    tr.begin_snapshot(sid, volume="vol1", created_at=T0, description="test")
    return tr.upload(chunks, **kw)


# --- point in time, incremental ------------------------------------------------------------------


def test_snapshot_restores_bit_exact_and_second_is_incremental(backing: ObjectStore,
                                                                tmp_path: Path) -> None:
    probe = Probe(backing)
    chunks = ChunkStore(probe, prefix="vol/")  # type: ignore[arg-type]
    tr = SnapshotTracker(new_volume(tmp_path / "v.img"), tmp_path / "v.snap")
    fill_random(tr, 1, [0, 1, 3, 6])  # 2, 4, 5 stay holes
    tr.write(5 * CHUNK_BYTES + 100, b"\x00" * 10)  # written zeros: still a zero chunk
    at_snap = image(tr)
    m1 = snapshot(tr, chunks, "snap-1")
    assert chunks.list_manifests() == ["snap-1"]
    assert [r is None for r in m1.chunks] == [False, False, True, False, True, True, False]
    assert chunk_objects(backing) == (4, 3 * CHUNK_BYTES + 8192)
    assert restore_eager(chunks, m1) == at_snap

    # change k = 3 chunks (one of them the short tail), rewrite one with identical bytes
    fill_random(tr, 2, [1, 4, 6])
    tr.write(0, rnd(CHUNK_BYTES, 1000 * 1 + 0))
    assert tr.changed_chunks == 4
    before = chunk_objects(backing)
    puts = probe.chunk_puts
    at_snap2 = image(tr)
    m2 = snapshot(tr, chunks, "snap-2")
    after = chunk_objects(backing)
    assert after[0] - before[0] == 3
    assert after[1] - before[1] == 2 * CHUNK_BYTES + 8192
    assert probe.chunk_puts - puts == 3
    assert restore_eager(chunks, m2) == at_snap2
    assert restore_eager(chunks, chunks.get_manifest("snap-1")) == at_snap  # still intact
    assert m2.chunks[0] == m1.chunks[0] and m2.chunks[3] == m1.chunks[3]

    # nothing changed: a third snapshot uploads nothing and names the same chunks
    puts = probe.chunk_puts
    m3 = snapshot(tr, chunks, "snap-3")
    assert probe.chunk_puts == puts and list(m3.chunks) == list(m2.chunks)
    tr.close()


def test_writes_after_begin_do_not_leak_into_the_snapshot(local: ObjectStore, tmp_path: Path) -> None:
    chunks = ChunkStore(local, prefix="vol/")
    tr = SnapshotTracker(new_volume(tmp_path / "v.img"), tmp_path / "v.snap")
    fill_random(tr, 1, range(NCHUNKS))
    snapshot(tr, chunks, "snap-0")
    fill_random(tr, 2, [1, 2, 5])
    frozen = image(tr)
    tr.begin_snapshot("snap-1", volume="vol1", created_at=T0)
    # overwrite frozen chunks (partly and whole), an unfrozen one, discard one: all after begin
    tr.write(1 * CHUNK_BYTES + 10, b"A" * 5000)
    tr.write(2 * CHUNK_BYTES, rnd(CHUNK_BYTES, 77))
    tr.write(2 * CHUNK_BYTES + 4096, b"B" * 4096)  # second write: copied aside once only
    tr.write(3 * CHUNK_BYTES, b"C" * 512)
    tr.discard(5 * CHUNK_BYTES, CHUNK_BYTES)
    cow = sorted(int(p.name) for p in (tmp_path / "v.snap" / "pending" / "cow").iterdir())
    assert cow == [1, 2, 5]
    with pytest.raises(SnapshotBusy):
        tr.begin_snapshot("snap-x", volume="vol1", created_at=T0)
    now = image(tr)
    m = tr.upload(chunks)
    assert restore_eager(chunks, m) == frozen
    assert not (tmp_path / "v.snap" / "pending").exists()
    # the writes after begin belong to the next snapshot
    assert tr.changed_chunks == 4
    m2 = snapshot(tr, chunks, "snap-2")
    assert restore_eager(chunks, m2) == now
    tr.close()


def test_concurrent_writers_during_upload(local: ObjectStore, tmp_path: Path) -> None:
    probe = Probe(local)
    probe.delay = 0.01
    chunks = ChunkStore(probe, prefix="vol/")  # type: ignore[arg-type]
    size = 24 * CHUNK_BYTES
    tr = SnapshotTracker(new_volume(tmp_path / "v.img", size), tmp_path / "v.snap")
    fill_random(tr, 1, range(24))
    frozen = image(tr)
    tr.begin_snapshot("snap-1", volume="vol1", created_at=T0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        r = random.Random(seed)
        try:
            while not stop.is_set():
                off = r.randrange(0, size - 65536) // 512 * 512
                tr.write(off, r.randbytes(r.choice([512, 4096, 65536])))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    try:
        m = tr.upload(chunks, workers=4)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    assert restore_eager(chunks, m) == frozen
    after = image(tr)
    assert after != frozen
    m2 = snapshot(tr, chunks, "snap-2")
    assert restore_eager(chunks, m2) == after
    tr.close()


# --- crash safety ------------------------------------------------------------------------------


def kill_tracker(tr: SnapshotTracker) -> None:
    """Drop a tracker as a killed process would: no close, no final fsync (fds released)."""
    for fd in (tr._dirty_fd, tr._done_fd):
        if fd is not None and fd >= 0:
            os.close(fd)
    tr.inner.close()  # type: ignore[attr-defined]


def test_failed_upload_resumes_after_reopen_and_manifest_absent_until_done(
        local: ObjectStore, tmp_path: Path) -> None:
    probe = Probe(local)
    chunks = ChunkStore(probe, prefix="vol/")  # type: ignore[arg-type]
    vol, state = tmp_path / "v.img", tmp_path / "v.snap"
    tr = SnapshotTracker(new_volume(vol), state)
    fill_random(tr, 1, range(NCHUNKS))
    frozen = image(tr)
    tr.begin_snapshot("snap-1", volume="vol1", created_at=T0, description="nightly")
    probe.fail_after = 3
    seen: list[tuple[int, int]] = []
    with pytest.raises(StoreUnavailable):
        tr.upload(chunks, workers=1, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 7), (2, 7), (3, 7)]
    assert chunks.list_manifests() == []
    tr.write(0, b"X" * CHUNK_BYTES)  # uploaded already: no copy needed
    tr.write(5 * CHUNK_BYTES + 1, b"Y")  # not uploaded yet: copied aside
    kill_tracker(tr)
    with open(state / "pending" / "done.log", "ab") as f:
        f.write(b"\x00\x00\x00\x06" + bytes(19))  # a torn record: ignored, cut off
    (state / "pending" / "cow" / "6.tmp").write_bytes(b"half")  # a copy never finished

    probe.fail_after = None
    tr = SnapshotTracker(StoredBackend(vol), state)
    pending = tr.pending
    assert pending is not None and (pending.snapshot_id, pending.chunks_done) == ("snap-1", 3)
    assert pending.description == "nightly"
    assert tr.changed_chunks == 2  # trusted after a process crash on the same boot
    assert (state / "pending" / "done.log").stat().st_size == 3 * 40
    assert not (state / "pending" / "cow" / "6.tmp").exists()
    puts = probe.chunk_puts
    m = tr.upload(chunks)
    assert probe.chunk_puts - puts == 4
    assert chunks.list_manifests() == ["snap-1"]
    assert (m.description, m.created_at) == ("nightly", T0)
    assert restore_eager(chunks, m) == frozen
    tr.close()


def test_crash_after_manifest_put_completes_on_resume(local: ObjectStore, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = ChunkStore(local, prefix="vol/")
    vol, state = tmp_path / "v.img", tmp_path / "v.snap"
    tr = SnapshotTracker(new_volume(vol), state)
    fill_random(tr, 1, [0, 2])
    frozen = image(tr)
    tr.begin_snapshot("snap-1", volume="vol1", created_at=T0)

    def boom(self: SnapshotTracker, m: Manifest) -> None:
        raise OSError("killed")

    monkeypatch.setattr(SnapshotTracker, "_finish", boom)
    with pytest.raises(OSError):
        tr.upload(chunks)
    monkeypatch.undo()
    kill_tracker(tr)
    tr = SnapshotTracker(StoredBackend(vol), state)
    assert tr.pending is not None and tr.base is None
    m = tr.upload(chunks)
    assert restore_eager(chunks, m) == frozen and tr.pending is None and tr.base == m
    tr.close()


def test_reboot_after_unclean_stop_rescans_but_uploads_only_real_changes(
        local: ObjectStore, tmp_path: Path) -> None:
    chunks = ChunkStore(local, prefix="vol/")
    vol, state = tmp_path / "v.img", tmp_path / "v.snap"
    tr = SnapshotTracker(new_volume(vol), state)
    fill_random(tr, 1, range(NCHUNKS))
    snapshot(tr, chunks, "snap-1")
    fill_random(tr, 3, [4])
    kill_tracker(tr)
    meta = json.loads((state / "tracker.json").read_text())
    meta["boot_id"] = "another-boot"
    (state / "tracker.json").write_text(json.dumps(meta))
    tr = SnapshotTracker(StoredBackend(vol), state)
    assert tr.changed_chunks == NCHUNKS  # cannot trust the bits: everything counts as changed
    before = chunk_objects(local)
    at_snap = image(tr)
    m = snapshot(tr, chunks, "snap-2")
    assert chunk_objects(local)[0] - before[0] == 1
    assert restore_eager(chunks, m) == at_snap
    tr.close()
    tr = SnapshotTracker(StoredBackend(vol), state)  # clean close: bits trusted again
    assert tr.changed_chunks == 0
    tr.close()


CHILD = textwrap.dedent("""
    import sys, time, random
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from vtl.cloud.local import LocalStore
    from volumes.chunks import ChunkStore, CHUNK_BYTES
    from volumes.snapshots import SnapshotTracker
    from volumes.stored import StoredBackend

    tmp = Path({tmp!r})
    class Slow(LocalStore):
        def put_object(self, key, data, **kw):
            if "/chunks/" in key:
                print("put", flush=True)
                time.sleep(0.2)
            return super().put_object(key, data, **kw)
    chunks = ChunkStore(Slow(tmp / "store"), prefix="vol/")
    vol = StoredBackend.create(tmp / "v.img", {size})
    tr = SnapshotTracker(vol, tmp / "v.snap")
    for i in range({n}):
        tr.write(i * CHUNK_BYTES, random.Random(i).randbytes(min(CHUNK_BYTES, {size} - i * CHUNK_BYTES)))
    (tmp / "frozen.img").write_bytes(tr.read(0, {size}))
    tr.begin_snapshot("snap-k", volume="vol1", created_at="t")
    for i in range({n}):  # overwrite everything after begin: all must come from copies
        tr.write(i * CHUNK_BYTES + 7, b"Z" * 4000)
    (tmp / "after.img").write_bytes(tr.read(0, {size}))
    print("uploading", flush=True)
    tr.upload(chunks, workers=1)
    print("done", flush=True)
""")


def test_kill_9_during_upload_then_resume(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT), tmp=str(tmp_path), size=SIZE, n=NCHUNKS))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        puts = 0
        for line in proc.stdout:
            puts += line.strip() == "put"
            if puts == 3:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    store = LocalStore(tmp_path / "store", clock=ManualClock())
    chunks = ChunkStore(store, prefix="vol/")
    assert chunks.list_manifests() == []  # never half-visible
    assert 1 <= chunk_objects(store)[0] <= 3
    tr = SnapshotTracker(StoredBackend(tmp_path / "v.img"), tmp_path / "v.snap")
    assert tr.pending is not None and tr.pending.snapshot_id == "snap-k"
    assert image(tr) == (tmp_path / "after.img").read_bytes()  # the volume kept its writes
    m = tr.upload(chunks)
    assert restore_eager(chunks, m) == (tmp_path / "frozen.img").read_bytes()
    assert chunk_objects(store)[0] == NCHUNKS
    assert tr.changed_chunks == NCHUNKS  # the overwrites are the next snapshot's
    tr.close()


def test_stop_and_abort(local: ObjectStore, tmp_path: Path) -> None:
    chunks = ChunkStore(local, prefix="vol/")
    tr = SnapshotTracker(new_volume(tmp_path / "v.img"), tmp_path / "v.snap")
    fill_random(tr, 1, range(3))
    snapshot(tr, chunks, "snap-1")
    fill_random(tr, 2, [1])
    tr.begin_snapshot("snap-2", volume="vol1", created_at=T0)
    assert tr.changed_chunks == 0
    with pytest.raises(UploadStopped):
        tr.upload(chunks, should_stop=lambda: True)
    assert tr.abort_snapshot() == "snap-2"
    assert tr.pending is None and tr.changed_chunks == 1
    assert tr.abort_snapshot() is None
    with pytest.raises(SnapshotError):
        tr.upload(chunks)
    with pytest.raises(SnapshotError):
        tr.begin_snapshot("../bad", volume="vol1", created_at=T0)
    assert chunks.list_manifests() == ["snap-1"]
    tr.close()


# --- restore -----------------------------------------------------------------------------------


def test_restore_is_readable_at_once_and_fills_in_background(backing: ObjectStore,
                                                             tmp_path: Path) -> None:
    probe = Probe(backing)
    chunks = ChunkStore(probe, prefix="vol/")  # type: ignore[arg-type]
    tr = SnapshotTracker(new_volume(tmp_path / "src.img"), tmp_path / "src.snap")
    fill_random(tr, 1, [0, 1, 2, 4, 6])
    source = bytearray(image(tr))
    m = snapshot(tr, chunks, "snap-1")
    tr.close()

    state = tmp_path / "new.snap"
    rb = RestoringBackend(new_volume(tmp_path / "new.img"), state, chunks, m)
    assert restoring(state) and rb.restored_chunks == 2  # the two zero chunks need nothing
    gets = probe.chunk_gets
    assert rb.read(CHUNK_BYTES + 5, 100) == bytes(source[CHUNK_BYTES + 5:CHUNK_BYTES + 105])
    assert probe.chunk_gets - gets == 1
    assert rb.read(3 * CHUNK_BYTES, 10) == bytes(10)  # zero chunk: no fetch
    assert probe.chunk_gets - gets == 1
    # a partial write fetches first; a whole-chunk write does not
    rb.write(2 * CHUNK_BYTES + 4096, b"P" * 512)
    source[2 * CHUNK_BYTES + 4096:2 * CHUNK_BYTES + 4608] = b"P" * 512
    rb.write(4 * CHUNK_BYTES, b"W" * CHUNK_BYTES)
    source[4 * CHUNK_BYTES:5 * CHUNK_BYTES] = b"W" * CHUNK_BYTES
    assert probe.chunk_gets - gets == 2
    # unrestored chunks count as data, zero chunks are holes
    assert [(e[0] // CHUNK_BYTES, e[2]) for e in rb.extents(0, SIZE)] == [
        (0, True), (3, False), (4, True), (5, False), (6, True)]
    rb.flush()
    # stop part way (restart), reopen from the state directory alone
    with pytest.raises(UploadStopped):
        rb.fill(workers=1, should_stop=lambda: rb.restored_chunks >= 5)
    done = rb.restored_chunks
    rb.close()
    rb = RestoringBackend(StoredBackend(tmp_path / "new.img"), state, chunks)
    assert rb.restored_chunks == done and not rb.complete
    progress: list[tuple[int, int]] = []
    assert rb.fill(progress=lambda d, t: progress.append((d, t)))
    assert progress[-1] == (NCHUNKS, NCHUNKS)
    assert image(rb) == bytes(source)
    rb.finish()
    assert not restoring(state)
    rb.close()
    assert image(StoredBackend(tmp_path / "new.img")) == bytes(source)


def test_restored_volume_snapshots_incrementally(local: ObjectStore, tmp_path: Path) -> None:
    probe = Probe(local)
    chunks = ChunkStore(probe, prefix="vol/")  # type: ignore[arg-type]
    tr = SnapshotTracker(new_volume(tmp_path / "src.img"), tmp_path / "src.snap")
    fill_random(tr, 1, range(NCHUNKS))
    m = snapshot(tr, chunks, "snap-1")
    tr.close()
    rb = RestoringBackend(new_volume(tmp_path / "new.img"), tmp_path / "new.snap", chunks, m)
    clone = SnapshotTracker(rb, tmp_path / "new.snap", base=m)
    clone.write(3 * CHUNK_BYTES + 1, b"Q")  # lazy fetch, then a change
    puts = probe.chunk_puts
    at_snap = image(clone)
    m2 = snapshot(clone, chunks, "snap-2")
    assert probe.chunk_puts - puts == 1
    assert restore_eager(chunks, m2) == at_snap
    assert m2.refs() - m.refs() == {m2.chunks[3]}
    clone.close()


# --- GC and helpers ----------------------------------------------------------------------------


def test_delete_snapshot_keeps_shared_chunks(local: ObjectStore, tmp_path: Path) -> None:
    chunks = ChunkStore(local, prefix="vol/")
    tr = SnapshotTracker(new_volume(tmp_path / "v.img"), tmp_path / "v.snap")
    fill_random(tr, 1, range(NCHUNKS))
    m1 = snapshot(tr, chunks, "snap-1")
    fill_random(tr, 2, [0, 1])
    at2 = image(tr)
    m2 = snapshot(tr, chunks, "snap-2")
    assert chunk_objects(local)[0] == NCHUNKS + 2
    assert delete_snapshot(chunks, "snap-1", extra=[tr.referenced()]) == 2
    assert chunks.list_manifests() == ["snap-2"]
    assert restore_eager(chunks, m2) == at2
    assert m1.chunks[0] not in {e.key.rpartition("/")[2] for e in chunks.list_chunks()}
    # with every manifest gone, the volume's base still holds its chunks (next snapshot needs them)
    assert state_refs(tmp_path / "v.snap") == tr.referenced() == m2.refs()
    assert delete_snapshot(chunks, "snap-2", extra=[state_refs(tmp_path / "v.snap")]) == 0
    fill_random(tr, 3, [5])
    at3 = image(tr)
    m3 = snapshot(tr, chunks, "snap-3")
    assert restore_eager(chunks, m3) == at3
    assert delete_snapshot(chunks, "snap-3") == NCHUNKS + 1  # and snap-2's old chunk 5
    tr.close()


def test_manifest_from_refs_for_cached_volume(local: ObjectStore) -> None:
    chunks = ChunkStore(local, prefix="vol/")
    a, b = chunks.put(rnd(CHUNK_BYTES, 1)), chunks.put(rnd(100, 2))
    refs = [a, None, b]
    m = manifest_from_refs(chunks, refs, snapshot_id="snap-c", volume="cv", size_bytes=3 * CHUNK_BYTES,
                           created_at=T0, verify=True)
    assert chunks.get_manifest("snap-c") == m
    image_ = restore_eager(chunks, m)
    assert image_ == rnd(CHUNK_BYTES, 1) + bytes(CHUNK_BYTES) + rnd(100, 2) + bytes(CHUNK_BYTES - 100)
    with pytest.raises(ObjectNotFound):
        manifest_from_refs(chunks, [None, "ab" * 32], snapshot_id="snap-d", volume="cv",
                           size_bytes=2 * CHUNK_BYTES, created_at=T0, verify=True)
    assert chunks.list_manifests() == ["snap-c"]
    assert live_refs(chunks, extra=[["cd" * 32, None]]) == {a, b, "cd" * 32}
    sid = new_snapshot_id()
    assert sid.startswith("snap-") and len(sid) == 22


def test_random_operations_against_a_model(local: ObjectStore, tmp_path: Path) -> None:
    """Random writes, discards, snapshots begun/uploaded at random points, with one interrupted
    upload and a reopen: every snapshot restores to the model's image at its begin."""
    r = random.Random(1234)
    probe = Probe(local)
    chunks = ChunkStore(probe, prefix="vol/")  # type: ignore[arg-type]
    vol, state = tmp_path / "v.img", tmp_path / "v.snap"
    tr = SnapshotTracker(new_volume(vol), state)
    model = bytearray(SIZE)
    expected: dict[str, bytes] = {}
    crashes = 0
    for step in range(60):
        op = r.random()
        if op < 0.55:
            off = r.randrange(0, SIZE - 1)
            n = min(r.choice([1, 512, 4096, 300_000, CHUNK_BYTES + 17]), SIZE - off)
            data = r.randbytes(n)
            tr.write(off, data)
            model[off:off + n] = data
        elif op < 0.65:
            off = r.randrange(0, SIZE - 1)
            n = min(r.choice([4096, CHUNK_BYTES, 2 * CHUNK_BYTES]), SIZE - off)
            tr.discard(off, n)
            model[off:off + n] = bytes(n)
        elif op < 0.85 and tr.pending is None:
            sid = f"snap-{step}"
            tr.begin_snapshot(sid, volume="vol1", created_at=T0)
            expected[sid] = bytes(model)
        elif tr.pending is not None:
            if r.random() < 0.3:  # fail part way and "crash"
                probe.fail_after = probe.chunk_puts + 1
                try:
                    tr.upload(chunks, workers=1)
                except StoreUnavailable:
                    crashes += 1
                probe.fail_after = None
                kill_tracker(tr)
                tr = SnapshotTracker(StoredBackend(vol), state)
            if tr.pending is not None:
                tr.upload(chunks, workers=2)
    if tr.pending is not None:
        tr.upload(chunks)
    assert len(expected) >= 5 and crashes >= 1
    assert chunks.list_manifests() == sorted(expected)
    for sid, img in expected.items():
        assert restore_eager(chunks, chunks.get_manifest(sid)) == img, sid
    assert image(tr) == bytes(model)
    tr.close()


def test_restore_writes_while_filling(local: ObjectStore, tmp_path: Path) -> None:
    probe = Probe(local)
    chunks = ChunkStore(probe, prefix="vol/")  # type: ignore[arg-type]
    size = 32 * CHUNK_BYTES
    tr = SnapshotTracker(new_volume(tmp_path / "src.img", size), tmp_path / "src.snap")
    fill_random(tr, 1, range(32))
    model = bytearray(image(tr))
    m = snapshot(tr, chunks, "snap-1")
    tr.close()
    rb = RestoringBackend(new_volume(tmp_path / "new.img", size), tmp_path / "new.snap", chunks, m)
    errors: list[BaseException] = []

    def filler() -> None:
        try:
            rb.fill(workers=3)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=filler)
    t.start()
    r = random.Random(5)
    try:
        for _ in range(200):
            i = r.randrange(32)
            if r.random() < 0.5:  # whole chunk
                data = r.randbytes(CHUNK_BYTES)
                rb.write(i * CHUNK_BYTES, data)
                model[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES] = data
            else:
                off = i * CHUNK_BYTES + r.randrange(CHUNK_BYTES - 4096)
                data = r.randbytes(4096)
                rb.write(off, data)
                model[off:off + 4096] = data
            j = r.randrange(size - 8192)
            assert rb.read(j, 8192) == bytes(model[j:j + 8192])
    finally:
        t.join()
    assert not errors
    assert rb.complete and image(rb) == bytes(model)
    rb.close()


def test_restore_store_outage(local: ObjectStore, tmp_path: Path) -> None:
    chunks = ChunkStore(local, prefix="vol/")
    tr = SnapshotTracker(new_volume(tmp_path / "src.img"), tmp_path / "src.snap")
    fill_random(tr, 1, range(NCHUNKS))
    m = snapshot(tr, chunks, "snap-1")
    tr.close()

    class Down(Probe):
        def get_object(self, key: str, **kw: Any) -> bytes:
            raise StoreUnavailable("endpoint down (test)")

    down = ChunkStore(Down(local), prefix="vol/")  # type: ignore[arg-type]
    rb = RestoringBackend(new_volume(tmp_path / "new.img"), tmp_path / "new.snap", down, m)
    with pytest.raises(OSError) as info:
        rb.read(0, 512)
    assert info.value.errno == 5  # EIO: the LU answers with a medium/hardware error
    with pytest.raises(StoreUnavailable):  # the job sees the store's own error and retries
        rb.fill(workers=1)
    rb.close()
    rb = RestoringBackend(StoredBackend(tmp_path / "new.img"), tmp_path / "new.snap", chunks)
    assert rb.fill() and image(rb) == restore_eager(chunks, m)
    rb.close()


RESTORE_CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from vtl.cloud.local import LocalStore
    from volumes.chunks import ChunkStore, CHUNK_BYTES
    from volumes.snapshots import RestoringBackend
    from volumes.stored import StoredBackend

    tmp = Path({tmp!r})
    class Slow(LocalStore):
        def get_object(self, key, **kw):
            if "/chunks/" in key:
                print("get", flush=True)
                time.sleep(0.1)
            return super().get_object(key, **kw)
    chunks = ChunkStore(Slow(tmp / "store"), prefix="vol/")
    m = chunks.get_manifest("snap-1")
    rb = RestoringBackend(StoredBackend.create(tmp / "new.img", m.size_bytes), tmp / "new.snap",
                          chunks, m)
    rb.write(2 * CHUNK_BYTES + 100, b"F" * 1000)   # partial: fetched first
    rb.write(5 * CHUNK_BYTES, b"G" * CHUNK_BYTES)   # whole: never fetched
    rb.flush()
    print("flushed", flush=True)
    rb.fill(workers=1)
    print("done", flush=True)
""")


def test_kill_9_during_restore_then_resume(local: ObjectStore, tmp_path: Path) -> None:
    chunks = ChunkStore(local, prefix="vol/")
    tr = SnapshotTracker(new_volume(tmp_path / "src.img"), tmp_path / "src.snap")
    fill_random(tr, 1, range(NCHUNKS))
    want = bytearray(image(tr))
    snapshot(tr, chunks, "snap-1")
    tr.close()
    want[2 * CHUNK_BYTES + 100:2 * CHUNK_BYTES + 1100] = b"F" * 1000
    want[5 * CHUNK_BYTES:6 * CHUNK_BYTES] = b"G" * CHUNK_BYTES
    script = tmp_path / "child.py"
    script.write_text(RESTORE_CHILD.format(root=str(ROOT), tmp=str(tmp_path)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        gets_after_flush, flushed = 0, False
        for line in proc.stdout:
            flushed |= line.strip() == "flushed"
            gets_after_flush += flushed and line.strip() == "get"
            if gets_after_flush == 2:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    rb = RestoringBackend(StoredBackend(tmp_path / "new.img"), tmp_path / "new.snap", chunks)
    assert rb.restored_chunks == 2  # chunks 2 and 5, made durable by the flush; no fill checkpoint yet
    assert rb.fill() and image(rb) == bytes(want)
    rb.close()


def test_begin_flushes_the_volume_and_works_over_any_backend(local: ObjectStore,
                                                             tmp_path: Path) -> None:
    from volumes.memory import MemoryBackend

    chunks = ChunkStore(local, prefix="vol/")
    mem = MemoryBackend(3 * CHUNK_BYTES)
    tr = SnapshotTracker(mem, tmp_path / "m.snap")
    tr.write(CHUNK_BYTES + 3, b"data")
    tr.begin_snapshot("snap-1", volume="mem", created_at=T0)
    assert mem.flushes == 1  # the frozen image is on stable storage before anything uploads
    tr.write(CHUNK_BYTES, b"x" * 10)
    m = tr.upload(chunks)
    assert m.chunks[0] is None and m.chunks[2] is None
    assert restore_eager(chunks, m)[CHUNK_BYTES:CHUNK_BYTES + 7] == bytes(3) + b"data"
    tr.close()
