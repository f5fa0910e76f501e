"""An in-memory :class:`fileshare.fs.FileSystem` and :class:`fileshare.fs.Exports` for unit tests.

Follows the contract's invariants (POSIX permission checks with root and owner override, name
rules, 1,024-byte paths, EXCLUSIVE create verifiers, stable cookies, BAD_COOKIE on a foreign
verifier, STALE handles of removed files, ROFS on a read-only share) so the protocol programs can
be tested against it without the object store. ``crash()`` drops every uncommitted write and
changes the write verifier, as an appliance restart does.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fileshare.fs import (
    ACCESS_DELETE, ACCESS_EXECUTE, ACCESS_EXTEND, ACCESS_LOOKUP, ACCESS_MODIFY, ACCESS_READ,
    Attr, CreateMode, Cred, DirEntry, ExportOptions, FileType, FsErrno, FsError, FsStat, SetAttr,
)

_MAGIC = b"MEMF"
_FH = struct.Struct(">4sIQ")  # magic, share id, fileid
_COOKIEVERF = b"memfsv01"
_R, _W, _X = 4, 2, 1


@dataclass
class _Node:
    fileid: int
    type: FileType
    mode: int
    uid: int
    gid: int
    parent: int
    name: str
    data: bytearray = field(default_factory=bytearray)
    durable: bytes = b""
    children: dict[str, int] = field(default_factory=dict)
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    change: int = 1
    verifier: bytes | None = None


class MemFs:
    """One share's tree in memory (thread-safe under one lock)."""

    def __init__(self, name: str, share_id: int, *, read_only: bool = False,
                 clock: list[int] | None = None) -> None:
        self.name = name
        self.share_id = share_id
        self.read_only = read_only
        self.fsid = share_id
        self.write_verifier = os.urandom(8)
        self._lock = threading.RLock()
        self._ids = itertools.count(2)
        self._clock = clock if clock is not None else [1_700_000_000 * 10**9]
        self._nodes: dict[int, _Node] = {}
        root = _Node(1, FileType.DIR, 0o777, 0, 0, 1, "")
        self._stamp(root)
        self._nodes[1] = root
        self.calls: list[str] = []

    # --- helpers --------------------------------------------------------------------------------
    def _now(self) -> int:
        self._clock[0] += 1000
        return self._clock[0]

    def _stamp(self, node: _Node, data: bool = True) -> None:
        now = self._now()
        if data:
            node.mtime_ns = now
        node.ctime_ns = now
        node.change += 1

    def handle_of(self, fileid: int) -> bytes:
        return _FH.pack(_MAGIC, self.share_id, fileid)

    def _node(self, fh: bytes) -> _Node:
        if len(fh) != _FH.size or fh[:4] != _MAGIC:
            raise FsError(FsErrno.BADHANDLE)
        magic, share, fileid = _FH.unpack(fh)
        if share != self.share_id:
            raise FsError(FsErrno.BADHANDLE)
        node = self._nodes.get(fileid)
        if node is None:
            raise FsError(FsErrno.STALE)
        return node

    def _dir(self, fh: bytes) -> _Node:
        node = self._node(fh)
        if node.type != FileType.DIR:
            raise FsError(FsErrno.NOTDIR)
        return node

    def _attr(self, n: _Node) -> Attr:
        size = len(n.data) if n.type == FileType.REG else 4096
        return Attr(type=n.type, mode=n.mode, nlink=2 if n.type == FileType.DIR else 1,
                    uid=n.uid, gid=n.gid, size=size, used=size, fsid=self.fsid,
                    fileid=n.fileid, atime_ns=n.atime_ns, mtime_ns=n.mtime_ns,
                    ctime_ns=n.ctime_ns, change=n.change)

    @staticmethod
    def _may(cred: Cred, n: _Node, want: int, *, owner_override: bool = False) -> bool:
        if cred.uid == 0:
            if want & _X and n.type == FileType.REG and not n.mode & 0o111:
                return False
            return True
        if owner_override and cred.uid == n.uid:
            return True
        if cred.uid == n.uid:
            bits = (n.mode >> 6) & 7
        elif cred.gid == n.gid or n.gid in cred.gids:
            bits = (n.mode >> 3) & 7
        else:
            bits = n.mode & 7
        return bits & want == want

    def _need(self, cred: Cred, n: _Node, want: int, **kw: bool) -> None:
        if not self._may(cred, n, want, **kw):
            raise FsError(FsErrno.ACCES)

    def _mutating(self) -> None:
        if self.read_only:
            raise FsError(FsErrno.ROFS)

    @staticmethod
    def _check_name(name: str) -> None:
        raw = name.encode("utf-8", "surrogateescape")
        if not raw or b"/" in raw or b"\0" in raw or name in (".", ".."):
            raise FsError(FsErrno.INVAL)
        if len(raw) > 255:
            raise FsError(FsErrno.NAMETOOLONG)

    def _path_len(self, n: _Node) -> int:
        total = 0
        while n.fileid != 1:
            total += len(n.name.encode("utf-8", "surrogateescape")) + 1
            n = self._nodes[n.parent]
        return total

    def _apply(self, cred: Cred, n: _Node, c: SetAttr) -> None:
        owner = cred.uid == 0 or cred.uid == n.uid
        if c.mode is not None:
            if not owner:
                raise FsError(FsErrno.PERM)
            n.mode = c.mode & 0o7777
        if c.uid is not None and c.uid != n.uid:
            if cred.uid != 0:
                raise FsError(FsErrno.PERM)
            n.uid = c.uid
        if c.gid is not None and c.gid != n.gid:
            if not (cred.uid == 0 or (owner and (c.gid == cred.gid or c.gid in cred.gids))):
                raise FsError(FsErrno.PERM)
            n.gid = c.gid
        if c.size is not None:
            if n.type != FileType.REG:
                raise FsError(FsErrno.ISDIR)  # truncate(2) of a directory: EISDIR
            self._need(cred, n, _W, owner_override=True)
            if c.size < len(n.data):
                del n.data[c.size:]
            else:
                n.data.extend(bytes(c.size - len(n.data)))
            n.mtime_ns = self._now()
        for given, server, attr in ((c.atime_ns, c.atime_server, "atime_ns"),
                                    (c.mtime_ns, c.mtime_server, "mtime_ns")):
            if given is not None:
                if not owner:
                    raise FsError(FsErrno.PERM)
                setattr(n, attr, given)
            elif server:
                if not owner and not self._may(cred, n, _W):
                    raise FsError(FsErrno.ACCES)
                setattr(n, attr, self._now())
        self._stamp(n, data=False)

    # --- FileSystem -------------------------------------------------------------------------------
    def root_handle(self) -> bytes:
        return self.handle_of(1)

    def getattr(self, fh: bytes) -> Attr:
        with self._lock:
            return self._attr(self._node(fh))

    def setattr(self, cred: Cred, fh: bytes, changes: SetAttr,
                guard_ctime_ns: int | None = None) -> Attr:
        with self._lock:
            n = self._node(fh)
            self._mutating()
            if guard_ctime_ns is not None and guard_ctime_ns != n.ctime_ns:
                raise FsError(FsErrno.NOT_SYNC)
            self._apply(cred, n, changes)
            return self._attr(n)

    def lookup(self, cred: Cred, dir_fh: bytes, name: str) -> tuple[bytes, Attr]:
        with self._lock:
            d = self._dir(dir_fh)
            self._need(cred, d, _X)
            if name == "..":
                p = self._nodes[d.parent]
                return self.handle_of(p.fileid), self._attr(p)
            self._check_name(name)
            fileid = d.children.get(name)
            if fileid is None:
                raise FsError(FsErrno.NOENT)
            return self.handle_of(fileid), self._attr(self._nodes[fileid])

    def access(self, cred: Cred, fh: bytes, requested: int) -> int:
        with self._lock:
            n = self._node(fh)
            granted = 0
            if n.type == FileType.DIR:
                table = {ACCESS_READ: _R, ACCESS_LOOKUP: _X, ACCESS_MODIFY: _W | _X,
                         ACCESS_EXTEND: _W | _X, ACCESS_DELETE: _W | _X}
            else:
                table = {ACCESS_READ: _R, ACCESS_MODIFY: _W, ACCESS_EXTEND: _W,
                         ACCESS_EXECUTE: _X}
            for bit, want in table.items():
                if requested & bit and self._may(cred, n, want):
                    granted |= bit
            if self.read_only:
                granted &= ~(ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE)
            return granted

    def read(self, cred: Cred, fh: bytes, offset: int, count: int) -> tuple[bytes, bool]:
        with self._lock:
            n = self._node(fh)
            if n.type != FileType.REG:
                raise FsError(FsErrno.ISDIR)
            self._need(cred, n, _R, owner_override=True)
            data = bytes(n.data[offset:offset + count])
            return data, offset + len(data) >= len(n.data)

    def write(self, cred: Cred, fh: bytes, offset: int, data: bytes | memoryview,
              stable: bool) -> tuple[int, bool, Attr]:
        with self._lock:
            n = self._node(fh)
            if n.type != FileType.REG:
                raise FsError(FsErrno.ISDIR)
            self._mutating()
            self._need(cred, n, _W, owner_override=True)
            end = offset + len(data)
            if end > len(n.data):
                n.data.extend(bytes(end - len(n.data)))
            n.data[offset:end] = data
            self._stamp(n)
            if stable:
                n.durable = bytes(n.data)
            return len(data), stable, self._attr(n)

    def commit(self, cred: Cred, fh: bytes) -> Attr:
        with self._lock:
            n = self._node(fh)
            n.durable = bytes(n.data)
            self.calls.append("commit")
            return self._attr(n)

    def create(self, cred: Cred, dir_fh: bytes, name: str, mode: CreateMode, *,
               attrs: SetAttr | None = None, verifier: bytes | None = None) -> tuple[bytes, Attr]:
        with self._lock:
            d = self._dir(dir_fh)
            self._mutating()
            self._check_name(name)
            existing = d.children.get(name)
            if existing is not None:
                n = self._nodes[existing]
                if mode == CreateMode.UNCHECKED and n.type == FileType.REG:
                    if attrs is not None and attrs.size is not None:
                        self._apply(cred, n, SetAttr(size=attrs.size))
                    return self.handle_of(n.fileid), self._attr(n)
                if mode == CreateMode.EXCLUSIVE and n.verifier == verifier:
                    return self.handle_of(n.fileid), self._attr(n)
                raise FsError(FsErrno.EXIST)
            self._need(cred, d, _W | _X)
            n = self._new(cred, d, name, FileType.REG, 0o644, attrs)
            if mode == CreateMode.EXCLUSIVE:
                n.verifier = verifier
            return self.handle_of(n.fileid), self._attr(n)

    def _new(self, cred: Cred, d: _Node, name: str, kind: FileType, default_mode: int,
             attrs: SetAttr | None) -> _Node:
        if self._path_len(d) + 1 + len(name.encode("utf-8", "surrogateescape")) > 1024:
            raise FsError(FsErrno.NAMETOOLONG)
        n = _Node(next(self._ids), kind, default_mode, cred.uid, cred.gid, d.fileid, name)
        n.atime_ns = self._now()
        self._stamp(n)
        self._nodes[n.fileid] = n
        d.children[name] = n.fileid
        self._stamp(d)
        if attrs is not None:
            self._apply(Cred(0, 0), n, SetAttr(mode=attrs.mode, size=attrs.size,
                                                atime_ns=attrs.atime_ns, mtime_ns=attrs.mtime_ns))
        return n

    def mkdir(self, cred: Cred, dir_fh: bytes, name: str,
              attrs: SetAttr | None = None) -> tuple[bytes, Attr]:
        with self._lock:
            d = self._dir(dir_fh)
            self._mutating()
            self._check_name(name)
            if name in d.children:
                raise FsError(FsErrno.EXIST)
            self._need(cred, d, _W | _X)
            n = self._new(cred, d, name, FileType.DIR, 0o755, attrs)
            return self.handle_of(n.fileid), self._attr(n)

    def _unlink(self, cred: Cred, dir_fh: bytes, name: str, kind: FileType) -> None:
        with self._lock:
            d = self._dir(dir_fh)
            self._mutating()
            self._check_name(name)
            fileid = d.children.get(name)
            if fileid is None:
                raise FsError(FsErrno.NOENT)
            n = self._nodes[fileid]
            if n.type != kind:
                raise FsError(FsErrno.ISDIR if n.type == FileType.DIR else FsErrno.NOTDIR)
            if n.children:
                raise FsError(FsErrno.NOTEMPTY)
            self._need(cred, d, _W | _X)
            del d.children[name]
            del self._nodes[fileid]
            self._stamp(d)

    def remove(self, cred: Cred, dir_fh: bytes, name: str) -> None:
        self._unlink(cred, dir_fh, name, FileType.REG)

    def rmdir(self, cred: Cred, dir_fh: bytes, name: str) -> None:
        self._unlink(cred, dir_fh, name, FileType.DIR)

    def rename(self, cred: Cred, from_dir: bytes, from_name: str,
               to_dir: bytes, to_name: str) -> None:
        with self._lock:
            src, dst = self._dir(from_dir), self._dir(to_dir)
            self._mutating()
            self._check_name(from_name)
            self._check_name(to_name)
            fileid = src.children.get(from_name)
            if fileid is None:
                raise FsError(FsErrno.NOENT)
            self._need(cred, src, _W | _X)
            self._need(cred, dst, _W | _X)
            n = self._nodes[fileid]
            walk = dst
            while n.type == FileType.DIR:
                if walk.fileid == n.fileid:
                    raise FsError(FsErrno.INVAL)
                if walk.fileid == 1:
                    break
                walk = self._nodes[walk.parent]
            target = dst.children.get(to_name)
            if target == fileid:
                return
            if target is not None:
                t = self._nodes[target]
                if t.type != n.type:
                    raise FsError(FsErrno.ISDIR if t.type == FileType.DIR else FsErrno.NOTDIR)
                if t.children:
                    raise FsError(FsErrno.NOTEMPTY)
                del self._nodes[target]
            if self._path_len(dst) + 1 + len(to_name.encode("utf-8", "surrogateescape")) > 1024:
                raise FsError(FsErrno.NAMETOOLONG)
            del src.children[from_name]
            dst.children[to_name] = fileid
            n.parent, n.name = dst.fileid, to_name
            self._stamp(src)
            self._stamp(dst)
            self._stamp(n, data=False)

    def readdir(self, cred: Cred, dir_fh: bytes, cookie: int, cookieverf: bytes,
                max_entries: int) -> tuple[Sequence[DirEntry], bool, bytes]:
        with self._lock:
            d = self._dir(dir_fh)
            self._need(cred, d, _R)
            if cookie and cookieverf != bytes(8) and cookieverf != _COOKIEVERF:
                raise FsError(FsErrno.BAD_COOKIE)
            ids = sorted(i for i in d.children.values() if i > cookie)
            out = [DirEntry(self._nodes[i].name, i, i, self.handle_of(i),
                            self._attr(self._nodes[i])) for i in ids[:max_entries]]
            return out, len(ids) <= max_entries, _COOKIEVERF

    def fsstat(self) -> FsStat:
        return FsStat(1 << 40, 1 << 39, 1 << 39, 1 << 20, 1 << 19, 1 << 19)

    # --- test helpers -------------------------------------------------------------------------
    def crash(self) -> None:
        """Lose every write not made durable and change the write verifier."""
        with self._lock:
            for n in self._nodes.values():
                if n.type == FileType.REG:
                    n.data = bytearray(n.durable)
            self.write_verifier = os.urandom(8)

    def durable_bytes(self, fh: bytes) -> bytes:
        with self._lock:
            return self._node(fh).durable


def memfs_handle_share(fh: bytes) -> int | None:
    """The share id a MemFs handle carries, None for bytes that are not one."""
    if len(fh) != _FH.size or fh[:4] != _MAGIC:
        return None
    return int(_FH.unpack(fh)[1])


class MemExports:
    """Shares by export path; handles carry the share id (as the real registry's do)."""

    def __init__(self, handle_share: Callable[[bytes], int | None] | None = None) -> None:
        self._shares: list[tuple[str, Any, ExportOptions]] = []
        self._handle_share = handle_share or memfs_handle_share

    def add(self, path: str, fs: Any, opts: ExportOptions | None = None) -> Any:
        self._shares.append((path, fs, opts or ExportOptions()))
        return fs

    def exports(self) -> Sequence[tuple[str, MemFs, ExportOptions]]:
        return list(self._shares)

    def by_path(self, path: str) -> tuple[MemFs, ExportOptions] | None:
        for p, fs, opts in self._shares:
            if p == path:
                return fs, opts
        return None

    def by_handle(self, fh: bytes) -> tuple[MemFs, ExportOptions] | None:
        share = self._handle_share(fh)
        if share is None:
            return None
        for _, fs, opts in self._shares:
            if fs.share_id == share:
                return fs, opts
        return None

    def allowed(self, opts: ExportOptions, client_host: str) -> bool:
        try:
            addr = ipaddress.ip_address(client_host)
        except ValueError:
            return False
        return any(addr in ipaddress.ip_network(c, strict=False) for c in opts.clients
                   if ipaddress.ip_network(c, strict=False).version == addr.version)

    def squash(self, opts: ExportOptions, cred: Cred) -> Cred:
        if opts.squash == "all" or (opts.squash == "root" and cred.uid == 0):
            return Cred(opts.anon_uid, opts.anon_gid, (), cred.machine)
        return cred
