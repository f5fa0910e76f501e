"""SCSI tasks of one iSCSI connection: commands, immediate and solicited data, status.

The part of :class:`vtl.iscsi.connection.IscsiConnection` that carries SCSI (RFC 7143 11.3,
11.4, 11.7, 11.8), kept in its own module as a mixin over the connection's state. Pure, like the
connection: no sockets, no clocks; the device is called through ``run_command`` (inline) or a
``DeviceCall`` event (blocking targets).

Two paths lead a command to the device, with the same outcome byte for byte:

- the general one: decoded PDU -> :class:`Task` -> CmdSN ordering -> task queue (data may still
  be arriving as Data-Out) -> execute -> :meth:`ScsiTasks._finish`;
- the streaming one (:meth:`ScsiTasks._stream_command`), taken from the raw BHS when nothing is
  pending on the session: the command is next in CmdSN order, no other task is alive, and all
  its data (if any) came as immediate data. Such a command needs no task bookkeeping: it is
  executed at once and, when the device answered GOOD without sense or residual (a WRITE, or a
  READ whose data fits one Data-In), its status is packed directly. Anything else falls back:
  before execution to the general path, after it to ``_finish``. This is what a backup stream
  at queue depth 1 sends (one WRITE(6) after the other), so it is the path whose cost per
  command matters (issue: engine latency); the equivalence is tested by feeding both paths the
  same sequences (tests/iscsi/test_tasks.py).
"""

from __future__ import annotations

import functools
import logging
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from vtl.iscsi import pdu as P
from vtl.iscsi.device import hardware_error, run_command
from vtl.iscsi.errors import PduError, RejectReason
from vtl.iscsi.login import SessionParams
from vtl.iscsi.target import IscsiTarget
from vtl.scsi.command import ScsiCommand, ScsiResult, ScsiStatus
from vtl.scsi.sense import Asc, SenseKey, encode_fixed_sense

log = logging.getLogger("vtl.iscsi")
_unpack_command = P.unpack_scsi_command

MAX_TASK_DATA = 16 * 1024 * 1024  # largest write EDTL we buffer for one command
MAX_SESSION_DATA = 256 * 1024 * 1024  # write data buffered for all queued commands of a session
INVALID_LUN = 0xFFFFFFFF
_SENSE_LEN = struct.Struct(">H")
_ITT_TTT = struct.Struct(">II")
_DATASN_OFFSET = struct.Struct(">II")
_EDTL = struct.Struct(">I")
POOL_MIN = 64 * 1024  # write buffers at least this big are reused
POOL_DEPTH = 4  # per size
POOL_SIZES = 2


def decode_lun(raw: bytes) -> int:
    """LUN from the 8-byte LUN field (SAM-5 4.6.6 peripheral, 4.6.7 flat addressing)."""
    method = raw[0] >> 6
    if method == 0:
        return raw[1] if (raw[0] & 0x3F) == 0 else INVALID_LUN
    if method == 1:
        return ((raw[0] & 0x3F) << 8) | raw[1]
    return INVALID_LUN


def encode_lun(lun: int) -> bytes:
    """The 8-byte LUN field: peripheral addressing below 256, flat space above (SAM-5 4.6)."""
    if lun < 256:
        return bytes([0, lun]) + bytes(6)
    return bytes([0x40 | (lun >> 8) & 0x3F, lun & 0xFF]) + bytes(6)



@dataclass(slots=True)
class Burst:
    """One outstanding R2T (RFC 7143 11.8) and the Data-Out sequence answering it."""

    ttt: int
    offset: int
    end: int
    next: int
    datasn: int = 0


@dataclass(slots=True)
class Task:
    """One SCSI command between its arrival and its status (RFC 7143 3.2.2)."""

    itt: int
    lun: int
    lun_raw: bytes
    cdb: bytes
    cmdsn: int
    edtl: int
    read: bool
    write: bool
    data: bytes | bytearray = b""
    received: int = 0
    unsolicited_end: int = 0
    unsolicited_done: bool = True
    unsol_datasn: int = 0
    next_r2t: int = 0
    r2tsn: int = 0
    bursts: dict[int, Burst] = field(default_factory=dict)
    ordered: bool = False  # delivered in CmdSN order (or immediate)
    verdict: ScsiResult | None = None  # decided by the transport, not the device

    @property
    def data_complete(self) -> bool:
        return not self.write or self.received >= self.edtl



class ScsiTasks:
    """SCSI command handling over the connection's state (mixed into IscsiConnection)."""

    # state owned by IscsiConnection.__init__ (declared here for type checkers)
    params: SessionParams
    target: IscsiTarget | None
    nexus: str
    recycle_buffers: bool
    max_session_data: int
    _reader: P.PduReader
    _expcmdsn: int
    _statsn: int
    _window: int
    _held: dict[int, P.Pdu]
    _tasks: dict[int, "Task"]
    _buffered: int
    _queue: deque["Task"]
    _free: dict[int, list[bytearray]]
    _preplaced: bytearray | None
    _blocking: bool
    _running: "Task | None"
    _streaming: bool
    _out: list[bytes | memoryview]

    if TYPE_CHECKING:  # provided by IscsiConnection
        @property
        def closed(self) -> bool: ...

        @property
        def max_cmdsn(self) -> int: ...

        def _send(self, pdu: P.Pdu, data: bytes | bytearray | memoryview | None = None) -> None: ...

        def _next_statsn(self) -> int: ...

        def _new_ttt(self) -> int: ...

        def _ordered(self, pdu: P.Pdu, deliver: Callable[[P.Pdu], None]) -> None: ...

        def _consume_cmdsn(self, pdu: P.Pdu) -> None: ...

        def _device_call(self, call: Callable[[], object],
                         then: Callable[[object], None]) -> None: ...

    def _stream_command(self, bhs: bytes, data: bytes | memoryview) -> bool:
        """Execute a SCSI Command straight from its BHS when it needs no task bookkeeping (see
        the module docstring); False leaves it, untouched, to the general path. (This runs once
        per block of a backup stream: attribute lookups and calls are kept few on purpose.)"""
        b0, flags, _r, lun_raw, itt, edtl, cmdsn, _expstatsn, cdb = _unpack_command(bhs)
        if b0 & 0x40 or not flags & 0x80 or cmdsn != self._expcmdsn or self._tasks \
                or self._held:
            return False  # immediate, more data coming, out of order, or others pending
        write, read = flags & 0x20, flags & 0x40
        p = self.params
        if write:
            if read or len(data) != edtl or not edtl or not p.immediate_data \
                    or edtl > p.first_burst_length:
                return False
        elif data:
            return False
        buf = self._preplaced
        if buf is not None:  # the reader put the immediate data into a pooled buffer
            self._preplaced = None
            if isinstance(data, memoryview) and data.obj is buf and len(buf) == edtl:
                data = buf
        target = self.target
        assert target is not None
        expcmdsn = self._expcmdsn = (cmdsn + 1) & 0xFFFFFFFF
        lun = lun_raw[1] if not lun_raw[0] else decode_lun(lun_raw)
        result = run_command(target.device, ScsiCommand(lun, cdb, data, edtl if read else 0,
                                                        self.nexus, itt))
        if buf is not None and self.recycle_buffers:
            self._give_back(buf)
        if not result.sense:
            status = result.status
            data_in = result.data_in
            reader = self._reader
            if read:
                n = len(data_in)
                if n == edtl and n and status == 0 \
                        and n <= p.max_send_data_segment_length and n <= p.max_burst_length:
                    statsn = self._statsn
                    self._statsn = (statsn + 1) & 0xFFFFFFFF
                    self._out += P.encode_data_in_status(
                        status, lun_raw, itt, statsn, expcmdsn,
                        (expcmdsn + self._window - 1) & 0xFFFFFFFF, data_in,
                        header_digest=reader.header_digest, data_digest=reader.data_digest)
                    return True
            elif not data_in and (not write or result.data_out_expected is None
                                  or result.data_out_expected == edtl):
                statsn = self._statsn
                self._statsn = (statsn + 1) & 0xFFFFFFFF
                self._out += P.encode_status(status, itt, statsn, expcmdsn,
                                             (expcmdsn + self._window - 1) & 0xFFFFFFFF,
                                             header_digest=reader.header_digest)
                return True
        self._finish(Task(itt=itt, lun=lun, lun_raw=lun_raw, cdb=cdb, cmdsn=cmdsn,
                          edtl=edtl if read or write else 0, read=bool(read),
                          write=bool(write)), result)
        return True

    def _on_scsi_command(self, pdu: P.ScsiCommandPdu) -> None:
        if pdu.itt in self._tasks:
            raise PduError(RejectReason.TASK_IN_PROGRESS, "ITT in use", bhs=pdu.bhs())
        if not pdu.immediate and not (P.sn_le(self._expcmdsn, pdu.cmdsn)
                                      and P.sn_le(pdu.cmdsn, self.max_cmdsn)):
            log.warning("CmdSN %d outside [%d, %d]: ignored", pdu.cmdsn, self._expcmdsn,
                        self.max_cmdsn)
            return
        if not pdu.immediate and pdu.cmdsn in self._held:
            log.warning("duplicate CmdSN %d ignored", pdu.cmdsn)
            return
        p = self.params
        imm = pdu.data
        edtl = pdu.edtl if (pdu.read or pdu.write) else 0
        problem = ""
        if pdu.read and pdu.write:
            problem = "bidirectional commands unsupported"
        elif imm and (not pdu.write or not p.immediate_data or len(imm) > edtl
                      or len(imm) > p.first_burst_length):
            problem = "bad immediate data"
        elif not pdu.final and (not pdu.write or p.initial_r2t):
            problem = "unsolicited Data-Out not allowed"
        cdb = b""
        if not problem:
            try:
                cdb = pdu.full_cdb()
            except PduError as err:
                problem = str(err)
        if problem:
            self._consume_cmdsn(pdu)
            raise PduError(RejectReason.INVALID_PDU_FIELD if pdu.read and pdu.write
                           else RejectReason.PROTOCOL_ERROR, problem, bhs=pdu.bhs())
        task = Task(itt=pdu.itt, lun=decode_lun(pdu.lun), lun_raw=pdu.lun,
                     cdb=cdb, cmdsn=pdu.cmdsn, edtl=edtl, read=pdu.read,
                     write=pdu.write)
        if pdu.write and (edtl > MAX_TASK_DATA or self._buffered + edtl > self.max_session_data):
            # too big to buffer: answered in CmdSN order without soliciting any data; the
            # initiator's unsolicited Data-Out, if any, is discarded as for an ended task
            task.write = False
            task.verdict = ScsiResult(ScsiStatus.TASK_SET_FULL) if edtl <= MAX_TASK_DATA else \
                ScsiResult(ScsiStatus.CHECK_CONDITION, sense=encode_fixed_sense(
                    SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB))
        elif pdu.write and edtl:
            self._buffered += edtl
            pre, self._preplaced = self._preplaced, None
            if pre is not None and isinstance(imm, memoryview) and imm.obj is pre \
                    and len(pre) == edtl:
                task.data = pre  # the reader put the immediate data there already
            elif len(imm) == edtl:
                task.data = imm
            else:
                task.data = self._buffer(edtl)
                task.data[:len(imm)] = imm
            task.received = len(imm)
            task.unsolicited_end = len(imm) if p.initial_r2t else min(p.first_burst_length, edtl)
            task.unsolicited_done = pdu.final
            task.next_r2t = task.received
        self._tasks[pdu.itt] = task
        if task.write and task.unsolicited_done:
            self._issue_r2ts(task)
        self._ordered(pdu, lambda _p: self._order_task(task))

    def _order_task(self, task: Task) -> None:
        if self._tasks.get(task.itt) is not task:
            return  # aborted while held
        task.ordered = True
        if task.verdict is not None:  # refused by the transport: answered at once
            self._finish(task, task.verdict)
            return
        self._queue.append(task)
        self._run_queue()

    def _issue_r2ts(self, task: Task) -> None:
        """Solicit the rest of the data in bursts of <= MaxBurstLength (RFC 7143 11.8)."""
        p = self.params
        while len(task.bursts) < p.max_outstanding_r2t and task.next_r2t < task.edtl:
            offset = task.next_r2t
            length = min(p.max_burst_length, task.edtl - offset)
            ttt = self._new_ttt()
            task.bursts[ttt] = Burst(ttt, offset, offset + length, offset)
            task.next_r2t = offset + length
            self._send(P.R2T(lun=task.lun_raw, itt=task.itt, ttt=ttt, statsn=self._statsn,
                             expcmdsn=self._expcmdsn, maxcmdsn=self.max_cmdsn,
                             r2tsn=task.r2tsn, offset=offset, length=length))
            task.r2tsn += 1

    def _data_out_ok(self, task: Task, ttt: int, datasn: int, offset: int, n: int,
                     final: bool) -> bool:
        """Is this Data-Out exactly the next one expected (RFC 7143 11.7.4, 11.7.5)?"""
        if ttt == P.RESERVED_TAG:
            return not task.unsolicited_done and datasn == task.unsol_datasn and \
                offset == task.received and offset + n <= task.unsolicited_end
        burst = task.bursts.get(ttt)
        return burst is not None and datasn == burst.datasn and offset == burst.next and \
            offset + n <= burst.end and (not final or offset + n == burst.end)

    def _place(self, bhs: bytes) -> memoryview | None:
        """Where a Data-Out's data segment (or a write command's immediate data) goes, so the
        reader copies it only once."""
        if bhs[0] & 0x3F == P.Opcode.SCSI_COMMAND:
            return self._place_immediate(bhs)
        if bhs[0] & 0x3F != P.Opcode.DATA_OUT:
            return None
        itt, ttt = _ITT_TTT.unpack_from(bhs, 16)
        datasn, offset = _DATASN_OFFSET.unpack_from(bhs, 36)
        n = int.from_bytes(bhs[5:8], "big")
        task = self._tasks.get(itt)
        if task is None or not task.write or not isinstance(task.data, bytearray) or \
                not self._data_out_ok(task, ttt, datasn, offset, n, bool(bhs[1] & 0x80)):
            return None
        return memoryview(task.data)[offset:offset + n]

    def _place_immediate(self, bhs: bytes) -> memoryview | None:
        """A whole-task buffer for a write command whose immediate data is arriving; the
        command handler adopts it (see :meth:`_on_scsi_command`). Refused cases fall back to
        the ordinary path, which judges them."""
        flags = bhs[1]
        if not flags & 0x20 or flags & 0x40:  # W, not R
            return None
        (edtl,) = _EDTL.unpack_from(bhs, 20)
        n = int.from_bytes(bhs[5:8], "big")
        if n > edtl or edtl > MAX_TASK_DATA or self._buffered + edtl > self.max_session_data:
            return None
        buf = self._buffer(edtl)
        self._preplaced = buf
        return memoryview(buf)[:n]

    def _buffer(self, size: int) -> bytearray:
        """A write buffer of ``size`` bytes, reused from finished commands when possible
        (no allocation or page faults per block while streaming)."""
        free = self._free.get(size)
        if free:
            return free.pop()
        return bytearray(size)

    def _recycle(self, task: Task) -> None:
        buf = task.data
        if isinstance(buf, bytearray):
            self._give_back(buf)
        task.data = b""

    def _give_back(self, buf: bytearray) -> None:
        """Keep a write buffer the device is done with for the next command of its size."""
        if len(buf) >= POOL_MIN:
            free = self._free.setdefault(len(buf), [])
            if len(free) < POOL_DEPTH:
                free.append(buf)
            if len(self._free) > POOL_SIZES:  # block size changed: forget the old ones
                for size in list(self._free):
                    if size != len(buf):
                        del self._free[size]

    def _on_data_out(self, pdu: P.DataOut) -> None:
        task = self._tasks.get(pdu.itt)
        if task is None or not task.write:
            log.debug("Data-Out for unknown ITT 0x%08x discarded", pdu.itt)
            return
        n = len(pdu.data)
        if not self._data_out_ok(task, pdu.ttt, pdu.datasn, pdu.offset, n, pdu.final):
            self._data_phase_error(task, f"unexpected Data-Out (TTT 0x{pdu.ttt:08x}, "
                                   f"DataSN {pdu.datasn}, offset {pdu.offset}, length {n})")
            return
        self._store(task, pdu)
        if pdu.ttt == P.RESERVED_TAG:
            task.unsol_datasn += 1
            if pdu.final:
                task.unsolicited_done = True
                task.next_r2t = task.received
                self._issue_r2ts(task)
        else:
            burst = task.bursts[pdu.ttt]
            burst.datasn += 1
            burst.next += n
            if pdu.final:
                del task.bursts[pdu.ttt]
                self._issue_r2ts(task)
        if task.data_complete and task.ordered:
            self._run_queue()

    def _data_phase_error(self, task: Task, why: str) -> None:
        """A Data-Out sequence error (DataSN, offset, length) ends the task with CHECK
        CONDITION, ABORTED COMMAND / DATA PHASE ERROR; the session goes on (RFC 7143 7.1.4.1).
        Later Data-Out PDUs for the ended task are discarded."""
        log.warning("task 0x%08x: %s", task.itt, why)
        self._drop_tasks([task])
        self._finish(task, ScsiResult(ScsiStatus.CHECK_CONDITION, sense=encode_fixed_sense(
            SenseKey.ABORTED_COMMAND, Asc.DATA_PHASE_ERROR)))

    @staticmethod
    def _store(task: Task, pdu: P.DataOut) -> None:
        n = len(pdu.data)
        buf = task.data
        assert isinstance(buf, bytearray)
        data = pdu.data
        if not (isinstance(data, memoryview) and data.obj is buf):  # not placed by the reader
            buf[pdu.offset:pdu.offset + n] = data
        if pdu.offset + n > task.received:
            task.received = pdu.offset + n

    def _run_queue(self) -> None:
        """Execute tasks in CmdSN order as their data completes (SAM-5 task set); on a
        blocking target one at a time (the next starts when the running one completed)."""
        q = self._queue
        while q and not self.closed and self._running is None:
            task = q[0]
            if not task.data_complete:
                return
            q.popleft()
            self._execute(task)

    def _execute(self, task: Task) -> None:
        if self.target is None:
            return
        cmd = ScsiCommand(lun=task.lun, cdb=task.cdb, data_out=task.data,
                          expected_in=task.edtl if task.read else 0, nexus=self.nexus,
                          task_tag=task.itt)
        if self._blocking:
            self._running = task
            self._device_call(functools.partial(run_command, self.target.device, cmd),
                              functools.partial(self._executed, task))
            return
        result = run_command(self.target.device, cmd)
        del cmd
        self._finish(task, result)
        if task.write and self.recycle_buffers:  # all its data was consumed: reuse the buffer
            self._recycle(task)

    def _executed(self, task: Task, result: object) -> None:
        """A blocking device returned (see :meth:`complete`): answer unless the task was
        aborted meanwhile or the connection is gone, then start the next task."""
        if self._running is task:
            self._running = None
        if not self.closed and self._tasks.get(task.itt) is task:
            self._finish(task, result if isinstance(result, ScsiResult) else hardware_error())
        if task.write and self.recycle_buffers and not self.closed:
            self._recycle(task)  # the device is done with it, aborted or not
        self._run_queue()

    def _forget(self, task: Task) -> None:
        if self._tasks.get(task.itt) is task:
            del self._tasks[task.itt]
            if task.write:
                self._buffered -= task.edtl

    def _finish(self, task: Task, result: ScsiResult) -> None:
        """Send Data-In and status with residuals (RFC 7143 11.4.5, 11.7; SAM-5 5.1)."""
        self._forget(task)
        overflow = underflow = False
        residual = 0
        data_in = result.data_in
        n_in = len(data_in)
        if not task.write:
            want = task.edtl if task.read else 0
            send = min(n_in, want)
            if n_in > want:
                overflow, residual = True, n_in - want
            elif n_in < want:
                underflow, residual = True, want - n_in
        else:
            send = 0
            expected = result.data_out_expected
            if expected is not None and expected != task.edtl:
                if expected > task.edtl:
                    overflow, residual = True, expected - task.edtl
                else:
                    underflow, residual = True, task.edtl - expected
        status = int(result.status)
        sense = result.sense
        datasn = 0
        if send:
            status_in_data = not sense and status in (ScsiStatus.GOOD, ScsiStatus.CONDITION_MET)
            mv = memoryview(data_in)[:send] if not isinstance(data_in, memoryview) \
                else data_in[:send]
            chunk = self.params.max_send_data_segment_length
            burst = self.params.max_burst_length
            offset = 0
            while offset < send:
                n = min(chunk, send - offset, burst - offset % burst)
                last = offset + n >= send
                end_of_burst = last or (offset + n) % burst == 0
                with_status = last and status_in_data
                self._send(P.DataIn(final=end_of_burst, overflow=with_status and overflow,
                                    underflow=with_status and underflow,
                                    has_status=with_status, status=status if with_status else 0,
                                    lun=task.lun_raw,
                                    itt=task.itt, ttt=P.RESERVED_TAG,
                                    statsn=self._next_statsn() if with_status else 0,
                                    expcmdsn=self._expcmdsn, maxcmdsn=self.max_cmdsn,
                                    datasn=datasn, offset=offset,
                                    residual=residual if with_status else 0),
                           data=mv[offset:offset + n])
                datasn += 1
                offset += n
            if status_in_data:
                return
        data = _SENSE_LEN.pack(len(sense)) + sense if sense else b""
        self._send(P.ScsiResponsePdu(overflow=overflow, underflow=underflow, response=0,
                                     status=status, itt=task.itt, statsn=self._next_statsn(),
                                     expcmdsn=self._expcmdsn, maxcmdsn=self.max_cmdsn,
                                     expdatasn=datasn + task.r2tsn, residual=residual,
                                     data=data))

