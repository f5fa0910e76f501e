"""Sans-I/O codec of iSCSI PDUs (RFC 7143 11).

Every PDU is a 48-byte Basic Header Segment (BHS, RFC 7143 11.2.1), optional Additional Header
Segments (AHS, 11.2.2, 4-byte multiples), an optional header digest, a data segment padded to
a 4-byte boundary, and an optional data digest (CRC32C, 13.1). Digests are sent least
significant byte first, as every deployed initiator does.

Invariants:
- Each PDU type is a frozen dataclass with ``encode() -> bytes`` and ``decode(buf)``;
  ``decode(encode(x)) == x``. Byte 4-7 (TotalAHSLength, DataSegmentLength) are owned by the
  framing layer, never by a PDU class.
- :class:`PduReader` checks every length against the negotiated MaxRecvDataSegmentLength before
  buffering, and every digest; a violation raises :class:`PduError`, never a silent truncation.
- Large data segments can be placed straight into their final buffer (``PduReader.placer``),
  so Data-Out data is copied once on its way from the socket to the task buffer.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Union

import crc32c as _crc32c

from vtl.iscsi.errors import DigestError, PduError, RejectReason

BHS_LEN = 48
RESERVED_TAG = 0xFFFFFFFF
_COMMON = struct.Struct(">BBBBIQI28s")
assert _COMMON.size == BHS_LEN
_DIGEST = struct.Struct("<I")


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC32C (RFC 7143 13.1, Castagnoli) as used for header and data digests."""
    return _crc32c.crc32c(data)


def sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic a < b over 32 bits (RFC 1982, RFC 7143 4.2.2.1)."""
    return a != b and ((b - a) & 0xFFFFFFFF) < 0x80000000


def sn_le(a: int, b: int) -> bool:
    return a == b or sn_lt(a, b)


class Opcode(enum.IntEnum):
    """RFC 7143 11.2.1.2 opcodes (initiator 0x00-0x1f, target 0x20-0x3f)."""

    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


def _bad(msg: str, bhs: bytes = b"") -> PduError:
    return PduError(RejectReason.INVALID_PDU_FIELD, msg, bhs=bhs)


class _Pdu:
    """Shared behaviour: whole-PDU encode/decode without digests."""

    __slots__ = ()

    OPCODE: ClassVar[Opcode]
    data: bytes
    ahs: bytes = b""

    def bhs(self) -> bytes:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def encode(self) -> bytes:
        return b"".join(encode_pdu(self))  # type: ignore[arg-type]

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview) -> "Pdu":
        pdu = decode_pdu(buf)
        if not isinstance(pdu, cls):
            raise _bad(f"expected {cls.__name__}, got {type(pdu).__name__}")
        return pdu


def _b0(opcode: int, immediate: bool) -> int:
    return opcode | (0x40 if immediate else 0)


# --- initiator PDUs -----------------------------------------------------------------------------

_SCSI_CMD = struct.Struct(">BBH4x8sIIII16s")
assert _SCSI_CMD.size == BHS_LEN


@dataclass(frozen=True, slots=True)
class ScsiCommandPdu(_Pdu):
    """SCSI Command (RFC 7143 11.3). ``ahs`` holds the raw AHS (extended CDB, 11.3.5)."""

    OPCODE: ClassVar[Opcode] = Opcode.SCSI_COMMAND
    immediate: bool = False
    final: bool = True
    read: bool = False
    write: bool = False
    attr: int = 0
    lun: bytes = bytes(8)
    itt: int = 0
    edtl: int = 0
    cmdsn: int = 0
    expstatsn: int = 0
    cdb: bytes = bytes(16)
    ahs: bytes = b""
    data: bytes = b""

    def bhs(self) -> bytes:
        flags = (0x80 if self.final else 0) | (0x40 if self.read else 0) | \
            (0x20 if self.write else 0) | (self.attr & 7)
        return _SCSI_CMD.pack(_b0(self.OPCODE, self.immediate), flags, 0, self.lun, self.itt,
                              self.edtl, self.cmdsn, self.expstatsn, self.cdb)

    @classmethod
    def from_bhs(cls, bhs: bytes, ahs: bytes, data: bytes) -> "ScsiCommandPdu":
        b0, b1, _, lun, itt, edtl, cmdsn, expstatsn, cdb = _SCSI_CMD.unpack(bhs)
        return cls(bool(b0 & 0x40), bool(b1 & 0x80), bool(b1 & 0x40), bool(b1 & 0x20), b1 & 7,
                   lun, itt, edtl, cmdsn, expstatsn, cdb, ahs, data)

    def full_cdb(self) -> bytes:
        """The CDB, with an Extended CDB AHS (type 1, RFC 7143 11.3.5) appended when present."""
        cdb, ahs = self.cdb, self.ahs
        while len(ahs) >= 4:
            length, ahs_type = struct.unpack_from(">HB", ahs)
            total = (3 + length + 3) & ~3
            if total > len(ahs) or length == 0:
                raise _bad("bad AHS length", self.bhs())
            if ahs_type == 1:
                cdb = cdb + bytes(ahs[4:3 + length])
            ahs = ahs[total:]
        return cdb


_GENERIC_REQ = struct.Struct(">BBH4x8sIIII16x")  # NOP-Out, Text Request
assert _GENERIC_REQ.size == BHS_LEN


@dataclass(frozen=True, slots=True)
class NopOut(_Pdu):
    """NOP-Out (RFC 7143 11.18)."""

    OPCODE: ClassVar[Opcode] = Opcode.NOP_OUT
    immediate: bool = True
    lun: bytes = bytes(8)
    itt: int = RESERVED_TAG
    ttt: int = RESERVED_TAG
    cmdsn: int = 0
    expstatsn: int = 0
    data: bytes = b""

    def bhs(self) -> bytes:
        return _GENERIC_REQ.pack(_b0(self.OPCODE, self.immediate), 0x80, 0, self.lun, self.itt,
                                 self.ttt, self.cmdsn, self.expstatsn)

    @classmethod
    def from_bhs(cls, bhs: bytes, ahs: bytes, data: bytes) -> "NopOut":
        b0, _, _, lun, itt, ttt, cmdsn, expstatsn = _GENERIC_REQ.unpack(bhs)
        return cls(bool(b0 & 0x40), lun, itt, ttt, cmdsn, expstatsn, data)


@dataclass(frozen=True, slots=True)
class TextRequest(_Pdu):
    """Text Request (RFC 7143 11.10)."""

    OPCODE: ClassVar[Opcode] = Opcode.TEXT_REQUEST
    immediate: bool = False
    final: bool = True
    cont: bool = False
    lun: bytes = bytes(8)
    itt: int = 0
    ttt: int = RESERVED_TAG
    cmdsn: int = 0
    expstatsn: int = 0
    data: bytes = b""

    def bhs(self) -> bytes:
        flags = (0x80 if self.final else 0) | (0x40 if self.cont else 0)
        return _GENERIC_REQ.pack(_b0(self.OPCODE, self.immediate), flags, 0, self.lun, self.itt,
                                 self.ttt, self.cmdsn, self.expstatsn)

    @classmethod
    def from_bhs(cls, bhs: bytes, ahs: bytes, data: bytes) -> "TextRequest":
        b0, b1, _, lun, itt, ttt, cmdsn, expstatsn = _GENERIC_REQ.unpack(bhs)
        return cls(bool(b0 & 0x40), bool(b1 & 0x80), bool(b1 & 0x40), lun, itt, ttt, cmdsn,
                   expstatsn, data)


_DATA_OUT = struct.Struct(">BBH4x8sII4xI4xII4x")
assert _DATA_OUT.size == BHS_LEN


@dataclass(frozen=True, slots=True)
class DataOut(_Pdu):
    """SCSI Data-Out (RFC 7143 11.7)."""

    OPCODE: ClassVar[Opcode] = Opcode.DATA_OUT
    final: bool = False
    lun: bytes = bytes(8)
    itt: int = 0
    ttt: int = RESERVED_TAG
    expstatsn: int = 0
    datasn: int = 0
    offset: int = 0
    data: bytes = b""

    def bhs(self) -> bytes:
        return _DATA_OUT.pack(self.OPCODE, 0x80 if self.final else 0, 0, self.lun, self.itt,
                              self.ttt, self.expstatsn, self.datasn, self.offset)

    @classmethod
    def from_bhs(cls, bhs: bytes, ahs: bytes, data: bytes) -> "DataOut":
        _, b1, _, lun, itt, ttt, expstatsn, datasn, offset = _DATA_OUT.unpack(bhs)
        return cls(bool(b1 & 0x80), lun, itt, ttt, expstatsn, datasn, offset, data)


_LOGIN_REQ = struct.Struct(">BBBB4x6sHIH2xII16x")
assert _LOGIN_REQ.size == BHS_LEN


@dataclass(frozen=True, slots=True)
class LoginRequest(_Pdu):
    """Login Request (RFC 7143 11.12). Stages: 0 security, 1 operational, 3 full feature."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGIN_REQUEST
    transit: bool = False
    cont: bool = False
    csg: int = 0
    nsg: int = 0
    version_max: int = 0
    version_min: int = 0
    isid: int = 0
    tsih: int = 0
    itt: int = 0
    cid: int = 0
    cmdsn: int = 0
    expstatsn: int = 0
    data: bytes = b""

    def bhs(self) -> bytes:
        flags = (0x80 if self.transit else 0) | (0x40 if self.cont else 0) | \
            ((self.csg & 3) << 2) | (self.nsg & 3)
        return _LOGIN_REQ.pack(_b0(self.OPCODE, True), flags, self.version_max,
                               self.version_min, self.isid.to_bytes(6, "big"), self.tsih,
                               self.itt, self.cid, self.cmdsn, self.expstatsn)

    @classmethod
    def from_bhs(cls, bhs: bytes, ahs: bytes, data: bytes) -> "LoginRequest":
        _, b1, vmax, vmin, isid, tsih, itt, cid, cmdsn, expstatsn = _LOGIN_REQ.unpack(bhs)
        return cls(bool(b1 & 0x80), bool(b1 & 0x40), (b1 >> 2) & 3, b1 & 3, vmax, vmin,
                   int.from_bytes(isid, "big"), tsih, itt, cid, cmdsn, expstatsn, data)


_LOGOUT_REQ = struct.Struct(">BBH4x8xIH2xII16x")
assert _LOGOUT_REQ.size == BHS_LEN


class LogoutReason(enum.IntEnum):
    """RFC 7143 11.14.1."""

    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_FOR_RECOVERY = 2


@dataclass(frozen=True, slots=True)
class LogoutRequest(_Pdu):
    """Logout Request (RFC 7143 11.14)."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGOUT_REQUEST
    immediate: bool = False
    reason: int = 0
    itt: int = 0
    cid: int = 0
    cmdsn: int = 0
    expstatsn: int = 0
    data: bytes = b""

    def bhs(self) -> bytes:
        return _LOGOUT_REQ.pack(_b0(self.OPCODE, self.immediate), 0x80 | (self.reason & 0x7F), 0,
                                self.itt, self.cid, self.cmdsn, self.expstatsn)

    @classmethod
    def from_bhs(cls, bhs: bytes, ahs: bytes, data: bytes) -> "LogoutRequest":
        b0, b1, _, itt, cid, cmdsn, expstatsn = _LOGOUT_REQ.unpack(bhs)
        return cls(bool(b0 & 0x40), b1 & 0x7F, itt, cid, cmdsn, expstatsn, data)


_TMF_REQ = struct.Struct(">BBH4x8sIIIIII8x")
assert _TMF_REQ.size == BHS_LEN


class TmfFunction(enum.IntEnum):
    """RFC 7143 11.5.1."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(enum.IntEnum):
    """RFC 7143 11.6.1."""

    FUNCTION_COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    REJECTED = 255


@dataclass(frozen=True, slots=True)
class TaskMgmtRequest(_Pdu):
    """Task Management Function Request (RFC 7143 11.5)."""

    OPCODE: ClassVar[Opcode] = Opcode.TASK_MGMT_REQUEST
    immediate: bool = True
    function: int = 0
    lun: bytes = bytes(8)
    itt: int = 0
    rtt: int = RESERVED_TAG
    cmdsn: int = 0
    expstatsn: int = 0
    refcmdsn: int = 0
    expdatasn: int = 0
    data: bytes = b""

    def bhs(self) -> bytes:
        return _TMF_REQ.pack(_b0(self.OPCODE, self.immediate), 0x80 | (self.function & 0x7F), 0,
                             self.lun, self.itt, self.rtt, self.cmdsn, self.expstatsn,
                             self.refcmdsn, self.expdatasn)

    @classmethod
    def from_bhs(cls, bhs: bytes, ahs: bytes, data: bytes) -> "TaskMgmtRequest":
        b0, b1, _, lun, itt, rtt, cmdsn, expstatsn, ref, expdatasn = _TMF_REQ.unpack(bhs)
        return cls(bool(b0 & 0x40), b1 & 0x7F, lun, itt, rtt, cmdsn, expstatsn, ref, expdatasn,
                   data)


_SNACK = struct.Struct(">BBH4x8sII4xI8xII")
assert _SNACK.size == BHS_LEN


@dataclass(frozen=True, slots=True)
class SnackRequest(_Pdu):
    """SNACK Request (RFC 7143 11.16); at ErrorRecoveryLevel 0 it is always rejected."""

    OPCODE: ClassVar[Opcode] = Opcode.SNACK_REQUEST
    snack_type: int = 0
    lun: bytes = bytes(8)
    itt: int = 0
    ttt: int = RESERVED_TAG
    expstatsn: int = 0
    begrun: int = 0
    runlength: int = 0
    data: bytes = b""

    def bhs(self) -> bytes:
        return _SNACK.pack(self.OPCODE, 0x80 | (self.snack_type & 0x0F), 0, self.lun, self.itt,
                           self.ttt, self.expstatsn, self.begrun, self.runlength)

    @classmethod
    def from_bhs(cls, bhs: bytes, ahs: bytes, data: bytes) -> "SnackRequest":
        _, b1, _, lun, itt, ttt, expstatsn, begrun, runlength = _SNACK.unpack(bhs)
        return cls(b1 & 0x0F, lun, itt, ttt, expstatsn, begrun, runlength, data)


# --- target PDUs --------------------------------------------------------------------------------

_SCSI_RSP = struct.Struct(">BBBB4x8xIIIIIIII")
assert _SCSI_RSP.size == BHS_LEN


@dataclass(frozen=True, slots=True)
class ScsiResponsePdu(_Pdu):
    """SCSI Response (RFC 7143 11.4). ``data`` is SenseLength(2) + sense data (11.4.7)."""

    OPCODE: ClassVar[Opcode] = Opcode.SCSI_RESPONSE
    bidi_overflow: bool = False
    bidi_underflow: bool = False
    overflow: bool = False
    underflow: bool = False
    response: int = 0
    status: int = 0
    itt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    expdatasn: int = 0
    bidi_residual: int = 0
    residual: int = 0
    data: bytes = b""

    def bhs(self) -> bytes:
        flags = 0x80 | (0x10 if self.bidi_overflow else 0) | (0x08 if self.bidi_underflow else 0) \
            | (0x04 if self.overflow else 0) | (0x02 if self.underflow else 0)
        return _SCSI_RSP.pack(self.OPCODE, flags, self.response, self.status, self.itt, 0,
                              self.statsn, self.expcmdsn, self.maxcmdsn, self.expdatasn,
                              self.bidi_residual, self.residual)

    @classmethod
    def from_bhs(cls, bhs: bytes, ahs: bytes, data: bytes) -> "ScsiResponsePdu":
        _, b1, resp, status, itt, _snack, statsn, exp, mx, expdatasn, bres, res = \
            _SCSI_RSP.unpack(bhs)
        return cls(bool(b1 & 0x10), bool(b1 & 0x08), bool(b1 & 0x04), bool(b1 & 0x02), resp,
                   status, itt, statsn, exp, mx, expdatasn, bres, res, data)


_DATA_IN = struct.Struct(">BBBB4x8sIIIIIIII")
assert _DATA_IN.size == BHS_LEN


@dataclass(frozen=True, slots=True)
class DataIn(_Pdu):
    """SCSI Data-In (RFC 7143 11.7). ``has_status`` is the S bit (status in this PDU)."""

    OPCODE: ClassVar[Opcode] = Opcode.DATA_IN
    final: bool = False
    ack: bool = False
    overflow: bool = False
    underflow: bool = False
    has_status: bool = False
    status: int = 0
    lun: bytes = bytes(8)
    itt: int = 0
    ttt: int = RESERVED_TAG
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    datasn: int = 0
    offset: int = 0
    residual: int = 0
    data: bytes = b""

    def bhs(self) -> bytes:
        flags = (0x80 if self.final else 0) | (0x40 if self.ack else 0) | \
            (0x04 if self.overflow else 0) | (0x02 if self.underflow else 0) | \
            (0x01 if self.has_status else 0)
        return _DATA_IN.pack(self.OPCODE, flags, 0, self.status, self.lun, self.itt, self.ttt,
                             self.statsn, self.expcmdsn, self.maxcmdsn, self.datasn, self.offset,
                             self.residual)

    @classmethod
    def from_bhs(cls, bhs: bytes, ahs: bytes, data: bytes) -> "DataIn":
        _, b1, _, status, lun, itt, ttt, statsn, exp, mx, datasn, offset, res = \
            _DATA_IN.unpack(bhs)
        return cls(bool(b1 & 0x80), bool(b1 & 0x40), bool(b1 & 0x04), bool(b1 & 0x02),
                   bool(b1 & 0x01), status, lun, itt, ttt, statsn, exp, mx, datasn, offset, res,
                   data)


_R2T = struct.Struct(">BBH4x8sIIIIIIII")
assert _R2T.size == BHS_LEN


@dataclass(frozen=True, slots=True)
class R2T(_Pdu):
    """Ready To Transfer (RFC 7143 11.8)."""

    OPCODE: ClassVar[Opcode] = Opcode.R2T
    lun: bytes = bytes(8)
    itt: int = 0
    ttt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    r2tsn: int = 0
    offset: int = 0
    length: int = 0
    data: bytes = b""

    def bhs(self) -> bytes:
        return _R2T.pack(self.OPCODE, 0x80, 0, self.lun, self.itt, self.ttt, self.statsn,
                         self.expcmdsn, self.maxcmdsn, self.r2tsn, self.offset, self.length)

    @classmethod
    def from_bhs(cls, bhs: bytes, ahs: bytes, data: bytes) -> "R2T":
        _, _, _, lun, itt, ttt, statsn, exp, mx, r2tsn, offset, length = _R2T.unpack(bhs)
        return cls(lun, itt, ttt, statsn, exp, mx, r2tsn, offset, length, data)


_GENERIC_RSP = struct.Struct(">BBBB4x8sIIIII12x")  # NOP-In, Text Response, TMF Response
assert _GENERIC_RSP.size == BHS_LEN


@dataclass(frozen=True, slots=True)
class NopIn(_Pdu):
    """NOP-In (RFC 7143 11.19)."""

    OPCODE: ClassVar[Opcode] = Opcode.NOP_IN
    lun: bytes = bytes(8)
    itt: int = RESERVED_TAG
    ttt: int = RESERVED_TAG
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    data: bytes = b""

    def bhs(self) -> bytes:
        return _GENERIC_RSP.pack(self.OPCODE, 0x80, 0, 0, self.lun, self.itt, self.ttt,
                                 self.statsn, self.expcmdsn, self.maxcmdsn)

    @classmethod
    def from_bhs(cls, bhs: bytes, ahs: bytes, data: bytes) -> "NopIn":
        _, _, _, _, lun, itt, ttt, statsn, exp, mx = _GENERIC_RSP.unpack(bhs)
        return cls(lun, itt, ttt, statsn, exp, mx, data)


@dataclass(frozen=True, slots=True)
class TextResponse(_Pdu):
    """Text Response (RFC 7143 11.11)."""

    OPCODE: ClassVar[Opcode] = Opcode.TEXT_RESPONSE
    final: bool = True
    cont: bool = False
    lun: bytes = bytes(8)
    itt: int = 0
    ttt: int = RESERVED_TAG
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    data: bytes = b""

    def bhs(self) -> bytes:
        flags = (0x80 if self.final else 0) | (0x40 if self.cont else 0)
        return _GENERIC_RSP.pack(self.OPCODE, flags, 0, 0, self.lun, self.itt, self.ttt,
                                 self.statsn, self.expcmdsn, self.maxcmdsn)

    @classmethod
    def from_bhs(cls, bhs: bytes, ahs: bytes, data: bytes) -> "TextResponse":
        _, b1, _, _, lun, itt, ttt, statsn, exp, mx = _GENERIC_RSP.unpack(bhs)
        return cls(bool(b1 & 0x80), bool(b1 & 0x40), lun, itt, ttt, statsn, exp, mx, data)


@dataclass(frozen=True, slots=True)
class TaskMgmtResponse(_Pdu):
    """Task Management Function Response (RFC 7143 11.6)."""

    OPCODE: ClassVar[Opcode] = Opcode.TASK_MGMT_RESPONSE
    response: int = 0
    itt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    data: bytes = b""

    def bhs(self) -> bytes:
        return _GENERIC_RSP.pack(self.OPCODE, 0x80, self.response, 0, bytes(8), self.itt, 0,
                                 self.statsn, self.expcmdsn, self.maxcmdsn)

    @classmethod
    def from_bhs(cls, bhs: bytes, ahs: bytes, data: bytes) -> "TaskMgmtResponse":
        _, _, resp, _, _, itt, _, statsn, exp, mx = _GENERIC_RSP.unpack(bhs)
        return cls(resp, itt, statsn, exp, mx, data)


_LOGIN_RSP = struct.Struct(">BBBB4x6sHI4xIIIBB10x")
assert _LOGIN_RSP.size == BHS_LEN


@dataclass(frozen=True, slots=True)
class LoginResponse(_Pdu):
    """Login Response (RFC 7143 11.13). ``status`` is Status-Class << 8 | Status-Detail."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGIN_RESPONSE
    transit: bool = False
    cont: bool = False
    csg: int = 0
    nsg: int = 0
    version_max: int = 0
    version_active: int = 0
    isid: int = 0
    tsih: int = 0
    itt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    status: int = 0
    data: bytes = b""

    def bhs(self) -> bytes:
        flags = (0x80 if self.transit else 0) | (0x40 if self.cont else 0) | \
            ((self.csg & 3) << 2) | (self.nsg & 3)
        return _LOGIN_RSP.pack(self.OPCODE, flags, self.version_max, self.version_active,
                               self.isid.to_bytes(6, "big"), self.tsih, self.itt, self.statsn,
                               self.expcmdsn, self.maxcmdsn, self.status >> 8, self.status & 0xFF)

    @classmethod
    def from_bhs(cls, bhs: bytes, ahs: bytes, data: bytes) -> "LoginResponse":
        _, b1, vmax, vact, isid, tsih, itt, statsn, exp, mx, sc, sd = _LOGIN_RSP.unpack(bhs)
        return cls(bool(b1 & 0x80), bool(b1 & 0x40), (b1 >> 2) & 3, b1 & 3, vmax, vact,
                   int.from_bytes(isid, "big"), tsih, itt, statsn, exp, mx, sc << 8 | sd, data)


_LOGOUT_RSP = struct.Struct(">BBBB4x8xI4xIII4xHH4x")
assert _LOGOUT_RSP.size == BHS_LEN


@dataclass(frozen=True, slots=True)
class LogoutResponse(_Pdu):
    """Logout Response (RFC 7143 11.15)."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGOUT_RESPONSE
    response: int = 0
    itt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    time2wait: int = 0
    time2retain: int = 0
    data: bytes = b""

    def bhs(self) -> bytes:
        return _LOGOUT_RSP.pack(self.OPCODE, 0x80, self.response, 0, self.itt, self.statsn,
                                self.expcmdsn, self.maxcmdsn, self.time2wait, self.time2retain)

    @classmethod
    def from_bhs(cls, bhs: bytes, ahs: bytes, data: bytes) -> "LogoutResponse":
        _, _, resp, _, itt, statsn, exp, mx, t2w, t2r = _LOGOUT_RSP.unpack(bhs)
        return cls(resp, itt, statsn, exp, mx, t2w, t2r, data)


_REJECT = struct.Struct(">BBBB4x8xI4xIIII8x")
assert _REJECT.size == BHS_LEN


@dataclass(frozen=True, slots=True)
class Reject(_Pdu):
    """Reject (RFC 7143 11.17); ``data`` is the rejected PDU's header."""

    OPCODE: ClassVar[Opcode] = Opcode.REJECT
    reason: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    datasn: int = 0
    data: bytes = b""

    def bhs(self) -> bytes:
        return _REJECT.pack(self.OPCODE, 0x80, self.reason, 0, RESERVED_TAG, self.statsn,
                            self.expcmdsn, self.maxcmdsn, self.datasn)

    @classmethod
    def from_bhs(cls, bhs: bytes, ahs: bytes, data: bytes) -> "Reject":
        _, _, reason, _, _, statsn, exp, mx, datasn = _REJECT.unpack(bhs)
        return cls(reason, statsn, exp, mx, datasn, data)


_ASYNC = struct.Struct(">BBH4x8sI4xIIIBBHHH4x")
assert _ASYNC.size == BHS_LEN


@dataclass(frozen=True, slots=True)
class AsyncMessage(_Pdu):
    """Asynchronous Message (RFC 7143 11.9)."""

    OPCODE: ClassVar[Opcode] = Opcode.ASYNC_MESSAGE
    lun: bytes = bytes(8)
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    event: int = 0
    vcode: int = 0
    param1: int = 0
    param2: int = 0
    param3: int = 0
    data: bytes = b""

    def bhs(self) -> bytes:
        return _ASYNC.pack(self.OPCODE, 0x80, 0, self.lun, RESERVED_TAG, self.statsn,
                           self.expcmdsn, self.maxcmdsn, self.event, self.vcode, self.param1,
                           self.param2, self.param3)

    @classmethod
    def from_bhs(cls, bhs: bytes, ahs: bytes, data: bytes) -> "AsyncMessage":
        _, _, _, lun, _, statsn, exp, mx, ev, vc, p1, p2, p3 = _ASYNC.unpack(bhs)
        return cls(lun, statsn, exp, mx, ev, vc, p1, p2, p3, data)


Pdu = Union[ScsiCommandPdu, NopOut, TextRequest, DataOut, LoginRequest, LogoutRequest,
            TaskMgmtRequest, SnackRequest, ScsiResponsePdu, DataIn, R2T, NopIn, TextResponse,
            TaskMgmtResponse, LoginResponse, LogoutResponse, Reject, AsyncMessage]

PDU_CLASSES: dict[int, type] = {cls.OPCODE: cls for cls in (  # type: ignore[attr-defined]
    ScsiCommandPdu, NopOut, TextRequest, DataOut, LoginRequest, LogoutRequest, TaskMgmtRequest,
    SnackRequest, ScsiResponsePdu, DataIn, R2T, NopIn, TextResponse, TaskMgmtResponse,
    LoginResponse, LogoutResponse, Reject, AsyncMessage)}


# --- framing ------------------------------------------------------------------------------------

def _pad(n: int) -> int:
    return -n & 3


def encode_pdu(pdu: Pdu, *, header_digest: bool = False, data_digest: bool = False,
               data: bytes | bytearray | memoryview | None = None) -> list[bytes | memoryview]:
    """Frame a PDU (RFC 7143 11.2): BHS+AHS, [HeaderDigest], data, pad, [DataDigest].

    ``data`` overrides ``pdu.data`` so the Data-In path can send a memoryview without copying.
    Returns buffers for ``writelines``.
    """
    payload = pdu.data if data is None else data
    ahs = pdu.ahs
    if len(ahs) & 3 or len(ahs) > 1020:
        raise _bad("AHS length must be a multiple of 4 and at most 1020")
    dsl = len(payload)
    if dsl > 0xFFFFFF:
        raise _bad("data segment longer than 2**24-1")
    head = bytearray(pdu.bhs())
    head[4] = len(ahs) >> 2
    head[5:8] = dsl.to_bytes(3, "big")
    if ahs:
        head += ahs
    return _frame(head, payload, header_digest, data_digest)


def _frame(head: bytes | bytearray, payload: bytes | bytearray | memoryview, header_digest: bool,
           data_digest: bool) -> list[bytes | memoryview]:
    """Header (DataSegmentLength already in it), [HeaderDigest], data, pad, [DataDigest]."""
    out: list[bytes | memoryview] = [head]  # type: ignore[list-item]
    if header_digest:
        out.append(_DIGEST.pack(crc32c(head)))
    dsl = len(payload)
    if dsl:
        out.append(payload)  # type: ignore[arg-type]
        pad = b"\0" * _pad(dsl)
        if pad:
            out.append(pad)
        if data_digest:
            crc = _crc32c.crc32c(pad, _crc32c.crc32c(payload)) if pad else crc32c(payload)
            out.append(_DIGEST.pack(crc))
    return out


# --- the streaming path's codecs: the same bytes as the dataclasses, without building them ------

#: SCSI Command BHS fields (RFC 7143 11.3): byte 0, flags, reserved, LUN, ITT, EDTL, CmdSN,
#: ExpStatSN, CDB; what :meth:`ScsiCommandPdu.from_bhs` reads, as a plain tuple
unpack_scsi_command: Callable[[bytes], tuple[Any, ...]] = _SCSI_CMD.unpack


def encode_status(status: int, itt: int, statsn: int, expcmdsn: int, maxcmdsn: int, *,
                  header_digest: bool) -> list[bytes | memoryview]:
    """A SCSI Response with no sense, no residual and ExpDataSN 0 (RFC 7143 11.4): what
    ``encode_pdu(ScsiResponsePdu(status=..., ...))`` gives for a command answered without
    Data-In or R2T."""
    head = _SCSI_RSP.pack(Opcode.SCSI_RESPONSE, 0x80, 0, status, itt, 0, statsn, expcmdsn,
                          maxcmdsn, 0, 0, 0)
    return [head, _DIGEST.pack(crc32c(head))] if header_digest else [head]


def encode_data_in_status(status: int, lun: bytes, itt: int, statsn: int, expcmdsn: int,
                          maxcmdsn: int, data: bytes | bytearray | memoryview, *,
                          header_digest: bool, data_digest: bool) -> list[bytes | memoryview]:
    """One final Data-In carrying a READ's whole data and its status (S bit, DataSN 0, offset 0,
    no residual; RFC 7143 11.7), as ``encode_pdu(DataIn(...))`` frames it."""
    head = bytearray(_DATA_IN.pack(Opcode.DATA_IN, 0x81, 0, status, lun, itt, RESERVED_TAG,
                                   statsn, expcmdsn, maxcmdsn, 0, 0, 0))
    head[5:8] = len(data).to_bytes(3, "big")
    return _frame(head, data, header_digest, data_digest)


def from_parts(bhs: bytes, ahs: bytes, data: bytes | memoryview) -> Pdu:
    """Decode a PDU from its framed parts (see :meth:`PduReader.next_parts`)."""
    opcode = bhs[0] & 0x3F
    cls = PDU_CLASSES.get(opcode)
    if cls is None:
        raise PduError(RejectReason.COMMAND_NOT_SUPPORTED, f"unknown opcode 0x{opcode:02x}",
                       bhs=bhs)
    if ahs and cls is not ScsiCommandPdu:
        raise _bad(f"AHS not allowed in opcode 0x{opcode:02x}", bhs)
    return cls.from_bhs(bhs, ahs, data)  # type: ignore[no-any-return]


def decode_pdu(buf: bytes | bytearray | memoryview, *, header_digest: bool = False,
               data_digest: bool = False, max_data: int = 0xFFFFFF) -> Pdu:
    """Decode exactly one whole PDU from ``buf``; trailing or missing bytes are an error."""
    reader = PduReader(max_data, header_digest=header_digest, data_digest=data_digest)
    reader.feed(buf)
    pdu = reader.next_pdu()
    if pdu is None:
        raise PduError(RejectReason.PROTOCOL_ERROR, "truncated PDU", fatal=True)
    if reader.buffered:
        raise PduError(RejectReason.PROTOCOL_ERROR, "trailing bytes after PDU", fatal=True)
    return pdu


PLACE_MIN = 4096  # data segments at least this long may be placed directly (see PduReader)
RX_SCRATCH = 256 * 1024  # one recv_into outside placed data segments
Placer = Callable[[bytes], Union[memoryview, None]]


@dataclass(slots=True)
class _Placement:
    """A data segment being copied straight into its final buffer."""

    bhs: bytes
    ahs: bytes
    dest: memoryview
    filled: int
    pad: int
    digest: bool
    crc: int = 0


@dataclass(slots=True)
class PduReader:
    """Incremental PDU parser: ``feed`` bytes, then ``next_pdu`` until it returns None.

    ``max_data`` is our MaxRecvDataSegmentLength (RFC 7143 13.12); the digest flags follow the
    negotiation and may be switched between PDUs (they start at the end of login, 13.1).

    ``placer`` (optional) keeps the Data-Out path to one copy: given the (digest-checked) BHS of
    a PDU whose data segment is not all here yet, it may return a writable memoryview of exactly
    DataSegmentLength bytes; the data is then copied from the received chunks straight into it,
    and the decoded PDU's ``data`` *is* that memoryview.
    """

    max_data: int
    header_digest: bool = False
    data_digest: bool = False
    placer: Placer | None = None
    _buf: bytearray = field(default_factory=bytearray)
    _pos: int = 0
    _direct: _Placement | None = None
    _rx: memoryview | None = None

    # --- zero-copy receive (asyncio.BufferedProtocol: get_buffer / buffer_updated) -----------
    def get_buffer(self) -> memoryview:
        """Where the next received bytes should be read into (``recv_into``): the rest of a
        data segment being placed, so payload goes from the kernel straight to its final
        buffer; otherwise a fixed scratch area that :meth:`buffer_updated` feeds from."""
        p = self._direct
        if p is not None and p.filled < len(p.dest):
            return p.dest[p.filled:]
        if self._rx is None:
            self._rx = memoryview(bytearray(RX_SCRATCH))
        return self._rx

    def whole_command(self, n: int) -> tuple[bytes, bytes] | None:
        """If the ``n`` bytes just read into the scratch area (:meth:`get_buffer`) are exactly
        one SCSI Command PDU without AHS or digests and nothing else is pending, take them and
        return (BHS, data segment) without buffering; otherwise None and nothing is consumed
        (then :meth:`buffer_updated`). The common shape of a read at queue depth 1."""
        rx = self._rx
        if n < BHS_LEN or self._direct is not None or self._pos != len(self._buf) \
                or self.header_digest or self.data_digest or rx is None:
            return None
        if rx[0] & 0x3F != Opcode.SCSI_COMMAND or rx[4]:
            return None
        dsl = (rx[5] << 16) | (rx[6] << 8) | rx[7]
        if BHS_LEN + ((dsl + 3) & ~3) != n or dsl > self.max_data:
            return None
        return bytes(rx[:BHS_LEN]), bytes(rx[BHS_LEN:BHS_LEN + dsl]) if dsl else b""

    def buffer_updated(self, n: int) -> None:
        """``n`` bytes were read into the buffer :meth:`get_buffer` returned last."""
        p = self._direct
        if p is not None and p.filled < len(p.dest):
            if p.digest:
                p.crc = _crc32c.crc32c(p.dest[p.filled:p.filled + n], p.crc)
            p.filled += n
            return
        assert self._rx is not None
        self.feed(self._rx[:n])

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def take_buffered(self) -> bytes:
        """Remove and return the bytes fed but not parsed yet (for a connection handover)."""
        if self._direct is not None:
            raise RuntimeError("a data segment is being placed")
        rest = bytes(self._buf[self._pos:])
        self._buf.clear()
        self._pos = 0
        return rest

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        p = self._direct
        if p is not None and p.filled < len(p.dest):
            # everything buffered was consumed when the placement began
            n = min(len(data), len(p.dest) - p.filled)
            view = memoryview(data)
            chunk = view[:n]
            p.dest[p.filled:p.filled + n] = chunk
            if p.digest:
                p.crc = _crc32c.crc32c(chunk, p.crc)
            p.filled += n
            data = view[n:]
            if not data:
                return
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def next_pdu(self) -> Pdu | None:
        """Return the next whole PDU, None when more bytes are needed, or raise PduError."""
        parts = self.next_parts()
        return None if parts is None else from_parts(*parts)

    def next_parts(self) -> tuple[bytes, bytes, bytes | memoryview] | None:
        """Like :meth:`next_pdu`, but the PDU still in parts: (BHS, AHS, data segment), framing
        and digests checked, fields not decoded (the connection's streaming path reads the few
        it needs from the BHS; :func:`from_parts` decodes the rest)."""
        if self._direct is not None:
            return self._finish_placement()
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < BHS_LEN:
            return None
        ahs_len = buf[pos + 4] * 4
        dsl = (buf[pos + 5] << 16) | (buf[pos + 6] << 8) | buf[pos + 7]
        head_len = BHS_LEN + ahs_len
        hd = 4 if self.header_digest else 0
        if dsl > self.max_data:
            raise PduError(RejectReason.PROTOCOL_ERROR,
                           f"DataSegmentLength {dsl} > MaxRecvDataSegmentLength {self.max_data}",
                           fatal=True, bhs=bytes(buf[pos:pos + BHS_LEN]))
        padded = (dsl + 3) & ~3
        dd = 4 if (self.data_digest and dsl) else 0
        total = head_len + hd + padded + dd
        if avail < total:
            if self.placer is not None and dsl >= PLACE_MIN and avail >= head_len + hd:
                self._begin_placement(head_len, hd, dsl, padded - dsl, bool(dd))
            return None
        if not (ahs_len or hd or dd):  # the common case: nothing to check, one copy each
            self._pos = pos + total
            return bytes(buf[pos:pos + BHS_LEN]), b"", \
                bytes(buf[pos + BHS_LEN:pos + BHS_LEN + dsl]) if dsl else b""
        mv = memoryview(buf)
        try:
            bhs = self._check_header(mv, pos, head_len, hd)
            ahs = bytes(mv[pos + BHS_LEN:pos + head_len])
            dstart = pos + head_len + hd
            data = bytes(mv[dstart:dstart + dsl])
            self._pos = pos + total
            if dd:
                (got,) = _DIGEST.unpack_from(buf, dstart + padded)
                if got != crc32c(mv[dstart:dstart + padded]):
                    raise DigestError(RejectReason.DATA_DIGEST_ERROR, "data digest mismatch",
                                      bhs=bhs)
        finally:
            mv.release()
        return bhs, ahs, data

    def _check_header(self, mv: memoryview, pos: int, head_len: int, hd: int) -> bytes:
        bhs = bytes(mv[pos:pos + BHS_LEN])
        if hd:
            (got,) = _DIGEST.unpack_from(mv, pos + head_len)
            if got != crc32c(mv[pos:pos + head_len]):
                raise DigestError(RejectReason.PROTOCOL_ERROR, "header digest mismatch",
                                  fatal=True, bhs=bhs)
        return bhs

    def _begin_placement(self, head_len: int, hd: int, dsl: int, pad: int, dd: bool) -> None:
        assert self.placer is not None
        pos = self._pos
        mv = memoryview(self._buf)
        try:
            bhs = self._check_header(mv, pos, head_len, hd)
            dest = self.placer(bhs)
            if dest is None or len(dest) != dsl or dest.readonly:
                return
            dstart = pos + head_len + hd
            have = len(self._buf) - dstart  # < dsl + pad + digest, so all of it is data
            have = min(have, dsl)
            chunk = mv[dstart:dstart + have]
            dest[:have] = chunk
            crc = _crc32c.crc32c(chunk) if dd else 0
            ahs = bytes(mv[pos + BHS_LEN:pos + head_len])
        finally:
            mv.release()
        self._pos = dstart + have
        self._direct = _Placement(bhs, ahs, dest, have, pad, dd, crc)

    def _finish_placement(self) -> tuple[bytes, bytes, memoryview] | None:
        p = self._direct
        assert p is not None
        if p.filled < len(p.dest):
            return None
        need = p.pad + (4 if p.digest else 0)
        if self.buffered < need:
            return None
        pos = self._pos
        self._pos = pos + need
        self._direct = None
        if p.digest:
            crc = _crc32c.crc32c(bytes(self._buf[pos:pos + p.pad]), p.crc)
            (got,) = _DIGEST.unpack_from(self._buf, pos + p.pad)
            if got != crc:
                raise DigestError(RejectReason.DATA_DIGEST_ERROR, "data digest mismatch",
                                  bhs=p.bhs)
        return p.bhs, p.ahs, p.dest
