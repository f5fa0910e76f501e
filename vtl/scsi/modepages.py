"""Mode parameters (SPC-4 7.5): headers, block descriptors, mode pages, MODE SENSE/SELECT data.

A :class:`ModePage` holds the parameter bytes of one page: ``default``, ``changeable`` (the
mask MODE SENSE reports for PC=01b and MODE SELECT enforces) and ``current``. These are the
bytes AFTER the page header, i.e. spec bytes 2..n of a page_0 page or 4..n of a sub_page page.
The validators and apply callbacks instead see the whole page as sent (header included), so the
byte numbers they use are the ones in the spec tables; their field pointers are relative to the
page's byte 0 and are rebased here onto the parameter list.

Invariants:
- MODE SELECT is parsed and validated completely before anything is applied: a rejected
  parameter list changes nothing (apply callbacks that raise are the only exception, and they
  are documented to validate first).
- Every length is checked against the bytes present: truncation -> PARAMETER LIST LENGTH ERROR
  (1A/00); a wrong page length, unknown page or non-changeable bit -> INVALID FIELD IN PARAMETER
  LIST (26/00) with a field pointer into the parameter list (SPC-4 6.9, 7.5.1).
- Saved values are not implemented separately: a page flagged ``saveable`` reports its current
  values for PC=11b; MODE SENSE PC=11b on any other page answers SAVING PARAMETERS NOT
  SUPPORTED (39/00), as SPC-4 6.11 requires.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Callable, Sequence

from vtl.scsi.sense import Asc, FieldPointer, SenseError, SenseKey, illegal_request

HEADER6_LEN = 4
HEADER10_LEN = 8
_HEADER6 = struct.Struct(">BBBB")
assert _HEADER6.size == HEADER6_LEN
_HEADER10 = struct.Struct(">HBBBxH")
assert _HEADER10.size == HEADER10_LEN
_GENERAL_BD = struct.Struct(">II")  # density(8)|blocks(24), reserved(8)|block length(24)
assert _GENERAL_BD.size == 8
_SHORT_LBA_BD = struct.Struct(">II")  # blocks(32), reserved(8)|block length(24)
assert _SHORT_LBA_BD.size == 8
_LONG_LBA_BD = struct.Struct(">Q4xI")
assert _LONG_LBA_BD.size == 16

SAVING_PARAMETERS_NOT_SUPPORTED = Asc.SAVING_PARAMETERS_NOT_SUPPORTED  # 39/00, SPC-4 annex D
ALL_PAGES = 0x3F
ALL_SUBPAGES = 0xFF

PageValidator = Callable[[bytes], None]


class PageControl(enum.IntEnum):
    """MODE SENSE PC field, SPC-4 6.11 table 97."""

    CURRENT = 0
    CHANGEABLE = 1
    DEFAULT = 2
    SAVED = 3


class DescriptorFormat(enum.IntEnum):
    """Which block descriptor layout a device uses (SPC-4 7.5.5, SBC-3 6.4.2/6.4.3)."""

    GENERAL = 0  # density code, 3-byte number of blocks, 3-byte block length (tape, changer)
    SHORT_LBA = 1  # 4-byte number of logical blocks, 3-byte logical block length (disk)
    LONG_LBA = 2  # 8-byte number of logical blocks, 4-byte length (MODE x(10) with LONGLBA)

    @property
    def size(self) -> int:
        return 16 if self is DescriptorFormat.LONG_LBA else 8


@dataclass(frozen=True, slots=True)
class BlockDescriptor:
    """One mode parameter block descriptor.

    ``BlockDescriptor(density_code=0x58, number_of_blocks=0, block_length=0)`` for a tape in
    variable-block mode; ``BlockDescriptor(number_of_blocks=n, block_length=512)`` for a disk
    (density code is not carried by the LBA formats). Values too large for a short form are
    reported saturated (all ones), as SBC-3 6.4.2 specifies for the number of blocks.
    """

    density_code: int = 0
    number_of_blocks: int = 0
    block_length: int = 0

    def encode(self, fmt: DescriptorFormat = DescriptorFormat.GENERAL) -> bytes:
        if fmt is DescriptorFormat.GENERAL:
            blocks = min(self.number_of_blocks, 0xFFFFFF)
            return _GENERAL_BD.pack(((self.density_code & 0xFF) << 24) | blocks,
                                    min(self.block_length, 0xFFFFFF))
        if fmt is DescriptorFormat.SHORT_LBA:
            return _SHORT_LBA_BD.pack(min(self.number_of_blocks, 0xFFFFFFFF),
                                      min(self.block_length, 0xFFFFFF))
        return _LONG_LBA_BD.pack(min(self.number_of_blocks, (1 << 64) - 1),
                                 min(self.block_length, 0xFFFFFFFF))

    @classmethod
    def decode(cls, buf: bytes,
               fmt: DescriptorFormat = DescriptorFormat.GENERAL) -> "BlockDescriptor":
        if len(buf) < fmt.size:
            raise ValueError("block descriptor truncated")
        if fmt is DescriptorFormat.GENERAL:
            w0, w1 = _GENERAL_BD.unpack_from(buf)
            return cls(density_code=w0 >> 24, number_of_blocks=w0 & 0xFFFFFF,
                       block_length=w1 & 0xFFFFFF)
        if fmt is DescriptorFormat.SHORT_LBA:
            w0, w1 = _SHORT_LBA_BD.unpack_from(buf)
            return cls(number_of_blocks=w0, block_length=w1 & 0xFFFFFF)
        blocks, length = _LONG_LBA_BD.unpack_from(buf)
        return cls(number_of_blocks=blocks, block_length=length)


@dataclass(frozen=True, slots=True)
class ModeParameterHeader:
    """Mode parameter header, SPC-4 7.5.4 (6-byte form: 4 bytes; 10-byte form: 8 bytes).

    ``mode_data_length`` is reserved in MODE SELECT and computed by :func:`build_mode_data`.
    """

    medium_type: int = 0
    device_specific: int = 0
    block_descriptor_length: int = 0
    mode_data_length: int = 0
    long_lba: bool = False

    def encode6(self) -> bytes:
        return _HEADER6.pack(self.mode_data_length & 0xFF, self.medium_type & 0xFF,
                             self.device_specific & 0xFF, self.block_descriptor_length & 0xFF)

    def encode10(self) -> bytes:
        return _HEADER10.pack(self.mode_data_length & 0xFFFF, self.medium_type & 0xFF,
                              self.device_specific & 0xFF, 0x01 if self.long_lba else 0,
                              self.block_descriptor_length & 0xFFFF)

    @classmethod
    def decode6(cls, buf: bytes) -> "ModeParameterHeader":
        if len(buf) < HEADER6_LEN:
            raise ValueError("mode parameter header(6) truncated")
        mdl, mt, dsp, bdl = _HEADER6.unpack_from(buf)
        return cls(medium_type=mt, device_specific=dsp, block_descriptor_length=bdl,
                   mode_data_length=mdl)

    @classmethod
    def decode10(cls, buf: bytes) -> "ModeParameterHeader":
        if len(buf) < HEADER10_LEN:
            raise ValueError("mode parameter header(10) truncated")
        mdl, mt, dsp, b4, bdl = _HEADER10.unpack_from(buf)
        return cls(medium_type=mt, device_specific=dsp, block_descriptor_length=bdl,
                   mode_data_length=mdl, long_lba=bool(b4 & 0x01))


@dataclass(slots=True, eq=False)
class ModePage:
    """One mode page (SPC-4 7.5.7) and its current values.

    Construct with the parameter bytes after the header::

        ModePage(0x0A, default=bytes(10), changeable=bytes(10))            # page_0 format
        ModePage(0x0A, 0x01, default=bytes(28))                              # sub_page format

    ``changeable`` empty means nothing is changeable (an all-zero mask). ``current`` starts as
    a copy of ``default``. Mutable on purpose: the page object *is* the LU's current setting;
    a device either keeps its pages and reads ``current``, or rebuilds pages from its own state
    on every call and uses ``apply`` to take new values.

    ``validate(page)`` and ``apply(page)`` receive the whole new page (header + parameters,
    spec byte numbering). ``validate`` raises SenseError (e.g. 26/02 PARAMETER VALUE INVALID
    with ``FieldPointer(byte, bit, in_cdb=False)`` relative to the page's byte 0); ``apply``
    takes the values (it runs only after every page in the list validated). After ``apply``
    ``current`` is replaced by the new parameters.
    """

    code: int
    subpage: int = 0
    default: bytes = b""
    changeable: bytes = b""
    saveable: bool = False
    current: bytes | None = None
    validate: PageValidator | None = None
    apply: PageValidator | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.code < ALL_PAGES:
            raise ValueError(f"mode page code 0x{self.code:02x} out of range")
        if not 0 <= self.subpage < ALL_SUBPAGES:
            raise ValueError(f"mode subpage 0x{self.subpage:02x} out of range")
        limit = 0xFFFF if self.subpage else 0xFF
        if len(self.default) > limit:
            raise ValueError(f"mode page 0x{self.code:02x} too long")
        self.default = bytes(self.default)
        if not self.changeable:
            self.changeable = bytes(len(self.default))
        if len(self.changeable) != len(self.default):
            raise ValueError(f"mode page 0x{self.code:02x}: mask and default differ in length")
        self.current = bytes(self.default if self.current is None else self.current)
        if len(self.current) != len(self.default):
            raise ValueError(f"mode page 0x{self.code:02x}: current and default differ in length")

    @property
    def key(self) -> tuple[int, int]:
        return self.code, self.subpage

    @property
    def header_len(self) -> int:
        """2 for the page_0 format, 4 for the sub_page format (SPC-4 7.5.7.1)."""
        return 4 if self.subpage else 2

    @property
    def length(self) -> int:
        return len(self.default)

    def values(self, pc: PageControl) -> bytes:
        if pc is PageControl.CHANGEABLE:
            return self.changeable
        if pc is PageControl.DEFAULT:
            return self.default
        assert self.current is not None
        return self.current

    def header(self) -> bytes:
        b0 = (0x80 if self.saveable else 0) | self.code
        if self.subpage:
            return bytes([b0 | 0x40, self.subpage]) + struct.pack(">H", self.length)
        return bytes([b0, self.length])

    def encode(self, pc: PageControl = PageControl.CURRENT) -> bytes:
        """The page as MODE SENSE returns it (PS bit set when saveable)."""
        return self.header() + self.values(pc)

    def restore_default(self) -> None:
        self.current = self.default


def select_pages(pages: Sequence[ModePage], code: int, subpage: int) -> list[ModePage]:
    """The pages a MODE SENSE PAGE CODE / SUBPAGE CODE pair asks for (SPC-4 6.11 table 98).

    Order: ascending page code then subpage, page 0 (vendor specific) last. Unsupported
    requests raise 24/00 with the field pointer on the page code (byte 2) or subpage (byte 3).
    """
    ordered = sorted(pages, key=lambda p: (p.code == 0, p.code, p.subpage))
    if code == ALL_PAGES:
        if subpage == 0:
            return [p for p in ordered if p.subpage == 0]
        if subpage == ALL_SUBPAGES:
            return ordered
        raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=3)
    same_code = [p for p in ordered if p.code == code]
    if not same_code:
        raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=2)
    if subpage == ALL_SUBPAGES:
        return same_code
    chosen = [p for p in same_code if p.subpage == subpage]
    if not chosen:
        raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=3)
    return chosen


def build_mode_data(
    *,
    ten: bool,
    header: ModeParameterHeader,
    descriptors: bytes,
    pages: Sequence[bytes],
) -> bytes:
    """MODE SENSE parameter data: header + block descriptors + pages (SPC-4 7.5.2).

    MODE DATA LENGTH excludes itself. The 6-byte form cannot describe more than 255 bytes; pages
    that would not fit are left out whole rather than cut in the middle.
    """
    head_len = HEADER10_LEN if ten else HEADER6_LEN
    limit = 0xFFFF if ten else 0xFF
    body = bytearray(descriptors)
    for page in pages:
        if head_len + len(body) + len(page) - (2 if ten else 1) > limit:
            break
        body += page
    total = head_len + len(body)
    hdr = ModeParameterHeader(
        medium_type=header.medium_type, device_specific=header.device_specific,
        block_descriptor_length=len(descriptors), long_lba=header.long_lba,
        mode_data_length=total - (2 if ten else 1),
    )
    return (hdr.encode10() if ten else hdr.encode6()) + bytes(body)


@dataclass(frozen=True, slots=True)
class PageUpdate:
    """One page of a MODE SELECT parameter list, located and checked."""

    page: ModePage
    offset: int  # where the page starts in the parameter list
    data: bytes  # the whole page as sent (header + parameters)

    @property
    def params(self) -> bytes:
        return self.data[self.page.header_len:]


@dataclass(frozen=True, slots=True)
class ModeSelectList:
    """A decoded MODE SELECT parameter list (SPC-4 6.9/6.10, 7.5)."""

    header: ModeParameterHeader
    descriptor: BlockDescriptor | None
    descriptor_offset: int
    updates: tuple[PageUpdate, ...]


def _list_error(byte: int, bit: int | None = None,
                asc: Asc = Asc.INVALID_FIELD_IN_PARAMETER_LIST) -> SenseError:
    return illegal_request(asc, byte=byte, bit=bit, in_cdb=False)


def _length_error() -> SenseError:
    return SenseError(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)


def rebase_field(err: SenseError, base: int) -> SenseError:
    """Move a parameter-list field pointer that is relative to a structure onto the list."""
    if err.field is not None and not err.field.in_cdb:
        err.field = FieldPointer(err.field.byte + base, err.field.bit, in_cdb=False)
    return err


def parse_mode_select(
    data: bytes,
    *,
    ten: bool,
    pages: Sequence[ModePage],
    descriptor_format: DescriptorFormat | None,
    page_format: bool = True,
) -> ModeSelectList:
    """Decode and validate a MODE SELECT parameter list against the device's pages.

    ``descriptor_format`` None means the device has no block descriptor (a descriptor in the
    list is then an invalid field). ``page_format`` is the CDB's PF bit: with PF=0 the pages
    would be vendor specific, which no device here has, so any page data is rejected.
    Raises SenseError with parameter-list field pointers; returns the checked updates.
    """
    head_len = HEADER10_LEN if ten else HEADER6_LEN
    if len(data) < head_len:
        raise _length_error()
    header = ModeParameterHeader.decode10(data) if ten else ModeParameterHeader.decode6(data)
    bdl_byte = 6 if ten else 3
    bdl = header.block_descriptor_length
    pos = head_len
    descriptor: BlockDescriptor | None = None
    if bdl:
        if pos + bdl > len(data):
            raise _length_error()
        if descriptor_format is None:
            raise _list_error(bdl_byte)
        fmt = descriptor_format
        if fmt is not DescriptorFormat.GENERAL:
            fmt = DescriptorFormat.LONG_LBA if header.long_lba else DescriptorFormat.SHORT_LBA
        elif header.long_lba:
            raise _list_error(4, 0)  # LONGLBA with a device whose descriptors are not LBA
        if bdl != fmt.size:  # one descriptor per LU: no device here has more
            raise _list_error(bdl_byte)
        descriptor = BlockDescriptor.decode(data[pos:pos + bdl], fmt)
    descriptor_offset = pos
    pos += bdl
    if pos < len(data) and not page_format:
        raise _list_error(pos)
    by_key = {p.key: p for p in pages}
    updates: list[PageUpdate] = []
    while pos < len(data):
        start = pos
        if len(data) - pos < 2:
            raise _length_error()
        b0 = data[pos]
        code = b0 & 0x3F
        spf = bool(b0 & 0x40)
        if spf:
            if len(data) - pos < 4:
                raise _length_error()
            subpage = data[pos + 1]
            length = int.from_bytes(data[pos + 2:pos + 4], "big")
            length_byte, hlen = pos + 2, 4
        else:
            subpage = 0
            length = data[pos + 1]
            length_byte, hlen = pos + 1, 2
        page = by_key.get((code, subpage))
        if page is None or (subpage != 0) != spf:
            raise _list_error(start + (1 if spf and page is None and _has_code(pages, code) else 0))
        if length != page.length:
            raise _list_error(length_byte)
        end = pos + hlen + length
        if end > len(data):
            raise _length_error()
        sent = bytes(data[pos + hlen:end])
        assert page.current is not None
        for i, (new, cur, mask) in enumerate(zip(sent, page.current, page.changeable)):
            bad = (new ^ cur) & ~mask & 0xFF
            if bad:
                raise _list_error(pos + hlen + i, bad.bit_length() - 1)
        update = PageUpdate(page, start, bytes(data[start:end]))
        if page.validate is not None:
            try:
                page.validate(update.data)
            except SenseError as err:
                raise rebase_field(err, start) from None
        updates.append(update)
        pos = end
    return ModeSelectList(header, descriptor, descriptor_offset, tuple(updates))


def _has_code(pages: Sequence[ModePage], code: int) -> bool:
    return any(p.code == code for p in pages)


def apply_updates(updates: Sequence[PageUpdate]) -> bool:
    """Apply checked page updates in list order; True when any current value changed."""
    changed = False
    for upd in updates:
        if upd.page.apply is not None:
            try:
                upd.page.apply(upd.data)
            except SenseError as err:
                raise rebase_field(err, upd.offset) from None
        changed |= upd.params != upd.page.current
        upd.page.current = upd.params
    return changed


# --- SPC-4 7.5.8 Control mode page (0Ah) and 7.5.9 Control Extension (0Ah/01h) ---------------

CONTROL_PAGE = 0x0A
CONTROL_EXTENSION_SUBPAGE = 0x01


def control_mode_page(*, d_sense_changeable: bool = False, swp: bool = False,
                      tas: bool = False) -> ModePage:
    """The Control mode page, SPC-4 7.5.8 table 458 (page length 0Ah).

    Defaults: TST 000b (one task set), GLTSD=1 (no implicit log saving: logs are not saved),
    QUEUE ALGORITHM MODIFIER 1 (unrestricted reordering), QERR 00b, SWP as given, TAS as given,
    BUSY TIMEOUT PERIOD FFFFh (unlimited). Nothing is changeable unless asked: the dispatcher
    always reports fixed-format sense, so D_SENSE is only changeable when a device implements
    descriptor sense itself.
    """
    default = bytearray(10)
    default[0] = 0x02  # byte 2: GLTSD
    default[1] = 0x10  # byte 3: QUEUE ALGORITHM MODIFIER = 1
    default[2] = 0x08 if swp else 0x00  # byte 4: SWP
    default[3] = 0x40 if tas else 0x00  # byte 5: TAS
    default[6:8] = b"\xff\xff"  # bytes 8-9: BUSY TIMEOUT PERIOD
    mask = bytearray(10)
    if d_sense_changeable:
        mask[0] = 0x04
    return ModePage(CONTROL_PAGE, default=bytes(default), changeable=bytes(mask))


def control_extension_mode_page() -> ModePage:
    """The Control Extension subpage, SPC-4 7.5.9 table 461 (page length 1Ch).

    TCMOS/SCSIP/IALUAE 0; INITIAL COMMAND PRIORITY 0; MAXIMUM SENSE DATA LENGTH 0 (no limit).
    """
    return ModePage(CONTROL_PAGE, CONTROL_EXTENSION_SUBPAGE, default=bytes(0x1C))
