"""ONC RPC v2 (RFC 5531) over TCP record marking: messages, AUTH_SYS, replies.

CONTRACT (types below are fixed; the codec functions are filled in by the RPC helper):
the asyncio server (``fileshare/server.py``) decodes a record into an :class:`RpcCall`, finds the
:class:`RpcProgram` registered for ``call.prog`` and asks it ``handle(call)``, which returns the
procedure's result body (XDR bytes after ``accept_stat = SUCCESS``) or raises :class:`RpcError`
for PROG_MISMATCH / PROC_UNAVAIL / GARBAGE_ARGS / SYSTEM_ERR, or :class:`AuthError` for a
MSG_DENIED/AUTH_ERROR reply. The server builds the reply message, frames it and sends it.
Unknown program: PROG_UNAVAIL (the server answers that itself).

``handle`` is synchronous and runs in a worker thread (it may block on the cache or the
object store); programs must be thread-safe.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

RPC_VERSION = 2
MAX_RECORD = 4 * 1024 * 1024 + 64 * 1024
"""Largest RPC record accepted (a 1 MiB WRITE plus headers, with room); larger ones drop the
connection (RFC 5531 leaves the limit to the server)."""


class MsgType(enum.IntEnum):
    CALL = 0
    REPLY = 1


class ReplyStat(enum.IntEnum):
    MSG_ACCEPTED = 0
    MSG_DENIED = 1


class AcceptStat(enum.IntEnum):
    SUCCESS = 0
    PROG_UNAVAIL = 1
    PROG_MISMATCH = 2
    PROC_UNAVAIL = 3
    GARBAGE_ARGS = 4
    SYSTEM_ERR = 5


class RejectStat(enum.IntEnum):
    RPC_MISMATCH = 0
    AUTH_ERROR = 1


class AuthStat(enum.IntEnum):
    AUTH_OK = 0
    AUTH_BADCRED = 1
    AUTH_REJECTEDCRED = 2
    AUTH_BADVERF = 3
    AUTH_REJECTEDVERF = 4
    AUTH_TOOWEAK = 5


class AuthFlavor(enum.IntEnum):
    AUTH_NONE = 0
    AUTH_SYS = 1
    AUTH_SHORT = 2
    RPCSEC_GSS = 6


@dataclass(frozen=True, slots=True)
class AuthSys:
    """AUTH_SYS credential body (RFC 5531 appendix A)."""

    stamp: int
    machine: str
    uid: int
    gid: int
    gids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class RpcCall:
    xid: int
    prog: int
    vers: int
    proc: int
    flavor: AuthFlavor | int
    cred: AuthSys | None  # None for AUTH_NONE
    body: bytes | memoryview  # the procedure's XDR arguments
    client_host: str  # peer IP address as text ("127.0.0.1", "::1")
    client_port: int


class RpcError(Exception):
    """An accepted-but-failed reply: PROG_MISMATCH (with low/high), PROC_UNAVAIL, GARBAGE_ARGS..."""

    def __init__(self, stat: AcceptStat, *, low: int = 0, high: int = 0, message: str = "") -> None:
        super().__init__(message or stat.name)
        self.stat = stat
        self.low = low
        self.high = high


class AuthError(Exception):
    """A MSG_DENIED / AUTH_ERROR reply (e.g. AUTH_TOOWEAK for AUTH_NONE on NFS)."""

    def __init__(self, stat: AuthStat) -> None:
        super().__init__(stat.name)
        self.stat = stat


class RpcProgram(Protocol):
    """One RPC program (NFS 100003, MOUNT 100005, portmapper 100000)."""

    prog: int
    versions: tuple[int, ...]  # supported versions, for PROG_MISMATCH low/high

    def handle(self, call: RpcCall) -> bytes:
        """Run the procedure; return its XDR result body or raise RpcError/AuthError."""
        ...
