"""NFS v3 XDR types (RFC 1813 2.5, 2.6 and the argument structures of section 3).

Pure code over :mod:`fileshare.xdr`: each argument structure is a frozen dataclass with
``decode(Unpacker)`` (server side) and ``encode(Packer)`` (client side: tests and tools); the
result building blocks (fattr3, post_op_attr, wcc_data, post_op_fh3) have ``pack_*`` encoders and
``unpack_*`` decoders. Result bodies are assembled in :mod:`fileshare.nfs3`.

Invariants: decoders raise only :class:`~fileshare.xdr.XdrError`; a file handle is at most
``FHSIZE`` (64) bytes (a longer one is not an ``nfs_fh3`` and cannot decode); a filename is read
up to ``MAX_NAME_WIRE`` bytes so that names past 255 bytes reach the program, which answers
NFS3ERR_NAMETOOLONG; times are carried in nanoseconds on our side, (seconds, nseconds) on the
wire, with ``nseconds`` below 10**9 (a larger one is NFS3ERR_INVAL, checked by the program).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fileshare.fs import Attr, CreateMode, SetAttr
from fileshare.xdr import Packer, Unpacker, XdrError

PROGRAM = 100003
VERSION = 3
FHSIZE = 64
COOKIEVERFSIZE = 8
CREATEVERFSIZE = 8
WRITEVERFSIZE = 8
MAX_NAME_WIRE = 4096
"""Longest filename3 decoded (bytes); NAME_MAX is 255, longer names get NAMETOOLONG."""
MAX_PATH_WIRE = 4096
NS = 1_000_000_000


class Proc(enum.IntEnum):
    NULL = 0
    GETATTR = 1
    SETATTR = 2
    LOOKUP = 3
    ACCESS = 4
    READLINK = 5
    READ = 6
    WRITE = 7
    CREATE = 8
    MKDIR = 9
    SYMLINK = 10
    MKNOD = 11
    REMOVE = 12
    RMDIR = 13
    RENAME = 14
    LINK = 15
    READDIR = 16
    READDIRPLUS = 17
    FSSTAT = 18
    FSINFO = 19
    PATHCONF = 20
    COMMIT = 21


class Stat(enum.IntEnum):
    """nfsstat3 (RFC 1813 2.6)."""

    OK = 0
    PERM = 1
    NOENT = 2
    IO = 5
    NXIO = 6
    ACCES = 13
    EXIST = 17
    XDEV = 18
    NODEV = 19
    NOTDIR = 20
    ISDIR = 21
    INVAL = 22
    FBIG = 27
    NOSPC = 28
    ROFS = 30
    MLINK = 31
    NAMETOOLONG = 63
    NOTEMPTY = 66
    DQUOT = 69
    STALE = 70
    REMOTE = 71
    BADHANDLE = 10001
    NOT_SYNC = 10002
    BAD_COOKIE = 10003
    NOTSUPP = 10004
    TOOSMALL = 10005
    SERVERFAULT = 10006
    BADTYPE = 10007
    JUKEBOX = 10008


class StableHow(enum.IntEnum):
    UNSTABLE = 0
    DATA_SYNC = 1
    FILE_SYNC = 2


class TimeHow(enum.IntEnum):
    DONT_CHANGE = 0
    SET_TO_SERVER_TIME = 1
    SET_TO_CLIENT_TIME = 2


class Ftype(enum.IntEnum):
    REG = 1
    DIR = 2
    BLK = 3
    CHR = 4
    LNK = 5
    SOCK = 6
    FIFO = 7


FSF3_LINK = 0x0001
FSF3_SYMLINK = 0x0002
FSF3_HOMOGENEOUS = 0x0008
FSF3_CANSETTIME = 0x0010


# --- Times and attributes ---------------------------------------------------------------------

_MAX_SECONDS = 0xFFFF_FFFF


def split_ns(ns: int) -> tuple[int, int]:
    """nanoseconds -> nfstime3 (seconds, nseconds), clamped to what 32 unsigned bits hold."""
    if ns <= 0:
        return 0, 0
    sec, nsec = divmod(ns, NS)
    if sec > _MAX_SECONDS:
        return _MAX_SECONDS, NS - 1
    return sec, nsec


def pack_time(p: Packer, ns: int) -> None:
    sec, nsec = split_ns(ns)
    p.uint(sec)
    p.uint(nsec)


def unpack_time(u: Unpacker) -> tuple[int, int]:
    """(seconds, nseconds) as sent; the caller checks nseconds < 10**9."""
    return u.uint(), u.uint()


def _u32(value: int) -> int:
    return min(max(int(value), 0), 0xFFFF_FFFF)


def _u64(value: int) -> int:
    return min(max(int(value), 0), 0xFFFF_FFFF_FFFF_FFFF)


def pack_fattr3(p: Packer, a: Attr) -> None:
    """fattr3; every number is clamped to its XDR range, so no attribute can break a reply."""
    p.uint(_u32(a.type))
    p.uint(int(a.mode) & 0o7777)
    p.uint(_u32(a.nlink))
    p.uint(_u32(a.uid))
    p.uint(_u32(a.gid))
    p.uhyper(_u64(a.size))
    p.uhyper(_u64(a.used))
    p.uint(0)  # rdev: specdata3, meaningless for files and directories
    p.uint(0)
    p.uhyper(_u64(a.fsid))
    p.uhyper(_u64(a.fileid))
    pack_time(p, a.atime_ns)
    pack_time(p, a.mtime_ns)
    pack_time(p, a.ctime_ns)


@dataclass(frozen=True, slots=True)
class Fattr3:
    """fattr3 as decoded by a client (times in nanoseconds)."""

    type: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    used: int
    rdev: tuple[int, int]
    fsid: int
    fileid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


def _time_ns(u: Unpacker) -> int:
    sec, nsec = unpack_time(u)
    return sec * NS + nsec


def unpack_fattr3(u: Unpacker) -> Fattr3:
    return Fattr3(type=u.uint(), mode=u.uint(), nlink=u.uint(), uid=u.uint(), gid=u.uint(),
                  size=u.uhyper(), used=u.uhyper(), rdev=(u.uint(), u.uint()),
                  fsid=u.uhyper(), fileid=u.uhyper(), atime_ns=_time_ns(u),
                  mtime_ns=_time_ns(u), ctime_ns=_time_ns(u))


def pack_post_op_attr(p: Packer, a: Attr | None) -> None:
    p.optional(a, lambda x: pack_fattr3(p, x))


def unpack_post_op_attr(u: Unpacker) -> Fattr3 | None:
    return u.optional(lambda: unpack_fattr3(u))


@dataclass(frozen=True, slots=True)
class WccAttr:
    size: int
    mtime_ns: int
    ctime_ns: int


def pack_wcc_data(p: Packer, before: Attr | None, after: Attr | None) -> None:
    """wcc_data: pre_op_attr (size, mtime, ctime) then post_op_attr."""
    if before is None:
        p.bool(False)
    else:
        p.bool(True)
        p.uhyper(_u64(before.size))
        pack_time(p, before.mtime_ns)
        pack_time(p, before.ctime_ns)
    pack_post_op_attr(p, after)


def unpack_wcc_data(u: Unpacker) -> tuple[WccAttr | None, Fattr3 | None]:
    before = u.optional(lambda: WccAttr(u.uhyper(), _time_ns(u), _time_ns(u)))
    return before, unpack_post_op_attr(u)


def pack_post_op_fh3(p: Packer, fh: bytes | None) -> None:
    p.optional(fh, p.opaque)


def unpack_post_op_fh3(u: Unpacker) -> bytes | None:
    return u.optional(lambda: unpack_fh(u))


def unpack_fh(u: Unpacker) -> bytes:
    return u.opaque(FHSIZE)


def unpack_name(u: Unpacker) -> bytes:
    """filename3 as raw bytes (the program checks '/', NUL and length)."""
    return u.opaque(MAX_NAME_WIRE)


# --- sattr3 --------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Sattr3:
    """sattr3 as sent: None leaves a field alone; times are (how, seconds, nseconds)."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime: tuple[TimeHow, int, int] = (TimeHow.DONT_CHANGE, 0, 0)
    mtime: tuple[TimeHow, int, int] = (TimeHow.DONT_CHANGE, 0, 0)

    @classmethod
    def decode(cls, u: Unpacker) -> "Sattr3":
        mode = u.optional(u.uint)
        uid = u.optional(u.uint)
        gid = u.optional(u.uint)
        size = u.optional(u.uhyper)
        return cls(mode, uid, gid, size, _unpack_set_time(u), _unpack_set_time(u))

    def encode(self, p: Packer) -> None:
        p.optional(self.mode, p.uint)
        p.optional(self.uid, p.uint)
        p.optional(self.gid, p.uint)
        p.optional(self.size, p.uhyper)
        for how, sec, nsec in (self.atime, self.mtime):
            p.uint(how)
            if how == TimeHow.SET_TO_CLIENT_TIME:
                p.uint(sec)
                p.uint(nsec)

    def valid(self) -> bool:
        """False when a client time has nseconds >= 10**9 (NFS3ERR_INVAL)."""
        return all(how != TimeHow.SET_TO_CLIENT_TIME or nsec < NS
                   for how, _, nsec in (self.atime, self.mtime))

    def to_setattr(self) -> SetAttr:
        def ns(t: tuple[TimeHow, int, int]) -> int | None:
            return t[1] * NS + t[2] if t[0] == TimeHow.SET_TO_CLIENT_TIME else None
        return SetAttr(mode=None if self.mode is None else self.mode & 0o7777,
                       uid=self.uid, gid=self.gid, size=self.size,
                       atime_ns=ns(self.atime), mtime_ns=ns(self.mtime),
                       atime_server=self.atime[0] == TimeHow.SET_TO_SERVER_TIME,
                       mtime_server=self.mtime[0] == TimeHow.SET_TO_SERVER_TIME)


def _unpack_set_time(u: Unpacker) -> tuple[TimeHow, int, int]:
    how = u.uint()
    if how == TimeHow.SET_TO_CLIENT_TIME:
        sec, nsec = unpack_time(u)
        return TimeHow.SET_TO_CLIENT_TIME, sec, nsec
    if how in (TimeHow.DONT_CHANGE, TimeHow.SET_TO_SERVER_TIME):
        return TimeHow(how), 0, 0
    raise XdrError(f"time_how {how}")


# --- Arguments (RFC 1813 section 3) -----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FhArgs:
    """GETATTR, READLINK, FSSTAT, FSINFO, PATHCONF: one file handle."""

    fh: bytes

    @classmethod
    def decode(cls, u: Unpacker) -> "FhArgs":
        return cls(unpack_fh(u))

    def encode(self, p: Packer) -> None:
        p.opaque(self.fh)


@dataclass(frozen=True, slots=True)
class DirOpArgs:
    """diropargs3: LOOKUP, REMOVE, RMDIR."""

    dir: bytes
    name: bytes

    @classmethod
    def decode(cls, u: Unpacker) -> "DirOpArgs":
        return cls(unpack_fh(u), unpack_name(u))

    def encode(self, p: Packer) -> None:
        p.opaque(self.dir)
        p.opaque(self.name)


@dataclass(frozen=True, slots=True)
class SetattrArgs:
    fh: bytes
    attrs: Sattr3
    guard: tuple[int, int] | None  # obj_ctime (seconds, nseconds)

    @classmethod
    def decode(cls, u: Unpacker) -> "SetattrArgs":
        fh = unpack_fh(u)
        attrs = Sattr3.decode(u)
        return cls(fh, attrs, u.optional(lambda: unpack_time(u)))

    def encode(self, p: Packer) -> None:
        p.opaque(self.fh)
        self.attrs.encode(p)
        p.optional(self.guard, lambda t: (p.uint(t[0]), p.uint(t[1])))


@dataclass(frozen=True, slots=True)
class AccessArgs:
    fh: bytes
    access: int

    @classmethod
    def decode(cls, u: Unpacker) -> "AccessArgs":
        return cls(unpack_fh(u), u.uint())

    def encode(self, p: Packer) -> None:
        p.opaque(self.fh)
        p.uint(self.access)


@dataclass(frozen=True, slots=True)
class ReadArgs:
    """READ and COMMIT: file, offset, count."""

    fh: bytes
    offset: int
    count: int

    @classmethod
    def decode(cls, u: Unpacker) -> "ReadArgs":
        return cls(unpack_fh(u), u.uhyper(), u.uint())

    def encode(self, p: Packer) -> None:
        p.opaque(self.fh)
        p.uhyper(self.offset)
        p.uint(self.count)


@dataclass(frozen=True, slots=True)
class WriteArgs:
    fh: bytes
    offset: int
    count: int
    stable: int
    data: bytes | memoryview

    @staticmethod
    def _head(u: Unpacker) -> tuple[bytes, int, int, int]:
        """file, offset, count, stable_how: the fields before the data."""
        fh = unpack_fh(u)
        offset = u.uhyper()
        count = u.uint()
        stable = u.uint()
        if stable not in StableHow._value2member_map_:
            raise XdrError(f"stable_how {stable}")
        return fh, offset, count, stable

    @classmethod
    def decode(cls, u: Unpacker) -> "WriteArgs":
        fh, offset, count, stable = cls._head(u)
        data = u.opaque()
        if len(data) != count:
            # RFC 1813 3.3.7: data is count bytes; Linux nfsd refuses the call as undecodable.
            raise XdrError(f"WRITE count {count} with {len(data)} bytes of data")
        return cls(fh, offset, count, stable, data)

    @classmethod
    def decode_body(cls, body: bytes | memoryview) -> "WriteArgs":
        """The whole argument body, with ``data`` a view into it (no copy of up to 1 MiB)."""
        view = memoryview(body).cast("B")
        u = Unpacker(view)
        fh, offset, count, stable = cls._head(u)
        n = u.uint()
        start = u.pos
        if n != count:
            raise XdrError(f"WRITE count {count} with {n} bytes of data")
        end = start + n + (-n % 4)
        if end != len(view):
            raise XdrError(f"WRITE data of {n} bytes in {len(view) - start} bytes")
        return cls(fh, offset, count, stable, view[start:start + n])  # type: ignore[arg-type]

    def encode(self, p: Packer) -> None:
        p.opaque(self.fh)
        p.uhyper(self.offset)
        p.uint(self.count)
        p.uint(self.stable)
        p.opaque(self.data)


@dataclass(frozen=True, slots=True)
class CreateArgs:
    dir: bytes
    name: bytes
    mode: CreateMode
    attrs: Sattr3 | None = None  # UNCHECKED, GUARDED
    verifier: bytes | None = None  # EXCLUSIVE

    @classmethod
    def decode(cls, u: Unpacker) -> "CreateArgs":
        d, name = unpack_fh(u), unpack_name(u)
        mode = u.uint()
        if mode in (CreateMode.UNCHECKED, CreateMode.GUARDED):
            return cls(d, name, CreateMode(mode), attrs=Sattr3.decode(u))
        if mode == CreateMode.EXCLUSIVE:
            return cls(d, name, CreateMode.EXCLUSIVE, verifier=u.fopaque(CREATEVERFSIZE))
        raise XdrError(f"createmode3 {mode}")

    def encode(self, p: Packer) -> None:
        p.opaque(self.dir)
        p.opaque(self.name)
        p.uint(self.mode)
        if self.mode == CreateMode.EXCLUSIVE:
            p.fopaque(self.verifier or bytes(CREATEVERFSIZE), CREATEVERFSIZE)
        else:
            (self.attrs or Sattr3()).encode(p)


@dataclass(frozen=True, slots=True)
class MkdirArgs:
    dir: bytes
    name: bytes
    attrs: Sattr3

    @classmethod
    def decode(cls, u: Unpacker) -> "MkdirArgs":
        return cls(unpack_fh(u), unpack_name(u), Sattr3.decode(u))

    def encode(self, p: Packer) -> None:
        p.opaque(self.dir)
        p.opaque(self.name)
        self.attrs.encode(p)


@dataclass(frozen=True, slots=True)
class SymlinkArgs:
    dir: bytes
    name: bytes
    attrs: Sattr3
    target: bytes

    @classmethod
    def decode(cls, u: Unpacker) -> "SymlinkArgs":
        return cls(unpack_fh(u), unpack_name(u), Sattr3.decode(u), u.opaque(MAX_PATH_WIRE))

    def encode(self, p: Packer) -> None:
        p.opaque(self.dir)
        p.opaque(self.name)
        self.attrs.encode(p)
        p.opaque(self.target)


@dataclass(frozen=True, slots=True)
class MknodArgs:
    dir: bytes
    name: bytes
    type: int

    @classmethod
    def decode(cls, u: Unpacker) -> "MknodArgs":
        d, name = unpack_fh(u), unpack_name(u)
        kind = u.uint()
        if kind in (Ftype.CHR, Ftype.BLK):
            Sattr3.decode(u)
            u.uint()
            u.uint()
        elif kind in (Ftype.SOCK, Ftype.FIFO):
            Sattr3.decode(u)
        elif kind not in Ftype._value2member_map_:
            raise XdrError(f"ftype3 {kind}")
        return cls(d, name, kind)

    def encode(self, p: Packer) -> None:
        p.opaque(self.dir)
        p.opaque(self.name)
        p.uint(self.type)
        if self.type in (Ftype.CHR, Ftype.BLK):
            Sattr3().encode(p)
            p.uint(0)
            p.uint(0)
        elif self.type in (Ftype.SOCK, Ftype.FIFO):
            Sattr3().encode(p)


@dataclass(frozen=True, slots=True)
class RenameArgs:
    from_dir: bytes
    from_name: bytes
    to_dir: bytes
    to_name: bytes

    @classmethod
    def decode(cls, u: Unpacker) -> "RenameArgs":
        return cls(unpack_fh(u), unpack_name(u), unpack_fh(u), unpack_name(u))

    def encode(self, p: Packer) -> None:
        for item in (self.from_dir, self.from_name, self.to_dir, self.to_name):
            p.opaque(item)


@dataclass(frozen=True, slots=True)
class LinkArgs:
    fh: bytes
    dir: bytes
    name: bytes

    @classmethod
    def decode(cls, u: Unpacker) -> "LinkArgs":
        return cls(unpack_fh(u), unpack_fh(u), unpack_name(u))

    def encode(self, p: Packer) -> None:
        p.opaque(self.fh)
        p.opaque(self.dir)
        p.opaque(self.name)


@dataclass(frozen=True, slots=True)
class ReaddirArgs:
    """READDIR (``dircount`` None) and READDIRPLUS."""

    dir: bytes
    cookie: int
    cookieverf: bytes
    maxcount: int  # READDIR's count; READDIRPLUS's maxcount
    dircount: int | None = None

    @classmethod
    def decode(cls, u: Unpacker) -> "ReaddirArgs":
        d, cookie, verf = unpack_fh(u), u.uhyper(), u.fopaque(COOKIEVERFSIZE)
        return cls(d, cookie, verf, u.uint())

    @classmethod
    def decode_plus(cls, u: Unpacker) -> "ReaddirArgs":
        d, cookie, verf = unpack_fh(u), u.uhyper(), u.fopaque(COOKIEVERFSIZE)
        dircount = u.uint()
        return cls(d, cookie, verf, u.uint(), dircount)

    def encode(self, p: Packer) -> None:
        p.opaque(self.dir)
        p.uhyper(self.cookie)
        p.fopaque(self.cookieverf, COOKIEVERFSIZE)
        if self.dircount is not None:
            p.uint(self.dircount)
        p.uint(self.maxcount)
