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

CODEC (pure, no I/O):
- :class:`RecordReassembler` (``receive_data`` / ``next_record``) turns a TCP byte stream into
  records (RFC 5531 11); a record over ``MAX_RECORD`` bytes or over ``MAX_FRAGMENTS`` fragments
  raises :class:`RecordError` (drop the connection). ``frame`` / ``record_mark`` frame replies.
- :func:`decode_call` parses a call header and the AUTH_NONE / AUTH_SYS credential; it raises
  :class:`CallUnreadable` (no xid, or not a CALL: drop the connection) or :class:`CallRejected`
  carrying the reply to send (RPC_MISMATCH, AUTH_BADCRED, AUTH_BADVERF, GARBAGE_ARGS).
- ``success_header`` / ``encode_success`` / ``encode_accept_error`` / ``encode_rpc_error`` /
  ``encode_rpc_mismatch`` / ``encode_auth_error`` build replies (verifier always AUTH_NONE);
  ``encode_call`` / ``decode_reply`` are the client side, for tests and tools.

Invariants: no decoder here raises anything but ``RecordError``, ``CallUnreadable``,
``CallRejected`` or ``XdrError`` (``decode_reply``), whatever the bytes; a credential body is at
most 400 bytes, an AUTH_SYS machine name at most 255 bytes and its gid list at most 16 entries.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from fileshare.xdr import Packer, Unpacker, XdrError

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

    def handle(self, call: RpcCall) -> bytes | list[bytes | bytearray | memoryview]:
        """Run the procedure; return its XDR result body or raise RpcError/AuthError.

        The body may also be a list of buffers sent one after the other (e.g. a READ's
        header, its data as read, and its padding), which saves joining a large payload.
        """
        ...


# --- Record marking (RFC 5531 11) ---------------------------------------------------------------

MAX_FRAGMENTS = 1024
"""Fragments one record may have; more (e.g. a storm of empty non-last fragments) drops the
connection. Real clients send one fragment per record."""

_LAST_FRAGMENT = 0x8000_0000
_MARK = struct.Struct(">I")
assert _MARK.size == 4


class RecordError(Exception):
    """The byte stream cannot be framed (oversized record, fragment storm): drop the connection."""


class RecordReassembler:
    """Sans-I/O record-marking decoder (RFC 5531 11).

    Two ways to feed it: ``receive_data(bytes)``, or, for a zero-copy receive path,
    ``get_buffer()`` (where the next bytes should land, e.g. for ``socket.recv_into``) then
    ``buffer_updated(nbytes)``. Then ``next_record()`` until it returns None.

    Small fragments are gathered in a fixed scratch buffer and copied out; a fragment that does
    not fit there gets a buffer of its exact size, which the caller receives into directly and
    which becomes the record (a 1 MiB WRITE is copied once, by the kernel).

    Invariants: the mark is checked before its fragment is read, so no more than
    ``max_record`` bytes of one record (plus the scratch buffer) are ever held; a record is
    returned only once its last fragment is complete, and its buffer is never written again
    (a program may keep views of it); after a :class:`RecordError` the reassembler stays broken
    (every call raises).
    """

    __slots__ = ("_scratch", "_start", "_end", "_big", "_big_filled", "_big_last", "_frags",
                 "_record_len", "_nfrags", "_max", "_error", "_ready")

    SCRATCH = 64 * 1024

    def __init__(self, max_record: int = MAX_RECORD) -> None:
        self._scratch = bytearray(self.SCRATCH)
        self._start = 0  # unconsumed bytes are _scratch[_start:_end]
        self._end = 0
        self._big: bytearray | None = None  # the large fragment being received in place
        self._big_filled = 0
        self._big_last = False
        self._frags: list[bytes | bytearray] = []  # complete fragments of the record under way
        self._record_len = 0
        self._nfrags = 0
        self._max = max_record
        self._error: RecordError | None = None
        self._ready: deque[bytes | bytearray] = deque()

    # --- feeding -----------------------------------------------------------------------------
    def get_buffer(self) -> memoryview:
        """Writable space for the next received bytes (never empty)."""
        if self._error is not None:
            raise self._error
        if self._big is not None:
            return memoryview(self._big)[self._big_filled:]
        if self._end == len(self._scratch):
            self._compact()
        return memoryview(self._scratch)[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last :meth:`get_buffer`."""
        if self._error is not None:
            raise self._error
        if self._big is not None:
            self._big_filled += nbytes
        else:
            self._end += nbytes
        self._parse()

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            with self.get_buffer() as buf:
                n = min(len(buf), len(view) - pos)
                buf[:n] = view[pos:pos + n]
            pos += n
            self.buffer_updated(n)

    def buffered(self) -> int:
        """Bytes held (for tests of the memory bound)."""
        return (self._end - self._start + self._record_len + self._big_filled
                + sum(len(r) for r in self._ready))

    def pending(self) -> int:
        """Complete records not yet taken with :meth:`next_record`."""
        return len(self._ready)

    def next_record(self) -> bytes | bytearray | None:
        """The next complete record, or None until more bytes arrive."""
        if self._error is not None:
            raise self._error
        return self._ready.popleft() if self._ready else None

    # --- parsing -----------------------------------------------------------------------------
    def _fail(self, message: str) -> RecordError:
        self._error = RecordError(message)
        self._start = self._end = 0
        self._big = None
        self._frags.clear()
        self._ready.clear()
        return self._error

    def _compact(self) -> None:
        """Move the unconsumed bytes to the front of the scratch buffer (same-size assignment:
        safe while views of the buffer exist)."""
        n = self._end - self._start
        if self._start:
            self._scratch[0:n] = self._scratch[self._start:self._end]
        self._start, self._end = 0, n

    def _parse(self) -> None:
        while True:
            big = self._big
            if big is not None:
                if self._big_filled < len(big):
                    return
                self._big = None
                self._big_filled = 0
                self._fragment(big, self._big_last)
                continue
            avail = self._end - self._start
            if avail < 4:
                return
            mark = _MARK.unpack_from(self._scratch, self._start)[0]
            size, last = mark & ~_LAST_FRAGMENT, bool(mark & _LAST_FRAGMENT)
            if self._record_len + size > self._max:
                raise self._fail(f"record of more than {self._max} bytes")
            if self._nfrags + 1 > MAX_FRAGMENTS:
                raise self._fail(f"record of more than {MAX_FRAGMENTS} fragments")
            body = self._start + 4
            if avail - 4 >= size:
                frag = bytes(memoryview(self._scratch)[body:body + size])
                self._start = body + size
                if self._start == self._end:
                    self._start = self._end = 0
                self._fragment(frag, last)
                continue
            if 4 + size <= len(self._scratch):
                if body + size > len(self._scratch):
                    self._compact()  # make room for the rest of this fragment
                return
            # Too big for the scratch buffer: receive the rest straight into its own buffer.
            have = avail - 4
            big = bytearray(size)
            big[:have] = memoryview(self._scratch)[body:self._end]
            self._big, self._big_filled, self._big_last = big, have, last
            self._start = self._end = 0

    def _fragment(self, frag: bytes | bytearray, last: bool) -> None:
        self._nfrags += 1
        if not last:
            self._frags.append(frag)
            self._record_len += len(frag)
            return
        if self._frags:
            self._frags.append(frag)
            frag = b"".join(self._frags)
            self._frags.clear()
        self._record_len = 0
        self._nfrags = 0
        self._ready.append(frag)


def record_mark(length: int, last: bool = True) -> bytes:
    """The 4-byte mark of a fragment of ``length`` bytes."""
    if not 0 <= length < _LAST_FRAGMENT:
        raise ValueError(f"fragment length {length} out of range")
    return _MARK.pack(length | (_LAST_FRAGMENT if last else 0))


def frame(message: bytes | bytearray | memoryview) -> bytes:
    """One record of one fragment (mark + message), for a message under 2 GiB."""
    return record_mark(len(message)) + bytes(message)


# --- Calls (RFC 5531 9, 8.2 and appendix A) ---------------------------------------------------------

MAX_AUTH_BYTES = 400
MAX_MACHINE_NAME = 255
MAX_AUTH_GIDS = 16


class CallRejected(Exception):
    """A call whose header cannot be served; ``reply`` is the message to send (unframed)."""

    def __init__(self, xid: int, reply: bytes, message: str) -> None:
        super().__init__(message)
        self.xid = xid
        self.reply = reply


class CallUnreadable(Exception):
    """A record that is not a call we can answer (no xid, or a REPLY): drop the connection."""


def _decode_auth_sys(body: bytes) -> AuthSys:
    u = Unpacker(body)
    stamp = u.uint()
    machine = u.string(MAX_MACHINE_NAME)
    uid = u.uint()
    gid = u.uint()
    gids = tuple(u.array(u.uint, MAX_AUTH_GIDS))
    u.done()
    return AuthSys(stamp, machine, uid, gid, gids)


def encode_auth_sys(cred: AuthSys) -> bytes:
    p = Packer()
    p.uint(cred.stamp)
    p.string(cred.machine)
    p.uint(cred.uid)
    p.uint(cred.gid)
    p.array(list(cred.gids), p.uint)
    return p.getvalue()


def decode_call(record: bytes | bytearray | memoryview, client: tuple[str, int]) -> RpcCall:
    """Decode a call record (RFC 5531 9). ``client`` is the peer (host, port).

    Raises :class:`CallUnreadable` (drop the connection) when the xid cannot be read or the
    message is not a CALL, and :class:`CallRejected` carrying the reply for everything else
    wrong with the header: RPC version other than 2 (MSG_DENIED RPC_MISMATCH 2..2), a bad or
    unsupported credential (AUTH_ERROR AUTH_BADCRED), a bad verifier (AUTH_BADVERF), a header
    cut short (GARBAGE_ARGS). ``body`` is a memoryview of the arguments (no copy).
    """
    view = memoryview(record).cast("B") if not isinstance(record, bytes) else memoryview(record)
    u = Unpacker(view)
    try:
        xid = u.uint()
        mtype = u.uint()
    except XdrError as exc:
        raise CallUnreadable(f"record of {len(view)} bytes has no header") from exc
    if mtype != MsgType.CALL:
        raise CallUnreadable(f"message type {mtype} is not a CALL")
    try:
        rpcvers = u.uint()
        if rpcvers != RPC_VERSION:
            raise CallRejected(xid, encode_rpc_mismatch(xid, RPC_VERSION, RPC_VERSION),
                               f"RPC version {rpcvers}")
        prog = u.uint()
        vers = u.uint()
        proc = u.uint()
        flavor = u.uint()
        cred_body = u.opaque(MAX_AUTH_BYTES)
        verf_flavor = u.uint()
        verf_body = u.opaque(MAX_AUTH_BYTES)
    except XdrError as exc:
        raise CallRejected(xid, encode_accept_error(xid, AcceptStat.GARBAGE_ARGS),
                           f"call header: {exc}") from exc
    cred: AuthSys | None = None
    if flavor == AuthFlavor.AUTH_SYS:
        try:
            cred = _decode_auth_sys(cred_body)
        except XdrError as exc:
            raise CallRejected(xid, encode_auth_error(xid, AuthStat.AUTH_BADCRED),
                               f"AUTH_SYS credential: {exc}") from exc
    elif flavor == AuthFlavor.AUTH_NONE:
        if cred_body:
            raise CallRejected(xid, encode_auth_error(xid, AuthStat.AUTH_BADCRED),
                               "AUTH_NONE credential with a body")
    else:
        raise CallRejected(xid, encode_auth_error(xid, AuthStat.AUTH_BADCRED),
                           f"credential flavor {flavor} not supported")
    if verf_flavor != AuthFlavor.AUTH_NONE:
        raise CallRejected(xid, encode_auth_error(xid, AuthStat.AUTH_BADVERF),
                           f"verifier flavor {verf_flavor} not supported")
    return RpcCall(xid=xid, prog=prog, vers=vers, proc=proc,
                   flavor=AuthFlavor(flavor), cred=cred, body=view[u.pos:],
                   client_host=client[0], client_port=client[1])


def encode_call(xid: int, prog: int, vers: int, proc: int, body: bytes = b"",
                cred: AuthSys | None = None) -> bytes:
    """A CALL message (unframed): AUTH_SYS when ``cred`` is given, else AUTH_NONE."""
    p = Packer()
    p.uint(xid)
    p.uint(MsgType.CALL)
    p.uint(RPC_VERSION)
    p.uint(prog)
    p.uint(vers)
    p.uint(proc)
    if cred is None:
        p.uint(AuthFlavor.AUTH_NONE)
        p.opaque(b"")
    else:
        p.uint(AuthFlavor.AUTH_SYS)
        p.opaque(encode_auth_sys(cred))
    p.uint(AuthFlavor.AUTH_NONE)
    p.opaque(b"")
    return p.getvalue() + bytes(body)


# --- Replies (RFC 5531 9) ------------------------------------------------------------------------

_ACCEPTED_HEAD = struct.Struct(">IIIIII")  # xid, REPLY, MSG_ACCEPTED, verf AUTH_NONE, 0, stat
assert _ACCEPTED_HEAD.size == 24


def success_header(xid: int) -> bytes:
    """The 24 bytes before a procedure's results: accepted, AUTH_NONE verifier, SUCCESS."""
    return _ACCEPTED_HEAD.pack(xid, MsgType.REPLY, ReplyStat.MSG_ACCEPTED,
                               AuthFlavor.AUTH_NONE, 0, AcceptStat.SUCCESS)


def encode_success(xid: int, body: bytes | bytearray | memoryview) -> bytes:
    return success_header(xid) + bytes(body)


def encode_accept_error(xid: int, stat: AcceptStat, low: int = 0, high: int = 0) -> bytes:
    """PROG_UNAVAIL, PROG_MISMATCH (with the supported ``low``..``high``), PROC_UNAVAIL,
    GARBAGE_ARGS or SYSTEM_ERR."""
    if stat == AcceptStat.SUCCESS:
        raise ValueError("use encode_success for SUCCESS")
    head = _ACCEPTED_HEAD.pack(xid, MsgType.REPLY, ReplyStat.MSG_ACCEPTED,
                               AuthFlavor.AUTH_NONE, 0, stat)
    if stat == AcceptStat.PROG_MISMATCH:
        return head + struct.pack(">II", low, high)
    return head


def encode_rpc_error(xid: int, error: RpcError) -> bytes:
    return encode_accept_error(xid, error.stat, error.low, error.high)


def encode_rpc_mismatch(xid: int, low: int = RPC_VERSION, high: int = RPC_VERSION) -> bytes:
    """MSG_DENIED / RPC_MISMATCH with the RPC versions we speak."""
    return struct.pack(">IIIIII", xid, MsgType.REPLY, ReplyStat.MSG_DENIED,
                       RejectStat.RPC_MISMATCH, low, high)


def encode_auth_error(xid: int, stat: AuthStat) -> bytes:
    """MSG_DENIED / AUTH_ERROR with ``stat``."""
    return struct.pack(">IIIII", xid, MsgType.REPLY, ReplyStat.MSG_DENIED,
                       RejectStat.AUTH_ERROR, stat)


@dataclass(frozen=True, slots=True)
class RpcReply:
    """A decoded reply (for clients and tests). ``body`` is the procedure's results on SUCCESS."""

    xid: int
    reply_stat: ReplyStat
    accept_stat: AcceptStat | None = None
    reject_stat: RejectStat | None = None
    auth_stat: AuthStat | None = None
    low: int = 0
    high: int = 0
    body: bytes = b""


def decode_reply(record: bytes | bytearray | memoryview) -> RpcReply:
    """Decode a reply message; raises :class:`~fileshare.xdr.XdrError` on malformed bytes."""
    u = Unpacker(record)
    xid = u.uint()
    if u.uint() != MsgType.REPLY:
        raise XdrError("not a REPLY")
    stat = u.uint()
    try:
        if stat == ReplyStat.MSG_ACCEPTED:
            u.uint()
            u.opaque(MAX_AUTH_BYTES)
            accept = AcceptStat(u.uint())
            if accept == AcceptStat.PROG_MISMATCH:
                low, high = u.uint(), u.uint()
                u.done()
                return RpcReply(xid, ReplyStat.MSG_ACCEPTED, accept, low=low, high=high)
            if accept == AcceptStat.SUCCESS:
                return RpcReply(xid, ReplyStat.MSG_ACCEPTED, accept, body=u.rest())
            u.done()
            return RpcReply(xid, ReplyStat.MSG_ACCEPTED, accept)
        if stat == ReplyStat.MSG_DENIED:
            reject = RejectStat(u.uint())
            if reject == RejectStat.RPC_MISMATCH:
                low, high = u.uint(), u.uint()
                u.done()
                return RpcReply(xid, ReplyStat.MSG_DENIED, reject_stat=reject, low=low, high=high)
            auth = AuthStat(u.uint())
            u.done()
            return RpcReply(xid, ReplyStat.MSG_DENIED, reject_stat=reject, auth_stat=auth)
    except ValueError as exc:  # an enum value we do not know
        if isinstance(exc, XdrError):
            raise
        raise XdrError(str(exc)) from exc
    raise XdrError(f"reply_stat {stat}")
