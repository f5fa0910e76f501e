"""A virtual tape cartridge on disk: an append-only log of records in segment files.

Layout of one cartridge directory::

    cartridge.json      metadata (barcode, capacity, WORM, MAM attributes); atomic replace
    seg-000000.dat      segment 0: 32-byte segment header, then records
    seg-000001.dat      ... a new segment starts when the next record would pass SEGMENT_SIZE
    index.dat           derived data: sparse index + filemark list + the end it covers

Each record is a 32-byte header + payload; the headers and their codecs are in
:mod:`vtl.library.tapeformat`.

Invariants:

- Logical object numbers (SSC-3 3.1.37 "logical object identifier") count data blocks and
  filemarks alike, start at 0 and are consecutive through the log; end-of-data is implied by the
  end of the log (object number ``eod``). A record never spans two segments.
- Only the last segment is ever written; earlier ones are sealed (fsynced in the background when
  the next segment starts, :class:`~vtl.library.segio.Sealer`; the next durability point waits
  for it) and may be uploaded and evicted.
- Thin: the files hold only what was written (a 15 TiB tape costs its data, not its capacity).
- Durability points are :meth:`Cartridge.sync` (the drive calls it for WRITE FILEMARKS without
  Immed, REWIND, SYNCHRONIZE, UNLOAD) and :meth:`Cartridge.close`: segment file and directory are
  fsynced. Between them records may sit in the page cache; writeback of the segment being
  written is started every few MiB (:class:`~vtl.library.segio.Writeback`, only a head start).
- Reads are served from one read-ahead buffer per open cartridge (:class:`~vtl.library.segio.
  ReadAhead`: at most max(1 MiB, one record + 2 headers)), dropped on every append, truncation,
  repositioning and close; a read block's data is a read-only view of it, valid for good.
- Recovery on open: ``index.dat`` (if present and valid) covers a durable prefix of the log;
  everything after it is scanned with header and payload CRC checks. The log is truncated at the
  first torn or corrupt record, so after a crash everything up to the last durability point reads
  back bit-exact. ``index.dat`` is deleted (durably) before any truncation, so an index on disk
  always describes a prefix of the current log.
- Overwriting (writing anywhere before EOD) first truncates the log at the current position: a
  new EOD. On a WORM cartridge that raises :class:`WormViolation` instead.
"""

from __future__ import annotations

import bisect
import fcntl
import json
import os
import re
import sys
import zlib
from array import array
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any

from vtl.library.segio import ReadAhead, Sealer, Writeback
from vtl.library.tapeformat import (  # the format's names are part of this module's API
    _REC_HDR,
    _CRC,
    _IDX_HDR,
    _REC_HDR_BODY,
    EVICTED_SUFFIX,
    IDX_MAGIC,
    IDX_VERSION,
    MAX_RECORD,
    REC_HDR_LEN,
    REC_MAGIC,
    SEG_HDR_LEN,
    CartridgeBusy,
    CartridgeError,
    Compression,
    FormatError,
    MediumCorrupt,
    MiB,
    RecordHeader,
    RecordType,
    SegmentHeader,
    SegmentsEvicted,
    SpaceResult,
    Squeezer,
    Stop,
    TapeObject,
    VolumeOverflow,
    WormViolation,
    _unzstd,
    crc32c,
    has_evicted_segments,
)

SEGMENT_SIZE = 256 * MiB
"""Default segment file size (records never straddle two segments)."""

_DATA = int(RecordType.DATA)

INDEX_STRIDE = 64
"""The in-memory index keeps the file position of every INDEX_STRIDE-th object."""

INDEX_SAVE_OBJECTS = 65536
INDEX_SAVE_BYTES = 1024 * MiB
"""sync() persists the index when this much was appended since the last save (bounds recovery)."""

META_NAME = "cartridge.json"
INDEX_NAME = "index.dat"
META_FORMAT = "vtl-cartridge"
META_VERSION = 1
_SEG_RE = re.compile(r"^seg-(\d{6})\.dat$")


# --- metadata -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CartridgeMeta:
    """Contents of cartridge.json. ``attributes`` holds MAM-like counters (SPC-4 7.4.2)."""

    barcode: str
    capacity_bytes: int
    worm: bool = False
    manufactured: str = ""  # YYYYMMDD, MAM attribute 0x0406
    load_count: int = 0
    lifetime_written: int = 0
    lifetime_read: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        doc = {"format": META_FORMAT, "version": META_VERSION, "barcode": self.barcode,
               "capacity_bytes": self.capacity_bytes, "worm": self.worm,
               "manufactured": self.manufactured, "load_count": self.load_count,
               "lifetime_written": self.lifetime_written, "lifetime_read": self.lifetime_read,
               "attributes": self.attributes}
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> CartridgeMeta:
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise FormatError(f"unreadable {META_NAME}") from exc
        if not isinstance(doc, dict) or doc.get("format") != META_FORMAT:
            raise FormatError(f"{META_NAME} is not a vtl cartridge")
        if doc.get("version") != META_VERSION:
            raise FormatError(f"unsupported cartridge version {doc.get('version')}")
        try:
            return cls(barcode=str(doc["barcode"]), capacity_bytes=int(doc["capacity_bytes"]),
                       worm=bool(doc.get("worm", False)),
                       manufactured=str(doc.get("manufactured", "")),
                       load_count=int(doc.get("load_count", 0)),
                       lifetime_written=int(doc.get("lifetime_written", 0)),
                       lifetime_read=int(doc.get("lifetime_read", 0)),
                       attributes=dict(doc.get("attributes", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{META_NAME} lacks a field: {exc}") from exc


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically: temp in the same directory, fsync, rename, fsync dir."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def early_warning_size(capacity: int) -> int:
    """Size of the early-warning zone before the hard end: max(1 %, 64 MiB), at most 1/4."""
    return min(max(capacity // 100, 64 * MiB), capacity // 4)


# --- the cartridge --------------------------------------------------------------------------


class Cartridge:
    """One tape: positioning, reads and writes over the segment log.

    Public API (the drive holds a Cartridge while loaded):

    - ``Cartridge.create(path, barcode, capacity_bytes, worm=False)``, ``Cartridge.open(path)``
    - identity: ``barcode``, ``capacity_bytes``, ``worm``, ``meta``, ``update_meta(**changes)``
    - space: ``used_bytes``, ``remaining_bytes``, ``early_warning`` (position past the EW
      point), ``early_warning_bytes``
    - position: ``position`` (next logical object), ``eod``, ``at_bot``, ``at_eod``,
      ``filemarks_before(obj)``; ``rewind()``, ``locate(obj)``, ``space_blocks(n)``,
      ``space_filemarks(n)``, ``space_eod()``
    - data: ``read_next()`` (TapeObject or None at EOD), ``write_block(data)``,
      ``write_filemarks(n)``, ``erase()`` (EOD at the current position)
    - durability: ``sync()``, ``close()``
    """

    def __init__(self, path: Path, meta: CartridgeMeta, *, segment_size: int = SEGMENT_SIZE) -> None:
        self.path = path
        self._meta = meta
        self.segment_size = segment_size
        self._fds: dict[int, int] = {}
        self._seg_sizes: list[int] = []
        self._sealed_used = 0
        self._sparse = array("Q")  # position of object k*STRIDE as (segment << 40) | offset
        self._fms = array("Q")  # object numbers of filemarks, ascending
        self._count = 0
        self._pos = 0
        self._loc: tuple[int, int] | None = None  # file position of object _pos, when known
        self._dirty: set[int] = set()
        self._dir_dirty = False
        self._index_count = 0  # objects covered by index.dat on disk (0 = none)
        self._index_used = 0
        self._closed = False
        self._lock_fd = -1
        self._squeezer: Squeezer | None = None
        self._wb = Writeback()
        self._ra = ReadAhead()
        self._sealer = Sealer()
        self._ew = (-1, 0)  # (capacity, early-warning bytes) computed for it

    def _lock(self) -> None:
        """Exclusive flock on the directory: one writer per cartridge across processes."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CartridgeBusy(f"{self.path} is in use") from None
        self._lock_fd = fd

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, barcode: str, capacity_bytes: int, *, worm: bool = False,
               manufactured: date | None = None, segment_size: int = SEGMENT_SIZE) -> Cartridge:
        """Create an empty cartridge in directory ``path`` (created; must not hold one already)."""
        if capacity_bytes <= 0:
            raise ValueError("capacity must be positive")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if (path / META_NAME).exists():
            raise FileExistsError(f"{path} already holds a cartridge")
        made = (manufactured or date.today()).strftime("%Y%m%d")
        meta = CartridgeMeta(barcode=barcode, capacity_bytes=capacity_bytes, worm=worm,
                             manufactured=made)
        cart = cls(path, meta, segment_size=segment_size)
        cart._lock()
        for stale in path.iterdir():  # leftovers of an interrupted create must not be read
            if _SEG_RE.match(stale.name) or stale.name == INDEX_NAME:
                stale.unlink()
        cart._new_segment(0, 0)
        cart._flush_files()
        atomic_write(path / META_NAME, meta.to_json())
        return cart

    @classmethod
    def open(cls, path: Path, *, segment_size: int = SEGMENT_SIZE) -> Cartridge:
        """Open a cartridge, recovering the log to its last intact record (see module doc)."""
        path = Path(path)
        try:
            raw = (path / META_NAME).read_bytes()
        except FileNotFoundError as exc:
            raise FormatError(f"{path} holds no cartridge") from exc
        cart = cls(path, CartridgeMeta.from_json(raw), segment_size=segment_size)
        cart._lock()
        try:
            cart._recover()
        except BaseException:
            cart._release()
            raise
        return cart

    # --- identity and accounting ---------------------------------------------------------------
    @property
    def meta(self) -> CartridgeMeta:
        return self._meta

    @property
    def barcode(self) -> str:
        return self._meta.barcode

    @property
    def capacity_bytes(self) -> int:
        return self._meta.capacity_bytes

    @property
    def worm(self) -> bool:
        return self._meta.worm

    def update_meta(self, **changes: Any) -> CartridgeMeta:
        """Replace metadata fields (e.g. load_count) and persist atomically."""
        self._meta = replace(self._meta, **changes)
        atomic_write(self.path / META_NAME, self._meta.to_json())
        return self._meta

    @property
    def used_bytes(self) -> int:
        """Bytes of records (headers + payloads) in the log."""
        return self._sealed_used + self._seg_sizes[-1] - SEG_HDR_LEN

    def _recount(self) -> None:
        """Recompute the bytes held by all but the last segment (after the list changed)."""
        self._sealed_used = sum(self._seg_sizes[:-1]) - SEG_HDR_LEN * (len(self._seg_sizes) - 1)

    @property
    def remaining_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes)

    @property
    def early_warning_bytes(self) -> int:
        """Used bytes at which the early-warning zone begins (SSC-3 4.2.5 EW)."""
        capacity = self._meta.capacity_bytes
        cached = self._ew
        if cached[0] != capacity:  # (asked once per block written)
            cached = self._ew = (capacity, capacity - early_warning_size(capacity))
        return cached[1]

    @property
    def early_warning(self) -> bool:
        return self.used_bytes >= self.early_warning_bytes

    def segment_paths(self) -> list[Path]:
        return [self._seg_path(i) for i in range(len(self._seg_sizes))]

    def sealed_segments(self) -> list[Path]:
        """Segments that will never change again until an overwrite (upload candidates)."""
        return self.segment_paths()[:-1]

    # --- position ------------------------------------------------------------------------------
    @property
    def position(self) -> int:
        """Logical object number of the next object to be read or written."""
        return self._pos

    @property
    def eod(self) -> int:
        """Number of logical objects on the tape (the object number of end-of-data)."""
        return self._count

    @property
    def at_bot(self) -> bool:
        return self._pos == 0

    @property
    def at_eod(self) -> bool:
        return self._pos == self._count

    @property
    def filemark_count(self) -> int:
        return len(self._fms)

    def filemarks_before(self, obj: int) -> int:
        """How many filemarks lie before logical object ``obj`` (the st "file number")."""
        return bisect.bisect_left(self._fms, obj)

    def is_filemark(self, obj: int) -> bool:
        i = bisect.bisect_left(self._fms, obj)
        return i < len(self._fms) and self._fms[i] == obj

    def rewind(self) -> None:
        """Position at BOP (object 0). Not a durability point by itself: the drive syncs."""
        self._set_pos(0, (0, SEG_HDR_LEN))

    def locate(self, obj: int) -> bool:
        """Position before object ``obj``; past EOD -> position at EOD and return False."""
        if obj < 0:
            raise ValueError("negative object number")
        if obj > self._count:
            self._set_pos(self._count)
            return False
        self._set_pos(obj)
        return True

    def space_eod(self) -> None:
        self._set_pos(self._count)

    def space_blocks(self, count: int) -> SpaceResult:
        """SSC-3 SPACE logical blocks: forward (count > 0) or backward (count < 0).

        Forward, a filemark stops the space with the position after it; EOD stops it at EOD.
        Backward, a filemark stops it with the position before it (on its BOP side); BOP stops
        it at object 0. ``residue`` is |count| minus the blocks spaced over.
        """
        pos = self._pos
        fms = self._fms
        if count > 0:
            i = bisect.bisect_left(fms, pos)
            next_fm = fms[i] if i < len(fms) else None
            limit = (next_fm if next_fm is not None else self._count) - pos
            if count <= limit:
                self._set_pos(pos + count)
                return SpaceResult()
            if next_fm is not None:
                self._set_pos(next_fm + 1)
                return SpaceResult(Stop.FILEMARK, count - limit)
            self._set_pos(self._count)
            return SpaceResult(Stop.EOD, count - limit)
        if count < 0:
            want = -count
            i = bisect.bisect_left(fms, pos)
            prev_fm = fms[i - 1] if i > 0 else None
            avail = pos - (prev_fm + 1 if prev_fm is not None else 0)
            if want <= avail:
                self._set_pos(pos - want)
                return SpaceResult()
            if prev_fm is not None:
                self._set_pos(prev_fm)
                return SpaceResult(Stop.FILEMARK, want - avail)
            self._set_pos(0)
            return SpaceResult(Stop.BOP, want - avail)
        return SpaceResult()

    def space_filemarks(self, count: int) -> SpaceResult:
        """SSC-3 SPACE filemarks: forward ends after the count-th filemark, backward on the
        BOP side of it. EOD (forward) or BOP (backward) end it early with a residue."""
        pos = self._pos
        fms = self._fms
        i = bisect.bisect_left(fms, pos)
        if count > 0:
            if i + count <= len(fms):
                self._set_pos(fms[i + count - 1] + 1)
                return SpaceResult()
            self._set_pos(self._count)
            return SpaceResult(Stop.EOD, count - (len(fms) - i))
        if count < 0:
            want = -count
            if want <= i:
                self._set_pos(fms[i - want])
                return SpaceResult()
            self._set_pos(0)
            return SpaceResult(Stop.BOP, want - i)
        return SpaceResult()

    # --- data ----------------------------------------------------------------------------------
    def read_next(self) -> TapeObject | None:
        """Read the object at the position and move past it; None at EOD (position unchanged)."""
        if self._pos >= self._count:
            return None
        seg, off = self._location()
        fd, ra, limit = self._fd(seg), self._ra, self._seg_sizes[seg]
        hdr = RecordHeader.decode(ra.get(fd, seg, off, REC_HDR_LEN, ra.hint, limit))
        if hdr.obj != self._pos:
            raise MediumCorrupt(f"object {self._pos}: header says {hdr.obj}")
        data: bytes | memoryview = b""
        if hdr.stored_length:
            ra.hint = hdr.size  # the next header miss reads a record like this one
            data = ra.get(fd, seg, off + REC_HDR_LEN, hdr.stored_length, REC_HDR_LEN, limit)
            if len(data) != hdr.stored_length or crc32c(data) != hdr.payload_crc:
                raise MediumCorrupt(f"object {self._pos}: payload CRC mismatch")
            if hdr.compression == Compression.ZLIB:
                try:
                    data = zlib.decompress(data)
                except zlib.error as exc:
                    raise MediumCorrupt(f"object {self._pos}: {exc}") from None
            elif hdr.compression == Compression.ZSTD:
                try:
                    data = _unzstd(data, hdr.logical_length)
                except Exception as exc:  # zstandard.ZstdError
                    raise MediumCorrupt(f"object {self._pos}: {exc}") from None
            if len(data) != hdr.logical_length:
                raise MediumCorrupt(f"object {self._pos}: length mismatch")
        self._advance(seg, off + hdr.size)
        return TapeObject(hdr.kind, data)

    def write_block(self, data: bytes | bytearray | memoryview, *, compress: bool = False) -> None:
        """Write one data block at the position (truncating anything after it) and move past it.
        ``compress``: store it zstd-compressed if that pays (see :class:`Squeezer`).

        Raises WormViolation (overwrite on WORM) or VolumeOverflow (nothing written).
        """
        if len(data) > MAX_RECORD:
            raise ValueError("block larger than MAX_RECORD")
        payload = data if isinstance(data, (bytes, memoryview)) else memoryview(data)
        logical = len(payload)
        comp = Compression.NONE
        if compress and logical >= 512:
            if self._squeezer is None:
                self._squeezer = Squeezer()
            packed = self._squeezer.squeeze(payload)
            if packed is not None:
                payload, comp = packed, Compression.ZSTD
        self._append_record(RecordType.DATA, comp, payload, logical, crc32c(payload))

    def append_plain_block(self, data: bytes | bytearray | memoryview) -> bool:
        """The streaming case of :meth:`write_block` (no compression), taken only when the
        block goes at EOD into the current segment and ends before the early-warning zone;
        False, with nothing written, otherwise (then :meth:`write_block` handles it)."""
        stored = len(data)
        if self._pos != self._count or stored > MAX_RECORD:
            return False
        sizes = self._seg_sizes
        seg = len(sizes) - 1
        off = sizes[seg]
        end = off + REC_HDR_LEN + stored
        if end > self.segment_size and off > SEG_HDR_LEN or \
                self._sealed_used + end - SEG_HDR_LEN >= self.early_warning_bytes:
            return False
        self._ra.drop()
        self._put_record(RecordType.DATA, Compression.NONE, data, stored, crc32c(data), seg, off)
        return True

    def read_plain_block(self, length: int) -> bytes | memoryview | None:
        """The streaming case of :meth:`read_next`: the data of the object at the position if
        it is an uncompressed data block of exactly ``length`` bytes (the position moves past
        it); None, with the position unchanged, for anything else (EOD, a filemark, another
        length, compression, a record that does not check out: :meth:`read_next` answers).
        Header and payload come from the read-ahead buffer in one piece."""
        pos = self._pos
        if pos >= self._count:
            return None
        seg, off = self._location()
        ra = self._ra
        size = REC_HDR_LEN + length
        rec = ra.get(self._fd(seg), seg, off, size, REC_HDR_LEN, self._seg_sizes[seg])
        if len(rec) != size:
            return None
        magic, kind, flags, _r, obj, stored, logical, pcrc, hcrc = _REC_HDR.unpack_from(rec)
        if obj != pos or stored != length or logical != length or kind != _DATA or flags \
                or magic != REC_MAGIC or hcrc != crc32c(rec[:REC_HDR_LEN - 4]):
            return None
        data = rec[REC_HDR_LEN:]
        if crc32c(data) != pcrc:
            return None
        ra.hint = size  # the next miss reads ahead in records like this one
        self._advance(seg, off + size)
        return data

    def write_filemarks(self, count: int) -> None:
        """Write ``count`` filemarks (count 0 writes nothing). Durability is the caller's sync()."""
        for _ in range(count):
            self._append(RecordHeader(RecordType.FILEMARK, 0, 0, 0, crc32c(b"")), b"")

    def would_overflow(self, payload_len: int) -> bool:
        return self.used_bytes + REC_HDR_LEN + payload_len > self.capacity_bytes

    def check_writable(self) -> None:
        """Raise WormViolation when a write at the position would overwrite WORM data."""
        if self.worm and self._pos < self._count:
            raise WormViolation(f"object {self._pos} is before EOD {self._count}")

    def erase(self) -> None:
        """Make the position the new EOD (SSC-3 ERASE; short and long are the same here)."""
        self.check_writable()
        if self._pos < self._count:
            self._truncate(self._pos)

    # --- durability ----------------------------------------------------------------------------
    def sync(self) -> None:
        """Durability point: fsync written segments and the directory; maybe persist the index."""
        self._flush_files()
        if (self._count - self._index_count >= INDEX_SAVE_OBJECTS
                or self.used_bytes - self._index_used >= INDEX_SAVE_BYTES):
            self._save_index()

    def close(self) -> None:
        """Flush, persist the index, release file descriptors. Idempotent."""
        if self._closed:
            return
        self._flush_files()
        if self._count != self._index_count:
            self._save_index()
        self._release()
        self._closed = True

    def _release(self) -> None:
        self._ra.drop()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> Cartridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals: files ------------------------------------------------------------------------
    def _seg_path(self, seg: int) -> Path:
        return self.path / f"seg-{seg:06d}.dat"

    def _fd(self, seg: int) -> int:
        fd = self._fds.get(seg)
        if fd is None:
            fd = self._fds[seg] = os.open(self._seg_path(seg), os.O_RDWR)
        return fd

    def _close_fd(self, seg: int) -> None:
        fd = self._fds.pop(seg, None)
        if fd is not None:
            os.close(fd)

    def _new_segment(self, seg: int, first_object: int) -> None:
        assert seg == len(self._seg_sizes)
        fd = os.open(self._seg_path(seg), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._fds[seg] = fd
        os.pwrite(fd, SegmentHeader(seg, first_object).encode(), 0)
        self._seg_sizes.append(SEG_HDR_LEN)
        self._wb.restart(0)
        self._recount()
        self._dirty.add(seg)
        self._dir_dirty = True

    def _flush_files(self) -> None:
        failed, error = self._sealer.wait()
        if error is not None:  # not durable: fsynced again (here, and until it succeeds)
            self._dirty.update(failed)
        for seg in sorted(self._dirty):
            if seg < len(self._seg_sizes):
                os.fsync(self._fd(seg))
        self._dirty.clear()
        if self._dir_dirty:
            fsync_dir(self.path)
            self._dir_dirty = False
        if error is not None:  # this durability point still failed: the initiator hears it
            raise error

    # --- internals: positions --------------------------------------------------------------------
    def _end(self) -> tuple[int, int]:
        last = len(self._seg_sizes) - 1
        return last, self._seg_sizes[last]

    def _set_pos(self, obj: int, loc: tuple[int, int] | None = None) -> None:
        self._ra.drop()
        self._pos = obj
        self._loc = loc if loc is not None else (self._end() if obj == self._count else None)

    def _advance(self, seg: int, off: int) -> None:
        self._pos += 1
        if self._pos == self._count:
            self._loc = self._end()
        elif off >= self._seg_sizes[seg]:
            self._loc = (seg + 1, SEG_HDR_LEN)
        else:
            self._loc = (seg, off)

    def _location(self) -> tuple[int, int]:
        if self._loc is None:
            self._loc = self._find(self._pos)
        return self._loc

    def _find(self, obj: int) -> tuple[int, int]:
        """File position of object ``obj`` (< eod): sparse entry + at most STRIDE-1 hops."""
        if obj >= self._count:
            return self._end()
        packed = self._sparse[obj // INDEX_STRIDE]
        seg, off = packed >> 40, packed & ((1 << 40) - 1)
        for _ in range(obj % INDEX_STRIDE):
            hdr = RecordHeader.decode(os.pread(self._fd(seg), REC_HDR_LEN, off))
            off += hdr.size
            if off >= self._seg_sizes[seg]:
                seg, off = seg + 1, SEG_HDR_LEN
        return seg, off

    def _note_record(self, kind: RecordType, seg: int, off: int) -> None:
        """Add object ``_count`` (at seg/off) to the in-memory index."""
        if self._count % INDEX_STRIDE == 0:
            self._sparse.append((seg << 40) | off)
        if kind == RecordType.FILEMARK:
            self._fms.append(self._count)
        self._count += 1

    # --- internals: writing ----------------------------------------------------------------------
    def _append(self, hdr: RecordHeader, payload: bytes | memoryview) -> None:
        self._append_record(hdr.kind, hdr.compression, payload, hdr.logical_length,
                            hdr.payload_crc)

    def _append_record(self, kind: RecordType, comp: Compression, payload: bytes | memoryview,
                       logical: int, payload_crc: int) -> None:
        """Append one record with a single pwritev (header + payload, no copy of the payload).
        The header is packed here directly: this runs once per block."""
        stored = len(payload)
        self._ra.drop()
        if self._pos < self._count:
            self.check_writable()
            self._truncate(self._pos)
        if self.would_overflow(stored):
            raise VolumeOverflow(f"{self.used_bytes} of {self.capacity_bytes} bytes used")
        seg, off = self._end()
        size = REC_HDR_LEN + stored
        if off > SEG_HDR_LEN and off + size > self.segment_size:
            self._seal(seg)
            seg, off = seg + 1, SEG_HDR_LEN
            self._new_segment(seg, self._count)
        self._put_record(kind, comp, payload, logical, payload_crc, seg, off)

    def _put_record(self, kind: RecordType, comp: Compression, payload: bytes | memoryview,
                    logical: int, payload_crc: int, seg: int, off: int) -> None:
        """Write the record at EOD (``seg``/``off``, room checked) and account for it."""
        count = self._count
        stored = len(payload)
        body = _REC_HDR_BODY.pack(REC_MAGIC, kind, comp, 0, count, stored, logical, payload_crc)
        head = body + _CRC.pack(crc32c(body))
        fd = self._fds.get(seg)
        if fd is None:
            fd = self._fd(seg)
        size = REC_HDR_LEN + stored
        written = os.pwritev(fd, [head, payload] if stored else [head], off)
        if written != size:  # short write (disk full): write the rest plainly
            rest = (head + bytes(payload))[written:]
            while rest:
                n = os.pwrite(fd, rest, off + size - len(rest))
                rest = rest[n:]
        self._seg_sizes[seg] = end = off + size
        if self._wb.due(end):  # one compare per record; the syscall once per chunk
            self._wb.kick(fd, end)
        self._dirty.add(seg)
        self._note_record(kind, seg, off)
        self._pos = count + 1
        self._loc = (seg, end)

    def _seal(self, seg: int) -> None:
        """A full segment never changes again: its fsync runs in the background (waited for
        by the next durability point, :meth:`_flush_files`)."""
        self._sealer.seal(seg, self._fd(seg))
        self._dirty.discard(seg)

    def _drop_index(self) -> None:
        idx = self.path / INDEX_NAME
        if idx.exists():
            idx.unlink()
            fsync_dir(self.path)
        self._index_count = 0
        self._index_used = 0

    def _truncate(self, obj: int) -> None:
        """Durably cut the log so that ``obj`` becomes EOD, and persist the index of what stays.

        Everything before ``obj`` is fsynced first, so the saved index covers durable data.
        """
        seg, off = self._find(obj)
        if obj == 0:
            seg, off = 0, SEG_HDR_LEN
        self._flush_files()
        self._drop_index()
        os.ftruncate(self._fd(seg), off)
        os.fsync(self._fd(seg))
        for later in range(len(self._seg_sizes) - 1, seg, -1):
            self._close_fd(later)
            self._seg_path(later).unlink(missing_ok=True)
            self._dirty.discard(later)
        del self._seg_sizes[seg + 1:]
        self._seg_sizes[seg] = off
        self._wb.restart(off)  # everything before the cut was fsynced above
        self._recount()
        fsync_dir(self.path)
        self._dir_dirty = False
        del self._sparse[(obj + INDEX_STRIDE - 1) // INDEX_STRIDE:]
        del self._fms[bisect.bisect_left(self._fms, obj):]
        self._count = obj
        self._set_pos(obj, self._end())
        self._save_index()

    # --- internals: index file and recovery ----------------------------------------------------
    def _save_index(self) -> None:
        """Persist the index for the durable log (call only right after _flush_files)."""
        seg, off = self._end()
        sparse, fms = array("Q", self._sparse), array("Q", self._fms)
        if sys.byteorder != "little":
            sparse.byteswap()
            fms.byteswap()
        body = (_IDX_HDR.pack(IDX_MAGIC, IDX_VERSION, 0, INDEX_STRIDE, seg, off, self._count,
                              len(fms)) + sparse.tobytes() + fms.tobytes())
        atomic_write(self.path / INDEX_NAME, body + _CRC.pack(crc32c(body)))
        self._index_count = self._count
        self._index_used = self.used_bytes

    def _load_index(self, sizes: list[int]) -> bool:
        try:
            raw = (self.path / INDEX_NAME).read_bytes()
        except FileNotFoundError:
            return False
        if len(raw) < _IDX_HDR.size + 4 or _CRC.unpack_from(raw, len(raw) - 4)[0] != crc32c(raw[:-4]):
            return False
        magic, version, _r, stride, seg, off, count, nfm = _IDX_HDR.unpack_from(raw)
        nsparse = (count + stride - 1) // stride if stride else -1
        if (magic != IDX_MAGIC or version != IDX_VERSION or stride != INDEX_STRIDE
                or len(raw) != _IDX_HDR.size + 8 * (nsparse + nfm) + 4
                or seg >= len(sizes) or sizes[seg] < off):
            return False
        sparse = array("Q", raw[_IDX_HDR.size:_IDX_HDR.size + 8 * nsparse])
        fms = array("Q", raw[_IDX_HDR.size + 8 * nsparse:-4])
        if sys.byteorder != "little":
            sparse.byteswap()
            fms.byteswap()
        self._sparse, self._fms, self._count = sparse, fms, count
        self._seg_sizes = sizes[:seg] + [off]
        self._recount()
        self._index_count = count
        self._index_used = self.used_bytes
        return True

    def _recover(self) -> None:
        """Rebuild the index (from index.dat or from the start) and cut a torn/corrupt tail."""
        if has_evicted_segments(self.path):  # recovery would take the missing ones for a gap
            raise SegmentsEvicted(f"{self.path}: segments are in the object store; fetch them")
        segs: list[int] = []
        for entry in sorted(self.path.iterdir()):
            m = _SEG_RE.match(entry.name)
            if m:
                segs.append(int(m.group(1)))
        nsegs = 0
        while nsegs < len(segs) and segs[nsegs] == nsegs:
            nsegs += 1
        for stray in segs[nsegs:]:  # a gap: later files cannot belong to the log
            self._seg_path(stray).unlink()
        sizes = [self._seg_path(i).stat().st_size for i in range(nsegs)]
        if nsegs == 0 or not self._segment_ok(0, 0):
            for i in range(nsegs):
                self._close_fd(i)
                self._seg_path(i).unlink()
            self._drop_index()
            self._new_segment(0, 0)
            self._flush_files()
            return
        if not self._load_index(sizes):
            self._seg_sizes = [SEG_HDR_LEN]
        self._scan(sizes)

    def _segment_ok(self, seg: int, first_object: int) -> bool:
        try:
            hdr = SegmentHeader.decode(os.pread(self._fd(seg), SEG_HDR_LEN, 0))
        except (FormatError, OSError):
            return False
        return hdr.segment == seg and hdr.first_object == first_object

    def _scan(self, sizes: list[int]) -> None:
        seg, off = self._end()
        cut = False
        while True:
            if off >= sizes[seg]:
                if off == sizes[seg] and seg + 1 < len(sizes) and self._segment_ok(seg + 1, self._count):
                    seg, off = seg + 1, SEG_HDR_LEN
                    self._seg_sizes.append(off)
                    self._recount()
                    continue
                cut = seg + 1 < len(sizes) or off != sizes[seg]
                break
            fd = self._fd(seg)
            try:
                hdr = RecordHeader.decode(os.pread(fd, REC_HDR_LEN, off))
                if hdr.obj != self._count or off + hdr.size > sizes[seg]:
                    raise MediumCorrupt("torn record")
                payload = os.pread(fd, hdr.stored_length, off + REC_HDR_LEN) if hdr.stored_length else b""
                if crc32c(payload) != hdr.payload_crc:
                    raise MediumCorrupt("payload CRC mismatch")
            except MediumCorrupt:
                cut = True
                break
            self._note_record(hdr.kind, seg, off)
            off += hdr.size
            self._seg_sizes[seg] = off
        if cut:
            self._drop_index()
            os.ftruncate(self._fd(seg), off)
            os.fsync(self._fd(seg))
            for later in range(len(sizes) - 1, seg, -1):
                self._close_fd(later)
                self._seg_path(later).unlink()
            fsync_dir(self.path)
        self._wb.restart(self._end()[1])
        self._set_pos(0, (0, SEG_HDR_LEN) if self._count else None)


__all__ = [  # with the format's names re-exported from vtl.library.tapeformat
    "EVICTED_SUFFIX", "INDEX_NAME", "MAX_RECORD", "META_NAME", "REC_HDR_LEN", "SEG_HDR_LEN",
    "SEGMENT_SIZE", "Cartridge", "CartridgeBusy", "CartridgeError", "CartridgeMeta",
    "Compression", "FormatError", "MediumCorrupt", "RecordHeader", "RecordType",
    "SegmentHeader", "SegmentsEvicted", "SpaceResult", "Squeezer", "Stop", "TapeObject",
    "VolumeOverflow", "WormViolation", "atomic_write", "crc32c", "early_warning_size",
    "fsync_dir", "has_evicted_segments",
]
