"""CDB vocabulary shared by every device: operation codes, CDB lengths, field readers.

SPC-4 4.2 defines the CDB: byte 0 is the OPERATION CODE, whose top three bits are the GROUP CODE
that fixes the CDB length (SPC-4 4.2.5.1, table 11); the last byte is the CONTROL byte
(SAM-5 5.2). The SBC-3, SSC-3 and SMC-3 operation codes live here as named constants so each
device module imports them from one place; they overlap numerically across command sets
(0x01 is REWIND for tape and REZERO UNIT for disk), hence one IntEnum per command set.

Invariant: the readers never index past the CDB; callers check the length first
(``Request.need_cdb``).
"""

from __future__ import annotations

import enum

# SPC-4 4.2.5.1 table 11: group code -> CDB length. Group 3 is the variable-length group
# (0x7E/0x7F), groups 6 and 7 are vendor specific: their length is not implied by the code.
GROUP_LENGTH: dict[int, int] = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}

# CONTROL byte bits the dispatcher evaluates (NACA, and the obsolete LINK), SAM-5 5.2.
CONTROL_USAGE = 0x05


class SpcOpcode(enum.IntEnum):
    """SPC-4 operation codes (annex E.3.1) the appliance knows by name."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    RESERVE_6 = 0x16
    RELEASE_6 = 0x17
    MODE_SENSE_6 = 0x1A
    RECEIVE_DIAGNOSTIC_RESULTS = 0x1C
    SEND_DIAGNOSTIC = 0x1D
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    WRITE_BUFFER = 0x3B
    READ_BUFFER = 0x3C
    LOG_SELECT = 0x4C
    LOG_SENSE = 0x4D
    MODE_SELECT_10 = 0x55
    RESERVE_10 = 0x56
    RELEASE_10 = 0x57
    MODE_SENSE_10 = 0x5A
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    VARIABLE_LENGTH = 0x7F
    EXTENDED_COPY = 0x83
    RECEIVE_COPY_RESULTS = 0x84
    READ_ATTRIBUTE = 0x8C
    WRITE_ATTRIBUTE = 0x8D
    REPORT_LUNS = 0xA0
    SECURITY_PROTOCOL_IN = 0xA2
    MAINTENANCE_IN = 0xA3
    MAINTENANCE_OUT = 0xA4
    READ_MEDIA_SERIAL_NUMBER = 0xAB
    SECURITY_PROTOCOL_OUT = 0xB5


class MaintenanceInAction(enum.IntEnum):
    """SERVICE ACTION values of MAINTENANCE IN (0xA3), SPC-4 annex E.3.2."""

    REPORT_IDENTIFYING_INFORMATION = 0x05
    REPORT_TARGET_PORT_GROUPS = 0x0A
    REPORT_ALIASES = 0x0B
    REPORT_SUPPORTED_OPERATION_CODES = 0x0C
    REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS = 0x0D
    REPORT_PRIORITY = 0x0E
    REPORT_TIMESTAMP = 0x0F


class MaintenanceOutAction(enum.IntEnum):
    """SERVICE ACTION values of MAINTENANCE OUT (0xA4), SPC-4 annex E.3.2."""

    SET_IDENTIFYING_INFORMATION = 0x06
    SET_TARGET_PORT_GROUPS = 0x0A
    CHANGE_ALIASES = 0x0B
    SET_PRIORITY = 0x0E
    SET_TIMESTAMP = 0x0F


class SbcOpcode(enum.IntEnum):
    """SBC-3 operation codes (direct-access block devices, the volume LUs)."""

    TEST_UNIT_READY = 0x00
    FORMAT_UNIT = 0x04
    REASSIGN_BLOCKS = 0x07
    READ_6 = 0x08
    WRITE_6 = 0x0A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    WRITE_AND_VERIFY_10 = 0x2E
    VERIFY_10 = 0x2F
    PRE_FETCH_10 = 0x34
    SYNCHRONIZE_CACHE_10 = 0x35
    READ_DEFECT_DATA_10 = 0x37
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    READ_16 = 0x88
    COMPARE_AND_WRITE = 0x89
    WRITE_16 = 0x8A
    ORWRITE_16 = 0x8B
    WRITE_AND_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    PRE_FETCH_16 = 0x90
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    WRITE_AND_VERIFY_12 = 0xAE
    VERIFY_12 = 0xAF


class SbcServiceAction(enum.IntEnum):
    """SERVICE ACTION IN(16) (0x9E) service actions, SBC-3 5.x."""

    READ_CAPACITY_16 = 0x10
    GET_LBA_STATUS = 0x12


class SscOpcode(enum.IntEnum):
    """SSC-3 operation codes (sequential-access devices, the tape drives)."""

    TEST_UNIT_READY = 0x00
    REWIND = 0x01
    FORMAT_MEDIUM = 0x04
    READ_BLOCK_LIMITS = 0x05
    READ_6 = 0x08
    WRITE_6 = 0x0A
    SET_CAPACITY = 0x0B
    READ_REVERSE_6 = 0x0F
    WRITE_FILEMARKS_6 = 0x10
    SPACE_6 = 0x11
    VERIFY_6 = 0x13
    RECOVER_BUFFERED_DATA = 0x14
    ERASE_6 = 0x19
    LOAD_UNLOAD = 0x1B
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    LOCATE_10 = 0x2B
    READ_POSITION = 0x34
    REPORT_DENSITY_SUPPORT = 0x44
    WRITE_FILEMARKS_16 = 0x80
    READ_REVERSE_16 = 0x81
    ALLOW_OVERWRITE = 0x82
    READ_16 = 0x88
    WRITE_16 = 0x8A
    VERIFY_16 = 0x8F
    SPACE_16 = 0x91
    LOCATE_16 = 0x92
    ERASE_16 = 0x93


class SmcOpcode(enum.IntEnum):
    """SMC-3 operation codes (media changers)."""

    TEST_UNIT_READY = 0x00
    INITIALIZE_ELEMENT_STATUS = 0x07
    OPEN_CLOSE_IMPORT_EXPORT_ELEMENT = 0x1B
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    POSITION_TO_ELEMENT = 0x2B
    INITIALIZE_ELEMENT_STATUS_WITH_RANGE = 0x37
    MOVE_MEDIUM = 0xA5
    EXCHANGE_MEDIUM = 0xA6
    MOVE_MEDIUM_ATTACHED = 0xA7
    READ_ELEMENT_STATUS_ATTACHED = 0xB4
    REQUEST_VOLUME_ELEMENT_ADDRESS = 0xB5
    SEND_VOLUME_TAG = 0xB6
    READ_ELEMENT_STATUS = 0xB8


# Operation codes whose CDB carries a SERVICE ACTION in byte 1 bits 4-0 (SPC-4 4.2.5.3).
SERVICE_ACTION_IN_BYTE1 = frozenset({0x5E, 0x5F, 0x9E, 0x9F, 0xA3, 0xA4})


def group_code(opcode: int) -> int:
    """SPC-4 4.2.5.1: the GROUP CODE is bits 7-5 of the operation code."""
    return (opcode >> 5) & 0x07


def cdb_length(opcode: int) -> int | None:
    """The CDB length implied by the group code, or None (variable length / vendor groups)."""
    return GROUP_LENGTH.get(group_code(opcode))


def service_action(cdb: bytes) -> int | None:
    """The SERVICE ACTION of a CDB whose opcode has one (byte 1 bits 4-0), else None."""
    if len(cdb) >= 2 and cdb[0] in SERVICE_ACTION_IN_BYTE1:
        return cdb[1] & 0x1F
    if len(cdb) >= 10 and cdb[0] == SpcOpcode.VARIABLE_LENGTH:
        return u16(cdb, 8)
    return None


def u16(cdb: bytes, offset: int) -> int:
    """Big-endian 16-bit field at ``offset`` (SPC-4 3.5: multi-byte fields are big-endian)."""
    return int.from_bytes(cdb[offset:offset + 2], "big")


def u24(cdb: bytes, offset: int) -> int:
    return int.from_bytes(cdb[offset:offset + 3], "big")


def u32(cdb: bytes, offset: int) -> int:
    return int.from_bytes(cdb[offset:offset + 4], "big")


def u64(cdb: bytes, offset: int) -> int:
    return int.from_bytes(cdb[offset:offset + 8], "big")


# Where the ALLOCATION LENGTH (data-in) lives in the SPC commands: opcode -> (offset, size).
ALLOCATION_LENGTH_FIELD: dict[int, tuple[int, int]] = {
    SpcOpcode.REQUEST_SENSE: (4, 1),
    SpcOpcode.INQUIRY: (3, 2),
    SpcOpcode.MODE_SENSE_6: (4, 1),
    SpcOpcode.MODE_SENSE_10: (7, 2),
    SpcOpcode.LOG_SENSE: (7, 2),
    SpcOpcode.RECEIVE_DIAGNOSTIC_RESULTS: (3, 2),
    SpcOpcode.PERSISTENT_RESERVE_IN: (7, 2),
    SpcOpcode.REPORT_LUNS: (6, 4),
    SpcOpcode.MAINTENANCE_IN: (6, 4),
    SpcOpcode.READ_ATTRIBUTE: (10, 4),
}

# Where the PARAMETER LIST LENGTH (data-out) lives: opcode -> (offset, size).
PARAMETER_LIST_LENGTH_FIELD: dict[int, tuple[int, int]] = {
    SpcOpcode.MODE_SELECT_6: (4, 1),
    SpcOpcode.MODE_SELECT_10: (7, 2),
    SpcOpcode.LOG_SELECT: (7, 2),
    SpcOpcode.SEND_DIAGNOSTIC: (3, 2),
    SpcOpcode.PERSISTENT_RESERVE_OUT: (5, 4),
    SpcOpcode.WRITE_ATTRIBUTE: (10, 4),
}


def allocation_length(cdb: bytes) -> int | None:
    """ALLOCATION LENGTH of an SPC data-in command (SPC-4 4.2.5.6), None if unknown or short."""
    where = ALLOCATION_LENGTH_FIELD.get(cdb[0]) if cdb else None
    if where is None or len(cdb) < where[0] + where[1]:
        return None
    return int.from_bytes(cdb[where[0]:where[0] + where[1]], "big")


def parameter_list_length(cdb: bytes) -> int | None:
    """PARAMETER LIST LENGTH of an SPC data-out command (SPC-4 4.2.5.5), None if unknown."""
    where = PARAMETER_LIST_LENGTH_FIELD.get(cdb[0]) if cdb else None
    if where is None or len(cdb) < where[0] + where[1]:
        return None
    return int.from_bytes(cdb[where[0]:where[0] + where[1]], "big")


# CDB USAGE DATA for REPORT SUPPORTED OPERATION CODES (SPC-4 6.35.3): byte 0 is the opcode,
# a service action field holds its value, every other bit is 1 where the device server
# evaluates it. Keyed by (opcode, service action or None).
SPC_CDB_USAGE: dict[tuple[int, int | None], bytes] = {
    (0x00, None): bytes([0x00, 0x00, 0x00, 0x00, 0x00, CONTROL_USAGE]),
    (0x03, None): bytes([0x03, 0x01, 0x00, 0x00, 0xFF, CONTROL_USAGE]),
    (0x12, None): bytes([0x12, 0x01, 0xFF, 0xFF, 0xFF, CONTROL_USAGE]),
    (0x15, None): bytes([0x15, 0x11, 0x00, 0x00, 0xFF, CONTROL_USAGE]),
    (0x16, None): bytes([0x16, 0x00, 0x00, 0x00, 0x00, CONTROL_USAGE]),
    (0x17, None): bytes([0x17, 0x00, 0x00, 0x00, 0x00, CONTROL_USAGE]),
    (0x1A, None): bytes([0x1A, 0x08, 0xFF, 0xFF, 0xFF, CONTROL_USAGE]),
    (0x55, None): bytes([0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, CONTROL_USAGE]),
    (0x56, None): bytes([0x56, 0x10, 0, 0, 0, 0, 0, 0, 0, CONTROL_USAGE]),
    (0x57, None): bytes([0x57, 0x10, 0, 0, 0, 0, 0, 0, 0, CONTROL_USAGE]),
    (0x5A, None): bytes([0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, CONTROL_USAGE]),
    (0xA0, None): bytes([0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, CONTROL_USAGE]),
    (0xA3, 0x0C): bytes([0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0,
                         CONTROL_USAGE]),
}


def generic_cdb_usage(opcode: int, sa: int | None = None) -> bytes | None:
    """A conservative CDB USAGE DATA for an opcode without a table entry: every field used.

    None for opcodes whose length the group code does not imply.
    """
    length = cdb_length(opcode)
    if length is None:
        return None
    usage = bytearray([opcode] + [0xFF] * (length - 2) + [CONTROL_USAGE])
    if sa is not None and opcode in SERVICE_ACTION_IN_BYTE1:
        usage[1] = sa & 0x1F
    return bytes(usage)
