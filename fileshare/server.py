"""The asyncio edge of ONC RPC: TCP (record marking) and optional UDP listeners for programs.

Each complete record is decoded here (``fileshare.rpc.decode_call``); calls to a known program
and version run ``program.handle(call)`` in a thread pool shared by all connections, and the
reply is framed and written when it is ready. Replies may leave out of order (RPC matches them
by xid; NFS clients expect that).

Invariants:
- Memory per connection is bounded: at most ``max_inflight`` calls, and ``MAX_INFLIGHT_BYTES``
  of call records, are running or queued per connection; past either, reading from that socket
  pauses until replies go out. While the transport's write buffer is above its high-water mark
  no call is started and reading pauses (a client that does not read its replies stops being
  read), so unsent replies stay under the high-water mark plus the replies of the calls that
  were running.
- A record over ``MAX_RECORD`` bytes, a fragment storm, or a record with no readable xid drops
  that connection only; a malformed header gets the RPC reply ``decode_call`` prepared.
- An exception escaping a program is logged and answered SYSTEM_ERR; nothing a client sends
  reaches the event loop as an exception.
- ``stop()`` closes the listeners and connections, drops queued calls and waits for running
  ones, so the programs' resources can be closed after it returns.
- Non-idempotent calls (the program's ``cached_procs``, by default NFS v3 SETATTR, CREATE,
  MKDIR, SYMLINK, MKNOD, REMOVE, RMDIR, RENAME, LINK) go through a duplicate request cache: a
  retransmission (same client address, xid, program, version, procedure and arguments), e.g.
  after the client reconnected, gets the first reply again instead of running twice (a REMOVE
  retried after a lost reply answers OK, not NOENT); one arriving while the first still runs is
  dropped (the client retransmits again). Bounded: ``DRC_ENTRIES`` replies of at most
  ``DRC_REPLY_MAX`` bytes kept ``DRC_TTL`` seconds, oldest first out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import zlib
from collections import OrderedDict
from collections.abc import Sequence

from fileshare.rpc import (
    AcceptStat, AuthError, CallRejected, CallUnreadable, RecordError, RecordReassembler,
    RpcCall, RpcError, RpcProgram, decode_call, encode_accept_error, encode_auth_error,
    encode_rpc_error, record_mark, success_header,
)

log = logging.getLogger("vtl.fileshare.rpc")

MAX_INFLIGHT = 32
"""Calls per connection running or queued at once (the Linux client sends up to its slot
table, 65,536 with TCP; it waits when we stop reading)."""
MAX_INFLIGHT_BYTES = 16 * 1024 * 1024
"""Call bytes per connection held at once (at least one call is always admitted)."""
WRITE_HIGH_WATER = 8 * 1024 * 1024
WRITE_LOW_WATER = 2 * 1024 * 1024
MAX_UDP_DATAGRAM = 65535
Parts = list[bytes | bytearray | memoryview]  # a reply message in pieces, unframed
_JOIN_BELOW = 32 * 1024  # replies up to this size are sent as one buffer
_DISCARD = bytearray(64 * 1024)  # where bytes of a connection being dropped go

DRC_ENTRIES = 4096
DRC_REPLY_MAX = 4096
DRC_TTL = 120.0
NFS_PROG = 100003
NFS3_NON_IDEMPOTENT = frozenset((3, proc) for proc in (2, 8, 9, 10, 11, 12, 13, 14, 15))
"""(version, procedure) of NFS v3 SETATTR, CREATE, MKDIR, SYMLINK, MKNOD, REMOVE, RMDIR,
RENAME and LINK (RFC 1813 3.3): the calls whose retransmission must not run again."""
_DEFAULT_CACHED = {NFS_PROG: NFS3_NON_IDEMPOTENT}

DrcKey = tuple[str, int, int, int, int, int]


class DuplicateRequestCache:
    """Replies of non-idempotent calls, keyed by caller and arguments (event-loop thread only).

    Entries live ``ttl`` seconds (as in Linux's nfsd), so an xid a client reuses much later is
    a new call; ``now`` is the caller's monotonic clock.
    """

    def __init__(self, max_entries: int = DRC_ENTRIES, ttl: float = DRC_TTL) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._entries: OrderedDict[DrcKey, tuple[float, Parts | None]] = OrderedDict()

    @staticmethod
    def key(call: RpcCall) -> DrcKey:
        return (call.client_host, call.xid, call.prog, call.vers, call.proc,
                zlib.crc32(call.body))

    def lookup(self, key: DrcKey, now: float) -> Parts | None:
        """The cached reply; an empty list while the first such call still runs; or None (a
        new call, now recorded as running)."""
        entry = self._entries.get(key)
        if entry is not None and now - entry[0] <= self.ttl:
            return list(entry[1] or ())
        self._entries[key] = (now, None)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return None

    def finish(self, key: DrcKey, reply: Parts | None) -> None:
        """Keep ``reply`` (None: forget the call, e.g. it never ran)."""
        entry = self._entries.get(key)
        if entry is None:
            return
        if reply is None or sum(len(p) for p in reply) > DRC_REPLY_MAX:
            del self._entries[key]
        else:
            self._entries[key] = (entry[0], [bytes(p) for p in reply])

    def __len__(self) -> int:
        return len(self._entries)


def _host(addr: tuple[object, ...] | None) -> tuple[str, int]:
    """(host, port) of a peer; an IPv4-mapped IPv6 address is given as plain IPv4."""
    if not addr:
        return ("", 0)
    host = str(addr[0])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, int(addr[1])  # type: ignore[call-overload]


class RpcServer:
    """Serve ``programs`` on ``host:port`` over TCP (and UDP when ``udp`` is true).

    ``port`` 0 picks a free port; after :meth:`start`, :attr:`port` holds the real one (TCP and
    UDP share it).
    """

    def __init__(self, programs: Sequence[RpcProgram], host: str, port: int, *,
                 max_workers: int = 16, udp: bool = False,
                 max_inflight: int = MAX_INFLIGHT) -> None:
        by_prog: dict[int, RpcProgram] = {}
        for program in programs:
            if program.prog in by_prog:
                raise ValueError(f"RPC program {program.prog} given twice")
            by_prog[program.prog] = program
        self.programs = by_prog
        self.host = host
        self.port = port
        self.udp = udp
        self.max_workers = max_workers
        self.max_inflight = max(1, max_inflight)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._server: asyncio.base_events.Server | None = None
        self._udp_transport: asyncio.DatagramTransport | None = None
        self._conns: set[_RpcStream] = set()
        self.drc = DuplicateRequestCache()

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Listen; with ``udp`` and port 0, a port free for both TCP and UDP is found."""
        requested = self.port
        tries = 8 if requested == 0 and self.udp else 1
        for attempt in range(tries):
            try:
                await self._listen(requested)
                break
            except OSError:
                await self._close_listeners()
                self.port = requested
                if attempt == tries - 1:
                    raise
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.max_workers, thread_name_prefix="rpc")
        log.info("RPC programs %s on %s port %d%s", sorted(self.programs), self.host,
                 self.port, " (TCP and UDP)" if self.udp else "")

    async def _listen(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _RpcStream(self), self.host, port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.udp:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            self._udp_transport, _ = await loop.create_datagram_endpoint(
                lambda: _RpcDatagram(self), local_addr=(self.host, self.port), family=family)

    async def _close_listeners(self) -> None:
        if self._udp_transport is not None:
            self._udp_transport.close()
            self._udp_transport = None
        if self._server is not None:
            self._server.close()
            for conn in list(self._conns):
                conn.abort()
            await self._server.wait_closed()
            self._server = None

    async def stop(self) -> None:
        await self._close_listeners()
        pool, self._pool = self._pool, None
        if pool is not None:
            # Queued calls are dropped; running ones finish before stop() returns.
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)

    # --- calls -------------------------------------------------------------------------------
    def submit(self, call: RpcCall) -> asyncio.Future[Parts] | Parts:
        """The reply (list of buffers, unframed) now when no program code must run, or a future."""
        program = self.programs.get(call.prog)
        if program is None:
            return [encode_accept_error(call.xid, AcceptStat.PROG_UNAVAIL)]
        if call.vers not in program.versions:
            return [encode_accept_error(call.xid, AcceptStat.PROG_MISMATCH,
                                        min(program.versions), max(program.versions))]
        if self._pool is None:
            return [encode_accept_error(call.xid, AcceptStat.SYSTEM_ERR)]
        cached = getattr(program, "cached_procs", _DEFAULT_CACHED.get(call.prog, frozenset()))
        if (call.vers, call.proc) not in cached:
            return asyncio.get_running_loop().run_in_executor(self._pool, _run, program, call)
        key = self.drc.key(call)
        reply = self.drc.lookup(key, asyncio.get_running_loop().time())
        if reply is not None:
            log.info("RPC retransmission from %s (xid %#x, procedure %d): %s", call.client_host,
                     call.xid, call.proc, "still running, dropped" if not reply else "replayed")
            return reply  # empty while the first still runs: nothing is sent
        fut = asyncio.get_running_loop().run_in_executor(self._pool, _run, program, call)
        fut.add_done_callback(lambda f: self.drc.finish(
            key, None if f.cancelled() or f.exception() is not None else f.result()))
        return fut


def _run(program: RpcProgram, call: RpcCall) -> Parts:
    """Run one procedure in a worker thread; every outcome becomes a reply."""
    try:
        body = program.handle(call)
    except RpcError as exc:
        return [encode_rpc_error(call.xid, exc)]
    except AuthError as exc:
        return [encode_auth_error(call.xid, exc.stat)]
    except Exception:
        log.exception("RPC program %d v%d procedure %d failed (xid %#x from %s)",
                      call.prog, call.vers, call.proc, call.xid, call.client_host)
        return [encode_accept_error(call.xid, AcceptStat.SYSTEM_ERR)]
    if isinstance(body, (bytes, bytearray, memoryview)):
        return [success_header(call.xid), body]
    if isinstance(body, list) and all(isinstance(b, (bytes, bytearray, memoryview))
                                      for b in body):
        return [success_header(call.xid), *body]
    log.error("RPC program %d v%d procedure %d returned %s, not bytes", call.prog, call.vers,
              call.proc, type(body).__name__)
    return [encode_accept_error(call.xid, AcceptStat.SYSTEM_ERR)]


class _RpcStream(asyncio.BufferedProtocol):
    """One TCP connection: reassemble records, admit calls under the caps, write replies.

    A BufferedProtocol: the event loop receives straight into the buffer the reassembler names
    (for a large WRITE, the record's own buffer), so its bytes are copied once, by the kernel.
    """

    def __init__(self, server: RpcServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = ("", 0)
        self.records = RecordReassembler()
        self.inflight = 0
        self.inflight_bytes = 0
        self.pending: list[bytes | bytearray] = []  # a record waiting for room (at most one)
        self.write_paused = False
        self.read_paused = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer = _host(transport.get_extra_info("peername"))
        self.server._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pending.clear()
        self.server._conns.discard(self)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.closed:
            return memoryview(_DISCARD)
        try:
            return self.records.get_buffer()
        except RecordError:
            return memoryview(_DISCARD)

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        try:
            self.records.buffer_updated(nbytes)
        except RecordError as exc:
            log.warning("RPC connection from %s dropped: %s", self.peer[0], exc)
            self.abort()
            return
        self._admit()

    def _admit(self) -> None:
        """Start pending calls while under the caps; pause reading when over them."""
        server = self.server
        while not self.closed and not self.write_paused:  # no new work for a client not reading
            if not self.pending:
                try:
                    record = self.records.next_record()
                except RecordError as exc:
                    log.warning("RPC connection from %s dropped: %s", self.peer[0], exc)
                    self.abort()
                    return
                if record is None:
                    break
                self.pending.append(record)
            record = self.pending[0]
            if self.inflight and (self.inflight >= server.max_inflight
                                  or self.inflight_bytes + len(record) > MAX_INFLIGHT_BYTES):
                break
            self.pending.pop(0)
            self._start(record)
        self._update_reading()

    def _start(self, record: bytes | bytearray) -> None:
        try:
            call = decode_call(record, self.peer)
        except CallRejected as exc:
            log.debug("RPC call from %s rejected: %s", self.peer[0], exc)
            self._send([exc.reply])
            return
        except CallUnreadable as exc:
            log.warning("RPC connection from %s dropped: %s", self.peer[0], exc)
            self.abort()
            return
        outcome = self.server.submit(call)
        if isinstance(outcome, list):
            self._send(outcome)
            return
        size = len(record)
        self.inflight += 1
        self.inflight_bytes += size
        outcome.add_done_callback(lambda fut: self._finished(fut, size))

    def _finished(self, fut: asyncio.Future[Parts], size: int) -> None:
        self.inflight -= 1
        self.inflight_bytes -= size
        if fut.cancelled() or self.closed:
            return
        exc = fut.exception()
        if exc is not None:  # _run catches everything; a pool shutting down lands here
            log.debug("RPC call from %s not run: %r", self.peer[0], exc)
            return
        self._send(fut.result())
        self._admit()

    def _send(self, parts: Parts) -> None:
        transport = self.transport
        if not parts or transport is None or self.closed or transport.is_closing():
            return
        size = sum(len(p) for p in parts)
        if size <= _JOIN_BELOW:  # one segment, one send
            transport.write(b"".join([record_mark(size), *parts]))
            return
        # A large reply in separate writes rather than writelines: with an empty buffer each
        # goes straight to the socket, so a 1 MiB READ body is not joined into a new object.
        transport.write(record_mark(size) + parts[0])
        for part in parts[1:]:
            if part:
                transport.write(part)

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._admit()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        want_pause = self.write_paused or bool(self.pending) or self.records.pending() > 0 \
            or self.inflight >= self.server.max_inflight \
            or self.inflight_bytes >= MAX_INFLIGHT_BYTES
        if want_pause and not self.read_paused:
            self.read_paused = True
            transport.pause_reading()
        elif not want_pause and self.read_paused:
            self.read_paused = False
            transport.resume_reading()


class _RpcDatagram(asyncio.DatagramProtocol):
    """RPC over UDP (one message per datagram, no record marking): for the portmapper."""

    def __init__(self, server: RpcServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        self.inflight = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if self.inflight >= self.server.max_inflight:
            return  # UDP clients retransmit; drop work past the cap
        peer = _host(addr)
        try:
            call = decode_call(data, peer)
        except CallRejected as exc:
            self._reply([exc.reply], addr)
            return
        except CallUnreadable:
            return  # nothing to answer
        outcome = self.server.submit(call)
        if isinstance(outcome, list):
            self._reply(outcome, addr)
            return
        self.inflight += 1
        outcome.add_done_callback(lambda fut: self._done(fut, addr))

    def _done(self, fut: asyncio.Future[Parts], addr: tuple[object, ...]) -> None:
        self.inflight -= 1
        if not fut.cancelled() and fut.exception() is None:
            self._reply(fut.result(), addr)

    def _reply(self, parts: Parts, addr: tuple[object, ...]) -> None:
        if not parts:
            return
        message = b"".join(parts)
        if self.transport is not None and not self.transport.is_closing() \
                and len(message) <= MAX_UDP_DATAGRAM:
            self.transport.sendto(message, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("RPC UDP error: %r", exc)
