"""``vtl archive``: the virtual tape shelf (AWS Tape Gateway ArchiveTape, CancelArchival,
RetrieveTapeArchive, DescribeTapeArchives, AssignTapePool, DeleteTapeArchive) and schedules.

``--json`` fields of ``vtl archive list``: barcode, status, pool, size_bytes, used_bytes,
cloud_bytes, archived_at, ready_at, eta_seconds, retrieval_percent, retrieved_at,
retention_until, retention_lock (times are model time, ISO 8601 UTC; ``eta_seconds`` in model
seconds). ``vtl archive pool list --json``: name, storage_class, retention_lock, retention_days,
custom, tapes, created_at.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from cli import client
from cli.client import data_dir_option
from cli.output import SIZE as SIZE_TYPE
from cli.output import emit, human_bytes
from vtl.errors import InvalidRequest
from vtl.library import barcodes

JSON_FIELDS: list[tuple[str, str]] = [
    ("barcode", "BARCODE"), ("status", "STATUS"), ("pool", "POOL"), ("size_bytes", "SIZE"),
    ("used_bytes", "USED"), ("cloud_bytes", "IN CLOUD"), ("archived_at", "ARCHIVED"),
    ("ready_at", "READY AT"), ("eta_seconds", "ETA"), ("retrieval_percent", "RETRIEVAL %"),
    ("retrieved_at", "RETRIEVED"), ("retention_until", "RETAINED UNTIL"),
    ("retention_lock", "RETENTION LOCK"),
]
TABLE_COLUMNS: list[tuple[str, str]] = [
    ("barcode", "BARCODE"), ("status", "STATUS"), ("pool", "POOL"), ("used_bytes", "USED"),
    ("archived_at", "ARCHIVED"), ("ready_at", "READY AT"), ("eta_seconds", "ETA"),
]


def _code(barcode: str) -> str:
    try:
        return barcodes.validate_barcode(barcode)
    except InvalidRequest as exc:
        raise click.ClickException(exc.message) from None


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _human(t: dict[str, Any]) -> dict[str, Any]:
    return {**t, "used_bytes": human_bytes(t.get("used_bytes")),
            "eta_seconds": eta_text(t.get("eta_seconds")),
            "archived_at": t.get("archived_at") or "-", "ready_at": t.get("ready_at") or "-"}


@click.group("archive")
def archive() -> None:
    """The virtual tape shelf: archive, retrieve, list, move, delete; schedules."""


@archive.command("tape")
@click.argument("barcode")
@click.option("--retention-days", type=click.IntRange(0, 36500), default=None,
              help="Retention lock: the archived tape cannot be deleted for this many days.")
@data_dir_option
def archive_tape(barcode: str, retention_days: int | None, data_dir: Path) -> None:
    """Export a tape to an I/E slot; it uploads, then goes to its pool (IN TRANSIT TO VTS)."""
    args: dict[str, Any] = {"barcode": _code(barcode)}
    if retention_days is not None:
        args["retention_days"] = retention_days
    t = client.call(data_dir, "ArchiveTape", **args)
    click.echo(f"tape {t['barcode']} is {t['status']}")


@archive.command("cancel")
@click.argument("barcode")
@data_dir_option
def cancel(barcode: str, data_dir: Path) -> None:
    """Cancel archiving (only while IN TRANSIT TO VTS); the tape stays in its I/E slot."""
    t = client.call(data_dir, "CancelArchival", barcode=_code(barcode))
    click.echo(f"tape {t['barcode']} is {t['status']} again")


def _progress_line(t: dict[str, Any]) -> str:
    pct = t.get("retrieval_percent")
    pct_text = f"{pct:5.1f}%" if pct is not None else "  ...%"
    return (f"\r{t['barcode']} {t['status']}: {pct_text} ETA {eta_text(t.get('eta_seconds'))} "
            f"(ready at {t.get('ready_at') or '-'})")


@archive.command("retrieve")
@click.argument("barcode")
@click.option("--wait", is_flag=True, help="Wait until RETRIEVED, showing progress and ETA.")
@data_dir_option
def retrieve(barcode: str, wait: bool, data_dir: Path) -> None:
    """Retrieve an archived tape; it returns to an I/E slot as RETRIEVED (read-only)."""
    code = _code(barcode)
    t = client.call(data_dir, "RetrieveTapeArchive", barcode=code)
    click.echo(f"tape {code} is {t['status']}; ready at {t.get('ready_at')} "
               f"(ETA {eta_text(t.get('eta_seconds'))})")
    if not wait:
        return
    while True:
        tapes = client.call(data_dir, "DescribeTapeArchives", barcode=code)["tapes"]
        if not tapes:
            raise click.ClickException(f"tape {code} left the archive while waiting")
        t = tapes[0]
        if t["status"] != "RETRIEVING":
            break
        click.echo(_progress_line(t), nl=False, err=True)
        time.sleep(0.5)
    click.echo("", err=True)
    if t["status"] != "RETRIEVED":
        raise click.ClickException(f"tape {code} is {t['status']}, not RETRIEVED")
    click.echo(f"tape {code} is RETRIEVED (read-only) in an import/export slot")


@archive.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@data_dir_option
def list_(as_json: bool, data_dir: Path) -> None:
    """Archived tapes (and tapes on their way): pool, ready times, ETAs."""
    tapes = client.call(data_dir, "DescribeTapeArchives")["tapes"]
    if as_json:
        emit(tapes, JSON_FIELDS, True)
    else:
        emit([_human(t) for t in tapes], TABLE_COLUMNS, False)


@archive.command("move")
@click.argument("barcode")
@click.option("--pool", required=True, type=click.Choice(["deep-archive", "glacier"]),
              help="Destination pool (moves are one-way: glacier -> deep-archive).")
@data_dir_option
def move(barcode: str, pool: str, data_dir: Path) -> None:
    """Move an archived tape to a deeper pool (one way)."""
    t = client.call(data_dir, "AssignTapePool", barcode=_code(barcode), pool=pool)
    click.echo(f"tape {t['barcode']} is now in the {t['pool']} pool")


@archive.command("delete")
@click.argument("barcode")
@click.option("--bypass-governance", is_flag=True,
              help="Delete despite a governance retention lock (compliance locks hold).")
@data_dir_option
def delete(barcode: str, bypass_governance: bool, data_dir: Path) -> None:
    """Delete an archived tape and its objects (refused under a retention lock)."""
    args: dict[str, Any] = {"barcode": _code(barcode)}
    if bypass_governance:
        args["bypass_governance"] = True
    t = client.call(data_dir, "DeleteTapeArchive", **args)
    click.echo(f"tape {t['barcode']} is {t['status']}")


# --- custom pools ---------------------------------------------------------------------------
POOL_FIELDS: list[tuple[str, str]] = [
    ("name", "NAME"), ("storage_class", "STORAGE CLASS"), ("retention_lock", "RETENTION LOCK"),
    ("retention_days", "DAYS"), ("custom", "CUSTOM"), ("tapes", "TAPES"),
    ("created_at", "CREATED"),
]


@archive.group("pool")
def pool() -> None:
    """Archive pools: the built-in glacier and deep-archive, and custom pools with retention locks."""


@pool.command("create")
@click.argument("name")
@click.option("--storage-class", required=True, type=click.Choice(["glacier", "deep-archive"]),
              help="Where the pool's tapes are archived.")
@click.option("--retention-lock", type=click.Choice(["governance", "compliance"]), default=None,
              help="Tapes cannot be deleted for --retention-days after archiving (governance: "
                   "unless bypassed; compliance: never).")
@click.option("--retention-days", type=click.IntRange(0, 36500), default=None,
              help="Length of the retention lock, 0 to 36500 days.")
@click.option("--json", "as_json", is_flag=True, help="Print the pool as JSON.")
@data_dir_option
def pool_create(name: str, storage_class: str, retention_lock: str | None,
                retention_days: int | None, as_json: bool, data_dir: Path) -> None:
    """Create a custom pool; tapes created with --pool NAME archive into it."""
    if (retention_lock is None) != (retention_days is None):
        raise click.ClickException("give --retention-lock and --retention-days together")
    args: dict[str, Any] = {"name": name, "storage_class": storage_class}
    if retention_lock is not None:
        args.update(retention_lock=retention_lock, retention_days=retention_days)
    p = client.call(data_dir, "CreateTapePool", **args)
    if as_json:
        click.echo(json.dumps(p, indent=2))
        return
    lock = (f", {p['retention_lock']} retention lock of {p['retention_days']} days"
            if p.get("retention_lock") else "")
    click.echo(f"pool {p['name']} created ({p['storage_class']}{lock})")


@pool.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@data_dir_option
def pool_list(as_json: bool, data_dir: Path) -> None:
    """List pools: storage class, retention lock, tapes in each."""
    rows = client.call(data_dir, "ListTapePools")["pools"]
    if not as_json:
        rows = [{**r, "retention_lock": r.get("retention_lock") or "-",
                 "custom": "yes" if r.get("custom") else "no",
                 "created_at": r.get("created_at") or "-"} for r in rows]
    emit(rows, POOL_FIELDS, as_json)


@pool.command("delete")
@click.argument("name")
@data_dir_option
def pool_delete(name: str, data_dir: Path) -> None:
    """Delete a custom pool that holds no tape."""
    client.call(data_dir, "DeleteTapePool", name=name)
    click.echo(f"pool {name} deleted")


# --- schedules ------------------------------------------------------------------------------
SCHEDULE_FIELDS: list[tuple[str, str]] = [
    ("id", "ID"), ("kind", "KIND"), ("cron", "CRON"), ("older_than", "OLDER THAN (s)"),
    ("pool", "POOL"), ("prefix", "PREFIX"), ("minimum", "MINIMUM"), ("size_bytes", "SIZE"),
    ("next_run_at", "NEXT RUN"),
]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> int:
    """``7d`` -> 604800; units s, m, h, d, w; a bare number is seconds."""
    t = text.strip().lower()
    unit = t[-1] if t and t[-1] in _UNITS else "s"
    number = t[:-1] if t and t[-1] in _UNITS else t
    if not number.isdigit():
        raise click.ClickException(f"bad duration {text!r}: use e.g. 7d, 12h, 30m")
    return int(number) * _UNITS[unit]


@archive.group("schedule")
def schedule() -> None:
    """Scheduled archiving (cron) and automatic tape creation policies."""


@schedule.command("add")
@click.option("--cron", required=True, help='When to run, a crontab line in UTC, e.g. "0 6 * * *".')
@click.option("--older-than", default="0", help="Archive tapes untouched this long (e.g. 7d); "
              "full tapes always go.")
@click.option("--pool", type=click.Choice(["glacier", "deep-archive"]), default=None,
              help="Pool to archive to (default: each tape's own pool).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@data_dir_option
def schedule_add(cron: str, older_than: str, pool: str | None, as_json: bool, data_dir: Path) -> None:
    """Archive full or idle tapes on a schedule (after the nightly backup window)."""
    args: dict[str, Any] = {"kind": "archive", "cron": cron, "older_than": parse_duration(older_than)}
    if pool:
        args["pool"] = pool
    s = client.call(data_dir, "AddSchedule", **args)
    if as_json:
        click.echo(json.dumps(s, indent=2))
    else:
        click.echo(f"schedule {s['id']} added; next run {s.get('next_run_at')}")


@schedule.command("auto-create")
@click.option("--prefix", required=True, help="Barcode prefix (1-4 letters A-Z).")
@click.option("--minimum", type=click.IntRange(1, 100), required=True,
              help="Blank tapes to keep in the I/E slots.")
@click.option("--size", "size", type=SIZE_TYPE, required=True, help="Size of new tapes, e.g. 200GiB.")
@click.option("--pool", type=click.Choice(["glacier", "deep-archive"]), default="glacier",
              show_default=True)
@data_dir_option
def schedule_auto_create(prefix: str, minimum: int, size: int, pool: str, data_dir: Path) -> None:
    """Keep a minimum number of blank tapes with PREFIX in the I/E slots."""
    s = client.call(data_dir, "AddSchedule", kind="auto-create", prefix=prefix.upper(),
                    minimum=minimum, size_bytes=size, pool=pool)
    click.echo(f"auto-create policy {s['id']} added for prefix {s['prefix']}")


@schedule.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@data_dir_option
def schedule_list(as_json: bool, data_dir: Path) -> None:
    """List schedules and policies with their next run."""
    rows = client.call(data_dir, "ListSchedules")["schedules"]
    emit(rows, SCHEDULE_FIELDS, as_json)


@schedule.command("remove")
@click.argument("schedule_id", type=int)
@data_dir_option
def schedule_remove(schedule_id: int, data_dir: Path) -> None:
    """Remove a schedule or policy."""
    client.call(data_dir, "RemoveSchedule", id=schedule_id)
    click.echo(f"schedule {schedule_id} removed")


@schedule.command("run")
@click.argument("schedule_id", type=int)
@data_dir_option
def schedule_run(schedule_id: int, data_dir: Path) -> None:
    """Run a schedule now."""
    r = client.call(data_dir, "RunSchedule", id=schedule_id)
    done = r.get("archived", r.get("created", []))
    click.echo(f"schedule {schedule_id}: {', '.join(done) if done else 'nothing to do'}")
