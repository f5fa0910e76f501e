"""Snapshots of volumes to the object store, and volumes restored from them (lazily).

Three pieces, all over :mod:`volumes.chunks` (content-addressed chunks + manifests) and the
:class:`volumes.sbc.BlockBackend` protocol; the catalog, jobs and the CLI live in
``volumes/service.py``, which runs the long parts below in its own threads.

1. :class:`SnapshotTracker` wraps a stored volume's backend. It remembers which chunks changed
   since the last completed snapshot, and :meth:`SnapshotTracker.begin_snapshot` freezes a
   point-in-time image while writes go on: the chunks to upload are frozen, and a write to a
   frozen chunk not yet uploaded first copies the old chunk to a durable side file
   (copy-on-write). :meth:`SnapshotTracker.upload` then stores the changed chunks (unchanged ones
   reuse the previous manifest's references) and PUTs the manifest last.
2. :class:`RestoringBackend` serves a new volume from a manifest at once: a chunk not restored
   yet is fetched on first access (read, or partial write) and :meth:`RestoringBackend.fill`
   restores the rest in the background.
3. Helpers: :func:`manifest_from_refs` (a cached volume's recovery point as a snapshot),
   :func:`iter_chunks` (a manifest as a byte stream), :func:`live_refs` / :func:`delete_snapshot`
   (garbage collection that keeps shared chunks).

State on disk (``state_dir``, e.g. ``<data-dir>/volumes/<name>.snap/``), per tracker:

- ``tracker.json`` ``{version, size_bytes, chunk_bytes, boot_id, clean}`` (atomic replace).
- ``dirty.bits``: one bit per chunk, set *before* the write that changes the chunk is issued
  (a ``pwrite`` of one byte, no fsync: the page cache outlives a killed process). If the
  tracker was not closed cleanly and the machine rebooted since (``boot_id`` differs), the bits
  may be stale, so every chunk counts as changed; content addressing keeps the upload to the
  chunks whose digest really differs from the previous snapshot.
- ``base.manifest``: the last completed snapshot of this volume (or the one it was restored
  from). Its chunks are what unchanged chunks of the next snapshot point to, so they are live
  for garbage collection (:func:`state_refs`) even if that snapshot is deleted.
- ``pending/`` while a snapshot is uploading: ``snapshot.json``, ``frozen.bits`` (chunks to
  upload), ``done.log`` (CRC'd records ``index, digest`` of uploaded chunks, fdatasync'd) and
  ``cow/<index>`` (point-in-time copies, fsync'd before the overwriting write is issued).
  ``pending/`` appears by an atomic rename, so a snapshot is either begun whole or not at all.

Invariants:
- The manifest is PUT only after every chunk it names is in the store; until then the
  snapshot does not exist in the store. ``pending/`` is removed only after the manifest is
  stored and ``base.manifest`` replaced, so a restart resumes (and re-PUTs the same manifest).
- A frozen chunk's content is read from its ``cow`` copy if one exists, else from the volume,
  under the same lock writers take to make that copy: the image uploaded is the one at
  :meth:`~SnapshotTracker.begin_snapshot`, bit for bit.
- Restore bits (``restored.bits``) are persisted only after the restored data was fdatasync'd
  (at :meth:`RestoringBackend.flush` and fill checkpoints); bits only ever go 0 -> 1, so a torn
  write of the bitmap is harmless. A chunk not marked restored after a crash is fetched again,
  which can undo only writes that were never flushed (volatile write cache semantics).
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import crc32c as _crc32c

from volumes.chunks import (CHUNK_BYTES, ChunkCorrupt, ChunkRef, ChunkStore, Manifest,
                            chunk_count, chunk_ref, valid_snapshot_id)
from volumes.sbc import BlockBackend
from vtl.cloud.store import ObjectNotFound, StoreError
from vtl.library.cartridge import atomic_write, fsync_dir

Progress = Callable[[int, int], None]
"""Called with ``(chunks done, chunks in total)`` as work proceeds (from worker threads)."""

STATE_VERSION = 1
_DONE = struct.Struct(">I32sI")  # chunk index, digest (zeros: all-zero chunk), CRC32C
assert _DONE.size == 40
_NO_DIGEST = bytes(32)
_CHECKPOINT_CHUNKS = 64  # fill: persist the restored bitmap every this many chunks


class SnapshotError(StoreError):
    """A snapshot cannot be begun or continued (busy, stopped, state damaged)."""

    code = "SnapshotError"


class SnapshotBusy(SnapshotError):
    code = "SnapshotInProgress"


class UploadStopped(SnapshotError):
    """``should_stop`` asked the upload or fill to stop; its state is kept for a resume."""

    code = "Stopped"


def new_snapshot_id() -> str:
    """A fresh id shaped like AWS's: ``snap-`` + 17 hex digits."""
    return "snap-" + secrets.token_hex(9)[:17]


# --- small durable-file helpers ---------------------------------------------------------------


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""  # unknown: every unclean reopen counts as after a reboot


def _remove_tree(path: Path) -> None:
    if not path.exists():
        return
    for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        child.rmdir() if child.is_dir() and not child.is_symlink() else child.unlink()
    path.rmdir()


def _bit(bits: bytes | bytearray, i: int) -> bool:
    return bool(bits[i >> 3] & (1 << (i & 7)))


def _set_bit(bits: bytearray, i: int) -> bool:
    """Set bit ``i``; True if it was clear."""
    mask = 1 << (i & 7)
    if bits[i >> 3] & mask:
        return False
    bits[i >> 3] |= mask
    return True


def _iter_bits(bits: bytes | bytearray, count: int) -> Iterator[int]:
    for at, byte in enumerate(bits):
        if byte:
            for k in range(8):
                if byte & (1 << k) and (at << 3) + k < count:
                    yield (at << 3) + k


def _popcount(bits: bytes | bytearray) -> int:
    return int.from_bytes(bits, "little").bit_count()


def _all_bits(count: int) -> bytearray:
    bits = bytearray(b"\xff" * ((count + 7) // 8))
    if count & 7:
        bits[-1] = (1 << (count & 7)) - 1
    return bits


def _read_bits(path: Path, count: int) -> bytearray | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    want = (count + 7) // 8
    return bytearray(raw[:want].ljust(want, b"\0"))


def _chunk_span(offset: int, length: int, chunk_bytes: int) -> range:
    if length <= 0:
        return range(0)
    return range(offset // chunk_bytes, (offset + length - 1) // chunk_bytes + 1)


def _read_manifest_file(path: Path) -> Manifest | None:
    try:
        return Manifest.decode(path.read_bytes())
    except FileNotFoundError:
        return None


# --- the tracker ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PendingSnapshot:
    """A snapshot begun and not yet complete (what the service shows and resumes)."""

    snapshot_id: str
    volume: str
    created_at: str
    description: str
    chunks_total: int
    chunks_done: int


class SnapshotTracker:
    """A :class:`BlockBackend` over ``inner`` that tracks changes and freezes snapshots.

    Thread-safe: SCSI commands, :meth:`begin_snapshot` and :meth:`upload` may run in different
    threads. One snapshot at a time per volume (:class:`SnapshotBusy` otherwise).
    """

    def __init__(self, inner: BlockBackend, state_dir: Path | str, *,
                 base: Manifest | None = None) -> None:
        """Open (or create) the tracking state of the volume served by ``inner``.

        With no state on disk, every chunk counts as changed unless ``base`` is given: the
        manifest the volume's content equals right now (a volume just restored from it), which
        makes the first snapshot incremental too.
        """
        self.inner = inner
        self.state_dir = Path(state_dir)
        self.chunk_bytes = CHUNK_BYTES
        self.count = chunk_count(inner.size, self.chunk_bytes)
        self._cond = threading.Condition()
        self._freezing = False
        self._inflight = 0
        self._bits_lock = threading.Lock()
        self._cow_lock = threading.Lock()  # frozen/done/cow sets, and reads of frozen chunks
        self._upload_lock = threading.Lock()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.state_dir / "tracker.json"
        boot = _boot_id()
        meta = None
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("version") != STATE_VERSION:
                raise SnapshotError(f"{meta_path}: unsupported state version {meta.get('version')}")
            if meta.get("size_bytes") != inner.size or meta.get("chunk_bytes") != self.chunk_bytes:
                raise SnapshotError(f"{meta_path}: state is for a volume of {meta.get('size_bytes')} "
                                    f"bytes, this one has {inner.size}")
        dirty = _read_bits(self.state_dir / "dirty.bits", self.count)
        if meta is None:
            self._base = base
            if base is not None:
                if base.size_bytes != inner.size or base.chunk_bytes != self.chunk_bytes:
                    raise SnapshotError("base manifest does not match the volume's size")
                atomic_write(self.state_dir / "base.manifest", base.encode())
            self._dirty = bytearray((self.count + 7) // 8) if base is not None else _all_bits(self.count)
        else:
            self._base = _read_manifest_file(self.state_dir / "base.manifest")
            trusted = bool(meta.get("clean")) or (bool(boot) and meta.get("boot_id") == boot)
            self._dirty = dirty if (trusted and dirty is not None) else _all_bits(self.count)
        atomic_write(self.state_dir / "dirty.bits", bytes(self._dirty))
        self._dirty_fd = os.open(self.state_dir / "dirty.bits", os.O_RDWR | os.O_CLOEXEC)
        atomic_write(meta_path, json.dumps({
            "version": STATE_VERSION, "size_bytes": inner.size, "chunk_bytes": self.chunk_bytes,
            "boot_id": boot, "clean": False}).encode())
        self._pending: dict[str, object] | None = None
        self._frozen = bytearray()
        self._done: dict[int, bytes] = {}
        self._cowed: set[int] = set()
        self._done_fd: int | None = None
        self._load_pending()

    # --- BlockBackend -------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.inner.size

    def read(self, offset: int, length: int) -> bytes:
        return self.inner.read(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        length = len(memoryview(data).cast("B"))
        self._modify(offset, length, lambda: self.inner.write(offset, data))

    def discard(self, offset: int, length: int) -> None:
        self._modify(offset, length, lambda: self.inner.discard(offset, length))

    def flush(self) -> None:
        self.inner.flush()

    def extents(self, offset: int, length: int) -> Iterable[tuple[int, int, bool]]:
        return self.inner.extents(offset, length)

    def __getattr__(self, name: str) -> object:  # allocated_bytes, path... of the inner backend
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def close(self) -> None:
        """Persist the state as cleanly closed (the next open trusts the change bits) and close
        the inner backend."""
        with self._cond:
            if self._dirty_fd < 0:
                return
            os.fsync(self._dirty_fd)
            os.close(self._dirty_fd)
            self._dirty_fd = -1
            if self._done_fd is not None:
                os.close(self._done_fd)
                self._done_fd = None
            atomic_write(self.state_dir / "tracker.json", json.dumps({
                "version": STATE_VERSION, "size_bytes": self.inner.size,
                "chunk_bytes": self.chunk_bytes, "boot_id": _boot_id(), "clean": True}).encode())
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

    # --- state --------------------------------------------------------------------------------
    @property
    def base(self) -> Manifest | None:
        """The last completed snapshot (what unchanged chunks point to), if any."""
        return self._base

    @property
    def changed_chunks(self) -> int:
        """Chunks changed since the last frozen snapshot (all of them after an unclean reboot)."""
        with self._bits_lock:
            return _popcount(self._dirty)

    @property
    def pending(self) -> PendingSnapshot | None:
        """The snapshot begun and not yet completed, if any (resume it with :meth:`upload`)."""
        with self._cow_lock:
            p = self._pending
            if p is None:
                return None
            return PendingSnapshot(str(p["snapshot_id"]), str(p["volume"]), str(p["created_at"]),
                                   str(p["description"]), int(p["total"]),  # type: ignore[call-overload]
                                   len(self._done))

    def referenced(self) -> set[ChunkRef]:
        """Chunks this volume's snapshots rely on: the base manifest's and those already uploaded
        for the pending snapshot. Keep them out of garbage collection."""
        out = set(self._base.refs()) if self._base is not None else set()
        with self._cow_lock:
            out.update(d.hex() for d in self._done.values() if d != _NO_DIGEST)
        return out

    # --- write path ---------------------------------------------------------------------------
    def _modify(self, offset: int, length: int, op: Callable[[], None]) -> None:
        span = _chunk_span(offset, length, self.chunk_bytes)
        with self._cond:
            while self._freezing:
                self._cond.wait()
            self._inflight += 1
        try:
            if span and span.stop <= self.count:
                self._mark_dirty(span)
                if self._pending is not None:
                    for i in span:
                        self._protect(i)
            op()
        finally:
            with self._cond:
                self._inflight -= 1
                if not self._inflight:
                    self._cond.notify_all()

    def _mark_dirty(self, span: range) -> None:
        with self._bits_lock:
            for i in span:
                if _set_bit(self._dirty, i):
                    # before the data write is issued: survives a killed process
                    os.pwrite(self._dirty_fd, self._dirty[i >> 3:(i >> 3) + 1], i >> 3)

    def _protect(self, i: int) -> None:
        """Copy frozen chunk ``i`` aside (durably) before its first overwrite."""
        with self._cow_lock:
            if (self._pending is None or not _bit(self._frozen, i) or i in self._done
                    or i in self._cowed):
                return
            data = self._chunk_from_volume(i)
            cow = self.state_dir / "pending" / "cow"
            path = cow / str(i)
            tmp = cow / f"{i}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data if data is not None else b"")
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            fsync_dir(cow)
            self._cowed.add(i)

    def _chunk_length(self, i: int) -> int:
        return min(self.chunk_bytes, self.inner.size - i * self.chunk_bytes)

    def _chunk_from_volume(self, i: int) -> bytes | None:
        """Chunk ``i`` as on the volume now; None if it is a hole (reads as zeros)."""
        start, n = i * self.chunk_bytes, self._chunk_length(i)
        ext = list(self.inner.extents(start, n))
        if ext and not any(mapped for _, _, mapped in ext):
            return None
        return self.inner.read(start, n)

    def _frozen_chunk(self, i: int) -> bytes | None:
        """Chunk ``i`` as it was when the pending snapshot was begun."""
        with self._cow_lock:
            if i in self._cowed:
                data = (self.state_dir / "pending" / "cow" / str(i)).read_bytes()
                return data or None
            return self._chunk_from_volume(i)

    # --- snapshots ----------------------------------------------------------------------------
    def begin_snapshot(self, snapshot_id: str, *, volume: str, created_at: str,
                       description: str = "") -> PendingSnapshot:
        """Freeze the volume's image now (crash-consistent: every write completed before this
        call is in it, none issued after it; the volume is flushed first). Durable on return;
        then run :meth:`upload`. Writes wait only for the freeze itself (a few fsyncs).

        Raises :class:`SnapshotBusy` while another snapshot of this volume is pending.
        """
        if not valid_snapshot_id(snapshot_id):
            raise SnapshotError(f"invalid snapshot id {snapshot_id!r}", code="InvalidArgument")
        with self._cond:
            while self._freezing:
                self._cond.wait()
            if self._pending is not None:
                raise SnapshotBusy(f"snapshot {self._pending['snapshot_id']} of this volume is "
                                   "still uploading: wait for it or resume it")
            self._freezing = True
            while self._inflight:
                self._cond.wait()
        try:
            # The frozen image must survive a power loss as it is now: without this, writes
            # completed before the freeze but still in the page cache could be lost for chunks not
            # uploaded yet while uploaded ones hold them (a mix no crash could produce).
            self.inner.flush()
            with self._bits_lock:
                frozen = bytearray(self._dirty) if self._base is not None else _all_bits(self.count)
            total = _popcount(frozen)
            info = {"snapshot_id": snapshot_id, "volume": volume, "created_at": created_at,
                    "description": description, "total": total}
            tmp = self.state_dir / "pending.tmp"
            _remove_tree(tmp)
            (tmp / "cow").mkdir(parents=True)
            atomic_write(tmp / "frozen.bits", bytes(frozen))
            atomic_write(tmp / "snapshot.json", json.dumps(info).encode())
            atomic_write(tmp / "done.log", b"")
            os.replace(tmp, self.state_dir / "pending")
            fsync_dir(self.state_dir)
            with self._bits_lock:  # the new epoch starts with nothing changed
                self._dirty = bytearray(len(self._dirty))
                os.pwrite(self._dirty_fd, bytes(self._dirty), 0)
            self._load_pending()
        finally:
            with self._cond:
                self._freezing = False
                self._cond.notify_all()
        pending = self.pending
        assert pending is not None
        return pending

    def _load_pending(self) -> None:
        root = self.state_dir / "pending"
        _remove_tree(self.state_dir / "pending.tmp")
        if not root.exists():
            self._pending, self._frozen, self._done, self._cowed = None, bytearray(), {}, set()
            return
        info = json.loads((root / "snapshot.json").read_text())
        frozen = _read_bits(root / "frozen.bits", self.count)
        if frozen is None:
            raise SnapshotError(f"{root}: frozen.bits is missing")
        done: dict[int, bytes] = {}
        raw = (root / "done.log").read_bytes()
        good = 0
        for at in range(0, len(raw) - _DONE.size + 1, _DONE.size):
            index, digest, crc = _DONE.unpack_from(raw, at)
            if crc != _crc32c.crc32c(raw[at:at + _DONE.size - 4]) or index >= self.count:
                break  # a torn tail: those chunks are simply uploaded again
            done[index] = digest
            good = at + _DONE.size
        if good != len(raw):
            with open(root / "done.log", "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        cowed: set[int] = set()
        for p in (root / "cow").iterdir():
            if p.name.endswith(".tmp"):
                p.unlink()  # its overwrite was never issued: the volume still has the data
            elif p.name.isdigit() and int(p.name) not in done:
                cowed.add(int(p.name))
        if self._done_fd is not None:
            os.close(self._done_fd)
        self._done_fd = os.open(root / "done.log", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        with self._cow_lock:
            self._pending, self._frozen, self._done, self._cowed = info, frozen, done, cowed

    def _record_done(self, i: int, ref: ChunkRef | None) -> None:
        digest = _NO_DIGEST if ref is None else bytes.fromhex(ref)
        head = _DONE.pack(i, digest, 0)[:-4]
        record = head + struct.pack(">I", _crc32c.crc32c(head))
        with self._cow_lock:
            assert self._done_fd is not None
            os.write(self._done_fd, record)
            os.fdatasync(self._done_fd)
            self._done[i] = digest
            if i in self._cowed:
                self._cowed.discard(i)
                (self.state_dir / "pending" / "cow" / str(i)).unlink(missing_ok=True)

    def upload(self, chunks: ChunkStore, progress: Progress | None = None,
               should_stop: Callable[[], bool] | None = None, *, workers: int = 4) -> Manifest:
        """Upload the pending snapshot's changed chunks, then its manifest; return the manifest.

        Resumable: after an error (:class:`StoreError`, e.g. StoreUnavailable), a stop
        (:class:`UploadStopped`) or a crash, call it again (after reopening) and it continues
        where it was. ``progress(done, total)`` counts frozen chunks.
        Raises :class:`SnapshotError` if no snapshot is pending, :class:`SnapshotBusy` if another
        thread is uploading it.
        """
        if not self._upload_lock.acquire(blocking=False):
            raise SnapshotBusy("this snapshot is being uploaded by another job")
        try:
            return self._upload(chunks, progress, should_stop, workers)
        finally:
            self._upload_lock.release()

    def _upload(self, chunks: ChunkStore, progress: Progress | None,
                should_stop: Callable[[], bool] | None, workers: int) -> Manifest:
        with self._cow_lock:
            if self._pending is None:
                raise SnapshotError("no snapshot is pending: begin one first")
            info = dict(self._pending)
            todo = [i for i in _iter_bits(self._frozen, self.count) if i not in self._done]
            total = int(info["total"])  # type: ignore[call-overload]
        base = self._base
        base_refs: Sequence[ChunkRef | None] = base.chunks if base is not None else ()
        lock = threading.Lock()
        done_count = [total - len(todo)]

        def one(i: int) -> None:
            if should_stop is not None and should_stop():
                raise UploadStopped("snapshot upload stopped; resume it later")
            data = self._frozen_chunk(i)
            ref = None if data is None else chunk_ref(data)
            if ref is not None and not (base_refs and base_refs[i] == ref):
                assert data is not None
                chunks.put(data)
            self._record_done(i, ref)
            if progress is not None:
                with lock:
                    done_count[0] += 1
                    n = done_count[0]
                progress(n, total)

        _run_pool(one, todo, workers)
        with self._cow_lock:
            done = dict(self._done)
        refs: list[ChunkRef | None] = []
        for i in range(self.count):
            d = done.get(i)
            if d is not None:
                refs.append(None if d == _NO_DIGEST else d.hex())
            else:
                refs.append(base_refs[i] if base_refs else None)
        manifest = Manifest(str(info["snapshot_id"]), str(info["volume"]), self.inner.size,
                            str(info["created_at"]), str(info["description"]), self.chunk_bytes,
                            refs)
        chunks.put_manifest(manifest)
        self._finish(manifest)
        return manifest

    def _finish(self, manifest: Manifest) -> None:
        atomic_write(self.state_dir / "base.manifest", manifest.encode())
        with self._cow_lock:
            self._base = manifest
            if self._done_fd is not None:
                os.close(self._done_fd)
                self._done_fd = None
            root = self.state_dir / "pending"
            gone = self.state_dir / "pending.tmp"
            os.replace(root, gone)  # one atomic step: the snapshot is complete
            fsync_dir(self.state_dir)
            self._pending, self._frozen, self._done, self._cowed = None, bytearray(), {}, set()
        _remove_tree(gone)

    def abort_snapshot(self) -> str | None:
        """Give up the pending snapshot (its manifest was never stored); its changed chunks count
        as changed again. Returns its id (None if none was pending). Run :func:`live_refs` GC
        afterwards to drop chunks only it had uploaded."""
        with self._cond:
            while self._freezing:
                self._cond.wait()
            self._freezing = True
            while self._inflight:
                self._cond.wait()
        try:
            with self._cow_lock:
                if self._pending is None:
                    return None
                sid = str(self._pending["snapshot_id"])
                frozen = self._frozen
            with self._bits_lock:
                for k, b in enumerate(frozen):
                    self._dirty[k] |= b
                os.pwrite(self._dirty_fd, bytes(self._dirty), 0)
                os.fsync(self._dirty_fd)
            with self._cow_lock:
                if self._done_fd is not None:
                    os.close(self._done_fd)
                    self._done_fd = None
                os.replace(self.state_dir / "pending", self.state_dir / "pending.tmp")
                fsync_dir(self.state_dir)
                self._pending, self._frozen, self._done, self._cowed = None, bytearray(), {}, set()
            _remove_tree(self.state_dir / "pending.tmp")
            return sid
        finally:
            with self._cond:
                self._freezing = False
                self._cond.notify_all()


def _run_pool(fn: Callable[[int], None], items: Iterable[int], workers: int) -> None:
    """Run ``fn`` over ``items`` with at most ``workers`` at a time; the first error stops the
    rest and is raised."""
    if workers <= 1:
        for i in items:
            fn(i)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vol-chunks") as pool:
        running: set[Future[None]] = set()
        try:
            for i in items:
                if len(running) >= workers * 2:
                    finished, running = wait(running, return_when=FIRST_COMPLETED)
                    for f in finished:
                        f.result()
                running.add(pool.submit(fn, i))
            for f in list(running):
                f.result()
        except BaseException:
            for f in running:
                f.cancel()
            raise


# --- state of snapshots for GC ----------------------------------------------------------------


def state_refs(state_dir: Path | str) -> set[ChunkRef]:
    """Chunks a tracker or restore state directory relies on (base manifest, uploaded chunks of
    a pending snapshot, manifest being restored), read from disk: for GC while it is closed."""
    root = Path(state_dir)
    out: set[ChunkRef] = set()
    for name in ("base.manifest", "restore.manifest"):
        m = _read_manifest_file(root / name)
        if m is not None:
            out |= m.refs()
    try:
        raw = (root / "pending" / "done.log").read_bytes()
    except FileNotFoundError:
        raw = b""
    for at in range(0, len(raw) - _DONE.size + 1, _DONE.size):
        _, digest, crc = _DONE.unpack_from(raw, at)
        if crc != _crc32c.crc32c(raw[at:at + _DONE.size - 4]):
            break
        if digest != _NO_DIGEST:
            out.add(digest.hex())
    return out


def live_refs(chunks: ChunkStore, *, extra: Iterable[Iterable[ChunkRef | None]] = ()) -> set[ChunkRef]:
    """Every chunk still needed: those of every manifest in the store plus ``extra`` (cached
    volumes' chunk maps, :meth:`SnapshotTracker.referenced`, :func:`state_refs`...)."""
    out: set[ChunkRef] = set()
    for sid in chunks.list_manifests():
        try:
            out |= chunks.get_manifest(sid).refs()
        except ObjectNotFound:
            continue  # deleted meanwhile
    for refs in extra:
        out.update(r for r in refs if r is not None)
    return out


def delete_snapshot(chunks: ChunkStore, snapshot_id: str, *,
                    extra: Iterable[Iterable[ChunkRef | None]] = ()) -> int:
    """Delete a snapshot's manifest, then every chunk no other manifest nor ``extra`` names.

    Returns how many chunks were deleted. The caller must not run a snapshot upload or cached
    volume upload concurrently unless their chunks are in ``extra``.
    """
    chunks.delete_manifest(snapshot_id)
    return chunks.collect(live_refs(chunks, extra=extra))


# --- cached volumes, clone ---------------------------------------------------------------------


def manifest_from_refs(chunks: ChunkStore, refs: Sequence[ChunkRef | None], *, snapshot_id: str,
                       volume: str, size_bytes: int, created_at: str, description: str = "",
                       verify: bool = False) -> Manifest:
    """Store a manifest for chunks already in the store (a cached volume's
    ``recovery_point()``); with ``verify``, HEAD every distinct chunk first
    (:class:`ObjectNotFound` if one is missing). Returns the manifest written."""
    m = Manifest(snapshot_id, volume, size_bytes, created_at, description, CHUNK_BYTES, list(refs))
    if verify:
        for ref in m.refs():
            if not chunks.has(ref):
                raise ObjectNotFound(f"chunk {ref} of snapshot {snapshot_id} is not in the store",
                                     key=chunks.chunk_key(ref))
    chunks.put_manifest(m)
    return m


def iter_chunks(chunks: ChunkStore, manifest: Manifest) -> Iterator[tuple[int, bytes]]:
    """``(offset, bytes)`` of every chunk of the snapshot in order (zero chunks as zeros, the
    last one trimmed to the volume size): the volume's image as a stream, for a clone."""
    for i, ref in enumerate(manifest.chunks):
        yield i * manifest.chunk_bytes, chunks.get(ref, manifest.chunk_length(i))


# --- restore -----------------------------------------------------------------------------------


class RestoringBackend:
    """A :class:`BlockBackend` for a new volume made from a snapshot, readable at once.

    ``inner`` is the new volume's own (empty) backend of the manifest's size; chunks are fetched
    from ``chunks`` on first access and by :meth:`fill`. State in ``state_dir``:
    ``restore.manifest`` and ``restored.bits``. Once :attr:`complete`, the service may call
    :meth:`finish` and serve ``inner`` alone.
    """

    def __init__(self, inner: BlockBackend, state_dir: Path | str, chunks: ChunkStore,
                 manifest: Manifest | None = None) -> None:
        """Start restoring ``manifest`` into ``inner`` (the state must not exist), or, without a
        manifest, resume from ``state_dir`` after a restart."""
        self.inner = inner
        self.chunks = chunks
        self.state_dir = Path(state_dir)
        mpath = self.state_dir / "restore.manifest"
        bpath = self.state_dir / "restored.bits"
        if manifest is not None:
            if manifest.size_bytes != inner.size:
                raise SnapshotError(f"snapshot {manifest.snapshot_id} is {manifest.size_bytes} "
                                    f"bytes, the volume {inner.size}")
            self.state_dir.mkdir(parents=True, exist_ok=True)
            bits = bytearray((len(manifest.chunks) + 7) // 8)
            for i, ref in enumerate(manifest.chunks):
                if ref is None:
                    _set_bit(bits, i)  # a new sparse volume already reads zeros there
            atomic_write(bpath, bytes(bits))
            atomic_write(mpath, manifest.encode())
        else:
            manifest = _read_manifest_file(mpath)
            if manifest is None:
                raise SnapshotError(f"{self.state_dir}: no restore in progress")
            if manifest.size_bytes != inner.size:
                raise SnapshotError(f"{mpath}: for a volume of {manifest.size_bytes} bytes")
        self.manifest = manifest
        self.chunk_bytes = manifest.chunk_bytes
        self.count = len(manifest.chunks)
        bits_read = _read_bits(bpath, self.count)
        if bits_read is None:
            raise SnapshotError(f"{bpath} is missing")
        self._bits = bits_read
        self._persisted = bytearray(self._bits)
        self._restored = _popcount(self._bits)
        self._bits_lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(64)]
        self._ckpt_lock = threading.Lock()
        self._bits_fd = os.open(bpath, os.O_RDWR | os.O_CLOEXEC)

    # --- progress ---------------------------------------------------------------------------
    @property
    def restored_chunks(self) -> int:
        return self._restored

    @property
    def total_chunks(self) -> int:
        return self.count

    @property
    def complete(self) -> bool:
        return self._restored >= self.count

    # --- chunk fill ---------------------------------------------------------------------------
    def _ensure(self, i: int, *, io_error: bool = True) -> None:
        """Make chunk ``i`` local (fetch it unless it is already). Store failures become
        ``OSError(EIO)`` for the SCSI path (``io_error``), else they propagate as they are."""
        if _bit(self._bits, i):
            return
        with self._stripes[i % len(self._stripes)]:
            if _bit(self._bits, i):
                return
            n = self.manifest.chunk_length(i)
            try:
                data = self.chunks.get(self.manifest.chunks[i], n)
            except (StoreError, OSError) as exc:
                if not io_error:
                    raise
                raise OSError(errno.EIO, f"cannot restore chunk {i} of snapshot "
                                         f"{self.manifest.snapshot_id}: {exc}") from exc
            self.inner.write(i * self.chunk_bytes, data)
            with self._bits_lock:
                if _set_bit(self._bits, i):
                    self._restored += 1

    def _checkpoint(self) -> None:
        """fdatasync the volume, then persist the bits set meanwhile (only ever 0 -> 1)."""
        with self._ckpt_lock:
            with self._bits_lock:
                now = bytes(self._bits)  # taken before the flush: only bits whose data it covers
            self.inner.flush()
            if now == self._persisted:
                return
            changed = [k for k in range(len(now)) if now[k] != self._persisted[k]]
            lo, hi = changed[0], changed[-1] + 1
            os.pwrite(self._bits_fd, now[lo:hi], lo)
            os.fdatasync(self._bits_fd)
            self._persisted[lo:hi] = now[lo:hi]

    def fill(self, *, progress: Progress | None = None,
             should_stop: Callable[[], bool] | None = None, workers: int = 4) -> bool:
        """Restore every chunk not yet local; durable on return. Returns True when complete;
        raises :class:`UploadStopped` if ``should_stop`` said so (resumable), StoreError/OSError
        on failures (what was restored stays restored)."""
        todo = [i for i in range(self.count) if not _bit(self._bits, i)]
        since = [0]
        lock = threading.Lock()

        def one(i: int) -> None:
            if should_stop is not None and should_stop():
                raise UploadStopped("restore stopped; resume it later")
            self._ensure(i, io_error=False)
            with lock:
                since[0] += 1
                due = since[0] >= _CHECKPOINT_CHUNKS
                if due:
                    since[0] = 0
            if due:
                self._checkpoint()
            if progress is not None:
                progress(self._restored, self.count)

        try:
            _run_pool(one, todo, workers)
        finally:
            self._checkpoint()
        return self.complete

    def finish(self) -> None:
        """After :attr:`complete`: drop the restore state (the volume is ordinary now)."""
        if not self.complete:
            raise SnapshotError("restore is not complete")
        self._checkpoint()
        for name in ("restored.bits", "restore.manifest"):
            (self.state_dir / name).unlink(missing_ok=True)
        fsync_dir(self.state_dir)

    # --- BlockBackend -------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.inner.size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.inner.size:
            raise ValueError(f"range {offset}+{length} outside 0..{self.inner.size}")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        for i in _chunk_span(offset, length, self.chunk_bytes):
            self._ensure(i)
        return self.inner.read(offset, length)

    def _modify(self, offset: int, length: int, op: Callable[[], None]) -> None:
        """Run a write or discard: chunks it covers in part are restored first; chunks it covers
        whole and not restored yet are written under their stripe locks (so a concurrent fetch
        cannot land after the write) and marked restored without a fetch."""
        self._check(offset, length)
        whole: list[int] = []
        for i in _chunk_span(offset, length, self.chunk_bytes):
            start = i * self.chunk_bytes
            if offset <= start and start + self.manifest.chunk_length(i) <= offset + length:
                if not _bit(self._bits, i):
                    whole.append(i)
            else:
                self._ensure(i)
        stripes = sorted({i % len(self._stripes) for i in whole})
        for k in stripes:  # in order: no deadlock against another multi-chunk write
            self._stripes[k].acquire()
        try:
            op()
            with self._bits_lock:
                for i in whole:
                    if _set_bit(self._bits, i):
                        self._restored += 1
        finally:
            for k in reversed(stripes):
                self._stripes[k].release()

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._modify(offset, len(memoryview(data).cast("B")), lambda: self.inner.write(offset, data))

    def discard(self, offset: int, length: int) -> None:
        self._modify(offset, length, lambda: self.inner.discard(offset, length))

    def flush(self) -> None:
        self._checkpoint()

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        self._check(offset, length)
        out: list[tuple[int, int, bool]] = []
        pos, end = offset, offset + length
        while pos < end:
            i = pos // self.chunk_bytes
            n = min(end, (i + 1) * self.chunk_bytes) - pos
            runs = self.inner.extents(pos, n) if _bit(self._bits, i) else [(pos, n, True)]
            for start, size, mapped in runs:
                if out and out[-1][2] == mapped and out[-1][0] + out[-1][1] == start:
                    out[-1] = (out[-1][0], out[-1][1] + size, mapped)
                else:
                    out.append((start, size, mapped))
            pos += n
        return out

    def __getattr__(self, name: str) -> object:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def close(self) -> None:
        if self._bits_fd < 0:
            return
        try:
            self._checkpoint()
        finally:
            os.close(self._bits_fd)
            self._bits_fd = -1
            close = getattr(self.inner, "close", None)
            if close is not None:
                close()


def restoring(state_dir: Path | str) -> bool:
    """True if ``state_dir`` holds an unfinished restore (reopen it with RestoringBackend)."""
    return (Path(state_dir) / "restore.manifest").exists()


__all__ = [
    "ChunkCorrupt", "PendingSnapshot", "Progress", "RestoringBackend", "SnapshotBusy",
    "SnapshotError", "SnapshotTracker", "UploadStopped", "delete_snapshot", "iter_chunks",
    "live_refs", "manifest_from_refs", "new_snapshot_id", "restoring", "state_refs",
]
