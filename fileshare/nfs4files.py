"""NFS v4.1 file operations (RFC 8881 section 18) over the share file systems, and the
pseudo file system that joins the export paths (RFC 8881 7.3).

:class:`FileOps` is the half of :class:`fileshare.nfs4.Nfs4Program` that works on file handles:
PUTFH/PUTROOTFH/GETFH/SAVEFH/RESTOREFH, LOOKUP/LOOKUPP, SECINFO(_NO_NAME), GETATTR/SETATTR/
VERIFY/NVERIFY, ACCESS, READ/WRITE/COMMIT, READDIR, CREATE, REMOVE and RENAME. The session and
state operations (and OPEN/CLOSE/LOCK) live in ``nfs4.py``.

Invariants:
- Pseudo directory handles start with :data:`PSEUDO_PREFIX` and name a path that is a proper
  prefix of an export path; the pseudo file system is read-only (ROFS) and crossing into an
  export checks the client against the share's CIDRs (ACCESS).
- Every file system call gets the caller's credential squashed by the share's policy.
- File system errors keep their NFS v3 numbers where NFS v4 has the same code
  (:func:`fs_status`).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field

from fileshare.fs import (
    ACCESS_DELETE,
    ACCESS_EXECUTE,
    ACCESS_EXTEND,
    ACCESS_LOOKUP,
    ACCESS_MODIFY,
    ACCESS_READ,
    Attr,
    Cred,
    ExportOptions,
    Exports,
    FileSystem,
    FileType,
    FsErrno,
    FsError,
)
from fileshare.nfs4state import Client, Session, Slot, StateTable
from fileshare.nfs4types import (
    FILE_SYNC4,
    MAX_FILE_SIZE,
    MAX_NAME,
    NF4BLK,
    NF4CHR,
    NF4DIR,
    NF4LNK,
    NFS4_FHSIZE,
    NFS4_OPAQUE_LIMIT,
    NFS4_VERIFIER_SIZE,
    OPEN4_SHARE_ACCESS_WRITE,
    SECINFO_STYLE4_CURRENT_FH,
    SECINFO_STYLE4_PARENT,
    SUPPORTED,
    UNSTABLE4,
    WRITE_ONLY,
    A,
    AttrSource,
    Stat,
    StateId,
    bitmap_decode,
    bitmap_encode,
    decode_settable,
    encode_fattr,
    fattr_bytes,
    pack_change_info,
)
from fileshare.rpc import AuthFlavor, RpcCall
from fileshare.xdr import Packer, Unpacker, XdrError

Parts = list[bytes | bytearray | memoryview]
"""A reply piece sent as several buffers (a READ's header, data and padding)."""

PSEUDO_PREFIX = b"\x00vtl-nfs4-pseudo\x00"
PSEUDO_FSID = (0xFFFFFFFF, 0xFFFFFFFF)
ACCESS4_ALL = (ACCESS_READ | ACCESS_LOOKUP | ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE
               | ACCESS_EXECUTE)

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
class OpCtx:
    """One COMPOUND's evaluation state: current/saved handles and stateids, session."""

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


def utf8_ok(raw: bytes) -> bool:
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
    if not utf8_ok(raw):
        raise Nfs4Error(Stat.INVAL, "name is not UTF-8")
    if name in (".", ".."):
        raise Nfs4Error(Stat.BADNAME)
    if "/" in name or "\0" in name:
        raise Nfs4Error(Stat.BADCHAR)
    return name


class FileOps:
    """File-handle operations; mixed into the program, which provides the attributes below."""

    exports: Exports
    state: StateTable
    lease_time: int
    maxio: int
    boot_ns: int
    _lock: threading.Lock

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

    def _pseudo_ref(self, ctx: OpCtx, path: str) -> FhRef:
        """The pseudo directory at ``path``, or the share exported there."""
        shares, _ = self._pseudo_tree()
        if path in shares:
            return self._enter(ctx, shares[path])
        return self._pseudo_dir(path)

    def _enter(self, ctx: OpCtx, ref: FhRef) -> FhRef:
        if not self._allowed(ctx, ref):
            raise Nfs4Error(Stat.ACCESS, "client not allowed by the share")
        return ref

    def _resolve(self, ctx: OpCtx, handle: bytes) -> FhRef:
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

    def _cred_for(self, ctx: OpCtx, ref: FhRef) -> Cred:
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

    def _dir(self, ctx: OpCtx) -> FhRef:
        ref = ctx.fh()
        if ref.fs is not None and self._attr(ref).type != FileType.DIR:
            raise Nfs4Error(Stat.NOTDIR)
        return ref

    def _share_dir(self, ctx: OpCtx) -> tuple[FhRef, FileSystem]:
        """The current fh as a share directory a mutation may touch."""
        ref = self._dir(ctx)
        if ref.fs is None:
            raise Nfs4Error(Stat.ROFS, "the pseudo file system is read-only")
        return ref, ref.fs

    def _child(self, ctx: OpCtx, ref: FhRef, name: str) -> FhRef:
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

    def _allowed(self, ctx: OpCtx, ref: FhRef) -> bool:
        return ref.opts is not None and self.exports.allowed(ref.opts, ctx.call.client_host)

    def _stateid(self, ctx: OpCtx, sid: StateId, ref: FhRef, write: bool) -> None:
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

    # ------------------------------------------------------------------ file handles

    def _putrootfh(self, ctx: OpCtx, u: Unpacker) -> bytes:
        ctx.cur = self._pseudo_ref(ctx, "/")
        ctx.cur_sid = None
        return b""

    def _putfh(self, ctx: OpCtx, u: Unpacker) -> bytes:
        handle = u.opaque(NFS4_FHSIZE)
        if not handle:
            raise Nfs4Error(Stat.BADHANDLE)
        ctx.cur = self._resolve(ctx, handle)
        ctx.cur_sid = None
        return b""

    def _getfh(self, ctx: OpCtx, u: Unpacker) -> bytes:
        p = Packer()
        p.opaque(ctx.fh().handle)
        return p.getvalue()

    def _savefh(self, ctx: OpCtx, u: Unpacker) -> bytes:
        ctx.saved = ctx.fh()
        ctx.saved_sid = ctx.cur_sid
        return b""

    def _restorefh(self, ctx: OpCtx, u: Unpacker) -> bytes:
        if ctx.saved is None:
            raise Nfs4Error(Stat.RESTOREFH)
        ctx.cur = ctx.saved
        ctx.cur_sid = ctx.saved_sid
        return b""

    def _lookup(self, ctx: OpCtx, u: Unpacker) -> bytes:
        name = u.string(NFS4_OPAQUE_LIMIT)
        ref = self._dir(ctx)
        if name == ".":
            # NFS v4 gives "." no meaning (Linux answers BADNAME); nfs-rs looks it up to list
            # the export root, so it names the directory itself here, as in NFS v3
            return b""
        ctx.cur = self._child(ctx, ref, check_name(name))
        return b""

    def _lookupp(self, ctx: OpCtx, u: Unpacker) -> bytes:
        ctx.cur = self._parent(ctx, self._dir(ctx))
        return b""

    def _parent(self, ctx: OpCtx, ref: FhRef) -> FhRef:
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

    def _secinfo(self, ctx: OpCtx, u: Unpacker) -> bytes:
        name = u.string(NFS4_OPAQUE_LIMIT)
        ref = self._dir(ctx)
        self._child(ctx, ref, check_name(name))
        ctx.cur = None
        return self._secinfo_list()

    def _secinfo_no_name(self, ctx: OpCtx, u: Unpacker) -> bytes:
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

    def _getattr(self, ctx: OpCtx, u: Unpacker) -> bytes:
        bits = bitmap_decode(u)
        ref = ctx.fh()
        if bits & WRITE_ONLY:
            raise Nfs4Error(Stat.INVAL, "write-only attribute requested")
        return fattr_bytes(self._source(ref), bits)

    def _verify_common(self, ctx: OpCtx, u: Unpacker) -> bool:
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

    def _verify(self, ctx: OpCtx, u: Unpacker) -> bytes:
        if not self._verify_common(ctx, u):
            raise Nfs4Error(Stat.NOT_SAME)
        return b""

    def _nverify(self, ctx: OpCtx, u: Unpacker) -> bytes:
        if self._verify_common(ctx, u):
            raise Nfs4Error(Stat.SAME)
        return b""

    def _setattr(self, ctx: OpCtx, u: Unpacker) -> bytes:
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

    def _access(self, ctx: OpCtx, u: Unpacker) -> bytes:
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

    # ------------------------------------------------------------------ data

    def _file(self, ctx: OpCtx) -> tuple[FhRef, FileSystem]:
        ref = ctx.fh()
        if ref.fs is None:
            raise Nfs4Error(Stat.ISDIR)
        return ref, ref.fs

    def _read(self, ctx: OpCtx, u: Unpacker) -> Parts:
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
        p.uint(len(data))
        # the data goes out as read, in a buffer of its own (no join on the way out)
        return [p.getvalue(), data, b"\0" * (-len(data) % 4)]

    def _write(self, ctx: OpCtx, u: Unpacker) -> bytes:
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

    def _commit(self, ctx: OpCtx, u: Unpacker) -> bytes:
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

    def _readdir(self, ctx: OpCtx, u: Unpacker) -> bytes:
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

    def _pseudo_entries(self, ctx: OpCtx, ref: FhRef, cookie: int,
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

    def _create(self, ctx: OpCtx, u: Unpacker) -> bytes:
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

    def _remove(self, ctx: OpCtx, u: Unpacker) -> bytes:
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

    def _rename(self, ctx: OpCtx, u: Unpacker) -> bytes:
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
