"""Building the cloud tier for the supervisor: the model clock, the object store, the service.

The model clock's epoch is persisted in the catalog (setting ``clock_epoch``) so every process
and every restart at the same ``--clock-speed`` reads the same model time (see clock.py).
Speed 1 is the real clock.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catalog.db import Catalog
from vtl.cloud.clock import Clock, ClockEpoch, FastClock, SystemClock
from vtl.cloud.store import ObjectStore, open_store
from vtl.engine.jobs import CloudService
from vtl.library.library import Library

if TYPE_CHECKING:
    from vtl.engine.supervisor import CloudOptions

CLOCK_SETTING = "clock_epoch"


def model_clock(catalog: Catalog, speed: float) -> Clock:
    if speed == 1.0:
        return SystemClock()
    raw = catalog.get_setting(CLOCK_SETTING)
    epoch = None
    if raw:
        try:
            stored = ClockEpoch.from_json(json.loads(raw))
            if stored.speed == speed:
                epoch = stored
            else:  # a new speed continues from the model time reached so far
                wall = SystemClock().now()
                epoch = ClockEpoch(wall=wall, model=stored.model_time(wall), speed=speed)
        except (ValueError, KeyError, TypeError):
            epoch = None
    clock = FastClock(speed, epoch=epoch)
    catalog.set_setting(CLOCK_SETTING, json.dumps(clock.epoch.to_json()))
    return clock


def build_store(catalog: Catalog, data_dir: Path,
                options: CloudOptions) -> tuple[Clock, ObjectStore]:
    """The model clock and the ONE object store of the appliance (tapes and volumes share it)."""
    clock = model_clock(catalog, options.clock_speed)
    url = options.store_url or str(Path(data_dir) / "store")
    kwargs: dict[str, Any] = {}
    if options.s3_endpoint and url.startswith("s3://"):
        kwargs["endpoint_url"] = options.s3_endpoint
    if url.startswith("s3://"):
        if options.s3_part_size:
            kwargs["part_size"] = options.s3_part_size
        if options.upload_rate:
            kwargs["upload_rate"] = options.upload_rate
    return clock, open_store(url, clock=clock, **kwargs)


def build_cloud_service(catalog: Catalog, data_dir: Path, library: Library,
                        options: CloudOptions, *,
                        built: tuple[Clock, ObjectStore] | None = None) -> CloudService:
    clock, store = built if built is not None else build_store(catalog, data_dir, options)
    service = CloudService(catalog, data_dir, library, store, clock=clock,
                           cache_size=options.cache_size)
    try:
        from vtl.engine.scheduler import ArchiveScheduler
    except ImportError:
        return service
    service.scheduler = ArchiveScheduler(service)
    return service
