"""ShareService: the NFS file shares of the gateway (AWS S3 File Gateway operations).

The catalog's ``file_shares`` table is the source of truth; at :meth:`ShareService.start`
each row becomes a live :class:`fileshare.objectfs.ObjectFS` over the gateway's object store,
and :meth:`ShareService.start_servers` serves them over ONC RPC: NFS (program 100003, v3 and
v4.1 where those programs exist), MOUNT (100005) and the portmapper (100000).

Invariants:

- The service *is* the :class:`fileshare.fs.Exports` registry the protocol programs ask. The
  registry is an immutable snapshot swapped whole under a lock, so RPC worker threads always
  see a consistent set of shares while control operations (on the event loop thread) change
  them live: a new share is mountable at once, an updated client list or squash applies to
  the very next call, a deleted share's handles stop resolving.
- File handles carry the share id (a random 32-bit number, never reused by a new share) and a
  MAC under a per-gateway secret kept in the catalog (setting ``fileshare_handle_key``).
- Each share keeps its file table in ``<data-dir>/shares/<name>-<id>.db`` and its cached
  files in ``<data-dir>/cache/shares/<name>-<id>/``; one cache budget covers every share.
- A portmapper port that cannot be bound (111 needs root) is logged and skipped; NFS and
  MOUNT ports that cannot be bound fail the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from catalog.db import Catalog
from fileshare.cache import FileCache
from fileshare.fs import Cred, ExportOptions, FileSystem, FsError
from fileshare.objectfs import (
    HandleCodec, ObjectFS, ShareConfig, ShareDefaults, handle_share_id,
)
from vtl.cloud.store import InvalidKey, ObjectStore, StorageClass, validate_key
from vtl.errors import Conflict, InvalidRequest, LimitExceeded, NotFound, check_args

log = logging.getLogger(__name__)

NFS_PROG, MOUNT_PROG, PORTMAP_PROG = 100003, 100005, 100000
MAX_SHARES = 10  # AWS: 10 file shares per S3 File Gateway
MAX_CLIENTS = 100
SQUASH = {"root": "root", "all": "all", "none": "none",
          "rootsquash": "root", "allsquash": "all", "nosquash": "none"}
STORAGE_CLASSES = {"STANDARD": StorageClass.STANDARD, "S3_STANDARD": StorageClass.STANDARD}
RESERVED_PREFIXES = ("tapes/", "volumes/", "snapshots/")
DEFAULT_CLIENTS = ("127.0.0.1/32", "::1/128")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
HANDLE_KEY_SETTING = "fileshare_handle_key"


@dataclass(frozen=True, slots=True)
class SharePorts:
    """Where the RPC programs listen (``vtl serve --nfs-port/--mount-port/--portmap-port``)."""

    host: str = "127.0.0.1"
    nfs: int = 2049
    mount: int = 20048
    portmap: int | None = 111  # None: no portmapper


@dataclass(frozen=True, slots=True)
class _Share:
    name: str
    share_id: int
    prefix: str
    fs: ObjectFS
    opts: ExportOptions
    row: dict[str, Any]


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_args = check_args


# --- validation of share settings ------------------------------------------------------------

def validate_share_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequest(f"invalid share name {name!r}: use 1-100 letters, digits, '.', '_' "
                             "or '-', starting with a letter or digit")
    return name


def normalize_prefix(prefix: object) -> str:
    """``"a/b"`` -> ``"a/b/"``; ``""`` is the whole store."""
    if not isinstance(prefix, str):
        raise InvalidRequest(f"invalid prefix {prefix!r}")
    text = prefix.strip("/")
    if not text:
        return ""
    text += "/"
    try:
        validate_key(text)
    except InvalidKey as exc:
        raise InvalidRequest(f"invalid prefix {prefix!r}: {exc.message}") from None
    if "//" in text:
        raise InvalidRequest(f"invalid prefix {prefix!r}: empty path component")
    if len(text.encode()) > 512:
        raise InvalidRequest(f"invalid prefix {prefix!r}: keep it under 512 bytes")
    return text


def validate_clients(clients: object) -> tuple[str, ...]:
    if isinstance(clients, str):
        clients = [clients]
    if not isinstance(clients, (list, tuple)) or not 1 <= len(clients) <= MAX_CLIENTS:
        raise InvalidRequest(f"give 1-{MAX_CLIENTS} client addresses or CIDR blocks")
    out = []
    for c in clients:
        try:
            out.append(str(ipaddress.ip_network(str(c), strict=False)))
        except ValueError:
            raise InvalidRequest(f"invalid client {c!r}: give an IP address or a CIDR block "
                                 "such as 10.0.0.0/8") from None
    return tuple(out)


def validate_squash(squash: object) -> str:
    value = SQUASH.get(str(squash).lower()) if squash is not None else None
    if value is None:
        raise InvalidRequest(f"invalid squash {squash!r}: use root, all or none")
    return value


def validate_mode(mode: object, what: str) -> int:
    if isinstance(mode, str):
        try:
            mode = int(mode, 8)
        except ValueError:
            raise InvalidRequest(f"invalid {what} {mode!r}: give octal digits such as 0644") \
                from None
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise InvalidRequest(f"invalid {what} {mode!r}: give an octal mode 0000-7777")
    return mode


def validate_id(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 4294967294:
        raise InvalidRequest(f"invalid {what} {value!r}: give a number 0-4294967294")
    return value


def validate_storage_class(value: object) -> str:
    name = str(value).upper()
    if name not in STORAGE_CLASSES:
        raise InvalidRequest(f"storage class {value!r} is not supported for file shares: use "
                             "STANDARD (the store interface has no IA classes yet)")
    return STORAGE_CLASSES[name].value


def validate_stale_after(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not \
            1 <= value <= 2_592_000:
        raise InvalidRequest(f"invalid cache-stale-after {value!r}: give 1-2592000 seconds "
                             "(AWS allows 300 s to 30 days)")
    return float(value)


class ShareService:
    """NFS file shares: catalog rows, live ObjectFS instances and the RPC servers."""

    def __init__(self, catalog: Catalog, data_dir: Path, store: ObjectStore, *,
                 ports: SharePorts | None = None, cache_size: int | None = None,
                 settle: float = 2.0, clock: Callable[[], float] = time.time,
                 uploader: bool = True, durable: bool = True) -> None:
        self.catalog = catalog
        self.db = catalog.db
        self.data_dir = Path(data_dir)
        self.store = store
        self.ports = ports or SharePorts()
        self.settle = settle
        self.clock = clock
        self.uploader = uploader
        self.durable = durable
        self.cache = FileCache(self.data_dir / "cache" / "shares", cache_size, durable=durable)
        self.codec: HandleCodec | None = None
        self._lock = threading.Lock()
        self._shares: dict[str, _Share] = {}
        self._by_id: dict[int, _Share] = {}
        self._servers: dict[str, Any] = {}
        self.nfs_port: int | None = None
        self.mount_port: int | None = None
        self.portmap_port: int | None = None

    # --- Service ---------------------------------------------------------------------------------
    def start(self) -> None:
        self.codec = HandleCodec(self._handle_key())
        (self.data_dir / "shares").mkdir(parents=True, exist_ok=True)
        for record in list(self.db["file_shares"].rows_where(order_by="name")):
            try:
                self._open(record)
            except Exception:
                log.exception("file share %s could not be opened", record["name"])

    def close(self) -> None:
        with self._lock:
            shares = list(self._shares.values())
            self._shares, self._by_id = {}, {}
        for share in shares:
            try:
                share.fs.close()
            except Exception:
                log.exception("closing share %s failed", share.name)

    def ops(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {
            "CreateNFSFileShare": self.create_share,
            "ListFileShares": self.list_shares,
            "DescribeNFSFileShares": self.describe_shares,
            "UpdateNFSFileShare": self.update_share,
            "RefreshCache": self.refresh_cache_op,
            "DeleteFileShare": self.delete_share_op,
        }

    def describe(self) -> dict[str, Any]:
        """What DescribeGatewayInformation adds: the RPC ports actually bound."""
        return {"nfs_host": self.ports.host, "nfs_port": self.nfs_port,
                "mount_port": self.mount_port, "portmap_port": self.portmap_port,
                "file_share_count": len(self._shares)}

    # --- RPC servers -----------------------------------------------------------------------------
    def _programs(self) -> tuple[Any, Any]:
        from fileshare.mount import MountProgram
        from fileshare.nfs import NfsProgram

        versions = []
        try:
            from fileshare.nfs3 import Nfs3Program
            versions.append(Nfs3Program(self))
        except ImportError:
            pass
        try:
            from fileshare.nfs4 import Nfs4Program
            versions.append(Nfs4Program(self))
        except ImportError:
            pass
        return NfsProgram(*versions), MountProgram(self)

    async def start_servers(self) -> None:
        """Bind NFS, MOUNT and the portmapper (in that order); see the module docstring."""
        from fileshare.portmap import PortmapProgram, PortRegistry
        from fileshare.server import RpcServer

        nfs, mount = self._programs()
        host = self.ports.host
        servers: dict[str, Any] = {}
        try:
            servers["nfs"] = RpcServer([nfs], host, self.ports.nfs)
            await servers["nfs"].start()
            servers["mount"] = RpcServer([mount], host, self.ports.mount, udp=True)
            await servers["mount"].start()
        except BaseException:
            for server in servers.values():
                with contextlib.suppress(Exception):
                    await server.stop()
            raise
        self._servers = servers
        self.nfs_port = servers["nfs"].port
        self.mount_port = servers["mount"].port
        if self.ports.portmap is not None:
            registry = PortRegistry()
            registry.register(NFS_PROG, nfs.versions, self.nfs_port, host)
            registry.register(MOUNT_PROG, mount.versions, self.mount_port, host, ("tcp", "udp"))
            pmap = PortmapProgram(registry)
            server = RpcServer([pmap], host, self.ports.portmap, udp=True)
            try:
                await server.start()
            except OSError as exc:
                log.warning("portmapper not started: cannot bind %s:%s (%s); clients must be "
                            "given the NFS and MOUNT ports", host, self.ports.portmap,
                            exc.strerror or exc)
                with contextlib.suppress(Exception):
                    await server.stop()
            else:
                registry.register(PORTMAP_PROG, pmap.versions, server.port, host, ("tcp", "udp"))
                self._servers["portmap"] = server
                self.portmap_port = server.port
        log.info("file shares: NFS %s:%s, MOUNT %s, portmapper %s", host, self.nfs_port,
                 self.mount_port, self.portmap_port or "off")

    async def stop_servers(self) -> None:
        servers, self._servers = self._servers, {}
        for name in ("portmap", "mount", "nfs"):
            server = servers.get(name)
            if server is not None:
                try:
                    await server.stop()
                except Exception:
                    log.exception("stopping the %s server failed", name)

    # --- Exports ---------------------------------------------------------------------------------
    def exports(self) -> Sequence[tuple[str, FileSystem, ExportOptions]]:
        with self._lock:
            return [(f"/{s.name}", s.fs, s.opts) for s in self._shares.values()]

    def by_path(self, path: str) -> tuple[FileSystem, ExportOptions] | None:
        name = path.strip("/")
        with self._lock:
            share = self._shares.get(name)
        return (share.fs, share.opts) if share is not None else None

    def by_handle(self, fh: bytes) -> tuple[FileSystem, ExportOptions] | None:
        share_id = handle_share_id(bytes(fh))
        if share_id is None:
            return None
        with self._lock:
            share = self._by_id.get(share_id)
        return (share.fs, share.opts) if share is not None else None

    def allowed(self, opts: ExportOptions, client_host: str) -> bool:
        try:
            addr = ipaddress.ip_address(client_host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        for cidr in opts.clients:
            try:
                if addr in ipaddress.ip_network(cidr, strict=False):
                    return True
            except ValueError:
                continue
        return False

    def squash(self, opts: ExportOptions, cred: Cred) -> Cred:
        if opts.squash == "all" or (opts.squash == "root" and cred.uid == 0):
            return Cred(opts.anon_uid, opts.anon_gid, (), cred.machine)
        if opts.squash == "root" and cred.gid == 0:
            return Cred(cred.uid, opts.anon_gid, tuple(g for g in cred.gids if g != 0),
                        cred.machine)
        return cred

    # --- opening shares --------------------------------------------------------------------------
    def _handle_key(self) -> bytes:
        raw = self.catalog.get_setting(HANDLE_KEY_SETTING)
        if not raw:
            raw = secrets.token_hex(32)
            self.catalog.set_setting(HANDLE_KEY_SETTING, raw)
        return bytes.fromhex(raw)

    def _config(self, row: dict[str, Any]) -> ShareConfig:
        return ShareConfig(
            read_only=bool(row["read_only"]),
            defaults=ShareDefaults(row["file_mode"], row["dir_mode"], row["owner_uid"],
                                   row["owner_gid"]),
            storage_class=StorageClass(row["storage_class"]),
            settle=self.settle, stale_after=row["stale_after"])

    @staticmethod
    def _options(row: dict[str, Any]) -> ExportOptions:
        return ExportOptions(clients=tuple(json.loads(row["clients"])), squash=row["squash"],
                             read_only=bool(row["read_only"]),
                             extra={"prefix": row["prefix"]})

    def _dir_name(self, row: dict[str, Any]) -> str:
        return f"{row['name']}-{row['share_id']:08x}"

    def _open(self, row: dict[str, Any]) -> _Share:
        assert self.codec is not None
        fs = ObjectFS(row["name"], row["share_id"], self.store, row["prefix"],
                      self.data_dir / "shares" / f"{self._dir_name(row)}.db", self.cache,
                      self.codec, config=self._config(row), clock=self.clock,
                      uploader=self.uploader, durable=self.durable)
        share = _Share(row["name"], row["share_id"], row["prefix"], fs, self._options(row), row)
        with self._lock:
            self._shares = {**self._shares, share.name: share}
            self._by_id = {**self._by_id, share.share_id: share}
        return share

    def share(self, name: str) -> _Share:
        with self._lock:
            share = self._shares.get(name)
        if share is None:
            raise NotFound(f"no file share {name!r}: see `vtl share list`")
        return share

    # --- operations ------------------------------------------------------------------------------
    def _info(self, share: _Share, *, detail: bool = False) -> dict[str, Any]:
        row = share.row
        out: dict[str, Any] = {
            "name": share.name,
            "file_share_id": f"share-{share.share_id:08X}",
            "path": f"/{share.name}",
            "prefix": share.prefix,
            "status": row["status"],
            "clients": list(share.opts.clients),
            "squash": share.opts.squash,
            "read_only": share.opts.read_only,
            "file_mode": f"{row['file_mode']:04o}",
            "dir_mode": f"{row['dir_mode']:04o}",
            "owner": f"{row['owner_uid']}:{row['owner_gid']}",
            "storage_class": row["storage_class"],
            "cache_stale_after": row["stale_after"],
            "nfs_host": self.ports.host,
            "nfs_port": self.nfs_port,
            "mount_port": self.mount_port,
            "portmap_port": self.portmap_port,
        }
        if detail:
            out.update(pending_uploads=share.fs.pending(), uploads=share.fs.uploads,
                       created_at=row["created_at"], updated_at=row["updated_at"])
        return out

    def create_share(self, args: dict[str, Any]) -> dict[str, Any]:
        _args(args, ("name",), ("prefix", "clients", "squash", "read_only", "file_mode",
                                "dir_mode", "owner_uid", "owner_gid", "storage_class",
                                "cache_stale_after"))
        name = validate_share_name(args["name"])
        prefix = normalize_prefix(args["prefix"] if args.get("prefix") is not None
                                  else f"{name}/")
        if any(prefix.startswith(p) or p.startswith(prefix) for p in RESERVED_PREFIXES):
            raise InvalidRequest(f"prefix {prefix!r} overlaps the appliance's own objects "
                                 f"({', '.join(RESERVED_PREFIXES)}): choose another --prefix")
        with self._lock:
            shares = dict(self._shares)
        if name in shares:
            raise Conflict(f"file share {name!r} exists")
        if len(shares) >= MAX_SHARES:
            raise LimitExceeded(f"at most {MAX_SHARES} file shares per gateway")
        for other in shares.values():
            if other.prefix.startswith(prefix) or prefix.startswith(other.prefix):
                raise Conflict(f"prefix {prefix!r} overlaps share {other.name!r} "
                               f"({other.prefix!r}): shares must not nest")
        share_id = secrets.randbits(32)
        while share_id == 0 or self.db.execute(
                "SELECT 1 FROM file_shares WHERE share_id = ?", [share_id]).fetchone():
            share_id = secrets.randbits(32)
        now = _utc_now()
        row = {
            "name": name, "share_id": share_id, "prefix": prefix, "status": "AVAILABLE",
            "clients": json.dumps(list(validate_clients(args.get("clients") or DEFAULT_CLIENTS))),
            "squash": validate_squash(args.get("squash", "root")),
            "read_only": int(bool(args.get("read_only", False))),
            "file_mode": validate_mode(args.get("file_mode", 0o666), "file mode"),
            "dir_mode": validate_mode(args.get("dir_mode", 0o777), "directory mode"),
            "owner_uid": validate_id(args.get("owner_uid", 65534), "owner uid"),
            "owner_gid": validate_id(args.get("owner_gid", 65534), "owner gid"),
            "storage_class": validate_storage_class(args.get("storage_class", "STANDARD")),
            "stale_after": validate_stale_after(args.get("cache_stale_after")),
            "created_at": now, "updated_at": now,
        }
        self.db["file_shares"].insert(row)
        try:
            share = self._open(row)
        except BaseException:
            self.db.execute("DELETE FROM file_shares WHERE name = ?", [name])
            raise
        log.info("file share %s created (prefix %r, clients %s)", name, prefix,
                 ", ".join(share.opts.clients))
        return self._info(share, detail=True)

    def list_shares(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        _args(args, ())
        with self._lock:
            shares = sorted(self._shares.values(), key=lambda s: s.name)
        return [self._info(s) for s in shares]

    def describe_shares(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        _args(args, (), ("names",))
        names = args.get("names")
        if names is None:
            with self._lock:
                names = sorted(self._shares)
        if isinstance(names, str):
            names = [names]
        return [self._info(self.share(str(n)), detail=True) for n in names]

    def update_share(self, args: dict[str, Any]) -> dict[str, Any]:
        _args(args, ("name",), ("clients", "squash", "read_only", "file_mode", "dir_mode",
                                "owner_uid", "owner_gid", "storage_class",
                                "cache_stale_after"))
        share = self.share(str(args["name"]))
        row = dict(share.row)
        if "clients" in args:
            row["clients"] = json.dumps(list(validate_clients(args["clients"])))
        if "squash" in args:
            row["squash"] = validate_squash(args["squash"])
        if "read_only" in args:
            row["read_only"] = int(bool(args["read_only"]))
        if "file_mode" in args:
            row["file_mode"] = validate_mode(args["file_mode"], "file mode")
        if "dir_mode" in args:
            row["dir_mode"] = validate_mode(args["dir_mode"], "directory mode")
        if "owner_uid" in args:
            row["owner_uid"] = validate_id(args["owner_uid"], "owner uid")
        if "owner_gid" in args:
            row["owner_gid"] = validate_id(args["owner_gid"], "owner gid")
        if "storage_class" in args:
            row["storage_class"] = validate_storage_class(args["storage_class"])
        if "cache_stale_after" in args:
            row["stale_after"] = validate_stale_after(args["cache_stale_after"])
        row["updated_at"] = _utc_now()
        self.db["file_shares"].update(share.name, {k: v for k, v in row.items() if k != "name"})
        share.fs.config = self._config(row)
        updated = replace(share, opts=self._options(row), row=row)
        with self._lock:
            self._shares = {**self._shares, share.name: updated}
            self._by_id = {**self._by_id, share.share_id: updated}
        return self._info(updated, detail=True)

    def refresh_cache(self, args: dict[str, Any]) -> dict[str, Any]:
        """RefreshCache, run to the end in the calling thread (tests, tools)."""
        return self._refresh_job(args)()

    def refresh_cache_op(self, args: dict[str, Any]) -> Awaitable[dict[str, Any]]:
        """RefreshCache as a control operation: arguments checked on the loop, the listing (one
        LIST per directory, HEADs of new objects) in a worker thread, so a large bucket does not
        stall NFS, iSCSI and other control clients meanwhile (ObjectFS is thread-safe)."""
        return asyncio.to_thread(self._refresh_job(args))

    def _refresh_job(self, args: dict[str, Any]) -> Callable[[], dict[str, Any]]:
        _args(args, ("name",), ("path", "recursive"))
        share = self.share(str(args["name"]))
        path = args.get("path") or "/"
        if not isinstance(path, str):
            raise InvalidRequest(f"invalid path {path!r}")
        recursive = bool(args.get("recursive", False))

        def run() -> dict[str, Any]:
            try:
                counts = share.fs.refresh(path, recursive)
            except FsError as exc:
                raise InvalidRequest(f"cannot refresh {path!r} of share {share.name}: "
                                     f"{exc}") from None
            return {"name": share.name, "path": "/" + path.strip("/"), **counts}

        return run

    def delete_share(self, args: dict[str, Any]) -> dict[str, Any]:
        """Delete a share; its objects stay in the bucket. Unsynced files upload first unless
        ``force`` (then they are lost, as AWS's ForceDelete aborts uploads)."""
        _args(args, ("name",), ("force",))
        share = self.share(str(args["name"]))
        force = bool(args.get("force", False))
        if not force:
            share.fs.flush()
        return self._remove_share(share, force)

    def delete_share_op(self, args: dict[str, Any]) -> Awaitable[dict[str, Any]]:
        """DeleteFileShare as a control operation: the upload of unsynced files runs in a worker
        thread (it may take long), the removal itself back on the loop."""
        _args(args, ("name",), ("force",))
        share = self.share(str(args["name"]))
        force = bool(args.get("force", False))

        async def run() -> dict[str, Any]:
            if not force:
                await asyncio.to_thread(share.fs.flush)
            return self._remove_share(share, force)

        return run()

    def _remove_share(self, share: _Share, force: bool) -> dict[str, Any]:
        current = self._shares.get(share.name)
        if current is None or current.share_id != share.share_id:
            raise NotFound(f"file share {share.name!r} was deleted meanwhile")
        share = current  # an update may have replaced the record (same fs)
        if not force:
            left = share.fs.pending()
            if left:
                raise Conflict(f"{left} file(s) of share {share.name} could not be uploaded "
                               "(is the store reachable?); retry, or delete with --force to "
                               "drop them")
        with self._lock:
            self._shares = {k: v for k, v in self._shares.items() if k != share.name}
            self._by_id = {k: v for k, v in self._by_id.items() if k != share.share_id}
        share.fs.close()
        self.db.execute("DELETE FROM file_shares WHERE name = ?", [share.name])
        self.cache.forget_share(self._dir_name(share.row))
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                (self.data_dir / "shares" / f"{self._dir_name(share.row)}.db{suffix}").unlink()
        log.info("file share %s deleted", share.name)
        return {"name": share.name, "deleted": True}
