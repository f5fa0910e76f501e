"""ScsiTarget: the SCSI target device behind one iSCSI target (SAM-5 4.6): a LUN -> LU map.

It satisfies ``vtl.iscsi.target.ScsiDevice`` structurally (no import of vtl.iscsi: SCSI never
sees iSCSI). ``ScsiCommand.lun`` is the LUN *number* (0..16383) the transport decoded from the
8-byte LUN field; :func:`encode_lun` / :func:`decode_lun` convert (SAM-5 4.7).

Invariants:
- REPORT LUNS is answered by the target for any LUN, existing or not (SPC-4 6.33).
- A command to a LUN that does not exist never reaches an LU: INQUIRY answers peripheral
  qualifier 011b / type 1Fh, REQUEST SENSE returns LOGICAL UNIT NOT SUPPORTED as data, anything
  else is CHECK CONDITION ILLEGAL REQUEST 25/00 (SPC-4 6.6.2, 6.39; SAM-5 5.9).
- Adding or removing a LUN raises REPORTED LUNS DATA HAS CHANGED (3F/0E) on every other LU for
  every I_T nexus the target has seen; REPORT LUNS on a nexus clears it there (SPC-4 6.33).
- Resets (SAM-5 6.3, 7.x): LOGICAL UNIT RESET and a warm TARGET RESET give BUS DEVICE RESET
  FUNCTION OCCURRED (29/03); a cold reset is a power-on and gives POWER ON OCCURRED (29/01).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Mapping

from vtl.scsi.command import ScsiCommand, ScsiResult, ScsiStatus
from vtl.scsi.sense import (
    Asc,
    SenseError,
    SenseKey,
    descriptor_sense,
    encode_fixed_sense,
    illegal_request,
)

if TYPE_CHECKING:
    from vtl.scsi.lu import LogicalUnit

MAX_LUN = 0x3FFF  # the largest number the flat space addressing method carries
LUN_ENTRY_LEN = 8
REPORT_LUNS_MIN_ALLOCATION = 16  # SPC-4 6.33: smaller is INVALID FIELD IN CDB
_REPORT_LUNS_HEAD = struct.Struct(">I4x")
assert _REPORT_LUNS_HEAD.size == 8

_OP_INQUIRY = 0x12
_OP_REQUEST_SENSE = 0x03
_OP_REPORT_LUNS = 0xA0

# SPC-4 6.33 table 285 SELECT REPORT: 00h LUs (not well known), 01h well-known only, 02h all.
SELECT_REPORT_ALL_BUT_WELL_KNOWN = 0x00
SELECT_REPORT_WELL_KNOWN = 0x01
SELECT_REPORT_ALL = 0x02


def encode_lun(lun: int) -> bytes:
    """SAM-5 4.7: peripheral device addressing for LUN < 256, flat space otherwise."""
    if not 0 <= lun <= MAX_LUN:
        raise ValueError(f"LUN {lun} out of range 0..{MAX_LUN}")
    if lun < 256:
        return bytes([0x00, lun]) + bytes(6)
    return bytes([0x40 | (lun >> 8), lun & 0xFF]) + bytes(6)


def decode_lun(buf: bytes) -> int:
    """The LUN number of a single-level 8-byte LUN (peripheral or flat space addressing)."""
    if len(buf) < LUN_ENTRY_LEN:
        raise ValueError("LUN shorter than 8 bytes")
    method = buf[0] >> 6
    if any(buf[2:8]) or method not in (0, 1) or (method == 0 and buf[0] & 0x3F):
        raise ValueError(f"unsupported LUN format {bytes(buf[:8]).hex()}")
    return ((buf[0] & 0x3F) << 8) | buf[1]


def report_luns_data(cdb: bytes, luns: list[int] | tuple[int, ...]) -> bytes:
    """REPORT LUNS parameter data (SPC-4 6.33) truncated to the allocation length.

    Raises SenseError for a short CDB, an unsupported SELECT REPORT (byte 2) or an allocation
    length below 16 (byte 6). The appliance has no well-known LUs, so SELECT REPORT 01h
    returns an empty list.
    """
    if len(cdb) < 12:
        raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=0)
    select = cdb[2]
    if select not in (SELECT_REPORT_ALL_BUT_WELL_KNOWN, SELECT_REPORT_WELL_KNOWN,
                      SELECT_REPORT_ALL):
        raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=2)
    alloc = int.from_bytes(cdb[6:10], "big")
    if alloc < REPORT_LUNS_MIN_ALLOCATION:
        raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=6)
    listed = [] if select == SELECT_REPORT_WELL_KNOWN else sorted(luns)
    body = b"".join(encode_lun(n) for n in listed)
    data = _REPORT_LUNS_HEAD.pack(len(body)) + body
    return data[:alloc]


def _not_supported() -> SenseError:
    return SenseError(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED)


class ScsiTarget:
    """LUN -> LogicalUnit map with the target-level behaviour of SAM-5 / SPC-4.

    LUs are added and removed live (a new volume, a removed one). Pure: no locking; the owner
    serialises calls (one worker per target).
    """

    def __init__(self, luns: Mapping[int, "LogicalUnit"] | None = None) -> None:
        self._luns: dict[int, LogicalUnit] = {}
        self._nexuses: set[str] = set()
        for lun, lu in (luns or {}).items():
            self._check_lun(lun)
            self._luns[lun] = lu

    # --- the LUN map -----------------------------------------------------------------------
    @staticmethod
    def _check_lun(lun: int) -> None:
        if not 0 <= lun <= MAX_LUN:
            raise ValueError(f"LUN {lun} out of range 0..{MAX_LUN}")

    def luns(self) -> list[int]:
        return sorted(self._luns)

    def lu(self, lun: int) -> "LogicalUnit | None":
        return self._luns.get(lun)

    def has_lun(self, lun: int) -> bool:
        return lun in self._luns

    def add_lun(self, lun: int, lu: "LogicalUnit") -> None:
        """Attach an LU; every other LU reports 3F/0E to every known nexus."""
        self._check_lun(lun)
        if lun in self._luns:
            raise ValueError(f"LUN {lun} already exists")
        self._luns[lun] = lu
        self._luns_changed(skip=lun)

    def remove_lun(self, lun: int) -> "LogicalUnit | None":
        """Detach an LU (the caller closes it); the remaining LUs report 3F/0E."""
        lu = self._luns.pop(lun, None)
        if lu is not None:
            self._luns_changed(skip=None)
        return lu

    def _luns_changed(self, skip: int | None) -> None:
        for lun, lu in self._luns.items():
            if lun == skip:
                continue
            for nexus in sorted(self._nexuses):
                lu.unit_attention(Asc.REPORTED_LUNS_DATA_HAS_CHANGED, nexus)

    # --- ScsiDevice ------------------------------------------------------------------------
    def execute(self, cmd: ScsiCommand) -> ScsiResult:
        self._nexuses.add(cmd.nexus)
        cdb = cmd.cdb
        if cdb and cdb[0] == _OP_REPORT_LUNS:
            return self._report_luns(cmd, bytes(cdb))
        lu = self._luns.get(cmd.lun)
        if lu is None:
            return self._missing_lun(bytes(cdb))
        return lu.execute(cmd)

    def reset_lun(self, lun: int) -> None:
        """LOGICAL UNIT RESET (SAM-5 7.7): the LU's own reset, UA 29/03."""
        lu = self._luns.get(lun)
        if lu is not None:
            lu.reset()

    def reset_target(self, cold: bool) -> None:
        """TARGET WARM RESET / TARGET COLD RESET (RFC 7143 11.5.1, SAM-5 6.3).

        Every LU is reset. Warm: UA 29/03 BUS DEVICE RESET FUNCTION OCCURRED (a target reset
        event). Cold: a power-on event, so the 29/03 each LU raised is replaced by 29/01
        POWER ON OCCURRED for every nexus the target knows.
        """
        for lu in self._luns.values():
            lu.reset()
            if cold:
                for nexus in sorted(self._nexuses):
                    lu.clear_unit_attention(Asc.BUS_DEVICE_RESET_FUNCTION_OCCURRED, nexus)
                    lu.unit_attention(Asc.POWER_ON_OCCURRED, nexus)

    def nexus_lost(self, nexus: str) -> None:
        """I_T nexus loss: every LU forgets the nexus (UAs, sense, reservations)."""
        self._nexuses.discard(nexus)
        for lu in self._luns.values():
            lu.forget_nexus(nexus)

    # --- target-level commands -------------------------------------------------------------
    def _report_luns(self, cmd: ScsiCommand, cdb: bytes) -> ScsiResult:
        try:
            data = report_luns_data(cdb, self.luns())
        except SenseError as err:
            return ScsiResult(ScsiStatus.CHECK_CONDITION, b"", err.encode())
        for lu in self._luns.values():
            lu.clear_unit_attention(Asc.REPORTED_LUNS_DATA_HAS_CHANGED, cmd.nexus)
        return ScsiResult(ScsiStatus.GOOD, data)

    def _missing_lun(self, cdb: bytes) -> ScsiResult:
        try:
            if cdb and cdb[0] == _OP_INQUIRY:
                return ScsiResult(ScsiStatus.GOOD, self._missing_inquiry(cdb))
            if cdb and cdb[0] == _OP_REQUEST_SENSE:
                return ScsiResult(ScsiStatus.GOOD, self._missing_request_sense(cdb))
            raise _not_supported()
        except SenseError as err:
            return ScsiResult(ScsiStatus.CHECK_CONDITION, b"", err.encode())

    def _missing_inquiry(self, cdb: bytes) -> bytes:
        """SPC-4 6.6.2: PERIPHERAL QUALIFIER 011b, PERIPHERAL DEVICE TYPE 1Fh."""
        if len(cdb) < 6:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=0)
        if cdb[1] & 0xFE:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1)
        alloc = int.from_bytes(cdb[3:5], "big")
        peripheral = 0x60 | 0x1F
        if cdb[1] & 0x01:
            if cdb[2] != 0x00:  # only the Supported VPD Pages page exists here
                raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=2)
            return bytes([peripheral, 0x00, 0x00, 0x01, 0x00])[:alloc]
        if cdb[2]:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=2)
        vendor, product, revision = self._identity()
        # VERSION SPC-4, HISUP + RESPONSE DATA FORMAT 2, ADDITIONAL LENGTH 31, CMDQUE
        head = bytes([peripheral, 0x00, 0x06, 0x12, 31, 0x00, 0x00, 0x02])
        data = head + vendor + product + revision
        return data[:alloc]

    def _identity(self) -> tuple[bytes, bytes, bytes]:
        """Vendor/product/revision of the lowest LU (bytes 8-35 are still required)."""
        for lun in self.luns():
            lu = self._luns[lun]
            try:
                return (lu.vendor.encode("ascii")[:8].ljust(8, b" "),
                        lu.product.encode("ascii")[:16].ljust(16, b" "),
                        lu.revision.encode("ascii")[:4].ljust(4, b" "))
            except UnicodeEncodeError:
                break
        return b" " * 8, b" " * 16, b" " * 4

    @staticmethod
    def _missing_request_sense(cdb: bytes) -> bytes:
        """SPC-4 6.39 / SAM-5 5.9: sense data ILLEGAL REQUEST 25/00 with GOOD status."""
        if len(cdb) < 6:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=0)
        if cdb[1] & 0xFE:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=1)
        sense = encode_fixed_sense(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED)
        if cdb[1] & 0x01:
            sense = descriptor_sense(sense)
        return sense[:cdb[4]]
