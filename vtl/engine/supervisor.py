"""The appliance process: data directory, catalog, services, iSCSI portal and control API.

``Appliance(data_dir, listen).run()`` serves until SIGINT or SIGTERM, then stops cleanly
(servers first, then services, then the catalog) and returns, so ``vtl serve`` exits 0.

Invariants:

- One appliance per data directory: ``<data-dir>/vtl.lock`` is held with ``fcntl.flock`` for the
  whole life of the process (the kernel drops it if the process dies, so it is never stale).
- The gateway id (``sgw-`` + 8 uppercase hex digits, as AWS spells them) is generated once and
  kept in the catalog's settings; target names derive from it, so it never changes.
- Services expose ``start()``, ``close()`` and ``ops() -> {name: fn(args) -> JSON-able}``; every
  op is registered into the control API under its AWS Storage Gateway name.
- The library's element counts and changer type come from ``LibraryOptions`` (``vtl serve``
  flags); the changer type, once set, is kept in the catalog.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import vtl
from catalog.db import Catalog, open_catalog
from vtl.cloud.store import ObjectStore
from vtl.engine.control import ControlServer
from vtl.engine.workers import WorkerPool, default_workers
from vtl.errors import ApplianceError
from vtl.iscsi.server import IscsiServer
from vtl.iscsi.target import Targets
from vtl.library.elements import ElementLayout
from vtl.library.library import Library
from volumes.service import VolumeService

log = logging.getLogger(__name__)

#: Subdirectories of the data directory (catalog.db and control.sock sit beside them).
LAYOUT = ("cache", "store", "volumes")

class Service(Protocol):
    """What the supervisor needs from a gateway service (volumes, tape library, ...)."""

    def start(self) -> None: ...

    def close(self) -> None: ...

    def ops(self) -> dict[str, Any]: ...


def new_gateway_id() -> str:
    """A fresh AWS-like gateway id, e.g. ``sgw-1A2B3C4D``."""
    return "sgw-" + secrets.token_hex(4).upper()


@dataclass(frozen=True, slots=True)
class LibraryOptions:
    """How the tape library is laid out (FACTS.md: counts must be configurable)."""

    changer_type: str | None = None  # None: keep the catalog's setting (default STK-L700)
    storage_slots: int = 1600
    ie_slots: int = 1600

    def layout(self) -> ElementLayout:
        return ElementLayout(storage=self.storage_slots, import_export=self.ie_slots)


@dataclass(frozen=True, slots=True)
class CloudOptions:
    """Where tapes go when archived (``vtl serve --store/--s3-endpoint/--clock-speed``)."""

    store_url: str | None = None  # None: LocalStore at <data-dir>/store
    s3_endpoint: str | None = None
    clock_speed: float = 1.0
    cache_size: int | None = None
    s3_part_size: int | None = None  # multipart part size (S3 only; default 16 MiB)
    upload_rate: int | None = None  # upload bandwidth limit, bytes/s (S3 only)


@dataclass(frozen=True, slots=True)
class VolumeOptions:
    """Defaults of cached volumes (``vtl serve --volume-cache-size/--upload-buffer-size``)."""

    cache_bytes: int | None = None  # None: the volume service's default
    upload_buffer_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class ShareOptions:
    """NFS file shares (``vtl serve --nfs-port/--mount-port/--portmap-port``); 0 = any free port,
    ``portmap_port`` None = no portmapper. The host is the ``--listen`` host."""

    nfs_port: int = 2049
    mount_port: int = 20048
    portmap_port: int | None = 111
    cache_size: int | None = None
    settle: float = 2.0


class Appliance:
    """One appliance serving one data directory on one iSCSI portal."""

    def __init__(self, data_dir: Path, listen: tuple[str, int], *,
                 authority: str = vtl.DEFAULT_IQN_AUTHORITY,
                 library: LibraryOptions | None = None,
                 cloud: CloudOptions | None = None, workers: int | None = None,
                 volumes: VolumeOptions | None = None,
                 shares: ShareOptions | None = None) -> None:
        self.library_options = library or LibraryOptions()
        self.volume_options = volumes or VolumeOptions()
        self.share_options = shares or ShareOptions()
        self.cloud_options = cloud or CloudOptions()
        drives = self.library_options.layout().drives
        #: drive worker processes; 0 serves the drives in this process
        self.workers = default_workers(drives) if workers is None else max(0, min(workers, drives))
        self.pool: WorkerPool | None = None
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.listen = listen
        self.authority = authority
        self.gateway_id = ""
        self.iscsi_port: int | None = None
        self.catalog: Catalog | None = None
        self.targets = Targets()
        self.control = ControlServer(self.data_dir / "control.sock")
        self.services: list[tuple[str, Service]] = []
        self._lock_file: IO[str] | None = None
        self._iscsi: IscsiServer | None = None
        self._stopping = False

    # --- lifecycle -----------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until SIGINT or SIGTERM, then stop cleanly."""
        asyncio.run(self._serve_until_signalled())

    async def _serve_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig, stop)
        try:
            try:
                await self.start()
            except BaseException:
                await self.stop()
                raise
            await stop.wait()
            await self.stop()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals, stop: asyncio.Event) -> None:
        log.info("%s received, stopping", signal.Signals(sig).name)
        stop.set()

    async def start(self) -> None:
        """Lock and lay out the data dir, open the catalog, start services and servers."""
        self._acquire_lock()
        for sub in LAYOUT:
            (self.data_dir / sub).mkdir(exist_ok=True)
        self.catalog = open_catalog(self.data_dir / "catalog.db")
        self.gateway_id = self._gateway_id(self.catalog)

        # Bind the portal before starting services: a busy port fails fast, and the registry
        # is live, so targets the services add are served as soon as they are registered.
        host, port = self.listen
        if self.workers:
            self.pool = WorkerPool(self.workers,
                                   log_level=logging.getLevelName(logging.getLogger().level))
        self._iscsi = IscsiServer(self.targets, host, port, handoff=self.pool)
        await self._iscsi.start()
        self.iscsi_port = self._iscsi.port

        self._start_services(self.catalog)
        for name, service in self.services:  # services with network servers of their own
            start_servers = getattr(service, "start_servers", None)
            if start_servers is not None:
                await start_servers()
        self.control.register("DescribeGatewayInformation", self._describe_gateway)
        self.control.register("ListTargets", self._list_targets)
        for name, service in self.services:
            self.control.register_all(service.ops())
        await self.control.start()
        if self.pool is not None:
            self.pool.start_monitor()
        log.info("vtl %s gateway %s: iSCSI portal %s:%s, %d target(s), control %s",
                 vtl.__version__, self.gateway_id, host, self.iscsi_port,
                 len(self.targets.targets()), self.control.path)

    async def stop(self) -> None:
        """Stop servers, close services and the catalog, release the lock. Idempotent."""
        if self._stopping or self._lock_file is None:
            return  # already stopped, or never started (e.g. the data dir was busy)
        self._stopping = True
        try:
            await self.control.stop()
        except Exception:
            log.exception("stopping the control API failed")
        if self._iscsi is not None:
            try:
                await self._iscsi.stop()
            except Exception:
                log.exception("stopping the iSCSI server failed")
            self._iscsi = None
        for name, service in reversed(self.services):
            stop_servers = getattr(service, "stop_servers", None)
            if stop_servers is not None:
                try:
                    await stop_servers()
                except Exception:
                    log.exception("stopping the %s servers failed", name)
        for name, service in reversed(self.services):
            try:
                service.close()
            except Exception:
                log.exception("closing the %s service failed", name)
        self.services.clear()
        if self.pool is not None:
            try:
                await self.pool.stop()
            except Exception:
                log.exception("stopping the drive workers failed")
            self.pool = None
        if self.catalog is not None:
            self.catalog.close()
            self.catalog = None
        self._release_lock()
        log.info("stopped")

    # --- pieces --------------------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ApplianceError(f"cannot create data dir {self.data_dir}: "
                                 f"{exc.strerror or exc}") from None
        path = self.data_dir / "vtl.lock"
        lock = open(path, "a+", encoding="ascii")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise ApplianceError(
                f"data dir {self.data_dir} is in use by another appliance (pid {holder}); "
                "stop it or choose another --data-dir", code="GatewayBusy") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock_file = lock

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.seek(0)
            self._lock_file.truncate()
            self._lock_file.close()  # closing drops the flock
            self._lock_file = None

    @staticmethod
    def _gateway_id(catalog: Catalog) -> str:
        gateway_id = catalog.get_setting("gateway_id")
        if not gateway_id:
            gateway_id = new_gateway_id()
            catalog.set_setting("gateway_id", gateway_id)
            log.info("new gateway id %s", gateway_id)
        return gateway_id

    def _start_services(self, catalog: Catalog) -> None:
        from vtl.engine.cloudsetup import build_store

        # one object store for the whole appliance: volume snapshots/cached volumes and tapes
        built = build_store(catalog, self.data_dir, self.cloud_options)
        vopts = self.volume_options
        self._add_service("volumes", VolumeService(
            catalog, self.data_dir, self.targets, self.authority, store=built[1],
            cache_bytes=vopts.cache_bytes, upload_buffer_bytes=vopts.upload_buffer_bytes))
        opts = self.library_options
        library = Library(catalog, self.data_dir, self.targets, self.authority, self.gateway_id,
                          changer_type=opts.changer_type, layout=opts.layout(),
                          drive_host=self.pool)
        self._add_service("library", library)
        self._add_service("cloud", self._cloud_service(catalog, library, built))
        self._add_service("shares", self._share_service(catalog, built[1]))

    def _cloud_service(self, catalog: Catalog, library: Library, built: Any = None) -> Service:
        from vtl.engine.cloudsetup import build_cloud_service

        return build_cloud_service(catalog, self.data_dir, library, self.cloud_options,
                                   built=built)

    def _share_service(self, catalog: Catalog, store: ObjectStore) -> Service:
        from fileshare.service import SharePorts, ShareService

        opts = self.share_options
        ports = SharePorts(host=self.listen[0], nfs=opts.nfs_port, mount=opts.mount_port,
                           portmap=opts.portmap_port)
        # the one object store of the appliance (vtl/engine/cloudsetup.py build_store)
        return ShareService(catalog, self.data_dir, store, ports=ports,
                            cache_size=opts.cache_size, settle=opts.settle)

    def _add_service(self, name: str, service: Service) -> None:
        service.start()
        self.services.append((name, service))
        log.info("%s service started", name)

    # --- the supervisor's own control operations ----------------------------------------------
    def _describe_gateway(self, args: dict[str, Any]) -> dict[str, Any]:
        host, _ = self.listen
        return {
            "gateway_id": self.gateway_id,
            "version": vtl.__version__,
            "listen": f"{host}:{self.iscsi_port}" if self.iscsi_port is not None else None,
            "iscsi_host": host,
            "iscsi_port": self.iscsi_port,
            "iqn_authority": self.authority,
            "target_count": len(self.targets.targets()),
            "data_dir": str(self.data_dir),
            "services": [name for name, _ in self.services],
            "pid": os.getpid(),
            "workers": self.workers,
            "worker_pids": self.pool.pids() if self.pool is not None else [],
            **{key: value for _, service in self.services
               if callable(getattr(service, "describe", None))
               for key, value in service.describe().items()},  # type: ignore[attr-defined]
        }

    def _list_targets(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for target in self.targets.targets():
            auth = target.auth
            out.append({
                "target_iqn": target.name,
                "alias": target.alias,
                "chap": auth.chap is not None,
                "mutual_chap": auth.mutual is not None,
                "initiators": (sorted(auth.allowed_initiators)
                               if auth.allowed_initiators is not None else None),
            })
        return out
