"""CachedBackend: a cached volume, primary data in the object store (AWS "cached volume").

The volume's bytes live in the object store as content-addressed chunks of
:data:`~volumes.chunks.CHUNK_BYTES` (``volumes.chunks.ChunkStore``); the volume itself is the
chunk map (index -> chunk reference, ``volumes.cachemap``). Locally a directory holds::

    map.bin       the chunk map (32-byte digests through mmap; see volumes.cachemap)
    journal.log   write-ahead journal of the map and of the dirty chunks
    cache.img     sparse cache file at the volume's own offsets (cache.img.1... past 8 TiB,
                  the segmented files of volumes.stored), holding cached and dirty chunks
    lru.bin       the clean cached chunks, written at a clean close, removed at open

Every chunk is in one of three local states: ABSENT (not in the cache file: a read fetches it
from the store and verifies it, a chunk whose reference is None reads as zeros without any
request), CLEAN (cached, equal to its stored chunk, evictable) or DIRTY (the cache file holds
data newer than the map: the upload buffer).

Invariants:
- Durability follows the stored volume (write-back cache, WCE=1): a WRITE is done once in the
  cache file; :meth:`CachedBackend.flush` fdatasyncs the cache file and only then journals the
  chunks that became dirty since (DIRTY records), and fdatasyncs the journal. So every chunk the
  journal calls dirty has its whole content on disk, and nothing acknowledged before a flush is
  lost by a crash: a reopen resumes uploading the journal's dirty chunks.
- Only CLEAN chunks are evicted (hole punched), and a chunk becomes CLEAN only once the REF
  record of its upload is durable, so the journal never calls an evicted chunk dirty.
- A chunk rewritten while it uploads stays DIRTY (the upload carries the generation it read;
  a newer generation makes the finished upload count for nothing) and is uploaded again.
- Dirty data is bounded by ``buffer_bytes``: a write that would dirty one more chunk waits
  for the uploaders (``write_wait`` seconds at most) and then ends in NOT READY, LOGICAL UNIT
  NOT READY, OPERATION IN PROGRESS (02/04/07). That sense means "try again later": Linux
  retries it with a delay for several command timeouts (where MEDIUM ERROR would fail the I/O
  and make file systems go read-only), and it is honest about the cause: an upload in progress.
  Reads that need the store while it is unreachable end the same way after ``read_wait``.
- Clean cached chunks are bounded by ``cache_bytes`` (LRU). Local disk use is therefore at
  most cache_bytes + buffer_bytes, like the separate cache and upload buffer disks of AWS.
- Store outages (StoreUnavailable, or any other store error) make the uploaders back off and
  retry; a dirty chunk is never dropped.
- A sequential reader gets read-ahead: the next few chunks are fetched in the background
  (at most a quarter of the cache), under the same stripe locks, so no chunk is fetched twice.
- Lock order: a chunk's stripe lock, then the state lock. Eviction takes stripe locks and so
  runs only where the caller holds none.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from volumes.cachemap import (
    DIGEST_BYTES, KIND_DIRTY, KIND_REF, ZERO_DIGEST, ChunkMap, Freeze, Journal, MapCorrupt,
    Record, read_lru, replay, write_lru,
)
from volumes.chunks import CHUNK_BYTES, ChunkCorrupt, ChunkRef, ChunkStore, Manifest, chunk_count
from volumes.stored import StoredBackend, remove_volume_files
from vtl.cloud.store import StoreError, StoreUnavailable
from vtl.library.cartridge import fsync_dir
from vtl.scsi.sense import Asc, SenseError, SenseKey

log = logging.getLogger(__name__)

TIB = 1024 ** 4
MAX_CACHED_BYTES = 32 * TIB
"""AWS cached volumes go up to 32 TiB (FACTS.md)."""

ABSENT, CLEAN, DIRTY = 0, 1, 2

STATE_AVAILABLE = "AVAILABLE"
STATE_BUFFER_FULL = "UPLOAD BUFFER FULL"
STATE_STORE_UNAVAILABLE = "STORE UNAVAILABLE"
STATE_CLOSED = "CLOSED"

MAP_FILE, JOURNAL_FILE, CACHE_FILE, LRU_FILE = "map.bin", "journal.log", "cache.img", "lru.bin"
_STRIPES = 1024
_CHECKPOINT_RECORDS = 65536
_BACKOFF_MIN, _BACKOFF_MAX = 0.05, 5.0
_READ_AHEAD = 8  # chunks fetched ahead of a sequential reader


def busy_error() -> SenseError:
    """NOT READY / 04/07: the command may succeed later (see the module docstring)."""
    return SenseError(SenseKey.NOT_READY, Asc.LUN_NOT_READY_OPERATION_IN_PROGRESS)


class CachedBackend:
    """A :class:`volumes.sbc.BlockBackend` whose data lives in a :class:`ChunkStore`.

    Build one with :meth:`create` or :meth:`open`; call :meth:`close` when done (it flushes,
    stops the uploader threads and leaves the cache warm for the next open). Thread-safe.
    """

    # ------------------------------------------------------------------ construction
    def __init__(self, directory: Path, chunks: ChunkStore, *, cache_bytes: int,
                 buffer_bytes: int, upload_threads: int = 4, write_wait: float = 20.0,
                 read_wait: float = 20.0) -> None:
        """Use :meth:`open` (this opens the files of an existing volume)."""
        if cache_bytes < 0 or buffer_bytes < CHUNK_BYTES:
            raise ValueError("cache_bytes must be >= 0 and buffer_bytes at least one chunk")
        self.directory = Path(directory)
        self.chunks = chunks
        self.cache_bytes = cache_bytes
        self.buffer_bytes = buffer_bytes
        self.write_wait = write_wait
        self.read_wait = read_wait
        self._map = ChunkMap.open(self.directory / MAP_FILE)
        self._count = self._map.count
        self._size = self._map.size_bytes
        self.source_snapshot = self._map.header.get("source_snapshot")
        try:
            self._journal, records = Journal.open(self.directory / JOURNAL_FILE)
        except BaseException:
            self._map.close()
            raise
        try:
            self._cache = StoredBackend(self.directory / CACHE_FILE)
        except BaseException:
            self._map.close()
            self._journal.close()
            raise
        if self._cache.size != self._size:
            self._map.close()
            self._journal.close()
            self._cache.close()
            raise MapCorrupt(f"cache file is {self._cache.size} bytes, volume {self._size}")
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._work = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._state = bytearray(self._count)
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._clean_bytes = 0
        self._dirty: dict[int, int] = {}  # index -> generation of its latest write
        self._dirty_bytes = 0
        self._reserved = 0
        self._pending: dict[int, int] = {}  # dirty, DIRTY record not durable: index -> epoch
        self._durable: set[int] = set()  # dirty with a durable DIRTY record
        self._queue: deque[int] = deque()
        self._queued: set[int] = set()
        self._uploading: dict[int, int] = {}
        self._overlay: dict[int, tuple[int, bytes]] = {}  # map updates not yet durable
        self._after_sync: deque[tuple[int, int, int | None]] = deque()  # (seq, index, gen)
        self._freezes: dict[int, list[Freeze]] = {}
        self._last_read = -2
        self._prefetching: set[int] = set()
        self._readahead = ThreadPoolExecutor(2, thread_name_prefix="cached-readahead")
        self._gen = 0
        self._epoch = 0
        self._waiters = 0
        self._store_ok = True
        self._store_error = ""
        self.uploaded_bytes = 0
        self.uploaded_chunks = 0
        self.fetched_bytes = 0
        self._closed = False
        self._closing = False
        self._stop = threading.Event()
        try:
            self._recover(records)
        except BaseException:
            self._map.close()
            self._cache.close()
            self._journal.close()
            raise
        self._threads = [threading.Thread(target=self._uploader, name=f"cached-upload-{n}",
                                          daemon=True) for n in range(max(1, upload_threads))]
        for t in self._threads:
            t.start()

    @classmethod
    def create(cls, directory: Path | str, size: int, chunks: ChunkStore, *, cache_bytes: int,
               buffer_bytes: int, source: Manifest | None = None,
               **options: Any) -> "CachedBackend":
        """Create the local files of a new ``size``-byte cached volume in ``directory`` (made
        if missing; must hold no volume) and open it. With ``source`` the volume starts as that
        snapshot (instantly: its chunks are fetched when first read). Durable on return."""
        directory = Path(directory)
        if not 0 < size <= MAX_CACHED_BYTES:
            raise ValueError(f"size must be 1..{MAX_CACHED_BYTES} bytes")
        if source is not None:
            if source.chunk_bytes != CHUNK_BYTES:
                raise ValueError(f"snapshot chunks of {source.chunk_bytes} bytes, "
                                 f"expected {CHUNK_BYTES}")
            if source.size_bytes > size:
                raise ValueError("a volume from a snapshot cannot be smaller than the snapshot")
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / MAP_FILE).exists():
            raise FileExistsError(errno.EEXIST, "a cached volume already exists here",
                                  str(directory))
        header = {"size_bytes": size, "chunk_bytes": CHUNK_BYTES,
                  "count": chunk_count(size, CHUNK_BYTES),
                  "source_snapshot": source.snapshot_id if source else None}
        try:
            StoredBackend.create(directory / CACHE_FILE, size).close()
            Journal.create(directory / JOURNAL_FILE)
            # The map is the volume's commit point: written whole under a temporary name.
            tmp = directory / (MAP_FILE + ".tmp")
            tmp.unlink(missing_ok=True)
            ChunkMap.create(tmp, header, source.chunks if source else None)
            os.replace(tmp, directory / MAP_FILE)
            fsync_dir(directory)
        except BaseException:
            remove_cached_files(directory)
            raise
        return cls(directory, chunks, cache_bytes=cache_bytes, buffer_bytes=buffer_bytes,
                   **options)

    @classmethod
    def open(cls, directory: Path | str, chunks: ChunkStore, *, cache_bytes: int,
             buffer_bytes: int, size: int | None = None, **options: Any) -> "CachedBackend":
        """Open an existing cached volume (after a crash too: the journal is replayed and
        dirty chunks resume uploading). ``size``, if given, must match."""
        backend = cls(Path(directory), chunks, cache_bytes=cache_bytes,
                      buffer_bytes=buffer_bytes, **options)
        if size is not None and size != backend.size:
            backend.close()
            raise ValueError(f"volume is {backend.size} bytes, not {size}")
        return backend

    def _recover(self, records: list[Record]) -> None:
        """Replay the journal into the map, checkpoint, and rebuild the local states."""
        refs, dirty = replay(records, self._count)
        for index, digest in refs.items():
            self._map.set(index, digest)
        self._map.sync()
        self._journal.rewrite(Record(KIND_DIRTY, i) for i in sorted(dirty))
        for i in sorted(dirty):
            self._state[i] = DIRTY
            self._gen += 1
            self._dirty[i] = self._gen
            self._dirty_bytes += self._chunk_len(i)
            self._durable.add(i)
            self._queue.append(i)
            self._queued.add(i)
        lru_path = self.directory / LRU_FILE
        clean = read_lru(lru_path, self._count)
        if clean is not None:
            for i in clean:
                if self._state[i] == ABSENT:
                    self._state[i] = CLEAN
                    self._lru[i] = None
                    self._clean_bytes += self._chunk_len(i)
        if lru_path.exists():
            lru_path.unlink()
            fsync_dir(self.directory)
        if clean is None:
            self._punch_stale()
        self._evict()

    def _punch_stale(self) -> None:
        """After a crash nothing but dirty chunks is known to be cached: give the space of
        every other allocated chunk back (its content may be stale)."""
        for offset, length, mapped in self._cache.extents(0, self._size):
            if not mapped:
                continue
            first, last = offset // CHUNK_BYTES, (offset + length - 1) // CHUNK_BYTES
            for i in range(first, last + 1):
                if self._state[i] == ABSENT:
                    self._cache.discard(i * CHUNK_BYTES, self._chunk_len(i))

    # ------------------------------------------------------------------ helpers
    def _chunk_len(self, index: int) -> int:
        return min(CHUNK_BYTES, self._size - index * CHUNK_BYTES)

    def _stripe(self, index: int) -> threading.Lock:
        return self._stripes[index % _STRIPES]

    def _digest(self, index: int) -> bytes:
        """The chunk's current map entry (pending updates included). Under the state lock."""
        pending = self._overlay.get(index)
        return pending[1] if pending is not None else self._map.get(index)

    def _check(self, offset: int, length: int) -> None:
        if self._closed or self._closing:
            raise OSError(errno.EBADF, "cached volume is closed")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(f"range {offset}+{length} outside 0..{self._size}")

    @staticmethod
    def _pieces(offset: int, length: int) -> list[tuple[int, int, int]]:
        """(chunk index, offset in chunk, bytes) covering a range."""
        out = []
        pos, end = offset, offset + length
        while pos < end:
            index, at = divmod(pos, CHUNK_BYTES)
            n = min(end - pos, CHUNK_BYTES - at)
            out.append((index, at, n))
            pos += n
        return out

    # ------------------------------------------------------------------ BlockBackend
    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        pieces = self._pieces(offset, length)
        if pieces:
            self._read_ahead(pieces[0][0], pieces[-1][0])
        parts = [self._read_chunk(i, at, n) for i, at, n in pieces]
        self._evict()
        if not parts:
            return b""
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_chunk(self, index: int, at: int, n: int) -> bytes:
        base = index * CHUNK_BYTES
        with self._stripe(index):
            if self._state[index] != ABSENT:
                data = self._cache.read(base + at, n)
                with self._lock:
                    if self._state[index] == CLEAN:  # back in, should an eviction have
                        self._lru[index] = None      # picked it meanwhile
                        self._lru.move_to_end(index)
                return data
            with self._lock:
                digest = self._digest(index)
            if digest == ZERO_DIGEST:
                return bytes(n)
            full = self._fetch(index, digest)
            self._cache.write(base, full)
            with self._lock:
                self._state[index] = CLEAN
                self._lru[index] = None
                self._clean_bytes += len(full)
            return full[at:at + n] if (at, n) != (0, len(full)) else full

    def _read_ahead(self, first: int, last: int) -> None:
        """On a sequential read (this one starts where the previous ended), fetch the next
        few chunks in the background, at most a quarter of the cache's worth."""
        with self._lock:
            sequential = first in (self._last_read, self._last_read + 1)
            self._last_read = last
            depth = min(_READ_AHEAD, self.cache_bytes // CHUNK_BYTES // 4)
            if not sequential or depth <= 0 or self._closing:
                return
            todo = [i for i in range(last + 1, min(last + 1 + depth, self._count))
                    if self._state[i] == ABSENT and i not in self._prefetching
                    and self._digest(i) != ZERO_DIGEST]
            self._prefetching.update(todo)
        for n, i in enumerate(todo):
            try:
                self._readahead.submit(self._prefetch, i)
            except RuntimeError:  # closing: the pool is shut down
                with self._lock:
                    self._prefetching.difference_update(todo[n:])
                return

    def _prefetch(self, index: int) -> None:
        """Bring one chunk into the cache if it is still absent; a failure is only a miss."""
        try:
            with self._stripe(index):
                if self._stop.is_set() or self._state[index] != ABSENT:
                    return
                with self._lock:
                    digest = self._digest(index)
                if digest == ZERO_DIGEST:
                    return
                try:
                    full = self.chunks.get(digest.hex(), self._chunk_len(index))
                except StoreError:
                    return
                self._cache.write(index * CHUNK_BYTES, full)
                with self._lock:
                    self._state[index] = CLEAN
                    self._lru[index] = None
                    self._clean_bytes += len(full)
                    self.fetched_bytes += len(full)
            self._evict()
        except Exception:  # a bug; the reader fetches the chunk itself
            log.exception("cached volume %s: read-ahead of chunk %d failed", self.directory,
                          index)
        finally:
            with self._lock:
                self._prefetching.discard(index)

    def _fetch(self, index: int, digest: bytes) -> bytes:
        """The chunk from the store, verified; waits out an outage for ``read_wait``."""
        deadline = time.monotonic() + self.read_wait
        delay = _BACKOFF_MIN
        while True:
            try:
                data = self.chunks.get(digest.hex(), self._chunk_len(index))
                self.fetched_bytes += len(data)
                return data
            except StoreUnavailable as exc:
                self._store_down(exc)
                if time.monotonic() + delay > deadline or self._stop.is_set():
                    raise busy_error() from None
                self._stop.wait(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
            except (ChunkCorrupt, StoreError) as exc:
                log.error("cached volume %s: chunk %d (%s) unreadable: %s", self.directory,
                          index, digest.hex(), exc)
                raise OSError(errno.EIO, f"chunk {index} unreadable: {exc}") from None

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._check(offset, len(view))
        pos = 0
        try:
            for i, at, n in self._pieces(offset, len(view)):
                self._write_chunk(i, at, view[pos:pos + n])
                pos += n
        finally:
            self._evict()

    def _reserve(self, index: int, n: int) -> bool:
        """Wait for upload buffer room unless the chunk is dirty already; True if reserved."""
        with self._lock:
            if index in self._dirty:
                return False
            deadline = time.monotonic() + self.write_wait
            while self._dirty_bytes + self._reserved + n > self.buffer_bytes and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise busy_error()
                self._waiters += 1
                try:
                    self._space.wait(left)
                finally:
                    self._waiters -= 1
            if self._closed:
                raise OSError(errno.EBADF, "cached volume is closed")
            self._reserved += n
            return True

    def _write_chunk(self, index: int, at: int, view: memoryview) -> None:
        clen = self._chunk_len(index)
        reserved = self._reserve(index, clen)
        try:
            with self._stripe(index):
                self._copy_on_write(index)
                if self._state[index] == ABSENT and len(view) < clen:
                    self._fill(index)
                self._cache.write(index * CHUNK_BYTES + at, view)
                with self._lock:
                    self._mark_dirty(index, reserved)
                    reserved = False
        finally:
            if reserved:
                with self._lock:
                    self._reserved -= clen
                    self._space.notify_all()

    def _fill(self, index: int) -> None:
        """Bring an ABSENT chunk's current content into the cache file before a partial
        write (stale bytes of a crashed run may sit there: zeros are written explicitly)."""
        with self._lock:
            digest = self._digest(index)
        base, clen = index * CHUNK_BYTES, self._chunk_len(index)
        if digest == ZERO_DIGEST:
            self._cache.discard(base, clen)
        else:
            self._cache.write(base, self._fetch(index, digest))

    def _mark_dirty(self, index: int, reserved: bool) -> None:
        """After a write's data is in the cache file. Under the state lock."""
        clen = self._chunk_len(index)
        if reserved:
            self._reserved -= clen
        if self._state[index] == CLEAN:
            self._lru.pop(index, None)
            self._clean_bytes -= clen
        if index not in self._dirty:
            self._dirty_bytes += clen  # may pass buffer_bytes by a chunk if it was cleaned
            # between _reserve and here; the next writer waits for it
        self._state[index] = DIRTY
        self._gen += 1
        self._dirty[index] = self._gen
        if index not in self._durable:
            self._pending.setdefault(index, self._epoch)
        if index not in self._queued:
            self._queue.append(index)
            self._queued.add(index)
            self._work.notify()

    def discard(self, offset: int, length: int) -> None:
        """Whole chunks become zero chunks (map entry None, cache space freed, no upload);
        the partial chunks at either end get zeros written like any write."""
        self._check(offset, length)
        try:
            for i, at, n in self._pieces(offset, length):
                if n == self._chunk_len(i):
                    self._discard_chunk(i)
                else:
                    self._write_chunk(i, at, memoryview(bytes(n)))
        finally:
            self._evict()

    def _discard_chunk(self, index: int) -> None:
        clen = self._chunk_len(index)
        with self._stripe(index):
            self._copy_on_write(index)
            with self._lock:
                if index not in self._dirty and self._digest(index) == ZERO_DIGEST:
                    return
                seq = self._journal.append(Record(KIND_REF, index, ZERO_DIGEST))
                self._overlay[index] = (seq, ZERO_DIGEST)
                self._after_sync.append((seq, index, None))
                if index in self._dirty:
                    del self._dirty[index]
                    self._dirty_bytes -= clen
                    self._pending.pop(index, None)
                    self._durable.discard(index)
                    self._space.notify_all()
                    self._idle.notify_all()
                if index in self._lru:
                    del self._lru[index]
                    self._clean_bytes -= clen
                self._state[index] = ABSENT
            self._cache.discard(index * CHUNK_BYTES, clen)

    def flush(self) -> None:
        """Every completed write and discard durable: cache file first, then the journal."""
        if self._closed or self._closing:
            raise OSError(errno.EBADF, "cached volume is closed")
        self._flush()

    def _flush(self, *, everything: bool = False) -> None:
        with self._lock:
            epoch = self._epoch
            self._epoch += 1
        self._cache.flush()
        with self._lock:
            for index, since in list(self._pending.items()):
                if everything or since <= epoch:
                    self._journal.append(Record(KIND_DIRTY, index))
                    self._durable.add(index)
                    del self._pending[index]
        self._sync()

    def _sync(self) -> None:
        """Group-commit the journal and apply what became durable."""
        synced = self._journal.sync()
        with self._lock:
            self._apply_synced(synced)

    def _apply_synced(self, synced: int) -> None:
        """Map updates and clean transitions whose REF record is durable. Under the lock."""
        while self._after_sync and self._after_sync[0][0] <= synced:
            seq, index, gen = self._after_sync.popleft()
            pending = self._overlay.get(index)
            if pending is not None and pending[0] == seq:
                self._map.set(index, pending[1])
                del self._overlay[index]
            if gen is not None and self._dirty.get(index) == gen:
                clen = self._chunk_len(index)
                del self._dirty[index]
                self._dirty_bytes -= clen
                self._state[index] = CLEAN
                self._lru[index] = None
                self._clean_bytes += clen
                self._space.notify_all()
                self._idle.notify_all()

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Mapped: dirty, or naming a stored chunk; deallocated: zero chunks."""
        self._check(offset, length)
        out: list[tuple[int, int, bool]] = []
        with self._lock:
            for i, at, n in self._pieces(offset, length):
                mapped = self._state[i] == DIRTY or self._digest(i) != ZERO_DIGEST
                start = i * CHUNK_BYTES + at
                if out and out[-1][2] == mapped:
                    out[-1] = (out[-1][0], out[-1][1] + n, mapped)
                else:
                    out.append((start, n, mapped))
        return out

    # ------------------------------------------------------------------ eviction
    def _evict(self, target: int | None = None) -> int:
        """Evict least recently used clean chunks until at most ``target`` (default
        cache_bytes) bytes are clean-cached. Call without holding a stripe lock."""
        limit = self.cache_bytes if target is None else target
        freed = 0
        while True:
            with self._lock:
                if self._clean_bytes <= limit or not self._lru or self._closed:
                    return freed
                index, _ = self._lru.popitem(last=False)
            with self._stripe(index):
                with self._lock:
                    if self._state[index] != CLEAN or index in self._lru:
                        continue  # read again (back in the LRU) or rewritten meanwhile
                    self._state[index] = ABSENT
                    clen = self._chunk_len(index)
                    self._clean_bytes -= clen
                self._cache.discard(index * CHUNK_BYTES, clen)
                freed += clen

    def evict_all(self) -> int:
        """Drop every clean chunk from the cache (dirty ones stay); bytes freed."""
        return self._evict(0)

    # ------------------------------------------------------------------ uploads
    def _uploader(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stop.is_set():
                    self._work.wait()
                if self._stop.is_set():
                    return
                index = self._queue.popleft()
                self._queued.discard(index)
                if index not in self._dirty or index in self._uploading:
                    continue  # the uploader of that chunk requeues it if needed
                self._uploading[index] = 0
            try:
                self._upload(index)
            except Exception:  # a bug; keep the chunk dirty and the thread alive
                log.exception("cached volume %s: upload of chunk %d failed", self.directory,
                              index)
                with self._lock:
                    self._uploading.pop(index, None)
                    self._requeue(index)
                self._stop.wait(_BACKOFF_MAX)

    def _requeue(self, index: int) -> None:
        """Under the lock."""
        if index in self._dirty and index not in self._queued:
            self._queue.append(index)
            self._queued.add(index)
            self._work.notify()

    def _upload(self, index: int) -> None:
        with self._stripe(index):
            with self._lock:
                gen = self._dirty.get(index)
                if gen is None:
                    self._uploading.pop(index, None)
                    return
                self._uploading[index] = gen
            data = self._cache.read(index * CHUNK_BYTES, self._chunk_len(index))
        ref = self._put(data)
        if ref is False:  # closing
            with self._lock:
                self._uploading.pop(index, None)
            return
        digest = ZERO_DIGEST if ref is None else bytes.fromhex(ref)
        with self._lock:
            del self._uploading[index]
            if self._dirty.get(index) != gen:
                self._requeue(index)  # rewritten or discarded while it uploaded
                return
            seq = self._journal.append(Record(KIND_REF, index, digest))
            self._overlay[index] = (seq, digest)
            self._after_sync.append((seq, index, gen))
            self._pending.pop(index, None)
            self._durable.discard(index)
            self.uploaded_bytes += len(data)
            self.uploaded_chunks += 1
        self._sync()
        with self._lock:
            self._requeue(index)  # if rewritten during the journal sync
        self._maybe_checkpoint()
        self._evict()

    def _put(self, data: bytes, deadline: float | None = None) -> ChunkRef | None | bool:
        """Store one chunk, retrying with backoff through outages; False if closing.
        Past ``deadline`` (monotonic) the store's error is raised."""
        delay = _BACKOFF_MIN
        while not self._stop.is_set():
            try:
                ref = self.chunks.put(data)
            except StoreError as exc:
                self._store_down(exc)
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise
                self._stop.wait(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
                continue
            if not self._store_ok:
                with self._lock:
                    self._store_ok = True
                    self._store_error = ""
            return ref
        return False

    def _store_down(self, exc: Exception) -> None:
        if self._store_ok:
            log.warning("cached volume %s: object store unavailable, retrying: %s",
                        self.directory, exc)
        with self._lock:
            self._store_ok = False
            self._store_error = str(exc)

    def _maybe_checkpoint(self, force: bool = False) -> None:
        if not force and self._journal.records_since_checkpoint < _CHECKPOINT_RECORDS:
            return
        with self._lock:
            self._apply_synced(self._journal.sync())  # holding the lock: nothing is appended
            self._map.sync()
            self._journal.rewrite(Record(KIND_DIRTY, i) for i in sorted(self._durable))

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until no chunk is dirty (everything written is in the store); False on
        timeout. Writes made meanwhile are waited for too."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._dirty and not self._closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left if left is not None else 1.0)
            done = not self._dirty
        self._evict()  # the uploader that cleaned the last chunk may not have evicted yet
        return done

    # ------------------------------------------------------------------ recovery points
    def _copy_on_write(self, index: int) -> None:
        """Hand the chunk's current content to recovery points that froze it. Under the
        chunk's stripe lock, before the chunk changes."""
        if not self._freezes:  # no recovery point running (the usual case): no lock
            return
        with self._lock:
            freezes = self._freezes.pop(index, None)
            if not freezes:
                return
            dirty = self._state[index] == DIRTY
            digest = self._digest(index)
        data = self._cache.read(index * CHUNK_BYTES, self._chunk_len(index)) if dirty else None
        for f in freezes:
            if data is None:
                f.refs[index] = digest
            else:
                f.save(index, data)

    def _resolve(self, freeze: Freeze, index: int, deadline: float | None) -> bytes:
        """The digest of chunk ``index`` as of the recovery point, uploading it if needed."""
        data: bytes | None = None
        with self._stripe(index):
            with self._lock:
                mine = self._freezes.get(index)
                if mine is not None and freeze in mine:
                    mine.remove(freeze)
                    if not mine:
                        del self._freezes[index]
                    if self._state[index] == DIRTY:
                        data = b""
                    else:
                        freeze.refs[index] = self._digest(index)
            if data is not None:
                data = self._cache.read(index * CHUNK_BYTES, self._chunk_len(index))
        if index in freeze.refs:
            return freeze.refs[index]
        if data is None:
            data = freeze.load(index)
        ref = self._put(data, deadline)
        if ref is False:
            raise OSError(errno.EBADF, "cached volume closed during a recovery point")
        return ZERO_DIGEST if ref is None else bytes.fromhex(ref)  # type: ignore[arg-type]

    def recovery_point(self, timeout: float | None = None) -> list[ChunkRef | None]:
        """The volume's chunk map as of this call, once every chunk it names is in the store.

        Chunks dirty at the call are uploaded as they were then (writes made meanwhile go to
        the volume, not to this recovery point: copy-on-write). Waits out store outages, for
        at most ``timeout`` seconds if given (then the store's StoreUnavailable is raised).
        Memory: 32 bytes per chunk (1 GiB at 32 TiB) plus the returned list.
        """
        if self._closed or self._closing:
            raise OSError(errno.EBADF, "cached volume is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        freeze = Freeze(self.directory)
        with self._lock:
            snap = self._map.digests()
            for index, (_, digest) in self._overlay.items():
                snap[index * DIGEST_BYTES:(index + 1) * DIGEST_BYTES] = digest
            frozen = sorted(self._dirty)
            for index in frozen:
                self._freezes.setdefault(index, []).append(freeze)
        try:
            if frozen:
                with ThreadPoolExecutor(max(1, len(self._threads)),
                                        thread_name_prefix="cached-rp") as pool:
                    for index, digest in zip(frozen, pool.map(
                            lambda i: self._resolve(freeze, i, deadline), frozen)):
                        snap[index * DIGEST_BYTES:(index + 1) * DIGEST_BYTES] = digest
        finally:
            with self._lock:
                for index in frozen:
                    mine = self._freezes.get(index)
                    if mine is not None and freeze in mine:
                        mine.remove(freeze)
                        if not mine:
                            del self._freezes[index]
            freeze.close()
        raw = bytes(snap)
        out: list[ChunkRef | None] = []
        for at in range(0, len(raw), DIGEST_BYTES):
            d = raw[at:at + DIGEST_BYTES]
            out.append(None if d == ZERO_DIGEST else d.hex())
        return out

    # ------------------------------------------------------------------ housekeeping
    def live_refs(self) -> set[ChunkRef]:
        """Every chunk the volume's map names, pending map updates and uploads included
        (for :meth:`ChunkStore.collect`)."""
        with self._lock:
            extra = {d for _, d in self._overlay.values()}
        refs = {d.hex() for _, d in self._map.nonzero(self._lock)}  # locked block by block
        with self._lock:
            extra.update(d for _, d in self._overlay.values())
        refs.update(d.hex() for d in extra if d != ZERO_DIGEST)
        return refs

    def status(self) -> dict[str, Any]:
        """A snapshot of the volume's cache and upload state."""
        with self._lock:
            if self._closed:
                state = STATE_CLOSED
            elif self._waiters or self._dirty_bytes + CHUNK_BYTES > self.buffer_bytes:
                state = STATE_BUFFER_FULL
            elif not self._store_ok:
                state = STATE_STORE_UNAVAILABLE
            else:
                state = STATE_AVAILABLE
            return {
                "state": state,
                "size_bytes": self._size,
                "cache_bytes": self.cache_bytes,
                "cache_used_bytes": self._clean_bytes + self._dirty_bytes,
                "cached_clean_bytes": self._clean_bytes,
                "buffer_bytes": self.buffer_bytes,
                "dirty_bytes": self._dirty_bytes,
                "dirty_chunks": len(self._dirty),
                "uploading_chunks": len(self._uploading),
                "uploaded_bytes": self.uploaded_bytes,
                "uploaded_chunks": self.uploaded_chunks,
                "fetched_bytes": self.fetched_bytes,
                "writers_waiting": self._waiters,
                "store_available": self._store_ok,
                "store_error": self._store_error,
                "source_snapshot": self.source_snapshot,
            }

    @property
    def allocated_bytes(self) -> int:
        """Disk space of the cache file (clean and dirty chunks)."""
        return self._cache.allocated_bytes

    def close(self) -> None:
        """Flush, stop the uploaders, checkpoint the map and keep the cache for next time.
        Dirty chunks stay journaled and resume uploading at the next open."""
        with self._lock:
            if self._closed or self._closing:
                return
            self._closing = True  # new I/O is refused from here on
        self._stop.set()
        with self._lock:
            self._closed = True
            self._work.notify_all()
            self._space.notify_all()
            self._idle.notify_all()
        for t in self._threads:
            t.join()
        self._readahead.shutdown(wait=True, cancel_futures=True)
        try:
            self._flush(everything=True)
            with self._lock:
                self._map.sync()
                self._journal.rewrite(Record(KIND_DIRTY, i) for i in sorted(self._durable))
                lru = list(self._lru)
            write_lru(self.directory / LRU_FILE, lru)
        finally:
            self._journal.close()
            self._cache.close()
            self._map.close()

    def __enter__(self) -> "CachedBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_cached_files(directory: Path | str) -> None:
    """Delete a cached volume's local files (not its chunks in the store) and the directory
    if that leaves it empty."""
    directory = Path(directory)
    remove_volume_files(directory / CACHE_FILE)
    for name in (MAP_FILE, JOURNAL_FILE, LRU_FILE, MAP_FILE + ".tmp", JOURNAL_FILE + ".tmp",
                 LRU_FILE + ".tmp"):
        (directory / name).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        pass

