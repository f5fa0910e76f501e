"""Snapshots of volumes as jobs, snapshot schedules, and garbage collection of chunks.

The operations carry AWS Storage Gateway names: CreateSnapshot, ListSnapshots,
DescribeSnapshots, DeleteSnapshot, UpdateSnapshotSchedule, DescribeSnapshotSchedule,
DeleteSnapshotSchedule. :class:`SnapshotManager` is owned by
:class:`volumes.service.VolumeService`, which supplies the point-in-time sources
(``begin_snapshot`` / ``resume_snapshot``) of its live volumes.

Invariants:
- A snapshot row is its own job. CreateSnapshot fixes the point in time at once (on the event
  loop, between two SCSI commands), writes the row PENDING and uploads in a thread; writes to
  the volume continue meanwhile. The manifest is written after every chunk it names is in the
  store and before the row turns COMPLETED, so a snapshot is never half-visible: listed
  COMPLETED means restorable. At start every PENDING row resumes; one whose point in time
  cannot be recovered (the source is gone) is removed with whatever it uploaded: absent, never
  half-present.
- DeleteSnapshot hides the row first (status DELETING), then deletes the manifest, then
  collects chunks that no manifest, no uploading snapshot and no cached volume names, then
  removes the row; an interrupted deletion is finished at start.
- Collection never runs while a snapshot uploads or a cached volume uploads to its map
  (``ChunkStore.put`` skips chunks it sees present, so a concurrent collect could remove one
  it relied on): uploads hold a shared lock, collection an exclusive one.
- Sources: a stored volume's :class:`TrackerSource` (SnapshotTracker: the point in time is
  durable, so its job resumes after a restart) and a cached volume's :class:`CachedSource`
  (``CachedBackend.recovery_point``, frozen when the job starts; it lives in memory, so a
  restart abandons the snapshot: absent). A job may carry a ``then`` callback, run on the loop
  with the manifest (or None on failure): CloneVolume of a cached volume uses it.
- Schedules (one per volume, every 1/2/4/8/12/24 h from a start hour, UTC) live in the
  catalog's ``snapshot_schedules`` and are mirrored into an apscheduler AsyncIOScheduler at
  start; a stored volume gets a daily schedule when it is created.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Protocol

from catalog import volumes as vq
from volumes.chunks import ChunkStore, Manifest, chunk_count
from vtl.cloud.store import ObjectNotFound, StoreError
from vtl.errors import ApplianceError, Conflict, InvalidRequest, NotFound, check_args

if TYPE_CHECKING:
    from volumes.cached import CachedBackend
    from volumes.service import VolumeService
    from volumes.snapshots import SnapshotTracker

log = logging.getLogger(__name__)

PENDING, COMPLETED, ERROR, DELETING = "PENDING", "COMPLETED", "ERROR", "DELETING"
EVERY_HOURS = (1, 2, 4, 8, 12, 24)
MAX_BACKOFF = 60.0
DESCRIPTION_MAX = 255


def retry_delay(attempt: int) -> float:
    """Seconds before retry ``attempt`` (0-based) of work the object store interrupted:
    1, 2, 4 ... s, at most MAX_BACKOFF."""
    return min(MAX_BACKOFF, 2.0 ** min(attempt, 6))

class SnapshotSource(Protocol):
    """A volume frozen at a point in time, ready to upload (given by VolumeService)."""

    def upload(self, chunks: ChunkStore, progress: Callable[[int, int], None],
               stopping: Callable[[], bool]) -> Manifest:
        """Store every chunk of the point in time, then the manifest; return the manifest.
        Resumable after an error or a restart. ``progress(done_chunks, total_chunks)``."""
        ...

    def release(self) -> None:
        """Forget the point in time if it was never completed (abort); idempotent."""
        ...


def new_snapshot_id() -> str:
    """An AWS-like snapshot id: ``snap-`` and 17 hex digits."""
    return "snap-" + secrets.token_hex(9)[:17]


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def schedule_hours(every_hours: int, start_hour: int) -> list[int]:
    """The hours of the day (UTC) a schedule fires: start_hour, start_hour + every, ..."""
    return sorted({(start_hour + k * every_hours) % 24 for k in range(24 // every_hours)})


def validate_schedule(every: object, start: object) -> tuple[int, int]:
    if isinstance(every, bool) or every not in EVERY_HOURS:
        raise InvalidRequest(f"invalid recurrence {every!r}: snapshots run every 1, 2, 4, 8, 12 "
                             "or 24 hours")
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= 23:
        raise InvalidRequest(f"invalid start hour {start!r}: give an hour of the day, 0-23 (UTC)")
    return int(every), int(start)


class _SharedLock:
    """Many uploaders (shared) or one collector (exclusive)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    def shared(self) -> "_Hold":
        return _Hold(self, exclusive=False)

    def exclusive(self) -> "_Hold":
        return _Hold(self, exclusive=True)

    def _acquire(self, exclusive: bool) -> None:
        with self._cond:
            if exclusive:
                self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
                self._exclusive = True
            else:
                self._cond.wait_for(lambda: not self._exclusive)
                self._shared += 1

    def _release(self, exclusive: bool) -> None:
        with self._cond:
            if exclusive:
                self._exclusive = False
            else:
                self._shared -= 1
            self._cond.notify_all()


class _Hold:
    def __init__(self, lock: _SharedLock, *, exclusive: bool) -> None:
        self.lock, self.exclusive = lock, exclusive

    def __enter__(self) -> None:
        self.lock._acquire(self.exclusive)

    def __exit__(self, *exc: object) -> None:
        self.lock._release(self.exclusive)


class GuardedChunkStore(ChunkStore):
    """A ChunkStore whose ``put`` takes the collection lock (shared). With ``track``, it also
    remembers what it stored or found until two collections have passed, so a chunk a cached
    volume is about to name in its map (put returned, map not updated yet) is never collected
    in between. Snapshot uploads need no tracking: they hold the lock until their manifest is
    stored."""

    def __init__(self, store: Any, prefix: str = "volumes/", *,
                 lock: _SharedLock | None = None, recent: list[set[str]] | None = None,
                 track: bool = False) -> None:
        super().__init__(store, prefix)
        self.lock = lock if lock is not None else _SharedLock()
        self.recent = recent if recent is not None else [set(), set()]
        self.track = track

    def put(self, data: bytes | memoryview) -> str | None:
        with self.lock.shared():
            ref = super().put(data)
            if ref is not None and self.track:
                self.recent[-1].add(ref)
            return ref

    def sibling(self, *, track: bool = False) -> "GuardedChunkStore":
        """Same store, lock and memory; its own upload counters."""
        return GuardedChunkStore(self.store, self.prefix, lock=self.lock, recent=self.recent,
                                 track=track)

    def rotate(self) -> set[str]:
        """Under the exclusive lock: the refs to keep alive now; starts a new generation."""
        keep = self.recent[0] | self.recent[1]
        self.recent[0], self.recent[1] = self.recent[1], set()
        return keep


class SnapshotManager:
    """Snapshot jobs, schedules and chunk collection of one appliance."""

    def __init__(self, volumes: VolumeService, chunks: GuardedChunkStore, *, workers: int = 4,
                 now: Callable[[], str] = _utc_now) -> None:
        self.volumes = volumes
        self.db = volumes.catalog.db
        self.chunks = chunks
        self._now = now
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vtl-snap")
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._sources: dict[str, SnapshotSource] = {}
        self._then: dict[str, Callable[[Manifest | None], None]] = {}
        self._exports: dict[str, dict[str, Any]] = {}  # in memory: an export is not resumable
        self._stopping = threading.Event()
        self.gc_lock = chunks.lock
        self._sched: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Resume PENDING snapshots, finish deletions, load the schedules."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None  # no loop (unit tests of the plain operations): no jobs
        for row in vq.list_snapshots(self.db, status=DELETING):
            self._spawn(row["snapshot_id"], self._job_delete)
        for row in vq.list_snapshots(self.db, status=PENDING):
            sid = row["snapshot_id"]
            source = self._resume_source(row)
            if source is None:
                self._spawn(sid, self._job_abandon)
            else:
                self._sources[sid] = source
                self._spawn(sid, self._job_upload)
        self._start_scheduler()

    def close(self) -> None:
        self._stopping.set()
        if self._sched is not None:
            self._sched.shutdown(wait=False)
            self._sched = None
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        # the point-in-time sources stay on disk: a PENDING row resumes at the next start

    def ops(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {
            "CreateSnapshot": self.create_snapshot,
            "ListSnapshots": self.list_snapshots,
            "DescribeSnapshots": self.describe_snapshots,
            "DeleteSnapshot": self.delete_snapshot,
            "UpdateSnapshotSchedule": self.update_schedule,
            "DescribeSnapshotSchedule": self.describe_schedule,
            "DeleteSnapshotSchedule": self.delete_schedule,
            "ExportSnapshotToEBS": self.export_to_ebs,
            "DescribeEBSExport": self.describe_export,
        }

    def busy(self) -> bool:
        """True while any snapshot job runs (tests, shutdown)."""
        return any(not t.done() for t in self._tasks.values())

    # --- jobs ------------------------------------------------------------------------------
    def _spawn(self, sid: str, job: Callable[[str], Any]) -> None:
        if self._loop is None or sid in self._tasks:
            return
        task = self._loop.create_task(self._run(sid, job), name=f"vtl-snapshot-{sid}")
        self._tasks[sid] = task

    async def _run(self, sid: str, job: Callable[[str], Any]) -> None:
        attempt = 0
        try:
            while not self._stopping.is_set():
                try:
                    await job(sid)
                    return
                except asyncio.CancelledError:
                    raise
                except (StoreError, OSError) as exc:
                    delay = retry_delay(attempt)
                    attempt += 1
                    log.warning("snapshot %s: %s (attempt %d); retrying in %.0f s",
                                sid, exc, attempt, delay)
                    self._update(sid, error=str(exc)[:500])
                    await asyncio.sleep(delay)
                except Exception as exc:
                    log.exception("snapshot %s failed", sid)
                    self._fail(sid, f"{type(exc).__name__}: {exc}")
                    return
        finally:
            self._tasks.pop(sid, None)

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args))

    def _update(self, sid: str, **fields: Any) -> None:
        try:
            vq.update_snapshot(self.db, sid, updated_at=self._now(), **fields)
        except Exception:  # the catalog closed under a late callback: the job resumes later
            pass

    def _count(self, sid: str, chunks: int, nbytes: int) -> None:
        """Add the chunk PUTs of one upload attempt to the snapshot's totals."""
        row = vq.get_snapshot(self.db, sid)
        if row is not None and (chunks or nbytes):
            self._update(sid, uploaded_chunks=(row["uploaded_chunks"] or 0) + chunks,
                         uploaded_bytes=(row["uploaded_bytes"] or 0) + nbytes)

    def _fail(self, sid: str, why: str) -> None:
        source = self._sources.pop(sid, None)
        if source is not None:
            source.release()
        self._update(sid, status=ERROR, error=why[:500], state=None)
        then = self._then.pop(sid, None)
        if then is not None:
            then(None)

    def _progress(self, sid: str) -> Callable[[int, int, int], None]:
        loop = asyncio.get_running_loop()

        last = [-1]

        def report(done: int, total: int) -> None:
            pct = 100.0 if total == 0 else min(99.9, 100.0 * done / total)
            if self._stopping.is_set() or int(pct * 10) == last[0]:
                return  # a catalog write per 0.1 %, not per chunk
            last[0] = int(pct * 10)
            try:
                loop.call_soon_threadsafe(lambda: self._update(sid, progress=pct))
            except RuntimeError:
                pass
        return report

    async def _job_upload(self, sid: str) -> None:
        row = vq.get_snapshot(self.db, sid)
        if row is None or row["status"] != PENDING:
            return
        source = self._sources.get(sid)
        if source is None:
            raise ApplianceError(f"snapshot {sid} has no point in time to upload")
        progress = self._progress(sid)
        # a ChunkStore of its own counts the PUTs of this snapshot alone
        mine = self.chunks.sibling()

        def upload() -> None:
            with self.gc_lock.shared():
                try:
                    source.upload(mine, progress, self._stopping.is_set)
                except BaseException:
                    loop.call_soon_threadsafe(self._count, sid, mine.uploaded,
                                              mine.uploaded_bytes)
                    raise

        loop = asyncio.get_running_loop()
        await self._io(upload)  # the snapshot exists in the store from here on
        self._count(sid, mine.uploaded, mine.uploaded_bytes)
        with vq.transaction(self.db):
            vq.update_snapshot(self.db, sid, status=COMPLETED, progress=100.0, error=None,
                               state=None, completed_at=self._now(), updated_at=self._now())
        self._sources.pop(sid, None)
        log.info("snapshot %s of %s completed", sid, row["volume"])
        then = self._then.pop(sid, None)
        if then is not None:
            then(await self._io(self.chunks.get_manifest, sid))

    async def _job_abandon(self, sid: str) -> None:
        """A PENDING snapshot whose point in time is lost: remove every trace (absent)."""
        log.warning("snapshot %s: its point in time did not survive the restart; removed", sid)
        row = vq.get_snapshot(self.db, sid)
        if row is not None:
            vq.update_snapshot(self.db, sid, status=DELETING, updated_at=self._now())
        await self._job_delete(sid)

    async def _job_delete(self, sid: str) -> None:
        await self._io(self.chunks.delete_manifest, sid)
        freed = await self._io(self.collect)
        vq.delete_snapshot(self.db, sid)
        log.info("snapshot %s deleted; %d chunk(s) freed", sid, freed)

    # --- garbage collection -------------------------------------------------------------------
    def live_refs(self) -> set[str]:
        """Chunks something still needs: every manifest in the store, every cached volume's
        map and uploads, every volume restoring from a snapshot (runs in a pool thread)."""
        live: set[str] = set()
        for sid in self.chunks.list_manifests():
            try:
                live |= self.chunks.get_manifest(sid).refs()
            except ObjectNotFound:
                continue
        live |= set(self.volumes.live_chunk_refs())
        return live

    def collect(self) -> int:
        """Delete unreferenced chunks (exclusive against uploads); returns how many."""
        with self.gc_lock.exclusive():
            keep = self.chunks.rotate()
            return self.chunks.collect(self.live_refs() | keep)

    # --- resume ----------------------------------------------------------------------------
    def _resume_source(self, row: dict[str, Any]) -> SnapshotSource | None:
        sid = row["snapshot_id"]
        try:
            source = self.volumes.resume_snapshot(row["volume"], sid)
        except Exception:
            log.exception("snapshot %s cannot resume", sid)
            source = None
        if source is None and self.chunks.has_manifest(sid):
            return _Done(self.chunks, sid)  # crashed after the manifest, before COMPLETED
        return source

    # --- operations ------------------------------------------------------------------------
    def create_snapshot(self, args: dict[str, Any], *, origin: str = "manual",
                        then: Callable[[Manifest | None], None] | None = None) -> dict[str, Any]:
        """CreateSnapshot {name, description?} -> the snapshot (PENDING; poll DescribeSnapshots)."""
        _args(args, ("name",), ("description",))
        description = args.get("description") or ""
        if not isinstance(description, str) or len(description) > DESCRIPTION_MAX:
            raise InvalidRequest(f"invalid description: use at most {DESCRIPTION_MAX} characters")
        row = self.volumes.snapshot_row_of(args["name"])  # NotFound / Conflict
        if self._loop is None:
            raise Conflict("snapshots need the appliance's event loop")
        sid = new_snapshot_id()
        while vq.get_snapshot(self.db, sid) is not None:
            sid = new_snapshot_id()
        now = self._now()
        source = self.volumes.begin_snapshot(row["name"], sid, created_at=now,
                                             description=description)
        try:
            vq.add_snapshot(self.db, {
                "snapshot_id": sid, "volume": row["name"], "volume_type": row["type"],
                "size_bytes": row["size_bytes"], "description": description,
                "status": PENDING, "progress": 0.0, "origin": origin, "uploaded_chunks": 0,
                "uploaded_bytes": 0, "created_at": now, "updated_at": now,
            })
        except BaseException:
            source.release()
            raise
        self._sources[sid] = source
        if then is not None:  # called on the loop with the manifest, or None if it failed
            self._then[sid] = then
        self._spawn(sid, self._job_upload)
        return self._json(vq.get_snapshot(self.db, sid) or {})

    def list_snapshots(self, args: dict[str, Any]) -> dict[str, Any]:
        """ListSnapshots {name?} -> {snapshots: [...]} oldest first (deletions hidden)."""
        _args(args, (), ("name",))
        rows = vq.list_snapshots(self.db, volume=args.get("name"))
        return {"snapshots": [self._json(r) for r in rows if r["status"] != DELETING]}

    def describe_snapshots(self, args: dict[str, Any]) -> dict[str, Any]:
        """DescribeSnapshots {snapshot_id} -> the snapshot."""
        _args(args, ("snapshot_id",))
        return self._json(self.get_row(args["snapshot_id"]))

    def get_row(self, sid: object) -> dict[str, Any]:
        row = vq.get_snapshot(self.db, sid) if isinstance(sid, str) else None
        if row is None or row["status"] == DELETING:
            raise NotFound(f"no snapshot {sid}: see `vtl snapshot list`")
        return row

    def completed_manifest(self, sid: object) -> Manifest:
        """The manifest of a COMPLETED snapshot (NotFound / Conflict otherwise)."""
        row = self.get_row(sid)
        if row["status"] != COMPLETED:
            raise Conflict(f"snapshot {sid} is {row['status']}: only COMPLETED snapshots restore")
        try:
            return self.chunks.get_manifest(row["snapshot_id"])
        except ObjectNotFound:
            raise ApplianceError(f"snapshot {sid} has no manifest in the object store",
                                 code="IrrecoverableSnapshot") from None

    def delete_snapshot(self, args: dict[str, Any]) -> dict[str, Any]:
        """DeleteSnapshot {snapshot_id}: the manifest, then the chunks nothing else uses."""
        _args(args, ("snapshot_id",))
        row = self.get_row(args["snapshot_id"])
        sid = row["snapshot_id"]
        if row["status"] == PENDING:
            raise Conflict(f"snapshot {sid} is still uploading: delete it once it is COMPLETED")
        vq.update_snapshot(self.db, sid, status=DELETING, updated_at=self._now())
        self._spawn(sid, self._job_delete)
        return {"snapshot_id": sid, "status": "DELETING"}

    def _json(self, row: dict[str, Any]) -> dict[str, Any]:
        return {k: row.get(k) for k in (
            "snapshot_id", "volume", "volume_type", "size_bytes", "description", "status",
            "progress", "origin", "uploaded_chunks", "uploaded_bytes", "error", "created_at",
            "completed_at")}

    def latest_completed(self, volume: str) -> dict[str, Any] | None:
        rows = [r for r in vq.list_snapshots(self.db, volume=volume) if r["status"] == COMPLETED]
        return rows[-1] if rows else None

    # --- EBS export ------------------------------------------------------------------------
    def export_to_ebs(self, args: dict[str, Any]) -> dict[str, Any]:
        """ExportSnapshotToEBS {snapshot_id, region?, endpoint_url?}: write a COMPLETED snapshot
        as an EBS snapshot (EBS direct APIs) in the background; poll DescribeEBSExport."""
        _args(args, ("snapshot_id",), ("region", "endpoint_url"))
        row = self.get_row(args["snapshot_id"])
        sid = row["snapshot_id"]
        if row["status"] != COMPLETED:
            raise Conflict(f"snapshot {sid} is {row['status']}: only COMPLETED snapshots export")
        if self._exports.get(sid, {}).get("status") == "EXPORTING":
            raise Conflict(f"snapshot {sid} is being exported already")
        if self._loop is None:
            raise Conflict("exports need the appliance's event loop")
        from volumes.ebsexport import ebs_client, export_snapshot

        try:
            client = ebs_client(args.get("region"), args.get("endpoint_url"))
        except Exception as exc:  # boto3 missing, bad endpoint URL...
            raise InvalidRequest(f"cannot reach the EBS direct APIs: {exc}") from None
        state: dict[str, Any] = {"snapshot_id": sid, "status": "EXPORTING", "progress": 0.0,
                                 "ebs_snapshot_id": None, "blocks": None, "error": None}
        self._exports[sid] = state

        def progress(done: int, total: int) -> None:
            state["progress"] = 100.0 * done / total if total else 100.0

        async def run() -> None:
            try:
                manifest = await self._io(self.chunks.get_manifest, sid)
                out = await self._io(lambda: export_snapshot(
                    self.chunks, manifest, client, progress=progress,
                    should_stop=self._stopping.is_set))
                state.update(out, status="COMPLETED", progress=100.0)
            except asyncio.CancelledError:
                state.update(status="ERROR", error="the appliance stopped")
                raise
            except Exception as exc:
                log.warning("EBS export of %s failed: %s", sid, exc)
                state.update(status="ERROR", error=f"{type(exc).__name__}: {exc}"[:500])

        self._loop.create_task(run(), name=f"vtl-ebs-export-{sid}")
        return dict(state)

    def describe_export(self, args: dict[str, Any]) -> dict[str, Any]:
        """DescribeEBSExport {snapshot_id} -> {status EXPORTING|COMPLETED|ERROR, progress,
        ebs_snapshot_id, blocks, error} of the last export since the appliance started."""
        _args(args, ("snapshot_id",))
        state = self._exports.get(args["snapshot_id"]) if isinstance(
            args["snapshot_id"], str) else None
        if state is None:
            raise NotFound(f"no export of snapshot {args['snapshot_id']} since the appliance "
                           "started: start one with `vtl snapshot export`")
        return dict(state)

    # --- schedules -------------------------------------------------------------------------
    def _start_scheduler(self) -> None:
        if self._loop is None:
            return
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        self._sched = AsyncIOScheduler(timezone="UTC", event_loop=self._loop)
        self._sched.start()
        for row in vq.list_schedules(self.db):
            self._mirror(row)

    def _mirror(self, row: dict[str, Any]) -> None:
        if self._sched is None:
            return
        from apscheduler.triggers.cron import CronTrigger

        hours = ",".join(str(h) for h in schedule_hours(row["every_hours"], row["start_hour"]))
        self._sched.add_job(self._fire, CronTrigger(hour=hours, minute=0, timezone="UTC"),
                            args=[row["volume"]], id=row["volume"], replace_existing=True,
                            coalesce=True, max_instances=1, misfire_grace_time=3600)

    async def _fire(self, volume: str) -> None:
        row = vq.get_schedule(self.db, volume)
        if row is None:
            return
        try:
            self.create_snapshot({"name": volume, "description": row["description"] or
                                  f"scheduled snapshot of {volume}"}, origin="scheduled")
        except ApplianceError as exc:
            log.warning("scheduled snapshot of %s skipped: %s", volume, exc.message)
        except Exception:
            log.exception("scheduled snapshot of %s failed", volume)

    def set_schedule(self, volume: str, every: int, start: int, description: str) -> None:
        vq.put_schedule(self.db, volume, every, start, description, self._now())
        row = vq.get_schedule(self.db, volume)
        if row is not None:
            self._mirror(row)

    def drop_schedule(self, volume: str) -> bool:
        gone = vq.delete_schedule(self.db, volume)
        if self._sched is not None and self._sched.get_job(volume) is not None:
            self._sched.remove_job(volume)
        return gone

    def update_schedule(self, args: dict[str, Any]) -> dict[str, Any]:
        """UpdateSnapshotSchedule {name, every_hours, start_hour, description?}."""
        _args(args, ("name", "every_hours", "start_hour"), ("description",))
        row = self.volumes.volume_row(args["name"])
        every, start = validate_schedule(args["every_hours"], args["start_hour"])
        description = args.get("description") or ""
        if not isinstance(description, str) or len(description) > DESCRIPTION_MAX:
            raise InvalidRequest(f"invalid description: use at most {DESCRIPTION_MAX} characters")
        self.set_schedule(row["name"], every, start, description)
        return self.schedule_json(row["name"])

    def describe_schedule(self, args: dict[str, Any]) -> dict[str, Any]:
        """DescribeSnapshotSchedule {name} -> {name, every_hours, start_hour, next_run_at}
        (every_hours None: no schedule)."""
        _args(args, ("name",))
        row = self.volumes.volume_row(args["name"])
        return self.schedule_json(row["name"])

    def delete_schedule(self, args: dict[str, Any]) -> dict[str, Any]:
        """DeleteSnapshotSchedule {name}."""
        _args(args, ("name",))
        row = self.volumes.volume_row(args["name"])
        self.drop_schedule(row["name"])
        return self.schedule_json(row["name"])

    def schedule_json(self, volume: str) -> dict[str, Any]:
        row = vq.get_schedule(self.db, volume)
        if row is None:
            return {"name": volume, "every_hours": None, "start_hour": None,
                    "description": None, "next_run_at": None}
        nxt = None
        if self._sched is not None:
            job = self._sched.get_job(volume)
            if job is not None and job.next_run_time is not None:
                nxt = job.next_run_time.astimezone(timezone.utc).isoformat(timespec="seconds")
        return {"name": volume, "every_hours": row["every_hours"],
                "start_hour": row["start_hour"], "description": row["description"] or "",
                "next_run_at": nxt}


class _Done:
    """The source of a snapshot whose manifest is already stored (crash before COMPLETED)."""

    def __init__(self, chunks: ChunkStore, sid: str) -> None:
        self.chunks, self.sid = chunks, sid

    def upload(self, chunks: ChunkStore, progress: Any, stopping: Any) -> Manifest:
        return self.chunks.get_manifest(self.sid)

    def release(self) -> None:
        pass


_args = check_args


class TrackerSource:
    """A stored volume's pending snapshot (SnapshotTracker) as a SnapshotManager source."""

    def __init__(self, tracker: SnapshotTracker, snapshot_id: str) -> None:
        self.tracker, self.snapshot_id = tracker, snapshot_id

    def upload(self, chunks: ChunkStore, progress: Callable[[int, int], None],
               stopping: Callable[[], bool]) -> Manifest:
        return self.tracker.upload(chunks, progress=progress, should_stop=stopping)

    def release(self) -> None:
        pending = self.tracker.pending
        if pending is not None and pending.snapshot_id == self.snapshot_id:
            self.tracker.abort_snapshot()


class CachedSource:
    """A cached volume's recovery point as a snapshot: its chunk map frozen when the job
    starts, once every chunk dirty at that moment is uploaded (copy-on-write meanwhile)."""

    def __init__(self, cached: CachedBackend, snapshot_id: str, volume: str, created_at: str,
                 description: str) -> None:
        self.cached, self.snapshot_id = cached, snapshot_id
        self.volume, self.created_at, self.description = volume, created_at, description

    def upload(self, chunks: ChunkStore, progress: Callable[[int, int], None],
               stopping: Callable[[], bool]) -> Manifest:
        from volumes.snapshots import manifest_from_refs

        refs = self.cached.recovery_point()
        progress(len(refs), len(refs))
        return manifest_from_refs(chunks, refs, snapshot_id=self.snapshot_id,
                                  volume=self.volume, size_bytes=self.cached.size,
                                  created_at=self.created_at, description=self.description)

    def release(self) -> None:
        pass


def extend_manifest(manifest: Manifest, size: int) -> Manifest:
    """The manifest of a ``size``-byte volume holding the snapshot at its start (zeros after)."""
    if size == manifest.size_bytes:
        return manifest
    extra = chunk_count(size, manifest.chunk_bytes) - len(manifest.chunks)
    return Manifest(manifest.snapshot_id, manifest.volume, size, manifest.created_at,
                    manifest.description, manifest.chunk_bytes,
                    list(manifest.chunks) + [None] * extra)
