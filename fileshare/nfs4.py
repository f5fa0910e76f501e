"""NFS v4.1 (RFC 8881) over the share :class:`~fileshare.fs.FileSystem`: the COMPOUND procedure.

:class:`Nfs4Program` answers RPC program 100003 version 4: NULL and COMPOUND. Only minor
version 1 is served; COMPOUNDs of minor versions 0 and 2 get NFS4ERR_MINOR_VERS_MISMATCH.

The name space the client sees (RFC 8881 7.3): a read-only pseudo file system whose
directories are the components of the export paths (``/share1``, ``/a/b``); looking up an
export's last component crosses into that share's root. Pseudo handles start with
:data:`PSEUDO_PREFIX`; every other handle is the share's own, found with
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
- No delegations are ever granted (OPEN_DELEGATE_NONE), no back channel is used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fileshare.fs import (
    ACCESS_DELETE,
    ACCESS_EXECUTE,
    ACCESS_EXTEND,
    ACCESS_LOOKUP,
    ACCESS_MODIFY,
    ACCESS_READ,
    Attr,
    CreateMode,
    Cred,
    ExportOptions,
    Exports,
    FileSystem,
    FileType,
    FsErrno,
    FsError,
    SetAttr,
)
from fileshare.nfs4state import (
    MAX_OPS,
    MAX_SLOTS,
    RANGE_END,
    READ_LT,
    READW_LT,
    WRITE_LT,
    WRITEW_LT,
    Client,
    LockConflict,
    LockDenied,
    LockState,
    OpenState,
    Session,
    Slot,
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
    FILE_SYNC4,
    GUARDED4,
    INVALID_STATEID,
    MAX_FILE_SIZE,
    MAX_NAME,
    NF4BLK,
    NF4CHR,
    NF4DIR,
    NF4LNK,
    NFS4_FHSIZE,
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
    SECINFO_STYLE4_CURRENT_FH,
    SECINFO_STYLE4_PARENT,
    SP4_NONE,
    SUPPORTED,
    UNCHECKED4,
    UNSTABLE4,
    WND4_CANCELLED,
    WND4_NOT_WANTED,
    WND4_NOT_SUPP_FTYPE,
    WRITE_ONLY,
    A,
    AttrError,
    AttrSource,
    ChannelAttrs,
    DecodedAttrs,
    Op,
    Stat,
    StateId,
    bitmap_decode,
    bitmap_encode,
    decode_settable,
    encode_fattr,
    fattr_bytes,
    pack_change_info,
    pack_time,
)
from fileshare.rpc import AcceptStat, AuthError, AuthFlavor, AuthStat, RpcCall, RpcError
from fileshare.xdr import Packer, Unpacker, XdrError

log = logging.getLogger(__name__)

NFS_PROGRAM = 100003
NFS_V4 = 4
MINOR_VERSION = 1
PSEUDO_PREFIX = b"\x00vtl-nfs4-pseudo\x00"
PSEUDO_FSID = (0xFFFFFFFF, 0xFFFFFFFF)
DEFAULT_MAXIO = 1 << 20
MAX_COMPOUND_OPS = 1024
CDFC4_FORE, CDFC4_BACK, CDFC4_FORE_OR_BOTH, CDFC4_BACK_OR_BOTH = 1, 2, 3, 7
CDFS4_FORE, CDFS4_BACK, CDFS4_BOTH = 1, 2, 3
RPC_REPLY_HEADER = 24  # xid, REPLY, MSG_ACCEPTED, AUTH_NONE verifier, SUCCESS
ACCESS4_ALL = (ACCESS_READ | ACCESS_LOOKUP | ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE
               | ACCESS_EXECUTE)
CACHE_SMALL_REPLY = 16 * 1024
"""Replies up to this size are kept in the slot even when the client did not ask (sa_cachethis
false), so a retransmitted small request is answered rather than refused."""

_SESSIONLESS = frozenset({Op.EXCHANGE_ID, Op.CREATE_SESSION, Op.DESTROY_SESSION,
                          Op.DESTROY_CLIENTID, Op.BIND_CONN_TO_SESSION})

_FS_TO_NFS4 = {
    FsErrno.NOT_SYNC: Stat.NOT_SAME,
    FsErrno.JUKEBOX: Stat.DELAY,
}


class Nfs4Error(Exception):
    def __init__(self, stat: Stat, message: str = "") -> None:
        super().__init__(message or stat.name)
        self.stat = stat


def fs_status(exc: FsError) -> Stat:
    """nfsstat4 for a file system error (the numbers agree with NFS v3 but for a few)."""
    mapped = _FS_TO_NFS4.get(exc.errno)
    if mapped is not None:
        return mapped
    try:
        return Stat(int(exc.errno))
    except ValueError:
        return Stat.SERVERFAULT


@dataclass(frozen=True, slots=True)
class FhRef:
    """A resolved current/saved file handle: a share object or a pseudo directory."""

    handle: bytes
    fs: FileSystem | None = None
    opts: ExportOptions | None = None
    pseudo: str | None = None  # the pseudo path ("/", "/a") for pseudo directories
    export: str = ""  # the share's export path, for share objects


@dataclass
class _Ctx:
    call: RpcCall
    cred: Cred
    session: Session | None = None
    slot: Slot | None = None
    cachethis: bool = False
    cur: FhRef | None = None
    saved: FhRef | None = None
    cur_sid: StateId | None = None
    saved_sid: StateId | None = None
    nops: int = 0
    index: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def client(self) -> Client | None:
        return self.session.client if self.session else None

    def fh(self) -> FhRef:
        if self.cur is None:
            raise Nfs4Error(Stat.NOFILEHANDLE)
        return self.cur


def _principal(call: RpcCall) -> tuple[object, ...]:
    if call.cred is not None:
        return (int(call.flavor), call.cred.uid)
    return (int(call.flavor),)


def _utf8(raw: bytes) -> bool:
    """Valid UTF-8 of characters (no noncharacters U+FFFE/U+FFFF), as names and tags must be."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return "\ufffe" not in text and "\uffff" not in text


def check_name(name: str) -> str:
    """A component4 as LOOKUP/OPEN/CREATE/REMOVE/RENAME take it (RFC 8881 14.5)."""
    raw = name.encode("utf-8", "surrogateescape")
    if not raw:
        raise Nfs4Error(Stat.INVAL, "empty name")
    if len(raw) > MAX_NAME:
        raise Nfs4Error(Stat.NAMETOOLONG)
    if not _utf8(raw):
        raise Nfs4Error(Stat.INVAL, "name is not UTF-8")
    if name in (".", ".."):
        raise Nfs4Error(Stat.BADNAME)
    if "/" in name or "\0" in name:
        raise Nfs4Error(Stat.BADCHAR)
    return name


class Nfs4Program:
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
        self._ops: dict[int, Callable[[_Ctx, Unpacker], bytes]] = {
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
            Op.LOCK: self._op_lock, Op.LOCKT: self._lockt, Op.LOCKU: self._locku,
        }

    # ------------------------------------------------------------------ RPC entry

    def handle(self, call: RpcCall) -> bytes:
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

    def compound(self, call: RpcCall) -> bytes:
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
        if not _utf8(tag):
            return _compound_reply(Stat.INVAL, tag, [])
        if nops > MAX_COMPOUND_OPS or nops * 4 > u.remaining():
            raise RpcError(AcceptStat.GARBAGE_ARGS, message=f"{nops} operations")
        ctx = _Ctx(call, cred, nops=nops)
        results: list[bytes] = []
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
                size += len(res)
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
            keep = ctx.cachethis or len(reply) <= CACHE_SMALL_REPLY
            with self._lock:
                self.state.finish_slot(ctx.slot, reply if keep else None)
        return reply

    @staticmethod
    def _reply_limit(ctx: _Ctx, size: int) -> Stat | None:
        """REP_TOO_BIG / REP_TOO_BIG_TO_CACHE once the reply outgrows the session's limits."""
        assert ctx.session is not None
        fore = ctx.session.fore
        if size > fore.maxresponsesize:
            return Stat.REP_TOO_BIG
        if ctx.cachethis and size > fore.maxresponsesize_cached:
            return Stat.REP_TOO_BIG_TO_CACHE
        return None

    def _one(self, ctx: _Ctx, opnum: int, u: Unpacker, i: int, nops: int
             ) -> tuple[Stat, bytes, bytes | None]:
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

    # ------------------------------------------------------------------ helpers

    def _pseudo_tree(self) -> tuple[dict[str, FhRef], set[str]]:
        """(export path -> share root ref, pseudo directory paths)."""
        shares: dict[str, FhRef] = {}
        dirs = {"/"}
        for path, fs, opts in self.exports.exports():
            norm = "/" + "/".join(p for p in path.split("/") if p)
            shares[norm] = FhRef(fs.root_handle(), fs, opts, None, norm)
            parts = [p for p in norm.split("/") if p]
            for k in range(len(parts)):
                dirs.add("/" + "/".join(parts[:k]))
        return shares, dirs

    def _pseudo_ref(self, ctx: _Ctx, path: str) -> FhRef:
        """The pseudo directory at ``path``, or the share exported there."""
        shares, _ = self._pseudo_tree()
        if path in shares:
            return self._enter(ctx, shares[path])
        return self._pseudo_dir(path)

    def _enter(self, ctx: _Ctx, ref: FhRef) -> FhRef:
        if not self._allowed(ctx, ref):
            raise Nfs4Error(Stat.ACCESS, "client not allowed by the share")
        return ref

    def _resolve(self, ctx: _Ctx, handle: bytes) -> FhRef:
        if handle.startswith(PSEUDO_PREFIX):
            path = handle[len(PSEUDO_PREFIX):].decode("utf-8", "surrogateescape")
            _, dirs = self._pseudo_tree()
            if path not in dirs:
                raise Nfs4Error(Stat.STALE)
            return self._pseudo_ref(ctx, path)
        found = self.exports.by_handle(handle)
        if found is None:
            raise Nfs4Error(Stat.BADHANDLE)
        fs, opts = found
        if not self.exports.allowed(opts, ctx.call.client_host):
            raise Nfs4Error(Stat.ACCESS, "client not allowed by the share")
        try:
            fs.getattr(handle)  # STALE / BADHANDLE now rather than later
        except FsError as exc:
            # a file removed while open keeps its handle for CLOSE (RFC 8881 18.20)
            with self._lock:
                if exc.errno != FsErrno.STALE or handle not in self.state.by_file:
                    raise
        export = next((p for p, f, _ in self.exports.exports() if f is fs), "")
        return FhRef(handle, fs, opts, None, "/" + "/".join(x for x in export.split("/") if x))

    def _cred_for(self, ctx: _Ctx, ref: FhRef) -> Cred:
        if ref.opts is None:
            return ctx.cred
        if ctx.call.flavor == AuthFlavor.AUTH_NONE:
            return Cred(ref.opts.anon_uid, ref.opts.anon_gid)
        return self.exports.squash(ref.opts, ctx.cred)

    def _pseudo_attr(self, path: str) -> Attr:
        digest = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest()
        fileid = int.from_bytes(digest, "big") | (1 << 63)
        if path == "/":
            fileid = 1 << 63
        return Attr(FileType.DIR, 0o555, 2, 0, 0, 4096, 4096, 0, fileid, self.boot_ns,
                    self.boot_ns, self.boot_ns, self.boot_ns)

    def _attr(self, ref: FhRef) -> Attr:
        if ref.fs is None:
            return self._pseudo_attr(ref.pseudo or "/")
        return ref.fs.getattr(ref.handle)

    def _source(self, ref: FhRef, attr: Attr | None = None) -> AttrSource:
        attr = attr or self._attr(ref)
        if ref.fs is None:
            return AttrSource(attr, ref.handle, PSEUDO_FSID, self.lease_time, self.maxio,
                              self.maxio, attr.fileid)
        fs = ref.fs
        mounted_on = attr.fileid
        if ref.handle == fs.root_handle() and ref.export not in ("", "/"):
            mounted_on = self._pseudo_attr(ref.export).fileid

        def stat() -> tuple[int, int, int, int, int, int]:
            s = fs.fsstat()
            return (s.total_bytes, s.free_bytes, s.avail_bytes, s.total_files, s.free_files,
                    s.avail_files)

        return AttrSource(attr, ref.handle, (fs.fsid, 0), self.lease_time, self.maxio,
                          self.maxio, mounted_on, stat)

    def _dir(self, ctx: _Ctx) -> FhRef:
        ref = ctx.fh()
        if ref.fs is not None and self._attr(ref).type != FileType.DIR:
            raise Nfs4Error(Stat.NOTDIR)
        return ref

    def _share_dir(self, ctx: _Ctx) -> tuple[FhRef, FileSystem]:
        """The current fh as a share directory a mutation may touch."""
        ref = self._dir(ctx)
        if ref.fs is None:
            raise Nfs4Error(Stat.ROFS, "the pseudo file system is read-only")
        return ref, ref.fs

    def _child(self, ctx: _Ctx, ref: FhRef, name: str) -> FhRef:
        if ref.fs is None:
            path = (ref.pseudo or "/").rstrip("/") + "/" + name
            shares, dirs = self._pseudo_tree()
            if path in shares:
                return self._enter(ctx, shares[path])
            if path in dirs:
                return self._pseudo_dir(path)
            raise Nfs4Error(Stat.NOENT)
        handle, _ = ref.fs.lookup(self._cred_for(ctx, ref), ref.handle, name)
        return FhRef(handle, ref.fs, ref.opts, None, ref.export)

    def _allowed(self, ctx: _Ctx, ref: FhRef) -> bool:
        return ref.opts is not None and self.exports.allowed(ref.opts, ctx.call.client_host)

    def _stateid(self, ctx: _Ctx, sid: StateId, ref: FhRef, write: bool) -> None:
        """Check a READ/WRITE/SETATTR stateid against the current file (RFC 8881 8.2.2)."""
        if sid.is_current:
            if ctx.cur_sid is None:
                raise Nfs4Error(Stat.BAD_STATEID)
            sid = ctx.cur_sid
        with self._lock:
            if sid.is_anonymous or sid.is_bypass:
                if write and self.state.denied(ref.handle, OPEN4_SHARE_ACCESS_WRITE):
                    raise Nfs4Error(Stat.LOCKED)
                return
            st = self.state.find(sid, ctx.client)
        if st.fh != ref.handle:
            raise Nfs4Error(Stat.BAD_STATEID, "stateid of another file")
        if write and not st.access & OPEN4_SHARE_ACCESS_WRITE:
            raise Nfs4Error(Stat.OPENMODE)

    # ------------------------------------------------------------------ session operations

    def _exchange_id(self, ctx: _Ctx, u: Unpacker) -> bytes:
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

    def _create_session(self, ctx: _Ctx, u: Unpacker) -> bytes:
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

    def _sequence(self, ctx: _Ctx, u: Unpacker) -> tuple[Stat, bytes, bytes | None]:
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

    def _destroy_session(self, ctx: _Ctx, u: Unpacker) -> bytes:
        sessionid = u.fopaque(NFS4_SESSIONID_SIZE)
        with self._lock:
            if ctx.session is not None and ctx.session.sessionid == sessionid \
                    and ctx.index != ctx.nops - 1:
                raise Nfs4Error(Stat.NOT_ONLY_OP, "DESTROY_SESSION of its own session not last")
            self.state.destroy_session(sessionid)
        return b""

    def _bind_conn_to_session(self, ctx: _Ctx, u: Unpacker) -> bytes:
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

    def _destroy_clientid(self, ctx: _Ctx, u: Unpacker) -> bytes:
        clientid = u.uhyper()
        with self._lock:
            self.state.destroy_clientid(clientid)
        return b""

    def _reclaim_complete(self, ctx: _Ctx, u: Unpacker) -> bytes:
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

    def _test_stateid(self, ctx: _Ctx, u: Unpacker) -> bytes:
        sids = u.array(lambda: StateId.unpack(u), max_items=1024)
        p = Packer()
        with self._lock:
            p.array([self.state.status(s, ctx.client) for s in sids], p.enum)
        return p.getvalue()

    def _free_stateid(self, ctx: _Ctx, u: Unpacker) -> bytes:
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

    def _lock_file(self, ctx: _Ctx) -> FhRef:
        ref = ctx.fh()
        if ref.fs is None or self._attr(ref).type == FileType.DIR:
            raise Nfs4Error(Stat.ISDIR)
        return ref

    def _op_lock(self, ctx: _Ctx, u: Unpacker) -> bytes:
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
        if locktype not in (READ_LT, WRITE_LT, READW_LT, WRITEW_LT):
            raise Nfs4Error(Stat.INVAL, f"lock type {locktype}")
        ref = self._lock_file(ctx)
        start, end = self._range(offset, length)
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

    def _lockt(self, ctx: _Ctx, u: Unpacker) -> bytes:
        locktype = u.enum()
        offset = u.uhyper()
        length = u.uhyper()
        u.uhyper()
        owner = u.opaque(NFS4_OPAQUE_LIMIT)
        if locktype not in (READ_LT, WRITE_LT, READW_LT, WRITEW_LT):
            raise Nfs4Error(Stat.INVAL, f"lock type {locktype}")
        ref = self._lock_file(ctx)
        start, end = self._range(offset, length)
        client = ctx.client
        assert client is not None
        with self._lock:
            denied = self.state.test_lock(ref.handle, client, owner, locktype, start, end,
                                          self.clock())
        if denied is not None:
            ctx.extra["denied"] = self._denied_body(denied)
            raise Nfs4Error(Stat.DENIED)
        return b""

    def _locku(self, ctx: _Ctx, u: Unpacker) -> bytes:
        locktype = u.enum()
        u.uint()
        sid = StateId.unpack(u)
        offset = u.uhyper()
        length = u.uhyper()
        if locktype not in (READ_LT, WRITE_LT, READW_LT, WRITEW_LT):
            raise Nfs4Error(Stat.INVAL, f"lock type {locktype}")
        ref = self._lock_file(ctx)
        start, end = self._range(offset, length)
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

    # ------------------------------------------------------------------ file handles

    def _putrootfh(self, ctx: _Ctx, u: Unpacker) -> bytes:
        ctx.cur = self._pseudo_ref(ctx, "/")
        ctx.cur_sid = None
        return b""

    def _putfh(self, ctx: _Ctx, u: Unpacker) -> bytes:
        handle = u.opaque(NFS4_FHSIZE)
        if not handle:
            raise Nfs4Error(Stat.BADHANDLE)
        ctx.cur = self._resolve(ctx, handle)
        ctx.cur_sid = None
        return b""

    def _getfh(self, ctx: _Ctx, u: Unpacker) -> bytes:
        p = Packer()
        p.opaque(ctx.fh().handle)
        return p.getvalue()

    def _savefh(self, ctx: _Ctx, u: Unpacker) -> bytes:
        ctx.saved = ctx.fh()
        ctx.saved_sid = ctx.cur_sid
        return b""

    def _restorefh(self, ctx: _Ctx, u: Unpacker) -> bytes:
        if ctx.saved is None:
            raise Nfs4Error(Stat.RESTOREFH)
        ctx.cur = ctx.saved
        ctx.cur_sid = ctx.saved_sid
        return b""

    def _lookup(self, ctx: _Ctx, u: Unpacker) -> bytes:
        name = u.string(NFS4_OPAQUE_LIMIT)
        ref = self._dir(ctx)
        if name == ".":
            # NFS v4 gives "." no meaning (Linux answers BADNAME); nfs-rs looks it up to list
            # the export root, so it names the directory itself here, as in NFS v3
            return b""
        ctx.cur = self._child(ctx, ref, check_name(name))
        return b""

    def _lookupp(self, ctx: _Ctx, u: Unpacker) -> bytes:
        ctx.cur = self._parent(ctx, self._dir(ctx))
        return b""

    def _parent(self, ctx: _Ctx, ref: FhRef) -> FhRef:
        if ref.fs is None:
            path = ref.pseudo or "/"
            if path == "/":
                raise Nfs4Error(Stat.NOENT, "the root has no parent")
            return self._pseudo_dir(path.rsplit("/", 1)[0] or "/")
        if ref.handle == ref.fs.root_handle():
            if ref.export in ("", "/"):
                raise Nfs4Error(Stat.NOENT, "the root has no parent")
            return self._pseudo_dir(ref.export.rsplit("/", 1)[0] or "/")
        handle, _ = ref.fs.lookup(self._cred_for(ctx, ref), ref.handle, "..")
        return FhRef(handle, ref.fs, ref.opts, None, ref.export)

    @staticmethod
    def _pseudo_dir(path: str) -> FhRef:
        return FhRef(PSEUDO_PREFIX + path.encode("utf-8", "surrogateescape"), pseudo=path)

    def _secinfo_list(self) -> bytes:
        p = Packer()
        p.array([int(AuthFlavor.AUTH_SYS)], p.uint)
        return p.getvalue()

    def _secinfo(self, ctx: _Ctx, u: Unpacker) -> bytes:
        name = u.string(NFS4_OPAQUE_LIMIT)
        ref = self._dir(ctx)
        self._child(ctx, ref, check_name(name))
        ctx.cur = None
        return self._secinfo_list()

    def _secinfo_no_name(self, ctx: _Ctx, u: Unpacker) -> bytes:
        style = u.enum()
        ref = ctx.fh()
        if style == SECINFO_STYLE4_PARENT:
            self._parent(ctx, self._dir(ctx))
        elif style != SECINFO_STYLE4_CURRENT_FH:
            raise Nfs4Error(Stat.INVAL, f"secinfo style {style}")
        del ref
        ctx.cur = None
        return self._secinfo_list()

    # ------------------------------------------------------------------ attributes

    def _getattr(self, ctx: _Ctx, u: Unpacker) -> bytes:
        bits = bitmap_decode(u)
        ref = ctx.fh()
        if bits & WRITE_ONLY:
            raise Nfs4Error(Stat.INVAL, "write-only attribute requested")
        return fattr_bytes(self._source(ref), bits)

    def _verify_common(self, ctx: _Ctx, u: Unpacker) -> bool:
        bits = bitmap_decode(u)
        theirs = u.opaque()
        ref = ctx.fh()
        if bits - SUPPORTED:
            raise Nfs4Error(Stat.ATTRNOTSUPP)
        if bits & WRITE_ONLY or A.RDATTR_ERROR in bits:
            raise Nfs4Error(Stat.INVAL)
        ours = Unpacker(fattr_bytes(self._source(ref), bits))
        bitmap_decode(ours)
        return ours.opaque() == theirs

    def _verify(self, ctx: _Ctx, u: Unpacker) -> bytes:
        if not self._verify_common(ctx, u):
            raise Nfs4Error(Stat.NOT_SAME)
        return b""

    def _nverify(self, ctx: _Ctx, u: Unpacker) -> bytes:
        if self._verify_common(ctx, u):
            raise Nfs4Error(Stat.SAME)
        return b""

    def _setattr(self, ctx: _Ctx, u: Unpacker) -> bytes:
        sid = StateId.unpack(u)
        attrs = decode_settable(u)
        ref = ctx.fh()
        if ref.fs is None:
            raise Nfs4Error(Stat.ROFS)
        if attrs.changes.size is not None:
            if self._attr(ref).type == FileType.DIR:
                raise Nfs4Error(Stat.ISDIR)
            if attrs.changes.size > MAX_FILE_SIZE:
                raise Nfs4Error(Stat.FBIG)
            self._stateid(ctx, sid, ref, write=True)
        if attrs.bits:
            ref.fs.setattr(self._cred_for(ctx, ref), ref.handle, attrs.changes)
        p = Packer()
        bitmap_encode(p, sorted(attrs.bits))
        return p.getvalue()

    def _access(self, ctx: _Ctx, u: Unpacker) -> bytes:
        requested = u.uint()
        ref = ctx.fh()
        if requested & ~ACCESS4_ALL:
            raise Nfs4Error(Stat.INVAL, f"unknown access bits {requested:#x}")
        if ref.fs is None:
            granted = requested & (ACCESS_READ | ACCESS_LOOKUP | ACCESS_EXECUTE)
        else:
            granted = ref.fs.access(self._cred_for(ctx, ref), ref.handle, requested)
        p = Packer()
        p.uint(requested)
        p.uint(granted & requested)
        return p.getvalue()

    # ------------------------------------------------------------------ open state

    def _open(self, ctx: _Ctx, u: Unpacker) -> bytes:
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

    def _open_stateid(self, ctx: _Ctx, sid: StateId) -> tuple[FhRef, OpenState]:
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

    def _close(self, ctx: _Ctx, u: Unpacker) -> bytes:
        u.uint()
        sid = StateId.unpack(u)
        with self._lock:
            _, st = self._open_stateid(ctx, sid)
            self.state.close(st)
        ctx.cur_sid = INVALID_STATEID
        p = Packer()
        INVALID_STATEID.pack(p)
        return p.getvalue()

    def _open_downgrade(self, ctx: _Ctx, u: Unpacker) -> bytes:
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

    # ------------------------------------------------------------------ data

    def _file(self, ctx: _Ctx) -> tuple[FhRef, FileSystem]:
        ref = ctx.fh()
        if ref.fs is None:
            raise Nfs4Error(Stat.ISDIR)
        return ref, ref.fs

    def _read(self, ctx: _Ctx, u: Unpacker) -> bytes:
        sid = StateId.unpack(u)
        offset = u.uhyper()
        count = u.uint()
        ref, fs = self._file(ctx)
        if fs.getattr(ref.handle).type == FileType.DIR:
            raise Nfs4Error(Stat.ISDIR)
        self._stateid(ctx, sid, ref, write=False)
        count = min(count, self.maxio)
        if ctx.session is not None:
            count = min(count, max(0, ctx.session.fore.maxresponsesize - 256))
        data, eof = fs.read(self._cred_for(ctx, ref), ref.handle, offset, count)
        p = Packer()
        p.bool(eof)
        p.opaque(data)
        return p.getvalue()

    def _write(self, ctx: _Ctx, u: Unpacker) -> bytes:
        sid = StateId.unpack(u)
        offset = u.uhyper()
        stable = u.enum()
        data = u.opaque(self.maxio + 64 * 1024)
        if stable not in (0, 1, 2):
            raise XdrError(f"stable_how4 {stable}")
        ref, fs = self._file(ctx)
        if fs.getattr(ref.handle).type == FileType.DIR:
            raise Nfs4Error(Stat.ISDIR)
        if offset + len(data) > MAX_FILE_SIZE:
            raise Nfs4Error(Stat.FBIG)
        self._stateid(ctx, sid, ref, write=True)
        count, synced, _ = fs.write(self._cred_for(ctx, ref), ref.handle, offset, data,
                                    stable != UNSTABLE4)
        p = Packer()
        p.uint(count)
        p.enum(FILE_SYNC4 if synced else UNSTABLE4)
        p.fopaque(fs.write_verifier, NFS4_VERIFIER_SIZE)
        return p.getvalue()

    def _commit(self, ctx: _Ctx, u: Unpacker) -> bytes:
        u.uhyper()
        u.uint()
        ref, fs = self._file(ctx)
        if fs.getattr(ref.handle).type == FileType.DIR:
            raise Nfs4Error(Stat.ISDIR)
        fs.commit(self._cred_for(ctx, ref), ref.handle)
        p = Packer()
        p.fopaque(fs.write_verifier, NFS4_VERIFIER_SIZE)
        return p.getvalue()

    # ------------------------------------------------------------------ directories

    def _readdir(self, ctx: _Ctx, u: Unpacker) -> bytes:
        cookie = u.uhyper()
        verf = u.fopaque(NFS4_VERIFIER_SIZE)
        dircount = u.uint()
        maxcount = u.uint()
        bits = bitmap_decode(u)
        del dircount
        ref = self._dir(ctx)
        if bits & WRITE_ONLY:
            raise Nfs4Error(Stat.INVAL, "write-only attribute requested")
        if cookie in (1, 2):
            raise Nfs4Error(Stat.BAD_COOKIE)
        entries: list[tuple[int, str, FhRef, Attr | None]] = []
        if ref.fs is None:
            eof, newverf = self._pseudo_entries(ctx, ref, cookie, entries)
        else:
            fs_cookie = cookie - 2 if cookie else 0
            cred = self._cred_for(ctx, ref)
            want = max(1, min(4096, maxcount // 16))
            if not (self._attr(ref).mode & 0o444 or cred.uid == 0):
                raise Nfs4Error(Stat.ACCESS)
            got, eof, newverf = ref.fs.readdir(cred, ref.handle, fs_cookie, verf, want)
            for e in got:
                entries.append((e.cookie + 2, e.name,
                                FhRef(e.handle, ref.fs, ref.opts, None, ref.export), e.attr))
        # resok: verifier(8) + entries + false(4) + eof(4); each entry: true(4) + cookie(8)
        # + name + fattr4. The status word is outside maxcount's accounting in practice; be
        # conservative and count it.
        p = Packer()
        p.fopaque(newverf.ljust(8, b"\0")[:8], NFS4_VERIFIER_SIZE)
        size = 4 + 8 + 8
        n = 0
        for ck, name, eref, attr in entries:
            e = Packer()
            e.bool(True)
            e.uhyper(ck)
            e.string(name)
            try:
                encode_fattr(e, self._source(eref, attr), bits)
            except FsError as exc:
                if A.RDATTR_ERROR not in bits:
                    raise
                e = Packer()
                e.bool(True)
                e.uhyper(ck)
                e.string(name)
                bitmap_encode(e, [A.RDATTR_ERROR])
                v = Packer()
                v.enum(fs_status(exc))
                e.opaque(v.getvalue())
            if size + len(e) > maxcount:
                break
            size += len(e)
            p.raw(e.getvalue())
            n += 1
        if n == 0 and entries:
            raise Nfs4Error(Stat.TOOSMALL)
        if size > maxcount:
            raise Nfs4Error(Stat.TOOSMALL)
        p.bool(False)
        p.bool(eof and n == len(entries))
        return p.getvalue()

    def _pseudo_entries(self, ctx: _Ctx, ref: FhRef, cookie: int,
                        out: list[tuple[int, str, FhRef, Attr | None]]) -> tuple[bool, bytes]:
        shares, dirs = self._pseudo_tree()
        base = (ref.pseudo or "/").rstrip("/") + "/"
        names = sorted({p[len(base):].split("/")[0] for p in list(shares) + list(dirs)
                        if p.startswith(base) and len(p) > len(base)})
        for i, name in enumerate(names):
            ck = i + 3
            if ck <= cookie:
                continue
            path = base + name
            if path in shares:
                sref = shares[path]
                assert sref.fs is not None
                out.append((ck, name, sref, sref.fs.getattr(sref.handle)))
            else:
                out.append((ck, name, self._pseudo_dir(path), None))
        return True, b"\0" * 8

    def _create(self, ctx: _Ctx, u: Unpacker) -> bytes:
        objtype = u.enum()
        if objtype == NF4LNK:
            u.string(NFS4_OPAQUE_LIMIT * 4)
        elif objtype in (NF4BLK, NF4CHR):
            u.uint()
            u.uint()
        name = u.string(NFS4_OPAQUE_LIMIT)
        attrs = decode_settable(u)
        ref = ctx.fh()
        if ref.fs is not None and self._attr(ref).type != FileType.DIR:
            raise Nfs4Error(Stat.NOTDIR)
        if objtype != NF4DIR:
            raise Nfs4Error(Stat.BADTYPE, "only directories are created with CREATE")
        check_name(name)
        ref, fs = self._share_dir(ctx)
        before = fs.getattr(ref.handle).change
        handle, _ = fs.mkdir(self._cred_for(ctx, ref), ref.handle, name,
                             attrs.changes if attrs.bits else None)
        after = fs.getattr(ref.handle).change
        ctx.cur = FhRef(handle, fs, ref.opts, None, ref.export)
        ctx.cur_sid = None
        p = Packer()
        pack_change_info(p, before, after)
        bitmap_encode(p, sorted(attrs.bits))
        return p.getvalue()

    def _remove(self, ctx: _Ctx, u: Unpacker) -> bytes:
        name = u.string(NFS4_OPAQUE_LIMIT)
        ref = self._dir(ctx)
        check_name(name)
        ref, fs = self._share_dir(ctx)
        cred = self._cred_for(ctx, ref)
        before = fs.getattr(ref.handle).change
        _, attr = fs.lookup(cred, ref.handle, name)
        if attr.type == FileType.DIR:
            fs.rmdir(cred, ref.handle, name)
        else:
            fs.remove(cred, ref.handle, name)
        after = fs.getattr(ref.handle).change
        p = Packer()
        pack_change_info(p, before, after)
        return p.getvalue()

    def _rename(self, ctx: _Ctx, u: Unpacker) -> bytes:
        old = u.string(NFS4_OPAQUE_LIMIT)
        new = u.string(NFS4_OPAQUE_LIMIT)
        if ctx.saved is None:
            raise Nfs4Error(Stat.NOFILEHANDLE, "RENAME needs the source directory saved")
        src = ctx.saved
        dst = self._dir(ctx)
        if src.fs is not None and self._attr(src).type != FileType.DIR:
            raise Nfs4Error(Stat.NOTDIR)
        check_name(old)
        check_name(new)
        if src.fs is None or dst.fs is None:
            if src.fs is not dst.fs:
                raise Nfs4Error(Stat.XDEV)
            raise Nfs4Error(Stat.ROFS)
        if src.fs is not dst.fs:
            raise Nfs4Error(Stat.XDEV)
        fs = src.fs
        sb = fs.getattr(src.handle).change
        db = fs.getattr(dst.handle).change
        fs.rename(self._cred_for(ctx, dst), src.handle, old, dst.handle, new)
        p = Packer()
        pack_change_info(p, sb, fs.getattr(src.handle).change)
        pack_change_info(p, db, fs.getattr(dst.handle).change)
        return p.getvalue()


def _raise(stat: Stat) -> FhRef:
    raise Nfs4Error(stat)


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


def _resop(op: Op, stat: Stat, body: bytes) -> bytes:
    p = Packer()
    p.uint(int(op))
    p.enum(stat)
    p.raw(body)
    return p.getvalue()


def _compound_reply(status: Stat, tag: bytes, results: list[bytes]) -> bytes:
    p = Packer()
    p.enum(status)
    p.opaque(tag)
    p.uint(len(results))
    for r in results:
        p.raw(r)
    return p.getvalue()
