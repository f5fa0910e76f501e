"""The element map of the media changer and the READ ELEMENT STATUS codec (SMC-3 READ ELEMENT STATUS).

Element address map (defaults; counts configurable, see :class:`ElementLayout`):

=====================  ===============  =====  ===========================
element type           first address    count  mtx numbering
=====================  ===============  =====  ===========================
medium transport (1)   0x0000           1      -
data transfer (4)      0x0100           10     Data Transfer Element 0..9
import/export (3)      0x0300           1600   slots 1601..3200
storage (2)            0x1000           1600   slots 1..1600
=====================  ===============  =====  ===========================

mtx numbers storage elements first and import/export elements after them, whatever their
addresses are; :meth:`ElementLayout.mtx_number` follows that.

Invariants: pure code (no I/O); every structure is a frozen dataclass with ``encode()``; every
struct has its size asserted; ranges of different element types never overlap.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Iterator

# SMC-3 element status data header / element status page header: the 3-byte
# byte counts are packed in a 32-bit field whose top byte is the reserved byte before them.
_DATA_HEADER = struct.Struct(">HHI")
_PAGE_HEADER = struct.Struct(">BBHI")
# SMC-3 element descriptors: the first 12 bytes every element descriptor shares.
_DESC_HEAD = struct.Struct(">HBBBBBBBBH")
_ID_HEAD = struct.Struct(">BBBB")
VOLUME_TAG_LEN = 36
assert _DATA_HEADER.size == 8
assert _PAGE_HEADER.size == 8
assert _DESC_HEAD.size == 12
assert _ID_HEAD.size == 4

MAX_BYTE_COUNT = 0xFFFFFF


class ElementType(enum.IntEnum):
    """SMC-3 READ ELEMENT STATUS, ELEMENT TYPE CODE."""

    ALL = 0
    MEDIUM_TRANSPORT = 1
    STORAGE = 2
    IMPORT_EXPORT = 3
    DATA_TRANSFER = 4


class MediumType(enum.IntEnum):
    """SMC-3 element descriptor MEDIUM TYPE (byte 9, bits 2-0)."""

    UNSPECIFIED = 0
    DATA = 1
    CLEANING = 2
    WORM = 3


class Flag(enum.IntFlag):
    """Byte 2 of an element descriptor (SMC-3 READ ELEMENT STATUS element descriptors); which bits apply depends on type."""

    FULL = 0x01
    IMPEXP = 0x02
    EXCEPT = 0x04
    ACCESS = 0x08
    EXENAB = 0x10
    INENAB = 0x20
    CMC = 0x40
    OIR = 0x80


# Bits of byte 2 each element type may carry.
_ALLOWED_FLAGS: dict[ElementType, Flag] = {
    ElementType.MEDIUM_TRANSPORT: Flag.FULL | Flag.EXCEPT,
    ElementType.STORAGE: Flag.FULL | Flag.EXCEPT | Flag.ACCESS,
    ElementType.IMPORT_EXPORT: Flag(0xFF),
    ElementType.DATA_TRANSFER: Flag.FULL | Flag.EXCEPT | Flag.ACCESS,
}

SVALID = 0x80


@dataclass(frozen=True, slots=True)
class ElementLayout:
    """Counts and first addresses of the four element types (SMC-3 Element Address Assignment page 1Dh)."""

    transports: int = 1
    drives: int = 10
    storage: int = 1600
    import_export: int = 1600
    transport_base: int = 0x0000
    drive_base: int = 0x0100
    ie_base: int = 0x0300
    storage_base: int = 0x1000

    def __post_init__(self) -> None:
        if self.transports < 1 or self.drives < 1 or self.storage < 1:
            raise ValueError("a library needs a transport, a drive and a storage slot")
        if self.import_export < 0:
            raise ValueError("import/export count must not be negative")
        spans = sorted((self.first(t), self.first(t) + self.count(t)) for t in self.types())
        for (_, end), (start, _) in zip(spans, spans[1:]):
            if start < end:
                raise ValueError("element address ranges overlap; raise the base addresses")
        if spans[-1][1] > 0x10000:
            raise ValueError("element addresses exceed 16 bits")

    @staticmethod
    def types() -> tuple[ElementType, ...]:
        return (ElementType.MEDIUM_TRANSPORT, ElementType.STORAGE,
                ElementType.IMPORT_EXPORT, ElementType.DATA_TRANSFER)

    def first(self, kind: ElementType) -> int:
        return {
            ElementType.MEDIUM_TRANSPORT: self.transport_base,
            ElementType.STORAGE: self.storage_base,
            ElementType.IMPORT_EXPORT: self.ie_base,
            ElementType.DATA_TRANSFER: self.drive_base,
        }[kind]

    def count(self, kind: ElementType) -> int:
        return {
            ElementType.MEDIUM_TRANSPORT: self.transports,
            ElementType.STORAGE: self.storage,
            ElementType.IMPORT_EXPORT: self.import_export,
            ElementType.DATA_TRANSFER: self.drives,
        }[kind]

    def addresses(self, kind: ElementType) -> range:
        """Addresses of one element type, or of all types in address order for ALL."""
        if kind == ElementType.ALL:
            raise ValueError("use all_addresses() for every element")
        return range(self.first(kind), self.first(kind) + self.count(kind))

    def all_addresses(self) -> Iterator[int]:
        ranges = sorted((self.addresses(t) for t in self.types()), key=lambda r: r.start)
        for r in ranges:
            yield from r

    def type_of(self, address: int) -> ElementType | None:
        for kind in self.types():
            if address in self.addresses(kind):
                return kind
        return None

    def drive_index(self, address: int) -> int:
        """0-based drive index of a data transfer element address."""
        if self.type_of(address) != ElementType.DATA_TRANSFER:
            raise ValueError(f"0x{address:04x} is not a data transfer element")
        return address - self.drive_base

    def drive_address(self, index: int) -> int:
        if not 0 <= index < self.drives:
            raise ValueError(f"no drive {index}")
        return self.drive_base + index

    def mtx_number(self, address: int) -> int | None:
        """mtx's number: storage 1..N, I/E N+1..N+M, drive index for drives, None otherwise."""
        kind = self.type_of(address)
        if kind == ElementType.STORAGE:
            return address - self.storage_base + 1
        if kind == ElementType.IMPORT_EXPORT:
            return self.storage + address - self.ie_base + 1
        if kind == ElementType.DATA_TRANSFER:
            return address - self.drive_base
        return None

    def address_of_mtx(self, kind: ElementType, number: int) -> int:
        """Inverse of :meth:`mtx_number` for STORAGE / IMPORT_EXPORT / DATA_TRANSFER."""
        if kind == ElementType.STORAGE and 1 <= number <= self.storage:
            return self.storage_base + number - 1
        if kind == ElementType.IMPORT_EXPORT and self.storage < number <= self.storage + self.import_export:
            return self.ie_base + number - self.storage - 1
        if kind == ElementType.DATA_TRANSFER and 0 <= number < self.drives:
            return self.drive_base + number
        raise ValueError(f"no {kind.name.lower()} element numbered {number}")


@dataclass(frozen=True, slots=True)
class VolumeTag:
    """SMC-3 volume tag: 32-byte identifier (left-aligned, blank padded), 2 reserved
    bytes, 2-byte volume sequence number."""

    identifier: str
    sequence: int = 0

    def encode(self) -> bytes:
        ident = self.identifier.encode("ascii")
        if len(ident) > 32:
            raise ValueError("volume identifier longer than 32 bytes")
        return ident.ljust(32, b" ") + struct.pack(">HH", 0, self.sequence)

    @classmethod
    def decode(cls, buf: bytes) -> "VolumeTag":
        if len(buf) < VOLUME_TAG_LEN:
            raise ValueError("volume tag shorter than 36 bytes")
        return cls(bytes(buf[:32]).decode("ascii").rstrip(" \x00"),
                   struct.unpack(">H", buf[34:36])[0])


EMPTY_VOLUME_TAG = bytes(VOLUME_TAG_LEN)


@dataclass(frozen=True, slots=True)
class DeviceIdentifier:
    """The identifier a data transfer element descriptor carries when DVCID=1 (SMC-3 data transfer element descriptor):
    code set, identifier type and identifier as in a VPD 0x83 designator (SPC-4 7.8.6)."""

    code_set: int
    identifier_type: int
    identifier: bytes

    def __post_init__(self) -> None:
        if len(self.identifier) > 255:
            raise ValueError("device identifier longer than 255 bytes")


@dataclass(frozen=True, slots=True)
class ElementDescriptor:
    """One element status descriptor (SMC-3: medium transport, storage, data
    transfer and import/export element descriptors). ``flags`` holds byte 2; bits not defined for the type are
    rejected. ``source`` is the SOURCE STORAGE ELEMENT ADDRESS (SVALID set when not None)."""

    address: int
    kind: ElementType
    flags: Flag = Flag(0)
    source: int | None = None
    volume_tag: VolumeTag | None = None
    medium_type: MediumType = MediumType.UNSPECIFIED
    asc: int = 0
    ascq: int = 0
    identifier: DeviceIdentifier | None = None

    def __post_init__(self) -> None:
        if self.kind == ElementType.ALL:
            raise ValueError("a descriptor has a concrete element type")
        if self.flags & ~_ALLOWED_FLAGS[self.kind]:
            raise ValueError(f"flags {self.flags!r} not defined for {self.kind.name}")

    @property
    def full(self) -> bool:
        return bool(self.flags & Flag.FULL)

    def encode(self, *, pvoltag: bool, identifier_len: int) -> bytes:
        """The descriptor as it sits in a page whose header says PVOLTAG=``pvoltag`` and whose
        descriptors reserve ``identifier_len`` identifier bytes (the page's descriptor length
        is 12 + 36*pvoltag + 4 + identifier_len)."""
        b9 = (SVALID if self.source is not None else 0) | (self.medium_type & 0x07)
        out = bytearray(_DESC_HEAD.pack(self.address, int(self.flags), 0, self.asc, self.ascq,
                                        0, 0, 0, b9, self.source or 0))
        if pvoltag:
            out += self.volume_tag.encode() if self.volume_tag is not None else EMPTY_VOLUME_TAG
        ident = self.identifier
        if ident is not None and len(ident.identifier) > identifier_len:
            raise ValueError("identifier longer than the page reserves")
        if ident is None:
            out += _ID_HEAD.pack(0, 0, 0, 0)
        else:
            out += _ID_HEAD.pack(ident.code_set & 0x0F, ident.identifier_type & 0x0F, 0,
                                 len(ident.identifier))
            out += ident.identifier
        out += bytes(descriptor_length(pvoltag, identifier_len) - len(out))
        return bytes(out)


def descriptor_length(pvoltag: bool, identifier_len: int) -> int:
    return _DESC_HEAD.size + (VOLUME_TAG_LEN if pvoltag else 0) + _ID_HEAD.size + identifier_len


@dataclass(frozen=True, slots=True)
class ElementStatusPage:
    """SMC-3 element status page: one element type's page header plus its descriptors (all one length)."""

    kind: ElementType
    descriptors: tuple[ElementDescriptor, ...]
    pvoltag: bool

    @property
    def identifier_len(self) -> int:
        return max((len(d.identifier.identifier) for d in self.descriptors
                    if d.identifier is not None), default=0)

    def encode(self) -> bytes:
        ident_len = self.identifier_len
        dlen = descriptor_length(self.pvoltag, ident_len)
        body = b"".join(d.encode(pvoltag=self.pvoltag, identifier_len=ident_len)
                        for d in self.descriptors)
        if len(body) > MAX_BYTE_COUNT:
            raise ValueError("element status page too large")
        head = _PAGE_HEADER.pack(int(self.kind), 0x80 if self.pvoltag else 0, dlen, len(body))
        return head + body


@dataclass(frozen=True, slots=True)
class ElementStatusData:
    """SMC-3 element status data: the whole READ ELEMENT STATUS parameter data.

    The header's BYTE COUNT OF REPORT AVAILABLE is the size of *all* pages, never adjusted to
    the allocation length (the caller truncates the encoded bytes afterwards)."""

    pages: tuple[ElementStatusPage, ...]

    @property
    def element_count(self) -> int:
        return sum(len(p.descriptors) for p in self.pages)

    @property
    def first_address(self) -> int:
        return self.pages[0].descriptors[0].address if self.element_count else 0

    def encode(self) -> bytes:
        body = b"".join(p.encode() for p in self.pages)
        if len(body) > MAX_BYTE_COUNT:
            raise ValueError("element status report too large")
        return _DATA_HEADER.pack(self.first_address, self.element_count, len(body)) + body


@dataclass(frozen=True, slots=True)
class ElementStatusHeader:
    """Decoded SMC-3 element status data header (for tests and initiators)."""

    first_address: int
    count: int
    byte_count: int

    @classmethod
    def decode(cls, buf: bytes) -> "ElementStatusHeader":
        if len(buf) < _DATA_HEADER.size:
            raise ValueError("element status header shorter than 8 bytes")
        first, count, byte_count = _DATA_HEADER.unpack_from(buf)
        return cls(first, count, byte_count & MAX_BYTE_COUNT)


def group_pages(descriptors: list[ElementDescriptor], pvoltag: bool) -> tuple[ElementStatusPage, ...]:
    """Cut descriptors (in address order) into pages, a new page whenever the type changes."""
    pages: list[ElementStatusPage] = []
    run: list[ElementDescriptor] = []
    for d in descriptors:
        if run and run[-1].kind != d.kind:
            pages.append(ElementStatusPage(run[0].kind, tuple(run), pvoltag))
            run = []
        run.append(d)
    if run:
        pages.append(ElementStatusPage(run[0].kind, tuple(run), pvoltag))
    return tuple(pages)
