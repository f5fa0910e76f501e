"""StoredBackend: a stored volume's data in sparse local files (AWS "stored volume").

Layout: ``<data-dir>/volumes/<name>.img`` holds the volume's bytes at their own offsets, created
sparse at full size with ``ftruncate``, so only written ranges use disk space. A volume larger
than :data:`SEGMENT_BYTES` (8 TiB) continues in ``<name>.img.1``, ``<name>.img.2``...: ext4
refuses files of 16 TiB (its limit is 16 TiB - 4 KiB with 4 KiB blocks), and AWS stored volumes
go up to exactly 16 TiB. Every segment but the last is exactly SEGMENT_BYTES long. Reads and
writes are ``os.pread``/``os.pwrite`` (no shared file position; safe from several threads).

Durability (the appliance advertises a write-back cache, caching mode page WCE=1):
- A plain WRITE completes once the data is in the kernel page cache. A host crash may lose it,
  exactly as with a disk whose volatile write cache is enabled; initiators that care send FUA or
  SYNCHRONIZE CACHE (file systems do, for their journals and barriers).
- ``flush()`` is ``fdatasync`` of every segment: WRITE with FUA, WRITE AND VERIFY, SYNCHRONIZE
  CACHE and WCE=0 call it before answering GOOD, so nothing acknowledged after a flush is lost.
- ``discard`` punches a hole (``fallocate(PUNCH_HOLE | KEEP_SIZE)``); the range then reads as
  zeros and gives its space back. Where the file system cannot punch holes, zeros are written.
- ``create`` fsyncs the new files and their directory, so a created volume survives a crash;
  if it fails half-way it removes what it made.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
from pathlib import Path
from typing import Callable, Iterator

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
SEGMENT_BYTES = 8 * 1024 ** 4
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


def segment_path(path: Path, index: int) -> Path:
    """The file of segment ``index`` (0 is ``path`` itself)."""
    return path if index == 0 else path.with_name(f"{path.name}.{index}")


def segment_paths(path: Path) -> list[Path]:
    """The existing segment files of the volume at ``path``, in order."""
    out: list[Path] = []
    while segment_path(path, len(out)).exists():
        out.append(segment_path(path, len(out)))
    return out


def stored_size(path: Path) -> int | None:
    """The size of the volume at ``path`` (None if its first file does not exist)."""
    files = segment_paths(Path(path))
    return sum(p.stat().st_size for p in files) if files else None


def allocated_bytes(path: Path) -> int:
    """Disk space the volume's files occupy (0 if they are gone)."""
    total = 0
    for p in segment_paths(Path(path)):
        try:
            total += p.stat().st_blocks * 512
        except OSError:
            pass
    return total


def remove_volume_files(path: Path) -> None:
    """Delete every segment of the volume at ``path`` (missing ones are fine)."""
    path = Path(path)
    for p in reversed(segment_paths(path)):
        p.unlink(missing_ok=True)


class StoredBackend:
    """A :class:`volumes.sbc.BlockBackend` over the sparse segment files of one volume."""

    def __init__(self, path: Path | str, *, read_only: bool = False) -> None:
        """Open an existing volume (see :meth:`create` for a new one)."""
        self.path = Path(path)
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self._fds: list[int] = []
        self._sizes: list[int] = []
        try:
            for p in segment_paths(self.path) or [self.path]:
                fd = os.open(p, flags)
                self._fds.append(fd)
                self._sizes.append(os.fstat(fd).st_size)
        except BaseException:
            self.close()
            raise
        for n in self._sizes[:-1]:
            if n != SEGMENT_BYTES:
                self.close()
                raise OSError(errno.EIO, f"{self.path}: segment of {n} bytes, expected "
                                         f"{SEGMENT_BYTES}")
        self._size = sum(self._sizes)
        self._can_punch = True

    @classmethod
    def create(cls, path: Path | str, size: int) -> "StoredBackend":
        """Create the sparse files of a new ``size``-byte volume (fails if the first exists);
        durable on return."""
        if size <= 0:
            raise ValueError("size must be positive")
        path = Path(path)
        made: list[Path] = []
        try:
            left, index = size, 0
            while left > 0:
                part = min(left, SEGMENT_BYTES)
                seg = segment_path(path, index)
                fd = os.open(seg, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                made.append(seg)
                try:
                    os.ftruncate(fd, part)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                left, index = left - part, index + 1
            _fsync_dir(path.parent)
        except BaseException:
            for seg in reversed(made):
                seg.unlink(missing_ok=True)
            raise
        return cls(path)

    # --- BlockBackend ----------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(f"range {offset}+{length} outside 0..{self._size}")

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(fd, offset in that segment, bytes) covering a checked range."""
        pos, end = offset, offset + length
        while pos < end:
            index, at = divmod(pos, SEGMENT_BYTES)
            n = min(end - pos, SEGMENT_BYTES - at)
            yield self._fd(index), at, n
            pos += n

    def _fd(self, index: int) -> int:
        if not self._fds:
            raise OSError(errno.EBADF, "volume file is closed")
        return self._fds[index]

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        parts: list[bytes] = []
        for fd, at, n in self._pieces(offset, length):
            done = 0
            while done < n:
                chunk = os.pread(fd, n - done, at + done)
                if not chunk:  # the file was shortened under us: what is missing reads as zeros
                    parts.append(bytes(n - done))
                    break
                parts.append(chunk)
                done += len(chunk)
        if not parts:
            return b""
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._check(offset, len(view))
        pos = 0
        for fd, at, n in self._pieces(offset, len(view)):
            done = 0
            while done < n:
                done += os.pwrite(fd, view[pos + done:pos + n], at + done)
            pos += n

    def discard(self, offset: int, length: int) -> None:
        self._check(offset, length)
        for fd, at, n in self._pieces(offset, length):
            if self._can_punch and punch_hole(fd, at, n):
                continue
            self._can_punch = False
            zeros = memoryview(bytes(min(_ZERO_CHUNK, n)))
            done = 0
            while done < n:
                k = min(len(zeros), n - done)
                written = 0
                while written < k:
                    written += os.pwrite(fd, zeros[written:k], at + done + written)
                done += k

    def flush(self) -> None:
        if not self._fds:
            raise OSError(errno.EBADF, "volume file is closed")
        for fd in self._fds:
            os.fdatasync(fd)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Data (True) and hole (False) runs from SEEK_DATA/SEEK_HOLE, coalesced across
        segments; everything counts as data where the file system cannot tell."""
        self._check(offset, length)
        out: list[tuple[int, int, bool]] = []
        base = offset
        for fd, at, n in self._pieces(offset, length):
            for start, size, mapped in _file_extents(fd, at, n):
                start += base - at
                if out and out[-1][2] == mapped and out[-1][0] + out[-1][1] == start:
                    out[-1] = (out[-1][0], out[-1][1] + size, mapped)
                else:
                    out.append((start, size, mapped))
            base += n
        return out

    # --- housekeeping ----------------------------------------------------------------------
    @property
    def allocated_bytes(self) -> int:
        """Bytes the files occupy on disk (st_blocks are 512-byte units)."""
        return sum(os.fstat(fd).st_blocks * 512 for fd in self._fds)

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> "StoredBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _file_extents(fd: int, offset: int, length: int) -> list[tuple[int, int, bool]]:
    """SEEK_DATA/SEEK_HOLE runs of one file within [offset, offset + length)."""
    end = offset + length
    out: list[tuple[int, int, bool]] = []
    pos = offset
    try:
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no data after pos
                    raise
                data = end
            data = min(data, end)
            if data > pos:
                out.append((pos, data - pos, False))
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            out.append((data, hole - data, True))
            pos = hole
    except (OSError, AttributeError):
        return [(offset, length, True)] if length else []
    return out
