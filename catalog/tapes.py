"""Tape and element queries on the catalog (tables ``tapes``, ``barcodes_used``, ``events``).

The catalog imports no sibling: statuses arrive here as plain strings. Every write is one short
transaction (``BEGIN IMMEDIATE``), so the changer can persist a move before MOVE MEDIUM
completes without blocking drive workers for long.

Invariant: ``tapes.element_address`` is unique (a slot holds one tape) and NULL for tapes
outside the library; a barcode, once in ``barcodes_used``, stays there forever.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import sqlite_utils

Row = dict[str, Any]


@contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """One short write transaction; rolled back if the body raises."""
    conn = db.conn
    if conn.in_transaction:  # nested: join the outer transaction
        yield db
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def get_tape(db: sqlite_utils.Database, barcode: str) -> Row | None:
    rows = list(db.query("select * from tapes where barcode = ?", [barcode]))
    return rows[0] if rows else None


def list_tapes(db: sqlite_utils.Database, status: str | None = None, *,
               exclude: Iterable[str] = ()) -> list[Row]:
    """Tapes ordered by barcode, optionally of one status, without the ``exclude`` statuses."""
    sql, params = "select * from tapes where 1 = 1", []
    if status is not None:
        sql += " and status = ?"
        params.append(status)
    excluded = list(exclude)
    if excluded:
        sql += f" and status not in ({','.join('?' * len(excluded))})"
        params += excluded
    return list(db.query(sql + " order by barcode", params))


def tapes_in_elements(db: sqlite_utils.Database) -> list[Row]:
    """Tapes that occupy an element of the library, in element address order."""
    return list(db.query(
        "select * from tapes where element_address is not null order by element_address"))


def count_and_size(db: sqlite_utils.Database, statuses: Iterable[str]) -> tuple[int, int]:
    """Number of tapes and their total size among ``statuses``."""
    wanted = list(statuses)
    row = db.execute(
        f"select count(*), coalesce(sum(size_bytes), 0) from tapes "
        f"where status in ({','.join('?' * len(wanted))})", wanted).fetchone()
    return int(row[0]), int(row[1])


def used_barcodes(db: sqlite_utils.Database, prefix: str = "") -> list[str]:
    """Every barcode ever issued that starts with ``prefix`` (deleted ones included)."""
    return [r[0] for r in db.execute(
        "select barcode from barcodes_used where barcode like ? escape '\\'",
        [prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"])]


def barcode_used(db: sqlite_utils.Database, barcode: str) -> bool:
    return db.execute("select 1 from barcodes_used where barcode = ?", [barcode]).fetchone() is not None


def reserve_barcode(db: sqlite_utils.Database, barcode: str, now: str) -> None:
    """Record a barcode as issued; raises sqlite3.IntegrityError if it already was."""
    db.execute("insert into barcodes_used (barcode, created_at) values (?, ?)", [barcode, now])


def insert_tape(db: sqlite_utils.Database, row: Row) -> None:
    db["tapes"].insert(row)


def update_tape(db: sqlite_utils.Database, barcode: str, **fields: Any) -> None:
    """Set columns of one tape (``element_address=None`` takes it out of the library)."""
    if not fields:
        return
    cols = ", ".join(f"{name} = ?" for name in fields)
    cur = db.execute(f"update tapes set {cols} where barcode = ?", [*fields.values(), barcode])
    if cur.rowcount != 1:
        raise KeyError(barcode)


def add_event(db: sqlite_utils.Database, at: str, kind: str, subject: str, message: str) -> None:
    db.execute("insert into events (at, kind, subject, message) values (?, ?, ?, ?)",
               [at, kind, subject, message])


def events(db: sqlite_utils.Database, subject: str | None = None) -> list[Row]:
    if subject is None:
        return list(db.query("select * from events order by id"))
    return list(db.query("select * from events where subject = ? order by id", [subject]))
