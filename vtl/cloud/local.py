"""The embedded object store: a directory "bucket" with S3's semantics as the appliance uses them.

Layout under ``root`` (normally ``<data-dir>/store``)::

    vtl-store.json                  format marker {"format": "vtl-localstore", "version": 1}
    objects/<c1>.d/<c2>.d/<name>.m  the object's sidecar (JSON): size, etag, checksum, class,
                                    user metadata, restore state, and the name of its blob
    objects/<c1>.d/<c2>.d/<name>.<hex>.b   the object's bytes (immutable once written)

Invariants:

- Key ``c1/c2/name`` maps to directories ``c1.d/c2.d`` and entries named ``name.*``. Directory
  names end in ``.d``, sidecars in ``.m``, blobs in ``.<32 hex>.b``, temporaries in ``.tmp``: the
  suffixes keep the namespaces disjoint, so keys ``a`` and ``a/b`` coexist as in S3. Keys are
  validated (:func:`vtl.cloud.store.validate_key`): no ``.``/``..`` components, no leading
  ``/``, no NUL; a component is at most 220 UTF-8 bytes (the file-name limit minus suffixes).
- The sidecar is the commit point. A PUT writes a fresh blob (fsync), writes the sidecar to a
  temporary in the same directory (fsync), renames it over the old one and fsyncs the directory;
  only then is the previous blob unlinked. A crash leaves either the old or the new object, plus
  at worst an unreferenced blob or temporary that :meth:`LocalStore.collect_garbage` removes.
- Blobs are never modified in place, so a copy hard-links the blob (instant, even for GiBs)
  and an open reader keeps reading the version it opened.
- Sidecar updates (commit, restore, delete) take an exclusive ``flock`` on the directory, so
  several processes of the engine can share the store.
- Listing walks directories in S3's order (code-point order of full keys: a directory ``x`` sorts
  as ``x/``), lazily, so the first page of a huge listing costs little.
- Archive semantics come from the sidecar and the injected clock: a GET of a GLACIER or
  DEEP_ARCHIVE object raises :class:`ObjectArchived` unless a restore's ready time has passed and
  its expiry has not.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

import crc32c

from vtl.cloud import tiers
from vtl.cloud.clock import Clock, SystemClock
from vtl.cloud.store import (
    ByteRange,
    Checksum,
    ChecksumAlgorithm,
    CommonPrefix,
    InvalidKey,
    ListEntry,
    ObjectArchived,
    ObjectInfo,
    ObjectNotFound,
    ProgressCallback,
    Restore,
    RestoreState,
    RestoreTier,
    StorageClass,
    StoreError,
    clip_range,
    validate_key,
    validate_metadata,
    validate_range,
)
from vtl.errors import InvalidRequest

log = logging.getLogger(__name__)

FORMAT = "vtl-localstore"
VERSION = 1
OBJECT_FORMAT = "vtl-object"
MAX_COMPONENT_BYTES = 220
CHUNK = 1024 * 1024
_RETRIES = 8

RestoreDelay = Callable[[StorageClass, RestoreTier, str, datetime], datetime]
"""``(storage_class, tier, key, requested_at) -> ready_at`` for a new restore."""


def default_restore_delay(storage_class: StorageClass, tier: RestoreTier, key: str, requested_at: datetime) -> datetime:
    """S3's restore windows (:mod:`vtl.cloud.tiers`), drawn deterministically per key and time."""
    return tiers.restore_ready_time(storage_class, tier, requested_at, f"{key}@{requested_at.isoformat()}")


class _Digest:
    """Streaming md5 (the etag) plus the configured whole-object checksum."""

    def __init__(self, algorithm: ChecksumAlgorithm) -> None:
        self.algorithm = algorithm
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.crc = 0
        self.sha = hashlib.sha256() if algorithm is ChecksumAlgorithm.SHA256 else None
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self.md5.update(data)
        if self.sha is not None:
            self.sha.update(data)
        else:
            self.crc = crc32c.crc32c(data, self.crc)
        self.size += len(data)

    def checksum(self) -> Checksum:
        if self.sha is not None:
            digest = self.sha.digest()
        else:
            digest = self.crc.to_bytes(4, "big")
        return Checksum(self.algorithm, base64.b64encode(digest).decode("ascii"))


@contextlib.contextmanager
def _io(what: str, key: str | None = None) -> Iterator[None]:
    """Turn an OSError of the store's own files into a StoreError saying what failed."""
    try:
        yield
    except OSError as exc:
        raise StoreError(f"local store: {what}: {exc.strerror or exc}", code="LocalIOError", key=key) from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _dir_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on a directory (serialises sidecar updates across processes)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat()


def _parse_time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


class _RangeReader(io.RawIOBase):
    """A raw reader over ``length`` bytes of an open blob."""

    def __init__(self, f: BinaryIO, length: int) -> None:
        super().__init__()
        self._f = f
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buf)[: min(len(buf), self._left)]
        got = self._f.readinto(view)  # type: ignore[attr-defined]
        if not got:
            raise StoreError("local store: object data ended early (blob truncated)", code="LocalIOError")
        self._left -= got
        return int(got)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


class LocalStore:
    """A persistent directory "bucket" implementing :class:`vtl.cloud.store.ObjectStore`."""

    def __init__(
        self,
        root: str | Path,
        *,
        clock: Clock | None = None,
        checksum_algorithm: ChecksumAlgorithm = ChecksumAlgorithm.CRC32C,
        restore_delay: RestoreDelay = default_restore_delay,
        durable: bool = True,
    ) -> None:
        """Open (creating if needed) the store under ``root``.

        ``durable=False`` skips fsyncs (for throwaway test stores only).
        """
        self.root = Path(root)
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.checksum_algorithm = checksum_algorithm
        self.restore_delay = restore_delay
        self.durable = durable
        self._objects = self.root / "objects"
        with _io(f"cannot create the store directory {self.root}"):
            self._objects.mkdir(parents=True, exist_ok=True)
        self._check_marker()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # ------------------------------------------------------------------------------ plumbing

    def _check_marker(self) -> None:
        marker = self.root / "vtl-store.json"
        try:
            data = json.loads(marker.read_text("utf-8"))
        except FileNotFoundError:
            self._write_json_atomic(self.root, "vtl-store.json", {"format": FORMAT, "version": VERSION})
            return
        except (OSError, ValueError) as exc:
            raise StoreError(f"local store marker {marker} is unreadable: {exc}", code="CorruptStore") from exc
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise StoreError(
                f"{self.root} holds format {data.get('format')!r} v{data.get('version')!r}, "
                f"this appliance reads {FORMAT} v{VERSION}: point it at another directory",
                code="CorruptStore",
            )

    def _write_json_atomic(self, dirpath: Path, name: str, data: Mapping[str, Any]) -> None:
        """Temp in the same directory, fsync, rename, fsync the directory."""
        tmp = dirpath / f".{uuid.uuid4().hex}.tmp"
        with _io(f"cannot write {dirpath / name}"):
            try:
                with open(tmp, "x", encoding="utf-8") as f:
                    json.dump(data, f, sort_keys=True)
                    f.flush()
                    if self.durable:
                        os.fsync(f.fileno())
                os.replace(tmp, dirpath / name)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            if self.durable:
                _fsync_dir(dirpath)

    def _locate(self, key: str) -> tuple[Path, str]:
        """Directory and entry stem of a (validated) key."""
        validate_key(key)
        parts = key.split("/")
        for part in parts:
            if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
                raise InvalidKey(
                    f"a path component of the key is over {MAX_COMPONENT_BYTES} bytes (local store limit)",
                    key=key,
                )
        dirpath = self._objects.joinpath(*(p + ".d" for p in parts[:-1])) if len(parts) > 1 else self._objects
        return dirpath, parts[-1]

    def _read_meta(self, dirpath: Path, name: str, key: str) -> dict[str, Any]:
        path = dirpath / (name + ".m")
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in the local store", key=key) from None
        except (OSError, ValueError) as exc:
            raise StoreError(f"sidecar of {key!r} is unreadable: {exc}", code="CorruptStore", key=key) from exc
        if meta.get("format") != OBJECT_FORMAT or meta.get("version") != VERSION:
            raise StoreError(f"sidecar of {key!r} has an unknown format", code="CorruptStore", key=key)
        return dict(meta)

    def _restore_of(self, meta: Mapping[str, Any]) -> Restore | None:
        raw = meta.get("restore")
        if not raw:
            return None
        now = self.clock.now()
        ready = _parse_time(raw["ready_at"])
        expiry = _parse_time(raw["expiry"])
        assert ready is not None and expiry is not None
        if now < ready:
            return Restore(RestoreState.ONGOING, expiry=None, ready_at=ready)
        if now < expiry:
            return Restore(RestoreState.AVAILABLE, expiry=expiry, ready_at=ready)
        return None  # the restored copy expired: archived-only again

    def _info(self, key: str, meta: Mapping[str, Any], *, full: bool = True) -> ObjectInfo:
        storage_class = StorageClass(meta["storage_class"])
        last_modified = _parse_time(meta["last_modified"])
        assert last_modified is not None
        if not full:
            return ObjectInfo(key, int(meta["size"]), meta["etag"], storage_class, last_modified)
        checksum = meta.get("checksum")
        return ObjectInfo(
            key=key,
            size=int(meta["size"]),
            etag=meta["etag"],
            storage_class=storage_class,
            last_modified=last_modified,
            metadata=MappingProxyType(dict(meta.get("metadata", {}))),
            checksum=Checksum(ChecksumAlgorithm(checksum["algorithm"]), checksum["value"]) if checksum else None,
            restore=self._restore_of(meta) if storage_class.archived else None,
        )

    def _new_blob(self, dirpath: Path, name: str, key: str) -> tuple[Path, int]:
        """Create the directory (again, if a delete pruned it meanwhile) and a fresh blob file."""
        for _ in range(_RETRIES):
            with _io(f"cannot create directory for {key!r}", key):
                try:
                    dirpath.mkdir(parents=True, exist_ok=True)
                except FileExistsError:
                    raise InvalidKey(f"key {key!r} collides with a non-directory on disk", key=key) from None
            blob = dirpath / f"{name}.{uuid.uuid4().hex}.b"
            try:
                return blob, os.open(blob, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:
                continue  # a concurrent delete pruned the empty directory: make it again
            except OSError as exc:
                raise StoreError(f"cannot create data file for {key!r}: {exc.strerror}", code="LocalIOError", key=key) from exc
        raise StoreError(f"cannot create data file for {key!r}: directory keeps vanishing", code="LocalIOError", key=key)

    def _commit(self, dirpath: Path, name: str, meta: dict[str, Any]) -> None:
        """Make ``meta`` the object's sidecar; unlink the blob it replaces."""
        old_blob: str | None = None
        with _io(f"cannot lock {dirpath}"), _dir_lock(dirpath):
            try:
                with open(dirpath / (name + ".m"), encoding="utf-8") as f:
                    old_blob = json.load(f).get("blob")
            except (OSError, ValueError):
                old_blob = None
            self._write_json_atomic(dirpath, name + ".m", meta)
        if old_blob and old_blob != meta["blob"]:
            with contextlib.suppress(FileNotFoundError):
                (dirpath / old_blob).unlink()

    def _write(
        self,
        key: str,
        chunks: Iterator[bytes],
        storage_class: StorageClass,
        metadata: Mapping[str, str] | None,
        progress: ProgressCallback | None,
    ) -> ObjectInfo:
        dirpath, name = self._locate(key)
        user_meta = validate_metadata(metadata)
        blob, fd = self._new_blob(dirpath, name, key)
        digest = _Digest(self.checksum_algorithm)
        try:
            with open(fd, "wb", closefd=True) as f:
                for chunk in chunks:
                    with _io(f"cannot write {key!r}", key):
                        f.write(chunk)
                    digest.update(chunk)
                    if progress is not None and chunk:
                        progress(digest.size)
                with _io(f"cannot write {key!r}", key):
                    f.flush()
                    if self.durable:
                        os.fsync(f.fileno())
            meta = {
                "format": OBJECT_FORMAT,
                "version": VERSION,
                "key": key,
                "blob": blob.name,
                "size": digest.size,
                "etag": digest.md5.hexdigest(),
                "checksum": {"algorithm": digest.algorithm.value, "value": digest.checksum().value},
                "storage_class": storage_class.value,
                "metadata": user_meta,
                "last_modified": _iso(self.clock.now()),
                "restore": None,
            }
            self._commit(dirpath, name, meta)
        except BaseException:
            with contextlib.suppress(OSError):
                blob.unlink()
            self._prune(dirpath)
            raise
        return self._info(key, meta)

    def _prune(self, dirpath: Path) -> None:
        """Remove now-empty directories from ``dirpath`` up to (not including) objects/."""
        while dirpath != self._objects and self._objects in dirpath.parents:
            try:
                dirpath.rmdir()
            except OSError:
                return
            dirpath = dirpath.parent

    def _open_blob(self, key: str) -> tuple[dict[str, Any], BinaryIO]:
        """Read the sidecar, check the object is readable, open its blob (retrying races)."""
        dirpath, name = self._locate(key)
        for _ in range(_RETRIES):
            meta = self._read_meta(dirpath, name, key)
            info = self._info(key, meta)
            if not info.readable:
                raise ObjectArchived(
                    f"object {key!r} is in {info.storage_class.value}: restore it before reading",
                    key=key,
                )
            try:
                return meta, open(dirpath / meta["blob"], "rb")
            except FileNotFoundError:
                continue  # replaced between reading the sidecar and opening: read again
            except OSError as exc:
                raise StoreError(f"cannot read {key!r}: {exc.strerror}", code="LocalIOError", key=key) from exc
        raise StoreError(f"data of {key!r} is missing (sidecar points to no blob)", code="CorruptStore", key=key)

    # ------------------------------------------------------------------------------ the API

    def put_object(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        storage_class: StorageClass = StorageClass.STANDARD,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Store bytes or a binary stream (read to EOF) under ``key``, atomically."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            payload = bytes(data)
            return self._write(key, iter([payload]), storage_class, metadata, None)
        stream = data

        def chunks() -> Iterator[bytes]:
            while chunk := stream.read(CHUNK):
                yield chunk

        return self._write(key, chunks(), storage_class, metadata, None)

    def put_file(
        self,
        key: str,
        path: str | Path,
        *,
        storage_class: StorageClass = StorageClass.STANDARD,
        metadata: Mapping[str, str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> ObjectInfo:
        """Store the file at ``path``; ``progress`` gets the cumulative bytes stored."""
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}", code="LocalIOError", key=key) from exc
        with f:

            def chunks() -> Iterator[bytes]:
                while chunk := f.read(CHUNK):
                    yield chunk

            return self._write(key, chunks(), storage_class, metadata, progress)

    def get_object(self, key: str, *, byte_range: ByteRange | None = None) -> bytes:
        """Return the object's bytes; a full read is verified against the stored checksum."""
        validate_range(byte_range)
        meta, f = self._open_blob(key)
        with f:
            size = int(meta["size"])
            if byte_range is None:
                data = f.read()
                if len(data) != size:
                    raise StoreError(f"data of {key!r} is {len(data)} bytes, {size} expected", code="CorruptStore", key=key)
                digest = _Digest(ChecksumAlgorithm(meta["checksum"]["algorithm"]))
                digest.update(data)
                if digest.checksum().value != meta["checksum"]["value"]:
                    raise StoreError(f"data of {key!r} fails its checksum: the local copy is damaged", code="BadDigest", key=key)
                return data
            offset, length = clip_range(byte_range, size, key)
            f.seek(offset)
            data = f.read(length)
            if len(data) != length:
                raise StoreError(f"data of {key!r} ends early", code="CorruptStore", key=key)
            return data

    def open_object(self, key: str, *, byte_range: ByteRange | None = None) -> io.BufferedIOBase:
        """A buffered reader over the object (or range); it keeps the version it opened."""
        validate_range(byte_range)
        meta, f = self._open_blob(key)
        size = int(meta["size"])
        offset, length = (0, size) if byte_range is None else clip_range(byte_range, size, key)
        try:
            f.seek(offset)
        except BaseException:
            f.close()
            raise
        return io.BufferedReader(_RangeReader(f, length), buffer_size=CHUNK)

    def head_object(self, key: str) -> ObjectInfo:
        dirpath, name = self._locate(key)
        return self._info(key, self._read_meta(dirpath, name, key))

    def list_objects(self, prefix: str = "", delimiter: str | None = None) -> Iterator[ListEntry]:
        """Objects (and common prefixes) under ``prefix`` in S3 key order, lazily."""
        if delimiter == "":
            delimiter = None
        parts = prefix.split("/")
        if any(p in (".", "..") or "\x00" in p for p in parts[:-1]):
            return
        start = self._objects.joinpath(*(p + ".d" for p in parts[:-1])) if len(parts) > 1 else self._objects
        base = "/".join(parts[:-1]) + "/" if len(parts) > 1 else ""
        last_prefix: str | None = None
        for key, path, is_dir in self._walk(start, base, prefix, delimiter == "/"):
            if not key.startswith(prefix):
                continue
            if is_dir:
                yield CommonPrefix(key)
                continue
            if delimiter is not None:
                cut = key.find(delimiter, len(prefix))
                if cut >= 0:
                    common = key[: cut + len(delimiter)]
                    if common != last_prefix:
                        last_prefix = common
                        yield CommonPrefix(common)
                    continue
            try:
                with open(path, encoding="utf-8") as f:
                    meta = json.load(f)
            except FileNotFoundError:
                continue  # deleted while we walked
            except (OSError, ValueError) as exc:
                raise StoreError(f"sidecar of {key!r} is unreadable: {exc}", code="CorruptStore", key=key) from exc
            yield self._info(key, meta, full=False)

    def _walk(self, dirpath: Path, base: str, prefix: str, roll_up: bool) -> Iterator[tuple[str, Path, bool]]:
        """Yield ``(key, sidecar path, False)`` in key order; with ``roll_up`` a non-empty
        subdirectory past the prefix comes out once as ``(key + "/", dir, True)``."""
        entries: list[tuple[str, Path, bool]] = []
        try:
            with os.scandir(dirpath) as it:
                for entry in it:
                    name = entry.name
                    if name.endswith(".m"):
                        entries.append((base + name[:-2], Path(entry.path), False))
                    elif name.endswith(".d") and entry.is_dir(follow_symlinks=False):
                        entries.append((base + name[:-2] + "/", Path(entry.path), True))
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise StoreError(f"cannot list {dirpath}: {exc.strerror}", code="LocalIOError") from exc
        entries.sort(key=lambda e: e[0])
        for key, path, is_dir in entries:
            if not is_dir:
                yield key, path, False
            elif key.startswith(prefix) and len(key) > len(prefix) and roll_up:
                if next(self._walk(path, key, key, False), None) is not None:
                    yield key, path, True
            elif key.startswith(prefix) or prefix.startswith(key):
                yield from self._walk(path, key, prefix, roll_up)

    def delete_object(self, key: str) -> None:
        """Delete ``key``; a missing key is fine. Empty directories are pruned."""
        dirpath, name = self._locate(key)
        try:
            lock = _dir_lock(dirpath)
            lock.__enter__()
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise StoreError(f"cannot lock {dirpath}: {exc.strerror}", code="LocalIOError", key=key) from exc
        blob: str | None = None
        try:
            try:
                blob = self._read_meta(dirpath, name, key).get("blob")
            except ObjectNotFound:
                return
            except StoreError:
                blob = None  # a damaged sidecar: delete it anyway
            with _io(f"cannot delete {key!r}", key):
                (dirpath / (name + ".m")).unlink()
                if self.durable:
                    _fsync_dir(dirpath)
        finally:
            lock.__exit__(None, None, None)
        if blob:
            with contextlib.suppress(FileNotFoundError):
                (dirpath / blob).unlink()
        self._prune(dirpath)

    def delete_objects(self, keys: Sequence[str]) -> None:
        failed: list[str] = []
        first: StoreError | None = None
        for key in keys:
            try:
                self.delete_object(key)
            except StoreError as exc:
                failed.append(key)
                first = first or exc
        if failed:
            raise StoreError(f"could not delete {len(failed)} object(s), first {failed[0]!r}: {first}", code="DeleteFailed")

    def copy_object(
        self,
        src: str,
        dst: str,
        *,
        storage_class: StorageClass = StorageClass.STANDARD,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Copy by hard-linking the immutable blob; see the protocol for the S3 rules kept."""
        src_dir, src_name = self._locate(src)
        dst_dir, dst_name = self._locate(dst)
        user_meta = validate_metadata(metadata) if metadata is not None else None
        for _ in range(_RETRIES):
            meta = self._read_meta(src_dir, src_name, src)
            info = self._info(src, meta)
            if not info.readable:
                raise ObjectArchived(f"object {src!r} is in {info.storage_class.value}: restore it before copying", key=src)
            blob, fd = self._new_blob(dst_dir, dst_name, dst)
            os.close(fd)
            blob.unlink()
            try:
                os.link(src_dir / meta["blob"], blob)
            except FileNotFoundError:
                self._prune(dst_dir)
                continue  # the source was replaced meanwhile: start over
            except OSError as exc:
                self._prune(dst_dir)
                raise StoreError(f"cannot copy {src!r}: {exc.strerror}", code="LocalIOError", key=src) from exc
            new = dict(meta)
            new.update(
                key=dst,
                blob=blob.name,
                storage_class=storage_class.value,
                metadata=user_meta if user_meta is not None else meta.get("metadata", {}),
                last_modified=_iso(self.clock.now()),
                restore=None,
            )
            try:
                self._commit(dst_dir, dst_name, new)
            except BaseException:
                with contextlib.suppress(OSError):
                    blob.unlink()
                raise
            return self._info(dst, new)
        raise StoreError(f"cannot copy {src!r}: it keeps changing", code="LocalIOError", key=src)

    def restore_object(self, key: str, *, days: int, tier: RestoreTier = RestoreTier.STANDARD) -> bool:
        """Start (or extend) a restore; the ready time comes from the clock and ``restore_delay``."""
        if days < 1:
            raise StoreError("restore days must be at least 1", code="InvalidArgument", key=key)
        dirpath, name = self._locate(key)
        try:
            lock = _dir_lock(dirpath)
            lock.__enter__()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in the local store", key=key) from None
        try:
            meta = self._read_meta(dirpath, name, key)
            storage_class = StorageClass(meta["storage_class"])
            if not storage_class.archived:
                raise StoreError(f"object {key!r} is not archived: nothing to restore", code="InvalidObjectState", key=key)
            now = self.clock.now()
            current = self._restore_of(meta)
            if current is not None and current.state is RestoreState.ONGOING:
                return False
            if current is not None:  # available: extend from now, as S3 does
                meta["restore"] = dict(meta["restore"], expiry=_iso(now + timedelta(days=days)))
                started = False
            else:
                try:
                    ready = self.restore_delay(storage_class, tier, key, now)
                except InvalidRequest as exc:
                    raise StoreError(str(exc), code="InvalidArgument", key=key) from exc
                meta["restore"] = {
                    "tier": tier.value,
                    "days": days,
                    "requested_at": _iso(now),
                    "ready_at": _iso(ready),
                    "expiry": _iso(ready + timedelta(days=days)),
                }
                started = True
            self._write_json_atomic(dirpath, name + ".m", meta)
            return started
        finally:
            lock.__exit__(None, None, None)

    # ------------------------------------------------------------------------------ upkeep

    def collect_garbage(self, *, older_than: timedelta = timedelta(hours=1)) -> int:
        """Remove blobs no sidecar references and stale temporaries (left by crashes).

        Only files older than ``older_than`` (by their mtime, wall clock) are touched, so
        uploads in progress keep their blobs. Returns the number of files removed.
        """
        cutoff = SystemClock().now() - older_than
        removed = 0
        for dirpath, dirnames, filenames in os.walk(self._objects):
            here = Path(dirpath)
            referenced: set[str] = set()
            for fname in filenames:
                if fname.endswith(".m"):
                    try:
                        referenced.add(json.loads((here / fname).read_text("utf-8")).get("blob", ""))
                    except (OSError, ValueError):
                        continue
            for fname in filenames:
                if not (fname.endswith(".tmp") or (fname.endswith(".b") and fname not in referenced)):
                    continue
                path = here / fname
                try:
                    mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC)
                    if mtime < cutoff:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        log.warning("cannot remove stale %s: %s", path, exc)
            if not dirnames and not filenames:
                self._prune(here)
        return removed
