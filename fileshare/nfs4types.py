"""NFS v4.1 wire types (RFC 8881 section 3 and 5, RFC 8881 XDR in RFC 5662): status codes,
operation numbers, stateids, channel attributes and the ``fattr4`` attribute codec.

Pure code: no sockets, threads or clocks. Decoders raise :class:`~fileshare.xdr.XdrError` on
malformed bytes (the COMPOUND layer answers NFS4ERR_BADXDR) and :class:`AttrError` carrying an
``nfsstat4`` for well-formed but unacceptable attributes.

Invariants:
- A ``bitmap4`` is encoded with the fewest words that hold its highest bit (no trailing zero
  words); decoding accepts any number of words up to :data:`MAX_BITMAP_WORDS`.
- ``fattr4.attr_vals`` holds the attributes in increasing attribute number, exactly those in
  the mask: :func:`encode_fattr` only sets a bit when it wrote the value.
- Times are ``nfstime4`` (signed seconds, nanoseconds < 10**9); the file system keeps
  nanoseconds since the epoch, and the conversion is exact both ways.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fileshare.fs import Attr, FileType, SetAttr
from fileshare.xdr import Packer, Unpacker, XdrError

NFS4_FHSIZE = 128
NFS4_VERIFIER_SIZE = 8
NFS4_OTHER_SIZE = 12
NFS4_SESSIONID_SIZE = 16
NFS4_OPAQUE_LIMIT = 1024
NFS4_UINT32_MAX = 0xFFFFFFFF
MAX_BITMAP_WORDS = 8
MAX_NAME = 255
MAX_FILE_SIZE = 5 * 1024**4
"""The largest file (5 TiB): one file is one object, and S3 objects stop there."""


class Stat(enum.IntEnum):
    """nfsstat4 (RFC 8881 15.1)."""

    OK = 0
    PERM = 1
    NOENT = 2
    IO = 5
    NXIO = 6
    ACCESS = 13
    EXIST = 17
    XDEV = 18
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
    BADHANDLE = 10001
    BAD_COOKIE = 10003
    NOTSUPP = 10004
    TOOSMALL = 10005
    SERVERFAULT = 10006
    BADTYPE = 10007
    DELAY = 10008
    SAME = 10009
    DENIED = 10010
    EXPIRED = 10011
    LOCKED = 10012
    GRACE = 10013
    FHEXPIRED = 10014
    SHARE_DENIED = 10015
    WRONGSEC = 10016
    CLID_INUSE = 10017
    MOVED = 10019
    NOFILEHANDLE = 10020
    MINOR_VERS_MISMATCH = 10021
    STALE_CLIENTID = 10022
    STALE_STATEID = 10023
    OLD_STATEID = 10024
    BAD_STATEID = 10025
    BAD_SEQID = 10026
    NOT_SAME = 10027
    LOCK_RANGE = 10028
    SYMLINK = 10029
    RESTOREFH = 10030
    ATTRNOTSUPP = 10032
    NO_GRACE = 10033
    RECLAIM_BAD = 10034
    BADXDR = 10036
    LOCKS_HELD = 10037
    OPENMODE = 10038
    BADOWNER = 10039
    BADCHAR = 10040
    BADNAME = 10041
    BAD_RANGE = 10042
    LOCK_NOTSUPP = 10043
    OP_ILLEGAL = 10044
    FILE_OPEN = 10046
    BADSESSION = 10052
    BADSLOT = 10053
    COMPLETE_ALREADY = 10054
    CONN_NOT_BOUND_TO_SESSION = 10055
    SEQ_MISORDERED = 10063
    SEQUENCE_POS = 10064
    REQ_TOO_BIG = 10065
    REP_TOO_BIG = 10066
    REP_TOO_BIG_TO_CACHE = 10067
    RETRY_UNCACHED_REP = 10068
    TOO_MANY_OPS = 10070
    OP_NOT_IN_SESSION = 10071
    CLIENTID_BUSY = 10074
    SEQ_FALSE_RETRY = 10076
    BAD_HIGH_SLOT = 10077
    DEADSESSION = 10078
    ENCR_ALG_UNSUPP = 10079
    NOT_ONLY_OP = 10081
    WRONG_CRED = 10082
    WRONG_TYPE = 10083


class Op(enum.IntEnum):
    """nfs_opnum4 (RFC 8881 16.2.1)."""

    ACCESS = 3
    CLOSE = 4
    COMMIT = 5
    CREATE = 6
    DELEGPURGE = 7
    DELEGRETURN = 8
    GETATTR = 9
    GETFH = 10
    LINK = 11
    LOCK = 12
    LOCKT = 13
    LOCKU = 14
    LOOKUP = 15
    LOOKUPP = 16
    NVERIFY = 17
    OPEN = 18
    OPENATTR = 19
    OPEN_CONFIRM = 20
    OPEN_DOWNGRADE = 21
    PUTFH = 22
    PUTPUBFH = 23
    PUTROOTFH = 24
    READ = 25
    READDIR = 26
    READLINK = 27
    REMOVE = 28
    RENAME = 29
    RENEW = 30
    RESTOREFH = 31
    SAVEFH = 32
    SECINFO = 33
    SETATTR = 34
    SETCLIENTID = 35
    SETCLIENTID_CONFIRM = 36
    VERIFY = 37
    WRITE = 38
    RELEASE_LOCKOWNER = 39
    BACKCHANNEL_CTL = 40
    BIND_CONN_TO_SESSION = 41
    EXCHANGE_ID = 42
    CREATE_SESSION = 43
    DESTROY_SESSION = 44
    FREE_STATEID = 45
    GET_DIR_DELEGATION = 46
    GETDEVICEINFO = 47
    GETDEVICELIST = 48
    LAYOUTCOMMIT = 49
    LAYOUTGET = 50
    LAYOUTRETURN = 51
    SECINFO_NO_NAME = 52
    SEQUENCE = 53
    SET_SSV = 54
    TEST_STATEID = 55
    WANT_DELEGATION = 56
    DESTROY_CLIENTID = 57
    RECLAIM_COMPLETE = 58
    ILLEGAL = 10044


# nfs_ftype4
NF4REG, NF4DIR, NF4BLK, NF4CHR, NF4LNK, NF4SOCK, NF4FIFO = 1, 2, 3, 4, 5, 6, 7

# EXCHANGE_ID flags (RFC 8881 18.35)
EXCHGID4_FLAG_SUPP_MOVED_REFER = 0x1
EXCHGID4_FLAG_SUPP_MOVED_MIGR = 0x2
EXCHGID4_FLAG_BIND_PRINC_STATEID = 0x100
EXCHGID4_FLAG_USE_NON_PNFS = 0x10000
EXCHGID4_FLAG_USE_PNFS_MDS = 0x20000
EXCHGID4_FLAG_USE_PNFS_DS = 0x40000
EXCHGID4_FLAG_MASK_PNFS = 0x70000
EXCHGID4_FLAG_UPD_CONFIRMED_REC_A = 0x40000000
EXCHGID4_FLAG_CONFIRMED_R = 0x80000000
EXCHGID4_FLAG_MASK_A = 0x40070103  # every flag a client may send
SP4_NONE, SP4_MACH_CRED, SP4_SSV = 0, 1, 2

# CREATE_SESSION flags
CREATE_SESSION4_FLAG_PERSIST = 0x1
CREATE_SESSION4_FLAG_CONN_BACK_CHAN = 0x2
CREATE_SESSION4_FLAG_CONN_RDMA = 0x4

# OPEN
OPEN4_SHARE_ACCESS_READ = 1
OPEN4_SHARE_ACCESS_WRITE = 2
OPEN4_SHARE_ACCESS_BOTH = 3
OPEN4_SHARE_ACCESS_WANT_DELEG_MASK = 0xFF00
OPEN4_SHARE_ACCESS_WANT_NO_DELEG = 0x0400
OPEN4_SHARE_ACCESS_WANT_CANCEL = 0x0500
OPEN4_SHARE_ACCESS_WANT_SIGNAL_DELEG_WHEN_RESRC_AVAIL = 0x10000
OPEN4_SHARE_ACCESS_WANT_PUSH_DELEG_WHEN_UNCONTENDED = 0x20000
OPEN4_SHARE_DENY_NONE = 0
OPEN4_SHARE_DENY_BOTH = 3
OPEN4_NOCREATE, OPEN4_CREATE = 0, 1
UNCHECKED4, GUARDED4, EXCLUSIVE4, EXCLUSIVE4_1 = 0, 1, 2, 3
CLAIM_NULL, CLAIM_PREVIOUS, CLAIM_DELEGATE_CUR, CLAIM_DELEGATE_PREV = 0, 1, 2, 3
CLAIM_FH, CLAIM_DELEG_PREV_FH, CLAIM_DELEG_CUR_FH = 4, 5, 6
OPEN_DELEGATE_NONE, OPEN_DELEGATE_NONE_EXT = 0, 3
WND4_NOT_WANTED, WND4_NOT_SUPP_FTYPE, WND4_CANCELLED = 0, 3, 7
OPEN4_RESULT_LOCKTYPE_POSIX = 0x4

UNSTABLE4, DATA_SYNC4, FILE_SYNC4 = 0, 1, 2
SECINFO_STYLE4_CURRENT_FH, SECINFO_STYLE4_PARENT = 0, 1
FH4_PERSISTENT = 0

# SEQUENCE status flags are all zero for us (no callbacks, no revocation).
SEQ4_STATUS_CB_PATH_DOWN = 0x1


# ---------------------------------------------------------------------------------- stateids

@dataclass(frozen=True, slots=True)
class StateId:
    """stateid4 (RFC 8881 8.2): a sequence number and 12 opaque bytes naming the state."""

    seqid: int
    other: bytes

    def pack(self, p: Packer) -> None:
        p.uint(self.seqid)
        p.fopaque(self.other, NFS4_OTHER_SIZE)

    @classmethod
    def unpack(cls, u: Unpacker) -> StateId:
        return cls(u.uint(), u.fopaque(NFS4_OTHER_SIZE))

    @property
    def is_anonymous(self) -> bool:
        return self.seqid == 0 and self.other == ZERO_OTHER

    @property
    def is_bypass(self) -> bool:
        return self.seqid == NFS4_UINT32_MAX and self.other == ONES_OTHER

    @property
    def is_current(self) -> bool:
        return self.seqid == 1 and self.other == ZERO_OTHER


ZERO_OTHER = bytes(NFS4_OTHER_SIZE)
ONES_OTHER = b"\xff" * NFS4_OTHER_SIZE
ANONYMOUS_STATEID = StateId(0, ZERO_OTHER)
INVALID_STATEID = StateId(NFS4_UINT32_MAX, ZERO_OTHER)


@dataclass(frozen=True, slots=True)
class ChannelAttrs:
    """channel_attrs4 (RFC 8881 18.36)."""

    headerpadsize: int
    maxrequestsize: int
    maxresponsesize: int
    maxresponsesize_cached: int
    maxoperations: int
    maxrequests: int
    rdma_ird: tuple[int, ...] = ()

    def pack(self, p: Packer) -> None:
        for v in (self.headerpadsize, self.maxrequestsize, self.maxresponsesize,
                  self.maxresponsesize_cached, self.maxoperations, self.maxrequests):
            p.uint(v)
        p.array(list(self.rdma_ird), p.uint)

    @classmethod
    def unpack(cls, u: Unpacker) -> ChannelAttrs:
        vals = [u.uint() for _ in range(6)]
        ird = tuple(u.array(u.uint, max_items=1))
        return cls(*vals, rdma_ird=ird)


def pack_time(p: Packer, ns: int) -> None:
    """nfstime4 from nanoseconds since the epoch."""
    sec, nsec = divmod(ns, 1_000_000_000)
    p.hyper(sec)
    p.uint(nsec)


def unpack_time(u: Unpacker) -> int:
    sec = u.hyper()
    nsec = u.uint()
    if nsec >= 1_000_000_000:
        raise AttrError(Stat.INVAL, "nseconds past one second")
    return sec * 1_000_000_000 + nsec


# ---------------------------------------------------------------------------------- bitmaps

def bitmap_decode(u: Unpacker) -> frozenset[int]:
    words = u.array(u.uint, max_items=MAX_BITMAP_WORDS)
    return frozenset(i * 32 + b for i, w in enumerate(words) for b in range(32) if w >> b & 1)


def bitmap_encode(p: Packer, bits: Iterable[int]) -> None:
    words: list[int] = []
    for bit in bits:
        i = bit // 32
        while len(words) <= i:
            words.append(0)
        words[i] |= 1 << (bit % 32)
    p.array(words, p.uint)


# ---------------------------------------------------------------------------------- attributes

class A(enum.IntEnum):
    """Attribute numbers (RFC 8881 5.8) this server knows."""

    SUPPORTED_ATTRS = 0
    TYPE = 1
    FH_EXPIRE_TYPE = 2
    CHANGE = 3
    SIZE = 4
    LINK_SUPPORT = 5
    SYMLINK_SUPPORT = 6
    NAMED_ATTR = 7
    FSID = 8
    UNIQUE_HANDLES = 9
    LEASE_TIME = 10
    RDATTR_ERROR = 11
    ACLSUPPORT = 13
    CANSETTIME = 15
    CASE_INSENSITIVE = 16
    CASE_PRESERVING = 17
    CHOWN_RESTRICTED = 18
    FILEHANDLE = 19
    FILEID = 20
    FILES_AVAIL = 21
    FILES_FREE = 22
    FILES_TOTAL = 23
    HOMOGENEOUS = 26
    MAXFILESIZE = 27
    MAXLINK = 28
    MAXNAME = 29
    MAXREAD = 30
    MAXWRITE = 31
    MODE = 33
    NO_TRUNC = 34
    NUMLINKS = 35
    OWNER = 36
    OWNER_GROUP = 37
    RAWDEV = 41
    SPACE_AVAIL = 42
    SPACE_FREE = 43
    SPACE_TOTAL = 44
    SPACE_USED = 45
    TIME_ACCESS = 47
    TIME_ACCESS_SET = 48
    TIME_DELTA = 51
    TIME_METADATA = 52
    TIME_MODIFY = 53
    TIME_MODIFY_SET = 54
    MOUNTED_ON_FILEID = 55
    SUPPATTR_EXCLCREAT = 75


SUPPORTED = frozenset(int(a) for a in A)
WRITE_ONLY = frozenset({A.TIME_ACCESS_SET, A.TIME_MODIFY_SET})
SETTABLE = frozenset({A.SIZE, A.MODE, A.OWNER, A.OWNER_GROUP, A.TIME_ACCESS_SET,
                      A.TIME_MODIFY_SET})
EXCLCREAT = SETTABLE - {A.TIME_ACCESS_SET, A.TIME_MODIFY_SET}
"""Attributes EXCLUSIVE4_1 may set with the verifier (the times hold the verifier elsewhere)."""


class AttrError(Exception):
    """An attribute that is well-formed XDR but not acceptable: carries the nfsstat4."""

    def __init__(self, stat: Stat, message: str = "") -> None:
        super().__init__(message or stat.name)
        self.stat = stat


@dataclass(frozen=True, slots=True)
class AttrSource:
    """Everything an attribute value is computed from, for one object."""

    attr: Attr
    handle: bytes
    fsid: tuple[int, int]
    lease_time: int
    maxread: int
    maxwrite: int
    mounted_on_fileid: int
    stat: Callable[[], tuple[int, int, int, int, int, int]] | None = None
    """Lazily (space_total, space_free, space_avail, files_total, files_free, files_avail)."""


def _b(p: Packer, v: bool) -> None:
    p.bool(v)


def encode_fattr(p: Packer, src: AttrSource, requested: frozenset[int]) -> None:
    """Write ``fattr4`` for the supported attributes among ``requested``.

    Write-only attributes must have been rejected by the caller (NFS4ERR_INVAL).
    """
    a = src.attr
    vals = Packer()
    done: list[int] = []
    stat_cache: list[tuple[int, int, int, int, int, int]] = []

    def fsstat(i: int) -> int:
        if not stat_cache:
            stat_cache.append(src.stat() if src.stat else (0, 0, 0, 0, 0, 0))
        return stat_cache[0][i]

    for n in sorted(requested & SUPPORTED - WRITE_ONLY):
        if n == A.SUPPORTED_ATTRS:
            bitmap_encode(vals, sorted(SUPPORTED))
        elif n == A.TYPE:
            vals.enum(NF4DIR if a.type == FileType.DIR else NF4REG)
        elif n == A.FH_EXPIRE_TYPE:
            vals.uint(FH4_PERSISTENT)
        elif n == A.CHANGE:
            vals.uhyper(a.change)
        elif n == A.SIZE:
            vals.uhyper(a.size)
        elif n in (A.LINK_SUPPORT, A.SYMLINK_SUPPORT, A.NAMED_ATTR, A.CASE_INSENSITIVE):
            vals.bool(False)
        elif n in (A.UNIQUE_HANDLES, A.CANSETTIME, A.CASE_PRESERVING, A.CHOWN_RESTRICTED,
                   A.HOMOGENEOUS, A.NO_TRUNC):
            vals.bool(True)
        elif n == A.FSID:
            vals.uhyper(src.fsid[0])
            vals.uhyper(src.fsid[1])
        elif n == A.LEASE_TIME:
            vals.uint(src.lease_time)
        elif n == A.RDATTR_ERROR:
            vals.enum(Stat.OK)
        elif n == A.ACLSUPPORT:
            vals.uint(0)
        elif n == A.FILEHANDLE:
            vals.opaque(src.handle)
        elif n == A.FILEID:
            vals.uhyper(a.fileid)
        elif n == A.FILES_AVAIL:
            vals.uhyper(fsstat(5))
        elif n == A.FILES_FREE:
            vals.uhyper(fsstat(4))
        elif n == A.FILES_TOTAL:
            vals.uhyper(fsstat(3))
        elif n == A.MAXFILESIZE:
            vals.uhyper(MAX_FILE_SIZE)
        elif n == A.MAXLINK:
            vals.uint(1)
        elif n == A.MAXNAME:
            vals.uint(MAX_NAME)
        elif n == A.MAXREAD:
            vals.uhyper(src.maxread)
        elif n == A.MAXWRITE:
            vals.uhyper(src.maxwrite)
        elif n == A.MODE:
            vals.uint(a.mode & 0o7777)
        elif n == A.NUMLINKS:
            vals.uint(a.nlink)
        elif n == A.OWNER:
            vals.string(str(a.uid))
        elif n == A.OWNER_GROUP:
            vals.string(str(a.gid))
        elif n == A.RAWDEV:
            vals.uint(0)
            vals.uint(0)
        elif n == A.SPACE_AVAIL:
            vals.uhyper(fsstat(2))
        elif n == A.SPACE_FREE:
            vals.uhyper(fsstat(1))
        elif n == A.SPACE_TOTAL:
            vals.uhyper(fsstat(0))
        elif n == A.SPACE_USED:
            vals.uhyper(a.used)
        elif n == A.TIME_ACCESS:
            pack_time(vals, a.atime_ns)
        elif n == A.TIME_DELTA:
            pack_time(vals, 1)
        elif n == A.TIME_METADATA:
            pack_time(vals, a.ctime_ns)
        elif n == A.TIME_MODIFY:
            pack_time(vals, a.mtime_ns)
        elif n == A.MOUNTED_ON_FILEID:
            vals.uhyper(src.mounted_on_fileid)
        elif n == A.SUPPATTR_EXCLCREAT:
            bitmap_encode(vals, sorted(EXCLCREAT))
        else:  # pragma: no cover - SUPPORTED and this chain are kept in step by a test
            continue
        done.append(n)
    bitmap_encode(p, done)
    p.opaque(vals.getvalue())


def fattr_bytes(src: AttrSource, requested: frozenset[int]) -> bytes:
    p = Packer()
    encode_fattr(p, src, requested)
    return p.getvalue()


def parse_owner(text: str) -> int:
    """``owner``/``owner_group`` as this server writes them: ``"1000"`` or ``"1000@domain"``."""
    name = text.split("@", 1)[0]
    if not name.isascii() or not name.isdigit() or len(name) > 10:
        raise AttrError(Stat.BADOWNER, f"owner {text!r} is not numeric")
    value = int(name)
    if value > NFS4_UINT32_MAX:
        raise AttrError(Stat.BADOWNER, f"owner {text!r} out of range")
    return value


@dataclass(frozen=True, slots=True)
class DecodedAttrs:
    """A settable ``fattr4`` (SETATTR, OPEN/CREATE createattrs)."""

    bits: frozenset[int]
    changes: SetAttr


def decode_settable(u: Unpacker) -> DecodedAttrs:
    """Read a ``fattr4`` that sets attributes; only :data:`SETTABLE` ones are accepted.

    Unsupported attributes raise ATTRNOTSUPP, supported read-only ones INVAL (RFC 8881 18.30.4).
    """
    bits = bitmap_decode(u)
    vals = Unpacker(u.opaque())
    for n in sorted(bits):
        if n not in SUPPORTED:
            raise AttrError(Stat.ATTRNOTSUPP, f"attribute {n} not supported")
        if n not in SETTABLE:
            raise AttrError(Stat.INVAL, f"attribute {n} is read-only")
    fields: dict[str, object] = {}
    for n in sorted(bits):
        if n == A.SIZE:
            fields["size"] = vals.uhyper()
        elif n == A.MODE:
            mode = vals.uint()
            if mode > 0o7777:
                raise AttrError(Stat.INVAL, f"mode {mode:o} has bits past 07777")
            fields["mode"] = mode
        elif n == A.OWNER:
            fields["uid"] = parse_owner(vals.string(NFS4_OPAQUE_LIMIT))
        elif n == A.OWNER_GROUP:
            fields["gid"] = parse_owner(vals.string(NFS4_OPAQUE_LIMIT))
        elif n in (A.TIME_ACCESS_SET, A.TIME_MODIFY_SET):
            how = vals.enum()
            key = "atime" if n == A.TIME_ACCESS_SET else "mtime"
            if how == 0:
                fields[f"{key}_server"] = True
            elif how == 1:
                fields[f"{key}_ns"] = unpack_time(vals)
            else:
                raise XdrError(f"time_how4 {how}")
    vals.done()
    return DecodedAttrs(bits, SetAttr(**fields))  # type: ignore[arg-type]


def pack_change_info(p: Packer, before: int, after: int, atomic: bool = True) -> None:
    p.bool(atomic)
    p.uhyper(before)
    p.uhyper(after)
