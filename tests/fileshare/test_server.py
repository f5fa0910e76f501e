"""RpcServer over 127.0.0.1 with a tiny echo program and a raw socket client."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from fileshare.rpc import (
    MAX_RECORD, AcceptStat, AuthError, AuthStat, AuthSys, RecordReassembler, RejectStat,
    ReplyStat, RpcCall, RpcError, RpcReply, decode_reply, encode_call, frame, record_mark,
)
from fileshare.server import RpcServer
from fileshare.xdr import Unpacker, XdrError

ECHO = 0x2000_0101


class EchoProgram:
    """NULL; 1 echo an opaque; 2 raise; 3 AUTH_TOOWEAK unless AUTH_SYS; 4 wait for a gate;
    5 answer the caller's uid and address."""

    prog = ECHO
    versions = (1, 2)

    def __init__(self) -> None:
        self.gate = threading.Event()

    def handle(self, call: RpcCall) -> bytes:
        if call.proc == 0:
            if len(call.body):
                raise RpcError(AcceptStat.GARBAGE_ARGS)
            return b""
        if call.proc == 1:
            try:
                u = Unpacker(call.body)
                data = u.opaque(1 << 20)
                u.done()
            except XdrError as exc:
                raise RpcError(AcceptStat.GARBAGE_ARGS) from exc
            return struct.pack(">I", len(data)) + data + b"\0" * (-len(data) % 4)
        if call.proc == 2:
            raise RuntimeError("a bug in a program")
        if call.proc == 3:
            if call.cred is None:
                raise AuthError(AuthStat.AUTH_TOOWEAK)
            return b""
        if call.proc == 4:
            self.gate.wait(10)
            return b"gate"
        if call.proc == 6:
            return None  # type: ignore[return-value]  # a bug: not bytes
        if call.proc == 5:
            assert call.cred is not None
            host = call.client_host.encode()
            return struct.pack(">II", call.cred.uid, len(host)) + host + b"\0" * (-len(host) % 4)
        raise RpcError(AcceptStat.PROC_UNAVAIL)


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.records = RecordReassembler()

    def send(self, message: bytes) -> None:
        self.sock.sendall(frame(message))

    def recv(self) -> RpcReply:
        while (record := self.records.next_record()) is None:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.records.receive_data(data)
        return decode_reply(record)

    def call(self, xid: int, proc: int, body: bytes = b"", *, prog: int = ECHO, vers: int = 1,
             cred: AuthSys | None = None) -> RpcReply:
        self.send(encode_call(xid, prog, vers, proc, body, cred))
        reply = self.recv()
        assert reply.xid == xid
        return reply

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


class Running:
    """The server on its own event loop thread (the test body stays synchronous)."""

    def __init__(self, **kwargs: object) -> None:
        self.program = EchoProgram()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = RpcServer([self.program], "127.0.0.1", 0, **kwargs)  # type: ignore[arg-type]
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    def stop(self) -> None:
        self.program.gate.set()
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def running() -> Iterator[Running]:
    r = Running(udp=True, max_inflight=4)
    yield r
    r.stop()


@pytest.fixture
def client(running: Running) -> Iterator[Client]:
    c = Client(running.server.port)
    yield c
    c.close()


CRED = AuthSys(1, "tester", 1000, 1000, (1000,))


def test_null_and_echo(client: Client) -> None:
    reply = client.call(1, 0)
    assert (reply.reply_stat, reply.accept_stat, reply.body) == (
        ReplyStat.MSG_ACCEPTED, AcceptStat.SUCCESS, b"")
    payload = struct.pack(">I", 5) + b"hello\0\0\0"
    assert client.call(2, 1, payload, vers=2).body == payload


def test_big_echo_round_trips(client: Client) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    payload = struct.pack(">I", len(data)) + data
    assert client.call(3, 1, payload).body == payload


def test_caller_identity(client: Client) -> None:
    body = client.call(4, 5, cred=CRED).body
    assert body[:4] == struct.pack(">I", 1000)
    assert body[8:17] == b"127.0.0.1"


def test_prog_unavail_and_mismatch_and_proc_unavail(client: Client) -> None:
    assert client.call(5, 0, prog=ECHO + 1).accept_stat == AcceptStat.PROG_UNAVAIL
    reply = client.call(6, 0, vers=3)
    assert (reply.accept_stat, reply.low, reply.high) == (AcceptStat.PROG_MISMATCH, 1, 2)
    assert client.call(7, 99).accept_stat == AcceptStat.PROC_UNAVAIL


def test_garbage_args_and_header_errors(client: Client) -> None:
    assert client.call(8, 0, b"junk").accept_stat == AcceptStat.GARBAGE_ARGS
    assert client.call(9, 1, struct.pack(">I", 100) + b"short").accept_stat == \
        AcceptStat.GARBAGE_ARGS
    # A header cut short after the xid: GARBAGE_ARGS for that xid, connection kept.
    client.send(struct.pack(">IIIII", 10, 0, 2, ECHO, 1))
    assert client.recv().accept_stat == AcceptStat.GARBAGE_ARGS
    # RPC version 3: MSG_DENIED RPC_MISMATCH 2..2.
    call = bytearray(encode_call(11, ECHO, 1, 0))
    call[8:12] = struct.pack(">I", 3)
    client.send(bytes(call))
    reply = client.recv()
    assert (reply.reply_stat, reply.reject_stat, reply.low, reply.high) == (
        ReplyStat.MSG_DENIED, RejectStat.RPC_MISMATCH, 2, 2)
    assert client.call(12, 0).accept_stat == AcceptStat.SUCCESS


def test_auth_error_from_program(client: Client) -> None:
    reply = client.call(13, 3)
    assert (reply.reply_stat, reply.reject_stat, reply.auth_stat) == (
        ReplyStat.MSG_DENIED, RejectStat.AUTH_ERROR, AuthStat.AUTH_TOOWEAK)
    assert client.call(14, 3, cred=CRED).accept_stat == AcceptStat.SUCCESS


def test_exception_in_program_is_system_err(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    assert client.call(15, 2).accept_stat == AcceptStat.SYSTEM_ERR
    assert "procedure 2 failed" in caplog.text
    assert client.call(17, 6).accept_stat == AcceptStat.SYSTEM_ERR
    assert "returned NoneType" in caplog.text
    assert client.call(16, 0).accept_stat == AcceptStat.SUCCESS


def test_replies_out_of_order(running: Running, client: Client) -> None:
    client.send(encode_call(20, ECHO, 1, 4))  # blocks until the gate opens
    assert client.call(21, 0).accept_stat == AcceptStat.SUCCESS  # overtakes the first
    running.program.gate.set()
    reply = client.recv()
    assert (reply.xid, reply.body) == (20, b"gate")


def test_inflight_cap_pauses_but_completes(running: Running, client: Client) -> None:
    # Ten blocked calls on a connection capped at four: all answered once the gate opens.
    for xid in range(30, 40):
        client.send(encode_call(xid, ECHO, 1, 4))
    running.program.gate.set()
    assert sorted(client.recv().xid for _ in range(10)) == list(range(30, 40))


def test_oversized_record_drops_only_that_connection(running: Running, client: Client) -> None:
    other = Client(running.server.port)
    try:
        client.sock.sendall(record_mark(MAX_RECORD + 1) + b"\0" * 1024)
        assert client.closed_by_peer()
        assert other.call(40, 0).accept_stat == AcceptStat.SUCCESS
        again = Client(running.server.port)
        assert again.call(41, 0).accept_stat == AcceptStat.SUCCESS
        again.close()
    finally:
        other.close()


def test_unreadable_record_drops_the_connection(running: Running, client: Client) -> None:
    client.sock.sendall(frame(b"\0\0"))
    assert client.closed_by_peer()
    c = Client(running.server.port)
    assert c.call(42, 0).accept_stat == AcceptStat.SUCCESS
    c.close()


def test_fragmented_call_and_partial_writes(client: Client) -> None:
    msg = encode_call(50, ECHO, 1, 1, struct.pack(">I", 3) + b"abc\0")
    stream = record_mark(13, last=False) + msg[:13] + record_mark(len(msg) - 13) + msg[13:]
    for b in stream:
        client.sock.sendall(bytes([b]))
    reply = client.recv()
    assert (reply.xid, reply.body) == (50, struct.pack(">I", 3) + b"abc\0")


def test_client_vanishing_mid_call_does_not_hurt(running: Running) -> None:
    c = Client(running.server.port)
    c.send(encode_call(60, ECHO, 1, 4))
    c.sock.close()  # the reply has nowhere to go
    running.program.gate.set()
    d = Client(running.server.port)
    assert d.call(61, 4).body == b"gate"
    d.close()


def test_udp(running: Running) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(10)
    try:
        sock.sendto(encode_call(70, ECHO, 1, 0), ("127.0.0.1", running.server.port))
        reply = decode_reply(sock.recv(65536))
        assert (reply.xid, reply.accept_stat) == (70, AcceptStat.SUCCESS)
        sock.sendto(encode_call(71, ECHO + 1, 1, 0), ("127.0.0.1", running.server.port))
        assert decode_reply(sock.recv(65536)).accept_stat == AcceptStat.PROG_UNAVAIL
    finally:
        sock.close()


def test_stop_with_open_connections_and_restart_on_the_same_port() -> None:
    r = Running()
    port = r.server.port
    c = Client(port)
    assert c.call(80, 0).accept_stat == AcceptStat.SUCCESS
    r.stop()
    assert c.closed_by_peer()
    c.close()
    r2 = Running()
    try:
        assert r2.server.port != 0
    finally:
        r2.stop()
    with pytest.raises(ValueError):
        RpcServer([EchoProgram(), EchoProgram()], "127.0.0.1", 0)  # type: ignore[list-item]


def test_client_that_does_not_read_replies_is_bounded(running: Running) -> None:
    """A client sending calls but never reading replies: the server stops reading it once its
    write buffer is full; memory held for it stays bounded; all replies arrive once it reads."""
    from fileshare.server import MAX_INFLIGHT_BYTES, WRITE_HIGH_WATER

    c = Client(running.server.port)
    payload = struct.pack(">I", 60000) + b"p" * 60000
    count = 600  # ~36 MiB of calls and as much of replies
    sent = [0]

    def sender() -> None:
        try:
            for xid in range(count):
                c.send(encode_call(1000 + xid, ECHO, 1, 1, payload))
                sent[0] += 1
        except OSError:
            pass

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    # Wait until the sender is stuck (the server stopped reading) or done.
    last, still = -1, 0
    while still < 5 and t.is_alive():
        t.join(0.2)
        still = still + 1 if sent[0] == last else 0
        last = sent[0]
    assert t.is_alive(), "everything was absorbed: the bound was not exercised"
    (conn,) = list(running.server._conns)
    assert conn.transport is not None
    # Unsent replies: the high-water mark plus the replies of the calls running at that point.
    reply_room = (running.server.max_inflight + 1) * 64 * 1024
    assert conn.transport.get_write_buffer_size() <= WRITE_HIGH_WATER + reply_room
    assert conn.inflight_bytes <= MAX_INFLIGHT_BYTES + 128 * 1024
    assert conn.records.buffered() <= 2 * 128 * 1024
    got = sorted(c.recv().xid for _ in range(count))
    assert got == list(range(1000, 1000 + count))
    t.join(10)
    c.close()


class PiecesProgram:
    """Answers with a list of buffers (the READ shape: header, data as is, padding)."""

    prog = ECHO + 7
    versions = (1,)

    def handle(self, call: RpcCall) -> list[bytes | bytearray | memoryview]:
        data = memoryview(bytearray(b"d" * (call.proc or 1)))
        return [struct.pack(">I", len(data)), data, b"\0" * (-len(data) % 4)]


@pytest.mark.parametrize("size", [1, 3, 40000, 1 << 20])
def test_reply_in_pieces(size: int) -> None:
    r = Running()
    r.server.programs[PiecesProgram.prog] = PiecesProgram()  # type: ignore[assignment]
    c = Client(r.server.port)
    try:
        reply = c.call(90, size, prog=PiecesProgram.prog)
        assert reply.body == struct.pack(">I", size) + b"d" * size + b"\0" * (-size % 4)
    finally:
        c.close()
        r.stop()


def test_ipv6_loopback_and_mapped_addresses() -> None:
    from fileshare.server import _host

    assert _host(("::ffff:127.0.0.1", 5, 0, 0)) == ("127.0.0.1", 5)
    assert _host(("::1", 6, 0, 0)) == ("::1", 6)
    assert _host(None) == ("", 0)
    if not socket.has_ipv6:
        pytest.skip("no IPv6")

    async def main() -> bytes:
        server = RpcServer([EchoProgram()], "::1", 0, udp=True)  # type: ignore[list-item]
        try:
            await server.start()
        except OSError as exc:
            pytest.skip(f"no ::1 here: {exc}")
        try:
            def call() -> bytes:
                with socket.create_connection(("::1", server.port), timeout=10) as s:
                    s.sendall(frame(encode_call(1, ECHO, 1, 5, b"", CRED)))
                    records = RecordReassembler()
                    while (rec := records.next_record()) is None:
                        records.receive_data(s.recv(65536))
                    return decode_reply(rec).body

            return await asyncio.to_thread(call)
        finally:
            await server.stop()

    body = asyncio.run(main())
    assert body[8:11] == b"::1"


class CountingProgram:
    """proc 1 counts its runs and answers the count; proc 2 waits for the gate first."""

    prog = ECHO + 9
    versions = (1,)
    cached_procs = frozenset({(1, 1), (1, 2)})

    def __init__(self) -> None:
        self.runs = 0
        self.gate = threading.Event()

    def handle(self, call: RpcCall) -> bytes:
        if call.proc == 0:
            return b""
        if call.proc == 2:
            self.gate.wait(10)
        self.runs += 1
        return struct.pack(">I", self.runs)


class NfsLike:
    prog = 100003
    versions = (3,)

    def __init__(self) -> None:
        self.runs = 0

    def handle(self, call: RpcCall) -> bytes:
        self.runs += 1
        return b""


def test_duplicate_request_cache() -> None:
    counting, nfs = CountingProgram(), NfsLike()
    r = Running()
    r.server.programs.update({counting.prog: counting, nfs.prog: nfs})  # type: ignore[dict-item]
    c = Client(r.server.port)
    try:
        first = c.call(5, 1, b"args", prog=counting.prog)
        assert first.body == struct.pack(">I", 1)
        # Retransmission on a new connection (as after a reconnect): the first reply again.
        c.close()
        c = Client(r.server.port)
        assert c.call(5, 1, b"args", prog=counting.prog) == first
        assert counting.runs == 1
        # Same xid, other arguments: a different call.
        assert c.call(5, 1, b"argz", prog=counting.prog).body == struct.pack(">I", 2)
        # A duplicate of a call still running is dropped: one reply only.
        c.send(encode_call(6, counting.prog, 1, 2, b"", None))
        c.send(encode_call(6, counting.prog, 1, 2, b"", None))
        c.send(encode_call(7, counting.prog, 1, 0))  # PROC 0 is not cached: runs at once
        assert c.recv().xid == 7
        counting.gate.set()
        assert c.recv().xid == 6
        assert c.call(8, 0, prog=counting.prog).xid == 8  # no second reply to xid 6 queued
        assert counting.runs == 3
        # NFS v3 REMOVE (12) is cached by default; GETATTR (1) is not.
        for _ in range(2):
            c.call(9, 12, b"x", prog=100003, vers=3)
            c.call(10, 1, b"x", prog=100003, vers=3)
        assert nfs.runs == 3
    finally:
        c.close()
        r.stop()


def test_duplicate_request_cache_bounds() -> None:
    from fileshare.server import DRC_REPLY_MAX, DuplicateRequestCache

    drc = DuplicateRequestCache(max_entries=2, ttl=10)
    keys = [("h", xid, 1, 1, 1, 0) for xid in range(4)]
    assert drc.lookup(keys[0], 0.0) is None
    assert drc.lookup(keys[0], 1.0) == []  # still running
    drc.finish(keys[0], [b"reply"])
    assert drc.lookup(keys[0], 5.0) == [b"reply"]
    assert drc.lookup(keys[0], 10.5) is None  # expired: a new call
    drc.finish(keys[0], [b"x" * (DRC_REPLY_MAX + 1)])  # too big to keep
    assert drc.lookup(keys[0], 11.0) is None
    drc.lookup(keys[1], 11.0)
    drc.lookup(keys[2], 11.0)
    assert len(drc) == 2  # the oldest went
    drc.finish(keys[3], [b"never started"])
    assert drc.lookup(keys[3], 12.0) is None


def test_start_fails_cleanly_when_the_port_is_taken() -> None:
    async def main() -> None:
        holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        try:
            server = RpcServer([EchoProgram()], "127.0.0.1", port, udp=True)  # type: ignore[list-item]
            with pytest.raises(OSError):
                await server.start()
            # Nothing left listening on TCP either, and stop() is harmless.
            await server.stop()
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port))
        finally:
            holder.close()
        # Port 0 with UDP: one port free for both is found.
        server = RpcServer([EchoProgram()], "127.0.0.1", 0, udp=True)  # type: ignore[list-item]
        await server.start()
        assert server.port != 0
        await server.stop()

    asyncio.run(main())


def test_retransmitted_nfs3_remove_answers_ok_again() -> None:
    """End to end through the NFS v3 program: a REMOVE whose reply was lost is retransmitted
    on a new connection; the client hears NFS3_OK again, not NFS3ERR_NOENT."""
    from fileshare.fs import CreateMode, Cred
    from fileshare.nfs import NfsProgram
    from fileshare.nfs3 import Nfs3Program
    from fileshare.xdr import Packer
    from tests.fileshare.memfs import MemExports, MemFs

    exports, fs = MemExports(), MemFs("share1", 1)
    exports.add("/share1", fs)
    root = fs.root_handle()
    fs.create(Cred(1000, 1000), root, "gone.txt", CreateMode.UNCHECKED)
    p = Packer()
    p.opaque(root)
    p.string("gone.txt")
    remove = encode_call(0x5151, 100003, 3, 12, p.getvalue(), AuthSys(1, "c", 1000, 1000, ()))

    async def main() -> list[bytes]:
        server = RpcServer([NfsProgram(Nfs3Program(exports))], "127.0.0.1", 0)
        await server.start()
        try:
            def twice() -> list[bytes]:
                out = []
                for _ in range(2):
                    c = Client(server.port)
                    c.send(remove)
                    out.append(c.recv().body)
                    c.close()
                return out

            return await asyncio.to_thread(twice)
        finally:
            await server.stop()

    first, second = asyncio.run(main())
    assert first[:4] == b"\0\0\0\0"  # NFS3_OK
    assert second == first
