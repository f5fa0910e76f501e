"""The file share's local cache: one sparse file per share file, a size limit, LRU eviction.

Layout: ``<root>/<share-dir>/<fileid as 16 hex digits>`` (``root`` is normally
``<data-dir>/cache/shares``). A cache file holds the share file's bytes at their own offsets;
a file fetched only in part is sparse, and the cache remembers which ``chunk``-sized pieces
it holds (in memory: a partly fetched file is derived data and is dropped at the next start).

Invariants:

- A *dirty* file (written locally, not yet uploaded) is always complete in the cache and is
  never evicted; the object file system (``fileshare/objectfs.py``) keeps the dirty flag and
  the ``complete`` flag in its own table and tells the cache at start (:meth:`FileCache.adopt`).
- The limit counts the bytes held (whole chunks for partial files, the size for complete
  ones). Eviction removes clean files, least recently used first, until the total is at or
  under the limit; files in ``protect`` (being read or written right now) are skipped. Dirty
  files can push the total past the limit: writes are never refused for space (the limit is
  for what can be fetched again).
- Thread-safe: one lock guards the index; file I/O uses ``os.pread``/``os.pwrite`` on
  descriptors opened per call, so readers never share a file position.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_CHUNK = 4 * MiB
"""Granularity of ranged fetches of large objects and of partial-presence bookkeeping."""

CacheKey = tuple[str, int]
"""(share directory name, fileid)."""


@dataclass(slots=True)
class _Entry:
    size: int = 0  # logical size of the share file as far as the cache knows
    complete: bool = False
    dirty: bool = False
    chunks: set[int] = field(default_factory=set)  # chunk indexes held when not complete

    def held(self, chunk: int) -> int:
        if self.complete:
            return self.size
        return len(self.chunks) * chunk


def fsync_path(path: Path | str) -> None:
    """fsync a file by name; a file that is not there has nothing to make durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileCache:
    """A size-limited cache of share files, shared by every share of the gateway."""

    def __init__(self, root: Path, limit: int | None = None, *, chunk: int = DEFAULT_CHUNK,
                 durable: bool = True) -> None:
        if chunk <= 0:
            raise ValueError("chunk must be positive")
        self.root = Path(root)
        self.limit = limit
        self.chunk = chunk
        self.durable = durable
        self._lock = threading.Lock()
        self._lru: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._total = 0  # sum of held() over the entries, kept in step by every change
        self.root.mkdir(parents=True, exist_ok=True)
        self.evictions = 0

    # --- paths -------------------------------------------------------------------------------
    def share_dir(self, share: str) -> Path:
        return self.root / share

    def path(self, key: CacheKey) -> Path:
        return self.root / key[0] / f"{key[1]:016x}"

    # --- start-up ----------------------------------------------------------------------------
    def adopt(self, share: str, known: Iterable[tuple[int, int, bool, bool]]) -> None:
        """Take over the files of ``share`` left by a previous run.

        ``known`` yields ``(fileid, size, complete, dirty)`` for every file the share's table
        says is cached complete or dirty; every other file in the share's directory (partly
        fetched ones, removed files) is deleted.
        """
        d = self.share_dir(share)
        d.mkdir(parents=True, exist_ok=True)
        keep: dict[int, tuple[int, bool, bool]] = {}
        for fileid, size, complete, dirty in known:
            keep[fileid] = (size, complete, dirty)
        with self._lock:
            for entry in os.scandir(d):
                try:
                    fileid = int(entry.name, 16)
                except ValueError:
                    fileid = -1
                info = keep.get(fileid)
                if info is None or not (info[1] or info[2]):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                    continue
                size, complete, dirty = info
                self._forget((share, fileid))
                entry = self._lru[(share, fileid)] = _Entry(size=size, complete=True, dirty=dirty)
                self._total += entry.held(self.chunk)

    def forget_share(self, share: str) -> None:
        """Drop every file of a share (share deleted)."""
        with self._lock:
            for key in [k for k in self._lru if k[0] == share]:
                self._forget(key)
        d = self.share_dir(share)
        if d.is_dir():
            for entry in os.scandir(d):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            with contextlib.suppress(OSError):
                d.rmdir()

    # --- state -------------------------------------------------------------------------------
    def _forget(self, key: CacheKey) -> None:
        entry = self._lru.pop(key, None)
        if entry is not None:
            self._total -= entry.held(self.chunk)

    @contextlib.contextmanager
    def _changing(self, key: CacheKey) -> Iterator[_Entry]:
        """The entry of ``key`` (made most recent) for a change; the total follows."""
        entry = self._entry(key)
        before = entry.held(self.chunk)
        try:
            yield entry
        finally:
            self._total += entry.held(self.chunk) - before

    def _entry(self, key: CacheKey) -> _Entry:
        entry = self._lru.get(key)
        if entry is None:
            entry = self._lru[key] = _Entry()
        self._lru.move_to_end(key)
        return entry

    def is_complete(self, key: CacheKey) -> bool:
        with self._lock:
            entry = self._lru.get(key)
            return entry is not None and entry.complete

    def is_dirty(self, key: CacheKey) -> bool:
        with self._lock:
            entry = self._lru.get(key)
            return entry is not None and entry.dirty

    def missing(self, key: CacheKey, size: int, offset: int, count: int) -> list[tuple[int, int]]:
        """Byte ranges ``(first, last)`` (inclusive, chunk-aligned, clipped to ``size``) of
        ``[offset, offset+count)`` that are not held. Empty when all is there."""
        end = min(size, offset + count)
        if end <= offset:
            return []
        with self._lock:
            entry = self._entry(key)
            if entry.complete:
                return []
            first_chunk, last_chunk = offset // self.chunk, (end - 1) // self.chunk
            out: list[tuple[int, int]] = []
            for c in range(first_chunk, last_chunk + 1):
                if c in entry.chunks:
                    continue
                lo, hi = c * self.chunk, min(size, (c + 1) * self.chunk) - 1
                if out and out[-1][1] + 1 == lo:
                    out[-1] = (out[-1][0], hi)
                else:
                    out.append((lo, hi))
            return out

    def _open(self, key: CacheKey, flags: int) -> int:
        path = self.path(key)
        try:
            return os.open(path, flags, 0o600)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(path, flags, 0o600)

    def fill(self, key: CacheKey, size: int, offset: int, data: bytes) -> None:
        """Store fetched bytes of the object (``offset`` chunk-aligned) and mark them held.

        Only whole chunks (or the tail chunk ending at ``size``) are marked held.
        """
        fd = self._open(key, os.O_WRONLY | os.O_CREAT)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        with self._lock, self._changing(key) as entry:
            entry.size = size
            end = offset + len(data)
            c = offset // self.chunk
            while c * self.chunk < end:
                lo, hi = c * self.chunk, min(size, (c + 1) * self.chunk)
                if lo >= offset and hi <= end:
                    entry.chunks.add(c)
                c += 1
            if all(i in entry.chunks for i in range((size + self.chunk - 1) // self.chunk)):
                entry.complete = True
                entry.chunks.clear()

    def create(self, key: CacheKey) -> None:
        """An empty, complete, dirty file (a new share file)."""
        fd = self._open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.close(fd)
        with self._lock, self._changing(key) as entry:
            entry.size, entry.complete, entry.dirty = 0, True, True
            entry.chunks.clear()

    def set_complete(self, key: CacheKey, size: int) -> None:
        with self._lock, self._changing(key) as entry:
            entry.size, entry.complete = size, True
            entry.chunks.clear()

    def read(self, key: CacheKey, offset: int, count: int) -> bytes:
        """Read held bytes (the caller checked :meth:`missing`); beyond the file: short read."""
        try:
            fd = os.open(self.path(key), os.O_RDONLY)
        except FileNotFoundError:
            return b""
        try:
            return os.pread(fd, count, offset)
        finally:
            os.close(fd)

    def write(self, key: CacheKey, offset: int, data: bytes | memoryview, *, sync: bool) -> int:
        """Write into a complete file; mark it dirty; return the new size."""
        fd = self._open(key, os.O_WRONLY | os.O_CREAT)
        try:
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
            if sync and self.durable:
                os.fdatasync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        with self._lock, self._changing(key) as entry:
            entry.size, entry.complete, entry.dirty = size, True, True
        return size

    def truncate(self, key: CacheKey, size: int) -> None:
        fd = self._open(key, os.O_WRONLY | os.O_CREAT)
        try:
            os.ftruncate(fd, size)
            if self.durable:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        with self._lock, self._changing(key) as entry:
            entry.size, entry.complete, entry.dirty = size, True, True

    def sync(self, key: CacheKey) -> None:
        """fsync the cache file (COMMIT)."""
        if self.durable:
            fsync_path(self.path(key))

    def mark_clean(self, key: CacheKey) -> None:
        with self._lock:
            entry = self._lru.get(key)
            if entry is not None:
                entry.dirty = False

    def rekey(self, old: CacheKey, new: CacheKey) -> None:
        """Move a cached file to another key (not used across shares today)."""
        with self._lock:
            entry = self._lru.pop(old, None)
            if entry is None:
                return
            os.replace(self.path(old), self.path(new))
            self._forget(new)
            self._lru[new] = entry

    def drop(self, key: CacheKey) -> None:
        """Forget a file (removed, or replaced in the store by another tool)."""
        with self._lock:
            self._forget(key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(key))

    # --- accounting and eviction ---------------------------------------------------------------
    def usage(self) -> int:
        with self._lock:
            return self._total

    def dirty_bytes(self) -> int:
        with self._lock:
            return sum(e.size for e in self._lru.values() if e.dirty)

    def evict(self, protect: Iterable[CacheKey] = ()) -> list[CacheKey]:
        """Remove clean files, least recently used first, until within the limit."""
        if self.limit is None:
            return []
        protected = set(protect)
        gone: list[CacheKey] = []
        with self._lock:
            if self._total <= self.limit:
                return []
            for key in list(self._lru):
                if self._total <= self.limit:
                    break
                entry = self._lru[key]
                if entry.dirty or key in protected:
                    continue
                self._forget(key)
                gone.append(key)
        for key in gone:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(key))
        if gone:
            self.evictions += len(gone)
            log.debug("cache evicted %d file(s)", len(gone))
        return gone
