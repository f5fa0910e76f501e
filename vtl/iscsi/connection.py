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
from collections import deque
from dataclasses import dataclass
from typing import Callable, Union

from vtl.iscsi import pdu as P
from vtl.iscsi.device import DeviceCall, ignore, run_quietly
from vtl.iscsi.errors import LoginStatus, PduError, RejectReason, TextError
from vtl.iscsi.login import LOGIN_MAX_RECV, LoginMachine, SessionParams, SessionType, \
    TargetSettings
from vtl.iscsi.target import IscsiTarget, TargetRegistry
from vtl.iscsi.tasks import MAX_SESSION_DATA, ScsiTasks, Task, decode_lun, encode_lun
from vtl.iscsi.text import decode_text, encode_text, parse_number

log = logging.getLogger("vtl.iscsi")
_SCSI_COMMAND = int(P.Opcode.SCSI_COMMAND)


class State(enum.Enum):
    LOGIN = "login"
    FULL_FEATURE = "full feature"
    CLOSED = "closed"


_CLOSED = State.CLOSED  # (looked up once per received chunk)


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



class IscsiConnection(ScsiTasks):
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
        self._tasks: dict[int, Task] = {}
        self._buffered = 0  # write EDTL of live tasks
        self._queue: deque[Task] = deque()
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
        #: take the streaming path for commands that need no task bookkeeping (see tasks.py);
        #: off, every command goes the general way (the tests compare the two)
        self.stream_commands = True
        self._streaming = False
        self._running: Task | None = None  # the command at a blocking device
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
        if self.state is _CLOSED:
            return self._take_events()
        if n:
            self._last_rx = now
        reader = self._reader
        if self._streaming:
            whole = reader.whole_command(n)  # one command, read whole: no buffering
            if whole is not None:
                bhs, data = whole
                if not self._stream_command(bhs, data):
                    self._dispatch(bhs, b"", data)
                return self._take_events()
        reader.buffer_updated(n)
        return self._parse()

    def _parse(self) -> list[Event]:
        reader = self._reader
        while self.state is not _CLOSED:
            try:
                parts = reader.next_parts()
            except PduError as err:
                self._pdu_error(err)
                continue
            if parts is None:
                break
            bhs, ahs, data = parts
            if self._streaming and not ahs and bhs[0] & 0x3F == _SCSI_COMMAND \
                    and self._stream_command(bhs, data):
                continue
            self._dispatch(bhs, ahs, data)
        return self._take_events()

    def _dispatch(self, bhs: bytes, ahs: bytes, data: bytes | memoryview) -> None:
        """Decode one framed PDU and handle it; protocol errors become Rejects (or a close)."""
        try:
            self._handle(P.from_parts(bhs, ahs, data))
        except PduError as err:
            self._pdu_error(err)
        except TextError as err:
            self._pdu_error(PduError(RejectReason.PROTOCOL_ERROR, str(err), bhs=bhs))

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
        self._streaming = self.stream_commands and self.target is not None and \
            not self._blocking and self.login.session_type is SessionType.NORMAL
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
        affected: list[Task] = []
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

    def _drop_tasks(self, tasks: list[Task]) -> None:
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
        P.ScsiCommandPdu: ScsiTasks._on_scsi_command,  # type: ignore[dict-item]
        P.DataOut: ScsiTasks._on_data_out,  # type: ignore[dict-item]
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
