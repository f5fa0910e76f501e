"""The thread-per-connection server of the drive workers (vtl/iscsi/threads.py), over real TCP
sockets on 127.0.0.1: sessions logged in elsewhere are adopted and served, idle ones pinged,
reinstated ones replaced in order, stopped ones ended; a target's lock serialises its device."""

from __future__ import annotations

import dataclasses
import os
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from tests.iscsi.fakedisk import BLOCK, FakeDisk
from tests.iscsi.helpers import INITIATOR, TARGET, Initiator, make_registry
from tests.support.waiting import wait_for
from vtl.iscsi import pdu as P
from vtl.iscsi.connection import IscsiConnection, SessionState
from vtl.iscsi.target import TargetRegistry
from vtl.iscsi.threads import ThreadedServer


def _state(registry: TargetRegistry, isid_byte: int = 1) -> SessionState:
    """A session logged in by an in-process connection, detached as the supervisor does."""
    conn = IscsiConnection(registry, local_address=("127.0.0.1", 3260), tsih=9, now=0.0)
    ini = Initiator(conn)
    rsp = ini.login([("InitiatorName", INITIATOR), ("TargetName", TARGET),
                     ("SessionType", "Normal"), ("ImmediateData", "Yes"),
                     ("InitialR2T", "No"), ("MaxRecvDataSegmentLength", "262144")])
    assert rsp.status == 0
    state, pending = conn.detach()
    assert pending == b""
    return dataclasses.replace(state, isid=state.isid + isid_byte)


class Client:
    """The initiator's end of an adopted TCP connection."""

    def __init__(self, sock: socket.socket, state: SessionState) -> None:
        self.sock = sock
        self.cmdsn = state.expcmdsn
        self.itt = 0x40
        self.reader = P.PduReader(1 << 24)

    def command(self, cdb: bytes, *, write: bytes = b"", read: int = 0) -> int:
        self.itt += 1
        pdu = P.ScsiCommandPdu(final=True, read=bool(read), write=bool(write), attr=1,
                               lun=bytes(8), itt=self.itt, edtl=read or len(write),
                               cmdsn=self.cmdsn, expstatsn=0, cdb=cdb.ljust(16, b"\0"),
                               data=write)
        self.cmdsn += 1
        self.sock.sendall(b"".join(bytes(b) for b in P.encode_pdu(pdu)))
        return self.itt

    def next(self, timeout: float = 10.0) -> P.Pdu | None:
        """The next PDU, or None at EOF."""
        self.sock.settimeout(timeout)
        while (pdu := self.reader.next_pdu()) is None:
            data = self.sock.recv(1 << 20)
            if not data:
                return None
            self.reader.feed(data)
        return pdu

    def status(self, itt: int) -> P.Pdu:
        while True:
            pdu = self.next()
            assert pdu is not None, "connection closed"
            if getattr(pdu, "itt", None) == itt and (
                    isinstance(pdu, P.ScsiResponsePdu)
                    or isinstance(pdu, P.DataIn) and pdu.has_status):
                return pdu


def _rw10(op: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", op, 0, lba, 0, blocks, 0)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    srv = socket.create_server(("127.0.0.1", 0))
    yield srv
    srv.close()


def _connect(server: ThreadedServer, listener: socket.socket, state: SessionState,
             rcvbuf: int | None = None) -> Client:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(listener.getsockname())
    accepted, _ = listener.accept()
    server.adopt(os.dup(accepted.fileno()), state)
    accepted.close()
    return Client(sock, state)


@pytest.fixture
def served() -> Iterator[tuple[ThreadedServer, FakeDisk, TargetRegistry]]:
    disk = FakeDisk()
    registry = make_registry(disk=disk)
    server = ThreadedServer(registry, nop_interval=None, recycle_buffers=True, tick=0.1)
    yield server, disk, registry
    server.stop(timeout=10)


def test_adopted_session_answers_writes_and_reads(served, listener) -> None:  # type: ignore[no-untyped-def]
    server, disk, registry = served
    state = _state(registry)
    client = _connect(server, listener, state)
    payload = os.urandom(64 * BLOCK)
    rsp = client.status(client.command(_rw10(0x2A, 8, 64), write=payload))
    assert isinstance(rsp, P.ScsiResponsePdu) and rsp.status == 0
    assert rsp.statsn == state.statsn  # StatSN continues from the login
    rsp = client.status(client.command(_rw10(0x28, 8, 64), read=len(payload)))
    assert isinstance(rsp, P.DataIn) and rsp.data == payload and rsp.status == 0
    assert bytes(disk.data[8 * BLOCK:72 * BLOCK]) == payload
    assert server.connections == 1
    client.sock.close()
    wait_for("the thread to end", lambda: server.connections == 0, timeout=10)
    assert len(disk.lost) == 1  # the nexus ended with the connection


def test_an_idle_session_is_pinged_and_dropped_when_it_does_not_answer(listener) -> None:  # type: ignore[no-untyped-def]
    disk = FakeDisk()
    registry = make_registry(disk=disk)
    server = ThreadedServer(registry, nop_interval=0.3, nop_timeout=0.6, tick=0.05)
    try:
        client = _connect(server, listener, _state(registry))
        ping = client.next()
        assert isinstance(ping, P.NopIn) and ping.ttt != P.RESERVED_TAG
        assert client.next() is None  # no NOP-Out answer: the target drops the connection
        wait_for("the thread to end", lambda: server.connections == 0, timeout=10)
        assert len(disk.lost) == 1
    finally:
        server.stop(timeout=10)


def test_reinstated_session_ends_the_old_connection_before_the_new_one_acts(  # type: ignore[no-untyped-def]
        served, listener) -> None:
    server, disk, registry = served
    order: list[str] = []
    lost, execute = disk.nexus_lost, disk.execute

    def nexus_lost(nexus: str) -> None:
        order.append("lost")
        lost(nexus)

    def run(cmd):  # type: ignore[no-untyped-def]
        order.append("cmd")
        return execute(cmd)

    disk.nexus_lost = nexus_lost  # type: ignore[method-assign]
    disk.execute = run  # type: ignore[method-assign]
    state = _state(registry)
    old = _connect(server, listener, state)
    assert client_ok(old)
    new = _connect(server, listener, state)  # same initiator, ISID and target
    assert client_ok(new)
    assert old.next() is None  # the old connection was closed
    assert order == ["cmd", "lost", "cmd"]
    assert server.connections == 1


def client_ok(client: Client) -> bool:
    rsp = client.status(client.command(bytes(6)))
    return isinstance(rsp, P.ScsiResponsePdu) and rsp.status == 0


def test_stop_ends_every_session(served, listener) -> None:  # type: ignore[no-untyped-def]
    server, disk, registry = served
    clients = [_connect(server, listener, _state(registry, isid_byte=i)) for i in (1, 2, 3)]
    assert all(client_ok(c) for c in clients)
    server.stop(timeout=10)
    assert [c.next() for c in clients] == [None, None, None]
    assert server.connections == 0 and len(disk.lost) == 3
    with pytest.raises(RuntimeError):
        _connect(server, listener, _state(registry, isid_byte=4))


def test_a_protocol_error_drops_only_its_own_connection(served, listener) -> None:  # type: ignore[no-untyped-def]
    server, disk, registry = served
    bad = _connect(server, listener, _state(registry, isid_byte=1))
    good = _connect(server, listener, _state(registry, isid_byte=2))
    bhs = bytearray(48)
    bhs[0] = 0x01
    bhs[5:8] = ((1 << 24) - 1).to_bytes(3, "big")  # DataSegmentLength over what we accept
    bad.sock.sendall(bytes(bhs))
    reject = bad.next()
    assert isinstance(reject, P.Reject)
    assert bad.next() is None
    assert client_ok(good)
    wait_for("the bad connection to end", lambda: server.connections == 1, timeout=10)


def test_the_target_lock_keeps_others_away_from_a_busy_device(served, listener) -> None:  # type: ignore[no-untyped-def]
    server, disk, registry = served
    inside, release = threading.Event(), threading.Event()
    execute = disk.execute

    def slow(cmd):  # type: ignore[no-untyped-def]
        inside.set()
        release.wait(10)
        return execute(cmd)

    disk.execute = slow  # type: ignore[method-assign]
    client = _connect(server, listener, _state(registry))
    itt = client.command(bytes(6))
    assert inside.wait(10)
    lock = server.lock_for(TARGET)
    assert not lock.acquire(timeout=0.2)  # the command holds the device
    release.set()
    assert lock.acquire(timeout=10)
    lock.release()
    assert client.status(itt).status == 0  # type: ignore[union-attr]


def test_a_peer_that_stops_reading_is_dropped(listener) -> None:  # type: ignore[no-untyped-def]
    disk = FakeDisk()
    registry = make_registry(disk=disk)
    server = ThreadedServer(registry, nop_interval=None, nop_timeout=0.5, tick=0.05)
    try:
        client = _connect(server, listener, _state(registry), rcvbuf=4096)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        for _ in range(64):  # 64 MiB of Data-In that nobody reads
            client.command(_rw10(0x28, 0, 2048), read=2048 * BLOCK)
        wait_for("the connection of a peer that does not read to be dropped",
                 lambda: server.connections == 0, timeout=30)
        assert len(disk.lost) == 1
    finally:
        server.stop(timeout=10)
