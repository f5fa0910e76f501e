"""``vtl serve``: run the appliance in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

import vtl
from cli.client import data_dir_option
from cli.output import SIZE
from vtl.library.identities import CHANGER_TYPES
from vtl.errors import ApplianceError

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def parse_listen(text: str) -> tuple[str, int]:
    """``"127.0.0.1:3260" -> ("127.0.0.1", 3260)``; ``"[::1]:3260"`` for IPv6; port 0 = any free."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:3260)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class _Listen(click.ParamType):
    name = "host:port"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value  # type: ignore[return-value]
        try:
            return parse_listen(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@click.command("serve")
@data_dir_option
@click.option("--listen", type=_Listen(), default="127.0.0.1:3260", show_default=True,
              help="iSCSI portal address; 0.0.0.0:3260 serves the LAN, port 0 picks a free one.")
@click.option("--iqn-authority", default=vtl.DEFAULT_IQN_AUTHORITY, show_default=True,
              help="Naming authority of the target IQNs.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"],
                                               case_sensitive=False),
              default="info", show_default=True, help="Log verbosity (logs go to stderr).")
@click.option("--changer-type", type=click.Choice(sorted(CHANGER_TYPES)), default=None,
              help="Media changer identity (kept in the catalog once set).  [default: STK-L700]")
@click.option("--slots", "storage_slots", type=click.IntRange(1, 60000), default=1600,
              show_default=True, help="Storage slots in the library.")
@click.option("--ie-slots", type=click.IntRange(1, 3328), default=1600, show_default=True,
              help="Import/export slots (new tapes appear there; exporting archives).")
@click.option("--workers", type=click.IntRange(0, 64), default=None,
              help="Drive worker processes (a worker serves drives i, i+N, ...); 0 serves every "
                   "drive in the main process.  [default: one per drive, at most 2 x CPUs]")
@click.option("--store", "store_url", default=None, metavar="URL",
              help="Object store for tapes: s3://bucket/prefix, or a directory.  "
                   "[default: <data-dir>/store]")
@click.option("--s3-endpoint", default=None, metavar="URL",
              help="Endpoint of an S3-compatible server (credentials: standard AWS chain).")
@click.option("--clock-speed", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="Run archive model time N times faster (demos, tests).")
@click.option("--cache-size", type=SIZE, default=None,
              help="Local tape cache limit, e.g. 500GiB (default: unlimited).")
@click.option("--s3-part-size", type=SIZE, default=None,
              help="Multipart upload part size for S3, at least 5MiB.  [default: 16MiB]")
@click.option("--upload-rate-limit", "upload_rate", type=SIZE, default=None,
              help="Upload bandwidth limit to S3 in bytes per second, e.g. 100MiB "
                   "(default: unlimited).")
@click.option("--volume-cache-size", "volume_cache_size", type=SIZE, default=None,
              help="Default local cache of each cached volume, e.g. 150GiB.  [default: 1 GiB]")
@click.option("--upload-buffer-size", "upload_buffer_size", type=SIZE, default=None,
              help="Default upload buffer of each cached volume.  [default: 1 GiB]")
@click.option("--nfs-port", type=click.IntRange(0, 65535), default=2049, show_default=True,
              help="NFS port of the file shares (host from --listen; 0 picks a free one).")
@click.option("--mount-port", type=click.IntRange(0, 65535), default=20048, show_default=True,
              help="MOUNT protocol port of the file shares.")
@click.option("--portmap-port", type=click.IntRange(0, 65535), default=111, show_default=True,
              help="Portmapper port; one that cannot be bound is logged and skipped.")
@click.option("--share-cache-size", type=SIZE, default=None,
              help="Local cache limit of the file shares, e.g. 100GiB (default: unlimited).")
@click.option("--share-settle", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Seconds a committed file must stay untouched before it uploads.")
def serve(data_dir: Path, listen: tuple[str, int], iqn_authority: str, log_level: str,
          changer_type: str | None, storage_slots: int, ie_slots: int, workers: int | None,
          store_url: str | None, s3_endpoint: str | None, clock_speed: float,
          cache_size: int | None, s3_part_size: int | None, upload_rate: int | None,
          volume_cache_size: int | None, upload_buffer_size: int | None,
          nfs_port: int, mount_port: int, portmap_port: int,
          share_cache_size: int | None, share_settle: float) -> None:
    """Run the appliance: iSCSI targets, volumes, the tape library and the control API."""
    from vtl.engine.supervisor import (  # keeps other commands' start-up light
        Appliance,
        CloudOptions,
        LibraryOptions,
        ShareOptions,
        VolumeOptions,
    )

    logging.basicConfig(stream=sys.stderr, level=log_level.upper(), format=LOG_FORMAT, force=True)
    try:
        library = LibraryOptions(changer_type=changer_type, storage_slots=storage_slots,
                                 ie_slots=ie_slots)
        cloud = CloudOptions(store_url=store_url, s3_endpoint=s3_endpoint,
                             clock_speed=clock_speed, cache_size=cache_size,
                             s3_part_size=s3_part_size, upload_rate=upload_rate)
        volumes = VolumeOptions(cache_bytes=volume_cache_size,
                                upload_buffer_bytes=upload_buffer_size)
        shares = ShareOptions(nfs_port=nfs_port, mount_port=mount_port,
                              portmap_port=portmap_port, cache_size=share_cache_size,
                              settle=share_settle)
        Appliance(data_dir, listen, authority=iqn_authority, library=library, cloud=cloud,
                  workers=workers, volumes=volumes, shares=shares).run()
    except ApplianceError as exc:
        raise click.ClickException(exc.message) from None
    except OSError as exc:
        if exc.filename:
            raise click.ClickException(
                f"cannot serve: {exc.strerror or exc}: {exc.filename}") from None
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise click.ClickException(
            f"cannot listen on {listen[0]}:{listen[1]}: {reason}; choose another --listen "
            "address or stop the program using it") from None
