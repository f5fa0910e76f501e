"""The cloud tier's job runner: uploads, archiving, retrieval and archive upkeep as catalog jobs.

Every long piece of work is a row of the catalog's ``jobs`` table (kind, subject = barcode),
picked up by :class:`CloudService`'s loop on the supervisor's event loop. A job is a small state
machine over the tape's status, so running it again after a crash or restart simply continues
(jobs are idempotent); at start-up rows left ``running`` become ``pending`` and every tape in a
transient status (IN TRANSIT TO VTS, ARCHIVING, RETRIEVING, DELETING) gets its job back, so no
tape is left in a status it cannot leave.

Threading choice: the object-store calls and file reads run in a ``ThreadPoolExecutor``, not a
process pool. boto3/botocore (urllib3 sockets) and file I/O release the GIL, S3Store already
uploads parts on its own threads, and a thread shares the store client and its connection pool;
a process pool would pickle jobs and re-create clients for no throughput gain on I/O-bound work.
Catalog writes and changer changes (take_for_archive, insert_tape) stay on the event-loop thread,
where the library and MOVE MEDIUM run, so they never race with an initiator.

Store errors: :class:`~vtl.cloud.store.StoreUnavailable` (endpoint down, 5xx, throttling) and
other store errors leave the data in the local cache (the upload buffer) and the job retries with
exponential backoff (1 s doubling to 60 s, real time). Model time (the injectable clock, ``vtl
serve --clock-speed``) decides only archive timings: retrieval ready times and timestamps.

Evicted tapes: loading one never makes the event loop wait for the store. The library's
``before_mount`` hook starts a fetch task (ranged GETs of every evicted segment, in the pool,
retried with backoff while the store fails) and the drive answers NOT READY 04/01 (becoming
ready) until the changer loads the fetched cartridge. Deleted tapes go DELETING and a ``delete``
job removes their objects before they become DELETED. Pools (built-in and custom, with
retention locks) are resolved by :class:`~vtl.engine.pools.PoolRegistry`.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from catalog import jobs as jq
from catalog import tapes as q
from catalog.db import Catalog
from vtl.cloud import tapestore as ts
from vtl.cloud.clock import Clock, SystemClock
from vtl.cloud.store import ObjectStore, StoreError
from vtl.cloud.tiers import MAX_RETENTION_DAYS, LockMode, Pool, can_move, draw_ready_time
from vtl.engine.pools import PoolRegistry
from vtl.errors import ApplianceError, Conflict, InvalidRequest, NotFound
from vtl.library.elements import ElementType
from vtl.library.library import Library
from vtl.library.lifecycle import TapeStatus, check_transition

log = logging.getLogger(__name__)

_T = TypeVar("_T")
S = TapeStatus

#: Days a restored copy stays readable (model time); the tape is downloaded at once.
RESTORE_DAYS = 7
MAX_BACKOFF = 60.0
#: Statuses shown by DescribeTapeArchives (the virtual tape shelf and tapes on their way).
ARCHIVE_STATUSES = (S.IN_TRANSIT_TO_VTS, S.ARCHIVING, S.ARCHIVED, S.RETRIEVING, S.RETRIEVED)


class Wait(Exception):
    """Not yet: run the job again after ``delay`` seconds (real time), without counting a failure."""

    def __init__(self, delay: float, why: str) -> None:
        super().__init__(why)
        self.delay = delay


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    when = datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _safe_in_cloud(status: str, used: int, cloud: int) -> bool:
    """The last byte is durable remotely: the tape left the library and its upload finished.

    A tape in the library still has an open last segment, so it is never "safe" there.
    """
    if status in (S.ARCHIVING.value, S.ARCHIVED.value, S.RETRIEVING.value, S.RETRIEVED.value):
        return True
    return status == S.IN_TRANSIT_TO_VTS.value and cloud >= used


class CloudService:
    """Uploads, archive, retrieval: a Service of the supervisor (``start``, ``close``, ``ops``)."""

    def __init__(self, catalog: Catalog, data_dir: Path, library: Library, store: ObjectStore,
                 *, clock: Clock | None = None, poll: float = 0.2, workers: int = 4,
                 cache_size: int | None = None) -> None:
        self.catalog = catalog
        self.db = catalog.db
        self.data_dir = Path(data_dir)
        self.library = library
        self.store = store
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.poll = poll
        self.cache_size = cache_size
        self._wall = SystemClock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vtl-job")
        self._task: asyncio.Task[None] | None = None
        self._running: dict[int, asyncio.Task[None]] = {}
        self._uploaded: dict[str, tuple[tuple[str, int, int], ...]] = {}
        self._last_scan = 0.0
        self._evicting = False
        self._stopping = threading.Event()
        self._tape_locks: dict[str, threading.Lock] = {}
        self._fetches: dict[str, asyncio.Task[None]] = {}
        self.scheduler: Any = None
        self.pools = PoolRegistry(catalog, self._now)

    # --- Service ---------------------------------------------------------------------------
    def start(self) -> None:
        now = self._wall_iso()
        n = jq.requeue_running(self.db, now)
        if n:
            log.info("resuming %d interrupted job(s)", n)
        self._resume_tapes()
        self._release_stale_cache()
        self.library.before_mount = self._hydrate
        self.library.defer_delete = True  # deleted tapes go DELETING: a job removes objects
        self._resume_fetches()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="vtl-jobs")
        if self.scheduler is not None:
            self.scheduler.start()
        self._pool.submit(self._upkeep)

    def close(self) -> None:
        self._stopping.set()  # pool threads stop between segments; their jobs resume later
        if self.scheduler is not None:
            self.scheduler.close()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for task in [*self._running.values(), *self._fetches.values()]:
            task.cancel()
        self._running.clear()
        self._fetches.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def ops(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        extra = self.scheduler.ops() if self.scheduler is not None else {}
        return {**extra, **self.pools.ops(),
            "ArchiveTape": self.archive_tape,
            "CancelArchival": self.cancel_archival,
            "RetrieveTapeArchive": self.retrieve_tape,
            "DescribeTapeArchives": self.describe_archives,
            "DescribeTapeCloud": self.describe_cloud,
            "AssignTapePool": self.assign_pool,
            "DeleteTapeArchive": self.delete_archive,
            "ListJobs": self.list_jobs,
        }

    def _release_stale_cache(self) -> None:
        """Cache left behind by a crash between ARCHIVED (or DELETED) and its release."""
        for row in self.db.query("select barcode from tapes where status in (?, ?)",
                                 [S.ARCHIVED.value, S.DELETED.value]):
            tape_dir = self.library.tape_dir(row["barcode"])
            if tape_dir.exists():
                shutil.rmtree(tape_dir, ignore_errors=True)

    def _upkeep(self) -> None:
        """Start-up housekeeping in the pool: bucket exists, stale multipart uploads aborted."""
        for name in ("ensure_bucket", "abort_stale_multipart_uploads"):
            fn = getattr(self.store, name, None)
            if fn is None:
                continue
            try:
                fn() if name == "ensure_bucket" else fn("tapes/", older_than=timedelta(0))
            except StoreError as exc:
                log.warning("store upkeep (%s) failed: %s; jobs retry on their own", name, exc)

    # --- time ------------------------------------------------------------------------------
    def _now(self) -> datetime:
        return self.clock.now()

    def _wall_iso(self, delay: float = 0.0) -> str:
        return (self._wall.now() + timedelta(seconds=delay)).isoformat(timespec="milliseconds")

    # --- the loop --------------------------------------------------------------------------
    def _resume_tapes(self) -> None:
        """Every tape in a transient status gets its job (restart, or a status set elsewhere)."""
        now = self._wall_iso()
        kinds = {S.IN_TRANSIT_TO_VTS.value: "archive", S.ARCHIVING.value: "archive",
                 S.RETRIEVING.value: "retrieve", S.DELETING.value: "delete"}
        for row in self.db.query(
                "select barcode, status from tapes where status in (?, ?, ?, ?)", list(kinds)):
            jq.ensure_job(self.db, kinds[row["status"]], row["barcode"], now)

    def _scan_uploads(self) -> None:
        """Enqueue uploads of newly sealed segments of tapes in the library (not in transit)."""
        for row in q.list_tapes(self.db, S.AVAILABLE.value):
            tape_dir = self.library.tape_dir(row["barcode"])
            sealed = ts.local_segments(tape_dir)[:-1]
            if not sealed:
                continue
            try:
                sig = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sealed)
            except OSError:
                continue
            if self._uploaded.get(row["barcode"]) != sig:
                jq.ensure_job(self.db, "upload", row["barcode"], self._wall_iso())

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                self._resume_tapes()
                self._exported_retrieved()
                if loop.time() - self._last_scan > 5.0:
                    self._last_scan = loop.time()
                    self._scan_uploads()
                    if self.cache_size is not None and not self._evicting:
                        self._evicting = True
                        loop.create_task(self._evict())
                for job in jq.due_jobs(self.db, self._wall_iso()):
                    if job["id"] not in self._running:
                        self._running[job["id"]] = loop.create_task(self._run(job))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job loop iteration failed")
            await asyncio.sleep(self.poll)

    async def _run(self, job: dict[str, Any]) -> None:
        job_id = int(job["id"])
        attempts = int(job["attempts"] or 0)
        handler = {"archive": self._job_archive, "retrieve": self._job_retrieve,
                   "upload": self._job_upload, "delete": self._job_delete,
                   "reclass": self._job_reclass}.get(job["kind"])
        try:
            jq.update_job(self.db, job_id, state="running", updated_at=self._wall_iso())
            if handler is None:
                raise ApplianceError(f"unknown job kind {job['kind']!r}")
            payload = json.loads(job["payload"] or "{}")
            await handler(job["subject"], payload)
        except asyncio.CancelledError:
            try:  # the catalog may be closed already; start-up requeues running jobs anyway
                jq.update_job(self.db, job_id, state="pending", updated_at=self._wall_iso())
            except Exception:
                pass
            raise
        except Wait as w:
            jq.update_job(self.db, job_id, state="pending", next_run_at=self._wall_iso(w.delay),
                          updated_at=self._wall_iso())
        except (StoreError, OSError, Conflict) as exc:
            delay = min(MAX_BACKOFF, 2.0 ** min(attempts, 6))
            log.warning("%s job on %s failed (attempt %d): %s; retrying in %.0f s",
                        job["kind"], job["subject"], attempts + 1, exc, delay)
            jq.update_job(self.db, job_id, state="pending", attempts=attempts + 1,
                          error=str(exc)[:500], next_run_at=self._wall_iso(delay),
                          updated_at=self._wall_iso())
        except Exception as exc:
            log.exception("%s job on %s failed", job["kind"], job["subject"])
            delay = min(MAX_BACKOFF, 2.0 ** min(attempts, 6))
            jq.update_job(self.db, job_id, state="pending", attempts=attempts + 1,
                          error=f"{type(exc).__name__}: {exc}"[:500],
                          next_run_at=self._wall_iso(delay), updated_at=self._wall_iso())
        else:
            jq.update_job(self.db, job_id, state="done", error=None, updated_at=self._wall_iso())
        finally:
            self._running.pop(job_id, None)

    async def _io(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def _progress(self, barcode: str) -> Callable[[int], None]:
        loop = asyncio.get_running_loop()

        def report(cloud_bytes: int) -> None:
            if self._stopping.is_set():
                return
            try:
                loop.call_soon_threadsafe(self._set_cloud_bytes, barcode, cloud_bytes)
            except RuntimeError:  # the loop closed under us: the job resumes at next start
                pass
        return report

    def _set_cloud_bytes(self, barcode: str, cloud_bytes: int) -> None:
        try:
            q.update_tape(self.db, barcode, cloud_bytes=cloud_bytes)
        except KeyError:
            pass

    def _event(self, barcode: str, kind: str, message: str) -> None:
        q.add_event(self.db, _iso(self._now()), kind, barcode, message)

    # --- jobs ------------------------------------------------------------------------------
    async def _job_upload(self, barcode: str, payload: dict[str, Any]) -> None:
        """Upload the sealed segments of a tape in the library (it may be written meanwhile)."""
        row = q.get_tape(self.db, barcode)
        if row is None or row["status"] != S.AVAILABLE.value:
            return
        tape_dir = self.library.tape_dir(barcode)
        sealed = ts.local_segments(tape_dir)[:-1]
        sig = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sealed)
        await self._io(ts.upload_tape, self.store, barcode, tape_dir, final=False,
                       progress=self._progress(barcode), stopping=self._stopping.is_set)
        self._uploaded[barcode] = sig

    async def _job_archive(self, barcode: str, payload: dict[str, Any]) -> None:
        row = q.get_tape(self.db, barcode)
        if row is None:
            return
        status = S(row["status"])
        tape_dir = self.library.tape_dir(barcode)
        if status is S.IN_TRANSIT_TO_VTS:
            await self._io(ts.upload_tape, self.store, barcode, tape_dir, final=True,
                           progress=self._progress(barcode),
                           stopping=self._stopping.is_set)
            row = q.get_tape(self.db, barcode)
            if row is None or row["status"] != S.IN_TRANSIT_TO_VTS.value:
                return  # cancelled (moved back, loaded, or `vtl archive cancel`) meanwhile
            self.library.take_for_archive(barcode)  # Conflict (removal prevented): retry
            self._event(barcode, "tape.archive", "uploaded; archiving")
            status = S.ARCHIVING
        if status is S.ARCHIVING:
            manifest = await self._io(ts.upload_tape, self.store, barcode, tape_dir, final=True,
                                      progress=self._progress(barcode),
                                      stopping=self._stopping.is_set)
            if not manifest.complete:
                raise Wait(1.0, "segments changed during the upload")
            pool = self.pools.storage_pool(row["pool"])
            pending = await self._io(ts.transition_tape, self.store, manifest, pool.storage_class)
            if pending:
                raise Wait(5.0, f"{len(pending)} object(s) wait for a restore")
            archived = self._now()
            now = _iso(archived)
            with q.transaction(self.db):
                check_transition(S.ARCHIVING, S.ARCHIVED)
                q.update_tape(self.db, barcode, status=S.ARCHIVED.value, archived_at=now,
                              cloud_bytes=manifest.cloud_bytes, used_bytes=manifest.cloud_bytes,
                              ready_at=None, updated_at=now)
                self._stamp_lock(barcode, row, archived)
                q.add_event(self.db, now, "tape.archive", barcode,
                            f"archived to the {pool.value} pool ({manifest.cloud_bytes} bytes)")
            # the local copy was only cache now: release it
            await self._io(shutil.rmtree, tape_dir, True)
            self._uploaded.pop(barcode, None)

    async def _job_retrieve(self, barcode: str, payload: dict[str, Any]) -> None:
        row = q.get_tape(self.db, barcode)
        if row is None or row["status"] != S.RETRIEVING.value:
            return
        if row["element_address"] is None:
            manifest = await self._io(ts.load_manifest, self.store, barcode)
            if manifest is None:
                raise StoreError(f"tape {barcode} has no manifest in the store")
            if not payload.get("restores_requested"):
                await self._io(ts.request_restores, self.store, manifest, RESTORE_DAYS)
                job = jq.unfinished_job(self.db, "retrieve", barcode)
                if job is not None:
                    jq.update_job(self.db, job["id"], payload={"restores_requested": True})
            ready = parse_time(row["ready_at"])
            if ready is not None and self._now() < ready:
                raise Wait(self.poll, "retrieval not ready yet")
            if not await self._io(ts.restores_done, self.store, manifest):
                raise Wait(1.0, "the store's restore is still ongoing")
            await self._io(ts.download_tape, self.store, manifest, self.library.tape_dir(barcode),
                          stopping=self._stopping.is_set)
            try:
                self.library.insert_tape(barcode)
            except ApplianceError as exc:  # no free I/E slot: try again later
                raise Wait(5.0, exc.message) from None
        now = _iso(self._now())
        with q.transaction(self.db):
            check_transition(S.RETRIEVING, S.RETRIEVED)
            q.update_tape(self.db, barcode, status=S.RETRIEVED.value, retrieved_at=now,
                          updated_at=now)
            q.add_event(self.db, now, "tape.retrieve", barcode, "retrieved (read-only)")

    async def _job_delete(self, barcode: str, payload: dict[str, Any]) -> None:
        row = q.get_tape(self.db, barcode)
        if row is None or row["status"] != S.DELETING.value:
            return
        upload = jq.unfinished_job(self.db, "upload", barcode)
        if upload is not None and upload["state"] == "running":
            raise Wait(1.0, "an upload of the tape is finishing")  # it would write a manifest
        await self._io(ts.delete_tape_objects, self.store, barcode)
        await self._io(shutil.rmtree, self.library.tape_dir(barcode), True)
        now = _iso(self._now())
        with q.transaction(self.db):
            q.update_tape(self.db, barcode, status=S.DELETED.value, element_address=None,
                          cloud_bytes=0, updated_at=now)
            q.add_event(self.db, now, "tape.delete", barcode, "deleted with its objects")

    async def _job_reclass(self, barcode: str, payload: dict[str, Any]) -> None:
        """Move an archived tape's objects to its (new) pool's storage class."""
        row = q.get_tape(self.db, barcode)
        if row is None or row["status"] != S.ARCHIVED.value:
            return
        manifest = await self._io(ts.load_manifest, self.store, barcode)
        if manifest is None:
            return
        pool = self.pools.storage_pool(row["pool"])
        pending = await self._io(ts.transition_tape, self.store, manifest, pool.storage_class)
        if pending:
            await self._io(ts.request_restores, self.store, manifest, 1)
            raise Wait(5.0, "waiting for restores before the storage-class change")

    # --- the local cache: LRU eviction and read-back -----------------------------------------
    def _lock_for(self, barcode: str) -> threading.Lock:
        return self._tape_locks.setdefault(barcode, threading.Lock())

    def _hydrate(self, barcode: str) -> asyncio.Task[None] | None:
        """before_mount hook (on the event loop): None if the tape's segments are all local,
        else the task fetching the evicted ones back (ranged GETs, in the job pool). The loop
        never waits for the store: the drive reports "becoming ready" (04/01) meanwhile."""
        if not ts.evicted_stubs(self.library.tape_dir(barcode)):
            return None
        task = self._fetches.get(barcode)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._fetch(barcode),
                                                          name=f"vtl-fetch-{barcode}")
            self._fetches[barcode] = task
            task.add_done_callback(lambda t: self._fetches.pop(barcode, None)
                                   if self._fetches.get(barcode) is t else None)
        return task

    def _resume_fetches(self) -> None:
        """Drives left becoming ready by a restart (their tape's fetch was cut): fetch again."""
        for drive in self.library.drives:
            barcode = getattr(drive, "becoming_ready", None)
            if barcode is None:
                continue
            task = self._hydrate(barcode)
            if task is not None:
                task.add_done_callback(lambda t, b=barcode: self.library._fetched(b, t))
            elif self.library.changer is not None:  # fetched, but not loaded before the stop
                self.library.changer.complete_load(barcode)

    async def _fetch(self, barcode: str) -> None:
        """Fetch a tape's evicted segments back, retrying with backoff while the store fails."""
        attempts = 0
        while True:
            try:
                n = await self._io(self._hydrate_now, barcode)
            except (StoreError, OSError, ValueError) as exc:
                delay = min(MAX_BACKOFF, 2.0 ** min(attempts, 6))
                attempts += 1
                log.warning("cannot read tape %s back from the store (attempt %d): %s; "
                            "retrying in %.0f s", barcode, attempts, exc, delay)
                await asyncio.sleep(delay)
                continue
            log.info("tape %s: %d bytes read back from the store", barcode, n)
            return

    def _hydrate_now(self, barcode: str) -> int:
        tape_dir = self.library.tape_dir(barcode)
        with self._lock_for(barcode):
            if not ts.evicted_stubs(tape_dir):
                return 0
            return ts.hydrate_tape(self.store, barcode, tape_dir)

    def cache_usage(self) -> int:
        root = self.data_dir / "cache" / "tapes"
        total = 0
        if root.is_dir():
            for tape_dir in root.iterdir():
                total += sum(p.stat().st_size for p in ts.local_segments(tape_dir))
        return total

    async def _evict(self) -> None:
        """Free cache space down to ``cache_size``: uploaded sealed segments of AVAILABLE tapes
        not in a drive, least recently used tape (``updated_at``) first."""
        try:
            rows = sorted(q.list_tapes(self.db, S.AVAILABLE.value),
                          key=lambda r: r["updated_at"] or "")
            layout = self.library.layout
            barcodes = [r["barcode"] for r in rows if r["element_address"] is not None
                        and layout.type_of(r["element_address"]) != ElementType.DATA_TRANSFER]
            freed = await self._io(self._evict_some, barcodes)
            if freed:
                log.info("cache: evicted %d bytes", freed)
        except Exception:
            log.exception("cache eviction failed")
        finally:
            self._evicting = False

    def _evict_some(self, barcodes: list[str]) -> int:
        assert self.cache_size is not None
        over = self.cache_usage() - self.cache_size
        freed = 0
        for barcode in barcodes:
            if freed >= over:
                break
            tape_dir = self.library.tape_dir(barcode)
            if len(ts.local_segments(tape_dir)) < 2:
                continue  # nothing sealed here
            # the store is asked outside the tape's lock: a load waiting on that lock (on the
            # event loop) must never wait for the network
            manifest = ts.load_manifest(self.store, barcode)
            if manifest is None:
                continue
            with self._lock_for(barcode):
                try:
                    fd = os.open(tape_dir, os.O_RDONLY | os.O_DIRECTORY)
                except OSError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # loaded tapes hold it
                except BlockingIOError:
                    os.close(fd)
                    continue
                try:
                    sealed = {p.name for p in ts.local_segments(tape_dir)[:-1]}
                    for entry in manifest.segments:
                        if freed >= over:
                            break
                        if entry.name in sealed:
                            freed += ts.evict_segment(tape_dir / entry.name, entry)
                finally:
                    os.close(fd)  # drops the flock
        return freed

    # --- control operations ----------------------------------------------------------------
    def _row(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.library._tape_row(args.get("barcode"))

    def archive_tape(self, args: dict[str, Any]) -> dict[str, Any]:
        """ArchiveTape: export a tape to an I/E slot (-> IN TRANSIT TO VTS); archiving follows."""
        row = self._row(args)
        code = row["barcode"]
        status = S(row["status"])
        changer = self.library._need_changer()
        layout = self.library.layout
        address = row["element_address"]
        if status is S.RETRIEVED:
            return self._return_to_shelf(row)
        if status is not S.AVAILABLE:
            check_transition(status, S.IN_TRANSIT_TO_VTS)
        if address is None:
            raise Conflict(f"tape {code} is not in the library")
        kind = layout.type_of(address)
        if kind == ElementType.DATA_TRANSFER:
            raise Conflict(f"tape {code} is in drive {layout.drive_index(address)}; unload it "
                           "first (e.g. `mtx unload`)")
        days = args.get("retention_days")
        if days is not None and (isinstance(days, bool) or not isinstance(days, int)
                                 or not 0 <= days <= MAX_RETENTION_DAYS):
            raise InvalidRequest(f"retention_days must be 0 to {MAX_RETENTION_DAYS}")
        now = _iso(self._now())
        if kind == ElementType.STORAGE:
            free = changer.free_addresses(ElementType.IMPORT_EXPORT)
            if not free:
                raise Conflict("no free import/export slot to export the tape through")
            medium = changer.remove(address)
            changer.insert(type(medium)(code, source=address, worm=medium.worm, imported=False),
                           free[0])
            dest = free[0]
        else:
            dest = address
        with q.transaction(self.db):
            q.update_tape(self.db, code, status=S.IN_TRANSIT_TO_VTS.value, element_address=dest,
                          source_address=address if kind == ElementType.STORAGE else row["source_address"],
                          updated_at=now)
            if days:  # a retention lock counted from the export (compliance: not bypassable)
                q.update_tape(self.db, code,
                              retention_until=_iso(self._now() + timedelta(days=days)),
                              retention_lock=LockMode.COMPLIANCE.value)
            q.add_event(self.db, now, "tape.export", code, "exported for archiving")
        jq.ensure_job(self.db, "archive", code, self._wall_iso())
        return self.library.tape_json(q.get_tape(self.db, code) or row)

    def _return_to_shelf(self, row: dict[str, Any]) -> dict[str, Any]:
        """A RETRIEVED tape goes back to the shelf (ARCHIVED): its objects never left the
        archive, so only the read-only local copy is released."""
        code = row["barcode"]
        changer = self.library._need_changer()
        address = row["element_address"]
        if address is not None and self.library.layout.type_of(address) == ElementType.DATA_TRANSFER:
            raise Conflict(f"tape {code} is in drive {self.library.layout.drive_index(address)}; "
                           "unload it first (e.g. `mtx unload`)")
        check_transition(S.RETRIEVED, S.ARCHIVED)
        now = _iso(self._now())
        with q.transaction(self.db):
            q.update_tape(self.db, code, status=S.ARCHIVED.value, element_address=None,
                          source_address=None, ready_at=None, updated_at=now)
            q.add_event(self.db, now, "tape.archive", code, "retrieved copy returned to the shelf")
        if address is not None and changer.locate(code) == address:
            changer.remove(address)
        shutil.rmtree(self.library.tape_dir(code), ignore_errors=True)
        return self.library.tape_json(q.get_tape(self.db, code) or row)

    def _exported_retrieved(self) -> None:
        """RETRIEVED tapes an initiator moved into an I/E slot (export) return to the shelf."""
        changer = self.library.changer
        if changer is None:
            return
        for row in q.list_tapes(self.db, S.RETRIEVED.value):
            address = row["element_address"]
            if address is None or self.library.layout.type_of(address) != ElementType.IMPORT_EXPORT:
                continue
            medium = changer.contents.get(address)
            if medium is not None and not medium.imported:  # put there by MOVE MEDIUM
                try:
                    self._return_to_shelf(row)
                except ApplianceError as exc:
                    log.warning("tape %s stays in its I/E slot: %s", row["barcode"], exc.message)

    def cancel_archival(self, args: dict[str, Any]) -> dict[str, Any]:
        """CancelArchival: only while IN TRANSIT TO VTS; the tape stays in its I/E slot."""
        row = self._row(args)
        code = row["barcode"]
        if row["status"] != S.IN_TRANSIT_TO_VTS.value:
            raise Conflict(f"tape {code} is {row['status']}: archiving can be cancelled only "
                           "while IN TRANSIT TO VTS")
        now = _iso(self._now())
        with q.transaction(self.db):
            q.update_tape(self.db, code, status=S.AVAILABLE.value, updated_at=now)
            q.add_event(self.db, now, "tape.archive", code, "archiving cancelled")
        changer = self.library._need_changer()
        address = changer.locate(code)
        if address is not None:
            medium = changer.remove(address)
            changer.insert(type(medium)(code, source=medium.source, worm=medium.worm,
                                        imported=True), address)
        return self.library.tape_json(q.get_tape(self.db, code) or row)

    def retrieve_tape(self, args: dict[str, Any]) -> dict[str, Any]:
        """RetrieveTapeArchive: ARCHIVED -> RETRIEVING with a ready time from the pool's window."""
        row = self._row(args)
        code = row["barcode"]
        check_transition(row["status"], S.RETRIEVING)
        pool = self.pools.storage_pool(row["pool"])
        requested = self._now()
        ready = draw_ready_time(pool, requested, seed=f"{code}:{_iso(requested)}")
        with q.transaction(self.db):
            q.update_tape(self.db, code, status=S.RETRIEVING.value, ready_at=_iso(ready),
                          retrieval_requested_at=_iso(requested), updated_at=_iso(requested))
            q.add_event(self.db, _iso(requested), "tape.retrieve", code,
                        f"retrieving from {pool.value}; ready at {_iso(ready)}")
        jq.ensure_job(self.db, "retrieve", code, self._wall_iso())
        return self._archive_json(q.get_tape(self.db, code) or row)

    def _archive_json(self, row: dict[str, Any]) -> dict[str, Any]:
        now = self._now()
        ready = parse_time(row.get("ready_at"))
        requested = parse_time(row.get("retrieval_requested_at"))
        eta = None
        pct = None
        if row["status"] == S.RETRIEVING.value and ready is not None:
            eta = max(0.0, (ready - now).total_seconds())
            if requested is not None and ready > requested:
                pct = min(100.0, max(0.0, 100.0 * (now - requested) / (ready - requested)))
        used = row["used_bytes"] or 0
        cloud = row["cloud_bytes"] or 0
        return {
            "barcode": row["barcode"], "status": row["status"], "pool": row["pool"],
            "size_bytes": row["size_bytes"], "used_bytes": used, "cloud_bytes": cloud,
            "archived_at": row.get("archived_at"), "ready_at": row.get("ready_at"),
            "retrieval_requested_at": requested and _iso(requested),
            "retrieved_at": row.get("retrieved_at"), "eta_seconds": eta,
            "retrieval_percent": pct, "retention_until": row.get("retention_until"),
            "retention_lock": row.get("retention_lock") if row.get("retention_until") else None,
            "now": _iso(now),
        }

    def describe_archives(self, args: dict[str, Any]) -> dict[str, Any]:
        """DescribeTapeArchives: tapes on (or on their way to/from) the virtual tape shelf."""
        wanted = [s.value for s in ARCHIVE_STATUSES]
        rows = [r for r in q.list_tapes(self.db) if r["status"] in wanted]
        barcode = args.get("barcode")
        if barcode:
            rows = [r for r in rows if r["barcode"] == barcode]
        return {"tapes": [self._archive_json(r) for r in rows], "now": _iso(self._now())}

    def describe_cloud(self, args: dict[str, Any]) -> dict[str, Any]:
        """DescribeTapeCloud: upload progress of one tape (``vtl tape show``)."""
        row = self._row(args)
        out = self._archive_json(row)
        used, cloud = out["used_bytes"], out["cloud_bytes"]
        out["pending_bytes"] = max(0, used - cloud)
        out["safe_in_cloud"] = _safe_in_cloud(row["status"], used, cloud)
        out["upload_percent"] = 100.0 if used == 0 else min(100.0, 100.0 * cloud / used)
        return out

    def assign_pool(self, args: dict[str, Any]) -> dict[str, Any]:
        """AssignTapePool: one-way move of an archived tape to a deeper pool."""
        row = self._row(args)
        code = row["barcode"]
        dst = Pool.parse(str(args.get("pool") or ""))
        src = self.pools.storage_pool(row["pool"])
        verdict = can_move(src, dst)
        if not verdict:
            raise Conflict(verdict.reason)
        if row["status"] != S.ARCHIVED.value:
            raise Conflict(f"tape {code} is {row['status']}: only ARCHIVED tapes move pools")
        now = _iso(self._now())
        with q.transaction(self.db):
            q.update_tape(self.db, code, pool=dst.value, updated_at=now)
            q.add_event(self.db, now, "tape.pool", code, f"{src.value} -> {dst.value}")
        jq.ensure_job(self.db, "reclass", code, self._wall_iso())
        return self._archive_json(q.get_tape(self.db, code) or row)

    def delete_archive(self, args: dict[str, Any]) -> dict[str, Any]:
        """DeleteTapeArchive: an ARCHIVED tape, unless its retention lock still holds."""
        row = self._row(args)
        code = row["barcode"]
        if row["status"] != S.ARCHIVED.value:
            raise Conflict(f"tape {code} is {row['status']}: only ARCHIVED tapes are deleted "
                           "from the archive (use `vtl tape delete` for tapes in the library)")
        until = parse_time(row.get("retention_until"))
        now = self._now()
        if until is not None and now < until:
            mode = row.get("retention_lock") or LockMode.COMPLIANCE.value
            if mode == LockMode.COMPLIANCE.value:
                raise Conflict(f"tape {code} is under a compliance retention lock until "
                               f"{_iso(until)}: it cannot be deleted before then")
            if not args.get("bypass_governance"):
                raise Conflict(f"tape {code} is under a governance retention lock until "
                               f"{_iso(until)}; add --bypass-governance to delete it anyway")
        check_transition(S.ARCHIVED, S.DELETING)
        with q.transaction(self.db):
            q.update_tape(self.db, code, status=S.DELETING.value, updated_at=_iso(now))
            q.add_event(self.db, _iso(now), "tape.delete", code, "deleting from the archive")
        jq.ensure_job(self.db, "delete", code, self._wall_iso())
        return self._archive_json(q.get_tape(self.db, code) or row)

    def _stamp_lock(self, barcode: str, row: dict[str, Any], archived: datetime) -> None:
        """The pool's retention lock starts now; a longer lock already on the tape stays."""
        lock = self.pools.lock_of(row["pool"])
        if lock is None or lock.days == 0:
            return
        until = lock.locked_until(archived)
        held = parse_time(row.get("retention_until"))
        if held is not None and held >= until:
            return
        q.update_tape(self.db, barcode, retention_until=_iso(until),
                      retention_lock=lock.mode.value)

    def list_jobs(self, args: dict[str, Any]) -> dict[str, Any]:
        rows = jq.list_jobs(self.db, unfinished_only=bool(args.get("unfinished")))
        return {"jobs": [{k: r[k] for k in ("id", "kind", "subject", "state", "attempts",
                                             "next_run_at", "error", "created_at", "updated_at")}
                         for r in rows]}


__all__ = ["CloudService", "Wait", "InvalidRequest", "NotFound"]
