"""How share files map to objects: keys, user metadata, file handles, names, permissions.

Pure helpers of :mod:`fileshare.objectfs` (no I/O but the HMAC): the metadata keys AWS S3 File
Gateway uses (``file-owner``, ``file-group``, ``file-permissions``, ``file-mtime``,
``file-ctime``), the handle codec (share id, fileid, generation, truncated HMAC-SHA256), the
name rules of fs.py, the row of the share's file table and the POSIX permission checks.

Invariants: a handle is exactly :data:`HANDLE_BYTES` bytes and decodes only if its MAC checks
under the gateway's key; metadata missing or malformed falls back to the share's defaults
(never an error: objects from other tools carry none).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fileshare.fs import (
    ACCESS_DELETE, ACCESS_EXECUTE, ACCESS_EXTEND, ACCESS_LOOKUP, ACCESS_MODIFY, ACCESS_READ,
    Cred, FileType, FsErrno, FsError, SetAttr,
)
from vtl.cloud.store import (
    InvalidKey, ObjectArchived, ObjectInfo, StoreError, StoreUnavailable,
)

log = logging.getLogger("fileshare.objectfs")

NAME_MAX = 255
PATH_MAX = 1024
MAX_FILE_BYTES = 5 * 1024 ** 4  # the S3 object size limit
ROOT_ID = 1
FETCH_RUN = 4  # chunks fetched per ranged GET at most

META_OWNER = "file-owner"
META_GROUP = "file-group"
META_MODE = "file-permissions"
META_MTIME = "file-mtime"
META_CTIME = "file-ctime"
META_AGENT = "user-agent"
AGENT = "vtl-file-gateway"

_HANDLE = struct.Struct(">BIQI")
HANDLE_VERSION = 1
MAC_BYTES = 12
HANDLE_BYTES = _HANDLE.size + MAC_BYTES
assert _HANDLE.size == 17 and 8 <= HANDLE_BYTES <= 64


# ------------------------------------------------------------------------------------- handles


class HandleCodec:
    """File handle bytes: share id, fileid, generation and a MAC under the gateway's secret."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("handle key must be at least 16 bytes")
        self._key = key

    def _mac(self, head: bytes) -> bytes:
        return hmac.new(self._key, head, hashlib.sha256).digest()[:MAC_BYTES]

    def encode(self, share_id: int, fileid: int, gen: int) -> bytes:
        head = _HANDLE.pack(HANDLE_VERSION, share_id, fileid, gen)
        return head + self._mac(head)

    def decode(self, fh: bytes) -> tuple[int, int, int]:
        """``(share_id, fileid, gen)``; ``BADHANDLE`` unless the bytes are a handle of ours."""
        fh = bytes(fh)
        if len(fh) != HANDLE_BYTES:
            raise FsError(FsErrno.BADHANDLE, "not a file handle of this gateway")
        head, mac = fh[:_HANDLE.size], fh[_HANDLE.size:]
        version, share_id, fileid, gen = _HANDLE.unpack(head)
        if version != HANDLE_VERSION or not hmac.compare_digest(mac, self._mac(head)):
            raise FsError(FsErrno.BADHANDLE, "not a file handle of this gateway")
        return share_id, fileid, gen


def handle_share_id(fh: bytes) -> int | None:
    """The share id a handle claims (unauthenticated: the share's file system checks the MAC)."""
    if len(fh) != HANDLE_BYTES or fh[0] != HANDLE_VERSION:
        return None
    return int(_HANDLE.unpack(bytes(fh[:_HANDLE.size]))[1])


# ------------------------------------------------------------------------------------ metadata


@dataclass(frozen=True, slots=True)
class ShareDefaults:
    """What a file or directory found in the bucket without our metadata gets (AWS defaults)."""

    file_mode: int = 0o666
    dir_mode: int = 0o777
    uid: int = 65534
    gid: int = 65534


def encode_metadata(ftype: FileType, mode: int, uid: int, gid: int, mtime_ns: int,
                    ctime_ns: int) -> dict[str, str]:
    kind = stat.S_IFDIR if ftype is FileType.DIR else stat.S_IFREG
    return {
        META_OWNER: str(uid), META_GROUP: str(gid), META_MODE: f"0{kind | (mode & 0o7777):o}",
        META_MTIME: f"{mtime_ns}ns", META_CTIME: f"{ctime_ns}ns", META_AGENT: AGENT,
    }


def _int_meta(meta: dict[str, str], name: str, base: int = 10) -> int | None:
    raw = meta.get(name)
    if raw is None:
        return None
    raw = raw.strip()
    if raw.endswith("ns"):
        raw = raw[:-2]
    try:
        value = int(raw, base)
    except ValueError:
        return None
    return value if value >= 0 else None


def decode_metadata(info: ObjectInfo, defaults: ShareDefaults, ftype: FileType) -> dict[str, int]:
    """mode/uid/gid/mtime_ns/ctime_ns for an object, falling back to the share's defaults."""
    meta = dict(info.metadata)
    mtime_default = int(info.last_modified.timestamp() * 1e9)
    mode = _int_meta(meta, META_MODE, 8)
    uid = _int_meta(meta, META_OWNER)
    gid = _int_meta(meta, META_GROUP)
    mtime = _int_meta(meta, META_MTIME)
    ctime = _int_meta(meta, META_CTIME)
    default_mode = defaults.dir_mode if ftype is FileType.DIR else defaults.file_mode
    return {
        "mode": (mode & 0o7777) if mode is not None else default_mode,
        "uid": uid if uid is not None and uid < 2 ** 32 else defaults.uid,
        "gid": gid if gid is not None and gid < 2 ** 32 else defaults.gid,
        "mtime_ns": mtime if mtime is not None else mtime_default,
        "ctime_ns": ctime if ctime is not None else (mtime if mtime is not None else mtime_default),
    }


def validate_name(name: str) -> None:
    """A single path component (fs.py): 1..255 bytes, no ``/`` or NUL, not ``.``/``..``."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name \
            or "\x00" in name:
        raise FsError(FsErrno.INVAL, f"invalid name {name!r}")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise FsError(FsErrno.INVAL, "name is not valid UTF-8") from None
    if len(raw) > NAME_MAX:
        raise FsError(FsErrno.NAMETOOLONG, f"name is {len(raw)} bytes, at most {NAME_MAX}")
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in name):
        raise FsError(FsErrno.INVAL, "names with control characters cannot be objects")


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


# ----------------------------------------------------------------------------------- the table

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files(
    fileid INTEGER PRIMARY KEY AUTOINCREMENT,
    gen INTEGER NOT NULL, parent INTEGER NOT NULL, name TEXT NOT NULL, path TEXT NOT NULL,
    type INTEGER NOT NULL, mode INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    atime_ns INTEGER NOT NULL, change INTEGER NOT NULL DEFAULT 1,
    remote INTEGER NOT NULL DEFAULT 0, etag TEXT, dirty INTEGER NOT NULL DEFAULT 0,
    cached INTEGER NOT NULL DEFAULT 0, marker INTEGER NOT NULL DEFAULT 0,
    listed_at REAL, synced_at REAL, verifier BLOB);
CREATE UNIQUE INDEX IF NOT EXISTS files_path ON files(path);
CREATE UNIQUE INDEX IF NOT EXISTS files_parent_name ON files(parent, name);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_COLUMNS = ("fileid", "gen", "parent", "name", "path", "type", "mode", "uid", "gid", "size",
            "mtime_ns", "ctime_ns", "atime_ns", "change", "remote", "etag", "dirty", "cached",
            "marker", "listed_at", "synced_at", "verifier")
_SELECT = "SELECT " + ", ".join(_COLUMNS) + " FROM files"


@dataclass(frozen=True, slots=True)
class Row:
    fileid: int
    gen: int
    parent: int
    name: str
    path: str
    type: int
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    atime_ns: int
    change: int
    remote: int
    etag: str | None
    dirty: int
    cached: int
    marker: int
    listed_at: float | None
    synced_at: float | None
    verifier: bytes | None

    @property
    def is_dir(self) -> bool:
        return self.type == FileType.DIR


@contextlib.contextmanager
def _map_store(what: str) -> Iterator[None]:
    """Store failures as NFS errors: outages ask the client to retry (JUKEBOX)."""
    try:
        yield
    except StoreUnavailable as exc:
        log.warning("%s: store unavailable: %s", what, exc)
        raise FsError(FsErrno.JUKEBOX, f"{what}: store unavailable, retry") from exc
    except ObjectArchived as exc:
        raise FsError(FsErrno.IO, f"{what}: the object is archived") from exc
    except InvalidKey as exc:
        raise FsError(FsErrno.NAMETOOLONG if "bytes" in str(exc) else FsErrno.INVAL,
                      f"{what}: {exc}") from exc
    except StoreError as exc:
        log.warning("%s: %s", what, exc)
        raise FsError(FsErrno.IO, f"{what}: {exc}") from exc


# ---------------------------------------------------------------------------------- permissions

R, W, X = 4, 2, 1


def permitted(cred: Cred, row: Row, want: int) -> bool:
    """POSIX owner/group/other check of ``want`` (R|W|X bits); uid 0 passes all but X on a
    file with no x bit at all."""
    if cred.uid == 0:
        return not (want & X and row.type == FileType.REG and not row.mode & 0o111)
    if cred.uid == row.uid:
        bits = (row.mode >> 6) & 7
    elif cred.gid == row.gid or row.gid in cred.gids:
        bits = (row.mode >> 3) & 7
    else:
        bits = row.mode & 7
    return bits & want == want


def allowed_access(cred: Cred, row: Row, requested: int, read_only: bool) -> int:
    """The ACCESS bits granted, as knfsd maps them (RFC 1813 3.3.4)."""
    granted = 0
    if row.is_dir:
        if permitted(cred, row, R):
            granted |= ACCESS_READ
        if permitted(cred, row, X):
            granted |= ACCESS_LOOKUP
        if not read_only and permitted(cred, row, W | X):
            granted |= ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE
    else:
        if permitted(cred, row, R):
            granted |= ACCESS_READ
        if not read_only and permitted(cred, row, W):
            granted |= ACCESS_MODIFY | ACCESS_EXTEND
        if permitted(cred, row, X):
            granted |= ACCESS_EXECUTE
    return granted & requested


def setattr_fields(cred: Cred, row: Row, c: SetAttr, now_ns: int) -> dict[str, Any]:
    """The table fields a SETATTR changes, after the POSIX rules: mode and times by the owner
    (or root), the owner by root only, the group by root or by the owner to one of its groups,
    the size with write permission (the owner always: it opened the file), times set to the
    server's clock by the owner or a writer."""
    owner = cred.uid == 0 or cred.uid == row.uid
    fields: dict[str, Any] = {}
    if c.mode is not None:
        if not owner:
            raise FsError(FsErrno.PERM, "only the owner may change the mode")
        fields["mode"] = c.mode & 0o7777
    if c.uid is not None and c.uid != row.uid:
        if cred.uid != 0:
            raise FsError(FsErrno.PERM, "only root may change the owner")
        fields["uid"] = c.uid
    if c.gid is not None and c.gid != row.gid:
        if not (cred.uid == 0 or (owner and (c.gid == cred.gid or c.gid in cred.gids))):
            raise FsError(FsErrno.PERM, "not allowed to change the group")
        fields["gid"] = c.gid
    if c.size is not None and not owner and not permitted(cred, row, W):
        raise FsError(FsErrno.ACCES, "permission denied")
    for which, value, server in (("atime_ns", c.atime_ns, c.atime_server),
                                 ("mtime_ns", c.mtime_ns, c.mtime_server)):
        if server:
            if not owner and not permitted(cred, row, W):
                raise FsError(FsErrno.ACCES, "permission denied")
            fields[which] = now_ns
        elif value is not None:
            if not owner:
                raise FsError(FsErrno.PERM, "only the owner may set times")
            fields[which] = value
    return fields
