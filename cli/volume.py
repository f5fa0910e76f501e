"""``vtl volume``: block volumes served as iSCSI targets (AWS Volume Gateway operations)."""

from __future__ import annotations

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
    return [{**v, "size_bytes": human_bytes(v["size_bytes"])} for v in volumes]


@click.group("volume")
def volume() -> None:
    """Block volumes, each an iSCSI target with one LUN."""


@volume.command("create")
@click.option("--name", required=True, help="Volume name (also the end of its target IQN).")
@click.option("--size", "size", type=SIZE, required=True, help="Size, e.g. 1GiB, 512MiB, 2TiB.")
@click.option("--type", "vtype", type=click.Choice(["stored"]), default="stored",
              show_default=True, help="Volume type (cached volumes are not there yet).")
@click.option("--json", "as_json", is_flag=True, help="Print the new volume as JSON.")
@data_dir_option
def create(name: str, size: int, vtype: str, as_json: bool, data_dir: Path) -> None:
    """Create a volume and publish its iSCSI target."""
    result = call(data_dir, "CreateStorediSCSIVolume", name=name, size_bytes=size, type=vtype)
    info = _volume(result)
    if not info.get("name"):
        info = _volume(call(data_dir, "DescribeVolume", name=name))
    if as_json:
        emit_record(info, None, True)
    else:
        click.echo(f"created volume {info['name']} ({human_bytes(info['size_bytes'])}) "
                   f"at target {info['target_iqn']} lun {info['lun']}")


@volume.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@data_dir_option
def list_(as_json: bool, data_dir: Path) -> None:
    """List volumes."""
    volumes = _volume_list(call(data_dir, "ListVolumes"))
    emit(volumes if as_json else _table_rows(volumes), COLUMNS, as_json)


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
