"""Sans-I/O state machine of one iSCSI connection (= one session, MaxConnections=1).

Bytes go in with :meth:`IscsiConnection.receive_data`, buffers to write come out of
:meth:`IscsiConnection.data_to_send`; time is passed in and timers are asked for with
:meth:`next_deadline` / :meth:`handle_timer`. The SCSI device behind the target is called
synchronously (``ScsiDevice.execute``); iSCSI never parses a CDB.

A target with ``blocking`` set is never called here: each device call becomes a
:class:`~vtl.iscsi.device.DeviceCall` event, answered with :meth:`IscsiConnection.complete`;
everything else (NOP, Text, TMF, Logout, R2T/Data-Out of queued writes, timers) goes on
meanwhile. Such a connection has one SCSI command at the device at a time, the next ready
task in CmdSN order starting when the previous one completed: SAM-5 allows that for every
task attribute (a SIMPLE task may run later than it could, never out of order), the inline
path keeps the same order, and it bounds what a slow device holds per session.

Invariants (RFC 7143):
- Login first (6.3): until the final Login Response only Login Requests are accepted.
- Non-immediate commands are delivered in CmdSN order within [ExpCmdSN, MaxCmdSN]; commands
  outside the window are silently ignored (4.2.2.1). SCSI tasks execute in CmdSN order.
- StatSN advances by one for every status-bearing PDU (SCSI Response, Data-In with S, NOP-In
  answering a ping, Text/Logout/TMF Response, Reject) (4.2.2.2).
- Data-Out is accepted only at the offsets and DataSNs we expect (unsolicited up to
  FirstBurstLength, then R2T-solicited bursts of at most MaxBurstLength); a violation ends
  that task with CHECK CONDITION (ABORTED COMMAND, DATA PHASE ERROR), nothing else.
- Only :class:`vtl.iscsi.errors.IscsiError` subclasses can escape, and none does on bad input:
  it becomes a Reject, a login failure, or ``closed``.
- Task management on a blocking target (RFC 7143 11.5.1, 4.2.3 Response Fence; SAM-5 7.2): the
  affected tasks are aborted at once, but a command already at the device cannot be stopped, so
  the TMF Response (and any reset it implies) waits until that command returned; the aborted
  command's status is never sent. A result that arrives for an aborted task, or after the
  connection closed, is dropped (its write buffer still goes back to the pool).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import os
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Union

from vtl.iscsi import pdu as P
from vtl.iscsi.device import DeviceCall, hardware_error, ignore, run_command, run_quietly
from vtl.iscsi.errors import LoginStatus, PduError, RejectReason, TextError
from vtl.iscsi.login import LOGIN_MAX_RECV, LoginMachine, SessionParams, SessionType, \
    TargetSettings
from vtl.iscsi.target import IscsiTarget, TargetRegistry
from vtl.iscsi.text import decode_text, encode_text, parse_number
from vtl.scsi.command import ScsiCommand, ScsiResult, ScsiStatus
from vtl.scsi.sense import Asc, SenseKey, encode_fixed_sense

log = logging.getLogger("vtl.iscsi")

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


class State(enum.Enum):
    LOGIN = "login"
    FULL_FEATURE = "full feature"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class LoginCompleted:
    """The login reached full feature phase."""

    initiator_name: str
    target_name: str
    session_type: SessionType
    isid: int
    tsih: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection must be closed once the pending output is written."""

    reason: str


Event = Union[LoginCompleted, ConnectionClosed, DeviceCall]


@dataclass(frozen=True, slots=True)
class SessionState:
    """A logged-in session as it moves between processes (plain data, JSON-able).

    ``params`` are the negotiated :class:`SessionParams` fields; ``statsn``/``expcmdsn`` are
    the next StatSN to send and the next CmdSN expected.
    """

    initiator_name: str
    target_name: str
    isid: int
    tsih: int
    statsn: int
    expcmdsn: int
    params: dict[str, object]
    local_address: tuple[str, int]
    portal_group_tag: int = 1
    cmd_window: int = 64

    def to_json(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, doc: dict[str, object]) -> "SessionState":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(doc, dict) or set(doc) != names:
            raise ValueError("not a session state")
        host, port = doc["local_address"]  # type: ignore[misc]
        return cls(**{**doc, "local_address": (str(host), int(port))})  # type: ignore[arg-type]


@dataclass(slots=True)
class _Burst:
    """One outstanding R2T (RFC 7143 11.8) and the Data-Out sequence answering it."""

    ttt: int
    offset: int
    end: int
    next: int
    datasn: int = 0


@dataclass(slots=True)
class _Task:
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
    bursts: dict[int, _Burst] = field(default_factory=dict)
    ordered: bool = False  # delivered in CmdSN order (or immediate)
    verdict: ScsiResult | None = None  # decided by the transport, not the device

    @property
    def data_complete(self) -> bool:
        return not self.write or self.received >= self.edtl


class IscsiConnection:
    """One TCP connection of an iSCSI target, from Login to Logout (RFC 7143).

    ``local_address`` is the (host, port) the initiator connected to, advertised as
    TargetAddress in SendTargets (RFC 7143 13.8). ``tsih`` is the session handle given on
    success. ``nop_interval``: idle seconds before a target NOP-In ping (None disables);
    ``nop_timeout``: seconds without any bytes after a ping before the connection is dropped.
    """

    def __init__(self, registry: TargetRegistry, *, local_address: tuple[str, int], tsih: int,
                 now: float, portal_group_tag: int = 1,
                 settings: TargetSettings | None = None, nop_interval: float | None = 5.0,
                 nop_timeout: float = 15.0, login_timeout: float = 30.0,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self.registry = registry
        self.local_address = local_address
        self.portal_group_tag = portal_group_tag
        self.state = State.LOGIN
        self.login = LoginMachine(registry, tsih, portal_group_tag,
                                  settings or TargetSettings(), random_bytes)
        self.params: SessionParams = self.login.params
        self.target: IscsiTarget | None = None
        self.nexus = ""
        self._reader = P.PduReader(LOGIN_MAX_RECV)
        self._out: list[bytes | memoryview] = []
        self._events: list[Event] = []
        self._statsn = 0
        self._expcmdsn = 0
        self._window = self.login.settings.cmd_window
        self._held: dict[int, P.Pdu] = {}
        self._tasks: dict[int, _Task] = {}
        self._buffered = 0  # write EDTL of live tasks
        self._queue: deque[_Task] = deque()
        self._next_ttt = 1
        self._text_pending: dict[int, bytes] = {}
        self._text_in = bytearray()
        self._session_ended = False
        self._nop_interval = nop_interval
        self._nop_timeout = nop_timeout
        self._login_deadline = now + login_timeout
        self._last_rx = now
        self._ping_ttt: int | None = None
        self._ping_sent = 0.0
        self.max_session_data = MAX_SESSION_DATA
        #: reuse write buffers once a command executed; only for devices that never keep a
        #: reference to ``data_out`` past ``execute`` (the tape drive writes it out at once)
        self.recycle_buffers = False
        self._free: dict[int, list[bytearray]] = {}
        self._preplaced: bytearray | None = None
        self._blocking = False  # the target's device is called through DeviceCall events
        self._running: _Task | None = None  # the command at a blocking device
        self._calls: dict[int, Callable[[object], None]] = {}  # DeviceCall ref -> continuation
        self._next_ref = 1

    # --- public API ----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def max_cmdsn(self) -> int:
        return (self._expcmdsn + self._window - 1) & 0xFFFFFFFF

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """Feed received bytes; returns events. Output accumulates for :meth:`data_to_send`."""
        if self.closed:
            return self._take_events()
        if data:
            self._last_rx = now
        self._reader.feed(data)
        return self._parse()

    def receive_buffer(self) -> memoryview:
        """Where to read the next bytes from the socket into (then :meth:`receive_into`):
        Data-Out and immediate data land directly in their command's buffer."""
        return self._reader.get_buffer()

    def receive_into(self, n: int, now: float) -> list[Event]:
        """``n`` bytes were read into :meth:`receive_buffer`; like :meth:`receive_data`."""
        if self.closed:
            return self._take_events()
        if n:
            self._last_rx = now
        self._reader.buffer_updated(n)
        return self._parse()

    def _parse(self) -> list[Event]:
        while not self.closed:
            try:
                pdu = self._reader.next_pdu()
            except PduError as err:
                self._pdu_error(err)
                continue
            if pdu is None:
                break
            try:
                self._handle(pdu)
            except PduError as err:
                self._pdu_error(err)
            except TextError as err:
                self._pdu_error(PduError(RejectReason.PROTOCOL_ERROR, str(err), bhs=pdu.bhs()))
        return self._take_events()

    def data_to_send(self) -> list[bytes | memoryview]:
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` wants to be called next (None: no timer)."""
        if self.closed:
            return None
        if self.state is State.LOGIN:
            return self._login_deadline
        if self._nop_interval is None:
            return None
        if self._ping_ttt is not None:
            return max(self._ping_sent, self._last_rx) + self._nop_timeout
        return self._last_rx + self._nop_interval

    def handle_timer(self, now: float) -> list[Event]:
        """Login timeout, NOP-In pings and their timeout (RFC 7143 11.19, 7.12)."""
        if self.closed:
            return self._take_events()
        if self.state is State.LOGIN:
            if now >= self._login_deadline:
                self._close("login timeout")
        elif self._nop_interval is not None:
            if self._ping_ttt is not None:
                if now >= max(self._ping_sent, self._last_rx) + self._nop_timeout:
                    self._close("no answer to NOP-In ping")
            elif now >= self._last_rx + self._nop_interval:
                self._ping_ttt = self._new_ttt()
                self._ping_sent = now
                self._send(P.NopIn(lun=bytes(8), itt=P.RESERVED_TAG, ttt=self._ping_ttt,
                                   statsn=self._statsn, expcmdsn=self._expcmdsn,
                                   maxcmdsn=self.max_cmdsn))
        return self._take_events()

    def connection_lost(self) -> list[Event]:
        """The transport is gone: end the session (the device forgets the I_T nexus). The
        events are the DeviceCall that tells a blocking device so."""
        self.state = State.CLOSED
        self._end_session()
        return self._take_events()

    def complete(self, ref: int, result: object) -> list[Event]:
        """The :class:`DeviceCall` ``ref`` returned ``result`` (None: it never ran). Sends what
        it finishes (status, a deferred TMF Response) and asks for the next call; a result for
        an aborted task or a closed connection is dropped. Unknown refs are ignored."""
        then = self._calls.pop(ref, None)
        if then is not None:
            then(result)
        return self._take_events()

    # --- plumbing ------------------------------------------------------------------------------
    def _take_events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    def _send(self, pdu: P.Pdu, data: bytes | bytearray | memoryview | None = None) -> None:
        self._out.extend(P.encode_pdu(pdu, header_digest=self._reader.header_digest,
                                      data_digest=self._reader.data_digest, data=data))

    def _close(self, reason: str) -> None:
        if self.closed:
            return
        log.info("closing connection: %s", reason)
        self.state = State.CLOSED
        self._events.append(ConnectionClosed(reason))
        self._end_session()

    def _end_session(self) -> None:
        if self._session_ended:
            return
        self._session_ended = True
        self._tasks.clear()
        self._queue.clear()
        if self.target is not None and self.nexus and self._blocking:
            # queued behind a command still at the device, so it is the last call of the nexus
            self._device_call(functools.partial(
                run_quietly, functools.partial(self.target.device.nexus_lost, self.nexus)),
                ignore)
        elif self.target is not None and self.nexus:
            try:
                self.target.device.nexus_lost(self.nexus)
            except Exception:  # a device bug must not take the server down
                log.exception("nexus_lost failed for %s", self.nexus)

    def _next_statsn(self) -> int:
        sn = self._statsn
        self._statsn = (sn + 1) & 0xFFFFFFFF
        return sn

    def _device_call(self, call: Callable[[], object],
                     then: Callable[[object], None]) -> None:
        assert self.target is not None
        ref = self._next_ref
        self._next_ref += 1
        self._calls[ref] = then
        self._events.append(DeviceCall(ref, self.target, call))

    def _new_ttt(self) -> int:
        ttt = self._next_ttt
        self._next_ttt = (ttt + 1) & 0x7FFFFFFF or 1
        return ttt

    def _reject(self, reason: RejectReason, bhs: bytes) -> None:
        self._send(P.Reject(reason=reason, statsn=self._next_statsn(), expcmdsn=self._expcmdsn,
                            maxcmdsn=self.max_cmdsn, data=bhs[:P.BHS_LEN]))

    def _pdu_error(self, err: PduError) -> None:
        log.warning("iSCSI protocol error: %s", err)
        if self.state is State.LOGIN:
            self._close(f"bad PDU during login: {err}")
            return
        self._reject(err.reason, err.bhs or bytes(P.BHS_LEN))
        if err.fatal:
            self._close(str(err))

    # --- dispatch ------------------------------------------------------------------------------
    def _handle(self, pdu: P.Pdu) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rx %s itt=0x%08x cmdsn=%s exp=%d", type(pdu).__name__,
                      getattr(pdu, "itt", 0), getattr(pdu, "cmdsn", "-"), self._expcmdsn)
        if self.state is State.LOGIN:
            self._login(pdu)
            return
        handler = self._HANDLERS.get(type(pdu))
        if handler is None:
            raise PduError(RejectReason.PROTOCOL_ERROR, f"{type(pdu).__name__} not expected",
                           bhs=pdu.bhs())
        if self.login.session_type is SessionType.DISCOVERY and \
                type(pdu) not in (P.TextRequest, P.NopOut, P.LogoutRequest):
            self._consume_cmdsn(pdu)
            raise PduError(RejectReason.PROTOCOL_ERROR, "not allowed in a discovery session",
                           bhs=pdu.bhs())
        handler(self, pdu)

    def _login(self, pdu: P.Pdu) -> None:
        """Login phase (RFC 7143 6.3); anything but a Login Request fails the login."""
        if not isinstance(pdu, P.LoginRequest):
            req = P.LoginRequest(itt=getattr(pdu, "itt", 0))
            self._send(self.login.fail(req, LoginStatus.INVALID_DURING_LOGIN))
            self._close("non-login PDU before login")
            return
        rsp = self.login.receive(pdu)
        self._send(rsp)
        if self.login.failed:
            self._close(f"login failed: status 0x{rsp.status:04x}")
            return
        if not self.login.done:
            return
        self._events.append(self._enter_full_feature())

    def _enter_full_feature(self) -> LoginCompleted:
        """Switch to full feature phase with the login machine's outcome (RFC 7143 6.3)."""
        lm = self.login
        self.state = State.FULL_FEATURE
        self.target = lm.target
        self._blocking = lm.target is not None and lm.target.blocking
        self._statsn, self._expcmdsn = lm.statsn, lm.expcmdsn
        self.params = lm.params
        self.nexus = f"{lm.initiator_name},i,0x{lm.isid:012x}"
        # Digests and our MaxRecvDataSegmentLength apply from the next PDU (RFC 7143 13.1, 13.12)
        self._reader.header_digest = self.params.header_digest
        self._reader.data_digest = self.params.data_digest
        self._reader.max_data = self.params.max_recv_data_segment_length
        if self.login.session_type is SessionType.NORMAL:
            self._reader.placer = self._place
        log.info("login: %s -> %s (%s, digests %s/%s)", lm.initiator_name,
                 lm.target.name if lm.target else "discovery", lm.session_type.value,
                 "CRC32C" if self.params.header_digest else "None",
                 "CRC32C" if self.params.data_digest else "None")
        return LoginCompleted(lm.initiator_name, lm.target.name if lm.target else "",
                              lm.session_type, lm.isid, lm.tsih)

    # --- handover to another process ---------------------------------------------------------
    def detach(self) -> tuple["SessionState", bytes]:
        """Give up a connection that just entered full feature phase, for another process.

        Returns the session state to :meth:`resume` from and the bytes already received but
        not parsed. The connection is then closed here *without* ending the session: the
        device never hears of a lost nexus. Only a Normal session with no task in flight can
        move (right after login, nothing is in flight yet).
        """
        if self.state is not State.FULL_FEATURE or self.target is None or self._tasks \
                or self._held or self._calls or self.login.session_type is not SessionType.NORMAL:
            raise RuntimeError("only an idle Normal session in full feature phase can move")
        lm = self.login
        state = SessionState(
            initiator_name=lm.initiator_name, target_name=self.target.name, isid=lm.isid,
            tsih=lm.tsih, statsn=self._statsn, expcmdsn=self._expcmdsn,
            params=dataclasses.asdict(self.params), local_address=self.local_address,
            portal_group_tag=self.portal_group_tag, cmd_window=self._window)
        pending = self._reader.take_buffered()
        self.state = State.CLOSED
        self._session_ended = True  # the session lives on elsewhere
        return state, pending

    @classmethod
    def resume(cls, registry: TargetRegistry, state: "SessionState", *, now: float,
               nop_interval: float | None = 5.0, nop_timeout: float = 15.0,
               max_session_data: int | None = None,
               recycle_buffers: bool = False) -> "IscsiConnection":
        """A connection in full feature phase, continuing a session another process logged
        in (see :meth:`detach`). Raises KeyError when the registry lacks the target."""
        target = registry.lookup(state.target_name)
        if target is None:
            raise KeyError(state.target_name)
        conn = cls(registry, local_address=state.local_address, tsih=state.tsih, now=now,
                   portal_group_tag=state.portal_group_tag,
                   settings=TargetSettings(cmd_window=state.cmd_window),
                   nop_interval=nop_interval, nop_timeout=nop_timeout)
        if max_session_data is not None:
            conn.max_session_data = max_session_data
        conn.recycle_buffers = recycle_buffers
        lm = conn.login
        lm.done = True
        lm.target = target
        lm.session_type = SessionType.NORMAL
        lm.initiator_name = state.initiator_name
        lm.isid = state.isid
        lm.statsn, lm.expcmdsn = state.statsn, state.expcmdsn
        lm.params = SessionParams(**state.params)
        conn._enter_full_feature()
        return conn

    def _ordered(self, pdu: P.Pdu, deliver: Callable[[P.Pdu], None]) -> None:
        """Deliver in CmdSN order (RFC 7143 4.2.2.1); immediate PDUs go at once."""
        cmdsn: int = pdu.cmdsn  # type: ignore[union-attr]
        if getattr(pdu, "immediate", False):
            deliver(pdu)
            return
        if not (P.sn_le(self._expcmdsn, cmdsn) and P.sn_le(cmdsn, self.max_cmdsn)):
            log.warning("CmdSN %d outside [%d, %d]: ignored", cmdsn, self._expcmdsn,
                        self.max_cmdsn)
            return
        if cmdsn != self._expcmdsn:
            if cmdsn in self._held:
                log.warning("duplicate CmdSN %d ignored", cmdsn)
            else:
                self._held[cmdsn] = pdu
            return
        # ExpCmdSN counts the command as received before its answer is built (RFC 7143 4.2.2.1)
        self._expcmdsn = (self._expcmdsn + 1) & 0xFFFFFFFF
        deliver(pdu)
        while self._expcmdsn in self._held and not self.closed:
            held = self._held.pop(self._expcmdsn)
            self._expcmdsn = (self._expcmdsn + 1) & 0xFFFFFFFF
            self._deliver_held(held)

    def _consume_cmdsn(self, pdu: P.Pdu) -> None:
        """A rejected command still uses up its CmdSN, so later commands are not stalled."""
        if not getattr(pdu, "immediate", True) and hasattr(pdu, "cmdsn"):
            self._ordered(P.NopOut(immediate=False, cmdsn=pdu.cmdsn), lambda _p: None)

    def _deliver_held(self, pdu: P.Pdu) -> None:
        if isinstance(pdu, P.ScsiCommandPdu):
            task = self._tasks.get(pdu.itt)
            if task is not None:
                self._order_task(task)
        else:
            self._ORDERED_DELIVER[type(pdu)](self, pdu)

    # --- SCSI commands (RFC 7143 11.3, 11.4, 11.7, 11.8) ----------------------------------------
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
        task = _Task(itt=pdu.itt, lun=decode_lun(pdu.lun), lun_raw=pdu.lun,
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

    def _order_task(self, task: _Task) -> None:
        if self._tasks.get(task.itt) is not task:
            return  # aborted while held
        task.ordered = True
        if task.verdict is not None:  # refused by the transport: answered at once
            self._finish(task, task.verdict)
            return
        self._queue.append(task)
        self._run_queue()

    def _issue_r2ts(self, task: _Task) -> None:
        """Solicit the rest of the data in bursts of <= MaxBurstLength (RFC 7143 11.8)."""
        p = self.params
        while len(task.bursts) < p.max_outstanding_r2t and task.next_r2t < task.edtl:
            offset = task.next_r2t
            length = min(p.max_burst_length, task.edtl - offset)
            ttt = self._new_ttt()
            task.bursts[ttt] = _Burst(ttt, offset, offset + length, offset)
            task.next_r2t = offset + length
            self._send(P.R2T(lun=task.lun_raw, itt=task.itt, ttt=ttt, statsn=self._statsn,
                             expcmdsn=self._expcmdsn, maxcmdsn=self.max_cmdsn,
                             r2tsn=task.r2tsn, offset=offset, length=length))
            task.r2tsn += 1

    def _data_out_ok(self, task: _Task, ttt: int, datasn: int, offset: int, n: int,
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

    def _recycle(self, task: _Task) -> None:
        buf = task.data
        if isinstance(buf, bytearray) and len(buf) >= POOL_MIN:
            free = self._free.setdefault(len(buf), [])
            if len(free) < POOL_DEPTH:
                free.append(buf)
            if len(self._free) > POOL_SIZES:  # block size changed: forget the old ones
                for size in list(self._free):
                    if size != len(buf):
                        del self._free[size]
        task.data = b""

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

    def _data_phase_error(self, task: _Task, why: str) -> None:
        """A Data-Out sequence error (DataSN, offset, length) ends the task with CHECK
        CONDITION, ABORTED COMMAND / DATA PHASE ERROR; the session goes on (RFC 7143 7.1.4.1).
        Later Data-Out PDUs for the ended task are discarded."""
        log.warning("task 0x%08x: %s", task.itt, why)
        self._drop_tasks([task])
        self._finish(task, ScsiResult(ScsiStatus.CHECK_CONDITION, sense=encode_fixed_sense(
            SenseKey.ABORTED_COMMAND, Asc.DATA_PHASE_ERROR)))

    @staticmethod
    def _store(task: _Task, pdu: P.DataOut) -> None:
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

    def _execute(self, task: _Task) -> None:
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

    def _executed(self, task: _Task, result: object) -> None:
        """A blocking device returned (see :meth:`complete`): answer unless the task was
        aborted meanwhile or the connection is gone, then start the next task."""
        if self._running is task:
            self._running = None
        if not self.closed and self._tasks.get(task.itt) is task:
            self._finish(task, result if isinstance(result, ScsiResult) else hardware_error())
        if task.write and self.recycle_buffers and not self.closed:
            self._recycle(task)  # the device is done with it, aborted or not
        self._run_queue()

    def _forget(self, task: _Task) -> None:
        if self._tasks.get(task.itt) is task:
            del self._tasks[task.itt]
            if task.write:
                self._buffered -= task.edtl

    def _finish(self, task: _Task, result: ScsiResult) -> None:
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

    # --- NOP (RFC 7143 11.18, 11.19) -----------------------------------------------------------
    def _on_nop_out(self, pdu: P.NopOut) -> None:
        if pdu.ttt != P.RESERVED_TAG:
            if pdu.ttt == self._ping_ttt:
                self._ping_ttt = None
            return  # an answer to our ping: no response, no CmdSN (RFC 7143 11.18.3)
        self._ordered(pdu, self._nop_deliver)  # type: ignore[arg-type]

    def _nop_deliver(self, pdu: P.NopOut) -> None:
        if pdu.itt == P.RESERVED_TAG:
            return
        self._send(P.NopIn(lun=pdu.lun, itt=pdu.itt, ttt=P.RESERVED_TAG,
                           statsn=self._next_statsn(), expcmdsn=self._expcmdsn,
                           maxcmdsn=self.max_cmdsn,
                           data=pdu.data[:self.params.max_send_data_segment_length]))

    # --- Text / SendTargets (RFC 7143 11.10, 11.11, Appendix C) -------------------------------
    def _on_text(self, pdu: P.TextRequest) -> None:
        self._ordered(pdu, self._text_deliver)  # type: ignore[arg-type]

    def _text_deliver(self, pdu: P.TextRequest) -> None:
        if pdu.ttt != P.RESERVED_TAG:
            rest = self._text_pending.pop(pdu.ttt, None)
            if rest is None:
                raise PduError(RejectReason.INVALID_PDU_FIELD, "unknown Text TTT", bhs=pdu.bhs())
            self._send_text(pdu, rest)
            return
        if len(self._text_in) + len(pdu.data) > 65536:
            self._text_in.clear()
            raise PduError(RejectReason.PROTOCOL_ERROR, "text too long", bhs=pdu.bhs())
        self._text_in += pdu.data
        if pdu.cont:
            self._send(P.TextResponse(final=False, cont=False, lun=pdu.lun, itt=pdu.itt,
                                      ttt=self._new_ttt(), statsn=self._next_statsn(),
                                      expcmdsn=self._expcmdsn, maxcmdsn=self.max_cmdsn))
            return
        pairs = decode_text(bytes(self._text_in))
        self._text_in.clear()
        answers: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "SendTargets":
                answers.extend(self._send_targets(value))
            elif key == "MaxRecvDataSegmentLength":  # declarative, may change (RFC 7143 13.12)
                self.params.max_send_data_segment_length = parse_number(value, 512, 16777215)
            else:
                answers.append((key, "NotUnderstood"))
        self._send_text(pdu, encode_text(answers))

    def _send_text(self, pdu: P.TextRequest, text: bytes) -> None:
        limit = self.params.max_send_data_segment_length
        chunk, rest = text[:limit], text[limit:]
        ttt = P.RESERVED_TAG
        if rest:
            ttt = self._new_ttt()
            self._text_pending = {ttt: rest}
        self._send(P.TextResponse(final=not rest, cont=bool(rest), lun=pdu.lun, itt=pdu.itt,
                                  ttt=ttt, statsn=self._next_statsn(), expcmdsn=self._expcmdsn,
                                  maxcmdsn=self.max_cmdsn, data=chunk))

    def _send_targets(self, value: str) -> list[tuple[str, str]]:
        host, port = self.local_address[0], self.local_address[1]
        addr = f"[{host}]" if ":" in host else host
        address = f"{addr}:{port},{self.portal_group_tag}"
        name = self.login.initiator_name
        if value == "All" and self.login.session_type is SessionType.DISCOVERY:
            targets = list(self.registry.targets())
        elif value in ("", "All"):
            targets = [self.target] if self.target is not None else []
        else:
            t = self.registry.lookup(value)
            targets = [t] if t is not None else []
        out: list[tuple[str, str]] = []
        for t in targets:
            if t.auth.allows(name):
                out += [("TargetName", t.name), ("TargetAddress", address)]
        return out

    # --- Task management (RFC 7143 11.5, 11.6) -------------------------------------------------
    def _on_tmf(self, pdu: P.TaskMgmtRequest) -> None:
        self._ordered(pdu, self._tmf_deliver)  # type: ignore[arg-type]

    def _tmf_deliver(self, pdu: P.TaskMgmtRequest) -> None:
        fn = pdu.function
        resp = P.TmfResponse.FUNCTION_COMPLETE
        lun = decode_lun(pdu.lun)
        device = self.target.device if self.target is not None else None
        cold = False
        affected: list[_Task] = []
        action: Callable[[], None] | None = None  # the reset the device must do
        if fn == P.TmfFunction.ABORT_TASK:
            task = self._tasks.get(pdu.rtt)
            if task is not None:
                affected = [task]
            elif not (P.sn_le(self._expcmdsn, pdu.refcmdsn) and P.sn_lt(pdu.refcmdsn, pdu.cmdsn)):
                # RFC 7143 11.5.1: only a command not received yet (a CmdSN gap before this
                # request) counts as aborted; a finished task "does not exist".
                resp = P.TmfResponse.TASK_DOES_NOT_EXIST
            else:
                held = self._held.get(pdu.refcmdsn)
                if isinstance(held, P.ScsiCommandPdu) and held.itt in self._tasks:
                    self._forget(self._tasks[held.itt])
                # the aborted CmdSN counts as received: a placeholder that answers nothing
                self._held[pdu.refcmdsn] = P.NopOut(immediate=False, cmdsn=pdu.refcmdsn)
        elif fn in (P.TmfFunction.ABORT_TASK_SET, P.TmfFunction.CLEAR_TASK_SET,
                    P.TmfFunction.LOGICAL_UNIT_RESET):
            if device is None or not device.has_lun(lun):
                resp = P.TmfResponse.LUN_DOES_NOT_EXIST
            else:
                affected = [t for t in self._tasks.values() if t.lun == lun]
                if fn == P.TmfFunction.LOGICAL_UNIT_RESET:
                    action = functools.partial(device.reset_lun, lun)
        elif fn in (P.TmfFunction.TARGET_WARM_RESET, P.TmfFunction.TARGET_COLD_RESET):
            affected = list(self._tasks.values())
            cold = fn == P.TmfFunction.TARGET_COLD_RESET
            if device is not None:
                action = functools.partial(device.reset_target, cold)
        else:
            resp = P.TmfResponse.NOT_SUPPORTED
        self._drop_tasks(affected)
        if self._blocking and (action is not None or any(t is self._running for t in affected)):
            # the Response Fence: answered once the device finished the aborted command
            self._device_call(functools.partial(run_quietly, action),
                              lambda _r: self._tmf_respond(pdu, resp, cold))
            return
        if action is not None:
            action()
        self._tmf_respond(pdu, resp, cold)

    def _tmf_respond(self, pdu: P.TaskMgmtRequest, resp: int, cold: bool) -> None:
        if self.closed:
            return
        self._send(P.TaskMgmtResponse(response=resp, itt=pdu.itt, statsn=self._next_statsn(),
                                      expcmdsn=self._expcmdsn, maxcmdsn=self.max_cmdsn))
        if cold:  # RFC 7143 11.5.1: a cold reset drops the connection after the response
            self._close("target cold reset")

    def _drop_tasks(self, tasks: list[_Task]) -> None:
        for task in tasks:
            self._forget(task)
            try:
                self._queue.remove(task)
            except ValueError:
                pass

    # --- Logout (RFC 7143 11.14, 11.15) --------------------------------------------------------
    def _on_logout(self, pdu: P.LogoutRequest) -> None:
        self._ordered(pdu, self._logout_deliver)  # type: ignore[arg-type]

    def _logout_deliver(self, pdu: P.LogoutRequest) -> None:
        if pdu.reason == P.LogoutReason.REMOVE_FOR_RECOVERY:
            response = 2  # connection recovery is not supported
        elif pdu.reason in (P.LogoutReason.CLOSE_SESSION, P.LogoutReason.CLOSE_CONNECTION):
            response = 0
        else:
            raise PduError(RejectReason.INVALID_PDU_FIELD, "logout reason", bhs=pdu.bhs())
        self._send(P.LogoutResponse(response=response, itt=pdu.itt, statsn=self._next_statsn(),
                                    expcmdsn=self._expcmdsn, maxcmdsn=self.max_cmdsn,
                                    time2wait=self.params.default_time2wait,
                                    time2retain=self.params.default_time2retain))
        if response == 0:
            self._close("logout")

    def _on_snack(self, pdu: P.SnackRequest) -> None:
        raise PduError(RejectReason.SNACK_REJECT, "SNACK at ErrorRecoveryLevel 0", bhs=pdu.bhs())

    _HANDLERS: dict[type, Callable[["IscsiConnection", P.Pdu], None]] = {
        P.ScsiCommandPdu: _on_scsi_command,  # type: ignore[dict-item]
        P.DataOut: _on_data_out,  # type: ignore[dict-item]
        P.NopOut: _on_nop_out,  # type: ignore[dict-item]
        P.TextRequest: _on_text,  # type: ignore[dict-item]
        P.TaskMgmtRequest: _on_tmf,  # type: ignore[dict-item]
        P.LogoutRequest: _on_logout,  # type: ignore[dict-item]
        P.SnackRequest: _on_snack,  # type: ignore[dict-item]
    }
    _ORDERED_DELIVER: dict[type, Callable[["IscsiConnection", P.Pdu], None]] = {
        P.NopOut: _nop_deliver,  # type: ignore[dict-item]
        P.TextRequest: _text_deliver,  # type: ignore[dict-item]
        P.TaskMgmtRequest: _tmf_deliver,  # type: ignore[dict-item]
        P.LogoutRequest: _logout_deliver,  # type: ignore[dict-item]
    }


__all__ = ["IscsiConnection", "LoginCompleted", "ConnectionClosed", "DeviceCall", "Event", "State",
           "SessionState", "decode_lun", "encode_lun"]
