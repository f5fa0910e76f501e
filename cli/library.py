"""``vtl library``: the tape library (changer type, drives, slot occupancy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cli import client
from cli.client import data_dir_option
from cli.output import emit, human_bytes
from vtl.library.identities import CHANGER_TYPES

DRIVE_COLUMNS: list[tuple[str, str]] = [
    ("index", "DRIVE"), ("barcode", "TAPE"), ("bytes_written", "WRITTEN"),
    ("bytes_read", "READ"), ("write_rate", "WRITE/s"), ("read_rate", "READ/s"),
    ("worker", "WORKER"), ("target_iqn", "TARGET"),
]


@click.group("library")
def library() -> None:
    """The virtual tape library: media changer and tape drives."""


@library.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@data_dir_option
def status(as_json: bool, data_dir: Path) -> None:
    """Show the changer type, each drive and how full the slots are."""
    info: dict[str, Any] = client.call(data_dir, "LibraryStatus") or {}
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    changer = info.get("changer") or {}
    click.echo(f"changer: {info.get('changer_type')} ({changer.get('vendor')} "
               f"{changer.get('product')} {changer.get('revision')}) at {changer.get('target_iqn')}")
    slots, ie = info.get("slots") or {}, info.get("ie") or {}
    click.echo(f"storage slots: {slots.get('full', 0)}/{slots.get('total', 0)} full; "
               f"import/export slots: {ie.get('full', 0)}/{ie.get('total', 0)} full")
    rows = [{**d, "bytes_written": human_bytes(d.get("bytes_written")),
             "bytes_read": human_bytes(d.get("bytes_read")),
             "write_rate": _rate(d.get("write_bytes_per_s")),
             "read_rate": _rate(d.get("read_bytes_per_s")),
             "worker": "-" if d.get("worker") is None else d["worker"]}
            for d in info.get("drives") or []]
    emit(rows, DRIVE_COLUMNS, False)


def _rate(value: Any) -> str:
    """Bytes per second as MB/s (10^6, like the bench); "-" when unknown."""
    if value is None:
        return "-"
    return f"{value / 1e6:.1f} MB/s"


@library.command("set-changer-type")
@click.argument("changer_type", metavar="TYPE", type=click.Choice(list(CHANGER_TYPES)))
@data_dir_option
def set_changer_type(changer_type: str, data_dir: Path) -> None:
    """Choose the changer's INQUIRY identity (STK-L700, AWS-Gateway-VTL, IBM-03584L32-0402)."""
    client.call(data_dir, "SetChangerType", type=changer_type)
    click.echo(f"changer type set to {changer_type}; initiators see it at their next INQUIRY")
