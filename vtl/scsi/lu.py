"""The LogicalUnit base: the ONE place where device errors become CHECK CONDITION.

A device subclasses :class:`LogicalUnit`, declares its identity, and registers handlers with
``@command(opcode)``. Handlers take a :class:`Request` and return data-in bytes (or a
:class:`ScsiResult` when they need to say more), or raise :class:`SenseError`.

Invariants:
- ``execute`` never raises. A SenseError becomes CHECK CONDITION; any other exception is a bug:
  it is logged and answered HARDWARE ERROR / INTERNAL TARGET FAILURE, and the LU keeps serving.
- Unit attentions are queued per I_T nexus; a new nexus starts with POWER ON, RESET.
- Data-in is truncated to the CDB's allocation length by the handler (``Request.reply``); the
  transport truncates further to its Expected Data Transfer Length.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, ClassVar

from vtl.scsi.command import ScsiCommand, ScsiResult, ScsiStatus
from vtl.scsi.sense import Asc, SenseError, SenseKey, encode_fixed_sense, illegal_request

log = logging.getLogger(__name__)

#: CDB length by operation code group (SAM-5 5.2), for the CONTROL byte check
_CDB_LENGTH = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}
#: index of the CONTROL byte by group (past any CDB for groups without a fixed length)
_CONTROL_BYTE = tuple(_CDB_LENGTH.get(group, 1 << 16) - 1 for group in range(8))

Handler = Callable[["LogicalUnit", "Request"], "bytes | bytearray | memoryview | ScsiResult | None"]

# Commands that a pending UNIT ATTENTION does not block (SPC-4 5.14 / SAM-5 5.14).
UA_EXEMPT = frozenset({0x12, 0xA0, 0x03})  # INQUIRY, REPORT LUNS, REQUEST SENSE


def command(*opcodes: int) -> Callable[[Handler], Handler]:
    """Register a method as the handler of one or more opcodes (dict dispatch, no if-chains)."""

    def mark(fn: Handler) -> Handler:
        fn.__scsi_opcodes__ = opcodes  # type: ignore[attr-defined]
        return fn

    return mark


@dataclass(slots=True)
class Request:
    """What a handler sees: the command plus helpers for the common CDB chores."""

    cmd: ScsiCommand
    cdb: bytes
    nexus: str

    @property
    def opcode(self) -> int:
        return self.cdb[0]

    @property
    def data_out(self) -> bytes | bytearray | memoryview:
        return self.cmd.data_out

    def reply(self, data: bytes | bytearray | memoryview, allocation_length: int) -> bytes | memoryview:
        """Truncate data-in to the CDB's allocation length (SPC-4 4.2.5.6)."""
        if len(data) <= allocation_length:
            return data
        return memoryview(data)[:allocation_length]

    def need_cdb(self, length: int) -> None:
        if len(self.cdb) < length:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=0)

    def check_reserved(self, byte: int, mask: int) -> None:
        """ILLEGAL REQUEST with a field pointer when reserved bits in ``mask`` are set."""
        bad = self.cdb[byte] & mask
        if bad:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=byte, bit=bad.bit_length() - 1)


@dataclass(slots=True)
class UnitAttentionQueue:
    """Pending unit attention conditions for one I_T nexus (oldest first, deduplicated)."""

    pending: deque[tuple[int, int]] = field(default_factory=deque)

    def add(self, asc: tuple[int, int]) -> None:
        if asc not in self.pending:
            self.pending.append(asc)


class LogicalUnit:
    """Base of every device. Subclasses set the class attributes and add handlers.

    Subclasses provide identity (``peripheral_type``, ``vendor``, ``product``, ``revision``,
    ``serial``, ``designator`` bytes for VPD 0x83) and may override ``vpd_pages`` and
    ``inquiry_extra`` (see ``vtl.scsi.inquiry``), ``mode_pages`` (see ``vtl.scsi.modepages``),
    ``ready()`` (raise NOT READY for TEST UNIT READY and media access), and ``reset()``.
    """

    peripheral_type: ClassVar[int] = 0x00
    removable: ClassVar[bool] = False
    _handlers: ClassVar[dict[int, Handler]] = {}

    def __init_subclass__(cls, **kw: object) -> None:
        super().__init_subclass__(**kw)
        table: dict[int, Handler] = {}
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                for op in getattr(attr, "__scsi_opcodes__", ()):
                    table[op] = attr
        cls._handlers = table

    def __init__(self, *, vendor: str, product: str, revision: str, serial: str,
                 device_name: str = "") -> None:
        self.vendor = vendor
        self.product = product
        self.revision = revision
        self.serial = serial
        self.device_name = device_name  # SCSI name string designator (e.g. the target IQN)
        self._ua: dict[str, UnitAttentionQueue] = {}
        self._sense: dict[str, bytes] = {}  # last sense per nexus, for REQUEST SENSE

    # --- unit attentions -------------------------------------------------------------------
    def _queue(self, nexus: str) -> UnitAttentionQueue:
        q = self._ua.get(nexus)
        if q is None:
            q = self._ua[nexus] = UnitAttentionQueue()
            q.add(Asc.POWER_ON_RESET.value)
        return q

    def unit_attention(self, asc: Asc | tuple[int, int], nexus: str | None = None) -> None:
        """Establish a unit attention for one nexus, or for every nexus when ``nexus`` is None."""
        pair = asc.value if isinstance(asc, Asc) else asc
        targets = [nexus] if nexus is not None else list(self._ua)
        for n in targets:
            self._queue(n).add(pair)

    def clear_unit_attention(self, asc: Asc | tuple[int, int], nexus: str) -> None:
        """Drop one pending unit attention for one nexus (e.g. 3F/0E once REPORT LUNS ran)."""
        pair = asc.value if isinstance(asc, Asc) else tuple(asc)
        q = self._ua.get(nexus)
        if q is not None and pair in q.pending:
            q.pending.remove(pair)

    def forget_nexus(self, nexus: str) -> None:
        """Called when a session ends; a later session with the same nexus starts fresh."""
        self._ua.pop(nexus, None)
        self._sense.pop(nexus, None)

    # --- dispatcher ------------------------------------------------------------------------
    def execute(self, cmd: ScsiCommand) -> ScsiResult:
        cdb = cmd.cdb
        if type(cdb) is not bytes:
            cdb = bytes(cdb)
        nexus = cmd.nexus
        if not cdb:
            return self._check(nexus, illegal_request(Asc.INVALID_COMMAND_OPERATION_CODE, byte=0))
        opcode = cdb[0]
        q = self._ua.get(nexus)
        if q is None:
            q = self._queue(nexus)
        if q.pending and opcode not in UA_EXEMPT:
            asc = q.pending.popleft()
            return self._check(nexus, SenseError(SenseKey.UNIT_ATTENTION, asc))
        handler = self._handlers.get(opcode)
        if handler is None:
            return self._check(nexus, illegal_request(Asc.INVALID_COMMAND_OPERATION_CODE, byte=0))
        req = Request(cmd, cdb, nexus)
        try:
            ctl = _CONTROL_BYTE[opcode >> 5]
            if ctl < len(cdb) and cdb[ctl] & 0x05:
                self.check_control_byte(req)
            out = handler(self, req)
        except SenseError as err:
            return self._check(cmd.nexus, err)
        except Exception:  # a bug: log it, answer HARDWARE ERROR, keep serving
            log.exception("%s: unexpected error in opcode 0x%02x", type(self).__name__, opcode)
            return self._check(cmd.nexus, SenseError(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE))
        if isinstance(out, ScsiResult):
            return out
        return ScsiResult(ScsiStatus.GOOD, out if out is not None else b"")

    def check_control_byte(self, req: Request) -> None:
        """NACA and LINK in the CONTROL byte are not supported (SAM-5 5.2): ILLEGAL REQUEST."""
        cdb = req.cdb
        group = cdb[0] >> 5
        length = _CDB_LENGTH.get(group)
        if length is None or len(cdb) < length:
            return
        if cdb[length - 1] & 0x05:
            raise illegal_request(Asc.INVALID_FIELD_IN_CDB, byte=length - 1,
                                  bit=(cdb[length - 1] & 0x05).bit_length() - 1)

    def _check(self, nexus: str, err: SenseError) -> ScsiResult:
        sense = err.encode()
        self._sense[nexus] = sense
        return ScsiResult(ScsiStatus.CHECK_CONDITION, b"", sense)

    def take_sense(self, nexus: str) -> bytes:
        """Sense for REQUEST SENSE: a pending UA first, else NO SENSE (autosense already sent)."""
        q = self._queue(nexus)
        if q.pending:
            asc = q.pending.popleft()
            return encode_fixed_sense(SenseKey.UNIT_ATTENTION, asc)
        return encode_fixed_sense(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL)

    # --- hooks for subclasses --------------------------------------------------------------
    def ready(self) -> None:
        """Raise NOT READY (or similar) when the medium cannot be accessed. Default: ready."""

    def reset(self) -> None:
        """LOGICAL UNIT RESET (SAM-5 7.7): clear device state a reset clears, then UA 29/03."""
        self.unit_attention(Asc.BUS_DEVICE_RESET_FUNCTION_OCCURRED)

    def close(self) -> None:
        """Release files and resources (appliance shutdown, volume deleted)."""
