"""Tapes in the object store: the manifest and the segment upload/download steps.

Objects of one tape::

    tapes/<BARCODE>/manifest.json       versioned JSON: cartridge metadata, segments, sizes, CRC32C
    tapes/<BARCODE>/seg-000000.dat      the cartridge's segment files, byte for byte

Invariants:

- The manifest is written after the segments it names, so every segment it lists is in the
  store with that size and checksum (a crash between the two leaves an unlisted object that the
  next pass overwrites or deletes).
- Uploads are idempotent: a segment whose local size and mtime match its manifest entry is not
  read again, one whose content changed (an overwrite truncated the tape) is uploaded again, and
  objects of segments that no longer exist locally are deleted.
- A segment counts as uploaded only if its file did not change while it was read (size and
  mtime before and after), so a concurrent overwrite can never leave a wrong manifest entry.
- No catalog, no event loop: these functions run in the job pool's threads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c as _crc32c

from vtl.cloud.store import ObjectNotFound, ObjectStore, StorageClass
from vtl.library.cartridge import EVICTED_SUFFIX, SEG_HDR_LEN

MANIFEST_FORMAT = "vtl-tape-manifest"
MANIFEST_VERSION = 1
_SEG_NAME = re.compile(r"^seg-(\d{6})\.dat$")
_READ_CHUNK = 8 << 20


def tape_prefix(barcode: str) -> str:
    return f"tapes/{barcode}/"


def manifest_key(barcode: str) -> str:
    return f"tapes/{barcode}/manifest.json"


def segment_key(barcode: str, name: str) -> str:
    return f"tapes/{barcode}/{name}"


@dataclass(frozen=True)
class SegmentEntry:
    name: str
    size: int
    crc32c: int
    mtime_ns: int

    @property
    def data_bytes(self) -> int:
        """Record bytes in the segment (what ``used_bytes`` counts)."""
        return max(0, self.size - SEG_HDR_LEN)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "crc32c": self.crc32c,
                "mtime_ns": self.mtime_ns}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SegmentEntry:
        return cls(str(d["name"]), int(d["size"]), int(d["crc32c"]), int(d.get("mtime_ns", 0)))


@dataclass(frozen=True)
class Manifest:
    barcode: str
    cartridge: dict[str, Any]
    segments: tuple[SegmentEntry, ...]
    complete: bool = False

    @property
    def cloud_bytes(self) -> int:
        return sum(s.data_bytes for s in self.segments)

    def encode(self) -> bytes:
        return json.dumps({
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "barcode": self.barcode,
            "complete": self.complete, "cartridge": self.cartridge,
            "segments": [s.to_json() for s in self.segments]}, indent=1).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Manifest:
        d = json.loads(raw)
        if d.get("format") != MANIFEST_FORMAT:
            raise ValueError("not a vtl tape manifest")
        if d.get("version") != MANIFEST_VERSION:
            raise ValueError(f"unsupported manifest version {d.get('version')}")
        return cls(str(d["barcode"]), dict(d.get("cartridge") or {}),
                   tuple(SegmentEntry.from_json(s) for s in d.get("segments", [])),
                   bool(d.get("complete")))


def load_manifest(store: ObjectStore, barcode: str) -> Manifest | None:
    try:
        return Manifest.decode(store.get_object(manifest_key(barcode)))
    except ObjectNotFound:
        return None


def local_segments(tape_dir: Path) -> list[Path]:
    """The segment files of a cartridge directory, in order (evicted ones excluded)."""
    if not tape_dir.is_dir():
        return []
    return sorted(p for p in tape_dir.iterdir() if _SEG_NAME.match(p.name))


def all_segments(tape_dir: Path) -> list[Path]:
    """The segments of a cartridge, local or evicted (path of the segment file either way)."""
    names = {p.name for p in local_segments(tape_dir)}
    names |= {p.name[:-len(EVICTED_SUFFIX)] for p in evicted_stubs(tape_dir)}
    return [tape_dir / n for n in sorted(names)]


def _file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            crc = crc32c_extend(crc, chunk)
    return crc


def crc32c_extend(crc: int, data: bytes) -> int:
    return int(_crc32c.crc32c(data, crc))


Progress = Callable[[int], None]


class Stopped(Exception):
    """The appliance is stopping: the step ends between segments (the job resumes later)."""


def upload_tape(store: ObjectStore, barcode: str, tape_dir: Path, *, final: bool,
                progress: Progress | None = None,
                stopping: Callable[[], bool] | None = None) -> Manifest:
    """Upload what the store lacks of a tape; return the manifest written.

    ``final`` (the tape left the library, nothing writes it) uploads every segment including
    the last one and marks the manifest complete; otherwise only sealed segments (all but the
    last) are uploaded. ``progress(cloud_bytes)`` is called after each segment.
    """
    old = load_manifest(store, barcode)
    known = {s.name: s for s in (old.segments if old else ())}
    segs = all_segments(tape_dir)
    candidates = segs if final else segs[:-1]
    meta = json.loads((tape_dir / "cartridge.json").read_bytes())
    entries: list[SegmentEntry] = []
    evicted = {stub.name[:-len(EVICTED_SUFFIX)]: stub for stub in evicted_stubs(tape_dir)}
    for path in candidates:
        if stopping is not None and stopping():
            raise Stopped(f"upload of {barcode} interrupted by shutdown")
        if path.name in evicted:  # in the store already; only a stub is left here
            entries.append(SegmentEntry.from_json(json.loads(evicted[path.name].read_text())))
            continue
        before = path.stat()
        prior = known.get(path.name)
        if prior is not None and prior.size == before.st_size and prior.mtime_ns == before.st_mtime_ns:
            entries.append(prior)
            continue
        crc = _file_crc(path)
        if prior is not None and prior.size == before.st_size and prior.crc32c == crc:
            entries.append(SegmentEntry(path.name, before.st_size, crc, before.st_mtime_ns))
            continue
        store.put_file(segment_key(barcode, path.name), path,
                       metadata={"crc32c": str(crc), "barcode": barcode})
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            break  # overwritten while uploading: the next pass uploads the new content
        entries.append(SegmentEntry(path.name, before.st_size, crc, before.st_mtime_ns))
        if progress is not None:
            progress(sum(e.data_bytes for e in entries))
    names = {e.name for e in entries}
    complete = final and len(entries) == len(segs)
    manifest = Manifest(barcode, meta, tuple(entries), complete)
    store.put_object(manifest_key(barcode), manifest.encode(),
                     metadata={"barcode": barcode})
    stale = [segment_key(barcode, n) for n in known if n not in names
             and (final or not any(p.name == n for p in segs))]
    if stale:
        store.delete_objects(stale)
    if progress is not None:
        progress(manifest.cloud_bytes)
    return manifest


def transition_tape(store: ObjectStore, manifest: Manifest, storage_class: StorageClass) -> list[str]:
    """Move a tape's segment objects to ``storage_class``; return keys that still need a
    restore before they can be copied (archived in another class)."""
    from vtl.cloud.store import ObjectArchived

    pending: list[str] = []
    for seg in manifest.segments:
        key = segment_key(manifest.barcode, seg.name)
        info = store.head_object(key)
        if info.storage_class is storage_class:
            continue
        try:
            store.copy_object(key, key, storage_class=storage_class)
        except ObjectArchived:
            pending.append(key)
    return pending


def _readable(store: ObjectStore, key: str) -> bool:
    """A GET of the object would work now. The object's head says so for restored or
    non-archived objects; otherwise a one-byte ranged GET asks the server itself, because some
    S3-compatible servers (SeaweedFS) record GLACIER/DEEP_ARCHIVE but serve the bytes anyway
    and refuse RestoreObject."""
    from vtl.cloud.store import ObjectArchived

    if store.head_object(key).readable:
        return True
    try:
        store.get_object(key, byte_range=(0, 0))
    except ObjectArchived:
        return False
    return True


def request_restores(store: ObjectStore, manifest: Manifest, days: int) -> None:
    """Ask for a readable copy of every archived segment object (idempotent)."""
    for seg in manifest.segments:
        key = segment_key(manifest.barcode, seg.name)
        if not _readable(store, key):
            store.restore_object(key, days=days)


def restores_done(store: ObjectStore, manifest: Manifest) -> bool:
    return all(_readable(store, segment_key(manifest.barcode, s.name)) for s in manifest.segments)


def download_tape(store: ObjectStore, manifest: Manifest, tape_dir: Path, *,
                  stopping: Callable[[], bool] | None = None) -> None:
    """Rebuild the cartridge directory from the store (atomically: temp dir, then rename)."""
    tmp = tape_dir.with_name(tape_dir.name + ".retrieving")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for seg in manifest.segments:
        if stopping is not None and stopping():
            raise Stopped(f"download of {manifest.barcode} interrupted by shutdown")
        path = tmp / seg.name
        crc = 0
        with store.open_object(segment_key(manifest.barcode, seg.name)) as src, open(path, "wb") as dst:
            while chunk := src.read(_READ_CHUNK):
                crc = crc32c_extend(crc, chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        if crc != seg.crc32c or path.stat().st_size != seg.size:
            raise ValueError(f"segment {seg.name} of {manifest.barcode} fails its checksum")
    (tmp / "cartridge.json").write_text(json.dumps(manifest.cartridge))
    shutil.rmtree(tape_dir, ignore_errors=True)
    os.replace(tmp, tape_dir)


def delete_tape_objects(store: ObjectStore, barcode: str) -> int:
    keys = [e.key for e in store.list_objects(tape_prefix(barcode)) if hasattr(e, "key")]
    if keys:
        store.delete_objects(keys)
    return len(keys)


# --- the local copy as a cache: eviction and read-back ----------------------------------------
RANGE_SIZE = 8 << 20


def evicted_stubs(tape_dir: Path) -> list[Path]:
    """Stubs of segments evicted from the cache (``seg-NNNNNN.dat.evicted``), in order."""
    if not tape_dir.is_dir():
        return []
    return sorted(p for p in tape_dir.iterdir() if p.name.endswith(EVICTED_SUFFIX))


def evict_segment(path: Path, entry: SegmentEntry) -> int:
    """Replace an uploaded segment file by a stub; return the bytes freed (0 if it changed).

    Only a file whose size and mtime still match its manifest entry is evicted, so the store
    holds exactly its bytes. The stub is written (durably) before the file goes.
    """
    st = path.stat()
    if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
        return 0
    stub = path.with_name(path.name + EVICTED_SUFFIX)
    with open(stub, "w", encoding="ascii") as f:
        json.dump(entry.to_json(), f)
        f.flush()
        os.fsync(f.fileno())
    path.unlink()
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return entry.size


def hydrate_tape(store: ObjectStore, barcode: str, tape_dir: Path) -> int:
    """Fetch every evicted segment back with ranged GETs; return the bytes read.

    Each segment is rebuilt in a temporary file from ``RANGE_SIZE`` ranges, checked against the
    CRC32C of its manifest entry, then renamed into place (keeping the recorded mtime, so the
    entry still matches and the segment stays evictable), and its stub removed.
    """
    total = 0
    for stub in evicted_stubs(tape_dir):
        entry = SegmentEntry.from_json(json.loads(stub.read_text()))
        final = tape_dir / entry.name
        tmp = tape_dir / (entry.name + ".hydrating")
        key = segment_key(barcode, entry.name)
        crc = 0
        with open(tmp, "wb") as f:
            for first in range(0, entry.size, RANGE_SIZE):
                chunk = store.get_object(key, byte_range=(first, min(first + RANGE_SIZE, entry.size) - 1))
                crc = crc32c_extend(crc, chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if crc != entry.crc32c or tmp.stat().st_size != entry.size:
            tmp.unlink()
            raise ValueError(f"segment {entry.name} of {barcode} fails its checksum")
        os.utime(tmp, ns=(entry.mtime_ns, entry.mtime_ns))
        os.replace(tmp, final)
        stub.unlink()
        total += entry.size
    return total
