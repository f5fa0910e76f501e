"""NFS v3 (RFC 1813) over the share file system interface (:mod:`fileshare.fs`).

:class:`Nfs3Program` is an :class:`~fileshare.rpc.RpcProgram` for program 100003 version 3. It
decodes a call's arguments (:mod:`fileshare.nfs3types`), checks who calls, runs the matching
:class:`~fileshare.fs.FileSystem` method and encodes the result. It never touches the object
store, the cache or the catalog.

Every call but NULL goes through the same gate, in this order:

1. AUTH_SYS is required: AUTH_NONE is answered MSG_DENIED/AUTH_TOOWEAK (RFC 5531 9; RFC 2623
   2.3.1 calls AUTH_TOOWEAK the answer for a flavour the export does not accept).
2. The arguments must decode exactly (no bytes left over): else GARBAGE_ARGS.
3. The file handle must belong to a share (``Exports.by_handle``): else NFS3ERR_BADHANDLE.
4. The client address must be in the share's ``--clients`` (``Exports.allowed``): else
   NFS3ERR_ACCES. Chosen over an RPC AUTH error because the credential itself is fine and the
   refusal is per share: one connection may reach an allowed share and a refused one, and the
   client reports EACCES ("permission denied"), which is what the user should see.
5. The credential is squashed by the share's policy (``Exports.squash``).

Names: a component with ``/`` or NUL, or empty, is NFS3ERR_INVAL (RFC 1813 names INVAL for an
invalid argument; the name can never exist, so NOENT/ACCES would mislead); longer than 255 bytes
NFS3ERR_NAMETOOLONG. ``.`` and ``..`` are resolved by LOOKUP; CREATE and MKDIR of them answer
NFS3ERR_EXIST, REMOVE, RMDIR and RENAME of them NFS3ERR_INVAL (as Linux does).

Invariants: :meth:`Nfs3Program.handle` raises only :class:`~fileshare.rpc.RpcError` (version
mismatch, unknown procedure, GARBAGE_ARGS) and :class:`~fileshare.rpc.AuthError`; a
:class:`~fileshare.fs.FsError` becomes its nfsstat3 and any other exception from the file system
is logged and answered NFS3ERR_SERVERFAULT with a well-formed failure body. Every mutation on a
read-only share (export option or file system flag) is NFS3ERR_ROFS before the file system is
asked. Failure bodies carry post-operation attributes when they can be read; pre-operation
attributes appear only on success and are read just before the operation, not atomically with
it (RFC 1813 2.6 leaves wcc_data best-effort; a client that sees a concurrent change in between
simply revalidates its cache). A stable WRITE always answers FILE_SYNC (the file system is asked
to commit if it did not sync).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from fileshare.fs import (
    ACCESS_DELETE, ACCESS_EXECUTE, ACCESS_EXTEND, ACCESS_LOOKUP, ACCESS_MODIFY, ACCESS_READ,
    Attr, Cred, DirEntry, ExportOptions, Exports, FileSystem, FsErrno, FsError,
)
from fileshare.nfs3types import (
    COOKIEVERFSIZE, FHSIZE, FSF3_CANSETTIME, FSF3_HOMOGENEOUS, NS, PROGRAM, VERSION,
    AccessArgs, CreateArgs, DirOpArgs, FhArgs, LinkArgs, MkdirArgs, MknodArgs, Proc, ReadArgs,
    ReaddirArgs, RenameArgs, SetattrArgs, StableHow, Stat, SymlinkArgs, WriteArgs,
    pack_fattr3, pack_post_op_attr, pack_post_op_fh3, pack_wcc_data,
)
from fileshare.rpc import AcceptStat, AuthError, AuthFlavor, AuthStat, RpcCall, RpcError
from fileshare.xdr import Packer, Unpacker, XdrError

log = logging.getLogger("vtl.fileshare.nfs3")

RTMAX = 1024 * 1024
WTMAX = 1024 * 1024
DTPREF = 64 * 1024
MAXFILESIZE = 5 * 1024 ** 4
"""5 TiB: the largest S3 object, so the largest file the share can upload."""
NAME_MAX = 255
ACCESS_ALL = (ACCESS_READ | ACCESS_LOOKUP | ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE
              | ACCESS_EXECUTE)
ACCESS_WRITES = ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE
_ZERO_VERF = bytes(COOKIEVERFSIZE)

# XDR sizes used by the READDIR/READDIRPLUS budgets (RFC 1813 3.3.16, 3.3.17).
_FATTR3_SIZE = 84
_POST_OP_ATTR_SIZE = 4 + _FATTR3_SIZE
# status + dir_attributes + cookieverf + list terminator + eof
_READDIR_BASE = 4 + _POST_OP_ATTR_SIZE + COOKIEVERFSIZE + 4 + 4


def _xdr_len(n: int) -> int:
    return (n + 3) & ~3


def _entry3_size(name: bytes) -> int:
    """value_follows + fileid + name + cookie."""
    return 4 + 8 + 4 + _xdr_len(len(name)) + 8


def _entryplus3_size(name: bytes, fh: bytes) -> int:
    return _entry3_size(name) + _POST_OP_ATTR_SIZE + 4 + 4 + _xdr_len(len(fh))


class _Fail(Exception):
    """An nfsstat3 other than OK, raised inside a procedure."""

    def __init__(self, stat: Stat) -> None:
        super().__init__(stat.name)
        self.stat = stat


@dataclass(frozen=True, slots=True)
class _Ctx:
    fs: FileSystem
    opts: ExportOptions
    cred: Cred

    @property
    def read_only(self) -> bool:
        return bool(self.opts.read_only or self.fs.read_only)


# Shapes of the failure bodies (RFC 1813 section 3): what follows the status.
_NONE, _ATTR, _WCC, _WCC2, _ATTR_WCC = range(5)


@dataclass(frozen=True, slots=True)
class _Proc:
    decode: Callable[[Unpacker], object]
    run: Callable[["Nfs3Program", _Ctx, object], bytes] | None  # None: NFS3ERR_NOTSUPP
    fail_shape: int
    handles: Callable[[object], tuple[bytes, ...]]  # primary handle first
    mutates: bool = False


def _name(raw: bytes) -> str:
    """Check a filename3; returns it as text (undecodable bytes kept with surrogateescape)."""
    if not raw or b"/" in raw or b"\0" in raw:
        raise _Fail(Stat.INVAL)
    if len(raw) > NAME_MAX:
        raise _Fail(Stat.NAMETOOLONG)
    return raw.decode("utf-8", "surrogateescape")


def _stat_of(exc: FsError) -> Stat:
    try:
        return Stat(int(exc.errno))
    except ValueError:
        return Stat.SERVERFAULT


class Nfs3Program:
    """RPC program 100003 version 3 over the shares of ``exports``."""

    prog = PROGRAM
    versions: tuple[int, ...] = (VERSION,)

    def __init__(self, exports: Exports) -> None:
        self.exports = exports

    # --- dispatch ------------------------------------------------------------------------------
    def handle(self, call: RpcCall) -> bytes:
        if call.vers != VERSION:
            raise RpcError(AcceptStat.PROG_MISMATCH, low=VERSION, high=VERSION)
        try:
            proc = Proc(call.proc)
        except ValueError:
            raise RpcError(AcceptStat.PROC_UNAVAIL) from None
        if proc == Proc.NULL:
            return b""
        if call.flavor != AuthFlavor.AUTH_SYS or call.cred is None:
            raise AuthError(AuthStat.AUTH_TOOWEAK)
        spec = _PROCS[proc]
        try:
            if proc == Proc.WRITE:
                args = WriteArgs.decode_body(call.body)  # the data stays a view of the record
            else:
                u = Unpacker(call.body)
                args = spec.decode(u)
                u.done()
        except XdrError as exc:
            raise RpcError(AcceptStat.GARBAGE_ARGS, message=str(exc)) from exc
        ctx: _Ctx | None = None
        try:
            if spec.run is None:
                raise _Fail(Stat.NOTSUPP)
            ctx = self._gate(call, spec.handles(args))
            if spec.mutates and ctx.read_only:
                raise _Fail(Stat.ROFS)
            return spec.run(self, ctx, args)
        except _Fail as exc:
            return self._failure(exc.stat, spec, ctx, args)
        except FsError as exc:
            return self._failure(_stat_of(exc), spec, ctx, args)
        except Exception:
            log.exception("NFS3 %s from %s failed", proc.name, call.client_host)
            return self._failure(Stat.SERVERFAULT, spec, ctx, args)

    def _gate(self, call: RpcCall, handles: tuple[bytes, ...]) -> _Ctx:
        found = self.exports.by_handle(handles[0]) if handles[0] else None
        if found is None:
            raise _Fail(Stat.BADHANDLE)
        fs, opts = found
        for other in handles[1:]:
            again = self.exports.by_handle(other) if other else None
            if again is None:
                raise _Fail(Stat.BADHANDLE)
            if again[0] is not fs:
                raise _Fail(Stat.XDEV)
        if not self.exports.allowed(opts, call.client_host):
            raise _Fail(Stat.ACCES)
        auth = call.cred
        assert auth is not None
        cred = Cred(uid=auth.uid, gid=auth.gid, gids=tuple(auth.gids), machine=auth.machine)
        return _Ctx(fs, opts, self.exports.squash(opts, cred))

    def _failure(self, stat: Stat, spec: _Proc, ctx: _Ctx | None, args: object) -> bytes:
        p = Packer()
        p.uint(stat)
        shape = spec.fail_shape
        if shape == _NONE:
            return p.getvalue()
        handles = spec.handles(args)
        attrs = [_quiet_getattr(ctx, fh) for fh in handles]
        if shape == _ATTR:
            pack_post_op_attr(p, attrs[0])
        elif shape == _WCC:
            pack_wcc_data(p, None, attrs[0])
        elif shape == _WCC2:
            pack_wcc_data(p, None, attrs[0])
            pack_wcc_data(p, None, attrs[1] if len(attrs) > 1 else None)
        else:  # _ATTR_WCC (LINK): file attributes, link directory wcc
            pack_post_op_attr(p, attrs[0])
            pack_wcc_data(p, None, attrs[1] if len(attrs) > 1 else None)
        return p.getvalue()

    # --- procedures ----------------------------------------------------------------------------
    def _getattr(self, ctx: _Ctx, a: FhArgs) -> bytes:
        attr = ctx.fs.getattr(a.fh)
        p = _ok()
        pack_fattr3(p, attr)
        return p.getvalue()

    def _setattr(self, ctx: _Ctx, a: SetattrArgs) -> bytes:
        if not a.attrs.valid() or (a.guard is not None and a.guard[1] >= NS):
            raise _Fail(Stat.INVAL)
        if a.attrs.size is not None and a.attrs.size > MAXFILESIZE:
            raise _Fail(Stat.FBIG)
        before = ctx.fs.getattr(a.fh)
        guard = None if a.guard is None else a.guard[0] * NS + a.guard[1]
        after = ctx.fs.setattr(ctx.cred, a.fh, a.attrs.to_setattr(), guard_ctime_ns=guard)
        p = _ok()
        pack_wcc_data(p, before, after)
        return p.getvalue()

    def _lookup(self, ctx: _Ctx, a: DirOpArgs) -> bytes:
        name = _name(a.name)
        if name == ".":
            dir_attr = ctx.fs.getattr(a.dir)
            if ctx.fs.access(ctx.cred, a.dir, ACCESS_LOOKUP) != ACCESS_LOOKUP:
                raise _Fail(Stat.ACCES)
            fh, attr = a.dir, dir_attr
        else:
            fh, attr = ctx.fs.lookup(ctx.cred, a.dir, name)
            dir_attr = _quiet_getattr(ctx, a.dir)
        p = _ok()
        p.opaque(fh)
        pack_post_op_attr(p, attr)
        pack_post_op_attr(p, dir_attr)
        return p.getvalue()

    def _access(self, ctx: _Ctx, a: AccessArgs) -> bytes:
        attr = ctx.fs.getattr(a.fh)
        requested = a.access & ACCESS_ALL
        granted = ctx.fs.access(ctx.cred, a.fh, requested) & requested
        if ctx.read_only:
            granted &= ~ACCESS_WRITES
        p = _ok()
        pack_post_op_attr(p, attr)
        p.uint(granted)
        return p.getvalue()

    def _read(self, ctx: _Ctx, a: ReadArgs) -> bytes:
        data, eof = ctx.fs.read(ctx.cred, a.fh, a.offset, min(a.count, RTMAX))
        attr = _quiet_getattr(ctx, a.fh)
        p = _ok()
        pack_post_op_attr(p, attr)
        p.uint(len(data))
        p.bool(eof)
        p.uint(len(data))
        # One copy of the data (up to 1 MiB) instead of three through the Packer.
        return b"".join((p.getvalue(), data, bytes(-len(data) % 4)))

    def _write(self, ctx: _Ctx, a: WriteArgs) -> bytes:
        if a.offset + a.count > MAXFILESIZE:
            raise _Fail(Stat.FBIG)
        before = ctx.fs.getattr(a.fh)
        stable = a.stable != StableHow.UNSTABLE
        count, synced, after = ctx.fs.write(ctx.cred, a.fh, a.offset, a.data, stable=stable)
        if stable and not synced:
            # RFC 1813 3.3.7: committed is never less stable than asked for.
            after = ctx.fs.commit(ctx.cred, a.fh)
            synced = True
        p = _ok()
        pack_wcc_data(p, before, after)
        p.uint(count)
        p.uint(StableHow.FILE_SYNC if synced else StableHow.UNSTABLE)
        p.fopaque(ctx.fs.write_verifier, 8)
        return p.getvalue()

    def _create(self, ctx: _Ctx, a: CreateArgs) -> bytes:
        name = _name(a.name)
        if name in (".", ".."):
            raise _Fail(Stat.EXIST)
        if a.attrs is not None:
            if not a.attrs.valid():
                raise _Fail(Stat.INVAL)
            if a.attrs.size is not None and a.attrs.size > MAXFILESIZE:
                raise _Fail(Stat.FBIG)
        before = ctx.fs.getattr(a.dir)
        fh, attr = ctx.fs.create(ctx.cred, a.dir, name, a.mode,
                                 attrs=None if a.attrs is None else a.attrs.to_setattr(),
                                 verifier=a.verifier)
        return _new_object(ctx, a.dir, before, fh, attr)

    def _mkdir(self, ctx: _Ctx, a: MkdirArgs) -> bytes:
        name = _name(a.name)
        if name in (".", ".."):
            raise _Fail(Stat.EXIST)
        if not a.attrs.valid():
            raise _Fail(Stat.INVAL)
        before = ctx.fs.getattr(a.dir)
        fh, attr = ctx.fs.mkdir(ctx.cred, a.dir, name, attrs=a.attrs.to_setattr())
        return _new_object(ctx, a.dir, before, fh, attr)

    def _remove(self, ctx: _Ctx, a: DirOpArgs) -> bytes:
        return self._unlink(ctx, a, ctx.fs.remove)

    def _rmdir(self, ctx: _Ctx, a: DirOpArgs) -> bytes:
        return self._unlink(ctx, a, ctx.fs.rmdir)

    def _unlink(self, ctx: _Ctx, a: DirOpArgs,
                op: Callable[[Cred, bytes, str], None]) -> bytes:
        name = _name(a.name)
        if name in (".", ".."):
            raise _Fail(Stat.INVAL)
        before = ctx.fs.getattr(a.dir)
        op(ctx.cred, a.dir, name)
        p = _ok()
        pack_wcc_data(p, before, _quiet_getattr(ctx, a.dir))
        return p.getvalue()

    def _rename(self, ctx: _Ctx, a: RenameArgs) -> bytes:
        src, dst = _name(a.from_name), _name(a.to_name)
        if src in (".", "..") or dst in (".", ".."):
            raise _Fail(Stat.INVAL)
        from_before = ctx.fs.getattr(a.from_dir)
        to_before = ctx.fs.getattr(a.to_dir)
        ctx.fs.rename(ctx.cred, a.from_dir, src, a.to_dir, dst)
        p = _ok()
        pack_wcc_data(p, from_before, _quiet_getattr(ctx, a.from_dir))
        pack_wcc_data(p, to_before, _quiet_getattr(ctx, a.to_dir))
        return p.getvalue()

    def _readdir(self, ctx: _Ctx, a: ReaddirArgs) -> bytes:
        return self._listing(ctx, a, plus=False)

    def _readdirplus(self, ctx: _Ctx, a: ReaddirArgs) -> bytes:
        return self._listing(ctx, a, plus=True)

    def _listing(self, ctx: _Ctx, a: ReaddirArgs, *, plus: bool) -> bytes:
        """READDIR (3.3.16) and READDIRPLUS (3.3.17).

        ``count``/``maxcount`` bound the whole reply body (status included, so we err small);
        READDIRPLUS's ``dircount`` bounds the entry3-shaped part of the entries (value_follows,
        fileid, name, cookie), attributes and handles excluded. No entry fits: NFS3ERR_TOOSMALL.
        """
        dir_attr = ctx.fs.getattr(a.dir)
        budget = a.maxcount - _READDIR_BASE
        if budget < 0:
            raise _Fail(Stat.TOOSMALL)
        dir_budget = a.dircount if a.dircount is not None else budget
        per_entry = (24 + _POST_OP_ATTR_SIZE + 12 + FHSIZE) if plus else 28
        want = max(1, min(4096, budget // per_entry + 1))
        if a.dircount is not None:
            want = max(1, min(want, a.dircount // 24 + 1))
        entries, eof, verf = ctx.fs.readdir(ctx.cred, a.dir, a.cookie, a.cookieverf, want)
        chosen: list[tuple[DirEntry, bytes]] = []
        used = dir_used = 0
        for entry in entries:
            raw = entry.name.encode("utf-8", "surrogateescape")
            size = _entryplus3_size(raw, entry.handle) if plus else _entry3_size(raw)
            dsize = _entry3_size(raw)
            if used + size > budget or dir_used + dsize > dir_budget:
                eof = False
                break
            chosen.append((entry, raw))
            used += size
            dir_used += dsize
        if not chosen and entries:
            raise _Fail(Stat.TOOSMALL)
        p = _ok()
        pack_post_op_attr(p, dir_attr)
        p.fopaque(verf if len(verf) == COOKIEVERFSIZE else _ZERO_VERF, COOKIEVERFSIZE)
        for entry, raw in chosen:
            p.bool(True)
            p.uhyper(entry.fileid)
            p.opaque(raw)
            p.uhyper(entry.cookie)
            if plus:
                pack_post_op_attr(p, entry.attr)
                pack_post_op_fh3(p, entry.handle)
        p.bool(False)
        p.bool(eof)
        return p.getvalue()

    def _fsstat(self, ctx: _Ctx, a: FhArgs) -> bytes:
        attr = ctx.fs.getattr(a.fh)
        st = ctx.fs.fsstat()
        p = _ok()
        pack_post_op_attr(p, attr)
        for value in (st.total_bytes, st.free_bytes, st.avail_bytes,
                      st.total_files, st.free_files, st.avail_files):
            p.uhyper(max(0, value))
        p.uint(0)  # invarsec: the store can change under us at any time
        return p.getvalue()

    def _fsinfo(self, ctx: _Ctx, a: FhArgs) -> bytes:
        attr = ctx.fs.getattr(a.fh)
        p = _ok()
        pack_post_op_attr(p, attr)
        p.uint(RTMAX)  # rtmax
        p.uint(RTMAX)  # rtpref
        p.uint(4096)  # rtmult
        p.uint(WTMAX)  # wtmax
        p.uint(WTMAX)  # wtpref
        p.uint(4096)  # wtmult
        p.uint(DTPREF)  # dtpref
        p.uhyper(MAXFILESIZE)
        p.uint(0)  # time_delta: nanosecond times
        p.uint(1)
        p.uint(FSF3_HOMOGENEOUS | FSF3_CANSETTIME)  # no FSF3_LINK, no FSF3_SYMLINK
        return p.getvalue()

    def _pathconf(self, ctx: _Ctx, a: FhArgs) -> bytes:
        attr = ctx.fs.getattr(a.fh)
        p = _ok()
        pack_post_op_attr(p, attr)
        p.uint(1)  # linkmax: no hard links
        p.uint(NAME_MAX)
        p.bool(True)  # no_trunc: longer names are refused, not cut
        p.bool(True)  # chown_restricted
        p.bool(False)  # case_insensitive
        p.bool(True)  # case_preserving
        return p.getvalue()

    def _commit(self, ctx: _Ctx, a: ReadArgs) -> bytes:
        before = ctx.fs.getattr(a.fh)
        after = ctx.fs.commit(ctx.cred, a.fh)
        p = _ok()
        pack_wcc_data(p, before, after)
        p.fopaque(ctx.fs.write_verifier, 8)
        return p.getvalue()


def _ok() -> Packer:
    p = Packer()
    p.uint(Stat.OK)
    return p


def _quiet_getattr(ctx: _Ctx | None, fh: bytes) -> Attr | None:
    """Attributes for a post_op_attr, or None when they cannot be had (never raises)."""
    if ctx is None or not fh:
        return None
    try:
        return ctx.fs.getattr(fh)
    except Exception:  # noqa: BLE001 - post-op attributes are optional (RFC 1813 2.6)
        return None


def _new_object(ctx: _Ctx, dir_fh: bytes, before: Attr, fh: bytes, attr: Attr) -> bytes:
    """CREATE3resok / MKDIR3resok: obj, obj_attributes, dir_wcc."""
    p = _ok()
    pack_post_op_fh3(p, fh)
    pack_post_op_attr(p, attr)
    pack_wcc_data(p, before, _quiet_getattr(ctx, dir_fh))
    return p.getvalue()


def _fh(a: object) -> tuple[bytes, ...]:
    return (a.fh,)  # type: ignore[attr-defined]


def _dir(a: object) -> tuple[bytes, ...]:
    return (a.dir,)  # type: ignore[attr-defined]


def _P(decode: Callable[[Unpacker], object], run: Callable[..., bytes] | None, shape: int,
       handles: Callable[[object], tuple[bytes, ...]], mutates: bool = False) -> _Proc:
    return _Proc(decode, run, shape, handles, mutates)


_PROCS: dict[Proc, _Proc] = {
    Proc.GETATTR: _P(FhArgs.decode, Nfs3Program._getattr, _NONE, _fh),
    Proc.SETATTR: _P(SetattrArgs.decode, Nfs3Program._setattr, _WCC, _fh, True),
    Proc.LOOKUP: _P(DirOpArgs.decode, Nfs3Program._lookup, _ATTR, _dir),
    Proc.ACCESS: _P(AccessArgs.decode, Nfs3Program._access, _ATTR, _fh),
    Proc.READLINK: _P(FhArgs.decode, None, _ATTR, _fh),
    Proc.READ: _P(ReadArgs.decode, Nfs3Program._read, _ATTR, _fh),
    Proc.WRITE: _P(WriteArgs.decode, Nfs3Program._write, _WCC, _fh, True),
    Proc.CREATE: _P(CreateArgs.decode, Nfs3Program._create, _WCC, _dir, True),
    Proc.MKDIR: _P(MkdirArgs.decode, Nfs3Program._mkdir, _WCC, _dir, True),
    Proc.SYMLINK: _P(SymlinkArgs.decode, None, _WCC, _dir),
    Proc.MKNOD: _P(MknodArgs.decode, None, _WCC, _dir),
    Proc.REMOVE: _P(DirOpArgs.decode, Nfs3Program._remove, _WCC, _dir, True),
    Proc.RMDIR: _P(DirOpArgs.decode, Nfs3Program._rmdir, _WCC, _dir, True),
    Proc.RENAME: _P(RenameArgs.decode, Nfs3Program._rename, _WCC2,
                    lambda a: (a.from_dir, a.to_dir), True),  # type: ignore[attr-defined]
    Proc.LINK: _P(LinkArgs.decode, None, _ATTR_WCC,
                  lambda a: (a.fh, a.dir)),  # type: ignore[attr-defined]
    Proc.READDIR: _P(ReaddirArgs.decode, Nfs3Program._readdir, _ATTR, _dir),
    Proc.READDIRPLUS: _P(ReaddirArgs.decode_plus, Nfs3Program._readdirplus, _ATTR, _dir),
    Proc.FSSTAT: _P(FhArgs.decode, Nfs3Program._fsstat, _ATTR, _fh),
    Proc.FSINFO: _P(FhArgs.decode, Nfs3Program._fsinfo, _ATTR, _fh),
    Proc.PATHCONF: _P(FhArgs.decode, Nfs3Program._pathconf, _ATTR, _fh),
    Proc.COMMIT: _P(ReadArgs.decode, Nfs3Program._commit, _WCC, _fh),
}
assert set(_PROCS) == set(Proc) - {Proc.NULL}
