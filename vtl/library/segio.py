"""File I/O helpers of the cartridge's segment log: early writeback, background seals and
sequential read-ahead.

Two small pieces of state a :class:`~vtl.library.cartridge.Cartridge` holds, one of each per
open cartridge:

:class:`Writeback` starts asynchronous writeback (``sync_file_range(SYNC_FILE_RANGE_WRITE)``)
of what was appended to the segment being written, every ``chunk`` bytes (WRITEBACK_CHUNK). The
kernel would otherwise start writeback only past ``dirty_background_ratio`` (gigabytes on a big
machine), so a durability point (fsync) would wait for the whole stream written since the last
one. Invariants:

- It is only a head start: durability still comes from the cartridge's fsync in ``sync()`` and
  when a segment is sealed. Nothing here waits for the disk or reports an error; where the call
  is missing (non-Linux, no libc) or refused by the file system, it is silently not made.
- Ranges started on one segment are contiguous and in order: ``[0, a)``, ``[a, b)``, ... each
  ending on a multiple of PAGE (a page still being appended to is never handed to writeback, so
  the next record does not wait for it on stable-pages devices). A new segment restarts at 0; a
  truncation (which fsyncs everything first) restarts at the cut.
- The per-record cost is one comparison (:meth:`Writeback.due`); the syscall runs once a chunk.

:class:`ReadAhead` serves sequential reads of records out of one buffer: a chunk of one segment
file (READ_AHEAD bytes, or one whole record plus the next header when records are larger),
read with one ``pread``. Invariants:

- Memory bound: one buffer per open cartridge, at most max(READ_AHEAD, MAX_RECORD + 2 headers)
  bytes, plus whatever slices of earlier buffers callers still hold.
- The buffer is an immutable ``bytes`` object that is replaced, never written into: a
  ``memoryview`` slice handed to a caller stays valid and unchanged for as long as the caller
  keeps it, whatever the cartridge does next (the iSCSI layer may queue a READ's data for
  sending after later commands ran).
- It never serves stale bytes: it never holds bytes past a segment's size at fill time, and the
  cartridge drops it (:meth:`ReadAhead.drop`) on every append, truncation/erase, repositioning
  (rewind/locate/space) and close. Payload CRCs are still checked by the cartridge on every read.
- The first fill after a drop or a jump is small (one record and the next header, at least
  FIRST_READ), so a locate followed by one small read does not read a whole chunk. Fills that
  continue the previous one take up to READ_AHEAD, sized in whole records like the last one
  read plus the next header, so that a stream of equal blocks is read without overlaps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

MiB = 1024 * 1024

WRITEBACK_CHUNK = 4 * MiB
"""Start writeback of the segment being written every this many appended bytes (4, 8 and
16 MiB measured alike within noise at 170 MB/s; 4 MiB left the least for the fsync)."""

READ_AHEAD = 1 * MiB
"""Bytes read at once while reading sequentially."""

FIRST_READ = 64 * 1024
"""Smallest fill after a drop or a jump (a locate then one read does not read a whole chunk)."""

PAGE = 4096
SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages not yet under writeback


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` at ``offset`` of ``fd`` to disk; no waiting
    for completion, no error reported (see the module doc). Tests wrap this name."""
    global _sync_file_range
    fn = _sync_file_range
    if fn is None:
        return
    if fn(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE) != 0:
        if ctypes.get_errno() in (38, 95):  # ENOSYS, EOPNOTSUPP: never again
            _sync_file_range = None


class Writeback:
    """Where writeback was started on the segment being written (see the module doc)."""

    __slots__ = ("chunk", "mark")

    def __init__(self, chunk: int | None = None) -> None:
        self.chunk = chunk or WRITEBACK_CHUNK
        self.mark = 0  # writeback was started for bytes [0, mark) of the last segment

    def due(self, end: int) -> bool:
        """Hot path, once per record: should :meth:`kick` run now that the segment ends at
        ``end``?"""
        return end - self.mark >= self.chunk

    def kick(self, fd: int, end: int) -> None:
        """Start writeback of ``[mark, end)`` rounded down to a whole page."""
        upto = end - end % PAGE
        if upto > self.mark:
            start_writeback(fd, self.mark, upto - self.mark)
            self.mark = upto

    def restart(self, mark: int) -> None:
        """A new segment (mark 0), a truncation (mark = the cut, if before it) or a reopen."""
        self.mark = mark


_seal_pool: list[ThreadPoolExecutor] = []  # created at the first seal (no import side effect)


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Sealer:
    """The fsyncs of sealed segments, run in the background (a small process-wide pool) so a
    stream does not stop while a full segment (256 MiB) goes to disk.

    Invariants: a durability point calls :meth:`wait` before anything it promises, so every
    segment sealed before it is on disk when it returns, or it learns which ones failed (the
    cartridge then fsyncs those again at every durability point until one succeeds, and each
    failure is an error of that durability point). The fsync works on a duplicate descriptor,
    so the cartridge may close or unlink the segment meanwhile.
    """

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending: list[tuple[int, Future[None]]] = []

    def seal(self, seg: int, fd: int) -> None:
        if not _seal_pool:
            _seal_pool.append(ThreadPoolExecutor(2, thread_name_prefix="vtl-seal"))
        dup = os.dup(fd)
        try:
            self._pending.append((seg, _seal_pool[0].submit(_fsync_and_close, dup)))
        except BaseException:
            os.close(dup)
            raise

    def wait(self) -> tuple[list[int], BaseException | None]:
        """Block until every seal asked so far has ended; (segments whose fsync failed, the
        first error)."""
        pending, self._pending = self._pending, []
        failed: list[int] = []
        error: BaseException | None = None
        for seg, fut in pending:
            exc = fut.exception()
            if exc is not None:
                failed.append(seg)
                error = error or exc
        return failed, error

    @property
    def pending(self) -> int:
        return sum(not f.done() for _seg, f in self._pending)


class ReadAhead:
    """One buffered chunk of one segment file (see the module doc)."""

    __slots__ = ("chunk", "hint", "seg", "start", "end", "buf")

    def __init__(self, chunk: int | None = None) -> None:
        self.chunk = chunk or READ_AHEAD
        self.hint = 0  # size of the last record read: a header miss reads that much ahead
        self.seg = -1
        self.start = self.end = 0  # buf holds bytes [start, end) of segment seg
        self.buf = memoryview(b"")

    def drop(self) -> None:
        """Forget the buffer (the cartridge calls this whenever file contents or the position
        may change under it)."""
        self.seg = -1
        self.start = self.end = 0
        self.buf = memoryview(b"")

    def get(self, fd: int, seg: int, off: int, n: int, ahead: int, limit: int) -> memoryview:
        """``n`` bytes at ``off`` of segment ``seg`` (whose size is ``limit``). On a miss, read
        at least ``n + ahead`` bytes (capped by ``limit``). Short only if the file is short."""
        if seg == self.seg and self.start <= off and off + n <= self.end:
            rel = off - self.start
            return self.buf[rel:rel + n]
        want = n + ahead
        if not (seg == self.seg and self.start <= off <= self.end):  # a jump: a small read
            want = max(want, FIRST_READ)
        elif self.hint:  # sequential: whole records like the last one, up to a chunk
            want += max(0, self.chunk - want) // self.hint * self.hint
        else:
            want = max(want, self.chunk)
        want = min(want, limit - off) if limit > off else n
        data = os.pread(fd, want, off)
        self.seg, self.start, self.end = seg, off, off + len(data)
        self.buf = memoryview(data)
        return self.buf[:n]
