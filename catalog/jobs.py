"""Queries on the catalog's ``jobs`` and ``schedules`` tables (long work that must survive restarts).

A job row is ``(kind, subject)`` plus a JSON ``payload``; ``state`` is pending | running | done |
failed. Invariant: at most one unfinished (pending or running) job per ``(kind, subject)``:
:func:`ensure_job` returns the existing one instead of adding a second. Rows marked running by a
process that died are made pending again by :func:`requeue_running` at start-up, so every
unfinished job resumes (jobs are idempotent).
"""

from __future__ import annotations

import json
from typing import Any

import sqlite_utils

from catalog.tapes import transaction

Row = dict[str, Any]
UNFINISHED = ("pending", "running")


def unfinished_job(db: sqlite_utils.Database, kind: str, subject: str) -> Row | None:
    rows = list(db.query(
        "select * from jobs where kind = ? and subject = ? and state in ('pending', 'running') "
        "order by id limit 1", [kind, subject]))
    return rows[0] if rows else None


def ensure_job(db: sqlite_utils.Database, kind: str, subject: str, now: str,
               payload: dict[str, Any] | None = None) -> int:
    """The id of the unfinished ``kind`` job on ``subject``, adding one if there is none."""
    row = unfinished_job(db, kind, subject)  # the common case needs no write transaction
    if row is not None:
        return int(row["id"])
    with transaction(db):
        row = unfinished_job(db, kind, subject)
        if row is not None:
            return int(row["id"])
        cur = db.execute(
            "insert into jobs (kind, subject, state, attempts, next_run_at, payload, created_at, "
            "updated_at) values (?, ?, 'pending', 0, ?, ?, ?, ?)",
            [kind, subject, now, json.dumps(payload or {}), now, now])
        return int(cur.lastrowid or 0)


def due_jobs(db: sqlite_utils.Database, now: str) -> list[Row]:
    """Pending jobs whose ``next_run_at`` has come, oldest first."""
    return list(db.query(
        "select * from jobs where state = 'pending' and (next_run_at is null or next_run_at <= ?) "
        "order by id", [now]))


def get_job(db: sqlite_utils.Database, job_id: int) -> Row | None:
    rows = list(db.query("select * from jobs where id = ?", [job_id]))
    return rows[0] if rows else None


def update_job(db: sqlite_utils.Database, job_id: int, **fields: Any) -> None:
    if "payload" in fields and not isinstance(fields["payload"], str):
        fields["payload"] = json.dumps(fields["payload"])
    cols = ", ".join(f"{name} = ?" for name in fields)
    db.execute(f"update jobs set {cols} where id = ?", [*fields.values(), job_id])


def requeue_running(db: sqlite_utils.Database, now: str) -> int:
    """Jobs left running by a previous process become pending (returns how many)."""
    cur = db.execute("update jobs set state = 'pending', next_run_at = ?, updated_at = ? "
                     "where state = 'running'", [now, now])
    return int(cur.rowcount or 0)


def list_jobs(db: sqlite_utils.Database, *, unfinished_only: bool = False) -> list[Row]:
    sql = "select * from jobs"
    if unfinished_only:
        sql += " where state in ('pending', 'running')"
    return list(db.query(sql + " order by id"))


# --- schedules --------------------------------------------------------------------------------
def add_schedule(db: sqlite_utils.Database, kind: str, spec: dict[str, Any], now: str) -> int:
    cur = db.execute("insert into schedules (kind, spec, created_at) values (?, ?, ?)",
                     [kind, json.dumps(spec), now])
    return int(cur.lastrowid or 0)


def list_schedules(db: sqlite_utils.Database) -> list[Row]:
    return [{**r, "spec": json.loads(r["spec"] or "{}")}
            for r in db.query("select * from schedules order by id")]


def remove_schedule(db: sqlite_utils.Database, schedule_id: int) -> bool:
    cur = db.execute("delete from schedules where id = ?", [schedule_id])
    return bool(cur.rowcount)
