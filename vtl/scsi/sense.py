"""Sense data (SPC-4 4.5) in fixed format, and the exception that carries it.

Invariant: device code raises :class:`SenseError`; only the LogicalUnit dispatcher
(``vtl.scsi.lu``) turns it into CHECK CONDITION + sense bytes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

FIXED_SENSE_LEN = 18
_FIXED = struct.Struct(">BBBIBIBBBBH")  # through the sense-key-specific bytes (18 bytes)
assert _FIXED.size == FIXED_SENSE_LEN


class SenseKey(enum.IntEnum):
    """SPC-4 4.5.6, table 27."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE


class Asc(tuple, enum.Enum):
    """Additional sense code / qualifier pairs (SPC-4 annex D) used by the appliance."""

    NO_ADDITIONAL = (0x00, 0x00)
    FILEMARK_DETECTED = (0x00, 0x01)
    END_OF_PARTITION_MEDIUM_DETECTED = (0x00, 0x02)
    SETMARK_DETECTED = (0x00, 0x03)
    BEGINNING_OF_PARTITION_MEDIUM_DETECTED = (0x00, 0x04)
    END_OF_DATA_DETECTED = (0x00, 0x05)
    OPERATION_IN_PROGRESS = (0x00, 0x16)
    LUN_NOT_READY_CAUSE_NOT_REPORTABLE = (0x04, 0x00)
    LUN_BECOMING_READY = (0x04, 0x01)
    LUN_NOT_READY_INIT_REQUIRED = (0x04, 0x02)
    LUN_NOT_READY_MANUAL_INTERVENTION = (0x04, 0x03)
    LUN_NOT_READY_FORMAT_IN_PROGRESS = (0x04, 0x04)
    LUN_NOT_READY_OPERATION_IN_PROGRESS = (0x04, 0x07)
    WRITE_ERROR = (0x0C, 0x00)
    LOGICAL_BLOCK_GUARD_CHECK_FAILED = (0x10, 0x01)
    UNRECOVERED_READ_ERROR = (0x11, 0x00)
    MISCOMPARE_DURING_VERIFY = (0x1D, 0x00)
    PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
    INVALID_COMMAND_OPERATION_CODE = (0x20, 0x00)
    LBA_OUT_OF_RANGE = (0x21, 0x00)
    INVALID_ELEMENT_ADDRESS = (0x21, 0x01)
    INVALID_FIELD_IN_CDB = (0x24, 0x00)
    LOGICAL_UNIT_NOT_SUPPORTED = (0x25, 0x00)
    INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
    PARAMETER_NOT_SUPPORTED = (0x26, 0x01)
    PARAMETER_VALUE_INVALID = (0x26, 0x02)
    WRITE_PROTECTED = (0x27, 0x00)
    HARDWARE_WRITE_PROTECTED = (0x27, 0x01)
    LUN_SOFTWARE_WRITE_PROTECTED = (0x27, 0x02)
    NOT_READY_TO_READY_CHANGE = (0x28, 0x00)
    IMPORT_OR_EXPORT_ELEMENT_ACCESSED = (0x28, 0x01)
    POWER_ON_RESET = (0x29, 0x00)
    POWER_ON_OCCURRED = (0x29, 0x01)
    SCSI_BUS_RESET_OCCURRED = (0x29, 0x02)
    BUS_DEVICE_RESET_FUNCTION_OCCURRED = (0x29, 0x03)
    DEVICE_INTERNAL_RESET = (0x29, 0x04)
    I_T_NEXUS_LOSS_OCCURRED = (0x29, 0x07)
    PARAMETERS_CHANGED = (0x2A, 0x00)
    MODE_PARAMETERS_CHANGED = (0x2A, 0x01)
    RESERVATIONS_PREEMPTED = (0x2A, 0x03)
    CAPACITY_DATA_HAS_CHANGED = (0x2A, 0x09)
    COMMANDS_CLEARED_BY_ANOTHER_INITIATOR = (0x2F, 0x00)
    INCOMPATIBLE_MEDIUM_INSTALLED = (0x30, 0x00)
    CANNOT_READ_MEDIUM_UNKNOWN_FORMAT = (0x30, 0x01)
    CANNOT_WRITE_MEDIUM_INCOMPATIBLE_FORMAT = (0x30, 0x05)
    CLEANING_CARTRIDGE_INSTALLED = (0x30, 0x03)
    MEDIUM_FORMAT_CORRUPTED = (0x31, 0x00)
    SEQUENTIAL_POSITIONING_ERROR = (0x3B, 0x00)
    MEDIUM_DESTINATION_ELEMENT_FULL = (0x3B, 0x0D)
    MEDIUM_SOURCE_ELEMENT_EMPTY = (0x3B, 0x0E)
    END_OF_MEDIUM_REACHED = (0x3B, 0x0F)
    MEDIUM_MAGAZINE_NOT_ACCESSIBLE = (0x3B, 0x11)
    MEDIUM_MAGAZINE_REMOVED = (0x3B, 0x12)
    MEDIUM_MAGAZINE_INSERTED = (0x3B, 0x13)
    MEDIUM_NOT_PRESENT = (0x3A, 0x00)
    INVALID_BITS_IN_IDENTIFY_MESSAGE = (0x3D, 0x00)
    LOGICAL_UNIT_FAILURE = (0x3E, 0x01)
    INQUIRY_DATA_HAS_CHANGED = (0x3F, 0x03)
    REPORTED_LUNS_DATA_HAS_CHANGED = (0x3F, 0x0E)
    INTERNAL_TARGET_FAILURE = (0x44, 0x00)
    INVALID_MESSAGE_ERROR = (0x49, 0x00)
    COMMAND_PHASE_ERROR = (0x4A, 0x00)
    DATA_PHASE_ERROR = (0x4B, 0x00)
    OVERLAPPED_COMMANDS_ATTEMPTED = (0x4E, 0x00)
    WRITE_APPEND_ERROR = (0x50, 0x00)
    ERASE_FAILURE = (0x51, 0x00)
    MEDIUM_LOAD_OR_EJECT_FAILED = (0x53, 0x00)
    MEDIUM_REMOVAL_PREVENTED = (0x53, 0x02)
    SYSTEM_RESOURCE_FAILURE = (0x55, 0x00)
    WORM_MEDIUM_OVERWRITE_ATTEMPTED = (0x30, 0x0C)
    WORM_MEDIUM_INTEGRITY_CHECK = (0x30, 0x0D)
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT = (0x27, 0x07)
    SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)

    @property
    def asc(self) -> int:
        return self.value[0]

    @property
    def ascq(self) -> int:
        return self.value[1]


@dataclass(frozen=True, slots=True)
class FieldPointer:
    """SPC-4 4.5.2.4.2 sense-key-specific field pointer for ILLEGAL REQUEST.

    ``in_cdb`` True = error in the CDB (C/D bit set), False = in the parameter list.
    ``bit`` is the bit position (0-7) or None when the whole byte is in error.
    """

    byte: int
    bit: int | None = None
    in_cdb: bool = True

    def encode(self) -> bytes:
        b0 = 0x80 | (0x40 if self.in_cdb else 0)
        if self.bit is not None:
            b0 |= 0x08 | (self.bit & 0x7)
        return bytes([b0]) + struct.pack(">H", self.byte & 0xFFFF)


class SenseError(Exception):
    """A device-level error that becomes CHECK CONDITION with this sense data.

    Tape flags (FILEMARK, EOM, ILI) and INFORMATION are carried for SSC; ``field`` for the
    ILLEGAL REQUEST field pointer; ``progress`` for NOT READY progress indication.
    """

    def __init__(
        self,
        key: SenseKey,
        asc: Asc | tuple[int, int] = Asc.NO_ADDITIONAL,
        *,
        information: int | None = None,
        filemark: bool = False,
        eom: bool = False,
        ili: bool = False,
        field: FieldPointer | None = None,
        progress: int | None = None,
        command_specific: int = 0,
        deferred: bool = False,
    ) -> None:
        asc_pair = asc.value if isinstance(asc, Asc) else tuple(asc)
        super().__init__(f"{key.name} {asc_pair[0]:02X}/{asc_pair[1]:02X}")
        self.key = key
        self.asc = asc_pair
        self.information = information
        self.filemark = filemark
        self.eom = eom
        self.ili = ili
        self.field = field
        self.progress = progress
        self.command_specific = command_specific
        self.deferred = deferred

    def encode(self) -> bytes:
        return encode_fixed_sense(
            self.key,
            self.asc,
            information=self.information,
            filemark=self.filemark,
            eom=self.eom,
            ili=self.ili,
            field=self.field,
            progress=self.progress,
            command_specific=self.command_specific,
            deferred=self.deferred,
        )


def illegal_request(asc: Asc = Asc.INVALID_FIELD_IN_CDB, byte: int | None = None,
                    bit: int | None = None, *, in_cdb: bool = True) -> SenseError:
    """ILLEGAL REQUEST with an optional field pointer (the common case for bad CDBs)."""
    field = FieldPointer(byte, bit, in_cdb) if byte is not None else None
    return SenseError(SenseKey.ILLEGAL_REQUEST, asc, field=field)


def encode_fixed_sense(
    key: SenseKey,
    asc: Asc | tuple[int, int],
    *,
    information: int | None = None,
    filemark: bool = False,
    eom: bool = False,
    ili: bool = False,
    field: FieldPointer | None = None,
    progress: int | None = None,
    command_specific: int = 0,
    deferred: bool = False,
) -> bytes:
    """Fixed-format sense data, SPC-4 4.5.3, 18 bytes (ADDITIONAL SENSE LENGTH = 10)."""
    asc_pair = asc.value if isinstance(asc, Asc) else asc
    valid = information is not None
    code = 0x71 if deferred else 0x70
    b0 = (0x80 if valid else 0) | code
    b2 = (key & 0x0F) | (0x80 if filemark else 0) | (0x40 if eom else 0) | (0x20 if ili else 0)
    info = (information or 0) & 0xFFFFFFFF
    if field is not None:
        sks = field.encode()
    elif progress is not None:
        sks = bytes([0x80]) + struct.pack(">H", progress & 0xFFFF)
    else:
        sks = b"\x00\x00\x00"
    head = _FIXED.pack(b0, 0, b2, info, 10, command_specific & 0xFFFFFFFF,
                       asc_pair[0], asc_pair[1], 0, sks[0], int.from_bytes(sks[1:3], "big"))
    return head


@dataclass(frozen=True, slots=True)
class DecodedSense:
    """Fixed or descriptor sense, decoded (for initiators, tests and REQUEST SENSE)."""

    key: int
    asc: int
    ascq: int
    valid: bool
    information: int
    filemark: bool
    eom: bool
    ili: bool
    sks: bytes

    @classmethod
    def decode(cls, buf: bytes) -> "DecodedSense":
        if len(buf) < 8:
            raise ValueError("sense data shorter than 8 bytes")
        code = buf[0] & 0x7F
        if code in (0x70, 0x71):
            if len(buf) < 14:
                raise ValueError("fixed sense data shorter than 14 bytes")
            return cls(
                key=buf[2] & 0x0F, asc=buf[12], ascq=buf[13], valid=bool(buf[0] & 0x80),
                information=int.from_bytes(buf[3:7], "big"), filemark=bool(buf[2] & 0x80),
                eom=bool(buf[2] & 0x40), ili=bool(buf[2] & 0x20), sks=bytes(buf[15:18]),
            )
        if code in (0x72, 0x73):
            return cls(key=buf[1] & 0x0F, asc=buf[2], ascq=buf[3], valid=False, information=0,
                       filemark=False, eom=False, ili=False, sks=b"")
        raise ValueError(f"unknown sense response code 0x{code:02x}")


_DESCRIPTOR_HEAD = struct.Struct(">BBBBxxxB")  # SPC-4 4.5.2.1 table 26
assert _DESCRIPTOR_HEAD.size == 8


def descriptor_sense(fixed: bytes) -> bytes:
    """Convert fixed-format sense (SPC-4 4.5.3) to descriptor format (SPC-4 4.5.2).

    Carries INFORMATION (descriptor 00h) when VALID, COMMAND-SPECIFIC INFORMATION (01h) when
    non-zero, the sense-key-specific bytes (02h) when SKSV, and FILEMARK/EOM/ILI as the stream
    commands descriptor (04h, SSC-3 4.2.x).
    """
    if len(fixed) < 18:
        raise ValueError("fixed sense data shorter than 18 bytes")
    code = 0x73 if (fixed[0] & 0x7F) == 0x71 else 0x72
    descs = bytearray()
    if fixed[0] & 0x80:
        descs += bytes([0x00, 0x0A, 0x80, 0x00]) + bytes(4) + fixed[3:7]
    if any(fixed[8:12]):
        descs += bytes([0x01, 0x0A, 0x00, 0x00]) + bytes(4) + fixed[8:12]
    if fixed[15] & 0x80:
        descs += bytes([0x02, 0x06, 0x00, 0x00]) + fixed[15:18] + b"\x00"
    stream = fixed[2] & 0xE0
    if stream:
        descs += bytes([0x04, 0x02, 0x00, stream])
    return _DESCRIPTOR_HEAD.pack(code, fixed[2] & 0x0F, fixed[12], fixed[13], len(descs)) + descs
