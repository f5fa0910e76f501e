"""Kill -9 of a process writing to a cached volume: after reopen, everything flushed reads back,
dirty chunks resume uploading, and the map (a recovery point of it) restores bit for bit."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from volumes.cached import CachedBackend
from volumes.chunks import CHUNK_BYTES, ChunkStore, Manifest
from vtl.cloud.clock import ManualClock
from vtl.cloud.local import LocalStore

ROOT = Path(__file__).resolve().parents[2]
MIB = CHUNK_BYTES
SIZE = 96 * MIB
STEPS = 400

# Step k writes region(k) with data(k); every third step discards an earlier step's chunk
# instead. The store is slow (uploads lag behind) and checkpoints come every few records.
CHILD = r"""
import random, sys, time
from pathlib import Path
import volumes.cached as cached
from volumes.cached import CachedBackend
from volumes.chunks import ChunkStore
from vtl.cloud.clock import ManualClock
from vtl.cloud.local import LocalStore
from tests.volumes.test_cached_crash import MIB, SIZE, STEPS, step

cached._CHECKPOINT_RECORDS = 8

class Slow(LocalStore):
    def put_object(self, *a, **kw):
        time.sleep(0.03)
        return super().put_object(*a, **kw)

work = Path(sys.argv[1])
chunks = ChunkStore(Slow(work / "store", clock=ManualClock()))
v = CachedBackend.create(work / "vol", SIZE, chunks, cache_bytes=4 * MIB,
                         buffer_bytes=48 * MIB, upload_threads=2)
for k in range(STEPS):
    kind, off, data = step(k)
    if kind == "write":
        v.write(off, data)
    else:
        v.discard(off, len(data))
    if k % 5 == 4:
        v.flush()
        print("FLUSHED", k, flush=True)
print("DONE", flush=True)
time.sleep(60)
"""


def step(k: int) -> tuple[str, int, bytes]:
    """What step ``k`` does: ("write" | "discard", offset, data (zeros for a discard))."""
    rnd = random.Random(k)
    if k % 3 == 2 and k >= 5:
        chunk = rnd.randrange(0, SIZE // MIB)
        return "discard", chunk * MIB, bytes(MIB)
    length = rnd.randrange(1, 2 * MIB // 512) * 512
    off = rnd.randrange(0, (SIZE - length) // 512) * 512
    return "write", off, rnd.randbytes(length)


def model_after(last: int) -> bytearray:
    model = bytearray(SIZE)
    for k in range(last + 1):
        _, off, data = step(k)
        model[off:off + len(data)] = data
    return model


def unsettled(last: int) -> list[tuple[int, int]]:
    """Ranges touched by steps after the last flush (they may read old or new)."""
    return [(off, off + len(data)) for k in range(last + 1, STEPS)
            for _, off, data in [step(k)]]


def check(v: CachedBackend, model: bytearray, skip: list[tuple[int, int]]) -> None:
    got = v.read(0, SIZE)
    mask = bytearray(b"\x01") * SIZE
    for lo, hi in skip:
        mask[lo:hi] = bytes(hi - lo)
    for at in range(0, SIZE, MIB):
        m = mask[at:at + MIB]
        if m.count(0) == 0:
            assert got[at:at + MIB] == model[at:at + MIB], f"chunk {at // MIB} differs"
        else:
            for i in range(at, at + MIB, 512):
                if mask[i]:
                    assert got[i:i + 512] == model[i:i + 512], f"block at {i} differs"


@pytest.mark.parametrize("kill_after", [12, 60])
def test_kill_9_mid_writes_loses_nothing_flushed(tmp_path: Path, kill_after: int) -> None:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    last = -1
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("FLUSHED"):
                last = int(line.split()[1])
                if last >= kill_after:
                    break
            elif line.startswith("DONE"):
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert last >= kill_after, proc.stderr.read() if proc.stderr else ""
    store = LocalStore(tmp_path / "store", clock=ManualClock())
    chunks = ChunkStore(store)
    model, skip = model_after(last), unsettled(last)
    v = CachedBackend.open(tmp_path / "vol", chunks, cache_bytes=4 * MIB, buffer_bytes=48 * MIB)
    try:
        assert v.status()["dirty_chunks"] > 0  # the kill left uploads to resume
        check(v, model, skip)  # from the cache file and the store, as the crash left them
        assert v.drain(60)  # the journal's dirty chunks resumed uploading
        v.evict_all()
        check(v, model, skip)  # now every byte comes from the store
        refs = v.recovery_point()
        m = Manifest("crash", "vol", SIZE, "2026-01-01T00:00:00Z", "", CHUNK_BYTES, refs)
        # Nothing the map names is missing from the store.
        assert m.refs() <= {c.key.rpartition("/")[2] for c in chunks.list_chunks()}
        clone = CachedBackend.create(tmp_path / "clone", SIZE, chunks, cache_bytes=4 * MIB,
                                     buffer_bytes=4 * MIB, source=m)
        try:
            assert clone.read(0, SIZE) == v.read(0, SIZE)
        finally:
            clone.close()
    finally:
        v.close()
