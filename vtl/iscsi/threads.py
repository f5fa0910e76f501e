"""The thread-per-connection edge of the iSCSI target, for processes that serve a few streaming
connections each (the drive workers).

A backup stream sends one command after the other; for a small block the event loop's work per
read (selector wake-up, transport callbacks, timer bookkeeping) is a large share of the command's
cost. Here each adopted connection has its own thread that blocks in ``recv_into`` straight into
the buffer the connection names and answers with one ``sendmsg``: two system calls and no loop
per command. The protocol is the same sans-I/O :class:`~vtl.iscsi.connection.IscsiConnection`
the asyncio server (:mod:`vtl.iscsi.server`) drives.

Invariants:
- A target's device is only called under that target's lock (:meth:`ThreadedServer.lock_for`):
  the connection thread holds it while its connection handles received bytes, a timer or the
  end of the session; whoever else touches the device (the worker's control channel: load,
  unload, status) takes the same lock. The connection object itself belongs to its thread.
- Timers: ``SO_RCVTIMEO`` wakes an idle thread every :data:`TICK` seconds so the connection's
  deadlines (NOP-In ping, its timeout) are honoured; ``SO_SNDTIMEO`` bounds a send to a peer
  that stopped reading, after which the connection is dropped.
- Session reinstatement (RFC 7143 6.3.5): a connection adopted for a session this server
  already serves ends the old one (socket shut down, thread joined, nexus lost) before it
  handles a byte.
- A bug in the state machine drops that connection only. :meth:`ThreadedServer.stop` shuts
  every socket down and joins every thread.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from typing import Callable

from vtl.iscsi.connection import IscsiConnection, SessionState
from vtl.iscsi.target import TargetRegistry

log = logging.getLogger("vtl.iscsi")

TICK = 1.0  # default seconds an idle connection thread waits in recv before it checks timers
JOIN_TIMEOUT = 30.0  # seconds to wait for a connection thread to end (reinstatement, stop)
_IOV_MAX = 512  # buffers per sendmsg (Linux allows 1024)
_TIMEVAL = struct.Struct("@ll")


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return _TIMEVAL.pack(whole, int((seconds - whole) * 1_000_000))


def _unsent(out: list[bytes | memoryview], sent: int) -> list[bytes | memoryview]:
    """What is left of ``out`` after the first ``sent`` bytes went."""
    for i, buf in enumerate(out):
        n = len(buf)
        if sent < n:
            return [memoryview(buf)[sent:] if sent else buf, *out[i + 1:]]
        sent -= n
    return []


class _Peer:
    """One adopted connection and its thread."""

    def __init__(self, server: "ThreadedServer", sock: socket.socket, conn: IscsiConnection,
                 key: tuple[str, int, str], lock: threading.Lock) -> None:
        self.server = server
        self.sock = sock
        self.conn = conn
        self.key = key
        self.lock = lock
        self.thread: threading.Thread | None = None
        self._stopping = False

    def start(self, to_send: bytes, received: bytes, old: "_Peer | None") -> None:
        self.thread = threading.Thread(target=self._run, args=(to_send, received, old),
                                       name=f"vtl-iscsi-{self.key[2][-12:]}", daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> bool:
        """Wait for the thread; True when it has ended."""
        if self.thread is not None:
            self.thread.join(timeout)
            return not self.thread.is_alive()
        return True

    def shut(self) -> None:
        """Make the thread leave: the blocked recv/send returns at once."""
        self._stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # --- the thread --------------------------------------------------------------------------
    def _run(self, to_send: bytes, received: bytes, old: "_Peer | None") -> None:
        if old is not None:  # reinstatement: the old nexus ends before the new one acts
            log.info("reinstating session %s", self.key)
            old.shut()
            if not old.join(JOIN_TIMEOUT):
                log.warning("the replaced connection for %s did not end", self.key[2])
        try:
            self._serve(to_send, received)
        except Exception:  # a bug in our state machine must not affect other sessions
            log.exception("iSCSI connection for %s failed", self.key[2])
        finally:
            try:
                with self.lock:
                    self.conn.connection_lost()
            except Exception:
                log.exception("cleanup of the connection for %s failed", self.key[2])
            self.sock.close()
            self.server._ended(self)

    def _serve(self, to_send: bytes, received: bytes) -> None:
        conn, sock, lock = self.conn, self.sock, self.lock
        clock = self.server.clock
        if to_send and not self._send([to_send]):
            return
        if received:
            with lock:
                conn.receive_data(received, clock())
            if not self._send(conn.data_to_send()):
                return
        recv_into, receive_buffer, receive_into = sock.recv_into, conn.receive_buffer, \
            conn.receive_into
        data_to_send, send = conn.data_to_send, self._send
        while not conn.closed and not self._stopping:
            try:
                n = recv_into(receive_buffer())
            except (BlockingIOError, TimeoutError, InterruptedError):  # SO_RCVTIMEO: idle
                with lock:
                    conn.handle_timer(clock())
                if not self._send(conn.data_to_send()):
                    return
                continue
            except OSError as exc:
                log.debug("connection for %s: %s", self.key[2], exc)
                return
            if not n:
                return
            with lock:
                receive_into(n, clock())
            out = data_to_send()
            if out and not send(out):
                return

    def _send(self, out: list[bytes | memoryview]) -> bool:
        """Send every buffer (a short send resumes where it stopped); False if the connection
        is gone or the peer stopped reading for longer than SO_SNDTIMEO."""
        sendmsg = self.sock.sendmsg
        try:
            while out:  # (one pass and one call in the common case)
                batch, out = out[:_IOV_MAX], out[_IOV_MAX:]
                out = _unsent(batch, sendmsg(batch)) + out
        except (BlockingIOError, TimeoutError):
            log.warning("connection for %s: the initiator stopped reading; dropped", self.key[2])
            return False
        except OSError as exc:
            log.debug("connection for %s: %s", self.key[2], exc)
            return False
        return True


class ThreadedServer:
    """Serves connections other processes logged in (see ``IscsiServer.handoff``), one thread
    each. Synchronous API: :meth:`adopt` and :meth:`stop` may be called from any thread."""

    def __init__(self, registry: TargetRegistry, *, nop_interval: float | None = 5.0,
                 nop_timeout: float = 15.0, max_session_data: int | None = None,
                 recycle_buffers: bool = False, tick: float = TICK,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        self.max_session_data = max_session_data
        self.recycle_buffers = recycle_buffers
        self.tick = tick
        self.clock = clock
        self._mutex = threading.Lock()  # the tables below
        self._locks: dict[str, threading.Lock] = {}
        self._peers: dict[tuple[str, int, str], _Peer] = {}
        self._stopped = False

    def lock_for(self, target_name: str) -> threading.Lock:
        """The lock under which ``target_name``'s device is called (the same object always)."""
        with self._mutex:
            lock = self._locks.get(target_name)
            if lock is None:
                lock = self._locks[target_name] = threading.Lock()
            return lock

    @property
    def connections(self) -> int:
        with self._mutex:
            return len(self._peers)

    def adopt(self, fd: int, state: SessionState, to_send: bytes = b"",
              received: bytes = b"") -> None:
        """Serve the connection ``fd`` (ours now) in a new thread. Raises KeyError when the
        target is not served here, RuntimeError after :meth:`stop`; ``fd`` is closed then."""
        sock = socket.socket(fileno=fd)
        try:
            if self._stopped:
                raise RuntimeError("the server has stopped")
            sock.setblocking(True)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(self.tick))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            _timeval(max(self.nop_timeout, self.tick)))
            conn = IscsiConnection.resume(self.registry, state, now=self.clock(),
                                          nop_interval=self.nop_interval,
                                          nop_timeout=self.nop_timeout,
                                          max_session_data=self.max_session_data,
                                          recycle_buffers=self.recycle_buffers)
        except BaseException:
            sock.close()
            raise
        key = (state.initiator_name, state.isid, state.target_name)
        peer = _Peer(self, sock, conn, key, self.lock_for(state.target_name))
        with self._mutex:
            old = self._peers.get(key)
            self._peers[key] = peer
        peer.start(to_send, received, old)
        log.debug("adopted connection for %s", state.target_name)

    def _ended(self, peer: _Peer) -> None:
        with self._mutex:
            if self._peers.get(peer.key) is peer:
                del self._peers[peer.key]

    def stop(self, timeout: float = JOIN_TIMEOUT) -> None:
        """End every connection (each session's nexus is lost) and wait for the threads."""
        self._stopped = True
        with self._mutex:
            peers = list(self._peers.values())
        for peer in peers:
            peer.shut()
        deadline = time.monotonic() + timeout
        for peer in peers:
            if not peer.join(max(0.0, deadline - time.monotonic())):
                log.warning("connection thread for %s did not end", peer.key[2])


__all__ = ["ThreadedServer", "TICK"]
