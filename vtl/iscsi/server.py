"""The asyncio edge of the iSCSI target: a listener and one protocol object per connection.

All protocol logic lives in :class:`vtl.iscsi.connection.IscsiConnection` (sans-I/O); this
module only moves bytes, keeps the timers the state machine asks for, and applies back-pressure:
reading pauses while the transport's write buffer is above its high-water mark, so a slow
initiator cannot make us buffer a whole tape. Device ``execute()`` is synchronous and runs in
the event loop, except for targets with ``blocking`` set: their device calls (``DeviceCall``
events) run on a bounded thread pool the server owns, one call at a time per device in the
order asked (a "strand"), and each result goes back to its connection on the loop thread
(``call_soon_threadsafe`` -> ``IscsiConnection.complete``). A result for a connection that has
gone is dropped there. Without such targets no thread is ever started. (The drive workers do not
use this server: they serve their adopted connections with :mod:`vtl.iscsi.threads`.)
The owner of a blocking device queues its own work on the same strand with
:meth:`IscsiServer.call_device` (closing the device must not race a command being executed).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import socket
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Protocol, TypeVar

from vtl.iscsi.connection import DeviceCall, Event, IscsiConnection, \
    LoginCompleted, SessionState
from vtl.iscsi.login import SessionType, TargetSettings
from vtl.iscsi.target import TargetRegistry

log = logging.getLogger("vtl.iscsi")

WRITE_HIGH_WATER = 8 * 1024 * 1024
WRITE_LOW_WATER = 2 * 1024 * 1024
_IOV_MAX = 512  # buffers per writev (Linux allows 1024)
BLOCKING_WORKERS = 16  # threads for blocking targets' device calls (one per device at a time)
STOP_GRACE = 60.0  # seconds stop() waits for device calls still running
T = TypeVar("T")
_Done = Callable[["Future[Any] | None"], None]  # gets the finished call (None: never ran)


class Handoff(Protocol):
    """Where Normal sessions of some targets go after login (the process-pool engine).

    ``wants(target_name)`` is asked when a login completes; if true, the connection is detached
    and ``take(fd, state, to_send, received)`` gets a duplicate of the socket's descriptor
    (the callee owns and closes it), the session state, the final Login Response not yet sent
    and any bytes received after it. ``take`` must not raise.
    """

    def wants(self, target_name: str) -> bool: ...

    def take(self, fd: int, state: SessionState, to_send: bytes, received: bytes) -> None: ...


class _IscsiProtocol(asyncio.BufferedProtocol):
    """Glue between one socket and one :class:`IscsiConnection`.

    A BufferedProtocol: the event loop reads with ``recv_into`` straight into the buffer the
    connection names (the data buffer of the command being received, for payload), so a block
    is copied once, by the kernel, on its way in.
    """

    def __init__(self, server: "IscsiServer", resumed: IscsiConnection | None = None,
                 to_send: bytes = b"", received: bytes = b"") -> None:
        self.server = server
        self._resumed = resumed
        self._initial = (to_send, received)
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.conn: IscsiConnection | None = None
        self.peer = ""
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._closing = False
        self._fd = -1
        self.session_key: tuple[str, int, str] | None = None

    # --- asyncio callbacks -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._fd = sock.fileno() if sock is not None else -1
        local = transport.get_extra_info("sockname") or (self.server.host, self.server.port)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        s = self.server
        if self._resumed is not None:
            self._adopted(transport)
            return
        self.conn = IscsiConnection(s.registry, local_address=(local[0], local[1]),
                                    tsih=s._next_tsih(), now=self.loop.time(),
                                    portal_group_tag=s.portal_group_tag, settings=s.settings,
                                    nop_interval=s.nop_interval, nop_timeout=s.nop_timeout,
                                    login_timeout=s.login_timeout)
        s._protocols.add(self)
        log.debug("connection from %s", self.peer)
        self._arm_timer()

    def _adopted(self, transport: asyncio.Transport) -> None:
        """A connection logged in by another process continues here (see Handoff)."""
        conn = self.conn = self._resumed
        assert conn is not None and conn.target is not None
        self._resumed = None
        to_send, received = self._initial
        self._initial = (b"", b"")
        self.server._protocols.add(self)
        lm = conn.login
        self.server._login_completed(self, LoginCompleted(
            lm.initiator_name, conn.target.name, lm.session_type, lm.isid, lm.tsih))
        if to_send:
            transport.write(to_send)
        log.debug("adopted connection from %s", self.peer)
        if received:
            self.data_received(received)
        else:
            self._arm_timer()

    def get_buffer(self, sizehint: int) -> memoryview:
        conn = self.conn
        if conn is None or self._closing or conn.closed:
            return memoryview(self.server._discard)
        return conn.receive_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self.conn is not None:
            self._feed(self.conn.receive_into, nbytes)

    def data_received(self, data: bytes) -> None:
        """Bytes that arrived outside the receive buffer (e.g. before a resumed session)."""
        if self.conn is not None:
            self._feed(self.conn.receive_data, data)

    def _feed(self, receive: Any, arg: Any) -> None:
        if self._closing:
            return
        try:
            events = receive(arg, self.loop.time())
        except Exception:  # a bug in our state machine must not affect other sessions
            log.exception("iSCSI connection %s failed", self.peer)
            self._abort()
            return
        self._after(events)

    def pause_writing(self) -> None:
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self._paused:
            self._paused = False
            if not self._closing:
                self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fd = -1
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.conn is not None:
            try:
                self._device_calls(self.conn.connection_lost())
            except Exception:
                log.exception("cleanup of %s failed", self.peer)
        self.server._protocols.discard(self)
        if self.session_key is not None and self.server._sessions.get(self.session_key) is self:
            del self.server._sessions[self.session_key]
        log.debug("connection from %s closed", self.peer)

    # --- helpers -----------------------------------------------------------------------------
    def _device_calls(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, DeviceCall):
                self.server._device_call(self, ev)

    def _call_done(self, ref: int, fut: Future[Any] | None) -> None:
        """A DeviceCall of this connection returned (on the loop thread)."""
        conn = self.conn
        if conn is None:
            return
        result = None
        if fut is not None and not fut.cancelled():
            if fut.exception() is not None:  # DeviceCall.call never raises; be safe anyway
                log.error("device call failed", exc_info=fut.exception())
            else:
                result = fut.result()
        try:
            events = conn.complete(ref, result)
        except Exception:
            log.exception("iSCSI connection %s failed", self.peer)
            self._abort()
            return
        self._after(events)

    def _after(self, events: list[Event]) -> None:
        conn, transport = self.conn, self.transport
        assert conn is not None and transport is not None
        out = conn.data_to_send()
        if self._closing or transport.is_closing():  # a late device result: nothing goes out
            self._device_calls(events)
            return
        handoff = self.server.handoff
        if handoff is not None and not conn.closed:
            for ev in events:
                if isinstance(ev, LoginCompleted) and ev.session_type is SessionType.NORMAL \
                        and handoff.wants(ev.target_name) and self._hand_off(handoff, out):
                    return
        if out:
            self._write(out)
        for ev in events:
            if isinstance(ev, LoginCompleted):
                self.server._login_completed(self, ev)
            elif isinstance(ev, DeviceCall):
                self.server._device_call(self, ev)
        if conn.closed:
            self._closing = True
            transport.close()  # flushes buffered output first
            return
        self._arm_timer()

    def _write(self, out: list[bytes | memoryview]) -> None:
        """Send PDUs with one writev straight from their buffers (a READ's data is not joined
        into a new bytes object first); only what the socket does not take is handed to the
        transport, which then keeps the order. Safe because the transport writes only while
        its own buffer is non-empty, and we go direct only when it is empty."""
        transport = self.transport
        assert transport is not None
        fd = self._fd
        if fd < 0 or transport.is_closing() or transport.get_write_buffer_size() \
                or len(out) > _IOV_MAX:
            transport.writelines(out)
            return
        try:
            sent = os.writev(fd, out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # let the transport meet the error and report it its way
            transport.writelines(out)
            return
        for i, buf in enumerate(out):
            n = len(buf)
            if sent < n:
                rest = [memoryview(buf)[sent:], *out[i + 1:]]
                transport.write(b"".join(rest))
                return
            sent -= n

    def _hand_off(self, handoff: Handoff, out: list[bytes | memoryview]) -> bool:
        """Detach the socket and give it, with the session, to ``handoff``."""
        transport, conn = self.transport, self.conn
        assert transport is not None and conn is not None
        sock = transport.get_extra_info("socket")
        if sock is None or transport.get_write_buffer_size():
            return False  # (login responses are always sent by now: the initiator waits)
        state, received = conn.detach()
        fd = os.dup(sock.fileno())
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport.pause_reading()
        transport.abort()  # closes our descriptor only: the duplicate keeps the TCP connection
        log.debug("handing %s (%s) over", self.peer, state.target_name)
        handoff.take(fd, state, b"".join(out), received)
        return True

    def _arm_timer(self) -> None:
        """Keep one timer no later than the connection's next deadline. Deadlines mostly move
        later (every received byte postpones the NOP ping), so an early timer is kept: it
        fires, finds nothing due, and re-arms. That avoids a cancel+schedule per read."""
        conn = self.conn
        deadline = conn.next_deadline() if conn is not None else None
        if self._timer is not None:
            if deadline is not None and self._timer.when() <= deadline:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.conn is None or self._closing:
            return
        try:
            events = self.conn.handle_timer(self.loop.time())
        except Exception:
            log.exception("iSCSI timer of %s failed", self.peer)
            self._abort()
            return
        self._after(events)

    def _abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()


class _Strand:
    """The device calls of one device: at most one on the pool, the rest waiting in order."""

    __slots__ = ("device", "jobs", "busy")

    def __init__(self, device: object) -> None:
        self.device = device  # keeps id(device), the strand's key, from being reused
        self.jobs: deque[tuple[Callable[[], Any], _Done]] = deque()
        self.busy = False


class IscsiServer:
    """An iSCSI portal serving every target in ``registry`` (RFC 7143).

    ``port`` may be 0; the bound port is then available as :attr:`port` after :meth:`start`.
    ``nop_interval`` is the idle time before a NOP-In ping (None disables pings).
    ``blocking_workers`` bounds the threads that run blocking targets' device calls.
    """

    def __init__(self, registry: TargetRegistry, host: str = "127.0.0.1", port: int = 3260, *,
                 nop_interval: float | None = 5.0, nop_timeout: float = 15.0,
                 login_timeout: float = 30.0, portal_group_tag: int = 1,
                 settings: TargetSettings | None = None, handoff: Handoff | None = None,
                 max_session_data: int | None = None, recycle_buffers: bool = False,
                 blocking_workers: int = BLOCKING_WORKERS) -> None:
        self.registry = registry
        self.blocking_workers = blocking_workers
        self._pool: ThreadPoolExecutor | None = None  # started at the first blocking call
        self._strands: dict[int, _Strand] = {}
        self._drained: asyncio.Future[None] | None = None
        self._stopped = False
        self.recycle_buffers = recycle_buffers
        self._discard = bytearray(65536)
        self.handoff = handoff
        self.max_session_data = max_session_data
        self.host = host
        self._port = port
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        self.login_timeout = login_timeout
        self.portal_group_tag = portal_group_tag
        self.settings = settings or TargetSettings()
        self._server: asyncio.base_events.Server | None = None
        self._protocols: set[_IscsiProtocol] = set()
        self._tsih = itertools.count(1)
        self._sessions: dict[tuple[str, int, str], _IscsiProtocol] = {}

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopped = False
        self._server = await loop.create_server(lambda: _IscsiProtocol(self), self.host,
                                                self._port, reuse_address=True)
        sock = self._server.sockets[0]
        self._port = sock.getsockname()[1]
        log.info("iSCSI portal listening on %s:%d", self.host, self._port)

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def stop(self) -> None:
        """Close the listener and every connection."""
        if self._server is not None:
            self._server.close()
        for proto in list(self._protocols):
            proto.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        # let connection_lost callbacks run
        for _ in range(3):
            if not self._protocols:
                break
            await asyncio.sleep(0)
        await self._stop_pool()

    async def _stop_pool(self) -> None:
        """Wait for the device calls under way (a blocking device bounds its own waits) so no
        device is closed under a worker thread, then end the pool. Calls asked later are
        answered None without running."""
        self._stopped = True
        if self._strands:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), STOP_GRACE)
            except TimeoutError:
                log.warning("device calls still running after %.0f s: not waiting for them",
                            STOP_GRACE)
            self._drained = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def call_device(self, device: object, call: Callable[[], T]) -> T:
        """Run ``call()`` on the pool in ``device``'s strand: after the calls already asked
        for that device (a command a blocking LU is still executing), before those asked
        later. For the owner of a blocking target that must not race its commands (close the
        device, read it for a snapshot). Raises what ``call`` raised, or RuntimeError when the
        server has stopped."""
        waiter: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        def done(fut: Future[T] | None) -> None:
            if waiter.done():
                return
            if fut is None or fut.cancelled():
                waiter.set_exception(RuntimeError("the iSCSI server has stopped"))
            elif fut.exception() is not None:
                waiter.set_exception(fut.exception())  # type: ignore[arg-type]
            else:
                waiter.set_result(fut.result())

        self._enqueue(device, call, done)
        return await waiter

    # --- blocking targets ----------------------------------------------------------------------
    def _device_call(self, proto: _IscsiProtocol, ev: DeviceCall) -> None:
        """Queue a connection's DeviceCall on its device's strand (loop thread)."""
        self._enqueue(ev.target.device, ev.call, functools.partial(proto._call_done, ev.ref))

    def _enqueue(self, device: object, call: Callable[[], Any], done: _Done) -> None:
        key = id(device)
        strand = self._strands.get(key)
        if strand is None:
            strand = self._strands[key] = _Strand(device)
        strand.jobs.append((call, done))
        self._start_next(key, strand)

    def _start_next(self, key: int, strand: _Strand) -> None:
        if strand.busy:
            return
        loop = asyncio.get_running_loop()
        while strand.jobs:
            call, done = strand.jobs.popleft()
            if self._stopped and self._drained is None:
                loop.call_soon(done, None)  # asked after stop(): never runs
                continue
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.blocking_workers,
                                                thread_name_prefix="vtl-iscsi-device")
            fut = self._pool.submit(call)
            strand.busy = True
            fut.add_done_callback(functools.partial(self._post, loop, key, strand, done))
            return
        if self._strands.get(key) is strand:
            del self._strands[key]
        if not self._strands and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _post(self, loop: asyncio.AbstractEventLoop, key: int, strand: _Strand, done: _Done,
              fut: Future[Any]) -> None:
        """Done callback, on the worker thread: back to the loop."""
        try:
            loop.call_soon_threadsafe(self._finished, key, strand, done, fut)
        except RuntimeError:  # the loop is closed: nobody is left to answer
            pass

    def _finished(self, key: int, strand: _Strand, done: _Done, fut: Future[Any]) -> None:
        strand.busy = False
        try:
            done(fut)
        finally:
            self._start_next(key, strand)

    async def adopt(self, fd: int, state: SessionState, to_send: bytes = b"",
                    received: bytes = b"") -> None:
        """Serve a connection another process logged in (the socket ``fd`` is ours now)."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(fileno=fd)
        try:
            sock.setblocking(False)
            conn = IscsiConnection.resume(self.registry, state, now=loop.time(),
                                          nop_interval=self.nop_interval,
                                          nop_timeout=self.nop_timeout,
                                          max_session_data=self.max_session_data,
                                          recycle_buffers=self.recycle_buffers)
            await loop.connect_accepted_socket(
                lambda: _IscsiProtocol(self, conn, to_send, received), sock)
        except BaseException:
            sock.close()
            raise

    # --- session table -----------------------------------------------------------------------
    def _next_tsih(self) -> int:
        tsih = next(self._tsih) & 0xFFFF
        if tsih == 0:
            tsih = next(self._tsih) & 0xFFFF
        return tsih

    def _login_completed(self, proto: _IscsiProtocol, ev: LoginCompleted) -> None:
        """Session reinstatement (RFC 7143 6.3.5): a new login with the same ISID replaces it."""
        if not ev.target_name:
            return
        key = (ev.initiator_name, ev.isid, ev.target_name)
        old = self._sessions.get(key)
        if old is not None and old is not proto and old in self._protocols:
            log.info("reinstating session %s", key)
            if old.conn is not None:  # the old nexus ends before the new one acts
                old._device_calls(old.conn.connection_lost())
            old.close()
        self._sessions[key] = proto
        proto.session_key = key
