"""The built-in portmapper: RPC program 100000, portmap v2 and rpcbind v3/v4 (RFC 1833).

Clients ask it where MOUNT (100005) and NFS (100003) listen: Linux ``mount.nfs``, ``nfs-rs``
and libnfs over IPv4 use portmap v2 GETPORT; libnfs over IPv6 uses rpcbind v3 GETADDR (it reads
only the port from the universal address). ``rpcinfo -p`` uses v2 DUMP.

Invariants:
- Only the appliance registers, through :class:`PortRegistry`; SET and UNSET from the network
  are answered FALSE (refused), whoever asks. CALLIT/BCAST, INDIRECT and the address
  conversion procedures are PROC_UNAVAIL (no forwarding: a portmapper that forwards calls is
  an amplifier).
- GETPORT answers 0 and GETADDR the empty string for a program that is not registered.
- The registry is thread-safe (the RPC server runs calls in worker threads).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

from fileshare.rpc import AcceptStat, RpcCall, RpcError
from fileshare.xdr import Packer, Unpacker, XdrError

PMAP_PROG = 100000
PMAP_PORT = 111
IPPROTO_TCP = 6
IPPROTO_UDP = 17
_PROTO_NAME = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}
_PROTO_NUMBER = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP}

MAX_NETID = 64
MAX_UADDR = 128
MAX_OWNER = 255


@dataclass(frozen=True, slots=True)
class Mapping:
    """One registration: ``prog`` version ``vers`` listens on ``host:port`` over ``proto``."""

    prog: int
    vers: int
    proto: str  # "tcp" | "udp"
    port: int
    host: str = "0.0.0.0"
    owner: str = "vtl"

    @property
    def netid(self) -> str:
        """rpcbind network id: tcp, udp, tcp6 or udp6."""
        return self.proto + ("6" if ":" in self.host else "")

    @property
    def uaddr(self) -> str:
        """Universal address (RFC 1833 / RFC 5665): ``host.p1.p2``."""
        return f"{self.host}.{self.port >> 8}.{self.port & 0xFF}"


class PortRegistry:
    """Which program and version listens where; filled in by the appliance only."""

    def __init__(self, mappings: Iterable[Mapping] = ()) -> None:
        self._lock = threading.Lock()
        self._maps: dict[tuple[int, int, str], Mapping] = {}
        for m in mappings:
            self.set(m)

    def set(self, mapping: Mapping) -> None:
        if mapping.proto not in _PROTO_NUMBER:
            raise ValueError(f"protocol {mapping.proto!r} is not tcp or udp")
        if not 0 < mapping.port < 65536:
            raise ValueError(f"port {mapping.port} out of range")
        with self._lock:
            self._maps[(mapping.prog, mapping.vers, mapping.proto)] = mapping

    def register(self, prog: int, versions: Iterable[int], port: int, host: str = "0.0.0.0",
                 protos: Iterable[str] = ("tcp",)) -> None:
        """Register every version of ``prog`` on ``port`` for each protocol."""
        for vers in versions:
            for proto in protos:
                self.set(Mapping(prog, vers, proto, port, host))

    def unset(self, prog: int, vers: int | None = None) -> None:
        with self._lock:
            for key in [k for k in self._maps if k[0] == prog and vers in (None, k[1])]:
                del self._maps[key]

    def getport(self, prog: int, vers: int, proto: str) -> int:
        with self._lock:
            m = self._maps.get((prog, vers, proto))
        return m.port if m is not None else 0

    def lookup(self, prog: int, vers: int, netid: str) -> Mapping | None:
        """The mapping for ``netid`` ("" = any; tcp and tcp6 both mean TCP here)."""
        protos = [netid.rstrip("6")] if netid else ["tcp", "udp"]
        with self._lock:
            for proto in protos:
                m = self._maps.get((prog, vers, proto))
                if m is not None:
                    return m
        return None

    def mappings(self) -> list[Mapping]:
        with self._lock:
            return sorted(self._maps.values(), key=lambda m: (m.prog, m.vers, m.proto))


# Procedure numbers (RFC 1833 3.2 and 4.2).
NULL, SET, UNSET, GETPORT, DUMP, CALLIT = 0, 1, 2, 3, 4, 5  # v2
GETADDR, GETTIME, UADDR2TADDR, TADDR2UADDR = 3, 6, 7, 8  # v3/v4 (SET/UNSET/DUMP as v2)
GETVERSADDR, INDIRECT, GETADDRLIST, GETSTAT = 9, 10, 11, 12  # v4


def _garbage(exc: Exception) -> RpcError:
    return RpcError(AcceptStat.GARBAGE_ARGS, message=str(exc))


def _pack_rpcb(p: Packer, m: Mapping) -> None:
    p.uint(m.prog)
    p.uint(m.vers)
    p.string(m.netid)
    p.string(m.uaddr)
    p.string(m.owner)


class PortmapProgram:
    """RPC program 100000 over a :class:`PortRegistry` (see the module docstring)."""

    prog = PMAP_PROG
    versions = (2, 3, 4)

    def __init__(self, registry: PortRegistry) -> None:
        self.registry = registry

    def handle(self, call: RpcCall) -> bytes:
        if call.vers == 2:
            return self._v2(call)
        return self._v34(call)

    def _v2(self, call: RpcCall) -> bytes:
        u = Unpacker(call.body)
        p = Packer()
        try:
            if call.proc == NULL:
                u.done()
            elif call.proc in (SET, UNSET):
                for _ in range(4):
                    u.uint()
                u.done()
                p.bool(False)  # refused: only the appliance registers
            elif call.proc == GETPORT:
                prog, vers, proto = u.uint(), u.uint(), u.uint()
                u.uint()  # port: ignored
                u.done()
                name = _PROTO_NAME.get(proto)
                p.uint(self.registry.getport(prog, vers, name) if name else 0)
            elif call.proc == DUMP:
                u.done()
                for m in self.registry.mappings():
                    p.bool(True)
                    p.uint(m.prog)
                    p.uint(m.vers)
                    p.uint(_PROTO_NUMBER[m.proto])
                    p.uint(m.port)
                p.bool(False)
            else:
                raise RpcError(AcceptStat.PROC_UNAVAIL)
        except XdrError as exc:
            raise _garbage(exc) from exc
        return p.getvalue()

    def _v34(self, call: RpcCall) -> bytes:
        u = Unpacker(call.body)
        p = Packer()
        try:
            if call.proc == NULL:
                u.done()
            elif call.proc in (SET, UNSET):
                self._unpack_rpcb(u)
                u.done()
                p.bool(False)
            elif call.proc == GETADDR or (call.vers == 4 and call.proc == GETVERSADDR):
                prog, vers, netid, _addr, _owner = self._unpack_rpcb(u)
                u.done()
                m = self.registry.lookup(prog, vers, netid)
                p.string(m.uaddr if m is not None else "")
            elif call.proc == DUMP:
                u.done()
                for m in self.registry.mappings():
                    p.bool(True)
                    _pack_rpcb(p, m)
                p.bool(False)
            else:
                raise RpcError(AcceptStat.PROC_UNAVAIL)
        except XdrError as exc:
            raise _garbage(exc) from exc
        return p.getvalue()

    @staticmethod
    def _unpack_rpcb(u: Unpacker) -> tuple[int, int, str, str, str]:
        return (u.uint(), u.uint(), u.string(MAX_NETID), u.string(MAX_UADDR),
                u.string(MAX_OWNER))


def pack_getport(prog: int, vers: int, proto: int = IPPROTO_TCP) -> bytes:
    """GETPORT v2 arguments (for clients and tests)."""
    p = Packer()
    for value in (prog, vers, proto, 0):
        p.uint(value)
    return p.getvalue()


def pack_rpcb(prog: int, vers: int, netid: str = "", addr: str = "", owner: str = "") -> bytes:
    """rpcb arguments of rpcbind v3/v4 SET/UNSET/GETADDR (for clients and tests)."""
    p = Packer()
    p.uint(prog)
    p.uint(vers)
    p.string(netid)
    p.string(addr)
    p.string(owner)
    return p.getvalue()
