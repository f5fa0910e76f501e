"""ObjectFS: a share's file tree as objects in the store, with a local cache (implements fs.py).

Mapping (as AWS S3 File Gateway does it):

- The file ``a/b/c.txt`` of a share with prefix ``P`` is the object ``P + "a/b/c.txt"``. A
  directory is the prefix ``P + "a/b/"``; the gateway puts an empty marker object under exactly
  that key when it creates a directory (and when a directory would otherwise vanish from the
  bucket because its last file went), so empty directories survive in the bucket.
- Owner, group, mode and times ride in user metadata: ``file-owner`` and ``file-group``
  (decimal ids), ``file-permissions`` (octal ``st_mode`` with the file type, e.g. ``0100644``),
  ``file-mtime`` and ``file-ctime`` (nanoseconds, suffixed ``ns``). Objects without them (put
  by other tools) get the share's defaults and their Last-Modified time.
- Uploads carry the share's storage class; SSE-S3 comes from the store backend.

Invariants:

- A per-share SQLite table (``files``) maps fileid <-> path with a random generation; the
  fileid is an AUTOINCREMENT key, never reused while the table exists. File handles are
  ``version(1) | share id(4) | fileid(8) | generation(4) | MAC(12)`` where the MAC is
  HMAC-SHA256 under a per-gateway secret: forged or foreign bytes are ``BADHANDLE``; a handle
  whose row is gone (removed, or deleted in the bucket and refreshed) is ``STALE``. Handles
  survive restarts because the table and the secret do; a rename keeps the fileid.
- Writes go to the local cache (``fileshare/cache.py``) only. A dirty file uploads once it
  has been *due* (COMMIT, a FILE_SYNC write, CREATE, SETATTR, RENAME) and then quiet for
  ``settle`` seconds; an UNSTABLE write makes it not due until the next COMMIT, so no
  half-written file reaches the bucket. The upload holds the file's lock (writes to that file
  wait for it) and, once done, re-checks the row: if the file was renamed or removed
  meanwhile, the uploaded key is deleted and the file stays dirty.
- A dirty file is complete in the cache: the first write to a file that is only in the store
  fetches it whole first. Reads of files not in the cache fetch the chunks they need with
  ranged GETs and keep them (LRU, size-limited; dirty files are never evicted).
- The namespace in the table is a cache of the bucket: a directory is listed from the store
  the first time it is used, on ``refresh`` and, with ``stale_after`` set, when its listing
  is older than that. The merge keeps local unsynced entries (dirty or never uploaded) and
  drops clean rows whose object disappeared (their handles become ``STALE``).
- Locks: the namespace lock (an RLock over the table) is never held while waiting for a
  file's lock; file locks are taken first. Store calls of data transfers run outside the
  namespace lock; directory listings during refresh run under it.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import sqlite3
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fileshare.cache import FileCache, fsync_path
from fileshare.fs import (
    Attr, CreateMode, Cred, DirEntry, FileType, FsErrno, FsError, FsStat, SetAttr,
)
from vtl.cloud.store import (
    CommonPrefix, ObjectInfo, ObjectNotFound, ObjectStore, StorageClass, StoreError,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

HEAD_WORKERS = 16  # parallel HEAD requests when a listing brings many new objects

from fileshare.objectmap import (  # noqa: F401  (re-exported: the module's public names)
    _SCHEMA, _SELECT, AGENT, FETCH_RUN, HANDLE_BYTES, MAX_FILE_BYTES, NAME_MAX, PATH_MAX,
    ROOT_ID, HandleCodec, R, Row, ShareDefaults, W, X, _map_store, allowed_access,
    decode_metadata, encode_metadata, handle_share_id, join, permitted, setattr_fields,
    validate_name,
)


# ------------------------------------------------------------------------------------ ObjectFS


@dataclass(frozen=True, slots=True)
class ShareConfig:
    """The parts of a share's settings the file system uses; replaced live by the service."""

    read_only: bool = False
    defaults: ShareDefaults = ShareDefaults()
    storage_class: StorageClass = StorageClass.STANDARD
    settle: float = 2.0  # seconds a due file must stay quiet before it uploads
    stale_after: float | None = None  # seconds before a directory listing is re-read


class ObjectFS:
    """One share: the :class:`fileshare.fs.FileSystem` over an object store prefix."""

    def __init__(self, name: str, share_id: int, store: ObjectStore, prefix: str,
                 db_path: Path, cache: FileCache, codec: HandleCodec, *,
                 config: ShareConfig | None = None, clock: Callable[[], float] = time.time,
                 uploader: bool = True, poll: float = 0.2, durable: bool = True) -> None:
        self.name = name
        self.share_id = share_id
        self.fsid = share_id
        self.store = store
        self.prefix = prefix
        self.cache = cache
        self.codec = codec
        self.config = config or ShareConfig()
        self.clock = clock
        self.poll = poll
        self.write_verifier = secrets.token_bytes(8)
        self.cookieverf = struct.pack(">4sI", b"VTLd", share_id)
        self._cache_dir = f"{name}-{share_id:08x}"
        self._ns = threading.RLock()
        self._flocks: dict[int, threading.Lock] = {}
        self._flocks_guard = threading.Lock()
        self._due: dict[int, float] = {}  # fileid -> time of last activity (due for upload)
        self._quiet: dict[int, float] = {}  # fileid -> time of last write (not due)
        self._retry_at: dict[int, float] = {}
        self._read_end: dict[int, int] = {}  # fileid -> where the last read ended (read-ahead)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.uploads = 0
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(db_path), isolation_level=None, check_same_thread=False,
                                   timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'NORMAL' if durable else 'OFF'}")
        self._db.executescript(_SCHEMA)
        self._wal = Path(f"{db_path}-wal")
        self.durable = durable
        self._init_root()
        self._max_component = self._component_limit()
        # Dirty files from a previous run: adopt their cache copies and upload them again.
        # Their size is the cache file's (unstable writes update the table without a sync).
        now = self.clock()
        for r in self._rows("WHERE type = ? AND dirty = 1", (int(FileType.REG),)):
            path = self.cache.path(self._ckey(r.fileid))
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                self.cache.create(self._ckey(r.fileid))
                size = 0
            if size != r.size:
                self._update(r.fileid, size=size)
        known = [(r.fileid, r.size, bool(r.cached), bool(r.dirty))
                 for r in self._rows("WHERE type = ? AND (cached = 1 OR dirty = 1)",
                                     (int(FileType.REG),))]
        self.cache.adopt(self._cache_dir, known)
        for r in self._rows("WHERE dirty = 1"):
            self._due[r.fileid] = now
        self._thread: threading.Thread | None = None
        if uploader:
            self._thread = threading.Thread(target=self._upload_loop, daemon=True,
                                            name=f"vtl-share-{name}")
            self._thread.start()

    # --- properties the protocols read ----------------------------------------------------------
    @property
    def read_only(self) -> bool:
        return self.config.read_only

    def close(self) -> None:
        """Stop the uploader (dirty files stay dirty and upload at the next start)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
            if self._thread.is_alive():  # an upload in flight: the next start redoes it
                log.warning("share %s: an upload is still running at close", self.name)
                return
        with self._ns:
            self._db.close()

    # --- table helpers ---------------------------------------------------------------------------
    def _component_limit(self) -> int:
        try:
            from vtl.cloud.local import MAX_COMPONENT_BYTES, LocalStore
        except ImportError:  # pragma: no cover
            return NAME_MAX
        return MAX_COMPONENT_BYTES if isinstance(self.store, LocalStore) else NAME_MAX

    def _init_root(self) -> None:
        if self._get(ROOT_ID) is None:
            now = self._now_ns()
            d = self.config.defaults
            self._db.execute(
                "INSERT INTO files(fileid, gen, parent, name, path, type, mode, uid, gid, "
                "mtime_ns, ctime_ns, atime_ns, remote) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,1)",
                (ROOT_ID, secrets.randbits(32), ROOT_ID, "", "", int(FileType.DIR), d.dir_mode,
                 d.uid, d.gid, now, now, now))

    def _rows(self, where: str = "", args: Sequence[Any] = ()) -> list[Row]:
        with self._ns:
            return [Row(*r) for r in self._db.execute(f"{_SELECT} {where}", tuple(args))]

    def _get(self, fileid: int) -> Row | None:
        rows = self._rows("WHERE fileid = ?", (fileid,))
        return rows[0] if rows else None

    def _child(self, parent: int, name: str) -> Row | None:
        rows = self._rows("WHERE parent = ? AND name = ?", (parent, name))
        return rows[0] if rows else None

    def _by_path(self, path: str) -> Row | None:
        rows = self._rows("WHERE path = ?", (path,))
        return rows[0] if rows else None

    def _update(self, fileid: int, **fields: Any) -> None:
        if not fields:
            return
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._ns:
            self._db.execute(f"UPDATE files SET {sets} WHERE fileid = ?", (*fields.values(), fileid))

    def _touch(self, row: Row, **fields: Any) -> None:
        """Update fields and bump change and ctime."""
        now = self._now_ns()
        fields.setdefault("ctime_ns", now)
        self._update(row.fileid, change=row.change + 1, **fields)

    def _insert(self, parent: Row, name: str, ftype: FileType, **fields: Any) -> Row:
        now = self._now_ns()
        values = {"gen": secrets.randbits(32), "parent": parent.fileid, "name": name,
                  "path": join(parent.path, name), "type": int(ftype), "mtime_ns": now,
                  "ctime_ns": now, "atime_ns": now}
        values.update(fields)
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        with self._ns:
            cur = self._db.execute(f"INSERT INTO files({cols}) VALUES ({marks})",
                                   tuple(values.values()))
            row = self._get(int(cur.lastrowid or 0))
        assert row is not None
        return row

    def _delete_rows(self, row: Row) -> None:
        """Delete a row and, for a directory, every row under it (cache copies too)."""
        with self._ns:
            gone = [row]
            if row.is_dir:
                gone += self._descendants(row)
            for r in gone:
                self._db.execute("DELETE FROM files WHERE fileid = ?", (r.fileid,))
                self._due.pop(r.fileid, None)
                self._quiet.pop(r.fileid, None)
                if r.type == FileType.REG:
                    self.cache.drop(self._ckey(r.fileid))

    def _descendants(self, row: Row) -> list[Row]:
        if row.fileid == ROOT_ID:
            return self._rows("WHERE fileid != ?", (ROOT_ID,))
        base = row.path + "/"
        return self._rows("WHERE substr(path, 1, ?) = ?", (len(base), base))

    # --- small helpers ---------------------------------------------------------------------------
    def _now_ns(self) -> int:
        return int(self.clock() * 1e9)

    def _ckey(self, fileid: int) -> tuple[str, int]:
        return (self._cache_dir, fileid)

    def _key(self, path: str) -> str:
        return self.prefix + path

    def _dir_key(self, path: str) -> str:
        return self.prefix + path + "/" if path else self.prefix

    def _flock(self, fileid: int) -> threading.Lock:
        with self._flocks_guard:
            lock = self._flocks.get(fileid)
            if lock is None:
                lock = self._flocks[fileid] = threading.Lock()
            return lock

    def handle(self, row: Row) -> bytes:
        return self.codec.encode(self.share_id, row.fileid, row.gen)

    def attr(self, row: Row) -> Attr:
        is_dir = row.is_dir
        return Attr(type=FileType(row.type), mode=row.mode & 0o7777, nlink=2 if is_dir else 1,
                    uid=row.uid, gid=row.gid, size=4096 if is_dir else row.size,
                    used=4096 if is_dir else row.size, fsid=self.fsid, fileid=row.fileid,
                    atime_ns=row.atime_ns, mtime_ns=row.mtime_ns, ctime_ns=row.ctime_ns,
                    change=row.change)

    def _resolve(self, fh: bytes) -> Row:
        share_id, fileid, gen = self.codec.decode(fh)
        if share_id != self.share_id:
            raise FsError(FsErrno.BADHANDLE, "handle of another share")
        row = self._get(fileid)
        if row is None or row.gen != gen:
            raise FsError(FsErrno.STALE, "the file was removed")
        return row

    def _dir(self, fh: bytes) -> Row:
        row = self._resolve(fh)
        if not row.is_dir:
            raise FsError(FsErrno.NOTDIR, f"{row.path!r} is not a directory")
        return row

    def _writable(self) -> None:
        if self.config.read_only:
            raise FsError(FsErrno.ROFS, f"share {self.name} is read-only")

    def _check(self, cred: Cred, row: Row, want: int, *, owner_override: bool = False) -> None:
        if owner_override and cred.uid == row.uid:
            return  # knfsd lets the owner read/write a file it opened (open-time checks)
        if not permitted(cred, row, want):
            raise FsError(FsErrno.ACCES, "permission denied")

    def _check_path(self, path: str, *, is_dir: bool = False) -> None:
        key = self._dir_key(path) if is_dir else self._key(path)
        if len(path.encode("utf-8")) > PATH_MAX or len(key.encode("utf-8")) > PATH_MAX:
            raise FsError(FsErrno.NAMETOOLONG, f"path is over {PATH_MAX} bytes")

    def _check_name(self, name: str) -> None:
        validate_name(name)
        if len(name.encode("utf-8")) > self._max_component:
            raise FsError(FsErrno.NAMETOOLONG,
                          f"name is over {self._max_component} bytes (local store limit)")

    def _sticky(self, cred: Cred, parent: Row, child: Row) -> None:
        if parent.mode & stat.S_ISVTX and cred.uid not in (0, parent.uid, child.uid):
            raise FsError(FsErrno.ACCES, "sticky directory: not the owner")

    def _sync_db(self) -> None:
        """Make the table's last transactions durable (fsync of the WAL) before a reply that
        acknowledges a namespace change, a COMMIT or a FILE_SYNC write (RFC 1813 3.3)."""
        if self.durable:
            fsync_path(self._wal)

    def _mark_due(self, fileid: int) -> None:
        self._due[fileid] = self.clock()
        self._quiet.pop(fileid, None)
        self._wake.set()

    def _dirty_dir(self, row: Row) -> None:
        """Make sure the directory's marker (with its metadata) reaches the bucket."""
        if row.fileid == ROOT_ID:
            return  # the share's root is the prefix itself: no marker
        self._update(row.fileid, dirty=1)
        self._mark_due(row.fileid)

    # --- namespace: listing the store -----------------------------------------------------------
    def _ensure_listed(self, row: Row, *, force: bool = False) -> Row:
        stale = self.config.stale_after
        if not force and row.listed_at is not None and (
                stale is None or self.clock() - row.listed_at < stale):
            return row
        self._refresh_dir(row)
        fresh = self._get(row.fileid)
        return fresh if fresh is not None else row

    def _refresh_dir(self, d: Row) -> dict[str, int]:
        """Merge the store's listing of ``d`` into the table (see the module docstring)."""
        counts = {"added": 0, "removed": 0, "updated": 0}
        started = self.clock()
        kp = self._dir_key(d.path)
        files: dict[str, ObjectInfo] = {}
        dirs: set[str] = set()
        marker = False
        with _map_store(f"listing {kp or '/'}"):
            for entry in self.store.list_objects(kp, delimiter="/"):
                if isinstance(entry, CommonPrefix):
                    name = entry.prefix[len(kp):-1]
                    if name and "/" not in name:
                        dirs.add(name)
                elif entry.key == kp:
                    marker = True
                else:
                    name = entry.key[len(kp):]
                    if name and "/" not in name:
                        files[name] = entry
        with self._ns:
            children = {r.name: r for r in self._rows("WHERE parent = ? AND fileid != ?",
                                                      (d.fileid, ROOT_ID))}
            wanted = [self._dir_key(join(d.path, n)) for n in dirs if n not in children]
            wanted += [self._key(join(d.path, n)) for n, info in files.items()
                       if n not in dirs and (n not in children or children[n].etag != info.etag)]
            metas = self._head_many(wanted)
            for name in sorted(dirs):
                row = children.get(name)
                if row is not None:
                    if not row.is_dir and not row.dirty and row.remote:
                        self._delete_rows(row)  # a directory now stands where a file was
                        row = None
                    else:
                        continue
                if not self._valid_remote_name(name, d.path, True):
                    continue
                meta = self._meta_of(metas, self._dir_key(join(d.path, name)), FileType.DIR)
                self._insert(d, name, FileType.DIR, remote=1, marker=int(meta is not None),
                             **(meta or self._default_meta(FileType.DIR)))
                counts["added"] += 1
            for name, info in sorted(files.items()):
                if name in dirs:
                    continue  # a directory and a file of the same name: the directory wins
                row = children.get(name)
                if row is None:
                    if not self._valid_remote_name(name, d.path, False):
                        continue
                    meta = self._meta_of(metas, self._key(join(d.path, name)), FileType.REG)
                    if meta is None:
                        continue  # deleted since the listing
                    self._insert(d, name, FileType.REG, remote=1, size=info.size,
                                 etag=info.etag, **meta)
                    counts["added"] += 1
                elif row.type == FileType.REG and not row.dirty and row.etag != info.etag \
                        and (row.synced_at or 0) < started:
                    meta = self._meta_of(metas, self._key(row.path), FileType.REG) or {}
                    self.cache.drop(self._ckey(row.fileid))
                    self._touch(row, size=info.size, etag=info.etag, remote=1, cached=0,
                                synced_at=None, **meta)
                    counts["updated"] += 1
            for name, row in children.items():
                if name in files or name in dirs:
                    continue
                if (row.synced_at or 0) >= started or row.dirty or not row.remote:
                    continue  # local, unsynced, or uploaded while we listed
                if row.is_dir and any(r.dirty or not r.remote for r in self._descendants(row)):
                    continue
                self._delete_rows(row)
                counts["removed"] += 1
            self._update(d.fileid, listed_at=self.clock(), marker=int(marker or d.marker))
        return counts

    def _valid_remote_name(self, name: str, parent_path: str, is_dir: bool) -> bool:
        try:
            self._check_name(name)
            self._check_path(join(parent_path, name), is_dir=is_dir)
        except FsError:
            log.info("share %s: object name %r cannot be a file name; skipped", self.name, name)
            return False
        return True

    def _default_meta(self, ftype: FileType) -> dict[str, int]:
        d = self.config.defaults
        now = self._now_ns()
        mode = d.dir_mode if ftype is FileType.DIR else d.file_mode
        return {"mode": mode, "uid": d.uid, "gid": d.gid, "mtime_ns": now, "ctime_ns": now}

    def _head_many(self, keys: list[str]) -> dict[str, ObjectInfo | None]:
        """HEAD every key (in parallel: a listing of many new objects would otherwise take one
        round trip each); None for keys gone since the listing."""
        def head(key: str) -> ObjectInfo | None:
            try:
                return self.store.head_object(key)
            except ObjectNotFound:
                return None

        with _map_store("reading object metadata"):
            if len(keys) < 2:
                return {k: head(k) for k in keys}
            with ThreadPoolExecutor(max_workers=min(HEAD_WORKERS, len(keys)),
                                    thread_name_prefix="vtl-head") as pool:
                return dict(zip(keys, pool.map(head, keys)))

    def _meta_of(self, metas: dict[str, ObjectInfo | None], key: str,
                 ftype: FileType) -> dict[str, int] | None:
        info = metas[key] if key in metas else self._head_many([key])[key]
        return decode_metadata(info, self.config.defaults, ftype) if info is not None else None

    def refresh(self, path: str = "", recursive: bool = False) -> dict[str, int]:
        """Re-read the listing of ``path`` (a directory of the share) from the store.

        Objects other tools added appear; clean files whose objects were deleted disappear.
        ``recursive`` refreshes every directory below as well.
        """
        total = {"added": 0, "removed": 0, "updated": 0, "directories": 0}
        with self._ns:
            row = self._walk(path.strip("/"))
            if not row.is_dir:
                raise FsError(FsErrno.NOTDIR, f"{path!r} is not a directory")
            todo = [row]
            while todo:
                d = todo.pop()
                counts = self._refresh_dir(d)
                for k, v in counts.items():
                    total[k] += v
                total["directories"] += 1
                if recursive:
                    todo += [r for r in self._rows("WHERE parent = ? AND type = ? AND fileid != ?",
                                                   (d.fileid, int(FileType.DIR), ROOT_ID))]
        return total

    def _walk(self, path: str) -> Row:
        row = self._get(ROOT_ID)
        assert row is not None
        for part in [p for p in path.split("/") if p]:
            if not row.is_dir:
                raise FsError(FsErrno.NOTDIR, f"{row.path!r} is not a directory")
            row = self._ensure_listed(row)
            child = self._child(row.fileid, part)
            if child is None:
                raise FsError(FsErrno.NOENT, f"no {join(row.path, part)!r} in share {self.name}")
            row = child
        return row

    def lookup_path(self, path: str) -> tuple[bytes, Attr]:
        """Handle and attributes of a path inside the share (no permission check)."""
        with self._ns:
            row = self._walk(path.strip("/"))
            return self.handle(row), self.attr(row)

    # --- FileSystem: attributes and lookups ------------------------------------------------------
    def root_handle(self) -> bytes:
        row = self._get(ROOT_ID)
        assert row is not None
        return self.handle(row)

    def getattr(self, fh: bytes) -> Attr:
        return self.attr(self._resolve(fh))

    def lookup(self, cred: Cred, dir_fh: bytes, name: str) -> tuple[bytes, Attr]:
        with self._ns:
            d = self._dir(dir_fh)
            self._check(cred, d, X)
            if name == "..":
                parent = self._get(d.parent) or d
                return self.handle(parent), self.attr(parent)
            if name == ".":
                return self.handle(d), self.attr(d)
            self._check_name(name)
            d = self._ensure_listed(d)
            child = self._child(d.fileid, name)
            if child is None or child.fileid == ROOT_ID:
                raise FsError(FsErrno.NOENT, f"no {name!r} in {d.path or '/'}")
            return self.handle(child), self.attr(child)

    def access(self, cred: Cred, fh: bytes, requested: int) -> int:
        return allowed_access(cred, self._resolve(fh), requested, self.config.read_only)

    def fsstat(self) -> FsStat:
        with self._ns:
            files = self._db.execute("SELECT count(*) FROM files").fetchone()[0]
        big = 8 * 1024 ** 6 - 1  # S3 is bottomless; AWS reports 8 EiB
        return FsStat(total_bytes=big, free_bytes=big, avail_bytes=big,
                      total_files=2 ** 63 - 1, free_files=2 ** 63 - 1 - files,
                      avail_files=2 ** 63 - 1 - files)

    # --- FileSystem: data ------------------------------------------------------------------------
    def read(self, cred: Cred, fh: bytes, offset: int, count: int) -> tuple[bytes, bool]:
        row = self._resolve(fh)
        if row.is_dir:
            raise FsError(FsErrno.ISDIR, "read of a directory")
        self._check(cred, row, R, owner_override=True)
        if offset < 0 or count < 0:
            raise FsError(FsErrno.INVAL, "negative offset or count")
        if offset >= row.size or count == 0:
            return b"", offset >= row.size
        count = min(count, row.size - offset)
        key = self._ckey(row.fileid)
        if self.cache.missing(key, row.size, offset, count):
            # a sequential reader gets FETCH_RUN chunks per GET (read-ahead); others what they ask
            ahead = self._read_end.get(row.fileid) == offset
            want = max(count, self.cache.chunk * FETCH_RUN) if ahead else count
            with self._flock(row.fileid):
                row = self._resolve(fh)
                self._fetch(row, offset, want)
        self._read_end[row.fileid] = offset + count
        if len(self._read_end) > 4096:
            self._read_end.clear()
        data = self.cache.read(key, offset, count)
        if len(data) < count and not self.cache.is_dirty(key):
            # evicted between the fetch and the read: serve from the store directly
            with _map_store(f"read {row.path}"):
                data = self.store.get_object(self._key(row.path),
                                             byte_range=(offset, offset + count - 1))
        self._evict(keep=key)
        return data, offset + len(data) >= row.size

    def _fetch(self, row: Row, offset: int, count: int) -> None:
        """Bring ``[offset, offset+count)`` of the object into the cache (ranged GETs)."""
        key = self._ckey(row.fileid)
        step = self.cache.chunk * FETCH_RUN
        for first, last in self.cache.missing(key, row.size, offset, count):
            lo = first
            while lo <= last:
                hi = min(last, lo + step - 1)
                with _map_store(f"fetch {row.path}"):
                    try:
                        whole = lo == 0 and hi == row.size - 1
                        data = self.store.get_object(self._key(row.path),
                                                     byte_range=None if whole else (lo, hi))
                    except ObjectNotFound:
                        self._delete_rows(row)
                        raise FsError(FsErrno.STALE, "the object was deleted") from None
                self.cache.fill(key, row.size, lo, data)
                lo = hi + 1
        if self.cache.is_complete(key) and not row.cached:
            self._update(row.fileid, cached=1)

    def _hydrate(self, row: Row) -> None:
        """Make the whole file local before a local change (caller holds the file lock)."""
        key = self._ckey(row.fileid)
        if self.cache.is_complete(key):
            return
        if not row.remote or row.size == 0:
            self.cache.set_complete(key, row.size)
            return
        self._fetch(row, 0, row.size)

    def _evict(self, keep: tuple[str, int] | None = None) -> None:
        for share_dir, fileid in self.cache.evict(protect=[keep] if keep else []):
            if share_dir == self._cache_dir:
                with contextlib.suppress(sqlite3.ProgrammingError):
                    self._update(fileid, cached=0)

    def write(self, cred: Cred, fh: bytes, offset: int, data: bytes | memoryview,
              stable: bool) -> tuple[int, bool, Attr]:
        self._writable()
        row = self._resolve(fh)
        if row.is_dir:
            raise FsError(FsErrno.ISDIR, "write to a directory")
        self._check(cred, row, W, owner_override=True)
        if offset < 0 or offset + len(data) > MAX_FILE_BYTES:
            raise FsError(FsErrno.FBIG, "file would exceed 5 TiB (the largest object)")
        with self._flock(row.fileid):
            row = self._resolve(fh)
            self._hydrate(row)
            size = self.cache.write(self._ckey(row.fileid), offset, data, sync=stable)
            with self._ns:
                row = self._resolve(fh)
                now = self._now_ns()
                self._update(row.fileid, size=size, mtime_ns=now, ctime_ns=now, change=row.change + 1, dirty=1,
                             cached=1)
                if stable:
                    self._mark_due(row.fileid)
                    self._sync_db()
                else:
                    self._due.pop(row.fileid, None)
                    self._quiet[row.fileid] = self.clock()
                row = self._resolve(fh)
        return len(data), stable, self.attr(row)

    def commit(self, cred: Cred, fh: bytes) -> Attr:
        row = self._resolve(fh)
        if row.type == FileType.REG and row.dirty:
            with self._flock(row.fileid):
                self.cache.sync(self._ckey(row.fileid))
                with self._ns:
                    row = self._resolve(fh)
                    if row.dirty:
                        self._mark_due(row.fileid)
                self._sync_db()
        return self.attr(row)

    # --- FileSystem: namespace changes -----------------------------------------------------------
    def create(self, cred: Cred, dir_fh: bytes, name: str, mode: CreateMode, *,
               attrs: SetAttr | None = None, verifier: bytes | None = None) -> tuple[bytes, Attr]:
        self._writable()
        with self._ns:
            d = self._dir(dir_fh)
            self._check_name(name)
            self._check_path(join(d.path, name))
            self._check(cred, d, W | X)
            d = self._ensure_listed(d)
            existing = self._child(d.fileid, name)
            if existing is not None:
                if mode == CreateMode.EXCLUSIVE and existing.verifier is not None \
                        and verifier is not None and existing.verifier == bytes(verifier):
                    return self.handle(existing), self.attr(existing)
                if mode != CreateMode.UNCHECKED or existing.is_dir:
                    raise FsError(FsErrno.EXIST, f"{name!r} exists")
            if existing is not None:
                fh = self.handle(existing)
                if attrs is None or attrs.size is None:
                    return fh, self.attr(existing)
            else:
                fh = b""
            if not fh:
                return self._create_new(cred, d, name, mode, attrs, verifier)
        # UNCHECKED over an existing file with a size: truncate outside the namespace lock
        # (file locks come first)
        return fh, self.setattr(cred, fh, SetAttr(size=attrs.size if attrs else None))

    def _create_new(self, cred: Cred, d: Row, name: str, mode: CreateMode,
                    attrs: SetAttr | None, verifier: bytes | None) -> tuple[bytes, Attr]:
        with self._ns:
            fmode = attrs.mode if attrs is not None and attrs.mode is not None \
                else self.config.defaults.file_mode
            row = self._insert(d, name, FileType.REG, mode=fmode & 0o7777, uid=cred.uid,
                               gid=cred.gid, dirty=1, cached=1,
                               verifier=bytes(verifier) if mode == CreateMode.EXCLUSIVE
                               and verifier is not None else None)
            self.cache.create(self._ckey(row.fileid))
            self._touch(d, mtime_ns=self._now_ns())
            self._mark_due(row.fileid)
            self._sync_db()
            return self.handle(row), self.attr(row)

    def mkdir(self, cred: Cred, dir_fh: bytes, name: str,
              attrs: SetAttr | None = None) -> tuple[bytes, Attr]:
        self._writable()
        with self._ns:
            d = self._dir(dir_fh)
            self._check_name(name)
            self._check_path(join(d.path, name), is_dir=True)
            self._check(cred, d, W | X)
            d = self._ensure_listed(d)
            if self._child(d.fileid, name) is not None:
                raise FsError(FsErrno.EXIST, f"{name!r} exists")
            dmode = attrs.mode if attrs is not None and attrs.mode is not None \
                else self.config.defaults.dir_mode
            row = self._insert(d, name, FileType.DIR, mode=dmode & 0o7777, uid=cred.uid,
                               gid=cred.gid, dirty=1, listed_at=self.clock())
            self._touch(d, mtime_ns=self._now_ns())
            self._mark_due(row.fileid)
            self._sync_db()
            return self.handle(row), self.attr(row)

    def _keep_parent(self, d: Row) -> None:
        """A directory known only as a prefix gets a marker before its last entry goes."""
        if d.fileid != ROOT_ID and not d.marker:
            self._dirty_dir(d)

    def _entry_to_remove(self, cred: Cred, dir_fh: bytes, name: str) -> tuple[Row, Row]:
        """REMOVE/RMDIR's common checks (caller holds the namespace lock): the listed directory
        the caller may modify, and the existing entry ``name`` in it."""
        d = self._dir(dir_fh)
        self._check_name(name)
        self._check(cred, d, W | X)
        d = self._ensure_listed(d)
        child = self._child(d.fileid, name)
        if child is None:
            raise FsError(FsErrno.NOENT, f"no {name!r}")
        return d, child

    def remove(self, cred: Cred, dir_fh: bytes, name: str) -> None:
        self._writable()
        with self._ns:
            d, child = self._entry_to_remove(cred, dir_fh, name)
            if child.is_dir:
                raise FsError(FsErrno.ISDIR, f"{name!r} is a directory")
            self._sticky(cred, d, child)
            self._keep_parent(d)
            if child.remote:
                with _map_store(f"remove {child.path}"):
                    self.store.delete_object(self._key(child.path))
            self._delete_rows(child)
            self._touch(self._get(d.fileid) or d, mtime_ns=self._now_ns())
            self._sync_db()

    def rmdir(self, cred: Cred, dir_fh: bytes, name: str) -> None:
        self._writable()
        with self._ns:
            d, child = self._entry_to_remove(cred, dir_fh, name)
            if not child.is_dir:
                raise FsError(FsErrno.NOTDIR, f"{name!r} is not a directory")
            self._sticky(cred, d, child)
            child = self._ensure_listed(child)
            if self._rows("WHERE parent = ? LIMIT 1", (child.fileid,)):
                raise FsError(FsErrno.NOTEMPTY, f"{name!r} is not empty")
            self._keep_parent(d)
            with _map_store(f"rmdir {child.path}"):
                self.store.delete_object(self._dir_key(child.path))
            self._delete_rows(child)
            self._touch(self._get(d.fileid) or d, mtime_ns=self._now_ns())
            self._sync_db()

    def rename(self, cred: Cred, from_dir: bytes, from_name: str, to_dir: bytes,
               to_name: str) -> None:
        """Rename a file or a directory.

        Cost: objects cannot be renamed in S3. A clean file is a server-side copy of its object
        plus a delete; a dirty one just moves in the table (it uploads under the new name). A
        directory is a copy and a delete of *every object under its prefix*: time and requests
        grow with the number and size of the objects below it.
        """
        self._writable()
        with self._ns:
            src_dir = self._dir(from_dir)
            dst_dir = self._dir(to_dir)
            self._check_name(from_name)
            self._check_name(to_name)
            self._check(cred, src_dir, W | X)
            self._check(cred, dst_dir, W | X)
            src_dir = self._ensure_listed(src_dir)
            dst_dir = self._ensure_listed(dst_dir)
            src = self._child(src_dir.fileid, from_name)
            if src is None:
                raise FsError(FsErrno.NOENT, f"no {from_name!r}")
            self._sticky(cred, src_dir, src)
            new_path = join(dst_dir.path, to_name)
            if src.path == new_path:
                return
            self._check_path(new_path, is_dir=src.is_dir)
            target = self._child(dst_dir.fileid, to_name)
            if target is not None:
                self._sticky(cred, dst_dir, target)
            if src.is_dir:
                if dst_dir.path == src.path or dst_dir.path.startswith(src.path + "/"):
                    raise FsError(FsErrno.INVAL, "cannot move a directory into itself")
                if target is not None and not target.is_dir:
                    raise FsError(FsErrno.NOTDIR, f"{to_name!r} is not a directory")
                if target is not None:
                    target = self._ensure_listed(target)
                    if self._rows("WHERE parent = ? LIMIT 1", (target.fileid,)):
                        raise FsError(FsErrno.NOTEMPTY, f"{to_name!r} is not empty")
                longest = max((len(r.path) for r in self._descendants(src)), default=0)
                if longest - len(src.path) + len(new_path.encode()) > PATH_MAX:
                    raise FsError(FsErrno.NAMETOOLONG, "a path below would pass 1,024 bytes")
                self._keep_parent(src_dir)
                if target is not None:
                    with _map_store(f"rename over {target.path}"):
                        self.store.delete_object(self._dir_key(target.path))
                    self._delete_rows(target)
                self._move_dir_objects(src.path, new_path)
                base = src.path + "/"
                self._db.execute(
                    "UPDATE files SET path = ? || substr(path, ?) WHERE substr(path, 1, ?) = ?",
                    (new_path + "/", len(base) + 1, len(base), base))
            else:
                if target is not None and target.is_dir:
                    raise FsError(FsErrno.ISDIR, f"{to_name!r} is a directory")
                self._keep_parent(src_dir)
                with _map_store(f"rename {src.path}"):
                    if src.remote and not src.dirty:
                        meta = encode_metadata(FileType.REG, src.mode, src.uid, src.gid,
                                               src.mtime_ns, self._now_ns())
                        self.store.copy_object(self._key(src.path), self._key(new_path),
                                               storage_class=self.config.storage_class,
                                               metadata=meta)
                        self.store.delete_object(self._key(src.path))
                    else:
                        if src.remote:
                            self.store.delete_object(self._key(src.path))
                        if target is not None and target.remote:
                            self.store.delete_object(self._key(new_path))
                        self._mark_due(src.fileid)
                if target is not None:
                    self._delete_rows(target)
            self._touch(src, parent=dst_dir.fileid, name=to_name, path=new_path,
                        remote=int(bool(src.remote and not src.dirty)) if not src.is_dir
                        else src.remote, synced_at=self.clock())
            now = self._now_ns()
            for d in {src_dir.fileid, dst_dir.fileid}:
                fresh = self._get(d)
                if fresh is not None:
                    self._touch(fresh, mtime_ns=now)
            self._sync_db()

    def _move_dir_objects(self, old: str, new: str) -> None:
        old_key, new_key = self._dir_key(old), self._dir_key(new)
        with _map_store(f"rename {old}"):
            moved: list[str] = []
            for entry in self.store.list_objects(old_key):
                if isinstance(entry, CommonPrefix):
                    continue
                self.store.copy_object(entry.key, new_key + entry.key[len(old_key):],
                                       storage_class=self.config.storage_class)
                moved.append(entry.key)
            for i in range(0, len(moved), 1000):
                self.store.delete_objects(moved[i:i + 1000])

    # --- FileSystem: attributes and listings -----------------------------------------------------
    def setattr(self, cred: Cred, fh: bytes, changes: SetAttr,
                guard_ctime_ns: int | None = None) -> Attr:
        row = self._resolve(fh)
        if changes.size is not None and row.is_dir:
            raise FsError(FsErrno.ISDIR, "cannot set the size of a directory")
        lock = self._flock(row.fileid) if row.type == FileType.REG else contextlib.nullcontext()
        with lock:
            with self._ns:
                row = self._resolve(fh)
                if guard_ctime_ns is not None and guard_ctime_ns != row.ctime_ns:
                    raise FsError(FsErrno.NOT_SYNC, "ctime guard does not match")
                if changes == SetAttr():
                    return self.attr(row)
                self._writable()
                fields = setattr_fields(cred, row, changes, self._now_ns())
                if changes.size is not None and changes.size != row.size:
                    if changes.size > MAX_FILE_BYTES:
                        raise FsError(FsErrno.FBIG, "larger than 5 TiB")
                    self._hydrate(row)
                    self.cache.truncate(self._ckey(row.fileid), changes.size)
                    fields.update(size=changes.size, dirty=1, cached=1)
                    fields.setdefault("mtime_ns", self._now_ns())
                meta_only = row.type == FileType.REG and "size" not in fields and row.remote \
                    and not row.dirty
                if meta_only:
                    merged = replace(row, **fields)
                    meta = encode_metadata(FileType.REG, merged.mode, merged.uid, merged.gid,
                                           merged.mtime_ns, self._now_ns())
                    with _map_store(f"setattr {row.path}"):
                        info = self.store.copy_object(self._key(row.path), self._key(row.path),
                                                      storage_class=self.config.storage_class,
                                                      metadata=meta)
                    fields.update(etag=info.etag, synced_at=self.clock())
                elif row.type == FileType.REG:
                    fields["dirty"] = 1
                    self._touch(row, **fields)
                    self._mark_due(row.fileid)
                    self._sync_db()
                    return self.attr(self._resolve(fh))
                self._touch(row, **fields)
                row = self._resolve(fh)
                if row.is_dir:
                    self._dirty_dir(row)
                self._sync_db()
                return self.attr(row)

    def readdir(self, cred: Cred, dir_fh: bytes, cookie: int, cookieverf: bytes,
                max_entries: int) -> tuple[Sequence[DirEntry], bool, bytes]:
        with self._ns:
            d = self._dir(dir_fh)
            self._check(cred, d, R)
            if any(cookieverf) and bytes(cookieverf) != self.cookieverf:
                raise FsError(FsErrno.BAD_COOKIE, "stale cookie verifier")
            if cookie == 0:
                d = self._ensure_listed(d)
            elif d.listed_at is None:
                d = self._ensure_listed(d)
            limit = max(1, max_entries)
            rows = self._rows("WHERE parent = ? AND fileid > ? AND fileid != ? ORDER BY fileid "
                              "LIMIT ?", (d.fileid, cookie, ROOT_ID, limit + 1))
            eof = len(rows) <= limit
            entries = [DirEntry(name=r.name, fileid=r.fileid, cookie=r.fileid,
                                handle=self.handle(r), attr=self.attr(r)) for r in rows[:limit]]
            return entries, eof, self.cookieverf

    # --- uploads ---------------------------------------------------------------------------------
    def _upload_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.run_uploads()
            except Exception:  # a bug: keep the share alive, try again next round
                log.exception("share %s: upload round failed", self.name)

    def due_files(self, now: float | None = None) -> list[int]:
        """Fileids whose upload is due now (due and quiet for ``settle`` seconds)."""
        now = self.clock() if now is None else now
        settle = self.config.settle
        with self._ns:
            return [fid for fid, at in sorted(self._due.items(), key=lambda kv: kv[1])
                    if now - at >= settle and self._retry_at.get(fid, 0) <= now]

    def run_uploads(self, now: float | None = None) -> int:
        """Upload every file that is due; return how many were uploaded."""
        done = 0
        for fileid in self.due_files(now):
            if self._stop.is_set():
                break
            if self._upload(fileid):
                done += 1
        if done:
            self._evict()
        return done

    def flush(self) -> int:
        """Upload every dirty file now, settle or not (share deletion, tests)."""
        with self._ns:
            for r in self._rows("WHERE dirty = 1"):
                self._due[r.fileid] = float("-inf")
            self._retry_at.clear()
        return self.run_uploads(now=float("inf"))

    def pending(self) -> int:
        """Files and directories not yet in the bucket."""
        with self._ns:
            return int(self._db.execute("SELECT count(*) FROM files WHERE dirty = 1")
                       .fetchone()[0])

    def _upload(self, fileid: int) -> bool:
        with self._flock(fileid):
            with self._ns:
                row = self._get(fileid)
                if row is None or not row.dirty:
                    self._due.pop(fileid, None)
                    return False
                if fileid not in self._due:
                    return False
                change = row.change
            meta = encode_metadata(FileType(row.type), row.mode, row.uid, row.gid, row.mtime_ns,
                                   row.ctime_ns)
            key = self._dir_key(row.path) if row.is_dir else self._key(row.path)
            try:
                if row.is_dir:
                    info = self.store.put_object(key, b"", metadata=meta)
                else:
                    self._hydrate(row)
                    info = self.store.put_file(key, self.cache.path(self._ckey(fileid)),
                                               storage_class=self.config.storage_class,
                                               metadata=meta)
            except (StoreError, FsError, OSError) as exc:
                backoff = 30.0 if isinstance(exc, StoreUnavailable) else 300.0
                log.warning("share %s: upload of %s failed (%s); retrying in %.0f s",
                            self.name, row.path or "/", exc, backoff)
                self._retry_at[fileid] = self.clock() + backoff
                return False
            with self._ns:
                now_row = self._get(fileid)
                if now_row is None or now_row.path != row.path:
                    other = self._by_path(row.path)
                    if other is None or other.dirty:
                        with contextlib.suppress(StoreError):
                            self.store.delete_object(key)
                    return False
                if now_row.change != change:
                    return False  # changed meanwhile (attributes): stays due, goes again
                fields: dict[str, Any] = {"dirty": 0, "remote": 1, "etag": info.etag,
                                          "synced_at": self.clock()}
                if row.is_dir:
                    fields["marker"] = 1
                self._update(fileid, **fields)
                self._due.pop(fileid, None)
                self._retry_at.pop(fileid, None)
                if not row.is_dir:
                    self.cache.mark_clean(self._ckey(fileid))
                self.uploads += 1
        return True
