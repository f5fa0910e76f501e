"""``vtl volume``: block volumes served as iSCSI targets (AWS Volume Gateway operations)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from cli.client import call, data_dir_option
from cli.output import SIZE, emit, emit_record, human_bytes

#: Table columns of ``vtl volume list``; the keys are the stable ``--json`` field names.
COLUMNS: list[tuple[str, str]] = [
    ("name", "NAME"),
    ("type", "TYPE"),
    ("size_bytes", "SIZE"),
    ("status", "STATUS"),
    ("target_iqn", "TARGET"),
    ("lun", "LUN"),
]

#: Fields ``vtl volume list --json`` adds after the columns when the appliance reports them.
JSON_EXTRA = ("progress", "source_snapshot", "used_bytes", "cache_bytes", "cache_used_bytes",
              "upload_buffer_bytes", "upload_buffer_used_bytes", "snapshot_schedule",
              "created_at")

#: Labels of ``vtl volume show``, in order (other fields follow under their own names).
SHOW_FIELDS: list[tuple[str, str]] = [
    ("name", "name"), ("type", "type"), ("size_bytes", "size"), ("status", "status"),
    ("target_iqn", "target"), ("lun", "lun"),
]

#: AWS-style spellings a service may use, mapped to our stable names.
_ALIASES: dict[str, tuple[str, ...]] = {
    "name": ("name", "VolumeName", "volume_name"),
    "type": ("type", "VolumeType", "volume_type"),
    "size_bytes": ("size_bytes", "VolumeSizeInBytes", "size"),
    "status": ("status", "VolumeStatus"),
    "target_iqn": ("target_iqn", "TargetARN", "TargetName", "target"),
    "lun": ("lun", "LunNumber"),
}


def normalize(volume: dict[str, Any]) -> dict[str, Any]:
    """A volume dict with the stable names first, then whatever else the service reported."""
    out: dict[str, Any] = {}
    for key, spellings in _ALIASES.items():
        out[key] = next((volume[s] for s in spellings if s in volume), None)
    used = {s for spellings in _ALIASES.values() for s in spellings}
    out.update({k: v for k, v in volume.items() if k not in used})
    return out


def _volume_list(result: Any) -> list[dict[str, Any]]:
    if isinstance(result, dict):
        result = result.get("volumes", result.get("Volumes", result.get("VolumeInfos", [])))
    return [normalize(v) for v in result or []]


def _volume(result: Any) -> dict[str, Any]:
    if isinstance(result, dict) and isinstance(result.get("volume"), dict):
        result = result["volume"]
    return normalize(result if isinstance(result, dict) else {})


def _table_rows(volumes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for v in volumes:
        status = v.get("status")
        if isinstance(v.get("progress"), (int, float)) and status in ("BOOTSTRAPPING",
                                                                       "RESTORING"):
            status = f"{status} {v['progress']:.0f}%"
        out.append({**v, "size_bytes": human_bytes(v["size_bytes"]), "status": status})
    return out


@click.group("volume")
def volume() -> None:
    """Block volumes, each an iSCSI target with one LUN."""


def _progress_line(snap: dict[str, Any]) -> str:
    pct = snap.get("progress")
    pct_text = f"{pct:5.1f}%" if isinstance(pct, (int, float)) else "  ...%"
    done = human_bytes(snap.get("uploaded_bytes") or 0)
    return (f"\r{snap['snapshot_id']} of {snap.get('volume')} {snap['status']}: {pct_text} "
            f"({done} uploaded)")


def wait_for_snapshot(data_dir: Path, snapshot_id: str, *, poll: float = 0.5) -> dict[str, Any]:
    """Poll DescribeSnapshots until the snapshot leaves PENDING, with a progress line on stderr."""
    while True:
        snap = call(data_dir, "DescribeSnapshots", snapshot_id=snapshot_id)
        if snap["status"] != "PENDING":
            break
        click.echo(_progress_line(snap), nl=False, err=True)
        time.sleep(poll)
    click.echo(_progress_line(snap), err=True)
    return snap


@volume.command("create")
@click.argument("name_arg", metavar="NAME", required=False)
@click.option("--name", help="Volume name (same as the NAME argument).")
@click.option("--size", "size", type=SIZE, default=None,
              help="Size, e.g. 1GiB, 512MiB, 4TiB (default with --from-snapshot: its size).")
@click.option("--type", "vtype", type=click.Choice(["stored", "cached"]), default="stored",
              show_default=True, help="stored: primary data local; cached: primary data in the "
                                      "object store, hot data in a local cache.")
@click.option("--from-snapshot", "snapshot_id", metavar="ID",
              help="Restore this snapshot into the new volume (readable at once).")
@click.option("--cache-size", "cache_size", type=SIZE, default=None,
              help="Local cache of a cached volume (default: vtl serve --volume-cache-size).")
@click.option("--upload-buffer-size", "buffer_size", type=SIZE, default=None,
              help="Upload buffer of a cached volume (default: vtl serve --upload-buffer-size).")
@click.option("--json", "as_json", is_flag=True, help="Print the new volume as JSON.")
@data_dir_option
def create(name_arg: str | None, name: str | None, size: int | None, vtype: str,
           snapshot_id: str | None, cache_size: int | None, buffer_size: int | None,
           as_json: bool, data_dir: Path) -> None:
    """Create a volume NAME and publish its iSCSI target."""
    if name_arg and name and name_arg != name:
        raise click.ClickException("give the volume name once (NAME or --name)")
    name = name_arg or name
    if not name:
        raise click.ClickException("missing the volume name: vtl volume create NAME --size 1GiB")
    if size is None and snapshot_id is None:
        raise click.ClickException("missing --size (e.g. --size 4TiB), or give --from-snapshot ID")
    if vtype == "stored" and (cache_size is not None or buffer_size is not None):
        raise click.ClickException("--cache-size and --upload-buffer-size apply to --type cached")
    args: dict[str, Any] = {"name": name}
    if size is not None:
        args["size_bytes"] = size
    if vtype == "stored":
        args["type"] = "stored"
        if snapshot_id:
            args["snapshot_id"] = snapshot_id
        result = call(data_dir, "CreateStorediSCSIVolume", **args)
    else:
        if snapshot_id:
            args["snapshot_id"] = snapshot_id
        if cache_size is not None:
            args["cache_bytes"] = cache_size
        if buffer_size is not None:
            args["upload_buffer_bytes"] = buffer_size
        result = call(data_dir, "CreateCachediSCSIVolume", **args)
    info = _volume(result)
    if not info.get("name"):
        info = _volume(call(data_dir, "DescribeVolume", name=name))
    if as_json:
        emit_record(info, None, True)
    else:
        origin = f" from snapshot {snapshot_id}" if snapshot_id else ""
        click.echo(f"created {info.get('type') or vtype} volume {info['name']} "
                   f"({human_bytes(info['size_bytes'])}){origin} at target {info['target_iqn']} "
                   f"lun {info['lun']}, {info.get('status')}")


@volume.command("snapshot")
@click.argument("name")
@click.option("--description", default="", help="Free text kept with the snapshot.")
@click.option("--wait", is_flag=True, help="Wait until the upload finishes, showing progress.")
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot as JSON.")
@data_dir_option
def snapshot(name: str, description: str, wait: bool, as_json: bool, data_dir: Path) -> None:
    """Take a point-in-time snapshot of volume NAME into the object store."""
    snap = call(data_dir, "CreateSnapshot", name=name, description=description)
    if wait:
        snap = wait_for_snapshot(data_dir, snap["snapshot_id"])
    if as_json:
        emit_record(snap, None, True)
    else:
        click.echo(f"snapshot {snap['snapshot_id']} of volume {name}: {snap['status']}")
    if snap["status"] == "ERROR":
        raise click.ClickException(f"snapshot {snap['snapshot_id']} failed: "
                                   f"{snap.get('error') or 'see the appliance log'}")


def _parse_every(text: str) -> int:
    raw = text.strip().lower()
    raw = raw[:-1] if raw.endswith("h") else raw
    if not raw.isdigit() or int(raw) not in (1, 2, 4, 8, 12, 24):
        raise click.BadParameter(f"{text!r}: use 1h, 2h, 4h, 8h, 12h or 24h")
    return int(raw)


@volume.command("schedule")
@click.argument("name")
@click.option("--every", help="Snapshot every 1h, 2h, 4h, 8h, 12h or 24h.")
@click.option("--start-hour", type=int, default=None, help="First snapshot hour of the day "
                                                             "(0-23, UTC; default 0).")
@click.option("--description", default=None, help="Description of the scheduled snapshots.")
@click.option("--off", is_flag=True, help="Remove the volume's schedule.")
@click.option("--json", "as_json", is_flag=True, help="Print the schedule as JSON.")
@data_dir_option
def schedule(name: str, every: str | None, start_hour: int | None, description: str | None,
             off: bool, as_json: bool, data_dir: Path) -> None:
    """Show or set the snapshot schedule of volume NAME."""
    if off:
        if every or start_hour is not None:
            raise click.ClickException("--off takes no --every or --start-hour")
        result = call(data_dir, "DeleteSnapshotSchedule", name=name)
    elif every is None and start_hour is None and description is None:
        result = call(data_dir, "DescribeSnapshotSchedule", name=name)
    else:
        if every is None:
            raise click.ClickException("missing --every (1h, 2h, 4h, 8h, 12h or 24h)")
        try:
            hours = _parse_every(every)
        except click.BadParameter as exc:
            raise click.ClickException(f"invalid --every {exc.format_message()}") from None
        args: dict[str, Any] = {"name": name, "every_hours": hours,
                                "start_hour": 0 if start_hour is None else start_hour}
        if description is not None:
            args["description"] = description
        result = call(data_dir, "UpdateSnapshotSchedule", **args)
    if as_json:
        emit_record(result, None, True)
    elif not result.get("every_hours"):
        click.echo(f"volume {name} has no snapshot schedule")
    else:
        click.echo(f"volume {name}: a snapshot every {result['every_hours']} h from "
                   f"{result['start_hour']:02d}:00 UTC; next at {result.get('next_run_at') or '-'}")


@volume.command("clone")
@click.argument("name")
@click.option("--name", "new_name", required=True, help="Name of the new volume.")
@click.option("--type", "vtype", type=click.Choice(["stored", "cached"]), default=None,
              help="Type of the new volume (default: the source's type).")
@click.option("--json", "as_json", is_flag=True, help="Print the new volume as JSON.")
@data_dir_option
def clone(name: str, new_name: str, vtype: str | None, as_json: bool, data_dir: Path) -> None:
    """Create volume NEW from the latest recovery point of volume NAME."""
    args: dict[str, Any] = {"name": name, "new_name": new_name}
    if vtype:
        args["type"] = vtype
    info = _volume(call(data_dir, "CloneVolume", **args))
    if as_json:
        emit_record(info, None, True)
    else:
        click.echo(f"cloned volume {name} into {info['name']} "
                   f"({human_bytes(info['size_bytes'])}, {info.get('status')}) at target "
                   f"{info['target_iqn']} lun {info['lun']}")


RECOVERY_COLUMNS: list[tuple[str, str]] = [
    ("name", "VOLUME"), ("type", "TYPE"), ("recovery_point", "RECOVERY POINT"),
    ("snapshot_id", "SNAPSHOT"), ("size_bytes", "SIZE"),
]


@volume.command("recovery-points")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@data_dir_option
def recovery_points(as_json: bool, data_dir: Path) -> None:
    """The latest recovery point of every volume (what `vtl volume clone` starts from)."""
    points = call(data_dir, "ListVolumeRecoveryPoints")["recovery_points"]
    rows = points if as_json else [{**p, "size_bytes": human_bytes(p["size_bytes"])}
                                   for p in points]
    emit(rows, RECOVERY_COLUMNS, as_json)


@volume.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@data_dir_option
def list_(as_json: bool, data_dir: Path) -> None:
    """List volumes."""
    volumes = _volume_list(call(data_dir, "ListVolumes"))
    if as_json:  # the columns, then the volume gateway's extra fields where reported
        click.echo(json.dumps([{**{k: v.get(k) for k, _ in COLUMNS},
                                **{k: v[k] for k in JSON_EXTRA if k in v}} for v in volumes],
                              indent=2))
        return
    emit(_table_rows(volumes), COLUMNS, False)


@volume.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@data_dir_option
def show(name: str, as_json: bool, data_dir: Path) -> None:
    """Show one volume."""
    info = _volume(call(data_dir, "DescribeVolume", name=name))
    if not as_json:
        info = {**info, "size_bytes": f"{human_bytes(info['size_bytes'])} ({info['size_bytes']} bytes)"}
    emit_record(info, None if as_json else SHOW_FIELDS, as_json)


@volume.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@data_dir_option
def delete(name: str, yes: bool, data_dir: Path) -> None:
    """Delete a volume, its target and its local data."""
    if not yes:
        click.confirm(f"Delete volume {name} and all its data?", abort=True)
    call(data_dir, "DeleteVolume", name=name)
    click.echo(f"deleted volume {name}")


@volume.command("chap")
@click.argument("name")
@click.option("--user", required=True, help="CHAP user name the initiator logs in with.")
@click.option("--secret", required=True, help="CHAP secret (12-16 characters).")
@click.option("--mutual-user", help="User name the target answers with (mutual CHAP).")
@click.option("--mutual-secret", help="Secret the target answers with (mutual CHAP).")
@click.option("--initiator", "initiators", multiple=True, metavar="IQN",
              help="Allow only this initiator (repeatable; default: any).")
@data_dir_option
def chap(name: str, user: str, secret: str, mutual_user: str | None,
         mutual_secret: str | None, initiators: tuple[str, ...], data_dir: Path) -> None:
    """Require CHAP (and optionally mutual CHAP, an initiator list) for a volume's target."""
    if (mutual_user is None) != (mutual_secret is None):
        raise click.UsageError("--mutual-user and --mutual-secret go together")
    args: dict[str, Any] = {"name": name, "chap_user": user, "chap_secret": secret}
    if mutual_user is not None:
        args.update(mutual_user=mutual_user, mutual_secret=mutual_secret)
    if initiators:
        args["initiators"] = list(initiators)
    call(data_dir, "SetVolumeChap", **args)
    extra = f", initiators {', '.join(initiators)}" if initiators else ""
    click.echo(f"CHAP set on volume {name}{' (mutual)' if mutual_user else ''}{extra}")
