"""StoredBackend: a stored volume's data in one sparse local file (AWS "stored volume").

Layout: ``<data-dir>/volumes/<name>.img`` holds the volume's bytes at their own offsets, created
sparse at its full size with ``ftruncate``, so only written ranges use disk space. Reads and
writes are ``os.pread``/``os.pwrite`` (no shared file position; safe from several threads).

Durability (the appliance advertises a write-back cache, caching mode page WCE=1):
- A plain WRITE completes once the data is in the kernel page cache. A host crash may lose it,
  exactly as with a disk whose volatile write cache is enabled; initiators that care send FUA or
  SYNCHRONIZE CACHE (file systems do, for their journals and barriers).
- ``flush()`` is ``fdatasync``: WRITE with FUA, WRITE AND VERIFY, SYNCHRONIZE CACHE and WCE=0
  call it before answering GOOD, so nothing acknowledged after a flush is lost.
- ``discard`` punches a hole (``fallocate(PUNCH_HOLE | KEEP_SIZE)``); the range then reads as
  zeros and gives its space back. Where the file system cannot punch holes, zeros are written.
- ``create`` fsyncs the new file and its directory, so a created volume survives a crash.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
from pathlib import Path
from typing import Callable

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = 1024 * 1024


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc ``fallocate`` (Linux), loaded on first use; None where it does not exist."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``length`` bytes at ``offset`` keeping the file size. False if unsupported."""
    fn = _fallocate()
    if fn is None or length <= 0:
        return fn is not None
    if fn(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StoredBackend:
    """A :class:`volumes.sbc.BlockBackend` over one sparse file of fixed size."""

    def __init__(self, path: Path | str, *, read_only: bool = False) -> None:
        """Open an existing volume file (see :meth:`create` for a new one)."""
        self.path = Path(path)
        self.read_only = read_only
        self._fd = os.open(self.path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size
        self._can_punch = True

    @classmethod
    def create(cls, path: Path | str, size: int) -> "StoredBackend":
        """Create a new sparse file of ``size`` bytes (fails if it exists), durable on return."""
        if size <= 0:
            raise ValueError("size must be positive")
        path = Path(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(path.parent)
        return cls(path)

    # --- BlockBackend ----------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(f"range {offset}+{length} outside 0..{self._size}")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        parts: list[bytes] = []
        done = 0
        while done < length:
            chunk = os.pread(self._fd, length - done, offset + done)
            if not chunk:  # the file was shortened under us: what is missing reads as zeros
                parts.append(bytes(length - done))
                break
            parts.append(chunk)
            done += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._check(offset, len(view))
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def discard(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if length == 0:
            return
        if self._can_punch and punch_hole(self._fd, offset, length):
            return
        self._can_punch = False
        zeros = bytes(min(_ZERO_CHUNK, length))
        done = 0
        while done < length:
            n = min(len(zeros), length - done)
            self.write(offset + done, memoryview(zeros)[:n])
            done += n

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Data (True) and hole (False) runs from SEEK_DATA/SEEK_HOLE; all data if unsupported."""
        self._check(offset, length)
        end = offset + length
        out: list[tuple[int, int, bool]] = []
        pos = offset
        try:
            while pos < end:
                try:
                    data = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:  # ENXIO: no data after pos
                        raise
                    data = end
                data = min(data, end)
                if data > pos:
                    out.append((pos, data - pos, False))
                if data >= end:
                    break
                hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), end)
                out.append((data, hole - data, True))
                pos = hole
        except (OSError, AttributeError):
            return [(offset, length, True)] if length else []
        return out

    # --- housekeeping ----------------------------------------------------------------------
    @property
    def allocated_bytes(self) -> int:
        """Bytes the file occupies on disk (st_blocks are 512-byte units)."""
        return os.fstat(self._fd).st_blocks * 512

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "StoredBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
