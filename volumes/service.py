"""VolumeService: stored and cached volumes as iSCSI targets, with AWS Storage Gateway names.

A stored volume is one sparse file ``<data-dir>/volumes/<name>.img`` (plus ``<name>.img.1``
past 8 TiB, see ``volumes.stored``); a cached volume is a directory
``<data-dir>/volumes/<name>.cached/`` (chunk map, journal, cache file: ``volumes.cached``) whose
data lives in the object store. Each is served by a :class:`volumes.sbc.BlockDevice` as LUN 0
of its own iSCSI target ``<authority>:<name>``. The catalog's ``volumes`` table is the source
of truth; the live targets are derived from it in :meth:`VolumeService.start`.

Statuses (AWS VolumeStatus): CREATING, AVAILABLE, RESTORING (stored, from a snapshot, chunks
being fetched), BOOTSTRAPPING (cached, from a snapshot, cache being warmed), PASS THROUGH
(reported while a cached volume's upload buffer is full and writes wait), DELETING,
IRRECOVERABLE (its local data cannot be opened). UPLOAD BUFFER NOT CONFIGURED is defined for
completeness: every cached volume has an upload buffer here.

Invariants:
- Creation is crash-safe: the row is written with status CREATING before the files exist, and
  set to its first served status only after they are durable and the target is registered.
  ``start()`` completes a CREATING row whose data is whole (full-size file and, from a
  snapshot, the restore state; a cached volume's map), and removes any other leftover (row and
  partial files); a DELETING row is finished off the same way.
- Deletion unregisters the target first (no new logins), then closes the device (commands of
  sessions still logged in end with NOT READY instead of touching a closed file), then removes
  the file and finally the rows.
- Limits follow AWS (FACTS.md): stored volumes 1 GiB-16 TiB each and 512 TiB in total, cached
  volumes 1 GiB-32 TiB each and 1,024 TiB in total; at most 32 volumes of both types.
- With an object store (the appliance always has one), a stored volume is served through a
  :class:`volumes.snapshots.SnapshotTracker` (state in ``<name>.snap/``), so snapshots are
  incremental and point-in-time while writes go on; a volume made from a snapshot is served
  through a :class:`volumes.snapshots.RestoringBackend` (status RESTORING, readable at once)
  until a background fill has fetched every chunk, then AVAILABLE. Snapshots, schedules and
  chunk collection live in :mod:`volumes.snapservice`.
- CHAP secrets are kept in the catalog in clear text (the iSCSI target needs them to compute
  CHAP responses); the catalog file is as sensitive as the control socket.
- Handlers run one at a time on the event loop thread (vtl.engine.control), so the service
  needs no lock of its own.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import asyncio
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

from catalog import volumes as vq
from catalog.db import Catalog
from volumes.chunks import CHUNK_BYTES, Manifest, chunk_count
from volumes.sbc import BlockDevice
from volumes.cached import MAP_FILE as CACHED_MAP_FILE, CachedBackend, remove_cached_files
from volumes.cachemap import ChunkMap
from volumes.snapservice import CachedSource as _CachedSource
from volumes.snapservice import GuardedChunkStore, SnapshotManager, retry_delay
from volumes.snapservice import TrackerSource as _TrackerSource
from volumes.snapservice import extend_manifest as _extend
from volumes.snapshots import (
    RestoringBackend, SnapshotBusy, SnapshotTracker, restoring, state_refs,
)
from volumes.stored import (
    SEGMENT_BYTES, StoredBackend, allocated_bytes, remove_volume_files, stored_size,
)
from vtl.cloud.store import ObjectStore, StoreError
from vtl.errors import (
    ApplianceError, Conflict, InvalidRequest, LimitExceeded, NotFound, check_args,
)
from vtl.iscsi.target import ChapCredentials, IscsiTarget, TargetAuth, Targets
from vtl.scsi.target import ScsiTarget

log = logging.getLogger(__name__)

GIB = 1024 ** 3
TIB = 1024 ** 4
MIN_VOLUME_BYTES = 1 * GIB
MAX_VOLUME_BYTES = 16 * TIB
MAX_CACHED_VOLUME_BYTES = 32 * TIB
MAX_VOLUMES = 32
MAX_TOTAL_BYTES = 512 * TIB
MAX_TOTAL_CACHED_BYTES = 1024 * TIB
DEFAULT_CACHE_BYTES = 1 * GIB
DEFAULT_UPLOAD_BUFFER_BYTES = 1 * GIB
MIN_CACHE_BYTES = 16 * CHUNK_BYTES
CHAP_SECRET_MIN, CHAP_SECRET_MAX = 12, 16
VOLUME_TYPES = ("stored", "cached")
NAME_MAX = 200
# Lower-case letters, digits, '.' and '-' as AWS allows in target names; starting with a letter
# or digit keeps "." and ".." (and hidden files) out of the volumes directory.
_NAME = re.compile(r"[a-z0-9][a-z0-9.-]*")
_CHAP_USER = re.compile(r"[\x21-\x7e]{1,255}")


class VolumeStatus(str, enum.Enum):
    """Volume statuses (AWS Storage Gateway VolumeStatus)."""

    CREATING = "CREATING"
    AVAILABLE = "AVAILABLE"
    BOOTSTRAPPING = "BOOTSTRAPPING"  # a cached volume made from a snapshot, cache warming
    RESTORING = "RESTORING"  # a stored volume made from a snapshot, chunks being fetched
    PASS_THROUGH = "PASS THROUGH"  # the upload buffer is full: writes wait for the cloud
    UPLOAD_BUFFER_NOT_CONFIGURED = "UPLOAD BUFFER NOT CONFIGURED"
    DELETING = "DELETING"
    IRRECOVERABLE = "IRRECOVERABLE"


#: Statuses of a volume that is served (its target is published).
SERVED = (VolumeStatus.AVAILABLE, VolumeStatus.BOOTSTRAPPING, VolumeStatus.RESTORING,
          VolumeStatus.PASS_THROUGH, VolumeStatus.UPLOAD_BUFFER_NOT_CONFIGURED)


@dataclass(slots=True)
class _LiveVolume:
    backend: Any  # the outermost BlockBackend the device serves
    device: BlockDevice
    target: IscsiTarget
    tracker: SnapshotTracker | None = None
    restore: RestoringBackend | None = None
    cached: CachedBackend | None = None
    fill: asyncio.Task[None] | None = None
    closed: bool = False  # unserved: background work on it stops


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _serial(name: str, created_at: str) -> str:
    """A unit serial number stable across restarts and distinct for a re-created volume."""
    return "VOL" + hashlib.sha256(f"{name}|{created_at}".encode()).hexdigest()[:13].upper()


_args = check_args


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= NAME_MAX or not _NAME.fullmatch(name):
        raise InvalidRequest(
            f"invalid volume name {name!r}: use 1-{NAME_MAX} lower-case letters, digits, '.' "
            "or '-', starting with a letter or digit")
    return name


def validate_size(size: object, vtype: str = "stored") -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidRequest(f"invalid size_bytes {size!r}: give a whole number of bytes")
    top = MAX_VOLUME_BYTES if vtype == "stored" else MAX_CACHED_VOLUME_BYTES
    if not MIN_VOLUME_BYTES <= size <= top:
        raise InvalidRequest(f"invalid size {size} bytes: a {vtype} volume is 1 GiB to "
                             f"{top // TIB} TiB")
    if size % 512:
        raise InvalidRequest(f"invalid size {size} bytes: use a multiple of 512 bytes")
    return size


def _secret(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidRequest(f"missing {what}: give a secret of 12-16 characters")
    raw = value.encode("utf-8")
    if not CHAP_SECRET_MIN <= len(raw) <= CHAP_SECRET_MAX:
        raise InvalidRequest(f"invalid {what}: it has {len(raw)} bytes, use 12-16 characters")
    return raw


def _user(value: object, what: str) -> str:
    if not isinstance(value, str) or not _CHAP_USER.fullmatch(value):
        raise InvalidRequest(f"invalid {what} {value!r}: use 1-255 printable characters, "
                             "no spaces")
    return value


class VolumeService:
    """Volumes: catalog rows, local files, cloud chunks and live iSCSI targets, kept in step."""

    def __init__(self, catalog: Catalog, data_dir: Path, targets: Targets, authority: str, *,
                 store: ObjectStore | None = None, cache_bytes: int | None = None,
                 upload_buffer_bytes: int | None = None,
                 now: Callable[[], str] = _utc_now) -> None:
        self.catalog = catalog
        self.data_dir = Path(data_dir)
        self.volume_dir = self.data_dir / "volumes"
        self.targets = targets
        self.authority = authority
        self._now = now
        self._live: dict[str, _LiveVolume] = {}
        self.store = store
        self.chunks = GuardedChunkStore(store) if store is not None else None
        self.cache_bytes = cache_bytes if cache_bytes is not None else DEFAULT_CACHE_BYTES
        self.upload_buffer_bytes = (upload_buffer_bytes if upload_buffer_bytes is not None
                                    else DEFAULT_UPLOAD_BUFFER_BYTES)
        self.snapshots = SnapshotManager(self, self.chunks) if self.chunks is not None else None
        self._fill_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vtl-restore")
        self._stopping = threading.Event()

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Finish or undo interrupted creations and deletions, then serve every volume."""
        self.volume_dir.mkdir(parents=True, exist_ok=True)
        for row in list(self.catalog.db["volumes"].rows):
            name, status = row["name"], row["status"]
            if status == VolumeStatus.CREATING:
                status = self._finish_creating(row)
                if status is None:
                    continue
            elif status == VolumeStatus.DELETING:
                log.info("volume %s: finishing an interrupted deletion", name)
                self._forget(name, row["target_iqn"])
                continue
            if status in SERVED:
                try:
                    self._serve(self._row(name))
                except (OSError, ApplianceError) as exc:
                    log.error("volume %s: cannot open its data (%s); marked IRRECOVERABLE",
                              name, exc)
                    self._set_status(name, VolumeStatus.IRRECOVERABLE)
        if self.snapshots is not None:
            self.snapshots.start()

    def _finish_creating(self, row: dict[str, Any]) -> VolumeStatus | None:
        """A CREATING row after a crash: completed if its data is whole, else removed."""
        name = row["name"]
        whole = False
        if row["type"] == "cached":
            whole = self._cached_exists(name)
        elif stored_size(self._path(name)) == row["size_bytes"]:
            whole = not row["source_snapshot"] or restoring(self._state_dir(name))
        if not whole:
            log.warning("volume %s: removing an interrupted creation", name)
            self._forget(name, row["target_iqn"])
            return None
        log.info("volume %s: completing an interrupted creation", name)
        status = self._initial_status(row)
        self._set_status(name, status)
        return status

    def _initial_status(self, row: dict[str, Any]) -> VolumeStatus:
        if row["source_snapshot"]:
            return (VolumeStatus.RESTORING if row["type"] == "stored"
                    else VolumeStatus.BOOTSTRAPPING)
        return VolumeStatus.AVAILABLE

    def close(self) -> None:
        """Stop snapshot and restore work, unregister every target, close the volumes."""
        self._stopping.set()
        if self.snapshots is not None:
            self.snapshots.close()
        for live in self._live.values():
            if live.fill is not None:
                live.fill.cancel()
        self._fill_pool.shutdown(wait=True, cancel_futures=True)
        for name in list(self._live):
            self._unserve(name)

    def ops(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        ops: dict[str, Callable[[dict[str, Any]], Any]] = {
            "CreateStorediSCSIVolume": self.create_stored_volume,
            "ListVolumes": self.list_volumes,
            "DescribeVolume": self.describe_volume,
            "DeleteVolume": self.delete_volume,
            "SetVolumeChap": self.set_volume_chap,
        }
        if self.snapshots is not None:
            ops.update(self.snapshots.ops())
            ops.update({
                "CreateCachediSCSIVolume": self.create_cached_volume,
                "CloneVolume": self.clone_volume,
                "ListVolumeRecoveryPoints": self.list_recovery_points,
            })
        return ops

    # --- operations --------------------------------------------------------------------------
    def create_stored_volume(self, args: dict[str, Any]) -> dict[str, Any]:
        """CreateStorediSCSIVolume {name, size_bytes, type="stored", snapshot_id?} -> volume.

        With ``snapshot_id`` the volume starts RESTORING: readable at once, chunks fetched in
        the background; ``size_bytes`` defaults to the snapshot's (it may be larger)."""
        _args(args, ("name",), ("size_bytes", "type", "snapshot_id"))
        vtype = args.get("type", "stored")
        if vtype != "stored":
            raise InvalidRequest(f"invalid volume type {vtype!r}: CreateStorediSCSIVolume makes "
                                 "'stored' volumes (CreateCachediSCSIVolume makes cached ones)")
        return self._create(args, "stored")

    def create_cached_volume(self, args: dict[str, Any]) -> dict[str, Any]:
        """CreateCachediSCSIVolume {name, size_bytes, snapshot_id?, cache_bytes?,
        upload_buffer_bytes?} -> the volume (primary data in the object store)."""
        _args(args, ("name",), ("size_bytes", "snapshot_id", "cache_bytes",
                                "upload_buffer_bytes"))
        return self._create(args, "cached")

    def _create(self, args: dict[str, Any], vtype: str, *, manifest: Manifest | None = None,
                defer: bool = False) -> dict[str, Any]:
        """Validate, write the CREATING row, then make the data and serve it; with ``defer``
        only the row is written and :meth:`_materialize` runs later (a clone whose recovery
        point is still uploading)."""
        name = validate_name(args["name"])
        sid = args.get("snapshot_id")
        if sid is not None and manifest is None:
            if self.snapshots is None:
                raise Conflict("volumes from snapshots need an object store")
            manifest = self.snapshots.completed_manifest(sid)
        size = args.get("size_bytes")
        if size is None:
            if manifest is None:
                raise InvalidRequest("missing argument 'size_bytes': give the volume's size")
            size = manifest.size_bytes
        size = validate_size(size, vtype)
        if manifest is not None and size < manifest.size_bytes:
            raise InvalidRequest(f"invalid size {size} bytes: snapshot {manifest.snapshot_id} "
                                 f"holds {manifest.size_bytes} bytes; make the volume at least "
                                 "that large")
        cache = buffer = None
        if vtype == "cached":
            if self.chunks is None:
                raise Conflict("cached volumes need an object store")
            cache = _limit(args.get("cache_bytes"), "cache_bytes", self.cache_bytes)
            buffer = _limit(args.get("upload_buffer_bytes"), "upload_buffer_bytes",
                            self.upload_buffer_bytes)
        target_iqn = self._iqn(name)
        db = self.catalog.db
        created_at = self._now()
        with db.conn:
            db.conn.execute("BEGIN IMMEDIATE")
            if db.execute("select 1 from volumes where name = ?", [name]).fetchone():
                raise Conflict(f"volume {name} exists already: pick another name or delete it")
            count = db.execute("select count(*) from volumes").fetchone()[0]
            if count >= MAX_VOLUMES:
                raise LimitExceeded(f"the gateway has {count} volumes, the maximum: "
                                    "delete one before creating another")
            total = db.execute("select coalesce(sum(size_bytes), 0) from volumes where type = ?",
                               [vtype]).fetchone()[0]
            top = MAX_TOTAL_BYTES if vtype == "stored" else MAX_TOTAL_CACHED_BYTES
            if total + size > top:
                raise LimitExceeded(
                    f"{vtype} volumes would total {(total + size) / TIB:.2f} TiB, over the "
                    f"{top // TIB} TiB limit: create a smaller volume or delete one")
            if self.targets.lookup(target_iqn) is not None:
                raise Conflict(f"target {target_iqn} is already served: pick another name")
            db.execute(
                "insert into volumes (name, type, size_bytes, status, target_iqn, lun, path, "
                "created_at, updated_at, description, source_snapshot, cache_bytes, "
                "upload_buffer_bytes) values (?, ?, ?, ?, ?, 0, ?, ?, ?, '', ?, ?, ?)",
                [name, vtype, size, VolumeStatus.CREATING.value, target_iqn,
                 str(self._path(name) if vtype == "stored" else self._cached_dir(name)),
                 created_at, created_at, manifest.snapshot_id if manifest else None,
                 cache, buffer])
        if defer:
            return self._info(self._row(name))
        self._materialize(name, vtype, size, cache, buffer, manifest)
        return self._info(self._row(name))

    def _materialize(self, name: str, vtype: str, size: int, cache: int | None,
                     buffer: int | None, manifest: Manifest | None) -> None:
        """Make the data of a CREATING volume, serve it, set its first served status."""
        target_iqn = self._iqn(name)
        try:
            self.volume_dir.mkdir(parents=True, exist_ok=True)
            if vtype == "stored":
                self._make_stored(name, size, manifest)
            else:
                self._make_cached(name, size, cache or 0, buffer or 0, manifest)
            self._serve(self._row(name))
        except OSError as exc:
            self._forget(name, target_iqn)
            if exc.errno == errno.EFBIG:
                raise InvalidRequest(
                    f"the file system under {self.volume_dir} cannot hold a file of "
                    f"{min(size, SEGMENT_BYTES)} bytes: create a smaller volume or put the data "
                    "directory on ext4 or XFS") from None
            raise ApplianceError(f"cannot create volume {name}: {exc.strerror or exc}: check "
                                 "the data directory's space and permissions",
                                 code="InternalServerError") from None
        except BaseException:
            self._forget(name, target_iqn)
            raise
        self._set_status(name, self._initial_status(self._row(name)))
        if vtype == "stored" and self.snapshots is not None:
            # AWS gives stored volumes a daily snapshot schedule by default, here at the hour
            # of creation (UTC)
            now = self._now()
            hour = int(now[11:13]) if len(now) >= 13 and now[11:13].isdigit() else 0
            self.snapshots.set_schedule(name, 24, hour, "")

    def _make_stored(self, name: str, size: int, manifest: Manifest | None) -> None:
        path = self._path(name)
        # stray files no row owns (e.g. from an old crash) are replaced
        remove_volume_files(path)
        shutil.rmtree(self._state_dir(name), ignore_errors=True)
        backend = StoredBackend.create(path, size)
        try:
            if manifest is not None:
                RestoringBackend(backend, self._state_dir(name), self._need_chunks(),
                                 _extend(manifest, size))  # writes the restore state
        finally:
            backend.close()

    def list_volumes(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        """ListVolumes {} -> [volume, ...] ordered by name."""
        _args(args, ())
        rows = self.catalog.db.execute_returning_dicts("select * from volumes order by name")
        return [self._info(row) for row in rows]

    def describe_volume(self, args: dict[str, Any]) -> dict[str, Any]:
        """DescribeVolume {name} -> the volume."""
        _args(args, ("name",))
        return self._info(self._row(args["name"]))

    def delete_volume(self, args: dict[str, Any]) -> dict[str, Any]:
        """DeleteVolume {name} -> {name, status: "DELETED"}.

        Sessions logged in to the target stay connected, but their commands now end with NOT
        READY; the initiator sees the LU disappear once it logs out. Its snapshots stay.
        """
        _args(args, ("name",))
        row = self._row(args["name"])
        name = row["name"]
        if self.snapshots is not None and any(
                r["status"] == "PENDING" for r in vq.list_snapshots(self.catalog.db, volume=name)):
            raise Conflict(f"volume {name} has a snapshot uploading: delete it once the "
                           "snapshot is COMPLETED")
        self._set_status(name, VolumeStatus.DELETING)
        self._unserve(name)
        self._forget(name, row["target_iqn"])
        return {"name": name, "status": "DELETED"}

    def clone_volume(self, args: dict[str, Any]) -> dict[str, Any]:
        """CloneVolume {name, new_name, type?} -> the new volume, made from the source's latest
        recovery point (cached: its uploaded data now; stored: its latest snapshot)."""
        _args(args, ("name", "new_name"), ("type",))
        row = self._row(args["name"])
        vtype = args.get("type") or row["type"]
        if vtype not in VOLUME_TYPES:
            raise InvalidRequest(f"invalid volume type {vtype!r}: use 'stored' or 'cached'")
        new = validate_name(args["new_name"])
        if row["type"] == "cached":
            return self._clone_cached(row, new, vtype)
        manifest = self._recovery_manifest(row)
        return self._create({"name": new, "size_bytes": row["size_bytes"],
                             "snapshot_id": manifest.snapshot_id}, vtype, manifest=manifest)

    def _clone_cached(self, row: dict[str, Any], new: str, vtype: str) -> dict[str, Any]:
        """The recovery point of a cached volume uploads as a snapshot job (origin "clone");
        the new volume stays CREATING until it completes, then is made from it. The event
        loop never waits for the upload. A restart in between removes both (the recovery
        point lives in memory)."""
        assert self.snapshots is not None
        if row["name"] not in self._live:
            raise Conflict(f"volume {row['name']} is {row['status']}: it has no recovery point")
        info = self._create({"name": new, "size_bytes": row["size_bytes"]}, vtype, defer=True)
        try:
            snap = self.snapshots.create_snapshot(
                {"name": row["name"], "description": f"recovery point of {row['name']} for "
                                                     f"clone {new}"},
                origin="clone", then=lambda m: self._finish_clone(new, vtype, m))
        except BaseException:
            self._forget(new, info["target_iqn"])
            raise
        self.catalog.db.execute("update volumes set source_snapshot = ? where name = ?",
                                [snap["snapshot_id"], new])
        return self._info(self._row(new))

    def _finish_clone(self, name: str, vtype: str, manifest: Manifest | None) -> None:
        try:
            row = self._row(name)
        except NotFound:
            return  # deleted while its recovery point uploaded
        if row["status"] != VolumeStatus.CREATING:
            return
        if manifest is None:
            log.error("clone %s: its recovery point failed; volume removed", name)
            self._forget(name, row["target_iqn"])
            return
        try:
            self._materialize(name, vtype, row["size_bytes"], row["cache_bytes"],
                              row["upload_buffer_bytes"], manifest)
        except Exception as exc:  # _materialize removed what it made
            log.error("clone %s cannot be made: %s", name, exc)

    def list_recovery_points(self, args: dict[str, Any]) -> dict[str, Any]:
        """ListVolumeRecoveryPoints {} -> {recovery_points: [{name, type, recovery_point,
        snapshot_id, size_bytes}]}: what CloneVolume would start from, per volume."""
        _args(args, ())
        out = []
        for row in self.catalog.db.execute_returning_dicts("select * from volumes order by name"):
            point = self._recovery_point(row)
            if point is not None:
                out.append(point)
        return {"recovery_points": out}

    def set_volume_chap(self, args: dict[str, Any]) -> dict[str, Any]:
        """SetVolumeChap {name, chap_user, chap_secret, mutual_user?, mutual_secret?,
        initiators?} -> {name, target_iqn, chap_user, mutual_user, initiators}.

        Persisted in ``target_auth`` and applied to the live target at once (new logins).
        """
        _args(args, ("name", "chap_user", "chap_secret"),
              ("mutual_user", "mutual_secret", "initiators"))
        row = self._row(args["name"])
        user = _user(args["chap_user"], "chap_user")
        secret = _secret(args["chap_secret"], "chap_secret")
        mutual_user, mutual_secret = args.get("mutual_user"), args.get("mutual_secret")
        if (mutual_user is None) != (mutual_secret is None):
            raise InvalidRequest("mutual CHAP needs both mutual_user and mutual_secret")
        if mutual_user is not None:
            mutual_user = _user(mutual_user, "mutual_user")
            if _secret(mutual_secret, "mutual_secret") == secret:
                raise InvalidRequest("mutual_secret must differ from chap_secret: pick another")
        initiators = args.get("initiators")
        if initiators is not None:
            if (not isinstance(initiators, list) or not initiators
                    or not all(isinstance(i, str) and i for i in initiators)):
                raise InvalidRequest("initiators must be a non-empty list of initiator names")
        record = {
            "target_iqn": row["target_iqn"], "chap_user": user, "chap_secret": args["chap_secret"],
            "mutual_user": mutual_user, "mutual_secret": mutual_secret,
            "initiators": json.dumps(sorted(set(initiators))) if initiators else None,
        }
        self.catalog.db.execute(
            "insert or replace into target_auth (target_iqn, chap_user, chap_secret, "
            "mutual_user, mutual_secret, initiators) values (?, ?, ?, ?, ?, ?)",
            [record["target_iqn"], user, record["chap_secret"], mutual_user, mutual_secret,
             record["initiators"]])
        live = self._live.get(row["name"])
        if live is not None:
            live.target.auth = _auth_from_record(record)
        return {"name": row["name"], "target_iqn": row["target_iqn"], "chap_user": user,
                "mutual_user": mutual_user,
                "initiators": sorted(set(initiators)) if initiators else None}

    # --- what the snapshot manager asks of volumes -------------------------------------------
    def volume_row(self, name: object) -> dict[str, Any]:
        return self._row(name)

    def snapshot_row_of(self, name: object) -> dict[str, Any]:
        """The row of a volume that can be snapshotted now (NotFound / Conflict otherwise)."""
        row = self._row(name)
        if row["status"] not in SERVED or row["name"] not in self._live:
            raise Conflict(f"volume {row['name']} is {row['status']}: only a served volume can "
                           "be snapshotted")
        return row

    def begin_snapshot(self, name: str, snapshot_id: str, *, created_at: str,
                       description: str) -> Any:
        """Freeze volume ``name`` now; returns the snapshot source to upload."""
        live = self._live[name]
        if live.tracker is not None:
            try:
                live.tracker.begin_snapshot(snapshot_id, volume=name, created_at=created_at,
                                            description=description)
            except SnapshotBusy as exc:
                raise Conflict(f"volume {name}: {exc.message}") from None
            return _TrackerSource(live.tracker, snapshot_id)
        if live.cached is not None:
            return self._cached_source(name, live, snapshot_id, created_at, description)
        raise Conflict(f"volume {name} cannot be snapshotted: the appliance has no object store")

    def resume_snapshot(self, name: str, snapshot_id: str) -> Any:
        """The source of a PENDING snapshot after a restart, or None if it cannot resume."""
        live = self._live.get(name)
        if live is None:
            return None
        if live.tracker is not None:
            pending = live.tracker.pending
            if pending is not None and pending.snapshot_id == snapshot_id:
                return _TrackerSource(live.tracker, snapshot_id)
            return None
        if live.cached is not None:
            return self._cached_resume(name, live, snapshot_id)
        return None

    def live_chunk_refs(self) -> set[str]:
        """Chunks volumes rely on besides manifests: base and pending snapshot chunks of stored
        volumes, snapshots being restored, cached volumes' maps (from a pool thread)."""
        out: set[str] = set()
        # a pool thread: its own catalog handle (the service's one belongs to the event loop;
        # sharing it across threads interleaved sqlite-utils savepoints)
        cat = Catalog(self.catalog.path)
        try:
            rows = cat.db.execute_returning_dicts("select name, type from volumes")
        finally:
            cat.close()
        for row in rows:
            live = self._live.get(row["name"])
            if row["type"] == "cached":
                if live is not None and live.cached is not None:
                    out |= set(self._cached_refs(live))
                else:
                    out |= set(self._cached_refs_at_rest(row["name"]))
                continue
            if live is not None and live.tracker is not None:
                out |= live.tracker.referenced()
            if live is not None and live.restore is not None and not live.restore.complete:
                out |= live.restore.manifest.refs()
            if live is None or live.tracker is None:
                out |= state_refs(self._state_dir(row["name"]))
        return out

    # --- recovery points ---------------------------------------------------------------------
    def _recovery_manifest(self, row: dict[str, Any]) -> Manifest:
        name = row["name"]
        if self.snapshots is None:
            raise Conflict("clones need an object store")
        snap = self.snapshots.latest_completed(name)  # stored: its latest snapshot
        if snap is None:
            raise Conflict(f"volume {name} has no completed snapshot yet: take one with "
                           f"`vtl volume snapshot {name} --wait`, then clone")
        return self.snapshots.completed_manifest(snap["snapshot_id"])

    def _recovery_point(self, row: dict[str, Any]) -> dict[str, Any] | None:
        base = {"name": row["name"], "type": row["type"], "size_bytes": row["size_bytes"]}
        if row["type"] == "cached":
            live = self._live.get(row["name"])
            when = self._cached_recovery_time(live) if live is not None else None
            if when is None:
                return None
            return {**base, "recovery_point": when, "snapshot_id": None}
        if self.snapshots is None:
            return None
        snap = self.snapshots.latest_completed(row["name"])
        if snap is None:
            return None
        return {**base, "recovery_point": snap["created_at"], "snapshot_id": snap["snapshot_id"]}

    # --- restore (RESTORING) -----------------------------------------------------------------
    def _start_fill(self, name: str, live: _LiveVolume) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (plain unit tests): chunks come on first access only
        live.fill = loop.create_task(self._fill(name, live), name=f"vtl-restore-{name}")

    def _start_warm(self, name: str, live: _LiveVolume) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        live.fill = loop.create_task(self._warm(name, live), name=f"vtl-bootstrap-{name}")

    async def _fill(self, name: str, live: _LiveVolume) -> None:
        rb = live.restore
        assert rb is not None
        loop = asyncio.get_running_loop()

        last = [-1]

        def progress(done: int, total: int) -> None:
            pct = 100.0 if total == 0 else 100.0 * done / total
            if self._stopping.is_set() or int(pct * 10) == last[0]:
                return  # a catalog write per 0.1 %, not per chunk
            last[0] = int(pct * 10)
            try:
                loop.call_soon_threadsafe(self._set_progress, name, pct)
            except RuntimeError:
                pass

        def stop() -> bool:
            return self._stopping.is_set() or live.closed

        attempt = 0
        while not self._stopping.is_set():
            try:
                done = await loop.run_in_executor(
                    self._fill_pool, lambda: rb.fill(progress=progress, should_stop=stop))
                if done:
                    break
            except asyncio.CancelledError:
                raise
            except (StoreError, OSError) as exc:
                if stop():
                    return
                delay = retry_delay(attempt)
                attempt += 1
                log.warning("volume %s: restore paused (%s); retrying in %.0f s",
                            name, exc, delay)
                await asyncio.sleep(delay)
        else:
            return
        await loop.run_in_executor(self._fill_pool, rb.finish)
        live.restore = None
        self.catalog.db.execute(
            "update volumes set status = ?, progress = null, updated_at = ? where name = ? "
            "and status = ?", [VolumeStatus.AVAILABLE.value, self._now(), name,
                               VolumeStatus.RESTORING.value])
        log.info("volume %s: restore complete", name)

    def _set_progress(self, name: str, pct: float) -> None:
        try:
            self.catalog.db.execute("update volumes set progress = ? where name = ?",
                                    [round(pct, 1), name])
        except Exception:
            pass

    # --- cached volumes ----------------------------------------------------------------------
    def _cached_dir(self, name: str) -> Path:
        return self.volume_dir / f"{name}.cached"

    def _cached_exists(self, name: str) -> bool:
        return (self._cached_dir(name) / CACHED_MAP_FILE).exists()

    def _cached_limits(self, row: dict[str, Any]) -> dict[str, int]:
        return {"cache_bytes": row.get("cache_bytes") or self.cache_bytes,
                "buffer_bytes": row.get("upload_buffer_bytes") or self.upload_buffer_bytes}

    def _make_cached(self, name: str, size: int, cache: int, buffer: int,
                     manifest: Manifest | None) -> None:
        directory = self._cached_dir(name)
        remove_cached_files(directory)
        shutil.rmtree(directory, ignore_errors=True)
        CachedBackend.create(directory, size, self._need_chunks().sibling(track=True),
                             cache_bytes=cache, buffer_bytes=buffer, source=manifest).close()

    def _open_cached(self, row: dict[str, Any]) -> CachedBackend:
        chunks = self._need_chunks().sibling(track=True)  # its uploads guarded against GC
        return CachedBackend.open(self._cached_dir(row["name"]), chunks,
                                  size=row["size_bytes"], **self._cached_limits(row))

    def _cached_source(self, name: str, live: _LiveVolume, snapshot_id: str, created_at: str,
                       description: str) -> Any:
        assert live.cached is not None
        return _CachedSource(live.cached, snapshot_id, name, created_at, description)

    def _cached_resume(self, name: str, live: _LiveVolume, snapshot_id: str) -> Any:
        return None  # a recovery point lives in memory: a restart abandons it (absent)

    def _cached_refs(self, live: _LiveVolume) -> set[str]:
        assert live.cached is not None
        return live.cached.live_refs()

    def _cached_refs_at_rest(self, name: str) -> set[str]:
        path = self._cached_dir(name) / CACHED_MAP_FILE
        if not path.exists():
            return set()
        try:
            cmap = ChunkMap.open(path)
        except (OSError, ApplianceError):
            return set()
        try:
            return {d.hex() for _, d in cmap.nonzero()}
        finally:
            cmap.close()

    def _cached_recovery_time(self, live: _LiveVolume) -> str | None:
        """A cached volume can be cloned from "now" whenever it is served."""
        return self._now() if live.cached is not None else None

    async def _warm(self, name: str, live: _LiveVolume) -> None:
        """BOOTSTRAPPING: read the snapshot's chunks into the cache (up to its size), then
        AVAILABLE. The volume is readable all along; missing chunks come on first access."""
        cached = live.cached
        assert cached is not None
        loop = asyncio.get_running_loop()
        row = self._row(name)
        limit = self._cached_limits(row)["cache_bytes"]
        total = min(chunk_count(cached.size), max(1, limit // CHUNK_BYTES))

        def warm() -> None:
            for i in range(total):
                if self._stopping.is_set() or live.closed:
                    return
                n = min(CHUNK_BYTES, cached.size - i * CHUNK_BYTES)
                cached.read(i * CHUNK_BYTES, n)
                if i % 16 == 15 or i == total - 1:
                    try:
                        loop.call_soon_threadsafe(self._set_progress, name,
                                                  100.0 * (i + 1) / total)
                    except RuntimeError:
                        return

        attempt = 0
        while not self._stopping.is_set():
            try:
                await loop.run_in_executor(self._fill_pool, warm)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # store down (NOT READY after read_wait), closed
                if self._stopping.is_set() or live.closed:
                    return
                delay = retry_delay(attempt)
                attempt += 1
                log.warning("volume %s: bootstrapping paused (%s); retrying in %.0f s",
                            name, exc, delay)
                await asyncio.sleep(delay)
        if self._stopping.is_set():
            return
        self.catalog.db.execute(
            "update volumes set status = ?, progress = null, updated_at = ? where name = ? "
            "and status = ?", [VolumeStatus.AVAILABLE.value, self._now(), name,
                               VolumeStatus.BOOTSTRAPPING.value])
        log.info("volume %s: bootstrapped", name)

    # --- helpers -----------------------------------------------------------------------------
    def _iqn(self, name: str) -> str:
        return f"{self.authority}:{name}"

    def _path(self, name: str) -> Path:
        return self.volume_dir / f"{name}.img"

    def _state_dir(self, name: str) -> Path:
        return self.volume_dir / f"{name}.snap"

    def _need_chunks(self) -> GuardedChunkStore:
        if self.chunks is None:
            raise Conflict("this needs an object store")
        return self.chunks

    def _row(self, name: object) -> dict[str, Any]:
        if not isinstance(name, str):
            raise InvalidRequest(f"invalid volume name {name!r}")
        rows = self.catalog.db.execute_returning_dicts(
            "select * from volumes where name = ?", [name])
        if not rows:
            raise NotFound(f"no volume named {name}: see ListVolumes for the names")
        return rows[0]

    def _set_status(self, name: str, status: VolumeStatus) -> None:
        self.catalog.db.execute("update volumes set status = ?, updated_at = ? where name = ?",
                                [status.value, self._now(), name])

    def _info(self, row: dict[str, Any]) -> dict[str, Any]:
        live = self._live.get(row["name"])
        used = 0
        if live is not None:
            try:
                used = int(getattr(live.backend, "allocated_bytes", 0))
            except OSError:
                used = 0
        elif row["type"] == "stored":
            used = allocated_bytes(self._path(row["name"]))
        status = row["status"]
        out: dict[str, Any] = {
            "name": row["name"], "type": row["type"], "size_bytes": row["size_bytes"],
            "status": status, "target_iqn": row["target_iqn"], "lun": row["lun"],
            "created_at": row["created_at"], "used_bytes": used,
        }
        if row.get("source_snapshot"):
            out["source_snapshot"] = row["source_snapshot"]
        if status in (VolumeStatus.RESTORING, VolumeStatus.BOOTSTRAPPING):
            out["progress"] = row.get("progress") or 0.0
        if row["type"] == "cached":
            out["cache_bytes"] = row.get("cache_bytes") or self.cache_bytes
            out["upload_buffer_bytes"] = row.get("upload_buffer_bytes") or self.upload_buffer_bytes
            if live is not None and live.cached is not None:
                out.update(self._cached_stats(live))
                if status == VolumeStatus.AVAILABLE and out.get("pass_through"):
                    out["status"] = VolumeStatus.PASS_THROUGH.value
        if self.snapshots is not None and row["status"] != VolumeStatus.DELETING:
            sched = vq.get_schedule(self.catalog.db, row["name"])
            if sched is not None:
                out["snapshot_schedule"] = {"every_hours": sched["every_hours"],
                                            "start_hour": sched["start_hour"]}
        return out

    def _cached_stats(self, live: _LiveVolume) -> dict[str, Any]:
        assert live.cached is not None
        st = live.cached.status()
        return {"cache_used_bytes": st["cache_used_bytes"],
                "upload_buffer_used_bytes": st["dirty_bytes"],
                "uploading_chunks": st["uploading_chunks"],
                "uploaded_bytes": st["uploaded_bytes"], "fetched_bytes": st["fetched_bytes"],
                "store_available": st["store_available"],
                "pass_through": st["state"] == "UPLOAD BUFFER FULL"}

    def _serve(self, row: dict[str, Any]) -> None:
        """Open the volume's data and publish its target (LUN 0) with its CHAP settings."""
        name = row["name"]
        live = self._open(row)
        try:
            device = BlockDevice(live.backend, serial=_serial(name, row["created_at"] or ""),
                                 device_name=row["target_iqn"])
            auth_rows = self.catalog.db.execute_returning_dicts(
                "select * from target_auth where target_iqn = ?", [row["target_iqn"]])
            auth = _auth_from_record(auth_rows[0]) if auth_rows else TargetAuth()
            # A cached volume (or one restoring from a snapshot) may GET from the object store
            # or wait for upload-buffer space inside a command: its commands run on the iSCSI
            # server's worker threads so that no other target, session or the control API waits.
            blocking = live.cached is not None or live.restore is not None
            target = IscsiTarget(name=row["target_iqn"], device=_scsi_target(device),
                                 auth=auth, alias=name, blocking=blocking)
        except BaseException:
            live.backend.close()
            raise
        live.device, live.target = device, target
        self.targets.add(target)
        self._live[name] = live
        if live.restore is not None:
            self._start_fill(name, live)
        elif live.cached is not None and row["source_snapshot"] and row["status"] in (
                VolumeStatus.CREATING, VolumeStatus.BOOTSTRAPPING):
            self._start_warm(name, live)

    def _open(self, row: dict[str, Any]) -> _LiveVolume:
        """The backend stack of a volume (not yet served)."""
        name = row["name"]
        if row["type"] == "cached":
            cached = self._open_cached(row)
            return _LiveVolume(backend=cached, device=None, target=None,  # type: ignore[arg-type]
                               cached=cached)
        backend: Any = StoredBackend(self._path(name))
        rb = tracker = None
        try:
            if backend.size != row["size_bytes"]:
                raise OSError(errno.EIO, f"file holds {backend.size} bytes, the volume "
                                         f"{row['size_bytes']}")
            state = self._state_dir(name)
            if self.chunks is not None and restoring(state):
                rb = backend = RestoringBackend(backend, state, self.chunks)
            if self.chunks is not None:
                base = rb.manifest if rb is not None else None
                tracker = backend = SnapshotTracker(backend, state, base=base)
                self._drop_orphan_snapshot(name, tracker)
        except BaseException:
            backend.close()
            raise
        return _LiveVolume(backend=backend, device=None, target=None,  # type: ignore[arg-type]
                           tracker=tracker, restore=rb)

    def _drop_orphan_snapshot(self, name: str, tracker: SnapshotTracker) -> None:
        """A snapshot frozen just before a crash that never got its catalog row: forget it."""
        pending = tracker.pending
        if pending is None:
            return
        row = vq.get_snapshot(self.catalog.db, pending.snapshot_id)
        if row is None or row["status"] != "PENDING":
            log.warning("volume %s: dropping snapshot %s begun before a crash (no job)",
                        name, pending.snapshot_id)
            tracker.abort_snapshot()

    def _unserve(self, name: str) -> None:
        live = self._live.pop(name, None)
        if live is None:
            return
        live.closed = True
        if live.fill is not None:
            live.fill.cancel()
        if self.targets.lookup(live.target.name) is live.target:
            self.targets.remove(live.target.name)
        live.device.close()
        try:
            live.backend.close()
        except (OSError, ApplianceError) as exc:
            log.warning("volume %s: closing its data failed: %s", name, exc)

    def _forget(self, name: str, target_iqn: str) -> None:
        """Remove every trace of a volume: target, files, schedule, auth row, volume row."""
        self._unserve(name)
        remove_volume_files(self._path(name))
        shutil.rmtree(self._state_dir(name), ignore_errors=True)
        shutil.rmtree(self._cached_dir(name), ignore_errors=True)
        if self.snapshots is not None:
            self.snapshots.drop_schedule(name)
        db = self.catalog.db
        with db.conn:
            db.conn.execute("BEGIN IMMEDIATE")
            db.execute("delete from target_auth where target_iqn = ?", [target_iqn])
            db.execute("delete from volumes where name = ?", [name])


def _limit(value: object, what: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_CACHE_BYTES:
        raise InvalidRequest(f"invalid {what} {value!r}: give at least "
                             f"{MIN_CACHE_BYTES // (1024 * 1024)} MiB in bytes")
    return value


def _auth_from_record(record: dict[str, Any]) -> TargetAuth:
    chap = mutual = None
    if record.get("chap_user") and record.get("chap_secret"):
        chap = ChapCredentials(record["chap_user"], record["chap_secret"].encode("utf-8"))
        if record.get("mutual_user") and record.get("mutual_secret"):
            mutual = ChapCredentials(record["mutual_user"],
                                     record["mutual_secret"].encode("utf-8"))
    initiators = json.loads(record["initiators"]) if record.get("initiators") else None
    return TargetAuth(chap=chap, mutual=mutual,
                      allowed_initiators=frozenset(initiators) if initiators else None)


def _scsi_target(device: BlockDevice) -> ScsiTarget:
    """One SCSI target device with the volume as LUN 0."""
    return ScsiTarget({0: device})
