"""Volume data in the object store: content-addressed chunks and versioned snapshot manifests.

CONTRACT shared by ``volumes/snapshots.py`` (stored-volume snapshots, restore), ``volumes/cached.py``
(cached volumes: primary data in the store) and ``volumes/service.py``. The signatures below are
fixed; the bodies are filled in by the snapshot helper first thing.

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
  (the caller passes the live set; see :meth:`ChunkStore.collect`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vtl.cloud.store import ObjectStore, StoreError

CHUNK_BYTES = 1024 * 1024
"""Snapshot/cache granularity: 1 MiB (a 32 TiB volume has 32 Mi chunks)."""

ChunkRef = str
"""SHA-256 hex digest of a chunk's bytes."""


class ChunkCorrupt(StoreError):
    code = "ChunkCorrupt"


@dataclass(frozen=True)
class Manifest:
    """A snapshot: which chunk holds each CHUNK_BYTES of the volume. Versioned binary format."""

    snapshot_id: str
    volume: str
    size_bytes: int
    created_at: str
    description: str
    chunk_bytes: int
    chunks: Sequence[ChunkRef | None]  # len == ceil(size_bytes / chunk_bytes)

    def encode(self) -> bytes:
        """Magic ``VTLSNAP`` + version + JSON header + 32-byte digests (zeros = None) + CRC32C."""
        raise NotImplementedError

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Raises ChunkCorrupt on a bad magic, version, length or checksum."""
        raise NotImplementedError


class ChunkStore:
    """Chunks and manifests of volumes in one object store under ``prefix``."""

    def __init__(self, store: ObjectStore, prefix: str = "volumes/") -> None:
        self.store = store
        self.prefix = prefix

    def put(self, data: bytes | memoryview) -> ChunkRef | None:
        """Store a chunk unless present (HEAD first) or all zeros; return its reference."""
        raise NotImplementedError

    def get(self, ref: ChunkRef | None, length: int = CHUNK_BYTES) -> bytes:
        """The chunk's bytes (``None``: ``length`` zeros); verified against its digest."""
        raise NotImplementedError

    def put_manifest(self, manifest: Manifest) -> None: ...

    def get_manifest(self, snapshot_id: str) -> Manifest: ...

    def delete_manifest(self, snapshot_id: str) -> None: ...

    def list_manifests(self) -> list[str]: ...

    def collect(self, live: Iterable[ChunkRef]) -> int:
        """Delete every stored chunk not in ``live``; return how many were deleted."""
        raise NotImplementedError
