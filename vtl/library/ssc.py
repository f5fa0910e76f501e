"""SSC-3 data structures of the tape drive: parameter data returned by READ BLOCK LIMITS, READ
POSITION, REPORT DENSITY SUPPORT, the SSC mode pages and the MAM attributes of READ ATTRIBUTE.

Pure codecs: every structure is a frozen dataclass with ``encode()``; sizes are asserted.
The drive state machine (``vtl.library.drive``) decides the values.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

# --- densities ---------------------------------------------------------------------------------


class Density(enum.IntEnum):
    """Density codes (SSC-3 annex, IBM LTO SCSI reference)."""

    DEFAULT = 0x00
    LTO3 = 0x44
    LTO4 = 0x46
    LTO5 = 0x58
    NO_CHANGE = 0x7F


class SpaceCode(enum.IntEnum):
    """SSC-3 7.x SPACE(6) / SPACE(16) CODE field."""

    BLOCKS = 0
    FILEMARKS = 1
    SEQUENTIAL_FILEMARKS = 2
    END_OF_DATA = 3


class PositionForm(enum.IntEnum):
    """READ POSITION service actions (SSC-3 7.7, table 36)."""

    SHORT = 0x00
    SHORT_VENDOR = 0x01
    LONG = 0x06
    EXTENDED = 0x08


class LocateDest(enum.IntEnum):
    """LOCATE(16) DEST_TYPE (SSC-4 7.6)."""

    OBJECT = 0
    FILE = 1
    END_OF_DATA = 3


def signed24(raw: int) -> int:
    """A two's complement 24-bit count (SPACE(6) COUNT)."""
    return raw - (1 << 24) if raw & 0x800000 else raw


def signed64(raw: int) -> int:
    return raw - (1 << 64) if raw & (1 << 63) else raw


# --- READ BLOCK LIMITS (SSC-3 7.5) -------------------------------------------------------------

_RBL = struct.Struct(">B3sH")
assert _RBL.size == 6


@dataclass(frozen=True, slots=True)
class BlockLimits:
    """READ BLOCK LIMITS data: GRANULARITY, MAXIMUM and MINIMUM BLOCK LENGTH LIMIT."""

    maximum: int
    minimum: int = 1
    granularity: int = 0

    def encode(self) -> bytes:
        return _RBL.pack(self.granularity & 0x1F, self.maximum.to_bytes(3, "big"), self.minimum)


# --- READ POSITION (SSC-3 7.7) ------------------------------------------------------------------

_POS_SHORT = struct.Struct(">BBHIIB3sI")
assert _POS_SHORT.size == 20
_POS_LONG = struct.Struct(">B3sIQQQ")
assert _POS_LONG.size == 32
_POS_EXT = struct.Struct(">BBHB3sQQQ")
assert _POS_EXT.size == 32


@dataclass(frozen=True, slots=True)
class TapePosition:
    """Where the drive is. ``first``/``last`` are logical object identifiers; ``file`` is the
    logical file identifier (filemarks before the position). Nothing is ever buffered: the
    object and byte counts of the buffer are zero and exact."""

    bop: bool
    eop: bool
    bpew: bool
    first: int
    last: int
    file: int
    partition: int = 0

    def flags(self) -> int:
        return (0x80 if self.bop else 0) | (0x40 if self.eop else 0) | (0x01 if self.bpew else 0)

    def encode_short(self) -> bytes:
        """Short form (00h/01h): BOP EOP LOCU BYCU rsvd LOLU PERR BPEW; LOLU (old BPU) clear."""
        if self.first > 0xFFFFFFFF:  # cannot be reported in 32 bits: LOLU and PERR
            return _POS_SHORT.pack(self.flags() | 0x06, self.partition, 0, 0, 0, 0, b"\0\0\0", 0)
        return _POS_SHORT.pack(self.flags(), self.partition, 0, self.first, self.last, 0,
                               b"\0\0\0", 0)

    def encode_long(self) -> bytes:
        """Long form (06h): BOP EOP rsvd rsvd MPU LONU rsvd BPEW; object, file, set numbers."""
        return _POS_LONG.pack(self.flags(), b"\0\0\0", self.partition, self.first, self.file, 0)

    def encode_extended(self) -> bytes:
        """Extended form (08h): short-form flags, ADDITIONAL LENGTH 1Ch, 64-bit locations."""
        return _POS_EXT.pack(self.flags(), self.partition, 0x1C, 0, b"\0\0\0", self.first,
                             self.last, 0)


# --- REPORT DENSITY SUPPORT (SSC-3 7.8) -----------------------------------------------------------

_DENSITY = struct.Struct(">BBBH3sHHI8s8s20s")
assert _DENSITY.size == 52


@dataclass(frozen=True, slots=True)
class DensityDescriptor:
    """One density support data descriptor (SSC-3 7.8.2, table 41)."""

    primary: int
    secondary: int
    writable: bool
    default: bool
    bits_per_mm: int
    media_width: int  # tenths of a millimetre
    tracks: int
    capacity_mb: int  # 10^6 bytes
    organization: str
    name: str
    description: str

    def encode(self) -> bytes:
        flags = (0x80 if self.writable else 0) | (0x20 if self.default else 0)
        return _DENSITY.pack(self.primary, self.secondary, flags, 0,
                             self.bits_per_mm.to_bytes(3, "big"), self.media_width, self.tracks,
                             self.capacity_mb, _ascii(self.organization, 8), _ascii(self.name, 8),
                             _ascii(self.description, 20))


LTO5_DENSITY = DensityDescriptor(Density.LTO5, Density.LTO5, True, True, 15142, 127, 1280,
                                 1_500_000, "LTO-CVE", "U-516", "Ultrium 5/16T")
LTO4_DENSITY = DensityDescriptor(Density.LTO4, Density.LTO4, True, False, 13250, 127, 896,
                                 800_000, "LTO-CVE", "U-416", "Ultrium 4/16T")


def density_support(descriptors: list[DensityDescriptor]) -> bytes:
    """REPORT DENSITY SUPPORT data: 4-byte header (AVAILABLE DENSITY DESCRIPTOR LENGTH)."""
    body = b"".join(d.encode() for d in descriptors)
    return struct.pack(">HH", len(body) + 2, 0) + body


def _ascii(text: str, width: int) -> bytes:
    raw = text.encode("ascii")[:width]
    return raw + b" " * (width - len(raw))


# --- mode pages (SSC-3 8.3, SPC-4 7.5) ------------------------------------------------------------


class SscModePage(enum.IntEnum):
    DATA_COMPRESSION = 0x0F
    DEVICE_CONFIGURATION = 0x10
    MEDIUM_PARTITION = 0x11
    INFORMATIONAL_EXCEPTIONS = 0x1C


_COMPRESSION = struct.Struct(">BBBBII4x")
assert _COMPRESSION.size == 16
_DEVCONF = struct.Struct(">BBBBBBHBBB3sBB")
assert _DEVCONF.size == 16
_PARTITION = struct.Struct(">BBBBBBBBH")
assert _PARTITION.size == 10
_IEC = struct.Struct(">BBBBII")
assert _IEC.size == 12

COMPRESSION_ALGORITHM = 0x01  # reported when DCE is set (the data itself is stored as is)


@dataclass(frozen=True, slots=True)
class CompressionPage:
    """Data compression page 0Fh (SSC-3 8.3.2): DCE/DCC/DDE."""

    dce: bool = False

    def encode(self) -> bytes:
        algo = COMPRESSION_ALGORITHM if self.dce else 0
        return _COMPRESSION.pack(0x0F, 0x0E, (0x80 if self.dce else 0) | 0x40, 0x80, algo,
                                 COMPRESSION_ALGORITHM)

    @staticmethod
    def changeable() -> bytes:
        return _COMPRESSION.pack(0x0F, 0x0E, 0x80, 0, 0, 0)

    @classmethod
    def decode(cls, page: bytes) -> CompressionPage:
        return cls(dce=len(page) > 2 and bool(page[2] & 0x80))


@dataclass(frozen=True, slots=True)
class DeviceConfigurationPage:
    """Device configuration page 10h (SSC-3 8.3.3). LOIS=1 (object identifiers), EEG=1,
    SEW=1; REW (report early warning on read) is off; SELECT DATA COMPRESSION ALGORITHM follows
    the DCE setting."""

    compression: bool = False

    def encode(self) -> bytes:
        return _DEVCONF.pack(0x10, 0x0E, 0, 0, 0, 0, 0, 0x40, 0, 0x18, b"\0\0\0",
                             1 if self.compression else 0, 0)

    @staticmethod
    def changeable() -> bytes:
        return _DEVCONF.pack(0x10, 0x0E, 0, 0, 0, 0, 0, 0, 0, 0, b"\0\0\0", 0xFF, 0)


@dataclass(frozen=True, slots=True)
class MediumPartitionPage:
    """Medium partition page 11h (SSC-3 8.3.4): one partition, size in GB (PSUM 11b, units 9)."""

    capacity_bytes: int = 0

    def encode(self) -> bytes:
        size_gb = min(0xFFFF, self.capacity_bytes // 10**9)
        return _PARTITION.pack(0x11, 0x08, 0, 0, 0x18, 0x03, 0x09, 0, size_gb)

    @staticmethod
    def changeable() -> bytes:
        return _PARTITION.pack(0x11, 0x08, 0, 0, 0, 0, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class InformationalExceptionsPage:
    """Informational exceptions control page 1Ch (SPC-4 7.5.10): TapeAlert by polling only
    (DEXCPT=1, MRIE=0); LOG SENSE page 2Eh carries the flags."""

    def encode(self) -> bytes:
        return _IEC.pack(0x1C, 0x0A, 0x08, 0x00, 0, 0)

    @staticmethod
    def changeable() -> bytes:
        return _IEC.pack(0x1C, 0x0A, 0x08, 0x0F, 0, 0)


# --- MAM attributes (SPC-4 7.4) --------------------------------------------------------------------


class AttrFormat(enum.IntEnum):
    """SPC-4 7.4.1 table 302."""

    BINARY = 0
    ASCII = 1
    TEXT = 2


class AttrId(enum.IntEnum):
    """Medium auxiliary memory attribute identifiers (SPC-4 7.4.2)."""

    REMAINING_CAPACITY = 0x0000
    MAXIMUM_CAPACITY = 0x0001
    TAPEALERT_FLAGS = 0x0002
    LOAD_COUNT = 0x0003
    MAM_SPACE_REMAINING = 0x0004
    ASSIGNING_ORGANIZATION_1 = 0x0005
    FORMATTED_DENSITY_CODE = 0x0006
    INITIALIZATION_COUNT = 0x0007
    TOTAL_MB_WRITTEN_LIFE = 0x0220
    TOTAL_MB_READ_LIFE = 0x0221
    TOTAL_MB_WRITTEN_LOAD = 0x0222
    TOTAL_MB_READ_LOAD = 0x0223
    MEDIUM_MANUFACTURER = 0x0400
    MEDIUM_SERIAL_NUMBER = 0x0401
    MEDIUM_LENGTH = 0x0402
    MEDIUM_WIDTH = 0x0403
    ASSIGNING_ORGANIZATION_2 = 0x0404
    MEDIUM_DENSITY_CODE = 0x0405
    MEDIUM_MANUFACTURE_DATE = 0x0406
    MAM_CAPACITY = 0x0407
    MEDIUM_TYPE = 0x0408
    MEDIUM_TYPE_INFORMATION = 0x0409
    BARCODE = 0x0806


_ATTR_HEAD = struct.Struct(">HBH")
assert _ATTR_HEAD.size == 5


class ReadAttributeAction(enum.IntEnum):
    """READ ATTRIBUTE service actions (SPC-4 6.16, table 172)."""

    ATTRIBUTE_VALUES = 0x00
    ATTRIBUTE_LIST = 0x01
    LOGICAL_VOLUME_LIST = 0x02
    PARTITION_LIST = 0x03
    SUPPORTED_ATTRIBUTES = 0x05


@dataclass(frozen=True, slots=True)
class Attribute:
    """One attribute (SPC-4 7.4.1, table 301): identifier, READ ONLY, FORMAT, value."""

    ident: int
    fmt: AttrFormat
    value: bytes
    read_only: bool = True

    @classmethod
    def binary(cls, ident: int, value: int, size: int) -> Attribute:
        return cls(ident, AttrFormat.BINARY, value.to_bytes(size, "big"))

    @classmethod
    def ascii(cls, ident: int, text: str, size: int, *, read_only: bool = True) -> Attribute:
        return cls(ident, AttrFormat.ASCII, _ascii(text, size), read_only)

    def encode(self) -> bytes:
        flags = (0x80 if self.read_only else 0) | self.fmt
        return _ATTR_HEAD.pack(self.ident, flags, len(self.value)) + self.value


HOST_ATTRIBUTES = range(0x0800, 0x0C00)
"""Host type attributes (SPC-4 7.4.2.4): an application may write these with WRITE ATTRIBUTE."""
VENDOR_HOST_ATTRIBUTES = range(0x1400, 0x1800)
MAX_HOST_ATTRIBUTE_LEN = 1024


def decode_attribute_list(data: bytes) -> list[Attribute]:
    """WRITE ATTRIBUTE parameter data (SPC-4 6.40): PARAMETER DATA LENGTH + attributes.

    Raises ValueError(offset) naming the byte in error; the caller builds the sense data.
    """
    if len(data) < 4:
        raise ValueError(0)
    total = int.from_bytes(data[:4], "big")
    if total + 4 > len(data):
        raise ValueError(0)
    pos, end = 4, 4 + total
    out: list[Attribute] = []
    while pos < end:
        if end - pos < _ATTR_HEAD.size:
            raise ValueError(pos)
        ident, flags, length = _ATTR_HEAD.unpack_from(data, pos)
        if pos + _ATTR_HEAD.size + length > end:
            raise ValueError(pos + 3)
        try:
            fmt = AttrFormat(flags & 0x03)
        except ValueError:
            raise ValueError(pos + 2) from None
        value = bytes(data[pos + _ATTR_HEAD.size:pos + _ATTR_HEAD.size + length])
        out.append(Attribute(ident, fmt, value, read_only=False))
        pos += _ATTR_HEAD.size + length
    return out


def attribute_values(attrs: list[Attribute], first: int) -> bytes:
    """ATTRIBUTE VALUES data: AVAILABLE DATA (4 bytes) + attributes with id >= ``first``."""
    body = b"".join(a.encode() for a in sorted(attrs, key=lambda a: a.ident) if a.ident >= first)
    return struct.pack(">I", len(body)) + body


def attribute_list(attrs: list[Attribute]) -> bytes:
    """ATTRIBUTE LIST data: AVAILABLE DATA (4 bytes) + 2-byte identifiers, ascending."""
    body = b"".join(struct.pack(">H", a.ident) for a in sorted(attrs, key=lambda a: a.ident))
    return struct.pack(">I", len(body)) + body
