"""NFS v4.1 (RFC 8881) over the share :class:`~fileshare.fs.FileSystem`: the COMPOUND procedure.

:class:`Nfs4Program` answers RPC program 100003 version 4: NULL and COMPOUND. Only minor
version 1 is served; COMPOUNDs of minor versions 0 and 2 get NFS4ERR_MINOR_VERS_MISMATCH.
This module holds the COMPOUND loop, the session operations (EXCHANGE_ID ... RECLAIM_COMPLETE),
OPEN/CLOSE/OPEN_DOWNGRADE and byte-range locks; the file-handle operations are
:class:`fileshare.nfs4files.FileOps`, the wire types ``nfs4types``, the state ``nfs4state``.

The name space the client sees (RFC 8881 7.3): a read-only pseudo file system whose
directories are the components of the export paths (``/share1``, ``/a/b``); looking up an
export's last component crosses into that share's root. Pseudo handles start with
:data:`PSEUDO_PREFIX` (``nfs4files``); every other handle is the share's own, found with
``exports.by_handle`` and stable across restarts.

Invariants:
- Every COMPOUND after the session-less ones (EXCHANGE_ID, CREATE_SESSION, DESTROY_SESSION,
  DESTROY_CLIENTID alone) starts with SEQUENCE; the reply of each accepted request is cached in
  its slot (when asked to, or when small) and a retry gets those exact bytes back.
- Evaluation stops at the first operation that fails; the COMPOUND status is that operation's.
- An operation whose arguments do not decode answers NFS4ERR_BADXDR; an operation number
  outside the protocol answers OP_ILLEGAL; operations not implemented answer NFS4ERR_NOTSUPP.
- The client's AUTH_SYS credential is squashed by the share's policy before any file system
  call; clients outside a share's CIDRs get NFS4ERR_ACCESS for anything inside it.
- No delegations are ever granted (OPEN_DELEGATE_NONE); a back channel may be bound but is
  never called on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from fileshare.fs import (
    ACCESS_MODIFY,
    ACCESS_READ,
    Attr,
    CreateMode,
    Cred,
    Exports,
    FileSystem,
    FileType,
    FsErrno,
    FsError,
    SetAttr,
)
from fileshare.nfs4files import (
    PSEUDO_PREFIX,
    FhRef,
    FileOps,
    Nfs4Error,
    OpCtx,
    Parts,
    _raise,
    check_name,
    fs_status,
    utf8_ok,
)
from fileshare.nfs4state import (
    MAX_OPS,
    MAX_SLOTS,
    RANGE_END,
    READ_LT,
    READW_LT,
    WRITE_LT,
    WRITEW_LT,
    LockConflict,
    LockDenied,
    LockState,
    OpenState,
    StateError,
    StateTable,
)
from fileshare.nfs4types import (
    CLAIM_DELEG_CUR_FH,
    CLAIM_DELEG_PREV_FH,
    CLAIM_DELEGATE_CUR,
    CLAIM_DELEGATE_PREV,
    CLAIM_FH,
    CLAIM_NULL,
    CLAIM_PREVIOUS,
    CREATE_SESSION4_FLAG_CONN_BACK_CHAN,
    EXCHGID4_FLAG_CONFIRMED_R,
    EXCHGID4_FLAG_MASK_A,
    EXCHGID4_FLAG_UPD_CONFIRMED_REC_A,
    EXCHGID4_FLAG_USE_NON_PNFS,
    EXCLCREAT,
    EXCLUSIVE4,
    EXCLUSIVE4_1,
    GUARDED4,
    INVALID_STATEID,
    NFS4_OPAQUE_LIMIT,
    NFS4_SESSIONID_SIZE,
    NFS4_VERIFIER_SIZE,
    OPEN4_CREATE,
    OPEN4_NOCREATE,
    OPEN4_SHARE_ACCESS_READ,
    OPEN4_SHARE_ACCESS_WANT_CANCEL,
    OPEN4_SHARE_ACCESS_WANT_DELEG_MASK,
    OPEN4_SHARE_ACCESS_WANT_NO_DELEG,
    OPEN4_SHARE_ACCESS_WRITE,
    OPEN_DELEGATE_NONE,
    OPEN_DELEGATE_NONE_EXT,
    SP4_NONE,
    UNCHECKED4,
    WND4_CANCELLED,
    WND4_NOT_SUPP_FTYPE,
    WND4_NOT_WANTED,
    A,
    AttrError,
    ChannelAttrs,
    DecodedAttrs,
    Op,
    Stat,
    StateId,
    bitmap_decode,
    bitmap_encode,
    decode_settable,
    pack_change_info,
    pack_time,
)
from fileshare.rpc import AcceptStat, AuthError, AuthFlavor, AuthStat, RpcCall, RpcError
from fileshare.xdr import Packer, Unpacker, XdrError

__all__ = ["Nfs4Program", "PSEUDO_PREFIX", "Nfs4Error", "fs_status"]

log = logging.getLogger(__name__)

NFS_PROGRAM = 100003
NFS_V4 = 4
MINOR_VERSION = 1
DEFAULT_MAXIO = 1 << 20
MAX_COMPOUND_OPS = 1024
CDFC4_FORE, CDFC4_BACK, CDFC4_FORE_OR_BOTH, CDFC4_BACK_OR_BOTH = 1, 2, 3, 7
CDFS4_FORE, CDFS4_BACK, CDFS4_BOTH = 1, 2, 3
RPC_REPLY_HEADER = 24  # xid, REPLY, MSG_ACCEPTED, AUTH_NONE verifier, SUCCESS
CACHE_SMALL_REPLY = 16 * 1024
"""Replies up to this size are kept in the slot even when the client did not ask (sa_cachethis
false), so a retransmitted small request is answered rather than refused."""

_SESSIONLESS = frozenset({Op.EXCHANGE_ID, Op.CREATE_SESSION, Op.DESTROY_SESSION,
                          Op.DESTROY_CLIENTID, Op.BIND_CONN_TO_SESSION})

def _principal(call: RpcCall) -> tuple[object, ...]:
    if call.cred is not None:
        return (int(call.flavor), call.cred.uid)
    return (int(call.flavor),)


class Nfs4Program(FileOps):
    """RPC program 100003 version 4 (minor version 1) over the shares of ``exports``."""

    prog = NFS_PROGRAM
    versions = (NFS_V4,)

    def __init__(self, exports: Exports, *, lease_time: int = 90, maxio: int = DEFAULT_MAXIO,
                 clock: Callable[[], float] = time.monotonic, boot: bytes | None = None,
                 server_owner: bytes = b"vtl-file-gateway") -> None:
        self.exports = exports
        self.lease_time = lease_time
        self.maxio = maxio
        self.clock = clock
        self.server_owner = server_owner
        self.state = StateTable(boot or os.urandom(4), lease_time)
        self.boot_ns = time.time_ns()
        self._lock = threading.Lock()
        self._ops: dict[int, Callable[[OpCtx, Unpacker], bytes | Parts]] = {
            Op.ACCESS: self._access, Op.CLOSE: self._close, Op.COMMIT: self._commit,
            Op.CREATE: self._create, Op.GETATTR: self._getattr, Op.GETFH: self._getfh,
            Op.LOOKUP: self._lookup, Op.LOOKUPP: self._lookupp, Op.NVERIFY: self._nverify,
            Op.OPEN: self._open, Op.OPEN_DOWNGRADE: self._open_downgrade,
            Op.PUTFH: self._putfh, Op.PUTPUBFH: self._putrootfh, Op.PUTROOTFH: self._putrootfh,
            Op.READ: self._read, Op.READDIR: self._readdir, Op.REMOVE: self._remove,
            Op.RENAME: self._rename, Op.RESTOREFH: self._restorefh, Op.SAVEFH: self._savefh,
            Op.SECINFO: self._secinfo, Op.SETATTR: self._setattr, Op.VERIFY: self._verify,
            Op.WRITE: self._write, Op.EXCHANGE_ID: self._exchange_id,
            Op.CREATE_SESSION: self._create_session, Op.DESTROY_SESSION: self._destroy_session,
            Op.FREE_STATEID: self._free_stateid, Op.SECINFO_NO_NAME: self._secinfo_no_name,
            Op.TEST_STATEID: self._test_stateid, Op.DESTROY_CLIENTID: self._destroy_clientid,
            Op.RECLAIM_COMPLETE: self._reclaim_complete,
            Op.BIND_CONN_TO_SESSION: self._bind_conn_to_session,
            Op.BACKCHANNEL_CTL: self._backchannel_ctl,
            Op.LOCK: self._op_lock, Op.LOCKT: self._lockt, Op.LOCKU: self._locku,
        }

    # ------------------------------------------------------------------ RPC entry

    def handle(self, call: RpcCall) -> bytes | Parts:
        if call.vers != NFS_V4:
            raise RpcError(AcceptStat.PROG_MISMATCH, low=NFS_V4, high=NFS_V4)
        if call.proc == 0:
            return b""
        if call.proc != 1:
            raise RpcError(AcceptStat.PROC_UNAVAIL)
        return self.compound(call)

    def _cred(self, call: RpcCall) -> Cred:
        if call.flavor == AuthFlavor.AUTH_SYS and call.cred is not None:
            c = call.cred
            return Cred(c.uid, c.gid, tuple(c.gids), c.machine)
        if call.flavor == AuthFlavor.AUTH_NONE:
            return Cred(65534, 65534)
        raise AuthError(AuthStat.AUTH_TOOWEAK)

    def compound(self, call: RpcCall) -> bytes | Parts:
        cred = self._cred(call)
        u = Unpacker(call.body)
        try:
            tag = u.opaque(NFS4_OPAQUE_LIMIT)
            minor = u.uint()
            nops = u.uint()
        except XdrError as exc:
            raise RpcError(AcceptStat.GARBAGE_ARGS, message=str(exc)) from None
        if minor != MINOR_VERSION:
            return _compound_reply(Stat.MINOR_VERS_MISMATCH, tag, [])
        if not utf8_ok(tag):
            return _compound_reply(Stat.INVAL, tag, [])
        if nops > MAX_COMPOUND_OPS or nops * 4 > u.remaining():
            raise RpcError(AcceptStat.GARBAGE_ARGS, message=f"{nops} operations")
        ctx = OpCtx(call, cred, nops=nops)
        results: list[bytes | Parts] = []
        status = Stat.OK
        size = RPC_REPLY_HEADER + 12 + len(tag) + (-len(tag)) % 4
        try:
            for i in range(nops):
                ctx.index = i
                try:
                    opnum = u.uint()
                except XdrError:
                    raise RpcError(AcceptStat.GARBAGE_ARGS) from None
                status, res, replay = self._one(ctx, opnum, u, i, nops)
                if replay is not None:
                    return replay
                size += _size(res)
                if ctx.session is not None:
                    too_big = self._reply_limit(ctx, size)
                    if too_big is not None:
                        status, res = too_big, _resop(Op(opnum), too_big, _error_body(Op(opnum)))
                results.append(res)
                if status != Stat.OK:
                    break
            reply = _compound_reply(status, tag, results)
        except BaseException:
            if ctx.slot is not None:
                with self._lock:
                    self.state.finish_slot(ctx.slot, None)
            raise
        if ctx.slot is not None:
            keep = ctx.cachethis or _size(reply) <= CACHE_SMALL_REPLY
            cached = (b"".join(reply) if isinstance(reply, list) else reply) if keep else None
            with self._lock:
                self.state.finish_slot(ctx.slot, cached)
        return reply

    @staticmethod
    def _reply_limit(ctx: OpCtx, size: int) -> Stat | None:
        """REP_TOO_BIG / REP_TOO_BIG_TO_CACHE once the reply outgrows the session's limits."""
        assert ctx.session is not None
        fore = ctx.session.fore
        if size > fore.maxresponsesize:
            return Stat.REP_TOO_BIG
        if ctx.cachethis and size > fore.maxresponsesize_cached:
            return Stat.REP_TOO_BIG_TO_CACHE
        return None

    def _one(self, ctx: OpCtx, opnum: int, u: Unpacker, i: int, nops: int
             ) -> tuple[Stat, bytes | Parts, bytes | None]:
        """Run one operation: (status, encoded nfs_resop4, whole cached reply for a replay)."""
        try:
            op = Op(opnum)
        except ValueError:
            op = Op.ILLEGAL
        if op == Op.ILLEGAL:
            return Stat.OP_ILLEGAL, _resop(Op.ILLEGAL, Stat.OP_ILLEGAL, b""), None
        if i == 0:
            if op == Op.SEQUENCE:
                return self._sequence(ctx, u)
            if op not in _SESSIONLESS:
                return Stat.OP_NOT_IN_SESSION, _resop(op, Stat.OP_NOT_IN_SESSION, b""), None
            if nops > 1:
                return Stat.NOT_ONLY_OP, _resop(op, Stat.NOT_ONLY_OP, b""), None
        elif op == Op.SEQUENCE:
            return Stat.SEQUENCE_POS, _resop(op, Stat.SEQUENCE_POS, b""), None
        handler = self._ops.get(op)
        if handler is None:
            return Stat.NOTSUPP, _resop(op, Stat.NOTSUPP, _error_body(op)), None
        try:
            body = handler(ctx, u)
            return Stat.OK, _resop(op, Stat.OK, body), None
        except Nfs4Error as exc:
            stat = exc.stat
        except (StateError, AttrError) as exc:
            stat = exc.stat
        except FsError as exc:
            stat = fs_status(exc)
        except XdrError:
            stat = Stat.BADXDR
        except Exception:  # a bug: log it, answer SERVERFAULT, keep serving
            log.exception("NFS4 %s failed", op.name)
            stat = Stat.SERVERFAULT
        body = _error_body(op)
        if stat == Stat.DENIED and op in (Op.LOCK, Op.LOCKT):
            body = bytes(ctx.extra.pop("denied", b""))  # type: ignore[arg-type]
        return stat, _resop(op, stat, body), None

    # ------------------------------------------------------------------ session operations

    def _exchange_id(self, ctx: OpCtx, u: Unpacker) -> bytes:
        verifier = u.fopaque(NFS4_VERIFIER_SIZE)
        owner = u.opaque(NFS4_OPAQUE_LIMIT)
        flags = u.uint()
        how = u.enum()
        if how == 1:  # SP4_MACH_CRED: two bitmaps
            bitmap_decode(u)
            bitmap_decode(u)
        elif how == 2:
            raise Nfs4Error(Stat.ENCR_ALG_UNSUPP, "SP4_SSV is not supported")
        elif how != SP4_NONE:
            raise XdrError(f"state_protect_how4 {how}")
        impl = u.array(lambda: (u.string(NFS4_OPAQUE_LIMIT), u.string(NFS4_OPAQUE_LIMIT),
                                u.hyper(), u.uint()), max_items=1)
        del impl
        if flags & ~EXCHGID4_FLAG_MASK_A:
            raise Nfs4Error(Stat.INVAL, f"unknown EXCHANGE_ID flags {flags:#x}")
        if how == 1:
            raise Nfs4Error(Stat.NOTSUPP, "SP4_MACH_CRED is not supported")
        update = bool(flags & EXCHGID4_FLAG_UPD_CONFIRMED_REC_A)
        with self._lock:
            c = self.state.exchange_id(owner, verifier, _principal(ctx.call), update,
                                       self.clock())
        p = Packer()
        p.uhyper(c.clientid)
        p.uint(c.cs_seq)
        p.uint(EXCHGID4_FLAG_USE_NON_PNFS | (EXCHGID4_FLAG_CONFIRMED_R if c.confirmed else 0))
        p.enum(SP4_NONE)
        p.uhyper(0)  # so_minor_id
        p.opaque(self.server_owner)  # so_major_id
        p.opaque(self.server_owner)  # server scope
        p.uint(1)  # nfs_impl_id4<1>
        p.string("vtl")
        p.string("vtl file gateway")
        pack_time(p, 0)
        return p.getvalue()

    def _create_session(self, ctx: OpCtx, u: Unpacker) -> bytes:
        clientid = u.uhyper()
        seq = u.uint()
        flags = u.uint()
        fore = ChannelAttrs.unpack(u)
        back = ChannelAttrs.unpack(u)
        u.uint()  # cb_program
        u.array(lambda: _skip_cb_sec(u), max_items=16)
        with self._lock:
            c, cached = self.state.create_session_check(clientid, seq, _principal(ctx.call),
                                                        self.clock())
            if cached is not None:
                status, body = cached
                if status != Stat.OK:
                    raise Nfs4Error(Stat(status))
                return body
            if flags & ~0x7:
                raise Nfs4Error(Stat.INVAL, f"unknown CREATE_SESSION flags {flags:#x}")
            if fore.maxrequests == 0 or fore.maxoperations == 0 or fore.maxrequestsize < 128 \
                    or fore.maxresponsesize < 64 or back.maxrequestsize < 64 \
                    or back.maxresponsesize < 64:
                raise Nfs4Error(Stat.TOOSMALL, "channel too small for any request")
            cap = self.maxio + 64 * 1024
            fore = ChannelAttrs(0, min(fore.maxrequestsize, cap),
                                min(fore.maxresponsesize, cap),
                                min(fore.maxresponsesize_cached, cap),
                                min(fore.maxoperations, MAX_OPS),
                                min(fore.maxrequests, MAX_SLOTS))
            back = ChannelAttrs(0, back.maxrequestsize, back.maxresponsesize,
                                back.maxresponsesize_cached, back.maxoperations,
                                max(1, min(back.maxrequests, 1)))
            # no persistence, no RDMA; a back channel is accepted (and never used: this
            # server grants no delegations or layouts, so it has nothing to call back about)
            flags &= CREATE_SESSION4_FLAG_CONN_BACK_CHAN
            s = self.state.create_session(c, fore, back, flags, self.clock())
            p = Packer()
            p.fopaque(s.sessionid, NFS4_SESSIONID_SIZE)
            p.uint(seq)
            p.uint(flags)
            fore.pack(p)
            back.pack(p)
            body = p.getvalue()
            self.state.create_session_done(c, Stat.OK, body)
        return body

    def _sequence(self, ctx: OpCtx, u: Unpacker) -> tuple[Stat, bytes, bytes | None]:
        try:
            sessionid = u.fopaque(NFS4_SESSIONID_SIZE)
            seqid = u.uint()
            slotid = u.uint()
            highest = u.uint()
            cachethis = u.bool()
        except XdrError:
            return Stat.BADXDR, _resop(Op.SEQUENCE, Stat.BADXDR, b""), None
        try:
            with self._lock:
                s, slot, cached = self.state.sequence(
                    sessionid, seqid, slotid, self.clock(), (len(ctx.call.body), ctx.nops))
        except StateError as exc:
            return exc.stat, _resop(Op.SEQUENCE, exc.stat, b""), None
        if cached is not None:
            return Stat.OK, b"", cached
        del highest
        ctx.session, ctx.slot, ctx.cachethis = s, slot, cachethis
        p = Packer()
        p.fopaque(sessionid, NFS4_SESSIONID_SIZE)
        p.uint(seqid)
        p.uint(slotid)
        p.uint(len(s.slots) - 1)
        p.uint(len(s.slots) - 1)
        p.uint(0)  # sr_status_flags
        return Stat.OK, _resop(Op.SEQUENCE, Stat.OK, p.getvalue()), None

    def _destroy_session(self, ctx: OpCtx, u: Unpacker) -> bytes:
        sessionid = u.fopaque(NFS4_SESSIONID_SIZE)
        with self._lock:
            if ctx.session is not None and ctx.session.sessionid == sessionid \
                    and ctx.index != ctx.nops - 1:
                raise Nfs4Error(Stat.NOT_ONLY_OP, "DESTROY_SESSION of its own session not last")
            self.state.destroy_session(sessionid)
        return b""

    def _bind_conn_to_session(self, ctx: OpCtx, u: Unpacker) -> bytes:
        """RFC 8881 18.34: every connection serves every session here (no per-connection
        binding is kept), so any binding succeeds; the back channel is never called on."""
        sessionid = u.fopaque(NFS4_SESSIONID_SIZE)
        direction = u.enum()
        u.bool()  # use_conn_in_rdma_mode
        with self._lock:
            if sessionid not in self.state.sessions:
                raise Nfs4Error(Stat.BADSESSION)
        if direction not in (CDFC4_FORE, CDFC4_BACK, CDFC4_FORE_OR_BOTH, CDFC4_BACK_OR_BOTH):
            raise Nfs4Error(Stat.INVAL, f"channel direction {direction}")
        p = Packer()
        p.fopaque(sessionid, NFS4_SESSIONID_SIZE)
        p.enum({CDFC4_FORE: CDFS4_FORE, CDFC4_BACK: CDFS4_BACK}.get(direction, CDFS4_BOTH))
        p.bool(False)
        return p.getvalue()

    def _backchannel_ctl(self, ctx: OpCtx, u: Unpacker) -> bytes:
        """RFC 8881 18.33: accepted and remembered nowhere (nothing is ever called back)."""
        u.uint()  # cb_program
        u.array(lambda: _skip_cb_sec(u), max_items=16)
        return b""

    def _destroy_clientid(self, ctx: OpCtx, u: Unpacker) -> bytes:
        clientid = u.uhyper()
        with self._lock:
            self.state.destroy_clientid(clientid)
        return b""

    def _reclaim_complete(self, ctx: OpCtx, u: Unpacker) -> bytes:
        one_fs = u.bool()
        c = ctx.client
        assert c is not None
        if one_fs:
            ctx.fh()
            return b""
        with self._lock:
            if c.reclaim_complete:
                raise Nfs4Error(Stat.COMPLETE_ALREADY)
            c.reclaim_complete = True
        return b""

    def _test_stateid(self, ctx: OpCtx, u: Unpacker) -> bytes:
        sids = u.array(lambda: StateId.unpack(u), max_items=1024)
        p = Packer()
        with self._lock:
            p.array([self.state.status(s, ctx.client) for s in sids], p.enum)
        return p.getvalue()

    def _free_stateid(self, ctx: OpCtx, u: Unpacker) -> bytes:
        sid = StateId.unpack(u)
        if sid.is_current:
            sid = ctx.cur_sid or _raise(Stat.BAD_STATEID)
        with self._lock:
            if sid.is_anonymous or sid.is_bypass:
                raise Nfs4Error(Stat.BAD_STATEID)
            st = self.state.find(sid, ctx.client)
            if isinstance(st, LockState):
                self.state.free_lock(st)
                return b""
        raise Nfs4Error(Stat.LOCKS_HELD, "an open stateid is freed by CLOSE")

    # ------------------------------------------------------------------ byte-range locks

    @staticmethod
    def _range(offset: int, length: int) -> tuple[int, int]:
        """[start, end) of a lock range; length all ones means to the end (RFC 8881 18.10.3)."""
        if length == 0:
            raise Nfs4Error(Stat.INVAL, "zero-length lock range")
        if length == 0xFFFFFFFFFFFFFFFF:
            return offset, RANGE_END
        if offset + length > 0xFFFFFFFFFFFFFFFF:
            raise Nfs4Error(Stat.INVAL, "lock range past 2**64 - 1")
        return offset, offset + length

    @staticmethod
    def _denied_body(d: LockDenied) -> bytes:
        p = Packer()
        p.uhyper(d.start)
        p.uhyper(0xFFFFFFFFFFFFFFFF if d.end >= RANGE_END else d.end - d.start)
        p.enum(d.type)
        p.uhyper(d.clientid)
        p.opaque(d.owner)
        return p.getvalue()

    def _lock_file(self, ctx: OpCtx) -> FhRef:
        ref = ctx.fh()
        if ref.fs is None or self._attr(ref).type == FileType.DIR:
            raise Nfs4Error(Stat.ISDIR)
        return ref

    def _lock_target(self, ctx: OpCtx, locktype: int, offset: int, length: int,
                     ) -> tuple[FhRef, int, int]:
        """LOCK/LOCKT/LOCKU's common checks: the lock type, the current file (a regular file),
        the byte range; returns (file, start, end)."""
        if locktype not in (READ_LT, WRITE_LT, READW_LT, WRITEW_LT):
            raise Nfs4Error(Stat.INVAL, f"lock type {locktype}")
        ref = self._lock_file(ctx)
        start, end = self._range(offset, length)
        return ref, start, end

    def _op_lock(self, ctx: OpCtx, u: Unpacker) -> bytes:
        locktype = u.enum()
        reclaim = u.bool()
        offset = u.uhyper()
        length = u.uhyper()
        new_owner = u.bool()
        if new_owner:
            u.uint()
            open_sid = StateId.unpack(u)
            u.uint()
            u.uhyper()
            owner = u.opaque(NFS4_OPAQUE_LIMIT)
        else:
            lock_sid = StateId.unpack(u)
            u.uint()
        ref, start, end = self._lock_target(ctx, locktype, offset, length)
        client = ctx.client
        assert client is not None
        if reclaim:
            raise Nfs4Error(Stat.NO_GRACE)
        if not client.reclaim_complete:
            raise Nfs4Error(Stat.GRACE, "RECLAIM_COMPLETE must come before LOCK")
        with self._lock:
            if new_owner:
                _, open_st = self._open_stateid(ctx, open_sid)
                lk = self.state.lock_state(open_st, owner)
            else:
                sid = ctx.cur_sid if lock_sid.is_current and ctx.cur_sid else lock_sid
                found = self.state.find(sid, client)
                if not isinstance(found, LockState) or found.fh != ref.handle:
                    raise Nfs4Error(Stat.BAD_STATEID, "not a lock stateid of this file")
                lk = found
            need = OPEN4_SHARE_ACCESS_WRITE if locktype in (WRITE_LT, WRITEW_LT) \
                else OPEN4_SHARE_ACCESS_READ
            if not lk.access & need:
                raise Nfs4Error(Stat.OPENMODE)
            try:
                new = self.state.lock(lk, locktype, start, end, self.clock())
            except LockConflict as exc:
                ctx.extra["denied"] = self._denied_body(exc.denied)
                raise Nfs4Error(Stat.DENIED) from None
        ctx.cur_sid = new
        p = Packer()
        new.pack(p)
        return p.getvalue()

    def _lockt(self, ctx: OpCtx, u: Unpacker) -> bytes:
        locktype = u.enum()
        offset = u.uhyper()
        length = u.uhyper()
        u.uhyper()
        owner = u.opaque(NFS4_OPAQUE_LIMIT)
        ref, start, end = self._lock_target(ctx, locktype, offset, length)
        client = ctx.client
        assert client is not None
        with self._lock:
            denied = self.state.test_lock(ref.handle, client, owner, locktype, start, end,
                                          self.clock())
        if denied is not None:
            ctx.extra["denied"] = self._denied_body(denied)
            raise Nfs4Error(Stat.DENIED)
        return b""

    def _locku(self, ctx: OpCtx, u: Unpacker) -> bytes:
        locktype = u.enum()
        u.uint()
        sid = StateId.unpack(u)
        offset = u.uhyper()
        length = u.uhyper()
        ref, start, end = self._lock_target(ctx, locktype, offset, length)
        if sid.is_current:
            sid = ctx.cur_sid or _raise(Stat.BAD_STATEID)
        with self._lock:
            lk = self.state.find(sid, ctx.client)
            if not isinstance(lk, LockState) or lk.fh != ref.handle:
                raise Nfs4Error(Stat.BAD_STATEID, "not a lock stateid of this file")
            new = self.state.unlock(lk, start, end)
        ctx.cur_sid = new
        p = Packer()
        new.pack(p)
        return p.getvalue()

    # ------------------------------------------------------------------ open state

    def _open(self, ctx: OpCtx, u: Unpacker) -> bytes:
        u.uint()  # seqid: ignored in v4.1
        share_access = u.uint()
        deny = u.uint()
        u.uhyper()  # open owner's clientid: the session's client is the owner's
        owner = u.opaque(NFS4_OPAQUE_LIMIT)
        opentype = u.enum()
        how = None
        attrs: DecodedAttrs | None = None
        verifier = None
        if opentype == OPEN4_CREATE:
            how = u.enum()
            if how in (UNCHECKED4, GUARDED4):
                attrs = decode_settable(u)
            elif how == EXCLUSIVE4:
                verifier = u.fopaque(NFS4_VERIFIER_SIZE)
            elif how == EXCLUSIVE4_1:
                verifier = u.fopaque(NFS4_VERIFIER_SIZE)
                attrs = decode_settable(u)
                if attrs.bits - EXCLCREAT:
                    raise Nfs4Error(Stat.INVAL, "attributes not allowed with EXCLUSIVE4_1")
            else:
                raise XdrError(f"createmode4 {how}")
        elif opentype != OPEN4_NOCREATE:
            raise XdrError(f"opentype4 {opentype}")
        claim = u.enum()
        name = None
        if claim in (CLAIM_NULL, CLAIM_DELEGATE_PREV):
            name = u.string(NFS4_OPAQUE_LIMIT)
        elif claim == CLAIM_PREVIOUS:
            u.enum()
        elif claim == CLAIM_DELEGATE_CUR:
            StateId.unpack(u)
            u.string(NFS4_OPAQUE_LIMIT)
        elif claim == CLAIM_DELEG_CUR_FH:
            StateId.unpack(u)
        elif claim not in (CLAIM_FH, CLAIM_DELEG_PREV_FH):
            raise XdrError(f"open_claim_type4 {claim}")
        access = share_access & 0xFF
        want = share_access & OPEN4_SHARE_ACCESS_WANT_DELEG_MASK
        if access not in (1, 2, 3) or deny > 3 or share_access & ~0x3FFFF:
            raise Nfs4Error(Stat.INVAL, "bad share access/deny")
        ref = ctx.fh()
        if claim in (CLAIM_PREVIOUS, CLAIM_DELEGATE_PREV, CLAIM_DELEG_PREV_FH):
            raise Nfs4Error(Stat.NO_GRACE, "no grace period: nothing to reclaim")
        if claim in (CLAIM_DELEGATE_CUR, CLAIM_DELEG_CUR_FH):
            raise Nfs4Error(Stat.BAD_STATEID, "no delegations are granted")
        client = ctx.client
        assert client is not None
        if not client.reclaim_complete:
            # RFC 8881 18.51.3: no new locking state before the client's RECLAIM_COMPLETE
            raise Nfs4Error(Stat.GRACE, "RECLAIM_COMPLETE must come before OPEN")
        created = False
        attrset: frozenset[int] = frozenset()
        before = after = 0
        if claim == CLAIM_FH:
            if opentype == OPEN4_CREATE:
                raise Nfs4Error(Stat.INVAL, "CLAIM_FH cannot create")
            fref = ref
            if fref.fs is None:
                raise Nfs4Error(Stat.ISDIR)
            fattr = fref.fs.getattr(fref.handle)
        else:
            assert name is not None
            dref = self._dir(ctx)
            check_name(name)
            if dref.fs is None:
                if opentype == OPEN4_CREATE:
                    raise Nfs4Error(Stat.ROFS)
                self._child(ctx, dref, name)
                raise Nfs4Error(Stat.ISDIR)
            fs = dref.fs
            cred = self._cred_for(ctx, dref)
            before = fs.getattr(dref.handle).change
            existing: tuple[bytes, Attr] | None
            try:
                existing = fs.lookup(cred, dref.handle, name)
            except FsError as exc:
                if exc.errno != FsErrno.NOENT:
                    raise
                existing = None
            if existing is not None and existing[1].type == FileType.DIR:
                raise Nfs4Error(Stat.ISDIR)
            if opentype == OPEN4_CREATE:
                if fs.read_only:
                    raise Nfs4Error(Stat.ROFS)
                if how == GUARDED4 and existing is not None:
                    raise Nfs4Error(Stat.EXIST)
                if how in (EXCLUSIVE4, EXCLUSIVE4_1):
                    handle, fattr = fs.create(cred, dref.handle, name, CreateMode.EXCLUSIVE,
                                              verifier=verifier)
                    created = existing is None
                    if attrs is not None and attrs.bits and created:
                        fattr = fs.setattr(cred, handle, attrs.changes)
                        attrset = attrs.bits
                elif existing is None:
                    mode = CreateMode.GUARDED if how == GUARDED4 else CreateMode.UNCHECKED
                    handle, fattr = fs.create(cred, dref.handle, name, mode,
                                              attrs=attrs.changes if attrs else None)
                    created = True
                    attrset = attrs.bits if attrs else frozenset()
                else:
                    handle, fattr = existing
                    if attrs is not None and attrs.changes.size is not None:
                        self._need(fs, cred, handle, OPEN4_SHARE_ACCESS_WRITE)
                        fattr = fs.setattr(cred, handle, SetAttr(size=attrs.changes.size))
                        attrset = frozenset({int(A.SIZE)})
            else:
                if existing is None:
                    raise Nfs4Error(Stat.NOENT)
                handle, fattr = existing
            after = fs.getattr(dref.handle).change
            fref = FhRef(handle, fs, dref.opts, None, dref.export)
        if fattr.type == FileType.DIR:
            raise Nfs4Error(Stat.ISDIR)
        assert fref.fs is not None
        if access & OPEN4_SHARE_ACCESS_WRITE and fref.fs.read_only:
            raise Nfs4Error(Stat.ROFS)
        if not created:
            self._need(fref.fs, self._cred_for(ctx, fref), fref.handle, access)
        with self._lock:
            st = self.state.open(client, owner, fref.handle, access, deny, self.clock())
            sid = st.stateid()
        ctx.cur = fref
        ctx.cur_sid = sid
        p = Packer()
        sid.pack(p)
        pack_change_info(p, before, after)
        p.uint(0)  # rflags
        bitmap_encode(p, sorted(attrset))
        if want:  # the client said what it wants: say why it gets no delegation
            p.enum(OPEN_DELEGATE_NONE_EXT)
            p.enum(WND4_NOT_WANTED if want == OPEN4_SHARE_ACCESS_WANT_NO_DELEG
                   else WND4_CANCELLED if want == OPEN4_SHARE_ACCESS_WANT_CANCEL
                   else WND4_NOT_SUPP_FTYPE)
        else:
            p.enum(OPEN_DELEGATE_NONE)
        return p.getvalue()

    @staticmethod
    def _need(fs: FileSystem, cred: Cred, handle: bytes, access: int) -> None:
        need = (ACCESS_READ if access & OPEN4_SHARE_ACCESS_READ else 0) | \
            (ACCESS_MODIFY if access & OPEN4_SHARE_ACCESS_WRITE else 0)
        if fs.access(cred, handle, need) != need:
            raise Nfs4Error(Stat.ACCESS)

    def _open_stateid(self, ctx: OpCtx, sid: StateId) -> tuple[FhRef, OpenState]:
        ref = ctx.fh()
        if sid.is_current:
            sid = ctx.cur_sid or _raise(Stat.BAD_STATEID)
        if sid.is_anonymous or sid.is_bypass:
            raise Nfs4Error(Stat.BAD_STATEID)
        st = self.state.find(sid, ctx.client)
        if not isinstance(st, OpenState):
            raise Nfs4Error(Stat.BAD_STATEID, "not an open stateid")
        if st.fh != ref.handle:
            raise Nfs4Error(Stat.BAD_STATEID, "stateid of another file")
        return ref, st

    def _close(self, ctx: OpCtx, u: Unpacker) -> bytes:
        u.uint()
        sid = StateId.unpack(u)
        with self._lock:
            _, st = self._open_stateid(ctx, sid)
            self.state.close(st)
        ctx.cur_sid = INVALID_STATEID
        p = Packer()
        INVALID_STATEID.pack(p)
        return p.getvalue()

    def _open_downgrade(self, ctx: OpCtx, u: Unpacker) -> bytes:
        sid = StateId.unpack(u)
        u.uint()
        access = u.uint() & 0xFF
        deny = u.uint()
        with self._lock:
            _, st = self._open_stateid(ctx, sid)
            new = self.state.downgrade(st, access, deny).stateid()
        ctx.cur_sid = new
        p = Packer()
        new.pack(p)
        return p.getvalue()


def _skip_cb_sec(u: Unpacker) -> None:
    flavor = u.uint()
    if flavor == AuthFlavor.AUTH_SYS:
        u.uint()
        u.string(255)
        u.uint()
        u.uint()
        u.array(u.uint, max_items=16)
    elif flavor == AuthFlavor.RPCSEC_GSS:
        u.enum()
        u.opaque()
        u.opaque()
    elif flavor != AuthFlavor.AUTH_NONE:
        raise XdrError(f"callback flavor {flavor}")


def _error_body(op: Op) -> bytes:
    """What follows a failed status: SETATTR's empty attrsset; nothing for the rest."""
    return b"\0\0\0\0" if op == Op.SETATTR else b""


def _resop(op: Op, stat: Stat, body: bytes | Parts) -> bytes | Parts:
    p = Packer()
    p.uint(int(op))
    p.enum(stat)
    if isinstance(body, list):
        return [p.getvalue(), *body]
    p.raw(body)
    return p.getvalue()


def _size(res: bytes | Parts) -> int:
    return sum(len(b) for b in res) if isinstance(res, list) else len(res)


def _compound_reply(status: Stat, tag: bytes, results: list[bytes | Parts]) -> bytes | Parts:
    """COMPOUND4res: one bytes object, or buffers when a large piece (READ data) is in it."""
    p = Packer()
    p.enum(status)
    p.opaque(tag)
    p.uint(len(results))
    if not any(isinstance(r, list) for r in results):
        for r in results:
            p.raw(r)  # type: ignore[arg-type]
        return p.getvalue()
    out: Parts = []
    small = bytearray(p.getvalue())
    for r in results:
        for piece in (r if isinstance(r, list) else [r]):
            if len(piece) >= 64 * 1024:
                out.append(bytes(small))
                out.append(piece)
                small = bytearray()
            else:
                small += piece
    if small:
        out.append(bytes(small))
    return out
