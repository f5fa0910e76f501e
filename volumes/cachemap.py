"""The persistent chunk map of a cached volume: a map file plus a write-ahead journal.

A cached volume keeps, for every :data:`~volumes.chunks.CHUNK_BYTES` of its address space, the
SHA-256 of the chunk in the object store that holds it (32 zero bytes: the chunk is all zeros and
nothing is stored). At 32 TiB that is 32 Mi entries, so the map is a file of 32-byte digests
used through ``mmap`` (1 GiB, sparse where nothing was ever written), never a Python list.

Files in the volume directory:

``map.bin``::

    magic b"VTLCMAP\\0" | version u16 | header length u32 | JSON header | CRC32C u32 | zero pad
    (the whole header block is HEADER_BYTES = 4096 bytes and never changes after create)
    count x 32-byte digests at offset HEADER_BYTES (entry i at HEADER_BYTES + 32 * i)

``journal.log``::

    magic b"VTLCJNL\\0" | version u16 | checkpoint u64 | CRC32C u32      (22 bytes)
    records: kind u8 | chunk index u64 | digest 32 bytes | CRC32C u32    (45 bytes each)

Record kinds: DIRTY (the chunk's data in the local cache file is newer than the map) and REF
(the map entry is ``digest`` and the chunk is clean; a zero digest is a discarded chunk).

Invariants:
- The map file only ever receives values whose journal record is already durable (callers
  apply a REF to the map after :meth:`Journal.sync` returned). A map page torn by a host crash
  therefore only holds entries that the journal replays, so replay repairs it.
- Replay stops at the first short or bad-CRC record (a torn tail) and truncates it away; a bad
  header magic, version or CRC is :class:`MapCorrupt`, never a guess.
- A checkpoint makes the map durable (``msync``) and then replaces the journal atomically
  (temp file, fsync, rename, fsync of the directory) by one that holds only the DIRTY records
  still in force; a crash on either side of the rename replays to the same state.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c as _crc32c

from volumes.chunks import CHUNK_BYTES
from vtl.errors import ApplianceError
from vtl.library.cartridge import fsync_dir

DIGEST_BYTES = 32
ZERO_DIGEST = bytes(DIGEST_BYTES)
HEADER_BYTES = 4096

MAP_MAGIC = b"VTLCMAP\0"
MAP_VERSION = 1
_MAP_PREAMBLE = struct.Struct(">8sHI")
assert _MAP_PREAMBLE.size == 14

JOURNAL_MAGIC = b"VTLCJNL\0"
JOURNAL_VERSION = 1
_JOURNAL_HEADER = struct.Struct(">8sHQI")
assert _JOURNAL_HEADER.size == 22
_RECORD = struct.Struct(">BQ32sI")
assert _RECORD.size == 45
_CRC = struct.Struct(">I")

KIND_DIRTY = 1
KIND_REF = 2


class MapCorrupt(ApplianceError):
    """A cached volume's map or journal cannot be trusted (bad magic, version or checksum)."""

    code = "CachedVolumeCorrupt"


def crc32c(data: bytes | bytearray | memoryview) -> int:
    return int(_crc32c.crc32c(data))


# --------------------------------------------------------------------------------------- map


class ChunkMap:
    """``map.bin`` through mmap: entry ``i`` is the 32-byte digest of chunk ``i``.

    Not thread-safe by itself; the cached backend serialises :meth:`set` under its lock.
    """

    def __init__(self, path: Path, fd: int, header: dict[str, object]) -> None:
        self.path = path
        self._fd = fd
        self.header = header
        self.size_bytes = int(header["size_bytes"])  # type: ignore[arg-type]
        self.chunk_bytes = int(header["chunk_bytes"])  # type: ignore[arg-type]
        self.count = int(header["count"])  # type: ignore[arg-type]
        self._mm = mmap.mmap(fd, HEADER_BYTES + self.count * DIGEST_BYTES)

    @staticmethod
    def encode_header(header: dict[str, object]) -> bytes:
        body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if _MAP_PREAMBLE.size + len(body) + _CRC.size > HEADER_BYTES:
            raise ValueError("map header too long")
        head = _MAP_PREAMBLE.pack(MAP_MAGIC, MAP_VERSION, len(body)) + body
        head += _CRC.pack(crc32c(head))
        return head + bytes(HEADER_BYTES - len(head))

    @staticmethod
    def decode_header(block: bytes) -> dict[str, object]:
        if len(block) < HEADER_BYTES:
            raise MapCorrupt("map file is shorter than its header")
        magic, version, hlen = _MAP_PREAMBLE.unpack_from(block)
        if magic != MAP_MAGIC:
            raise MapCorrupt("not a cached volume map (bad magic)")
        if version != MAP_VERSION:
            raise MapCorrupt(f"map version {version} is not supported (this is {MAP_VERSION})")
        end = _MAP_PREAMBLE.size + hlen
        if end + _CRC.size > HEADER_BYTES:
            raise MapCorrupt(f"map header length {hlen} runs past the header block")
        (crc,) = _CRC.unpack_from(block, end)
        if crc != crc32c(block[:end]):
            raise MapCorrupt("map header checksum mismatch")
        try:
            header = json.loads(block[_MAP_PREAMBLE.size:end])
            for key in ("size_bytes", "chunk_bytes", "count"):
                if not isinstance(header[key], int) or header[key] < 0:
                    raise ValueError(key)
        except (ValueError, KeyError, TypeError) as exc:
            raise MapCorrupt(f"map header is malformed: {exc}") from None
        if not isinstance(header, dict):
            raise MapCorrupt("map header is malformed")
        return header

    @classmethod
    def create(cls, path: Path, header: dict[str, object],
               refs: Sequence[str | None] | None = None) -> None:
        """Write a new map (sparse; ``refs`` pre-fill the first entries); durable on return."""
        count = int(header["count"])  # type: ignore[arg-type]
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, cls.encode_header(header), 0)
            os.ftruncate(fd, HEADER_BYTES + count * DIGEST_BYTES)
            if refs:
                if len(refs) > count:
                    raise ValueError(f"{len(refs)} references for {count} chunks")
                step = 65536
                for at in range(0, len(refs), step):
                    part = refs[at:at + step]
                    if all(r is None for r in part):
                        continue  # stays a hole: zeros
                    blob = b"".join(ZERO_DIGEST if r is None else bytes.fromhex(r) for r in part)
                    _pwrite_all(fd, blob, HEADER_BYTES + at * DIGEST_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)

    @classmethod
    def open(cls, path: Path) -> "ChunkMap":
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            header = cls.decode_header(os.pread(fd, HEADER_BYTES, 0))
            want = HEADER_BYTES + int(header["count"]) * DIGEST_BYTES  # type: ignore[arg-type]
            if os.fstat(fd).st_size != want:
                raise MapCorrupt(f"map file is {os.fstat(fd).st_size} bytes, expected {want}")
            return cls(path, fd, header)
        except BaseException:
            os.close(fd)
            raise

    def get(self, index: int) -> bytes:
        at = HEADER_BYTES + index * DIGEST_BYTES
        return self._mm[at:at + DIGEST_BYTES]

    def set(self, index: int, digest: bytes) -> None:
        at = HEADER_BYTES + index * DIGEST_BYTES
        self._mm[at:at + DIGEST_BYTES] = digest

    def digests(self) -> bytearray:
        """A copy of every entry (count x 32 bytes)."""
        return bytearray(self._mm[HEADER_BYTES:])

    def nonzero(self, lock: threading.Lock | None = None) -> Iterator[tuple[int, bytes]]:
        """(index, digest) of every non-zero entry, skipping zero runs block by block;
        each 64 KiB block is read under ``lock`` if given (never torn by a concurrent set)."""
        view = memoryview(self._mm)[HEADER_BYTES:]
        block = 64 * 1024
        zeros = bytes(block)
        try:
            for base in range(0, len(view), block):
                if lock is not None:
                    with lock:
                        raw = bytes(view[base:base + block])
                else:
                    raw = bytes(view[base:base + block])
                if raw == zeros[:len(raw)]:
                    continue
                for at in range(0, len(raw), DIGEST_BYTES):
                    d = raw[at:at + DIGEST_BYTES]
                    if d != ZERO_DIGEST:
                        yield (base + at) // DIGEST_BYTES, d
        finally:
            view.release()

    def sync(self) -> None:
        """Make every :meth:`set` durable (msync)."""
        self._mm.flush()

    def close(self) -> None:
        if self._fd >= 0:
            self._mm.close()
            os.close(self._fd)
            self._fd = -1


# ----------------------------------------------------------------------------------- journal


@dataclass(frozen=True, slots=True)
class Record:
    kind: int
    index: int
    digest: bytes = ZERO_DIGEST

    def encode(self) -> bytes:
        head = struct.pack(">BQ32s", self.kind, self.index, self.digest)
        return head + _CRC.pack(crc32c(head))


def replay(records: Iterable[Record], count: int) -> tuple[dict[int, bytes], set[int]]:
    """Fold records into (map updates, chunks still dirty); indexes past ``count`` are
    MapCorrupt (a journal of another volume)."""
    refs: dict[int, bytes] = {}
    dirty: set[int] = set()
    for rec in records:
        if rec.index >= count:
            raise MapCorrupt(f"journal names chunk {rec.index} of a {count}-chunk volume")
        if rec.kind == KIND_DIRTY:
            dirty.add(rec.index)
        else:
            refs[rec.index] = rec.digest
            dirty.discard(rec.index)
    return refs, dirty


class Journal:
    """``journal.log``: records appended to a memory buffer, written and fdatasync'd by
    :meth:`sync` (group commit: whichever thread syncs carries everyone's records)."""

    def __init__(self, path: Path, fd: int, end: int, checkpoint: int) -> None:
        self.path = path
        self._fd = fd
        self._end = end
        self.checkpoint = checkpoint
        self._buf = bytearray()
        self._seq = 0  # records appended so far (this process)
        self._synced = 0  # records durable so far
        self._buf_lock = threading.Lock()
        self._io_lock = threading.Lock()
        self.records_since_checkpoint = 0

    @staticmethod
    def _header(checkpoint: int) -> bytes:
        head = _JOURNAL_HEADER.pack(JOURNAL_MAGIC, JOURNAL_VERSION, checkpoint, 0)[:-4]
        return head + _CRC.pack(crc32c(head))

    @classmethod
    def create(cls, path: Path) -> None:
        _write_file(path, cls._header(0))

    @classmethod
    def open(cls, path: Path) -> tuple["Journal", list[Record]]:
        """Open and read every intact record; a torn tail is cut off (durably)."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            data = _read_all(fd)
            if len(data) < _JOURNAL_HEADER.size:
                raise MapCorrupt("journal is shorter than its header")
            magic, version, checkpoint, crc = _JOURNAL_HEADER.unpack_from(data)
            if magic != JOURNAL_MAGIC:
                raise MapCorrupt("not a cached volume journal (bad magic)")
            if version != JOURNAL_VERSION:
                raise MapCorrupt(f"journal version {version} is not supported")
            if crc != crc32c(data[:_JOURNAL_HEADER.size - 4]):
                raise MapCorrupt("journal header checksum mismatch")
            records: list[Record] = []
            at = _JOURNAL_HEADER.size
            while at + _RECORD.size <= len(data):
                kind, index, digest, rcrc = _RECORD.unpack_from(data, at)
                if rcrc != crc32c(data[at:at + _RECORD.size - 4]) or kind not in (KIND_DIRTY,
                                                                                   KIND_REF):
                    break
                records.append(Record(kind, index, digest))
                at += _RECORD.size
            if at != len(data):
                os.ftruncate(fd, at)
                os.fsync(fd)
            return cls(path, fd, at, checkpoint), records
        except BaseException:
            os.close(fd)
            raise

    def append(self, rec: Record) -> int:
        """Buffer one record; returns its sequence number (durable once synced() >= it)."""
        with self._buf_lock:
            self._buf += rec.encode()
            self._seq += 1
            return self._seq

    @property
    def synced(self) -> int:
        return self._synced

    def sync(self) -> int:
        """Write and fdatasync every buffered record; returns the last durable sequence."""
        with self._io_lock:
            with self._buf_lock:
                buf, self._buf = self._buf, bytearray()
                seq = self._seq
            if buf:
                _pwrite_all(self._fd, buf, self._end)
                self._end += len(buf)
                os.fdatasync(self._fd)
                self.records_since_checkpoint += len(buf) // _RECORD.size
            self._synced = max(self._synced, seq)
            return self._synced

    def rewrite(self, records: Iterable[Record]) -> None:
        """Replace the journal atomically by ``records`` (a checkpoint). The caller has made
        every buffered record's effect durable elsewhere and holds off appends."""
        with self._io_lock:
            with self._buf_lock:
                if self._buf:
                    raise RuntimeError("journal rewrite with unsynced records")
                self._synced = self._seq
            body = bytearray(self._header(self.checkpoint + 1))
            for rec in records:
                body += rec.encode()
            tmp = self.path.with_name(self.path.name + ".tmp")
            _write_file(tmp, bytes(body))
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            os.close(self._fd)
            self._fd = fd
            self._end = len(body)
            self.checkpoint += 1
            self.records_since_checkpoint = 0

    def close(self) -> None:
        with self._io_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


# ----------------------------------------------------------------------------------- helpers


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    parts: list[bytes] = []
    at = 0
    while at < size:
        part = os.pread(fd, size - at, at)
        if not part:
            break
        parts.append(part)
        at += len(part)
    return b"".join(parts)


def _write_file(path: Path, data: bytes) -> None:
    """Create/replace ``path`` with ``data`` and fsync it (not the directory)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _pwrite_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ recovery points


class Freeze:
    """One recovery point in progress: the content of the chunks dirty at its start.

    Writes and discards of a frozen chunk first hand its old content to the freeze
    (copy-on-write): a reference if the content is in the store, else the bytes, kept in a
    temporary file in the volume directory (not in memory: it may be the whole upload buffer).
    """

    def __init__(self, directory: Path) -> None:
        self.pending: set[int] = set()
        self.refs: dict[int, bytes] = {}
        self.saved: dict[int, tuple[int, int]] = {}  # index -> (slot offset, length)
        self._file: Any = None
        self._dir = directory
        self._lock = threading.Lock()

    def save(self, index: int, data: bytes) -> None:
        with self._lock:
            if self._file is None:
                self._file = tempfile.TemporaryFile(dir=self._dir, prefix="rp-")
            at = len(self.saved) * CHUNK_BYTES
            os.pwrite(self._file.fileno(), data, at)
            self.saved[index] = (at, len(data))

    def load(self, index: int) -> bytes:
        at, n = self.saved[index]
        return os.pread(self._file.fileno(), n, at)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


LRU_MAGIC = b"VTLCLRU\0"
_LRU_HEADER = struct.Struct(">8sHQ")


def write_lru(path: Path, indexes: Sequence[int]) -> None:
    """The clean cached chunks, least recently used first (written at a clean close)."""
    from array import array

    body = _LRU_HEADER.pack(LRU_MAGIC, 1, len(indexes)) + array("Q", indexes).tobytes()
    tmp = path.with_name(path.name + ".tmp")
    _write_file(tmp, body + _CRC.pack(crc32c(body)))
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_lru(path: Path, count: int) -> list[int] | None:
    """The list :func:`write_lru` wrote, or None if absent, damaged or out of range."""
    from array import array

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < _LRU_HEADER.size + _CRC.size:
        return None
    magic, version, n = _LRU_HEADER.unpack_from(data)
    if magic != LRU_MAGIC or version != 1 or len(data) != _LRU_HEADER.size + 8 * n + _CRC.size:
        return None
    if _CRC.unpack_from(data, len(data) - 4)[0] != crc32c(data[:-4]):
        return None
    arr = array("Q")
    arr.frombytes(data[_LRU_HEADER.size:-4])
    out = list(arr)
    if any(i >= count for i in out):
        return None
    return out
