"""Queries on the catalog's ``pools`` table: custom archive pools (AWS CreateTapePool).

A custom pool has a name, the storage class its tapes archive to (``glacier`` or
``deep-archive``) and an optional retention lock (``governance`` or ``compliance``, 0-36,500
days). The two built-in pools (``glacier``, ``deep-archive``) are not rows: they always exist.
Invariant: a pool row is deleted only while no tape (other than DELETED ones) names it.
"""

from __future__ import annotations

from typing import Any

import sqlite_utils

from catalog.tapes import transaction

Row = dict[str, Any]


def get_pool(db: sqlite_utils.Database, name: str) -> Row | None:
    rows = list(db.query("select * from pools where name = ? collate nocase", [name]))
    return rows[0] if rows else None


def list_pools(db: sqlite_utils.Database) -> list[Row]:
    return list(db.query("select * from pools order by name"))


def add_pool(db: sqlite_utils.Database, row: Row) -> None:
    db["pools"].insert(row)


def tapes_in_pool(db: sqlite_utils.Database, name: str, *, except_status: str = "DELETED") -> int:
    return int(db.execute("select count(*) from tapes where pool = ? and status != ?",
                          [name, except_status]).fetchone()[0])


def delete_pool_if_empty(db: sqlite_utils.Database, name: str) -> int:
    """Delete the pool unless tapes name it; return the number of such tapes (0: deleted)."""
    with transaction(db):
        count = tapes_in_pool(db, name)
        if count == 0:
            db.execute("delete from pools where name = ?", [name])
        return count
