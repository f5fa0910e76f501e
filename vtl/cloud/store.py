"""The object store interface of the cloud tier: small, S3-shaped, backend-neutral.

Everything above the cloud tier (upload/archive/retrieve jobs, volumes, the file share) talks to
an :class:`ObjectStore`; two backends implement it: :class:`vtl.cloud.local.LocalStore` (the
embedded directory "bucket", the default) and :class:`vtl.cloud.s3.S3Store` (AWS S3 or any
S3-compatible server; the only module that imports boto3).

Invariants every backend keeps (the contract suite in ``tests/cloud`` holds them):

- Keys are non-empty UTF-8 strings of at most 1,024 bytes, compared and listed in code-point
  order (which is UTF-8 byte order, as S3 lists).
- A PUT is atomic: a reader sees the old object or the new one, never a mix; a failed upload
  leaves nothing behind (no partial object, no unfinished multipart upload).
- A GET of an object in an archive class (GLACIER, DEEP_ARCHIVE) without a finished restore
  raises :class:`ObjectArchived`; a restore is ``ongoing`` until its ready time, then
  ``available`` until its expiry, then the object is archived-only again.
- Errors are ours: :class:`ObjectNotFound`, :class:`ObjectArchived`, :class:`StoreUnavailable`
  (transient: endpoint down, network, 5xx, throttling; retry later), :class:`InvalidKey`, and
  :class:`StoreError` for everything else. Each carries an S3-style ``code`` as data.
"""

from __future__ import annotations

import enum
import io
import re
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, BinaryIO, Protocol, runtime_checkable

from vtl.errors import ApplianceError

if TYPE_CHECKING:
    from vtl.cloud.clock import Clock

MiB = 1024 * 1024
MAX_KEY_BYTES = 1024
MAX_METADATA_BYTES = 2048  # S3's limit for the user-defined metadata of one object

ProgressCallback = Callable[[int], None]
"""Called from the calling thread with the cumulative number of bytes stored so far."""

ByteRange = tuple[int, int]
"""``(first, last)`` byte offsets, both inclusive, like an HTTP ``Range: bytes=first-last``."""


# --------------------------------------------------------------------------------------- errors


class StoreError(ApplianceError):
    """An object store request failed for a reason a retry will not fix."""

    code = "StoreError"
    retryable = False
    """True for errors a later retry of the same request may cure (StoreUnavailable)."""

    def __init__(self, message: str, *, code: str | None = None, key: str | None = None) -> None:
        super().__init__(message, code=code)
        self.key = key


class ObjectNotFound(StoreError):
    """No object under this key (S3 ``NoSuchKey`` / 404)."""

    code = "NoSuchKey"


class ObjectArchived(StoreError):
    """The object sits in an archive class and has no finished restore (``InvalidObjectState``)."""

    code = "InvalidObjectState"


class StoreUnavailable(StoreError):
    """The store cannot be reached or is overloaded (network, timeouts, 5xx, throttling).

    Transient by nature: jobs catch it, back off and retry; nothing was changed by the
    failed request as far as the caller can tell (uploads are aborted).
    """

    code = "StoreUnavailable"
    retryable = True


class InvalidKey(StoreError):
    """The key (or metadata) cannot be stored: empty, too long, NUL, ``..``, absolute..."""

    code = "InvalidKey"


# --------------------------------------------------------------------------------------- values


class StorageClass(enum.Enum):
    """The storage classes the appliance uses; values are the S3 names."""

    STANDARD = "STANDARD"
    GLACIER = "GLACIER"
    DEEP_ARCHIVE = "DEEP_ARCHIVE"

    @property
    def archived(self) -> bool:
        """True for classes whose objects must be restored before a GET."""
        return self is not StorageClass.STANDARD

    @classmethod
    def from_s3(cls, name: str | None) -> StorageClass:
        """Map an S3 storage-class name; absent means STANDARD.

        Other immediately readable S3 classes (STANDARD_IA, GLACIER_IR, INTELLIGENT_TIERING...)
        map to STANDARD: for the appliance they behave alike (a GET works).
        """
        if name in (None, "", "STANDARD"):
            return cls.STANDARD
        if name == "GLACIER":
            return cls.GLACIER
        if name == "DEEP_ARCHIVE":
            return cls.DEEP_ARCHIVE
        return cls.STANDARD


class RestoreTier(enum.Enum):
    """S3 restore (retrieval) tiers; values are the S3 names."""

    EXPEDITED = "Expedited"
    STANDARD = "Standard"
    BULK = "Bulk"


class RestoreState(enum.Enum):
    """Where a restore of an archived object stands."""

    ONGOING = "ongoing"
    AVAILABLE = "available"


@dataclass(frozen=True)
class Restore:
    """The restore status of an archived object (S3's ``x-amz-restore`` header).

    ``expiry`` is when the restored copy goes away again (known once AVAILABLE);
    ``ready_at`` is when an ONGOING restore completes, if the backend knows it (LocalStore does,
    S3 does not tell).
    """

    state: RestoreState
    expiry: datetime | None = None
    ready_at: datetime | None = None


class ChecksumAlgorithm(enum.Enum):
    """Whole-object checksums the stores compute or ask the server for."""

    CRC32C = "CRC32C"
    SHA256 = "SHA256"


@dataclass(frozen=True)
class Checksum:
    """A checksum as S3 reports it: base64 of the big-endian digest.

    For S3 multipart uploads the value is S3's *composite* checksum (checksum of the part
    checksums) and ends with ``-<parts>``; compare checksums only within one backend.
    """

    algorithm: ChecksumAlgorithm
    value: str


@dataclass(frozen=True)
class ObjectInfo:
    """What the store knows about one object.

    Entries from :meth:`ObjectStore.list_objects` carry key, size, etag, storage class and
    last-modified only (``metadata`` empty, ``checksum``/``restore``/``encryption`` None), as
    an S3 listing does; ask :meth:`ObjectStore.head_object` for the rest.
    """

    key: str
    size: int
    etag: str
    storage_class: StorageClass
    last_modified: datetime
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    checksum: Checksum | None = None
    restore: Restore | None = None
    server_side_encryption: str | None = None

    @property
    def readable(self) -> bool:
        """True if a GET would return the data now (not archived, or restored)."""
        if not self.storage_class.archived:
            return True
        return self.restore is not None and self.restore.state is RestoreState.AVAILABLE


@dataclass(frozen=True)
class CommonPrefix:
    """A "directory" rolled up by a listing with a delimiter (S3 ``CommonPrefixes``)."""

    prefix: str


ListEntry = ObjectInfo | CommonPrefix


@dataclass(frozen=True)
class MultipartUpload:
    """An unfinished multipart upload (S3 only)."""

    key: str
    upload_id: str
    initiated: datetime


# ------------------------------------------------------------------------------------- protocol


@runtime_checkable
class ObjectStore(Protocol):
    """The interface of the cloud tier. See the module docstring for the invariants."""

    def put_object(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        storage_class: StorageClass = StorageClass.STANDARD,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Store ``data`` (bytes, or a binary file-like read to its end) under ``key``."""
        ...

    def put_file(
        self,
        key: str,
        path: str | Path,
        *,
        storage_class: StorageClass = StorageClass.STANDARD,
        metadata: Mapping[str, str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> ObjectInfo:
        """Store the file at ``path`` (multipart with parallel parts where the backend has it)."""
        ...

    def get_object(self, key: str, *, byte_range: ByteRange | None = None) -> bytes:
        """Return the object's bytes, or the inclusive ``byte_range`` of them."""
        ...

    def open_object(self, key: str, *, byte_range: ByteRange | None = None) -> io.BufferedIOBase:
        """Open a streaming reader over the object (or a range of it); close it after use."""
        ...

    def head_object(self, key: str) -> ObjectInfo:
        """Describe the object: size, etag, class, metadata, checksum, restore state."""
        ...

    def list_objects(self, prefix: str = "", delimiter: str | None = None) -> Iterator[ListEntry]:
        """Yield objects (and, with a delimiter, common prefixes) in key order."""
        ...

    def delete_object(self, key: str) -> None:
        """Delete the object; deleting a missing key is not an error (as in S3)."""
        ...

    def delete_objects(self, keys: Sequence[str]) -> None:
        """Delete many objects; raises :class:`StoreError` naming the keys that failed."""
        ...

    def copy_object(
        self,
        src: str,
        dst: str,
        *,
        storage_class: StorageClass = StorageClass.STANDARD,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Copy ``src`` to ``dst`` (may be the same key, to change the storage class).

        Metadata is copied unless ``metadata`` replaces it. As in S3, an archived source must
        be restored first (else :class:`ObjectArchived`). Copying a key onto itself unchanged is
        allowed (S3 accepts it because every copy re-asserts SSE-S3): it rewrites the object.
        """
        ...

    def restore_object(self, key: str, *, days: int, tier: RestoreTier = RestoreTier.STANDARD) -> bool:
        """Ask for a temporary readable copy of an archived object for ``days`` days.

        Returns True if a new restore started, False if one is already ongoing or the object
        is already restored (its expiry is then extended, as S3 does). Idempotent for jobs.
        """
        ...


# ------------------------------------------------------------------------------------- helpers


_COMPONENT_FORBIDDEN = {".", ".."}


def validate_key(key: str) -> str:
    """Check a key against the rules every backend enforces; return it unchanged.

    Rejects: non-str, empty, over 1,024 UTF-8 bytes, unencodable (lone surrogates), NUL or other
    C0 control characters, a leading ``/`` (absolute), and ``.``/``..`` path components, which
    would escape or alias the local store's directory tree.
    """
    if not isinstance(key, str):
        raise InvalidKey(f"object key must be a str, not {type(key).__name__}")
    if not key:
        raise InvalidKey("object key is empty")
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKey("object key is not valid UTF-8 text", key=None) from None
    if len(encoded) > MAX_KEY_BYTES:
        raise InvalidKey(f"object key is {len(encoded)} bytes, at most {MAX_KEY_BYTES}", key=key)
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in key):
        raise InvalidKey("object key contains a control character (NUL, newline...)", key=key)
    if key.startswith("/"):
        raise InvalidKey("object key must be relative (no leading '/')", key=key)
    if any(part in _COMPONENT_FORBIDDEN for part in key.split("/")):
        raise InvalidKey("object key must not contain '.' or '..' path components", key=key)
    return key


_METADATA_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def validate_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Normalise user metadata as S3 stores it: lower-case ASCII names, printable ASCII values."""
    if not metadata:
        return {}
    out: dict[str, str] = {}
    total = 0
    for name, value in metadata.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidKey("metadata names and values must be str", key=None)
        lname = name.lower()
        if not _METADATA_NAME.match(lname):
            raise InvalidKey(f"metadata name {name!r} must be ASCII letters, digits, '.', '_', '-'")
        if any(not (0x20 <= ord(ch) < 0x7F) for ch in value):
            raise InvalidKey(f"metadata value of {name!r} must be printable ASCII")
        total += len(lname) + len(value)
        out[lname] = value
    if total > MAX_METADATA_BYTES:
        raise InvalidKey(f"metadata is {total} bytes, at most {MAX_METADATA_BYTES}")
    return out


def validate_range(byte_range: ByteRange | None) -> None:
    """Check the shape of a byte range (not its fit against the object's size)."""
    if byte_range is None:
        return
    first, last = byte_range
    if first < 0 or last < first:
        raise StoreError(f"invalid byte range {first}-{last}", code="InvalidRange")


def clip_range(byte_range: ByteRange, size: int, key: str) -> tuple[int, int]:
    """Return ``(offset, length)`` for a range on an object of ``size`` bytes, as S3 serves it.

    A range starting at or past the end is ``InvalidRange`` (HTTP 416); one running past the
    end is cut at the end.
    """
    first, last = byte_range
    if first >= size:
        raise StoreError(
            f"range {first}-{last} starts beyond the end of {key!r} ({size} bytes)",
            code="InvalidRange",
            key=key,
        )
    return first, min(last, size - 1) - first + 1


# ----------------------------------------------------------------------------------- store URLs


@dataclass(frozen=True)
class StoreUrl:
    """A parsed store location: ``s3://bucket/prefix`` or a local directory."""

    scheme: str  # "s3" or "file"
    bucket: str = ""
    prefix: str = ""
    path: Path | None = None
    endpoint_url: str | None = None
    region: str | None = None


def parse_store_url(url: str) -> StoreUrl:
    """Parse ``s3://bucket[/prefix][?endpoint=http://host:port&region=r]``, ``file:///dir`` or a
    plain directory path.

    The S3 prefix is normalised to end in ``/`` (or be empty), so ``s3://b/vtl`` and
    ``s3://b/vtl/`` name the same place.
    """
    if not url:
        raise StoreError("empty store URL: give s3://bucket/prefix or a directory", code="InvalidArgument")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "s3":
        bucket = parts.netloc
        if not bucket:
            raise StoreError(f"store URL {url!r} names no bucket: use s3://bucket/prefix", code="InvalidArgument")
        prefix = parts.path.lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        query = urllib.parse.parse_qs(parts.query)
        unknown = set(query) - {"endpoint", "endpoint_url", "region"}
        if unknown:
            raise StoreError(f"store URL {url!r}: unknown option(s) {sorted(unknown)}", code="InvalidArgument")
        endpoint = (query.get("endpoint") or query.get("endpoint_url") or [""])[0] or None
        region = (query.get("region") or [""])[0] or None
        return StoreUrl("s3", bucket=bucket, prefix=prefix, endpoint_url=endpoint, region=region)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StoreError(f"store URL {url!r}: file URLs must be file:///absolute/path", code="InvalidArgument")
        return StoreUrl("file", path=Path(urllib.parse.unquote(parts.path)))
    if parts.scheme and len(parts.scheme) > 1:  # "C:" style drive letters are not schemes
        raise StoreError(f"store URL {url!r}: unsupported scheme {parts.scheme!r} (use s3:// or a path)", code="InvalidArgument")
    return StoreUrl("file", path=Path(url))


def open_store(url: str, *, clock: Clock | None = None, **options: object) -> ObjectStore:
    """Build the store a URL names. ``options`` go to the backend's constructor.

    boto3 is imported only when an ``s3://`` URL is opened.
    """
    parsed = parse_store_url(url)
    if parsed.scheme == "s3":
        from vtl.cloud.s3 import S3Store

        kwargs: dict[str, object] = {"endpoint_url": parsed.endpoint_url, "region": parsed.region}
        kwargs.update(options)
        return S3Store(parsed.bucket, parsed.prefix, clock=clock, **kwargs)  # type: ignore[arg-type]
    from vtl.cloud.local import LocalStore

    assert parsed.path is not None
    return LocalStore(parsed.path, clock=clock, **options)  # type: ignore[arg-type]
