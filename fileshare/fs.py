"""The share file system interface: what NFS v3, NFS v4.1 and MOUNT see of a file share.

CONTRACT between ``fileshare/objectfs.py`` (the implementation: files as objects plus a local
cache) and the protocol programs ``fileshare/nfs3.py``, ``fileshare/nfs4.py``, ``fileshare/mount.py``.
The protocol programs never touch the object store, the cache or the catalog; they translate
XDR calls into these methods and :class:`FsError` codes into their own status codes.

Invariants every implementation keeps:
- File handles are opaque ``bytes`` of 8..64 bytes that stay valid across appliance restarts
  for as long as the file exists; a handle of a removed file raises ``STALE``; bytes that are
  not a handle of ours raise ``BADHANDLE``.
- ``fileid`` is a stable 64-bit number per path (not reused while the share exists).
- Methods are thread-safe: the RPC server runs each call in a worker thread.
- Permissions are POSIX: the caller's :class:`Cred` (already squashed by the share's policy)
  against owner/group/other bits; uid 0 (when not squashed) passes every check but execute on
  a file with no x bit.
- Names are single components: 1..255 bytes, no ``/`` and no NUL, not ``.`` or ``..``
  (``INVAL``; over 255 bytes ``NAMETOOLONG``); a full path past 1,024 bytes is ``NAMETOOLONG``.
- A read-only share raises ``ROFS`` on every mutation.
- ``write`` data is durable locally when ``stable`` is True or after :meth:`commit`; the
  write verifier changes when the appliance restarts (so clients resend uncommitted writes).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


class FsErrno(enum.IntEnum):
    """Errors as NFS v3 numbers them (RFC 1813 2.6); NFS v4 maps them to its own codes."""

    PERM = 1
    NOENT = 2
    IO = 5
    NXIO = 6
    ACCES = 13
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
    NOT_SYNC = 10002
    BAD_COOKIE = 10003
    NOTSUPP = 10004
    TOOSMALL = 10005
    SERVERFAULT = 10006
    BADTYPE = 10007
    JUKEBOX = 10008  # try again later (e.g. an archived object being restored, store outage)


class FsError(Exception):
    """A file system call failed with an NFS-style status carried as data."""

    def __init__(self, errno: FsErrno, message: str = "") -> None:
        super().__init__(message or errno.name)
        self.errno = errno


class FileType(enum.IntEnum):
    """ftype3 values (RFC 1813); the share has only regular files and directories."""

    REG = 1
    DIR = 2


@dataclass(frozen=True, slots=True)
class Cred:
    """The caller, after squashing: AUTH_SYS uid, gid and supplementary gids."""

    uid: int
    gid: int
    gids: tuple[int, ...] = ()
    machine: str = ""


@dataclass(frozen=True, slots=True)
class Attr:
    """fattr3-shaped attributes. Times are nanoseconds since the Unix epoch."""

    type: FileType
    mode: int  # permission bits only (0o7777)
    nlink: int
    uid: int
    gid: int
    size: int
    used: int  # bytes of local/remote storage the file takes
    fsid: int
    fileid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    change: int  # increases on every change of data or attributes (NFS v4 change attribute)


@dataclass(frozen=True, slots=True)
class DirEntry:
    name: str
    fileid: int
    cookie: int  # opaque position after this entry; > 0 (0 means "from the start")
    handle: bytes
    attr: Attr


@dataclass(frozen=True, slots=True)
class SetAttr:
    """What SETATTR asks to change; None leaves a field alone. ``SET_TO_SERVER_TIME`` for now."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    atime_server: bool = False
    mtime_server: bool = False


@dataclass(frozen=True, slots=True)
class FsStat:
    total_bytes: int
    free_bytes: int
    avail_bytes: int
    total_files: int
    free_files: int
    avail_files: int


class CreateMode(enum.IntEnum):
    """createmode3 (RFC 1813 3.3.8)."""

    UNCHECKED = 0
    GUARDED = 1
    EXCLUSIVE = 2


# Access bits (RFC 1813 3.3.4), shared with NFS v4 ACCESS.
ACCESS_READ = 0x01
ACCESS_LOOKUP = 0x02
ACCESS_MODIFY = 0x04
ACCESS_EXTEND = 0x08
ACCESS_DELETE = 0x10
ACCESS_EXECUTE = 0x20


class FileSystem(Protocol):
    """One share's file tree. See the module docstring for the invariants."""

    name: str
    read_only: bool
    fsid: int
    write_verifier: bytes  # 8 bytes, new at every appliance start

    def root_handle(self) -> bytes: ...

    def getattr(self, fh: bytes) -> Attr: ...

    def setattr(self, cred: Cred, fh: bytes, changes: SetAttr,
                guard_ctime_ns: int | None = None) -> Attr:
        """Apply ``changes``; with a guard, ``NOT_SYNC`` unless ctime matches."""
        ...

    def lookup(self, cred: Cred, dir_fh: bytes, name: str) -> tuple[bytes, Attr]:
        """``name`` in the directory (``..`` allowed here: the parent; the root's is itself)."""
        ...

    def access(self, cred: Cred, fh: bytes, requested: int) -> int:
        """The subset of the ``requested`` ACCESS_* bits the caller is allowed (exactly those)."""
        ...

    def read(self, cred: Cred, fh: bytes, offset: int, count: int) -> tuple[bytes, bool]:
        """Up to ``count`` bytes at ``offset`` and whether the end of file was reached."""
        ...

    def write(self, cred: Cred, fh: bytes, offset: int, data: bytes | memoryview,
              stable: bool) -> tuple[int, bool, Attr]:
        """Write; returns (count, committed_stable, attributes after). stable=True syncs."""
        ...

    def commit(self, cred: Cred, fh: bytes) -> Attr:
        """Make every write to the file durable locally (and schedule its upload)."""
        ...

    def create(self, cred: Cred, dir_fh: bytes, name: str, mode: CreateMode, *,
               attrs: SetAttr | None = None, verifier: bytes | None = None) -> tuple[bytes, Attr]:
        """CREATE a regular file (EXCLUSIVE: ``verifier`` is 8 bytes, idempotent on retry)."""
        ...

    def mkdir(self, cred: Cred, dir_fh: bytes, name: str,
              attrs: SetAttr | None = None) -> tuple[bytes, Attr]: ...

    def remove(self, cred: Cred, dir_fh: bytes, name: str) -> None: ...

    def rmdir(self, cred: Cred, dir_fh: bytes, name: str) -> None: ...

    def rename(self, cred: Cred, from_dir: bytes, from_name: str,
               to_dir: bytes, to_name: str) -> None: ...

    def readdir(self, cred: Cred, dir_fh: bytes, cookie: int, cookieverf: bytes,
                max_entries: int) -> tuple[Sequence[DirEntry], bool, bytes]:
        """Entries after ``cookie`` (``.``/``..`` excluded), eof flag, and the cookie verifier.

        A stale ``cookieverf`` (non-zero and not the directory's current one) raises
        ``BAD_COOKIE``.
        """
        ...

    def fsstat(self) -> FsStat: ...


@dataclass
class ExportOptions:
    """How a share is exported (from ``vtl share create``)."""

    clients: tuple[str, ...] = ("127.0.0.1/32", "::1/128")  # CIDRs allowed to mount and call
    squash: str = "root"  # root | all | none
    read_only: bool = False
    anon_uid: int = 65534
    anon_gid: int = 65534
    extra: dict[str, str] = field(default_factory=dict)


class Exports(Protocol):
    """What MOUNT and the NFS programs need of the share registry (``fileshare/service.py``)."""

    def exports(self) -> Sequence[tuple[str, FileSystem, ExportOptions]]:
        """(export path such as ``/share1``, file system, options) for every share."""
        ...

    def by_path(self, path: str) -> tuple[FileSystem, ExportOptions] | None: ...

    def by_handle(self, fh: bytes) -> tuple[FileSystem, ExportOptions] | None:
        """The share a file handle belongs to (handles carry the share id)."""
        ...

    def allowed(self, opts: ExportOptions, client_host: str) -> bool:
        """True if ``client_host`` (an IP address) falls in the share's client CIDRs."""
        ...

    def squash(self, opts: ExportOptions, cred: Cred) -> Cred:
        """Apply root/all squash to an AUTH_SYS credential."""
        ...
