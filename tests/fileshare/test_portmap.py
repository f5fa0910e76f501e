"""Portmapper v2 and rpcbind v3/v4 (fileshare/portmap.py), as a unit and over TCP/UDP."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from fileshare.portmap import (
    IPPROTO_TCP, IPPROTO_UDP, PMAP_PROG, Mapping, PortmapProgram, PortRegistry, pack_getport,
    pack_rpcb,
)
from fileshare.rpc import AcceptStat, RpcCall, RpcError, decode_reply, encode_call, frame
from fileshare.server import RpcServer
from fileshare.xdr import Unpacker

MOUNT, NFS = 100005, 100003


def _call(vers: int, proc: int, body: bytes = b"") -> RpcCall:
    return RpcCall(xid=1, prog=PMAP_PROG, vers=vers, proc=proc, flavor=0, cred=None,
                   body=body, client_host="127.0.0.1", client_port=700)


@pytest.fixture
def program() -> PortmapProgram:
    reg = PortRegistry()
    reg.register(NFS, (3, 4), 2049, "127.0.0.1")
    reg.register(MOUNT, (3,), 20048, "127.0.0.1", protos=("tcp", "udp"))
    return PortmapProgram(reg)


def test_v2_getport(program: PortmapProgram) -> None:
    assert program.handle(_call(2, 0)) == b""
    assert program.handle(_call(2, 3, pack_getport(NFS, 3))) == struct.pack(">I", 2049)
    assert program.handle(_call(2, 3, pack_getport(MOUNT, 3, IPPROTO_UDP))) == \
        struct.pack(">I", 20048)
    # Unknown program, version or protocol: port 0.
    assert program.handle(_call(2, 3, pack_getport(NFS, 2))) == b"\0\0\0\0"
    assert program.handle(_call(2, 3, pack_getport(NFS, 3, IPPROTO_UDP))) == b"\0\0\0\0"
    assert program.handle(_call(2, 3, pack_getport(NFS, 3, 99))) == b"\0\0\0\0"


def test_v2_dump(program: PortmapProgram) -> None:
    u = Unpacker(program.handle(_call(2, 4)))
    seen = []
    while u.bool():
        seen.append((u.uint(), u.uint(), u.uint(), u.uint()))
    u.done()
    assert seen == [(NFS, 3, IPPROTO_TCP, 2049), (NFS, 4, IPPROTO_TCP, 2049),
                    (MOUNT, 3, IPPROTO_TCP, 20048), (MOUNT, 3, IPPROTO_UDP, 20048)]


def test_set_and_unset_from_the_network_are_refused(program: PortmapProgram) -> None:
    body = struct.pack(">IIII", 400000, 1, IPPROTO_TCP, 999)
    assert program.handle(_call(2, 1, body)) == b"\0\0\0\0"
    assert program.handle(_call(2, 2, pack_getport(NFS, 3))) == b"\0\0\0\0"
    assert program.handle(_call(3, 1, pack_rpcb(400000, 1, "tcp", "127.0.0.1.3.231"))) == \
        b"\0\0\0\0"
    assert program.handle(_call(4, 2, pack_rpcb(NFS, 3))) == b"\0\0\0\0"
    assert program.handle(_call(2, 3, pack_getport(400000, 1))) == b"\0\0\0\0"
    assert program.handle(_call(2, 3, pack_getport(NFS, 3))) == struct.pack(">I", 2049)


@pytest.mark.parametrize("vers,proc", [(3, 3), (4, 3), (4, 9)])
def test_rpcbind_getaddr(program: PortmapProgram, vers: int, proc: int) -> None:
    u = Unpacker(program.handle(_call(vers, proc, pack_rpcb(NFS, 3))))
    assert u.string() == "127.0.0.1.8.1"  # 2049 = 8 * 256 + 1
    u = Unpacker(program.handle(_call(vers, proc, pack_rpcb(MOUNT, 3, "udp"))))
    assert u.string() == "127.0.0.1.78.80"
    u = Unpacker(program.handle(_call(vers, proc, pack_rpcb(NFS, 3, "udp"))))
    assert u.string() == ""


def test_rpcbind_dump_and_ipv6_netid() -> None:
    reg = PortRegistry([Mapping(NFS, 3, "tcp", 2049, "::1")])
    u = Unpacker(PortmapProgram(reg).handle(_call(4, 4)))
    assert u.bool()
    assert (u.uint(), u.uint(), u.string(), u.string(), u.string()) == (
        NFS, 3, "tcp6", "::1.8.1", "vtl")
    assert not u.bool()
    u.done()


def test_bad_arguments_and_unsupported_procedures(program: PortmapProgram) -> None:
    for vers, proc, body in [(2, 3, b"\0\0\0\1"), (2, 0, b"\0\0\0\0"), (3, 3, b"\0" * 12),
                             (4, 3, pack_rpcb(NFS, 3) + b"\0\0\0\0"),
                             (3, 3, struct.pack(">III", NFS, 3, 1 << 20))]:
        with pytest.raises(RpcError) as info:
            program.handle(_call(vers, proc, body))
        assert info.value.stat == AcceptStat.GARBAGE_ARGS
    for vers, proc in [(2, 5), (3, 5), (3, 6), (3, 7), (4, 10), (4, 11), (4, 12), (2, 99)]:
        with pytest.raises(RpcError) as info:
            program.handle(_call(vers, proc))
        assert info.value.stat == AcceptStat.PROC_UNAVAIL


def test_registry_rules() -> None:
    reg = PortRegistry()
    with pytest.raises(ValueError):
        reg.set(Mapping(NFS, 3, "sctp", 2049))
    with pytest.raises(ValueError):
        reg.set(Mapping(NFS, 3, "tcp", 0))
    reg.register(NFS, (3, 4), 2049)
    reg.unset(NFS, 4)
    assert [m.vers for m in reg.mappings()] == [3]
    reg.unset(NFS)
    assert reg.mappings() == []


def test_over_tcp_and_udp(program: PortmapProgram) -> None:
    async def main() -> None:
        server = RpcServer([program], "127.0.0.1", 0, udp=True)
        await server.start()
        try:
            def tcp() -> bytes:
                with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                    s.sendall(frame(encode_call(5, PMAP_PROG, 2, 3, pack_getport(MOUNT, 3))))
                    data = b""
                    while len(data) < 4 or len(data) < 4 + (struct.unpack(">I", data[:4])[0]
                                                            & 0x7FFFFFFF):
                        chunk = s.recv(4096)
                        assert chunk
                        data += chunk
                    return data[4:]

            def udp() -> bytes:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.settimeout(10)
                    s.sendto(encode_call(6, PMAP_PROG, 3, 3, pack_rpcb(NFS, 3)),
                             ("127.0.0.1", server.port))
                    return s.recv(65536)

            reply = decode_reply(await asyncio.to_thread(tcp))
            assert reply.body == struct.pack(">I", 20048)
            reply = decode_reply(await asyncio.to_thread(udp))
            assert Unpacker(reply.body).string() == "127.0.0.1.8.1"
            # Version 5 does not exist: PROG_MISMATCH 2..4.
            def mismatch() -> bytes:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.settimeout(10)
                    s.sendto(encode_call(7, PMAP_PROG, 5, 0), ("127.0.0.1", server.port))
                    return s.recv(65536)
            reply = decode_reply(await asyncio.to_thread(mismatch))
            assert (reply.accept_stat, reply.low, reply.high) == (AcceptStat.PROG_MISMATCH, 2, 4)
        finally:
            await server.stop()

    asyncio.run(main())
