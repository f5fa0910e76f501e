"""MOUNT v3 (RFC 1813 appendix I): RPC program 100005 over the share registry (``Exports``).

NULL, MNT, DUMP, UMNT, UMNTALL and EXPORT. MNT gives the root file handle of a share (or of a
directory under it: ``/share1/sub`` walks ``sub`` with the caller's squashed credential) and
the auth flavors the NFS program accepts, ``[AUTH_SYS]``.

Invariants:
- A client outside the share's CIDRs gets MNT3ERR_ACCES and no handle; an unknown path gets
  MNT3ERR_NOENT; a path over MNTPATHLEN (1,024 bytes) gets MNT3ERR_NAMETOOLONG (decoded with
  a larger cap so the client hears the RFC's status rather than GARBAGE_ARGS).
- The mount list (for DUMP) is informational, as in every implementation: kept in memory, at
  most ``MAX_MOUNTS`` entries (oldest dropped), one per (client address, path).
- Nothing here touches the object store: only ``FileSystem.root_handle``/``lookup``/``getattr``.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections import OrderedDict

from fileshare.fs import Cred, ExportOptions, Exports, FileSystem, FileType, FsErrno, FsError
from fileshare.rpc import AcceptStat, AuthFlavor, RpcCall, RpcError
from fileshare.xdr import Packer, Unpacker, XdrError

log = logging.getLogger("vtl.fileshare.mount")

MOUNT_PROG = 100005
MOUNT_V3 = 3
MNTPATHLEN = 1024
MNTNAMLEN = 255
FHSIZE3 = 64
MAX_MOUNTS = 10_000
_MAX_PATH_DECODE = 64 * 1024  # longer paths than this are GARBAGE_ARGS, not NAMETOOLONG


class MountProc(enum.IntEnum):
    NULL = 0
    MNT = 1
    DUMP = 2
    UMNT = 3
    UMNTALL = 4
    EXPORT = 5


class MountStat(enum.IntEnum):
    """mountstat3."""

    OK = 0
    PERM = 1
    NOENT = 2
    IO = 5
    ACCES = 13
    NOTDIR = 20
    INVAL = 22
    NAMETOOLONG = 63
    NOTSUPP = 10004
    SERVERFAULT = 10006


_FROM_FS = {e.value: MountStat(e.value) for e in FsErrno if e.value in MountStat._value2member_map_}


def call_cred(call: RpcCall, exports: Exports, opts: ExportOptions) -> Cred:
    """The caller's credential after the share's squash policy (AUTH_NONE: the anonymous id)."""
    if call.cred is None:
        return Cred(opts.anon_uid, opts.anon_gid)
    c = call.cred
    return exports.squash(opts, Cred(c.uid, c.gid, c.gids, c.machine))


def normalize_path(path: str) -> str:
    """``//a/b/`` -> ``/a/b``; the root stays ``/``."""
    parts = [p for p in path.split("/") if p and p != "."]
    return "/" + "/".join(parts)


class MountProgram:
    """RPC program 100005 version 3 (see the module docstring)."""

    prog = MOUNT_PROG
    versions = (MOUNT_V3,)

    def __init__(self, exports: Exports) -> None:
        self.exports = exports
        self._lock = threading.Lock()
        self._mounts: OrderedDict[tuple[str, str], None] = OrderedDict()

    # --- dispatch ----------------------------------------------------------------------------
    def handle(self, call: RpcCall) -> bytes:
        try:
            proc = MountProc(call.proc)
        except ValueError:
            raise RpcError(AcceptStat.PROC_UNAVAIL) from None
        u = Unpacker(call.body)
        try:
            if proc in (MountProc.MNT, MountProc.UMNT):
                path = u.opaque(_MAX_PATH_DECODE)
            u.done()
        except XdrError as exc:
            raise RpcError(AcceptStat.GARBAGE_ARGS, message=str(exc)) from exc
        if proc == MountProc.NULL:
            return b""
        if proc == MountProc.MNT:
            return self._mnt(call, path)
        if proc == MountProc.DUMP:
            return self._dump()
        if proc == MountProc.UMNT:
            self._forget(call.client_host, path)
            return b""
        if proc == MountProc.UMNTALL:
            self._forget(call.client_host, None)
            return b""
        return self._export()

    # --- procedures --------------------------------------------------------------------------
    def _mnt(self, call: RpcCall, raw_path: bytes) -> bytes:
        p = Packer()
        if len(raw_path) > MNTPATHLEN:
            p.enum(MountStat.NAMETOOLONG)
            return p.getvalue()
        path = normalize_path(raw_path.decode("utf-8", "surrogateescape"))
        try:
            fh = self._resolve(call, path)
        except FsError as exc:
            status = _FROM_FS.get(exc.errno, MountStat.IO)
            log.info("MNT %s from %s: %s", path, call.client_host, status.name)
            p.enum(status)
            return p.getvalue()
        with self._lock:
            key = (call.client_host, path)
            self._mounts[key] = None
            self._mounts.move_to_end(key)
            while len(self._mounts) > MAX_MOUNTS:
                self._mounts.popitem(last=False)
        p.enum(MountStat.OK)
        p.opaque(fh)
        p.array([int(AuthFlavor.AUTH_SYS)], p.uint)
        return p.getvalue()

    def _resolve(self, call: RpcCall, path: str) -> bytes:
        """The handle of ``path``: an export, or a directory below the longest export prefix."""
        found: tuple[FileSystem, ExportOptions] | None = None
        rest: list[str] = []
        parts = path.split("/")[1:] if path != "/" else []
        for cut in range(len(parts), -1, -1):
            found = self.exports.by_path("/" + "/".join(parts[:cut]))
            if found is not None:
                rest = parts[cut:]
                break
        if found is None:
            raise FsError(FsErrno.NOENT, f"no export {path}")
        fs, opts = found
        if not self.exports.allowed(opts, call.client_host):
            raise FsError(FsErrno.ACCES, f"{call.client_host} is not allowed")
        fh = fs.root_handle()
        if rest:
            cred = call_cred(call, self.exports, opts)
            for name in rest:
                if name == "..":
                    raise FsError(FsErrno.ACCES, "no way above the export")
                fh, attr = fs.lookup(cred, fh, name)
            if attr.type != FileType.DIR:
                raise FsError(FsErrno.NOTDIR, path)
        if not 0 < len(fh) <= FHSIZE3:
            raise FsError(FsErrno.SERVERFAULT, f"file handle of {len(fh)} bytes")
        return fh

    def _forget(self, host: str, raw_path: bytes | None) -> None:
        with self._lock:
            if raw_path is None:
                for key in [k for k in self._mounts if k[0] == host]:
                    del self._mounts[key]
            else:
                path = normalize_path(raw_path.decode("utf-8", "surrogateescape"))
                self._mounts.pop((host, path), None)

    def mounts(self) -> list[tuple[str, str]]:
        """(client address, path) of every mount not unmounted, oldest first."""
        with self._lock:
            return list(self._mounts)

    def _dump(self) -> bytes:
        p = Packer()
        for host, path in self.mounts():
            p.bool(True)
            p.string(host.encode()[:MNTNAMLEN])
            p.string(path.encode("utf-8", "surrogateescape")[:MNTPATHLEN])
        p.bool(False)
        return p.getvalue()

    def _export(self) -> bytes:
        p = Packer()
        for path, _fs, opts in self.exports.exports():
            p.bool(True)
            p.string(path.encode("utf-8", "surrogateescape")[:MNTPATHLEN])
            for cidr in opts.clients:
                p.bool(True)
                p.string(cidr.encode()[:MNTNAMLEN])
            p.bool(False)
        p.bool(False)
        return p.getvalue()


def pack_dirpath(path: str | bytes) -> bytes:
    """MNT/UMNT arguments (for clients and tests)."""
    p = Packer()
    p.string(path)
    return p.getvalue()
