"""The on-disk format of a virtual tape cartridge: segment and record headers, the objects read
back, the errors, and per-record compression (see :mod:`vtl.library.cartridge` for the log they
make up and its invariants).

Record (32-byte header + payload)::

    magic "VREC" | type u8 | flags u8 | reserved u16 | object u64 | stored length u32 |
    logical length u32 | CRC32C(payload) u32 | CRC32C(header bytes 0..27) u32

Every header carries a magic, a version (segments) and its own CRC32C; every payload its CRC32C.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from pathlib import Path

import crc32c as _crc32c

MiB = 1024 * 1024

MAX_RECORD = 16 * MiB
"""Largest payload a record may carry (the drive caps blocks far lower)."""


def crc32c(data: bytes | bytearray | memoryview) -> int:
    return _crc32c.crc32c(data)


# --- codecs ---------------------------------------------------------------------------------

SEG_MAGIC = b"VTLTSEG\x00"
SEG_VERSION = 1
_SEG_HDR = struct.Struct(">8sHHIQII")  # magic, version, flags, segment, first object, rsvd, crc
SEG_HDR_LEN = 32
assert _SEG_HDR.size == SEG_HDR_LEN

REC_MAGIC = b"VREC"
_REC_HDR = struct.Struct(">4sBBHQIIII")
REC_HDR_LEN = 32
assert _REC_HDR.size == REC_HDR_LEN
_REC_HDR_BODY = struct.Struct(">4sBBHQIII")  # the header without its own CRC
assert _REC_HDR_BODY.size == REC_HDR_LEN - 4

IDX_MAGIC = b"VTLTIDX\x00"
IDX_VERSION = 1
_IDX_HDR = struct.Struct(">8sHHIIQQQ")  # magic, version, rsvd, stride, end seg, end off, objects, fms
assert _IDX_HDR.size == 44
_CRC = struct.Struct(">I")


class CartridgeError(Exception):
    """Base of cartridge errors; the drive maps each subclass to sense data."""


class FormatError(CartridgeError):
    """Not a cartridge directory, or metadata of an unknown format/version."""


class MediumCorrupt(CartridgeError):
    """A record failed its CRC on read (drive: MEDIUM ERROR 11/00)."""


class WormViolation(CartridgeError):
    """Overwrite attempted on a WORM cartridge (drive: DATA PROTECT 30/0C)."""


class CartridgeBusy(CartridgeError):
    """Another Cartridge object (in this or another process) has the directory open."""


class VolumeOverflow(CartridgeError):
    """The record does not fit before the hard end of the medium (drive: VOLUME OVERFLOW)."""


class SegmentsEvicted(CartridgeError):
    """Sealed segments were evicted to the object store (stubs ``seg-NNNNNN.dat.evicted``):
    the cartridge opens only once they are fetched back, never with a hole in its log."""


EVICTED_SUFFIX = ".evicted"
"""A sealed segment replaced by a stub (the cloud tier's cache eviction) is named
``seg-NNNNNN.dat`` + this suffix."""


def has_evicted_segments(path: Path) -> bool:
    """True if some segment of the cartridge at ``path`` is only a stub (see SegmentsEvicted)."""
    try:
        return any(entry.name.endswith(EVICTED_SUFFIX) for entry in Path(path).iterdir())
    except FileNotFoundError:
        return False


class RecordType(enum.IntEnum):
    """Kinds of log records. EOD is not a record: it is the end of the log."""

    DATA = 1
    FILEMARK = 2


class Compression(enum.IntEnum):
    """Per-record compression (record header ``flags`` bits 0-3). NONE and ZSTD are written
    (ZSTD when the drive's DCE is set and the block shrinks); ZLIB is only read."""

    NONE = 0
    ZLIB = 1
    ZSTD = 2


class Squeezer:
    """Adaptive per-record zstd (level 1): a block is stored compressed only when that saves
    at least 1/8. After a block that does not compress, the next ``skip`` blocks are stored
    as they are without trying (``skip`` doubles up to MAX_SKIP while data stays
    incompressible), so random or already-compressed streams cost almost nothing."""

    MAX_SKIP = 64

    def __init__(self, level: int = 1) -> None:
        import zstandard  # C extension; imported when a drive first compresses

        self._zc = zstandard.ZstdCompressor(level=level)
        self._skip = 0
        self._backoff = 1
        self.tried = self.kept = 0

    def squeeze(self, data: bytes | memoryview) -> bytes | None:
        if self._skip:
            self._skip -= 1
            return None
        self.tried += 1
        out = self._zc.compress(data)
        if len(out) > len(data) - len(data) // 8:
            self._skip = self._backoff
            self._backoff = min(self.MAX_SKIP, self._backoff * 2)
            return None
        self._backoff = 1
        self.kept += 1
        return out


_KINDS = {k.value: k for k in RecordType}
_COMPRESSIONS = {c.value: c for c in Compression}


def _unzstd(data: bytes, size: int) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    """The 32-byte header at the start of every segment file."""

    segment: int
    first_object: int
    version: int = SEG_VERSION

    def encode(self) -> bytes:
        body = _SEG_HDR.pack(SEG_MAGIC, self.version, 0, self.segment, self.first_object, 0, 0)
        return body[:-4] + _CRC.pack(crc32c(body[:-4]))

    @classmethod
    def decode(cls, buf: bytes) -> SegmentHeader:
        if len(buf) < SEG_HDR_LEN:
            raise FormatError("segment header truncated")
        magic, version, _flags, seg, first, _r, crc = _SEG_HDR.unpack_from(buf)
        if magic != SEG_MAGIC:
            raise FormatError("bad segment magic")
        if crc != crc32c(buf[: SEG_HDR_LEN - 4]):
            raise FormatError("segment header CRC mismatch")
        if version != SEG_VERSION:
            raise FormatError(f"unsupported segment version {version}")
        return cls(seg, first, version)


@dataclass(frozen=True, slots=True)
class RecordHeader:
    """The 32-byte header of one record; ``stored_length`` bytes of payload follow."""

    kind: RecordType
    obj: int
    stored_length: int
    logical_length: int
    payload_crc: int
    compression: Compression = Compression.NONE

    def encode(self) -> bytes:
        body = _REC_HDR.pack(REC_MAGIC, self.kind, self.compression, 0, self.obj,
                             self.stored_length, self.logical_length, self.payload_crc, 0)
        return body[:-4] + _CRC.pack(crc32c(body[:-4]))

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview) -> RecordHeader:
        if len(buf) < REC_HDR_LEN:
            raise MediumCorrupt("record header truncated")
        magic, kind, flags, _r, obj, stored, logical, pcrc, hcrc = _REC_HDR.unpack_from(buf)
        if magic != REC_MAGIC or hcrc != crc32c(buf[: REC_HDR_LEN - 4]):
            raise MediumCorrupt("bad record header")
        rtype, comp = _KINDS.get(kind), _COMPRESSIONS.get(flags & 0x0F)  # once per block read
        if rtype is None or comp is None:
            raise MediumCorrupt("unknown record type or compression")
        if stored > MAX_RECORD or logical > MAX_RECORD:
            raise MediumCorrupt("record length out of range")
        if rtype == RecordType.FILEMARK and (stored or logical):
            raise MediumCorrupt("filemark with payload")
        return cls(rtype, obj, stored, logical, pcrc, comp)

    @property
    def size(self) -> int:
        return REC_HDR_LEN + self.stored_length


@dataclass(frozen=True, slots=True)
class TapeObject:
    """What :meth:`Cartridge.read_next` returns: a data block or a filemark."""

    kind: RecordType
    data: bytes | memoryview = b""  # a read-only view of an immutable buffer: valid for good

    @property
    def is_filemark(self) -> bool:
        return self.kind == RecordType.FILEMARK


class Stop(enum.Enum):
    """Why a space operation ended early (SSC-3 7.x SPACE)."""

    NONE = "none"
    FILEMARK = "filemark"
    EOD = "eod"
    BOP = "bop"


@dataclass(frozen=True, slots=True)
class SpaceResult:
    """Outcome of a space/locate: ``residue`` is the count not spaced (always >= 0)."""

    stop: Stop = Stop.NONE
    residue: int = 0
