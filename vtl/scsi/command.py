"""The SAM-5 "Execute Command" procedure call between the transport (iSCSI) and a logical unit.

These two types are the whole contract between ``vtl.iscsi`` and every device: the transport
never parses a CDB, a device never sees a PDU.

Residuals (SAM-5 5.1, RFC 7143 11.4.5): the transport collects exactly the Expected Data
Transfer Length of data-out and passes it whole. The device reports in
``ScsiResult.data_out_expected`` how many bytes the CDB called for; the transport derives the
overflow/underflow residual from that and the EDTL. For data-in the device returns what the CDB
and its allocation length call for; the transport truncates to the EDTL and reports the residual.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple


class ScsiStatus(enum.IntEnum):
    """SAM-5 5.3 status codes."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class ScsiCommand(NamedTuple):
    """One SCSI command as a logical unit sees it (immutable; a named tuple rather than a
    frozen dataclass because one is built per command and a tuple is built in one step).

    ``nexus`` identifies the I_T nexus (initiator port name, e.g. "iqn...,i,0x<isid>"); devices
    key unit attentions and reservations on it. ``expected_in`` is the transport's Expected Data
    Transfer Length for data-in (0 for writes); ``data_out`` is everything the initiator sent.
    """

    lun: int
    cdb: bytes
    data_out: bytes | bytearray | memoryview = b""
    expected_in: int = 0
    nexus: str = ""
    task_tag: int = 0


@dataclass(slots=True)
class ScsiResult:
    """The outcome of one command.

    ``sense`` is the complete sense data (fixed format) when status is CHECK CONDITION.
    ``data_out_expected`` is the number of data-out bytes the CDB called for, or None when the
    device consumed exactly what it was given (the usual case).
    """

    status: ScsiStatus = ScsiStatus.GOOD
    data_in: bytes | bytearray | memoryview = b""
    sense: bytes = b""
    data_out_expected: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == ScsiStatus.GOOD
