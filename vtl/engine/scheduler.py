"""Archive schedules and auto tape creation on apscheduler, persisted in the catalog.

Each row of the catalog's ``schedules`` table is one schedule (``kind`` + JSON ``spec``); at
start every row is added to an apscheduler 3.x ``AsyncIOScheduler`` (memory job store only: the
catalog is the store, so apscheduler's SQLAlchemy job store is not needed). Jobs are coroutine
functions, so they run on the supervisor's event loop next to the changer and the catalog.

Kinds:

- ``archive``: ``{"cron": "0 6 * * *", "older_than": seconds, "pool": "deep-archive"|None}``.
  At each firing, AVAILABLE tapes in a storage or I/E slot (never in a drive) that are full
  (past the early-warning point) or untouched for ``older_than`` seconds of model time are
  exported for archiving (``pool`` first assigns the pool they archive to).
- ``auto-create``: ``{"prefix": "VT", "minimum": 5, "size_bytes": ..., "pool": ...}``. Every
  minute (and at start) blank AVAILABLE tapes with that barcode prefix in I/E slots are counted
  and new ones created up to ``minimum`` (AWS's automatic tape creation policy).

Cron expressions fire on the real (wall) clock in UTC; ``older_than`` is measured on the model
clock. ``RunSchedule`` fires a schedule at once (operators, tests).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from catalog import jobs as jq
from catalog import tapes as q
from vtl.cloud.tiers import Pool
from vtl.errors import ApplianceError, InvalidRequest, NotFound
from vtl.library import barcodes
from vtl.library.cartridge import early_warning_size
from vtl.library.elements import ElementType
from vtl.library.lifecycle import TapeStatus

from vtl.engine.jobs import parse_time

if TYPE_CHECKING:
    from vtl.engine.jobs import CloudService

log = logging.getLogger(__name__)

GiB = 1 << 30
KINDS = ("archive", "auto-create")
AUTO_CREATE_EVERY = 60.0


def _cron(expr: Any) -> CronTrigger:
    try:
        return CronTrigger.from_crontab(str(expr), timezone="UTC")
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"bad cron expression {expr!r}: {exc} (e.g. \"0 6 * * *\")") from None


class ArchiveScheduler:
    """Schedules of one appliance: catalog rows mirrored into an AsyncIOScheduler."""

    def __init__(self, service: CloudService) -> None:
        self.service = service
        self.db = service.db
        self._sched: AsyncIOScheduler | None = None

    def start(self) -> None:
        self._sched = AsyncIOScheduler(timezone="UTC")
        self._sched.start()
        for row in jq.list_schedules(self.db):
            try:
                self._add(row)
            except ApplianceError as exc:
                log.error("schedule %s cannot be loaded: %s", row["id"], exc.message)

    def close(self) -> None:
        if self._sched is not None:
            self._sched.shutdown(wait=False)
            self._sched = None

    def ops(self) -> dict[str, Any]:
        return {"AddSchedule": self.add_schedule, "ListSchedules": self.list_schedules,
                "RemoveSchedule": self.remove_schedule, "RunSchedule": self.run_schedule}

    # --- apscheduler mirror ----------------------------------------------------------------
    def _add(self, row: dict[str, Any]) -> None:
        assert self._sched is not None
        sid, spec = int(row["id"]), row["spec"]
        if row["kind"] == "archive":
            trigger: Any = _cron(spec.get("cron"))
        else:
            trigger = IntervalTrigger(seconds=AUTO_CREATE_EVERY, timezone="UTC")
        self._sched.add_job(self._fire, trigger, args=[sid], id=str(sid), replace_existing=True,
                            coalesce=True, max_instances=1, misfire_grace_time=3600)

    async def _fire(self, sid: int) -> None:
        try:
            self.run_schedule({"id": sid})
        except Exception:
            log.exception("schedule %s failed", sid)

    # --- what the schedules do -------------------------------------------------------------
    def _archive_due(self, spec: dict[str, Any]) -> list[str]:
        lib = self.service.library
        now = self.service._now()
        older = timedelta(seconds=float(spec.get("older_than") or 0))
        pool = spec.get("pool")
        chosen: list[str] = []
        for row in q.list_tapes(self.db, TapeStatus.AVAILABLE.value):
            address = row["element_address"]
            if address is None or lib.layout.type_of(address) not in (
                    ElementType.STORAGE, ElementType.IMPORT_EXPORT):
                continue
            full = (row["used_bytes"] or 0) >= row["size_bytes"] - early_warning_size(row["size_bytes"])
            touched = row["last_written_at"] or row["updated_at"] or row["created_at"]
            untouched = False
            if touched and older > timedelta(0):
                when = parse_time(touched)
                untouched = when is not None and now - when >= older
            if not (full or untouched):
                continue
            if pool:
                q.update_tape(self.db, row["barcode"], pool=Pool.parse(pool).value)
            try:
                self.service.archive_tape({"barcode": row["barcode"]})
            except ApplianceError as exc:
                log.warning("scheduled archive of %s skipped: %s", row["barcode"], exc.message)
                continue
            chosen.append(row["barcode"])
        return chosen

    def _auto_create(self, spec: dict[str, Any]) -> list[str]:
        lib = self.service.library
        prefix = str(spec["prefix"])
        blank = [r for r in q.list_tapes(self.db, TapeStatus.AVAILABLE.value)
                 if r["barcode"].startswith(prefix) and not (r["used_bytes"] or 0)
                 and r["element_address"] is not None
                 and lib.layout.type_of(r["element_address"]) == ElementType.IMPORT_EXPORT]
        missing = int(spec["minimum"]) - len(blank)
        made: list[str] = []
        while missing > 0:
            n = min(missing, lib.limits.max_per_call)
            result = lib.create_tapes({"prefix": prefix, "count": n,
                                       "size_bytes": int(spec["size_bytes"]),
                                       "pool": spec.get("pool") or "glacier"})
            made += [t["barcode"] for t in result["tapes"]]
            missing -= n
        return made

    # --- control operations ----------------------------------------------------------------
    def add_schedule(self, args: dict[str, Any]) -> dict[str, Any]:
        """AddSchedule: ``kind`` archive (cron, older_than, pool) or auto-create (prefix,
        minimum, size_bytes, pool)."""
        kind = str(args.get("kind") or "archive")
        if kind == "archive":
            _cron(args.get("cron"))
            older = args.get("older_than", 0)
            if isinstance(older, bool) or not isinstance(older, (int, float)) or older < 0:
                raise InvalidRequest("older_than must be a number of seconds >= 0")
            pool = args.get("pool")
            spec: dict[str, Any] = {"cron": str(args["cron"]), "older_than": older,
                                    "pool": Pool.parse(pool).value if pool else None}
        elif kind == "auto-create":
            prefix = barcodes.validate_prefix(str(args.get("prefix") or ""))
            minimum = args.get("minimum")
            if isinstance(minimum, bool) or not isinstance(minimum, int) or not 1 <= minimum <= 100:
                raise InvalidRequest("minimum must be 1 to 100 blank tapes")
            size = self.service.library._size(args.get("size_bytes"))
            pool = Pool.parse(str(args.get("pool") or "glacier")).value
            spec = {"prefix": prefix, "minimum": minimum, "size_bytes": size, "pool": pool}
            if any(s["kind"] == "auto-create" and s["spec"].get("prefix") == prefix
                   for s in jq.list_schedules(self.db)):
                raise InvalidRequest(f"prefix {prefix} already has an auto-create policy; "
                                     "remove it first")
        else:
            raise InvalidRequest(f"unknown schedule kind {kind!r}: use one of {', '.join(KINDS)}")
        sid = jq.add_schedule(self.db, kind, spec, self.service._wall_iso())
        row = {"id": sid, "kind": kind, "spec": spec}
        self._add(row)
        if kind == "auto-create":
            self.run_schedule({"id": sid})
        return self._json(row)

    def _json(self, row: dict[str, Any]) -> dict[str, Any]:
        job = self._sched.get_job(str(row["id"])) if self._sched is not None else None
        nxt = job.next_run_time.isoformat() if job is not None and job.next_run_time else None
        return {"id": row["id"], "kind": row["kind"], **row["spec"], "next_run_at": nxt}

    def list_schedules(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"schedules": [self._json(r) for r in jq.list_schedules(self.db)]}

    def remove_schedule(self, args: dict[str, Any]) -> dict[str, Any]:
        sid = args.get("id")
        if isinstance(sid, bool) or not isinstance(sid, int) or not jq.remove_schedule(self.db, sid):
            raise NotFound(f"no schedule {sid!r}; list them with `vtl archive schedule list`")
        if self._sched is not None and self._sched.get_job(str(sid)) is not None:
            self._sched.remove_job(str(sid))
        return {"id": sid, "removed": True}

    def run_schedule(self, args: dict[str, Any]) -> dict[str, Any]:
        """RunSchedule: fire one schedule now; returns the tapes it archived or created."""
        sid = args.get("id")
        rows = [r for r in jq.list_schedules(self.db) if r["id"] == sid]
        if not rows:
            raise NotFound(f"no schedule {sid!r}; list them with `vtl archive schedule list`")
        row = rows[0]
        if row["kind"] == "archive":
            return {"id": sid, "archived": self._archive_due(row["spec"])}
        return {"id": sid, "created": self._auto_create(row["spec"])}
