"""The asyncio edge of the iSCSI target: a listener and one protocol object per connection.

All protocol logic lives in :class:`vtl.iscsi.connection.IscsiConnection` (sans-I/O); this
module only moves bytes, keeps the timers the state machine asks for, and applies back-pressure:
reading pauses while the transport's write buffer is above its high-water mark, so a slow
initiator cannot make us buffer a whole tape. Device ``execute()`` is synchronous and runs in
the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket

from vtl.iscsi.connection import ConnectionClosed, IscsiConnection, LoginCompleted
from vtl.iscsi.login import TargetSettings
from vtl.iscsi.target import TargetRegistry

log = logging.getLogger("vtl.iscsi")

WRITE_HIGH_WATER = 8 * 1024 * 1024
WRITE_LOW_WATER = 2 * 1024 * 1024
#: sendmsg takes at most IOV_MAX buffers; larger batches go through the transport.
MAX_IOV = 512


def _skip(buffers: list[bytes | memoryview], sent: int) -> list[bytes | memoryview]:
    """The part of ``buffers`` after the first ``sent`` bytes, without copying."""
    rest: list[bytes | memoryview] = []
    for buf in buffers:
        n = len(buf)
        if sent >= n:
            sent -= n
            continue
        rest.append(memoryview(buf)[sent:] if sent else buf)
        sent = 0
    return rest


class _IscsiProtocol(asyncio.Protocol):
    """Glue between one socket and one :class:`IscsiConnection`."""

    def __init__(self, server: "IscsiServer") -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.conn: IscsiConnection | None = None
        self.peer = ""
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._closing = False
        self.session_key: tuple[str, int, str] | None = None
        # A duplicate of the connection's descriptor for gathered sends (sendmsg): asyncio 3.11's
        # writelines joins every buffer into one bytes object, a full copy of each Data-In.
        self._sock: socket.socket | None = None

    # --- asyncio callbacks -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sock is not None:
            self._sock = socket.socket(fileno=os.dup(sock.fileno()))
        local = transport.get_extra_info("sockname") or (self.server.host, self.server.port)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        s = self.server
        self.conn = IscsiConnection(s.registry, local_address=(local[0], local[1]),
                                    tsih=s._next_tsih(), now=self.loop.time(),
                                    portal_group_tag=s.portal_group_tag, settings=s.settings,
                                    nop_interval=s.nop_interval, nop_timeout=s.nop_timeout,
                                    login_timeout=s.login_timeout)
        s._protocols.add(self)
        log.debug("connection from %s", self.peer)
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None or self._closing:
            return
        try:
            events = conn.receive_data(data, self.loop.time())
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
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.conn is not None:
            try:
                self.conn.connection_lost()
            except Exception:
                log.exception("cleanup of %s failed", self.peer)
        self.server._protocols.discard(self)
        if self.session_key is not None and self.server._sessions.get(self.session_key) is self:
            del self.server._sessions[self.session_key]
        log.debug("connection from %s closed", self.peer)

    # --- helpers -----------------------------------------------------------------------------
    def _after(self, events: list[LoginCompleted | ConnectionClosed]) -> None:
        conn, transport = self.conn, self.transport
        assert conn is not None and transport is not None
        out = conn.data_to_send()
        if out:
            self._write(transport, out)
        for ev in events:
            if isinstance(ev, LoginCompleted):
                self.server._login_completed(self, ev)
        if conn.closed:
            self._closing = True
            transport.close()  # flushes buffered output first
            return
        self._arm_timer()

    def _write(self, transport: asyncio.Transport, out: list[bytes | memoryview]) -> None:
        """Send ``out`` with one gathered sendmsg when nothing is queued before it; only what
        the kernel did not take is handed to the transport (and copied there)."""
        sock = self._sock
        if sock is None or transport.get_write_buffer_size() or len(out) > MAX_IOV:
            transport.writelines(out)
            return
        try:
            sent = sock.sendmsg(out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            transport.writelines(out)  # the transport reports the error through connection_lost
            return
        rest = _skip(out, sent)
        if rest:
            transport.writelines(rest)

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


class IscsiServer:
    """An iSCSI portal serving every target in ``registry`` (RFC 7143).

    ``port`` may be 0; the bound port is then available as :attr:`port` after :meth:`start`.
    ``nop_interval`` is the idle time before a NOP-In ping (None disables pings).
    """

    def __init__(self, registry: TargetRegistry, host: str = "127.0.0.1", port: int = 3260, *,
                 nop_interval: float | None = 5.0, nop_timeout: float = 15.0,
                 login_timeout: float = 30.0, portal_group_tag: int = 1,
                 settings: TargetSettings | None = None) -> None:
        self.registry = registry
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
            if old.conn is not None:
                old.conn.connection_lost()  # the old nexus ends before the new one acts
            old.close()
        self._sessions[key] = proto
        proto.session_key = key
