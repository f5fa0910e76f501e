"""``vtl archive``: the virtual tape shelf (AWS Tape Gateway ArchiveTape, CancelArchival,
RetrieveTapeArchive, DescribeTapeArchives, AssignTapePool, DeleteTapeArchive) and schedules.

``--json`` fields of ``vtl archive list``: barcode, status, pool, size_bytes, used_bytes,
cloud_bytes, archived_at, ready_at, eta_seconds, retrieval_percent, retrieved_at (times are
model time, ISO 8601 UTC; ``eta_seconds`` in model seconds).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from cli import client
from cli.client import data_dir_option
from cli.output import emit, human_bytes
from vtl.errors import InvalidRequest
from vtl.library import barcodes

JSON_FIELDS: list[tuple[str, str]] = [
    ("barcode", "BARCODE"), ("status", "STATUS"), ("pool", "POOL"), ("size_bytes", "SIZE"),
    ("used_bytes", "USED"), ("cloud_bytes", "IN CLOUD"), ("archived_at", "ARCHIVED"),
    ("ready_at", "READY AT"), ("eta_seconds", "ETA"), ("retrieval_percent", "RETRIEVAL %"),
    ("retrieved_at", "RETRIEVED"),
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
@data_dir_option
def archive_tape(barcode: str, data_dir: Path) -> None:
    """Export a tape to an I/E slot; it uploads, then goes to its pool (IN TRANSIT TO VTS)."""
    t = client.call(data_dir, "ArchiveTape", barcode=_code(barcode))
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
@data_dir_option
def delete(barcode: str, data_dir: Path) -> None:
    """Delete an archived tape and its objects (refused under a retention lock)."""
    t = client.call(data_dir, "DeleteTapeArchive", barcode=_code(barcode))
    click.echo(f"tape {t['barcode']} is {t['status']}")
