"""Log pages of the tape drive (LOG SENSE, SPC-4 6.6 / 7.3; SSC-3 8.2) and TapeAlert flags.

Pages: 00h supported pages, 0Ch sequential-access device (SSC-3 8.2.3), 2Eh TapeAlert
(SSC-3 8.2.4, 64 one-byte flags, parameter codes 0001h-0040h).

Invariant: the page header and every parameter header are built here; the drive only supplies
counter values and the set of active TapeAlert flags.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

_PAGE_HEAD = struct.Struct(">BBH")
assert _PAGE_HEAD.size == 4
_PARAM_HEAD = struct.Struct(">HBB")
assert _PARAM_HEAD.size == 4

# Parameter control byte: binary format list with FORMAT AND LINKING 11b for TapeAlert
# (SSC-3 8.2.4), bounded data counter (00b) for counters.
CONTROL_COUNTER = 0x00
CONTROL_TAPEALERT = 0x03


class LogPage(enum.IntEnum):
    SUPPORTED = 0x00
    SEQUENTIAL_ACCESS = 0x0C
    TAPE_ALERT = 0x2E


class PageControl(enum.IntEnum):
    """LOG SENSE PC field (SPC-4 6.6)."""

    THRESHOLD = 0
    CUMULATIVE = 1
    DEFAULT_THRESHOLD = 2
    DEFAULT_CUMULATIVE = 3


class SequentialParam(enum.IntEnum):
    """Parameter codes of the sequential-access device page (SSC-3 8.2.3, table 53)."""

    BYTES_FROM_INITIATORS = 0x0000
    BYTES_WRITTEN_TO_MEDIUM = 0x0001
    BYTES_READ_FROM_MEDIUM = 0x0002
    BYTES_TO_INITIATORS = 0x0003
    CLEANING_REQUIRED = 0x0100


class TapeAlert(enum.IntEnum):
    """TapeAlert flags the drive can raise (SSC-3 annex, flag number = parameter code)."""

    READ_WARNING = 0x01
    WRITE_WARNING = 0x02
    HARD_ERROR = 0x03
    MEDIA = 0x04
    READ_FAILURE = 0x05
    WRITE_FAILURE = 0x06
    MEDIA_LIFE = 0x07
    WRITE_PROTECT = 0x09
    NO_REMOVAL = 0x0A
    CLEANING_MEDIA = 0x0B
    UNSUPPORTED_FORMAT = 0x0C
    UNRECOVERABLE_SNAPPED_TAPE = 0x0D
    WORM_INTEGRITY = 0x3B
    WORM_OVERWRITE = 0x3C


@dataclass(frozen=True, slots=True)
class LogParameter:
    """One log parameter (SPC-4 7.3.2.2): code, control byte, value."""

    code: int
    value: bytes
    control: int = CONTROL_COUNTER

    def encode(self) -> bytes:
        return _PARAM_HEAD.pack(self.code, self.control, len(self.value)) + self.value


def log_page(code: int, body: bytes, subpage: int = 0) -> bytes:
    """A log page: header (PAGE CODE, SUBPAGE CODE, PAGE LENGTH) + parameters."""
    return _PAGE_HEAD.pack(code & 0x3F | (0x40 if subpage else 0), subpage, len(body)) + body


def supported_pages() -> bytes:
    return log_page(LogPage.SUPPORTED, bytes(sorted(p.value for p in LogPage)))


@dataclass(frozen=True, slots=True)
class SequentialCounters:
    """Counters of page 0Ch. Data is stored uncompressed: received == written to medium."""

    bytes_written: int = 0
    bytes_read: int = 0

    def encode(self, first_param: int = 0) -> bytes:
        params = [
            LogParameter(SequentialParam.BYTES_FROM_INITIATORS, self.bytes_written.to_bytes(8, "big")),
            LogParameter(SequentialParam.BYTES_WRITTEN_TO_MEDIUM, self.bytes_written.to_bytes(8, "big")),
            LogParameter(SequentialParam.BYTES_READ_FROM_MEDIUM, self.bytes_read.to_bytes(8, "big")),
            LogParameter(SequentialParam.BYTES_TO_INITIATORS, self.bytes_read.to_bytes(8, "big")),
            LogParameter(SequentialParam.CLEANING_REQUIRED, b"\x00"),
        ]
        body = b"".join(p.encode() for p in params if p.code >= first_param)
        return log_page(LogPage.SEQUENTIAL_ACCESS, body)


def tapealert_page(active: frozenset[int], first_param: int = 0) -> bytes:
    """Page 2Eh: 64 parameters 0001h-0040h, one byte each (bit 0 = flag active)."""
    body = b"".join(LogParameter(code, b"\x01" if code in active else b"\x00",
                                 CONTROL_TAPEALERT).encode()
                    for code in range(max(1, first_param), 65))
    return log_page(LogPage.TAPE_ALERT, body)


def tapealert_bits(active: frozenset[int]) -> int:
    """The 64 flags as the 8-byte MAM attribute 0002h (flag 1 = most significant bit)."""
    value = 0
    for flag in active:
        if 1 <= flag <= 64:
            value |= 1 << (64 - flag)
    return value
