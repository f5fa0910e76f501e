"""``vtl share``: NFS file shares of the bucket (AWS S3 File Gateway operations)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cli.client import call, data_dir_option
from cli.output import emit, emit_record

#: Table columns of ``vtl share list``; the keys are the stable ``--json`` field names.
COLUMNS: list[tuple[str, str]] = [
    ("name", "NAME"),
    ("path", "EXPORT"),
    ("prefix", "PREFIX"),
    ("clients", "CLIENTS"),
    ("squash", "SQUASH"),
    ("read_only", "RO"),
    ("nfs_port", "NFS"),
    ("mount_port", "MOUNT"),
    ("portmap_port", "PORTMAP"),
    ("status", "STATUS"),
]
JSON_KEYS: list[tuple[str, str]] = COLUMNS + [
    ("file_share_id", ""), ("nfs_host", ""), ("file_mode", ""), ("dir_mode", ""),
    ("owner", ""), ("storage_class", ""), ("cache_stale_after", ""),
]


def _mode(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    try:
        value = int(text, 8)
    except ValueError:
        raise click.ClickException(f"{what} {text!r} is not an octal mode such as 0644") from None
    if not 0 <= value <= 0o7777:
        raise click.ClickException(f"{what} {text!r} is out of range 0000-7777")
    return value


def _owner(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    uid, sep, gid = text.partition(":")
    if not sep or not uid.isdigit() or not gid.isdigit():
        raise click.ClickException(f"--owner {text!r} is not UID:GID (e.g. 1000:1000)")
    return int(uid), int(gid)


def _settings(clients: tuple[str, ...], squash: str | None, file_mode: str | None,
              dir_mode: str | None, owner: str | None, storage_class: str | None,
              stale_after: float | None) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if clients:
        args["clients"] = list(clients)
    if squash is not None:
        args["squash"] = squash
    fmode, dmode, ids = _mode(file_mode, "--file-mode"), _mode(dir_mode, "--dir-mode"), \
        _owner(owner)
    if fmode is not None:
        args["file_mode"] = fmode
    if dmode is not None:
        args["dir_mode"] = dmode
    if ids is not None:
        args["owner_uid"], args["owner_gid"] = ids
    if storage_class is not None:
        args["storage_class"] = storage_class
    if stale_after is not None:
        args["cache_stale_after"] = stale_after
    return args


def _share_options(fn: Any) -> Any:
    for option in reversed([
        click.option("--clients", "clients", multiple=True, metavar="CIDR",
                     help="Client address or CIDR allowed to mount (repeatable; default "
                          "127.0.0.1/32 and ::1/128)."),
        click.option("--squash", type=click.Choice(["root", "all", "none"]), default=None,
                     help="Map root (default) or every user to 65534, or nobody."),
        click.option("--file-mode", default=None, metavar="OCTAL",
                     help="Mode of files found in the bucket without ours (default 0666)."),
        click.option("--dir-mode", default=None, metavar="OCTAL",
                     help="Mode of such directories (default 0777)."),
        click.option("--owner", default=None, metavar="UID:GID",
                     help="Owner of such files and directories (default 65534:65534)."),
        click.option("--storage-class", default=None, metavar="CLASS",
                     help="Storage class of uploaded objects (STANDARD)."),
        click.option("--cache-stale-after", "stale_after", type=click.FloatRange(min=1),
                     default=None, metavar="SECONDS",
                     help="Re-read a directory from the bucket when its listing is older "
                          "(automated cache refresh; default: only on `vtl share refresh`)."),
    ]):
        fn = option(fn)
    return fn


@click.group("share")
def share() -> None:
    """NFS file shares: one file per object under a prefix of the bucket."""


@share.command("create")
@click.option("--name", required=True, help="Share name; clients mount /NAME.")
@click.option("--prefix", default=None, help="Object key prefix (default NAME/).")
@_share_options
@click.option("--read-only", is_flag=True, help="Refuse every change (NFS3ERR_ROFS).")
@click.option("--json", "as_json", is_flag=True, help="Print the new share as JSON.")
@data_dir_option
def create(name: str, prefix: str | None, clients: tuple[str, ...], squash: str | None,
           file_mode: str | None, dir_mode: str | None, owner: str | None,
           storage_class: str | None, stale_after: float | None, read_only: bool,
           as_json: bool, data_dir: Path) -> None:
    """Create a file share and export it at once."""
    args = {"name": name, **_settings(clients, squash, file_mode, dir_mode, owner,
                                      storage_class, stale_after)}
    if prefix is not None:
        args["prefix"] = prefix
    if read_only:
        args["read_only"] = True
    info = call(data_dir, "CreateNFSFileShare", **args)
    if as_json:
        emit_record(info, None, True)
        return
    click.echo(f"created share {info['name']}: export {info['path']} of prefix "
               f"{info['prefix'] or '(whole store)'}, NFS port {info.get('nfs_port')}, "
               f"MOUNT port {info.get('mount_port')}")


@share.command("update")
@click.argument("name")
@_share_options
@click.option("--read-only/--read-write", "read_only", default=None,
              help="Make the share read-only or writable again.")
@click.option("--json", "as_json", is_flag=True, help="Print the share as JSON.")
@data_dir_option
def update(name: str, clients: tuple[str, ...], squash: str | None, file_mode: str | None,
           dir_mode: str | None, owner: str | None, storage_class: str | None,
           stale_after: float | None, read_only: bool | None, as_json: bool,
           data_dir: Path) -> None:
    """Change a share's clients, squash, modes... (live, no restart)."""
    args = _settings(clients, squash, file_mode, dir_mode, owner, storage_class, stale_after)
    if read_only is not None:
        args["read_only"] = read_only
    if not args:
        raise click.ClickException("nothing to change: give at least one option (see --help)")
    info = call(data_dir, "UpdateNFSFileShare", name=name, **args)
    if as_json:
        emit_record(info, None, True)
    else:
        click.echo(f"updated share {info['name']}")


@share.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@data_dir_option
def list_(as_json: bool, data_dir: Path) -> None:
    """List file shares with their export paths and ports."""
    shares = call(data_dir, "ListFileShares") or []
    if as_json:
        emit(shares, JSON_KEYS, True)
        return
    rows = [{**s, "read_only": "yes" if s.get("read_only") else "no"} for s in shares]
    emit(rows, COLUMNS, False)


@share.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@data_dir_option
def show(name: str, as_json: bool, data_dir: Path) -> None:
    """Show one share, with its pending uploads."""
    result = call(data_dir, "DescribeNFSFileShares", names=[name]) or [{}]
    emit_record(result[0], None if as_json else [("name", "name"), ("path", "export"),
                                                  ("prefix", "prefix")], as_json)


@share.command("refresh")
@click.argument("name")
@click.option("--path", default="/", show_default=True, help="Directory of the share.")
@click.option("--recursive", is_flag=True, help="Refresh every directory below too.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@data_dir_option
def refresh(name: str, path: str, recursive: bool, as_json: bool, data_dir: Path) -> None:
    """Re-read the bucket: objects added by other tools appear, deleted ones go."""
    result = call(data_dir, "RefreshCache", name=name, path=path, recursive=recursive)
    if as_json:
        emit_record(result, None, True)
        return
    click.echo(f"refreshed {result['directories']} director"
               f"{'y' if result['directories'] == 1 else 'ies'} of {name}:{result['path']}: "
               f"{result['added']} added, {result['updated']} changed, "
               f"{result['removed']} removed")


@share.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Do not upload unsynced files first (they are lost).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@data_dir_option
def delete(name: str, force: bool, yes: bool, data_dir: Path) -> None:
    """Delete a share (its objects stay in the bucket)."""
    if not yes:
        click.confirm(f"Delete share {name}? (objects stay in the bucket)", abort=True)
    call(data_dir, "DeleteFileShare", name=name, force=force)
    click.echo(f"deleted share {name}")
