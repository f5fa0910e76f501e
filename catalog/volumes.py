"""Volume Gateway queries on the catalog: tables ``snapshots`` and ``snapshot_schedules``.

The catalog imports no sibling: statuses arrive as plain strings. A snapshot row is also the
snapshot's job: status PENDING means "upload not finished" and is resumed at start-up; only a
COMPLETED row has a manifest in the object store (the manifest is written before the row turns
COMPLETED, so a crash in between leaves a PENDING row whose job finds the manifest and finishes).
A ``snapshot_schedules`` row is keyed by volume (one schedule per volume, as in AWS).
"""

from __future__ import annotations

import json
from typing import Any

import sqlite_utils

from catalog.tapes import transaction

Row = dict[str, Any]

__all__ = [
    "add_snapshot", "get_snapshot", "list_snapshots", "update_snapshot", "delete_snapshot",
    "get_schedule", "list_schedules", "put_schedule", "delete_schedule", "transaction",
]


# --- snapshots ----------------------------------------------------------------------------------
def add_snapshot(db: sqlite_utils.Database, row: Row) -> None:
    cols = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    db.execute(f"insert into snapshots ({cols}) values ({marks})", list(row.values()))


def get_snapshot(db: sqlite_utils.Database, snapshot_id: str) -> Row | None:
    rows = list(db.query("select * from snapshots where snapshot_id = ?", [snapshot_id]))
    return rows[0] if rows else None


def list_snapshots(db: sqlite_utils.Database, *, volume: str | None = None,
                   status: str | None = None) -> list[Row]:
    """Snapshots oldest first (``created_at`` then id), optionally of one volume or status."""
    where, args = [], []
    if volume is not None:
        where.append("volume = ?")
        args.append(volume)
    if status is not None:
        where.append("status = ?")
        args.append(status)
    sql = "select * from snapshots"
    if where:
        sql += " where " + " and ".join(where)
    return list(db.query(sql + " order by created_at, snapshot_id", args))


def update_snapshot(db: sqlite_utils.Database, snapshot_id: str, **fields: Any) -> None:
    if "state" in fields and fields["state"] is not None and not isinstance(fields["state"], str):
        fields["state"] = json.dumps(fields["state"])
    cols = ", ".join(f"{name} = ?" for name in fields)
    db.execute(f"update snapshots set {cols} where snapshot_id = ?",
               [*fields.values(), snapshot_id])


def delete_snapshot(db: sqlite_utils.Database, snapshot_id: str) -> bool:
    cur = db.execute("delete from snapshots where snapshot_id = ?", [snapshot_id])
    return bool(cur.rowcount)


# --- schedules ----------------------------------------------------------------------------------
def get_schedule(db: sqlite_utils.Database, volume: str) -> Row | None:
    rows = list(db.query("select * from snapshot_schedules where volume = ?", [volume]))
    return rows[0] if rows else None


def list_schedules(db: sqlite_utils.Database) -> list[Row]:
    return list(db.query("select * from snapshot_schedules order by volume"))


def put_schedule(db: sqlite_utils.Database, volume: str, every_hours: int, start_hour: int,
                 description: str, now: str) -> None:
    """Insert or replace the volume's schedule (``created_at`` kept on replace)."""
    old = get_schedule(db, volume)
    db.execute(
        "insert or replace into snapshot_schedules (volume, every_hours, start_hour, "
        "description, created_at, updated_at) values (?, ?, ?, ?, ?, ?)",
        [volume, every_hours, start_hour, description, old["created_at"] if old else now, now])


def delete_schedule(db: sqlite_utils.Database, volume: str) -> bool:
    cur = db.execute("delete from snapshot_schedules where volume = ?", [volume])
    return bool(cur.rowcount)
