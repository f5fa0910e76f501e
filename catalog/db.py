"""Opening the catalog, WAL, and named migrations.

Invariants: every connection runs in WAL mode with a busy timeout, so short transactions from
several processes never block each other for long; migrations are applied in order, each once,
recorded by name in ``_migrations``; a migration never edits a previous one's effect in place.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Callable

import sqlite_utils

Migration = Callable[[sqlite_utils.Database], None]


def _m001_initial(db: sqlite_utils.Database) -> None:
    db["settings"].create({"key": str, "value": str}, pk="key")
    db["volumes"].create(
        {
            "name": str,
            "type": str,  # stored | cached
            "size_bytes": int,
            "status": str,
            "target_iqn": str,
            "lun": int,
            "path": str,
            "created_at": str,
            "updated_at": str,
            "source_snapshot": str,
            "description": str,
        },
        pk="name",
        not_null={"type", "size_bytes", "status", "target_iqn", "lun"},
    )
    db["volumes"].create_index(["target_iqn"], unique=True)
    db["tapes"].create(
        {
            "barcode": str,
            "size_bytes": int,
            "used_bytes": int,
            "status": str,
            "pool": str,
            "worm": int,
            "element_address": int,  # NULL when not inside the library (shelf, deleted)
            "source_address": int,  # SMC "source storage element" for READ ELEMENT STATUS
            "created_at": str,
            "updated_at": str,
            "archived_at": str,
            "retrieved_at": str,
            "ready_at": str,
            "retention_until": str,
            "cloud_bytes": int,
            "last_written_at": str,
        },
        pk="barcode",
        not_null={"size_bytes", "status"},
        defaults={"used_bytes": 0, "worm": 0, "cloud_bytes": 0},
    )
    db["tapes"].create_index(["element_address"], unique=True)
    db["tapes"].create_index(["status"])
    # A barcode is never reused, even after deletion (FACTS.md).
    db["barcodes_used"].create({"barcode": str, "created_at": str}, pk="barcode")
    db["events"].create(
        {"id": int, "at": str, "kind": str, "subject": str, "message": str}, pk="id"
    )
    db["jobs"].create(
        {
            "id": int,
            "kind": str,
            "subject": str,
            "state": str,  # pending | running | done | failed
            "attempts": int,
            "next_run_at": str,
            "payload": str,
            "error": str,
            "created_at": str,
            "updated_at": str,
        },
        pk="id",
        defaults={"attempts": 0},
    )
    db["jobs"].create_index(["state", "next_run_at"])
    db["schedules"].create(
        {"id": int, "kind": str, "spec": str, "created_at": str}, pk="id"
    )
    db["target_auth"].create(
        {
            "target_iqn": str,
            "chap_user": str,
            "chap_secret": str,
            "mutual_user": str,
            "mutual_secret": str,
            "initiators": str,  # JSON list, NULL = any initiator
        },
        pk="target_iqn",
    )


def _m002_cloud_tier(db: sqlite_utils.Database) -> None:
    # When the current retrieval was asked for (ETA/progress of RETRIEVING tapes).
    db["tapes"].add_column("retrieval_requested_at", str)


def _m003_pools(db: sqlite_utils.Database) -> None:
    # Custom archive pools (CreateTapePool): storage class and an optional retention lock.
    db["pools"].create(
        {
            "name": str,
            "storage_class": str,  # glacier | deep-archive
            "retention_lock": str,  # governance | compliance | NULL (none)
            "retention_days": int,
            "created_at": str,
        },
        pk="name",
        not_null={"storage_class"},
        defaults={"retention_days": 0},
    )
    # The lock mode a tape's retention_until was set under (governance | compliance).
    db["tapes"].add_column("retention_lock", str)


def _m004_volume_gateway(db: sqlite_utils.Database) -> None:
    # Cached volumes: local cache and upload buffer limits (NULL: the appliance defaults);
    # progress of a lazy restore (BOOTSTRAPPING / RESTORING), 0-100.
    db["volumes"].add_column("cache_bytes", int)
    db["volumes"].add_column("upload_buffer_bytes", int)
    db["volumes"].add_column("progress", float)
    # A snapshot is its own job: PENDING rows resume at start; COMPLETED ones have a manifest.
    db["snapshots"].create(
        {
            "snapshot_id": str,
            "volume": str,
            "volume_type": str,
            "size_bytes": int,
            "description": str,
            "status": str,  # PENDING | COMPLETED | ERROR
            "progress": float,  # 0-100
            "origin": str,  # manual | scheduled | clone
            "uploaded_chunks": int,
            "uploaded_bytes": int,
            "error": str,
            "state": str,  # JSON: where a resumable upload stands (owner: the snapshot job)
            "created_at": str,
            "completed_at": str,
            "updated_at": str,
        },
        pk="snapshot_id",
        not_null={"volume", "size_bytes", "status"},
        defaults={"progress": 0.0, "uploaded_chunks": 0, "uploaded_bytes": 0,
                  "description": "", "origin": "manual"},
    )
    db["snapshots"].create_index(["volume", "created_at"])
    db["snapshots"].create_index(["status"])
    db["snapshot_schedules"].create(
        {
            "volume": str,
            "every_hours": int,  # 1, 2, 4, 8, 12 or 24
            "start_hour": int,  # 0-23 UTC
            "description": str,
            "created_at": str,
            "updated_at": str,
        },
        pk="volume",
        not_null={"every_hours", "start_hour"},
    )


def _m005_file_shares(db: sqlite_utils.Database) -> None:
    # NFS file shares (fileshare/service.py); each share's fileid <-> path table lives in its
    # own SQLite file under <data-dir>/shares/.
    db["file_shares"].create(
        {
            "name": str,
            "share_id": int,  # random 32-bit id carried in every file handle of the share
            "prefix": str,  # object key prefix ("" = the whole store)
            "status": str,
            "clients": str,  # JSON list of CIDRs
            "squash": str,  # root | all | none
            "read_only": int,
            "file_mode": int,
            "dir_mode": int,
            "owner_uid": int,
            "owner_gid": int,
            "storage_class": str,
            "stale_after": float,  # seconds; NULL = refresh only on request
            "created_at": str,
            "updated_at": str,
        },
        pk="name",
        not_null={"share_id", "prefix", "status", "clients", "squash"},
    )
    db["file_shares"].create_index(["share_id"], unique=True)


MIGRATIONS: list[tuple[str, Migration]] = [
    ("001_initial", _m001_initial),
    ("002_cloud_tier", _m002_cloud_tier),
    ("003_pools", _m003_pools),
    ("004_volume_gateway", _m004_volume_gateway),
    ("005_file_shares", _m005_file_shares),
]


class Catalog:
    """A handle on the catalog database. Cheap to create; one per process or thread."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA foreign_keys=ON")
        self.db = sqlite_utils.Database(conn)

    def migrate(self) -> list[str]:
        """Apply pending migrations in order; return the names applied."""
        db = self.db
        if "_migrations" not in db.table_names():
            db["_migrations"].create({"name": str, "applied_at": str}, pk="name")
        done = {row["name"] for row in db["_migrations"].rows}
        applied = []
        for name, fn in MIGRATIONS:
            if name in done:
                continue
            with db.conn:
                db.conn.execute("BEGIN IMMEDIATE")
                fn(db)
                db["_migrations"].insert(
                    {"name": name, "applied_at": db.execute("select datetime('now')").fetchone()[0]}
                )
            applied.append(name)
        return applied

    # --- settings --------------------------------------------------------------------------
    def get_setting(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("select value from settings where key = ?", [key]).fetchone()
        return row[0] if row else default

    def set_setting(self, key: str, value: str) -> None:
        self.db["settings"].upsert({"key": key, "value": value}, pk="key")

    def close(self) -> None:
        self.db.conn.close()


def open_catalog(path: Path | str) -> Catalog:
    cat = Catalog(path)
    cat.migrate()
    return cat
