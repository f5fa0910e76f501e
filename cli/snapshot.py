"""``vtl snapshot``: point-in-time volume snapshots in the object store (list, show, delete).

Snapshots are taken with ``vtl volume snapshot NAME`` (or a schedule, ``vtl volume schedule``)
and restored with ``vtl volume create NEW --from-snapshot ID``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from cli.client import call, data_dir_option
from cli.output import emit, emit_record, human_bytes
from cli.volume import wait_for_snapshot

#: Table columns of ``vtl snapshot list``; the keys are the stable ``--json`` field names.
COLUMNS: list[tuple[str, str]] = [
    ("snapshot_id", "SNAPSHOT"),
    ("volume", "VOLUME"),
    ("volume_type", "TYPE"),
    ("size_bytes", "SIZE"),
    ("status", "STATUS"),
    ("progress", "PROGRESS"),
    ("created_at", "CREATED"),
    ("description", "DESCRIPTION"),
]

JSON_COLUMNS = COLUMNS + [("origin", "ORIGIN"), ("uploaded_chunks", "UPLOADED CHUNKS"),
                          ("uploaded_bytes", "UPLOADED"), ("completed_at", "COMPLETED"),
                          ("error", "ERROR")]


def _human(snap: dict[str, Any]) -> dict[str, Any]:
    pct = snap.get("progress")
    return {**snap, "size_bytes": human_bytes(snap.get("size_bytes")),
            "progress": f"{pct:.0f}%" if isinstance(pct, (int, float)) else "-",
            "description": snap.get("description") or "-"}


@click.group("snapshot")
def snapshot() -> None:
    """Volume snapshots in the object store."""


@snapshot.command("list")
@click.option("--volume", "volume", metavar="NAME", help="Only the snapshots of this volume.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@data_dir_option
def list_(volume: str | None, as_json: bool, data_dir: Path) -> None:
    """List snapshots, oldest first."""
    args: dict[str, Any] = {"name": volume} if volume else {}
    snaps = call(data_dir, "ListSnapshots", **args)["snapshots"]
    if as_json:
        emit(snaps, JSON_COLUMNS, True)
    else:
        emit([_human(s) for s in snaps], COLUMNS, False)


@snapshot.command("show")
@click.argument("snapshot_id")
@click.option("--wait", is_flag=True, help="Wait while it is PENDING, showing progress.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@data_dir_option
def show(snapshot_id: str, wait: bool, as_json: bool, data_dir: Path) -> None:
    """Show one snapshot."""
    snap = (wait_for_snapshot(data_dir, snapshot_id) if wait
            else call(data_dir, "DescribeSnapshots", snapshot_id=snapshot_id))
    emit_record(snap if as_json else _human(snap),
                None if as_json else [(k, k) for k, _ in JSON_COLUMNS], as_json)


@snapshot.command("delete")
@click.argument("snapshot_id")
@data_dir_option
def delete(snapshot_id: str, data_dir: Path) -> None:
    """Delete a snapshot; chunks no other snapshot or cached volume uses are freed."""
    result = call(data_dir, "DeleteSnapshot", snapshot_id=snapshot_id)
    freed = result.get("chunks_deleted")
    extra = f" ({freed} unshared chunk(s) freed)" if isinstance(freed, int) else ""
    click.echo(f"deleted snapshot {snapshot_id}{extra}")


@snapshot.command("export")
@click.argument("snapshot_id")
@click.option("--region", default=None, help="AWS region of the EBS snapshot (default us-east-1).")
@click.option("--endpoint-url", default=None, metavar="URL",
              help="EBS endpoint (e.g. a test server); credentials: the standard AWS chain.")
@click.option("--wait", is_flag=True, help="Wait until the export finishes, showing progress.")
@click.option("--json", "as_json", is_flag=True, help="Print the export as JSON.")
@data_dir_option
def export(snapshot_id: str, region: str | None, endpoint_url: str | None, wait: bool,
           as_json: bool, data_dir: Path) -> None:
    """Export a COMPLETED snapshot as an EBS snapshot (EBS direct APIs)."""
    args: dict[str, Any] = {"snapshot_id": snapshot_id}
    if region:
        args["region"] = region
    if endpoint_url:
        args["endpoint_url"] = endpoint_url
    state = call(data_dir, "ExportSnapshotToEBS", **args)
    while wait and state["status"] == "EXPORTING":
        click.echo(f"\r{snapshot_id} EXPORTING: {state['progress']:5.1f}%", nl=False, err=True)
        time.sleep(0.5)
        state = call(data_dir, "DescribeEBSExport", snapshot_id=snapshot_id)
    if wait:
        click.echo("", err=True)
    if as_json:
        emit_record(state, None, True)
    elif state["status"] == "COMPLETED":
        click.echo(f"snapshot {snapshot_id} exported as EBS snapshot {state['ebs_snapshot_id']} "
                   f"({state['blocks']} blocks)")
    else:
        click.echo(f"snapshot {snapshot_id}: export {state['status']}")
    if state["status"] == "ERROR":
        raise click.ClickException(f"export of {snapshot_id} failed: {state.get('error')}")
