"""Volume data in the object store: content-addressed chunks and versioned snapshot manifests.

Shared by ``volumes/snapshots.py`` (stored-volume snapshots, restore), ``volumes/cached.py``
(cached volumes: primary data in the store) and ``volumes/service.py``.

Layout in the object store (every PUT carries SSE-S3 through the store backend):
- ``<prefix>chunks/<h[:2]>/<h>``: one chunk of at most :data:`CHUNK_BYTES`, named by the SHA-256
  ``h`` of its bytes (hex). A chunk is immutable; equal data is stored once, so an unchanged chunk
  is never uploaded twice (incremental snapshots) and snapshots/volumes share chunks.
  An all-zero chunk is never stored: its reference is ``None``.
- ``<prefix>snapshots/<snapshot-id>.manifest``: a :class:`Manifest`, written last, after every
  chunk it names is in the store, so a snapshot is visible whole or not at all.

Invariants:
- ``get`` verifies the SHA-256 of what it read (:class:`ChunkCorrupt` otherwise).
- Garbage collection deletes a chunk only if no manifest and no cached volume map names it
  (the caller passes the live set; see :meth:`ChunkStore.collect`). Because ``put`` skips a
  chunk that is already present, the live set must also hold the chunks of every snapshot
  still uploading (its manifest is not written yet) and of every cached volume's pending map;
  the caller serialises ``collect`` against those writers.

Manifest object format (version 1, all integers big-endian):

    magic  b"VTLSNAP\0"            8 bytes
    version u16 | header length u32
    header  UTF-8 JSON object: snapshot_id, volume, size_bytes, created_at, description,
            chunk_bytes, count
    digests count x 32 bytes (SHA-256; 32 zero bytes mean "all-zero chunk", reference None)
    crc     u32 CRC32C of every byte before it
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import crc32c as _crc32c

from vtl.cloud.store import ObjectInfo, ObjectNotFound, ObjectStore, StoreError

CHUNK_BYTES = 1024 * 1024
"""Snapshot/cache granularity: 1 MiB (a 32 TiB volume has 32 Mi chunks)."""

ChunkRef = str
"""SHA-256 hex digest of a chunk's bytes."""

MANIFEST_MAGIC = b"VTLSNAP\0"
MANIFEST_VERSION = 1
_PREAMBLE = struct.Struct(">8sHI")
assert _PREAMBLE.size == 14
_CRC = struct.Struct(">I")
_DIGEST = 32
_NO_CHUNK = bytes(_DIGEST)
_MAX_HEADER = 64 * 1024
_REF = re.compile(r"^[0-9a-f]{64}$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DELETE_BATCH = 1000  # S3 DeleteObjects takes at most 1,000 keys


class ChunkCorrupt(StoreError):
    code = "ChunkCorrupt"


def chunk_ref(data: bytes | bytearray | memoryview) -> ChunkRef | None:
    """The reference ``put`` would give ``data``: its SHA-256 hex, or None if all zeros."""
    view = memoryview(data).cast("B")
    if is_zero(view):
        return None
    return hashlib.sha256(view).hexdigest()


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True if every byte is zero (an empty buffer counts as zero)."""
    view = memoryview(data).cast("B")
    n = len(view)
    if n == 0:
        return True
    # Compare against a zero buffer block by block: fast in C, no big allocation.
    step = min(n, 64 * 1024)
    zeros = bytes(step)
    for at in range(0, n, step):
        part = view[at:at + step]
        if part != zeros[:len(part)]:
            return False
    return True


def chunk_count(size_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """How many chunks cover ``size_bytes``."""
    return -(-size_bytes // chunk_bytes)


def valid_snapshot_id(snapshot_id: str) -> bool:
    """Snapshot ids are 1-128 of ``[A-Za-z0-9._-]`` starting with a letter or digit."""
    return isinstance(snapshot_id, str) and bool(_ID.match(snapshot_id))


@dataclass(frozen=True)
class Manifest:
    """A snapshot: which chunk holds each CHUNK_BYTES of the volume. Versioned binary format."""

    snapshot_id: str
    volume: str
    size_bytes: int
    created_at: str
    description: str
    chunk_bytes: int
    chunks: Sequence[ChunkRef | None] = field(hash=False)  # len == ceil(size_bytes / chunk_bytes)

    def __post_init__(self) -> None:
        if not valid_snapshot_id(self.snapshot_id):
            raise ValueError(f"invalid snapshot id {self.snapshot_id!r}")
        if self.size_bytes < 0 or self.chunk_bytes <= 0:
            raise ValueError("size_bytes must be >= 0 and chunk_bytes > 0")
        if len(self.chunks) != chunk_count(self.size_bytes, self.chunk_bytes):
            raise ValueError(f"{len(self.chunks)} chunk references for {self.size_bytes} bytes "
                             f"in chunks of {self.chunk_bytes}")
        for ref in self.chunks:
            if ref is not None and not (isinstance(ref, str) and _REF.match(ref)):
                raise ValueError(f"invalid chunk reference {ref!r}")

    def refs(self) -> set[ChunkRef]:
        """The distinct chunks this manifest names (zero chunks left out)."""
        return {r for r in self.chunks if r is not None}

    def chunk_length(self, index: int) -> int:
        """Bytes of the volume that chunk ``index`` covers (the last one may be short)."""
        return min(self.chunk_bytes, self.size_bytes - index * self.chunk_bytes)

    def encode(self) -> bytes:
        """Magic ``VTLSNAP`` + version + JSON header + 32-byte digests (zeros = None) + CRC32C."""
        header = json.dumps({
            "snapshot_id": self.snapshot_id, "volume": self.volume,
            "size_bytes": self.size_bytes, "created_at": self.created_at,
            "description": self.description, "chunk_bytes": self.chunk_bytes,
            "count": len(self.chunks),
        }, sort_keys=True, separators=(",", ":")).encode()
        digests = b"".join(_NO_CHUNK if r is None else bytes.fromhex(r) for r in self.chunks)
        body = _PREAMBLE.pack(MANIFEST_MAGIC, MANIFEST_VERSION, len(header)) + header + digests
        return body + _CRC.pack(_crc32c.crc32c(body))

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Raises ChunkCorrupt on a bad magic, version, length or checksum."""
        view = memoryview(data).cast("B")
        if len(view) < _PREAMBLE.size + _CRC.size:
            raise ChunkCorrupt(f"manifest of {len(view)} bytes is too short")
        magic, version, hlen = _PREAMBLE.unpack_from(view)
        if magic != MANIFEST_MAGIC:
            raise ChunkCorrupt("not a snapshot manifest (bad magic)")
        if version != MANIFEST_VERSION:
            raise ChunkCorrupt(f"manifest version {version} is not supported (this is "
                               f"{MANIFEST_VERSION})")
        (crc,) = _CRC.unpack_from(view, len(view) - _CRC.size)
        if crc != _crc32c.crc32c(view[:-_CRC.size]):
            raise ChunkCorrupt("manifest checksum mismatch")
        if hlen > _MAX_HEADER or _PREAMBLE.size + hlen > len(view) - _CRC.size:
            raise ChunkCorrupt(f"manifest header length {hlen} runs past the data")
        try:
            head = json.loads(bytes(view[_PREAMBLE.size:_PREAMBLE.size + hlen]))
            count = head["count"]
            fields = {k: head[k] for k in ("snapshot_id", "volume", "size_bytes", "created_at",
                                           "description", "chunk_bytes")}
        except (ValueError, KeyError, TypeError) as exc:
            raise ChunkCorrupt(f"manifest header is malformed: {exc}") from None
        if not isinstance(count, int) or count < 0:
            raise ChunkCorrupt("manifest chunk count is malformed")
        start = _PREAMBLE.size + hlen
        if len(view) - _CRC.size - start != count * _DIGEST:
            raise ChunkCorrupt(f"manifest holds {len(view) - _CRC.size - start} digest bytes, "
                               f"header says {count} chunks")
        raw = bytes(view[start:start + count * _DIGEST])
        chunks: list[ChunkRef | None] = []
        for at in range(0, len(raw), _DIGEST):
            d = raw[at:at + _DIGEST]
            chunks.append(None if d == _NO_CHUNK else d.hex())
        try:
            return cls(chunks=chunks, **fields)
        except (ValueError, TypeError) as exc:
            raise ChunkCorrupt(f"manifest is inconsistent: {exc}") from None


class ChunkStore:
    """Chunks and manifests of volumes in one object store under ``prefix``.

    Thread-safe as far as the underlying store is (every method is a few independent requests).
    ``uploaded``/``uploaded_bytes`` count the chunk PUTs this instance actually made (HEAD hits
    and zero chunks do not count), for progress and tests.
    """

    def __init__(self, store: ObjectStore, prefix: str = "volumes/") -> None:
        self.store = store
        self.prefix = prefix
        self.uploaded = 0
        self.uploaded_bytes = 0

    # --- keys -------------------------------------------------------------------------------
    def chunk_key(self, ref: ChunkRef) -> str:
        if not (isinstance(ref, str) and _REF.match(ref)):
            raise ChunkCorrupt(f"invalid chunk reference {ref!r}")
        return f"{self.prefix}chunks/{ref[:2]}/{ref}"

    def manifest_key(self, snapshot_id: str) -> str:
        if not valid_snapshot_id(snapshot_id):
            raise StoreError(f"invalid snapshot id {snapshot_id!r}", code="InvalidArgument")
        return f"{self.prefix}snapshots/{snapshot_id}.manifest"

    # --- chunks -----------------------------------------------------------------------------
    def has(self, ref: ChunkRef) -> bool:
        """True if the chunk is in the store (a HEAD)."""
        try:
            self.store.head_object(self.chunk_key(ref))
        except ObjectNotFound:
            return False
        return True

    def put(self, data: bytes | memoryview) -> ChunkRef | None:
        """Store a chunk unless present (HEAD first) or all zeros; return its reference."""
        view = memoryview(data).cast("B")
        if len(view) > CHUNK_BYTES:
            raise ValueError(f"chunk of {len(view)} bytes, at most {CHUNK_BYTES}")
        ref = chunk_ref(view)
        if ref is None or self.has(ref):
            return ref
        self.store.put_object(self.chunk_key(ref), bytes(view))
        self.uploaded += 1
        self.uploaded_bytes += len(view)
        return ref

    def get(self, ref: ChunkRef | None, length: int = CHUNK_BYTES) -> bytes:
        """The chunk's bytes (``None``: ``length`` zeros); verified against its digest.

        A stored chunk shorter than ``length`` (the last chunk of a volume) is padded with
        zeros to ``length``; a longer one is ChunkCorrupt.
        """
        if ref is None:
            return bytes(length)
        data = self.store.get_object(self.chunk_key(ref))
        if hashlib.sha256(data).hexdigest() != ref:
            raise ChunkCorrupt(f"chunk {ref} does not match its digest", key=self.chunk_key(ref))
        if len(data) > length:
            raise ChunkCorrupt(f"chunk {ref} holds {len(data)} bytes, expected at most {length}",
                               key=self.chunk_key(ref))
        return data if len(data) == length else data + bytes(length - len(data))

    def list_chunks(self) -> list[ObjectInfo]:
        """Every stored chunk object (key order)."""
        out: list[ObjectInfo] = []
        for entry in self.store.list_objects(f"{self.prefix}chunks/"):
            if isinstance(entry, ObjectInfo) and _REF.match(entry.key.rpartition("/")[2]):
                out.append(entry)
        return out

    # --- manifests --------------------------------------------------------------------------
    def put_manifest(self, manifest: Manifest) -> None:
        """Write the manifest (atomic PUT). The caller has stored every chunk it names."""
        self.store.put_object(self.manifest_key(manifest.snapshot_id), manifest.encode())

    def get_manifest(self, snapshot_id: str) -> Manifest:
        """Raises ObjectNotFound if absent, ChunkCorrupt if damaged or naming another id."""
        m = Manifest.decode(self.store.get_object(self.manifest_key(snapshot_id)))
        if m.snapshot_id != snapshot_id:
            raise ChunkCorrupt(f"manifest {snapshot_id} names snapshot {m.snapshot_id}",
                               key=self.manifest_key(snapshot_id))
        return m

    def has_manifest(self, snapshot_id: str) -> bool:
        try:
            self.store.head_object(self.manifest_key(snapshot_id))
        except ObjectNotFound:
            return False
        return True

    def delete_manifest(self, snapshot_id: str) -> None:
        """Delete the manifest (missing is fine); its chunks go at the next :meth:`collect`."""
        self.store.delete_object(self.manifest_key(snapshot_id))

    def list_manifests(self) -> list[str]:
        """Snapshot ids with a manifest in the store, sorted."""
        base = f"{self.prefix}snapshots/"
        out: list[str] = []
        for entry in self.store.list_objects(base):
            if isinstance(entry, ObjectInfo) and entry.key.endswith(".manifest"):
                sid = entry.key[len(base):-len(".manifest")]
                if valid_snapshot_id(sid):
                    out.append(sid)
        return sorted(out)

    def collect(self, live: Iterable[ChunkRef]) -> int:
        """Delete every stored chunk not in ``live``; return how many were deleted."""
        keep = set(live)
        doomed = [e.key for e in self.list_chunks() if e.key.rpartition("/")[2] not in keep]
        for at in range(0, len(doomed), _DELETE_BATCH):
            self.store.delete_objects(doomed[at:at + _DELETE_BATCH])
        return len(doomed)
