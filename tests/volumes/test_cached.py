"""Cached volumes (volumes/cached.py) over LocalStore and moto: cache, upload buffer, outages,
recovery points. Crash tests are in test_cached_crash.py."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cloud.conftest import _fake_aws_env, boto_session, moto_s3  # noqa: F401 (fixtures)
from tests.volumes.helpers import clear_ua, read10, run, sense, write10
from volumes.cached import (
    MAX_CACHED_BYTES, STATE_AVAILABLE, STATE_BUFFER_FULL, STATE_STORE_UNAVAILABLE,
    CachedBackend,
)
from volumes.cachemap import MapCorrupt
from volumes.chunks import CHUNK_BYTES, ChunkStore, Manifest, chunk_ref
from volumes.sbc import BlockDevice
from vtl.cloud.clock import ManualClock
from vtl.cloud.local import LocalStore
from vtl.cloud.store import ObjectStore, StoreUnavailable
from vtl.scsi.sense import SenseError

MIB = CHUNK_BYTES
NOT_READY_IN_PROGRESS = (0x2, 0x04, 0x07)


class WrappedStore:
    """An ObjectStore in front of another: counts requests, can be taken "down" (every
    request raises StoreUnavailable) and can hold PUTs at a gate."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.calls: dict[str, int] = {}
        self.down = False
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = 0
        self._lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1
        if self.down:
            raise StoreUnavailable(f"{name}: store is down (test)")

    def total(self) -> int:
        return sum(self.calls.values())

    def put_object(self, key: str, data: Any, **kw: Any) -> Any:
        self._count("put_object")
        if not self.gate.is_set():
            with self._lock:
                self.waiting += 1
            self.gate.wait()
            with self._lock:
                self.waiting -= 1
        return self.inner.put_object(key, data, **kw)

    def get_object(self, key: str, **kw: Any) -> bytes:
        self._count("get_object")
        return self.inner.get_object(key, **kw)

    def head_object(self, key: str) -> Any:
        self._count("head_object")
        return self.inner.head_object(key)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if callable(attr):
            def call(*a: Any, **kw: Any) -> Any:
                self._count(name)
                return attr(*a, **kw)
            return call
        return attr


@pytest.fixture(params=["local", "moto"])
def wrapped(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WrappedStore]:
    if request.param == "local":
        inner: ObjectStore = LocalStore(tmp_path / "store", clock=ManualClock())
    else:
        inner = request.getfixturevalue("moto_s3")
    w = WrappedStore(inner)
    yield w
    w.gate.set()
    w.down = False


@pytest.fixture
def local_wrapped(tmp_path: Path) -> Iterator[WrappedStore]:
    w = WrappedStore(LocalStore(tmp_path / "store", clock=ManualClock()))
    yield w
    w.gate.set()
    w.down = False


Opener = Callable[..., CachedBackend]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Opener]:
    """make(store, size, **options) -> a new cached volume, closed after the test."""
    made: list[CachedBackend] = []

    def _make(store: ObjectStore, size: int, *, name: str = "vol", **opts: Any) -> CachedBackend:
        opts.setdefault("cache_bytes", 4 * MIB)
        opts.setdefault("buffer_bytes", 8 * MIB)
        v = CachedBackend.create(tmp_path / name, size, ChunkStore(store), **opts)
        made.append(v)
        return v

    yield _make
    for v in made:
        store = v.chunks.store
        if isinstance(store, WrappedStore):  # release held PUTs, or close() waits for them
            store.gate.set()
            store.down = False
        try:
            v.close()
        except OSError:
            pass


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll a condition (not a timing assertion: the limit only stops a hung test)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def random_writes(v: CachedBackend, model: bytearray, rnd: random.Random, n: int) -> None:
    for _ in range(n):
        length = rnd.randrange(1, 300) * 512
        off = rnd.randrange(0, (v.size - length) // 512) * 512
        data = rnd.randbytes(length)
        v.write(off, data)
        model[off:off + length] = data


# --------------------------------------------------------------------------- reads and cache


def test_larger_than_cache_reads_back_bit_exact_after_eviction(wrapped: WrappedStore,
                                                               make: Opener) -> None:
    size = 24 * MIB + 3 * 512  # a short last chunk
    v = make(wrapped, size, cache_bytes=3 * MIB, buffer_bytes=6 * MIB)
    model = bytearray(size)
    rnd = random.Random(6)
    random_writes(v, model, rnd, 120)
    v.write(size - 1024, b"\xee" * 1024)
    model[size - 1024:] = b"\xee" * 1024
    v.flush()
    assert v.drain(60)
    st = v.status()
    assert st["dirty_bytes"] == 0 and st["cached_clean_bytes"] <= 3 * MIB
    v.evict_all()
    assert v.status()["cache_used_bytes"] == 0
    gets = wrapped.calls.get("get_object", 0)
    assert v.read(0, size) == bytes(model)  # every chunk fetched again, verified, exact
    assert wrapped.calls["get_object"] > gets
    assert v.status()["cached_clean_bytes"] <= 3 * MIB  # the LRU held its limit while reading
    assert v.allocated_bytes <= 3 * MIB + 64 * 1024
    # Ranged reads across chunk borders from a cold cache.
    v.evict_all()
    for _ in range(20):
        off = rnd.randrange(0, size - 3 * MIB)
        n = rnd.randrange(1, 3 * MIB)
        assert v.read(off, n) == bytes(model[off:off + n])


def test_never_written_chunks_read_as_zeros_without_requests(local_wrapped: WrappedStore,
                                                             make: Opener) -> None:
    v = make(local_wrapped, 64 * MIB)
    assert v.read(0, 64 * MIB) == bytes(64 * MIB)
    assert v.read(5 * MIB + 7, 3) == bytes(3)
    assert local_wrapped.total() == 0
    assert v.extents(0, v.size) == [(0, v.size, False)]
    # Written then discarded (whole chunks): zeros again, still without any GET.
    v.write(2 * MIB, b"\x01" * (2 * MIB))
    v.flush()
    assert v.drain(30)
    assert v.extents(0, 8 * MIB) == [(0, 2 * MIB, False), (2 * MIB, 2 * MIB, True),
                                     (4 * MIB, 4 * MIB, False)]
    v.discard(2 * MIB, 2 * MIB)
    v.evict_all()
    gets = local_wrapped.calls.get("get_object", 0)
    assert v.read(0, 8 * MIB) == bytes(8 * MIB)
    assert local_wrapped.calls.get("get_object", 0) == gets
    assert v.extents(0, 8 * MIB) == [(0, 8 * MIB, False)]
    # A partial discard zeroes just its range.
    v.write(0, b"\x02" * MIB)
    v.discard(512, 1024)
    assert v.read(0, 2048) == b"\x02" * 512 + bytes(1024) + b"\x02" * 512


def test_uploaded_chunks_are_content_addressed_and_shared(local_wrapped: WrappedStore,
                                                          make: Opener) -> None:
    v = make(local_wrapped, 8 * MIB)
    block = random.Random(3).randbytes(MIB)
    for i in range(4):
        v.write(i * MIB, block)  # four equal chunks: stored once
    v.flush()
    assert v.drain(30)
    cs = ChunkStore(local_wrapped.inner)
    assert [c.key.rpartition("/")[2] for c in cs.list_chunks()] == [chunk_ref(block)]
    assert v.live_refs() == {chunk_ref(block)}
    assert cs.collect(v.live_refs()) == 0
    assert v.recovery_point() == [chunk_ref(block)] * 4 + [None] * 4


# --------------------------------------------------------------------------- upload buffer


def test_chunk_rewritten_while_it_uploads_stays_dirty(local_wrapped: WrappedStore,
                                                      make: Opener) -> None:
    v = make(local_wrapped, 4 * MIB, upload_threads=1)
    local_wrapped.gate.clear()
    first, second = b"\x11" * MIB, b"\x22" * MIB
    v.write(0, first)
    wait_for(lambda: local_wrapped.waiting == 1, "the upload of chunk 0 to start")
    v.write(0, second)  # while the first version is on its way
    local_wrapped.gate.set()
    assert v.drain(30)
    assert v.status()["dirty_bytes"] == 0
    assert v.recovery_point()[0] == chunk_ref(second)
    refs = {c.key.rpartition("/")[2] for c in ChunkStore(local_wrapped.inner).list_chunks()}
    assert refs == {chunk_ref(first), chunk_ref(second)}  # both went up; the map names the last
    v.evict_all()
    assert v.read(0, MIB) == second


def test_writes_continue_while_uploads_run(wrapped: WrappedStore, make: Opener) -> None:
    v = make(wrapped, 16 * MIB, buffer_bytes=4 * MIB, cache_bytes=2 * MIB)
    model = bytearray(v.size)
    rnd = random.Random(11)
    for _ in range(6):
        random_writes(v, model, rnd, 25)  # more than the buffer: writes wait for uploads
        assert v.status()["dirty_bytes"] <= 4 * MIB + MIB
    v.flush()
    assert v.drain(60)
    v.evict_all()
    assert v.read(0, v.size) == bytes(model)


def test_full_upload_buffer_makes_writes_wait_then_proceed(local_wrapped: WrappedStore,
                                                           make: Opener) -> None:
    v = make(local_wrapped, 8 * MIB, buffer_bytes=2 * MIB)
    local_wrapped.gate.clear()
    v.write(0, b"\x01" * MIB)
    v.write(MIB, b"\x02" * MIB)
    assert v.status()["state"] == STATE_BUFFER_FULL
    done = threading.Event()
    errors: list[BaseException] = []

    def third() -> None:
        try:
            v.write(2 * MIB, b"\x03" * 4096)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        done.set()

    t = threading.Thread(target=third)
    t.start()
    wait_for(lambda: v.status()["writers_waiting"] == 1, "the third write to wait")
    assert not done.is_set()
    assert v.status()["state"] == STATE_BUFFER_FULL
    v.write(0, b"\x04" * 512)  # a chunk that is dirty already needs no room: no wait
    local_wrapped.gate.set()
    t.join(30)
    assert done.is_set() and not errors
    assert v.drain(30)
    assert v.status()["state"] == STATE_AVAILABLE
    v.evict_all()
    assert v.read(0, 3 * MIB) == (b"\x04" * 512 + b"\x01" * (MIB - 512) + b"\x02" * MIB
                                  + b"\x03" * 4096 + bytes(MIB - 4096))


def test_full_upload_buffer_ends_in_not_ready_after_the_wait(local_wrapped: WrappedStore,
                                                             make: Opener) -> None:
    v = make(local_wrapped, 8 * MIB, buffer_bytes=2 * MIB, write_wait=0.2)
    local_wrapped.gate.clear()
    dev = BlockDevice(v, serial="C1")
    clear_ua(dev)
    lba_per_chunk = MIB // 512
    assert run(dev, write10(0, 8), b"\x06" * 4096).ok  # not zeros: those need no upload
    assert run(dev, write10(lba_per_chunk, 8), b"\x07" * 4096).ok
    res = run(dev, write10(2 * lba_per_chunk, 8), b"\x08" * 4096)
    assert sense(res) == NOT_READY_IN_PROGRESS
    with pytest.raises(SenseError):
        v.write(3 * MIB, b"x")
    local_wrapped.gate.set()
    assert v.drain(30)
    assert run(dev, write10(2 * lba_per_chunk, 8), b"\x08" * 4096).ok  # room again
    res = run(dev, read10(lba_per_chunk, 8), expected_in=4096)
    assert res.ok and bytes(res.data_in) == b"\x07" * 4096


# --------------------------------------------------------------------------- outages


def test_store_outage_uploads_resume(wrapped: WrappedStore, make: Opener) -> None:
    v = make(wrapped, 16 * MIB, read_wait=0.2)
    wrapped.down = True
    model = bytearray(v.size)
    rnd = random.Random(9)
    for i in range(5):
        data = rnd.randbytes(MIB)
        v.write(i * MIB, data)  # whole chunks: no read from the store needed
        model[i * MIB:(i + 1) * MIB] = data
    v.flush()
    wait_for(lambda: v.status()["state"] == STATE_STORE_UNAVAILABLE, "the outage to show")
    st = v.status()
    assert st["dirty_bytes"] == 5 * MIB and not st["store_available"]
    assert v.read(0, 5 * MIB) == bytes(model[:5 * MIB])  # dirty data is served locally
    wrapped.down = False
    assert v.drain(60)
    assert v.status()["state"] == STATE_AVAILABLE
    v.evict_all()
    assert v.read(0, v.size) == bytes(model)


def test_read_of_evicted_chunk_during_outage_is_not_ready(local_wrapped: WrappedStore,
                                                          make: Opener) -> None:
    v = make(local_wrapped, 4 * MIB, read_wait=0.2)
    v.write(0, b"\x05" * MIB)
    v.flush()
    assert v.drain(30)
    v.evict_all()
    local_wrapped.down = True
    dev = BlockDevice(v, serial="C2")
    clear_ua(dev)
    assert sense(run(dev, read10(0, 8), expected_in=4096)) == NOT_READY_IN_PROGRESS
    # A partial write needs the chunk too: same answer, and nothing changes.
    assert sense(run(dev, write10(8, 8), b"\x06" * 4096)) == NOT_READY_IN_PROGRESS
    local_wrapped.down = False
    res = run(dev, read10(0, 16), expected_in=8192)
    assert res.ok and bytes(res.data_in) == b"\x05" * 8192


def test_corrupt_chunk_is_a_medium_error(local_wrapped: WrappedStore, make: Opener) -> None:
    v = make(local_wrapped, 4 * MIB)
    v.write(0, b"\x09" * MIB)
    v.flush()
    assert v.drain(30)
    v.evict_all()
    key = ChunkStore(local_wrapped.inner).chunk_key(chunk_ref(b"\x09" * MIB))  # type: ignore[arg-type]
    local_wrapped.inner.put_object(key, b"\x0a" * MIB)
    dev = BlockDevice(v, serial="C3")
    clear_ua(dev)
    assert sense(run(dev, read10(0, 1), expected_in=512)) == (0x3, 0x11, 0x00)


# --------------------------------------------------------------------------- recovery points


def test_recovery_point_is_point_in_time(local_wrapped: WrappedStore, make: Opener,
                                         tmp_path: Path) -> None:
    v = make(local_wrapped, 16 * MIB, upload_threads=1)
    rnd = random.Random(21)
    clean_before = rnd.randbytes(MIB)
    v.write(10 * MIB, clean_before)
    v.flush()
    assert v.drain(30)  # chunk 10 is clean and in the store at the recovery point
    local_wrapped.gate.clear()
    at_point = bytearray(v.size)
    at_point[10 * MIB:11 * MIB] = clean_before
    for i in range(4):
        data = rnd.randbytes(MIB - 4096)
        v.write(i * MIB + 4096, data)
        at_point[i * MIB + 4096:(i + 1) * MIB] = data
    result: list[Any] = []
    rp = threading.Thread(target=lambda: result.append(v.recovery_point()))
    rp.start()
    # One uploader and the recovery point's worker both hold a PUT at the gate.
    wait_for(lambda: local_wrapped.waiting >= 2, "the recovery point to start uploading")
    later = bytearray(at_point)
    for i in (0, 1, 2, 5, 10):
        data = rnd.randbytes(MIB)
        v.write(i * MIB, data)
        later[i * MIB:(i + 1) * MIB] = data
    v.discard(3 * MIB, MIB)
    later[3 * MIB:4 * MIB] = bytes(MIB)
    local_wrapped.gate.set()
    rp.join(60)
    assert result, "recovery_point did not return"
    refs = result[0]
    assert len(refs) == 16 and refs[5] is None and refs[4] is None
    assert refs[10] == chunk_ref(clean_before)
    # The point restores into a new volume bit for bit; the volume itself moved on.
    m = Manifest("rp-1", "vol", v.size, "2026-01-01T00:00:00Z", "", CHUNK_BYTES, refs)
    clone = CachedBackend.create(tmp_path / "clone", v.size, ChunkStore(local_wrapped.inner),
                                 cache_bytes=4 * MIB, buffer_bytes=4 * MIB, source=m)
    try:
        assert clone.status()["source_snapshot"] == "rp-1"
        assert clone.read(0, clone.size) == bytes(at_point)
    finally:
        clone.close()
    assert v.read(0, v.size) == bytes(later)
    assert v.drain(30)
    v.evict_all()
    assert v.read(0, v.size) == bytes(later)


def test_volume_from_snapshot_is_lazy_and_larger_allowed(local_wrapped: WrappedStore,
                                                         make: Opener) -> None:
    src = make(local_wrapped, 3 * MIB + 512, name="src")
    data = random.Random(2).randbytes(src.size)
    src.write(0, data)
    src.flush()
    refs = src.recovery_point()
    m = Manifest("s1", "src", src.size, "2026-01-01T00:00:00Z", "", CHUNK_BYTES, refs)
    gets = local_wrapped.calls.get("get_object", 0)
    v = make(local_wrapped, 8 * MIB, name="big", source=m)
    assert local_wrapped.calls.get("get_object", 0) == gets  # nothing fetched at creation
    assert v.read(MIB, MIB) == data[MIB:2 * MIB]
    assert local_wrapped.calls["get_object"] == gets + 1  # one chunk, on demand
    assert v.read(0, 8 * MIB) == data + bytes(8 * MIB - len(data))
    with pytest.raises(ValueError):
        make(local_wrapped, 2 * MIB, name="small", source=m)


# --------------------------------------------------------------------------- sizes and files


def test_thirty_two_tib_volume(local_wrapped: WrappedStore, make: Opener) -> None:
    v = make(local_wrapped, MAX_CACHED_BYTES)
    last = MAX_CACHED_BYTES - 4096
    v.write(last, b"\xab" * 4096)
    v.write(7 * 1024 ** 4, b"\xcd" * 512)
    assert v.read(last, 4096) == b"\xab" * 4096
    v.flush()
    assert v.drain(30)
    v.evict_all()
    assert v.read(last - 4096, 8192) == bytes(4096) + b"\xab" * 4096
    assert v.status()["size_bytes"] == MAX_CACHED_BYTES
    with pytest.raises(ValueError):
        make(local_wrapped, MAX_CACHED_BYTES + 512, name="too-big")


def test_reopen_keeps_cache_and_map(local_wrapped: WrappedStore, tmp_path: Path) -> None:
    cs = ChunkStore(local_wrapped)
    v = CachedBackend.create(tmp_path / "v", 8 * MIB, cs, cache_bytes=8 * MIB,
                             buffer_bytes=8 * MIB)
    data = random.Random(4).randbytes(4 * MIB)
    v.write(0, data)
    v.flush()
    assert v.drain(30)
    refs = v.recovery_point()
    v.close()
    with pytest.raises(OSError):
        v.read(0, 1)
    v = CachedBackend.open(tmp_path / "v", cs, cache_bytes=8 * MIB, buffer_bytes=8 * MIB,
                           size=8 * MIB)
    try:
        gets = local_wrapped.calls.get("get_object", 0)
        assert v.read(0, 4 * MIB) == data
        assert local_wrapped.calls.get("get_object", 0) == gets  # warm cache after a clean close
        assert v.recovery_point() == refs
    finally:
        v.close()
    with pytest.raises(FileExistsError):
        CachedBackend.create(tmp_path / "v", 8 * MIB, cs, cache_bytes=MIB, buffer_bytes=MIB)


def test_damaged_map_header_is_refused(local_wrapped: WrappedStore, tmp_path: Path) -> None:
    cs = ChunkStore(local_wrapped)
    CachedBackend.create(tmp_path / "v", 4 * MIB, cs, cache_bytes=MIB, buffer_bytes=MIB).close()
    with open(tmp_path / "v" / "map.bin", "r+b") as f:
        f.seek(20)
        f.write(b"\xff")
    with pytest.raises(MapCorrupt):
        CachedBackend.open(tmp_path / "v", cs, cache_bytes=MIB, buffer_bytes=MIB)


def test_block_device_over_cached_volume(local_wrapped: WrappedStore, make: Opener) -> None:
    v = make(local_wrapped, 8 * MIB)
    dev = BlockDevice(v, serial="C4")
    clear_ua(dev)
    payload = random.Random(8).randbytes(64 * 512)
    assert run(dev, write10(2040, 64, 0x08), payload).ok  # FUA, across a chunk border
    res = run(dev, read10(2040, 64), expected_in=len(payload))
    assert res.ok and bytes(res.data_in) == payload


def test_sequential_cold_read_fetches_each_chunk_once(local_wrapped: WrappedStore,
                                                      make: Opener) -> None:
    """Read-ahead on a sequential reader: every byte right, no chunk fetched twice."""
    v = make(local_wrapped, 40 * MIB, cache_bytes=64 * MIB, buffer_bytes=48 * MIB)
    data = random.Random(12).randbytes(40 * MIB)
    v.write(0, data)
    v.discard(20 * MIB, MIB)  # a zero chunk in the middle: never fetched
    v.flush()
    assert v.drain(60)
    v.evict_all()
    gets = local_wrapped.calls.get("get_object", 0)
    got = b"".join(v.read(off, 256 * 1024) for off in range(0, v.size, 256 * 1024))
    assert got == data[:20 * MIB] + bytes(MIB) + data[21 * MIB:]
    assert local_wrapped.calls["get_object"] - gets == 39


def test_recovery_point_gives_up_after_its_timeout(local_wrapped: WrappedStore,
                                                   make: Opener) -> None:
    v = make(local_wrapped, 4 * MIB)
    local_wrapped.down = True
    v.write(0, b"\x0c" * MIB)
    with pytest.raises(StoreUnavailable):
        v.recovery_point(timeout=0.3)
    v.write(0, b"\x0d" * MIB)  # no freeze left behind: writes go on as usual
    local_wrapped.down = False
    assert v.recovery_point()[0] == chunk_ref(b"\x0d" * MIB)


def test_concurrent_writers_readers_evictions_and_recovery_points(local_wrapped: WrappedStore,
                                                                   make: Opener) -> None:
    """Four writers share every chunk (each owns every fourth 4 KiB block) while a reader,
    evictions and recovery points run; then every block holds its owner's last write."""
    size = 12 * MIB
    v = make(local_wrapped, size, cache_bytes=2 * MIB, buffer_bytes=4 * MIB)
    block = 4096
    models = [dict[int, bytes]() for _ in range(4)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(t: int) -> None:
        rnd = random.Random(100 + t)
        try:
            for _ in range(100):
                b = rnd.randrange(0, size // block // 4) * 4 + t
                data = rnd.randbytes(block)
                v.write(b * block, data)
                models[t][b] = data
                if rnd.random() < 0.05:
                    v.flush()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def churn() -> None:
        rnd = random.Random(7)
        try:
            while not stop.is_set():
                off = rnd.randrange(0, size - MIB)
                assert len(v.read(off, MIB)) == MIB
                v.evict_all()
                refs = v.recovery_point()
                assert len(refs) == size // MIB
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    side = threading.Thread(target=churn)
    side.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    side.join(120)
    assert not errors, errors
    v.flush()
    expected = bytearray(size)
    for m in models:
        for b, data in m.items():
            expected[b * block:(b + 1) * block] = data
    assert v.read(0, size) == bytes(expected)
    assert v.drain(60)
    v.evict_all()
    assert v.read(0, size) == bytes(expected)
    refs = v.recovery_point()
    assert refs == [chunk_ref(expected[i * MIB:(i + 1) * MIB]) for i in range(size // MIB)]
