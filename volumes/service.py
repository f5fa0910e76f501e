"""VolumeService: stored volumes as iSCSI targets, with AWS Storage Gateway operation names.

Each volume is one sparse file ``<data-dir>/volumes/<name>.img`` (plus ``<name>.img.1`` past
8 TiB, see ``volumes.stored``) served by a :class:`volumes.sbc.BlockDevice` as LUN 0 of its own
iSCSI target
``<authority>:<name>``. The catalog's ``volumes`` table is the source of truth; the live
targets are derived from it in :meth:`VolumeService.start`.

Invariants:
- Creation is crash-safe: the row is written with status CREATING before the file exists, and
  set to AVAILABLE only after the file is durable and the target is registered. ``start()``
  completes a CREATING row whose file has its full size, and removes any other leftover
  (row and partial file); a DELETING row is finished off the same way.
- Deletion unregisters the target first (no new logins), then closes the device (commands of
  sessions still logged in end with NOT READY instead of touching a closed file), then removes
  the file and finally the rows.
- Limits follow AWS stored volumes (FACTS.md): 1 GiB-16 TiB each, at most 32 volumes and
  512 TiB in total.
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

from catalog.db import Catalog
from volumes.sbc import BlockDevice
from volumes.stored import (
    SEGMENT_BYTES, StoredBackend, allocated_bytes, remove_volume_files, stored_size,
)
from vtl.errors import ApplianceError, Conflict, InvalidRequest, LimitExceeded, NotFound
from vtl.iscsi.target import ChapCredentials, IscsiTarget, TargetAuth, Targets
from vtl.scsi.target import ScsiTarget

log = logging.getLogger(__name__)

GIB = 1024 ** 3
TIB = 1024 ** 4
MIN_VOLUME_BYTES = 1 * GIB
MAX_VOLUME_BYTES = 16 * TIB
MAX_VOLUMES = 32
MAX_TOTAL_BYTES = 512 * TIB
CHAP_SECRET_MIN, CHAP_SECRET_MAX = 12, 16
VOLUME_TYPES = ("stored",)
NAME_MAX = 200
# Lower-case letters, digits, '.' and '-' as AWS allows in target names; starting with a letter
# or digit keeps "." and ".." (and hidden files) out of the volumes directory.
_NAME = re.compile(r"[a-z0-9][a-z0-9.-]*")
_CHAP_USER = re.compile(r"[\x21-\x7e]{1,255}")


class VolumeStatus(str, enum.Enum):
    """Volume statuses (AWS Storage Gateway VolumeStatus subset)."""

    CREATING = "CREATING"
    AVAILABLE = "AVAILABLE"
    DELETING = "DELETING"
    IRRECOVERABLE = "IRRECOVERABLE"


@dataclass(slots=True)
class _LiveVolume:
    backend: StoredBackend
    device: BlockDevice
    target: IscsiTarget


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _serial(name: str, created_at: str) -> str:
    """A unit serial number stable across restarts and distinct for a re-created volume."""
    return "VOL" + hashlib.sha256(f"{name}|{created_at}".encode()).hexdigest()[:13].upper()


def _args(args: dict[str, Any], required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    missing = [k for k in required if args.get(k) is None]
    if missing:
        raise InvalidRequest(f"missing argument {missing[0]!r}: pass {', '.join(required)}")
    unknown = sorted(set(args) - set(required) - set(optional))
    if unknown:
        raise InvalidRequest(f"unknown argument {unknown[0]!r}: accepted are "
                             f"{', '.join(required + optional)}")


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= NAME_MAX or not _NAME.fullmatch(name):
        raise InvalidRequest(
            f"invalid volume name {name!r}: use 1-{NAME_MAX} lower-case letters, digits, '.' "
            "or '-', starting with a letter or digit")
    return name


def validate_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidRequest(f"invalid size_bytes {size!r}: give a whole number of bytes")
    if not MIN_VOLUME_BYTES <= size <= MAX_VOLUME_BYTES:
        raise InvalidRequest(f"invalid size {size} bytes: a stored volume is 1 GiB to 16 TiB")
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
    """Stored volumes: catalog rows, sparse files and live iSCSI targets, kept in step."""

    def __init__(self, catalog: Catalog, data_dir: Path, targets: Targets, authority: str, *,
                 now: Callable[[], str] = _utc_now) -> None:
        self.catalog = catalog
        self.data_dir = Path(data_dir)
        self.volume_dir = self.data_dir / "volumes"
        self.targets = targets
        self.authority = authority
        self._now = now
        self._live: dict[str, _LiveVolume] = {}

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Finish or undo interrupted creations and deletions, then serve every volume."""
        self.volume_dir.mkdir(parents=True, exist_ok=True)
        for row in list(self.catalog.db["volumes"].rows):
            name, status = row["name"], row["status"]
            path = self._path(name)
            if status == VolumeStatus.CREATING:
                if stored_size(path) == row["size_bytes"]:
                    log.info("volume %s: completing an interrupted creation", name)
                    self._set_status(name, VolumeStatus.AVAILABLE)
                    status = VolumeStatus.AVAILABLE
                else:
                    log.warning("volume %s: removing an interrupted creation", name)
                    self._forget(name, row["target_iqn"])
                    continue
            elif status == VolumeStatus.DELETING:
                log.info("volume %s: finishing an interrupted deletion", name)
                self._forget(name, row["target_iqn"])
                continue
            if status == VolumeStatus.AVAILABLE:
                try:
                    self._serve(row)
                except OSError as exc:
                    log.error("volume %s: cannot open %s (%s); marked IRRECOVERABLE",
                              name, path, exc)
                    self._set_status(name, VolumeStatus.IRRECOVERABLE)

    def close(self) -> None:
        """Unregister every target and close the volume files (appliance shutdown)."""
        for name in list(self._live):
            self._unserve(name)

    def ops(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {
            "CreateStorediSCSIVolume": self.create_stored_volume,
            "ListVolumes": self.list_volumes,
            "DescribeVolume": self.describe_volume,
            "DeleteVolume": self.delete_volume,
            "SetVolumeChap": self.set_volume_chap,
        }

    # --- operations --------------------------------------------------------------------------
    def create_stored_volume(self, args: dict[str, Any]) -> dict[str, Any]:
        """CreateStorediSCSIVolume {name, size_bytes, type="stored"} -> the volume."""
        _args(args, ("name", "size_bytes"), ("type",))
        name = validate_name(args["name"])
        size = validate_size(args["size_bytes"])
        vtype = args.get("type", "stored")
        if vtype not in VOLUME_TYPES:
            raise InvalidRequest(f"invalid volume type {vtype!r}: only 'stored' is available")
        target_iqn = self._iqn(name)
        db = self.catalog.db
        created_at = self._now()
        with db.conn:
            db.conn.execute("BEGIN IMMEDIATE")
            if db.execute("select 1 from volumes where name = ?", [name]).fetchone():
                raise Conflict(f"volume {name} exists already: pick another name or delete it")
            count, total = db.execute(
                "select count(*), coalesce(sum(size_bytes), 0) from volumes").fetchone()
            if count >= MAX_VOLUMES:
                raise LimitExceeded(f"the gateway has {count} volumes, the maximum: "
                                    "delete one before creating another")
            if total + size > MAX_TOTAL_BYTES:
                raise LimitExceeded(
                    f"volumes would total {(total + size) / TIB:.2f} TiB, over the 512 TiB "
                    "limit: create a smaller volume or delete one")
            if self.targets.lookup(target_iqn) is not None:
                raise Conflict(f"target {target_iqn} is already served: pick another name")
            db.execute(
                "insert into volumes (name, type, size_bytes, status, target_iqn, lun, path, "
                "created_at, updated_at, description) values (?, ?, ?, ?, ?, 0, ?, ?, ?, '')",
                [name, vtype, size, VolumeStatus.CREATING.value, target_iqn,
                 str(self._path(name)), created_at, created_at])
        path = self._path(name)
        try:
            self.volume_dir.mkdir(parents=True, exist_ok=True)
            # stray files no row owns (e.g. from an old crash) are replaced
            remove_volume_files(path)
            StoredBackend.create(path, size).close()
            row = self._row(name)
            self._serve(row)
        except OSError as exc:
            self._forget(name, target_iqn)
            if exc.errno == errno.EFBIG:
                raise InvalidRequest(
                    f"the file system under {self.volume_dir} cannot hold a file of "
                    f"{min(size, SEGMENT_BYTES)} bytes: create a smaller volume or put the data "
                    "directory on ext4 or XFS") from None
            raise ApplianceError(f"cannot create {path}: {exc.strerror or exc}: check the "
                                 "data directory's space and permissions",
                                 code="InternalServerError") from None
        except BaseException:
            self._forget(name, target_iqn)
            raise
        self._set_status(name, VolumeStatus.AVAILABLE)
        return self._info(self._row(name))

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
        READY; the initiator sees the LU disappear once it logs out.
        """
        _args(args, ("name",))
        row = self._row(args["name"])
        name = row["name"]
        self._set_status(name, VolumeStatus.DELETING)
        self._unserve(name)
        self._forget(name, row["target_iqn"])
        return {"name": name, "status": "DELETED"}

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

    # --- helpers -----------------------------------------------------------------------------
    def _iqn(self, name: str) -> str:
        return f"{self.authority}:{name}"

    def _path(self, name: str) -> Path:
        return self.volume_dir / f"{name}.img"

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
                used = live.backend.allocated_bytes
            except OSError:
                used = 0
        else:
            used = allocated_bytes(self._path(row["name"]))
        return {
            "name": row["name"], "type": row["type"], "size_bytes": row["size_bytes"],
            "status": row["status"], "target_iqn": row["target_iqn"], "lun": row["lun"],
            "created_at": row["created_at"], "used_bytes": used,
        }

    def _serve(self, row: dict[str, Any]) -> None:
        """Open the volume file and publish its target (LUN 0) with its stored CHAP settings."""
        name = row["name"]
        backend = StoredBackend(self._path(name))
        try:
            if backend.size != row["size_bytes"]:
                raise OSError(errno.EIO, f"file holds {backend.size} bytes, the volume "
                                         f"{row['size_bytes']}")
            device = BlockDevice(backend, serial=_serial(name, row["created_at"] or ""),
                                 device_name=row["target_iqn"])
            auth_rows = self.catalog.db.execute_returning_dicts(
                "select * from target_auth where target_iqn = ?", [row["target_iqn"]])
            auth = _auth_from_record(auth_rows[0]) if auth_rows else TargetAuth()
            target = IscsiTarget(name=row["target_iqn"], device=_scsi_target(device),
                                 auth=auth, alias=name)
        except BaseException:
            backend.close()
            raise
        self.targets.add(target)
        self._live[name] = _LiveVolume(backend, device, target)

    def _unserve(self, name: str) -> None:
        live = self._live.pop(name, None)
        if live is None:
            return
        if self.targets.lookup(live.target.name) is live.target:
            self.targets.remove(live.target.name)
        live.device.close()
        live.backend.close()

    def _forget(self, name: str, target_iqn: str) -> None:
        """Remove every trace of a volume: target, file, auth row, volume row."""
        self._unserve(name)
        remove_volume_files(self._path(name))
        db = self.catalog.db
        with db.conn:
            db.conn.execute("BEGIN IMMEDIATE")
            db.execute("delete from target_auth where target_iqn = ?", [target_iqn])
            db.execute("delete from volumes where name = ?", [name])


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
