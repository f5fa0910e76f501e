"""``vtl tape``: virtual tapes (AWS Tape Gateway operations CreateTapes, ListTapes, ...).

``--json`` prints the stable tape fields: barcode, status, size_bytes, used_bytes, pool, worm,
location ({"type": "slot"|"ie"|"drive"|"shelf"|"none", "address": int|null, "mtx": int|null}),
target_iqn, created_at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cli import client
from cli.client import data_dir_option
from cli.output import SIZE, emit, emit_record, human_bytes
from vtl.errors import InvalidRequest
from vtl.library import barcodes

GiB = 1 << 30
TiB = 1 << 40
MIN_SIZE, MAX_SIZE = 100 * GiB, 15 * TiB

#: Stable ``--json`` field names, in order.
JSON_FIELDS: list[tuple[str, str]] = [
    ("barcode", "BARCODE"), ("status", "STATUS"), ("size_bytes", "SIZE"),
    ("used_bytes", "USED"), ("pool", "POOL"), ("worm", "WORM"), ("location", "LOCATION"),
    ("target_iqn", "TARGET"), ("created_at", "CREATED"),
]
#: Table columns of ``vtl tape list``.
TABLE_COLUMNS: list[tuple[str, str]] = [
    ("barcode", "BARCODE"), ("status", "STATUS"), ("size_bytes", "SIZE"),
    ("used_bytes", "USED"), ("pool", "POOL"), ("worm", "WORM"), ("location", "LOCATION"),
    ("target_iqn", "TARGET"),
]


def location_text(location: Any) -> str:
    """``{"type": "slot", "mtx": 12}`` -> ``slot 12``; drives by index; shelf / none bare."""
    if not isinstance(location, dict):
        return str(location) if location is not None else "-"
    kind = location.get("type", "?")
    number = location.get("mtx")
    return f"{kind} {number}" if number is not None else str(kind)


def _human(tape: dict[str, Any]) -> dict[str, Any]:
    return {**tape, "size_bytes": human_bytes(tape.get("size_bytes")),
            "used_bytes": human_bytes(tape.get("used_bytes")),
            "worm": "yes" if tape.get("worm") else "no",
            "location": location_text(tape.get("location"))}


def _check(fn: Any, value: str) -> str:
    try:
        return str(fn(value))
    except InvalidRequest as exc:
        raise click.ClickException(exc.message) from None


def _check_size(size: int) -> int:
    if size % GiB or not MIN_SIZE <= size <= MAX_SIZE:
        raise click.ClickException(
            f"invalid tape size {human_bytes(size)}: use whole GiB from 100GiB to 15TiB "
            "(e.g. --size 200GiB)")
    return size


def _tapes(result: Any) -> list[dict[str, Any]]:
    if isinstance(result, dict):
        if "tapes" in result:
            return list(result["tapes"] or [])
        if isinstance(result.get("tape"), dict):
            return [result["tape"]]
        return [result]
    return list(result or [])


@click.group("tape")
def tape() -> None:
    """Virtual tapes: create, list, show, delete."""


@tape.command("create")
@click.option("--prefix", help="Barcode prefix, 1-4 letters A-Z (generated barcodes).")
@click.option("--count", type=int, default=1, show_default=True,
              help="How many tapes (1-10) with --prefix.")
@click.option("--barcode", help="One tape with this exact barcode (5-16 of A-Z, 0-9).")
@click.option("--size", "size", type=SIZE, required=True,
              help="Tape size, whole GiB from 100GiB to 15TiB, e.g. 200GiB.")
@click.option("--pool", default="glacier", show_default=True,
              help="Archive pool the tape goes to when ejected: glacier, deep-archive or a "
                   "custom pool (`vtl archive pool list`).")
@click.option("--worm", is_flag=True, help="Write once, read many (append-only) tapes.")
@click.option("--json", "as_json", is_flag=True, help="Print the new tapes as JSON.")
@data_dir_option
def create(prefix: str | None, count: int, barcode: str | None, size: int, pool: str,
           worm: bool, as_json: bool, data_dir: Path) -> None:
    """Create tapes; they appear in the library's import/export slots."""
    if (prefix is None) == (barcode is None):
        raise click.ClickException("give either --prefix (with --count) or --barcode")
    _check_size(size)
    if not 1 <= count <= 10:
        raise click.ClickException(f"--count {count}: create 1 to 10 tapes per call")
    if barcode is not None:
        code = _check(barcodes.validate_barcode, barcode)
        result = client.call(data_dir, "CreateTapeWithBarcode", barcode=code, size_bytes=size,
                             pool=pool, worm=worm)
    else:
        pre = _check(barcodes.validate_prefix, prefix or "")
        result = client.call(data_dir, "CreateTapes", prefix=pre, count=count,
                             size_bytes=size, pool=pool, worm=worm)
    tapes = _tapes(result)
    if as_json:
        emit(tapes, JSON_FIELDS, True)
        return
    for t in tapes:
        click.echo(f"created tape {t.get('barcode')} ({human_bytes(t.get('size_bytes'))}, "
                   f"{t.get('pool')}{', WORM' if t.get('worm') else ''}) in "
                   f"{location_text(t.get('location'))}")


@tape.command("list")
@click.option("--status", help="Only tapes in this status (e.g. AVAILABLE, ARCHIVED).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@data_dir_option
def list_(status: str | None, as_json: bool, data_dir: Path) -> None:
    """List tapes (deleted ones only with --status DELETED)."""
    args = {"status": status} if status else {}
    tapes = _tapes(client.call(data_dir, "ListTapes", **args))
    if as_json:
        emit(tapes, JSON_FIELDS, True)
    else:
        emit([_human(t) for t in tapes], TABLE_COLUMNS, False)


@tape.command("show")
@click.argument("barcode")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@data_dir_option
def show(barcode: str, as_json: bool, data_dir: Path) -> None:
    """Show one tape."""
    code = _check(barcodes.validate_barcode, barcode)
    info = _tapes(client.call(data_dir, "DescribeTape", barcode=code))[0]
    if as_json:
        doc = {k: info.get(k) for k, _ in JSON_FIELDS}
        cloud = _cloud(data_dir, code)
        if cloud is not None:  # upload progress: cloud_bytes, pending_bytes, safe_in_cloud...
            doc["cloud"] = {k: cloud.get(k) for k in ("cloud_bytes", "pending_bytes",
                                                      "upload_percent", "safe_in_cloud",
                                                      "archived_at", "ready_at", "eta_seconds")}
        click.echo(json.dumps(doc, indent=2))
        return
    human = _human(info)
    human["size_bytes"] = f"{human['size_bytes']} ({info.get('size_bytes')} bytes)"
    emit_record(human, [(k, label.lower()) for k, label in JSON_FIELDS], False)
    cloud = _cloud(data_dir, code)
    if cloud is not None:
        click.echo(f"cloud: {cloud_text(cloud)}")


def _cloud(data_dir: Path, code: str) -> dict[str, Any] | None:
    """Upload progress from the cloud tier (None on an appliance without one)."""
    try:
        result = client.call(data_dir, "DescribeTapeCloud", barcode=code)
    except click.ClickException:
        return None
    return result if isinstance(result, dict) else None


def cloud_text(cloud: dict[str, Any]) -> str:
    """``"safe in cloud (12.0 MiB)"`` or ``"3.0 MiB of 12.0 MiB uploaded (25.0%), 9.0 MiB not yet in the cloud"``."""
    used, done = cloud.get("used_bytes") or 0, cloud.get("cloud_bytes") or 0
    if cloud.get("safe_in_cloud"):
        return f"safe in cloud ({human_bytes(used)})"
    pct = cloud.get("upload_percent") or 0.0
    return (f"{human_bytes(done)} of {human_bytes(used)} uploaded ({pct:.1f}%), "
            f"{human_bytes(max(0, used - done))} not yet in the cloud")


@tape.command("delete")
@click.argument("barcode")
@data_dir_option
def delete(barcode: str, data_dir: Path) -> None:
    """Delete a tape that is not in a drive, with its data; its barcode is never reused."""
    code = _check(barcodes.validate_barcode, barcode)
    client.call(data_dir, "DeleteTape", barcode=code)
    click.echo(f"deleted tape {code}")
