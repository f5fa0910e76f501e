"""The S3 backend: AWS S3 or any S3-compatible server. The ONLY module that imports boto3.

Invariants:

- Every write (PutObject, CreateMultipartUpload, CopyObject) asks for SSE-S3
  (``ServerSideEncryption="AES256"``).
- Integrity: uploads carry a CRC32C (or SHA-256) checksum the server verifies. A server that
  rejects the flexible-checksum headers (older S3-compatible servers) is detected on the first
  such error; the store then switches, for its lifetime, to a client that sends ``Content-MD5``
  instead and never adds checksum headers on its own.
- Multipart uploads run their parts on a thread pool (``max_concurrency`` parts in flight, so
  memory stays near ``max_concurrency * part_size``) and are aborted on any failure: no
  unfinished upload is left behind by us (if even the abort fails because the endpoint is gone,
  :meth:`S3Store.abort_stale_multipart_uploads` cleans up later; an S3 lifecycle rule
  "AbortIncompleteMultipartUpload" is the belt to these braces).
- A multipart upload whose abort failed (the endpoint went away mid-upload) is remembered and
  aborted again before the next upload and by :meth:`S3Store.abort_stale_multipart_uploads`,
  so an outage leaves no unfinished upload once the endpoint is back.
- ``upload_rate`` (bytes per second, optional) caps the upload bandwidth of the whole store
  (every part and single PUT takes its bytes from one token bucket), as a gateway's bandwidth
  rate limit does.
- Retries: botocore's adaptive mode with ``max_attempts`` and short connect/read timeouts, so an
  outage surfaces as :class:`StoreUnavailable` within seconds and the job layer decides when to
  try again.
- Errors map to ours: connection/timeouts/5xx/throttling -> StoreUnavailable; 404/NoSuchKey ->
  ObjectNotFound; InvalidObjectState -> ObjectArchived; credentials and everything else ->
  StoreError with the S3 code kept as ``code``.
- Keys live under ``prefix`` (normalised to end in ``/``); callers never see the prefix.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import hashlib
import io
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, TypeVar

import boto3
import crc32c
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    MissingDependencyException,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
)

from vtl.cloud.clock import Clock, SystemClock
from vtl.cloud.store import (
    MAX_KEY_BYTES,
    ByteRange,
    Checksum,
    ChecksumAlgorithm,
    CommonPrefix,
    InvalidKey,
    ListEntry,
    MiB,
    MultipartUpload,
    ObjectArchived,
    ObjectInfo,
    ObjectNotFound,
    ProgressCallback,
    Restore,
    RestoreState,
    RestoreTier,
    StorageClass,
    StoreError,
    StoreUnavailable,
    validate_key,
    validate_metadata,
    validate_range,
)

log = logging.getLogger(__name__)

SSE = "AES256"
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PARTS = 10_000
MAX_SINGLE_COPY = 5 * 1024 * MiB  # CopyObject limit; above it, copy in parts
DELETE_BATCH = 1000

_T = TypeVar("_T")

_UNAVAILABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "InternalError",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_ARCHIVED_CODES = frozenset({"InvalidObjectState", "ObjectNotInActiveTierError"})
_CHECKSUM_WORDS = ("checksum", "x-amz-", "trailer", "aws-chunked", "content-encoding", "crc")
_RESTORE_ONGOING = re.compile(r'ongoing-request\s*=\s*"(true|false)"', re.IGNORECASE)
_RESTORE_EXPIRY = re.compile(r'expiry-date\s*=\s*"([^"]+)"', re.IGNORECASE)


class _ChecksumRejected(Exception):
    """A server refused flexible checksums mid-upload; the store has degraded to Content-MD5."""


def parse_restore_header(value: str | None) -> Restore | None:
    """Parse S3's ``x-amz-restore``: ``ongoing-request="true"`` or
    ``ongoing-request="false", expiry-date="Fri, 21 Dec 2012 00:00:00 GMT"``."""
    if not value:
        return None
    ongoing = _RESTORE_ONGOING.search(value)
    if ongoing is None:
        return None
    if ongoing.group(1).lower() == "true":
        return Restore(RestoreState.ONGOING)
    expiry = _RESTORE_EXPIRY.search(value)
    when: datetime | None = None
    if expiry is not None:
        with contextlib.suppress(TypeError, ValueError):
            when = email.utils.parsedate_to_datetime(expiry.group(1)).astimezone(UTC)
    return Restore(RestoreState.AVAILABLE, expiry=when)


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii")


def _checksum_b64(algorithm: ChecksumAlgorithm, data: bytes) -> str:
    if algorithm is ChecksumAlgorithm.CRC32C:
        digest = crc32c.crc32c(data).to_bytes(4, "big")
    else:
        digest = hashlib.sha256(data).digest()
    return base64.b64encode(digest).decode("ascii")


def _etag(raw: str | None) -> str:
    return (raw or "").strip('"')


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    """Read ``size`` bytes, fewer only at end of stream."""
    chunks: list[bytes] = []
    left = size
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class _StreamReader(io.RawIOBase):
    """A raw reader over a botocore StreamingBody that raises our errors."""

    def __init__(self, body: Any, key: str, length: int) -> None:
        super().__init__()
        self._body = body
        self._key = key
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        if self._left <= 0:
            return 0
        want = min(len(buf), self._left)
        try:
            data = self._body.read(want)
        except (BotoCoreError, OSError) as exc:
            raise StoreUnavailable(f"reading {self._key!r} from S3 failed: {exc}", key=self._key) from exc
        if not data:
            raise StoreUnavailable(f"S3 response for {self._key!r} ended early", key=self._key)
        n = len(data)
        memoryview(buf)[:n] = data
        self._left -= n
        return n

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self._body.close()
        super().close()


class _Throttle:
    """A token bucket shared by the upload threads: ``take(n)`` sleeps until ``n`` bytes fit."""

    def __init__(self, rate: int) -> None:
        self.rate = float(rate)
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def take(self, nbytes: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + nbytes / self.rate
        if start > now:
            time.sleep(start - now)


class S3Store:
    """:class:`vtl.cloud.store.ObjectStore` on S3 (boto3), credentials from the standard chain."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_concurrency: int = 8,
        part_size: int = 16 * MiB,
        multipart_threshold: int | None = None,
        multipart_copy_threshold: int = MAX_SINGLE_COPY,
        max_attempts: int = 5,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        checksum_algorithm: ChecksumAlgorithm | None = ChecksumAlgorithm.CRC32C,
        clock: Clock | None = None,
        session: Any = None,
        upload_rate: int | None = None,
    ) -> None:
        """``checksum_algorithm=None`` sends Content-MD5 only (for servers known to lack
        flexible checksums). ``session`` is an optional ``boto3.Session`` (profiles, tests)."""
        if not bucket:
            raise StoreError("S3 store needs a bucket name", code="InvalidArgument")
        if part_size < MIN_PART_SIZE:
            raise StoreError(f"part size {part_size} is below S3's minimum of 5 MiB", code="InvalidArgument")
        if max_concurrency < 1:
            raise StoreError("max_concurrency must be at least 1", code="InvalidArgument")
        if upload_rate is not None and upload_rate < 1:
            raise StoreError("upload_rate must be at least 1 byte/s", code="InvalidArgument")
        self._throttle = _Throttle(upload_rate) if upload_rate else None
        self._unaborted: set[tuple[str, str]] = set()  # (full key, upload id) to abort again
        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.endpoint_url = endpoint_url
        self.max_concurrency = max_concurrency
        self.part_size = part_size
        self.multipart_threshold = multipart_threshold if multipart_threshold is not None else part_size
        self.multipart_copy_threshold = min(multipart_copy_threshold, MAX_SINGLE_COPY)
        self.checksum_algorithm = checksum_algorithm
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._checksums = checksum_algorithm is not None
        self._lock = threading.Lock()
        self._session = session if session is not None else boto3.session.Session(region_name=region)

        def config(checksums: bool) -> Config:
            return Config(
                region_name=region,
                retries={"mode": "adaptive", "max_attempts": max_attempts},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_pool_connections=max(10, max_concurrency * 2),
                s3={"addressing_style": "path" if endpoint_url else "auto"},
                request_checksum_calculation="when_supported" if checksums else "when_required",
                response_checksum_validation="when_supported" if checksums else "when_required",
            )

        self._config = config
        try:
            self._client = self._session.client("s3", endpoint_url=endpoint_url, config=config(self._checksums))
        except BotoCoreError as exc:
            raise self._map(exc, "connect", None) from exc
        self._legacy: Any = self._client if not self._checksums else None

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3Store(s3://{self.bucket}/{self.prefix}{where})"

    @property
    def checksums_supported(self) -> bool:
        """False once the server has refused flexible checksums (or they were turned off)."""
        return self._checksums

    # ------------------------------------------------------------------------------ plumbing

    def _legacy_client(self) -> Any:
        with self._lock:
            if self._legacy is None:
                self._legacy = self._session.client("s3", endpoint_url=self.endpoint_url, config=self._config(False))
            return self._legacy

    def _degrade(self, exc: ClientError) -> None:
        with self._lock:
            if self._checksums:
                log.warning(
                    "S3 endpoint %s refused flexible checksums (%s); using Content-MD5 from now on",
                    self.endpoint_url or "AWS",
                    exc.response.get("Error", {}).get("Code"),
                )
            self._checksums = False

    def _full_key(self, key: str) -> str:
        validate_key(key)
        full = self.prefix + key
        if len(full.encode("utf-8")) > MAX_KEY_BYTES:
            raise InvalidKey(f"key with store prefix is over {MAX_KEY_BYTES} bytes", key=key)
        return full

    def _map(self, exc: BaseException, op: str, key: str | None) -> StoreError:
        """Translate a boto3/botocore exception into ours (see module doc)."""
        if isinstance(exc, StoreError):
            return exc
        what = f"S3 {op}" + (f" of {key!r}" if key else "")
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "") or "")
            message = err.get("Message") or str(exc)
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in _NOT_FOUND_CODES:
                return ObjectNotFound(f"{what}: no such object", key=key)
            if code in _ARCHIVED_CODES:
                return ObjectArchived(f"{what}: the object is archived; restore it first", key=key)
            if code in _UNAVAILABLE_CODES or (status >= 500 and status != 501) or status == 429:
                return StoreUnavailable(f"{what}: S3 is unavailable ({code or status}: {message})", key=key)
            if code == "NoSuchBucket":
                return StoreError(f"bucket {self.bucket!r} does not exist: create it or fix the store URL", code=code, key=key)
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
                return StoreError(f"{what}: {code}: check the AWS credentials and bucket policy", code=code, key=key)
            return StoreError(f"{what}: {code or status}: {message}", code=code or "StoreError", key=key)
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(
                "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or an instance role",
                code="NoCredentials",
            )
        if isinstance(exc, (ParamValidationError, NoRegionError, MissingDependencyException)):
            return StoreError(f"{what}: {exc}", code="InvalidArgument", key=key)
        if isinstance(exc, (BotoCoreError, OSError)):
            where = self.endpoint_url or "AWS S3"
            return StoreUnavailable(f"{what}: cannot reach {where}: {exc}", key=key)
        return StoreError(f"{what}: {exc}", key=key)

    def _call(self, op: str, key: str | None, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except (BotoCoreError, ClientError, OSError) as exc:
            raise self._map(exc, op, key) from exc

    def _rejects_checksums(self, exc: BaseException) -> bool:
        if not self._checksums or not isinstance(exc, ClientError):
            return False
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if status not in (400, 501):
            return False
        if code in ("NotImplemented", "XAmzContentSHA256Mismatch"):
            return True
        message = str(err.get("Message", "")).lower()
        return code in ("InvalidArgument", "InvalidRequest", "BadRequest", "InvalidDigest") and any(
            word in message for word in _CHECKSUM_WORDS
        )

    def _write_call(self, op: str, key: str, fn: Callable[[Any, bool], _T]) -> _T:
        """Call ``fn(client, checksums)``; on a checksum refusal degrade and call once more."""
        checksums = self._checksums
        client = self._client if checksums else self._legacy_client()
        try:
            return fn(client, checksums)
        except ClientError as exc:
            if not (checksums and self._rejects_checksums(exc)):
                raise self._map(exc, op, key) from exc
            self._degrade(exc)
        except (BotoCoreError, OSError) as exc:
            raise self._map(exc, op, key) from exc
        return self._call(op, key, lambda: fn(self._legacy_client(), False))

    def _checksum_args(self, checksums: bool, body: bytes | None) -> dict[str, str]:
        """Request arguments carrying the body's checksum (ours, so botocore needs no CRT)."""
        algorithm = self.checksum_algorithm
        if checksums and algorithm is not None:
            args = {"ChecksumAlgorithm": algorithm.value}
            if body is not None:
                args[f"Checksum{algorithm.value}"] = _checksum_b64(algorithm, body)
            return args
        return {"ContentMD5": _md5_b64(body)} if body is not None else {}

    def _checksum_of(self, resp: Mapping[str, Any]) -> Checksum | None:
        for algorithm in (self.checksum_algorithm, ChecksumAlgorithm.CRC32C, ChecksumAlgorithm.SHA256):
            if algorithm is not None and resp.get(f"Checksum{algorithm.value}"):
                return Checksum(algorithm, str(resp[f"Checksum{algorithm.value}"]))
        return None

    def _server_time(self, resp: Mapping[str, Any]) -> datetime:
        date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if date:
            with contextlib.suppress(TypeError, ValueError):
                return email.utils.parsedate_to_datetime(date).astimezone(UTC)
        return self.clock.now()

    def _strip(self, full: str) -> str:
        return full[len(self.prefix) :] if self.prefix and full.startswith(self.prefix) else full

    # ------------------------------------------------------------------------------ writes

    def _put_single(
        self, key: str, body: bytes, storage_class: StorageClass, metadata: dict[str, str]
    ) -> ObjectInfo:
        full = self._full_key(key)
        if self._throttle is not None:
            self._throttle.take(len(body))

        def put(client: Any, checksums: bool) -> Any:
            return client.put_object(
                Bucket=self.bucket,
                Key=full,
                Body=body,
                StorageClass=storage_class.value,
                Metadata=metadata,
                ServerSideEncryption=SSE,
                **self._checksum_args(checksums, body),
            )

        resp = self._write_call("PutObject", key, put)
        return ObjectInfo(
            key=key,
            size=len(body),
            etag=_etag(resp.get("ETag")),
            storage_class=storage_class,
            last_modified=self._server_time(resp),
            metadata=MappingProxyType(dict(metadata)),
            checksum=self._checksum_of(resp),
            server_side_encryption=resp.get("ServerSideEncryption"),
        )

    def put_object(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        storage_class: StorageClass = StorageClass.STANDARD,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Single PUT up to ``multipart_threshold``; larger bodies and long streams go multipart."""
        self._full_key(key)
        user_meta = validate_metadata(metadata)
        if isinstance(data, (bytes, bytearray, memoryview)):
            body = bytes(data)
            if len(body) <= self.multipart_threshold:
                return self._put_single(key, body, storage_class, user_meta)
            stream: BinaryIO = io.BytesIO(body)
            part_size = self._part_size_for(len(body))
        else:
            stream = data
            part_size = self.part_size
        first = _read_exact(stream, part_size)
        if len(first) < part_size and len(first) <= self.multipart_threshold:
            return self._put_single(key, first, storage_class, user_meta)
        try:
            return self._multipart(key, first, stream, part_size, storage_class, user_meta, None)
        except _ChecksumRejected:
            raise StoreError(
                f"the S3 server refused checksums while uploading {key!r}; the store now uses "
                "Content-MD5: retry the upload",
                code="ChecksumUnsupported",
                key=key,
            ) from None

    def put_file(
        self,
        key: str,
        path: str | Path,
        *,
        storage_class: StorageClass = StorageClass.STANDARD,
        metadata: Mapping[str, str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> ObjectInfo:
        """Upload a file; above ``multipart_threshold`` in parallel parts. ``progress`` gets the
        cumulative bytes acknowledged by S3 (called from the calling thread)."""
        self._full_key(key)
        user_meta = validate_metadata(metadata)
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}", code="LocalIOError", key=key) from exc
        with f:
            size = Path(path).stat().st_size
            if size <= self.multipart_threshold:
                info = self._put_single(key, f.read(), storage_class, user_meta)
                if progress is not None:
                    progress(info.size)
                return info
            part_size = self._part_size_for(size)
            for attempt in (1, 2):
                f.seek(0)
                first = _read_exact(f, part_size)
                try:
                    return self._multipart(key, first, f, part_size, storage_class, user_meta, progress)
                except _ChecksumRejected:
                    if attempt == 2:
                        raise StoreError(f"S3 refused the upload of {key!r} twice", key=key) from None
            raise AssertionError("unreachable")

    def _part_size_for(self, size: int) -> int:
        """The configured part size, grown (in whole MiB) to stay within 10,000 parts."""
        part = self.part_size
        if -(-size // part) > MAX_PARTS:
            part = -(-size // MAX_PARTS)
            part = -(-part // MiB) * MiB
        return part

    def _upload_part(self, full: str, upload_id: str, number: int, body: bytes, checksums: bool) -> dict[str, Any]:
        """Upload one part (runs on a pool thread); raw botocore exceptions propagate."""
        if self._throttle is not None:
            self._throttle.take(len(body))
        client = self._client if checksums else self._legacy_client()
        resp = client.upload_part(
            Bucket=self.bucket,
            Key=full,
            UploadId=upload_id,
            PartNumber=number,
            Body=body,
            **self._checksum_args(checksums, body),
        )
        part: dict[str, Any] = {"ETag": resp["ETag"], "PartNumber": number}
        if checksums and self.checksum_algorithm is not None:
            value = resp.get(f"Checksum{self.checksum_algorithm.value}")
            if value:
                part[f"Checksum{self.checksum_algorithm.value}"] = value
        return part

    def _multipart(
        self,
        key: str,
        first: bytes,
        stream: BinaryIO,
        part_size: int,
        storage_class: StorageClass,
        metadata: dict[str, str],
        progress: ProgressCallback | None,
    ) -> ObjectInfo:
        full = self._full_key(key)
        self._abort_leftovers()

        def create(client: Any, checksums: bool) -> tuple[Any, bool]:
            args = self._checksum_args(checksums, None)
            return (
                client.create_multipart_upload(
                    Bucket=self.bucket,
                    Key=full,
                    StorageClass=storage_class.value,
                    Metadata=metadata,
                    ServerSideEncryption=SSE,
                    **args,
                ),
                checksums,
            )

        created, checksums = self._write_call("CreateMultipartUpload", key, create)
        upload_id = created["UploadId"]
        parts: list[dict[str, Any]] = []
        sizes: dict[Future[dict[str, Any]], int] = {}
        total = 0
        done_bytes = 0
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="vtl-s3-part")
        try:

            def collect(done: set[Future[dict[str, Any]]]) -> None:
                nonlocal done_bytes
                for fut in done:
                    parts.append(fut.result())
                    done_bytes += sizes.pop(fut)
                    if progress is not None:
                        progress(done_bytes)

            number = 0
            chunk = first
            while True:
                number += 1
                if number > MAX_PARTS:
                    raise StoreError(f"{key!r} needs more than {MAX_PARTS} parts: raise part_size", key=key)
                sizes[pool.submit(self._upload_part, full, upload_id, number, chunk, checksums)] = len(chunk)
                total += len(chunk)
                if len(sizes) >= self.max_concurrency:
                    done, _ = wait(set(sizes), return_when=FIRST_COMPLETED)
                    collect(done)
                if len(chunk) < part_size:
                    break
                chunk = _read_exact(stream, part_size)
                if not chunk:
                    break
            if sizes:
                done, _ = wait(set(sizes))
                collect(done)
            parts.sort(key=lambda p: p["PartNumber"])
            client = self._client if checksums else self._legacy_client()
            resp = client.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException as exc:
            for fut in sizes:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            self._abort(full, upload_id)
            if self._rejects_checksums(exc):
                assert isinstance(exc, ClientError)
                self._degrade(exc)
                raise _ChecksumRejected() from exc
            if isinstance(exc, (BotoCoreError, ClientError)):
                raise self._map(exc, "multipart upload", key) from exc
            raise  # our errors, and the caller's own source failing (OSError), as they are
        finally:
            pool.shutdown(wait=True)
        return ObjectInfo(
            key=key,
            size=total,
            etag=_etag(resp.get("ETag")),
            storage_class=storage_class,
            last_modified=self._server_time(resp),
            metadata=MappingProxyType(dict(metadata)),
            checksum=self._checksum_of(resp),
            server_side_encryption=resp.get("ServerSideEncryption"),
        )

    def _abort(self, full: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except (BotoCoreError, ClientError) as exc:
            with self._lock:
                self._unaborted.add((full, upload_id))
            log.warning("could not abort multipart upload %s of %s: %s (abort_stale_multipart_uploads will)", upload_id, full, exc)

    def _abort_leftovers(self) -> int:
        """Abort again the uploads whose abort failed before; keep those that fail again."""
        with self._lock:
            leftovers = sorted(self._unaborted)
        done = 0
        for full, upload_id in leftovers:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("NoSuchUpload", "404"):
                    continue
            except BotoCoreError:
                continue
            with self._lock:
                self._unaborted.discard((full, upload_id))
            done += 1
        return done

    # ------------------------------------------------------------------------------ reads

    def get_object(self, key: str, *, byte_range: ByteRange | None = None) -> bytes:
        """The object's bytes. A whole-object read is checked against the server's full-object
        CRC32C/SHA-256 when it reports one (botocore skips CRC32C without the CRT extra)."""
        validate_range(byte_range)
        full = self._full_key(key)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if byte_range is not None:
            args["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
        elif self._checksums:
            args["ChecksumMode"] = "ENABLED"
        resp = self._call("GetObject", key, lambda: self._client.get_object(**args))
        reader = io.BufferedReader(_StreamReader(resp["Body"], key, int(resp["ContentLength"])), buffer_size=MiB)
        with reader:
            data = reader.read()
        if byte_range is None:
            self._verify(key, data, resp)
        return data

    def _verify(self, key: str, data: bytes, resp: Mapping[str, Any]) -> None:
        for algorithm in ChecksumAlgorithm:
            value = resp.get(f"Checksum{algorithm.value}")
            if not value or "-" in str(value) or resp.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
                continue  # composite (multipart) checksums cannot be checked on the whole body
            if _checksum_b64(algorithm, data) != value:
                raise StoreError(
                    f"data of {key!r} from S3 fails its {algorithm.value} checksum: retry the read",
                    code="BadDigest",
                    key=key,
                )

    def open_object(self, key: str, *, byte_range: ByteRange | None = None) -> io.BufferedIOBase:
        """A streaming reader; read errors surface as StoreUnavailable."""
        validate_range(byte_range)
        full = self._full_key(key)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if byte_range is not None:
            args["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
        resp = self._call("GetObject", key, lambda: self._client.get_object(**args))
        return io.BufferedReader(_StreamReader(resp["Body"], key, int(resp["ContentLength"])), buffer_size=MiB)

    def head_object(self, key: str) -> ObjectInfo:
        full = self._full_key(key)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if self._checksums:
            args["ChecksumMode"] = "ENABLED"
        resp = self._call("HeadObject", key, lambda: self._client.head_object(**args))
        last_modified = resp.get("LastModified") or self._server_time(resp)
        return ObjectInfo(
            key=key,
            size=int(resp.get("ContentLength", 0)),
            etag=_etag(resp.get("ETag")),
            storage_class=StorageClass.from_s3(resp.get("StorageClass")),
            last_modified=last_modified.astimezone(UTC),
            metadata=MappingProxyType(dict(resp.get("Metadata", {}))),
            checksum=self._checksum_of(resp),
            restore=parse_restore_header(resp.get("Restore")),
            server_side_encryption=resp.get("ServerSideEncryption"),
        )

    def list_objects(self, prefix: str = "", delimiter: str | None = None) -> Iterator[ListEntry]:
        """Objects and common prefixes in key order (pages merged lazily)."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
        if delimiter:
            args["Delimiter"] = delimiter
        pages = self._call("ListObjectsV2", prefix, lambda: iter(self._client.get_paginator("list_objects_v2").paginate(**args)))
        while True:
            page = self._call("ListObjectsV2", prefix, lambda: next(pages, None))
            if page is None:
                return
            entries: list[tuple[str, ListEntry]] = []
            for item in page.get("Contents", []):
                key = self._strip(item["Key"])
                entries.append(
                    (
                        key,
                        ObjectInfo(
                            key=key,
                            size=int(item.get("Size", 0)),
                            etag=_etag(item.get("ETag")),
                            storage_class=StorageClass.from_s3(item.get("StorageClass")),
                            last_modified=item["LastModified"].astimezone(UTC),
                        ),
                    )
                )
            for item in page.get("CommonPrefixes", []):
                common = self._strip(item["Prefix"])
                entries.append((common, CommonPrefix(common)))
            entries.sort(key=lambda e: e[0])
            for _, entry in entries:
                yield entry

    # ------------------------------------------------------------------------------ deletes

    def delete_object(self, key: str) -> None:
        full = self._full_key(key)
        self._call("DeleteObject", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=full))

    def delete_objects(self, keys: Sequence[str]) -> None:
        fulls = [self._full_key(k) for k in keys]
        failed: list[str] = []
        for start in range(0, len(fulls), DELETE_BATCH):
            batch = fulls[start : start + DELETE_BATCH]
            resp = self._call(
                "DeleteObjects",
                None,
                lambda: self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                ),
            )
            failed += [f"{self._strip(e.get('Key', ''))} ({e.get('Code')})" for e in resp.get("Errors", [])]
        if failed:
            raise StoreError(f"could not delete {len(failed)} object(s), first {failed[0]}", code="DeleteFailed")

    # ------------------------------------------------------------------------------ copy

    def copy_object(
        self,
        src: str,
        dst: str,
        *,
        storage_class: StorageClass = StorageClass.STANDARD,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Server-side copy (in parts above ``multipart_copy_threshold``), SSE-S3 on the copy."""
        src_full = self._full_key(src)
        dst_full = self._full_key(dst)
        user_meta = validate_metadata(metadata) if metadata is not None else None
        source = self.head_object(src)
        if user_meta is None and src_full == dst_full:
            # A copy onto itself restates the metadata (REPLACE with the same values): some
            # S3-compatible servers (SeaweedFS) refuse a self-copy with MetadataDirective=COPY
            # even when the storage class changes; AWS accepts both.
            user_meta = dict(source.metadata)
        if source.size > self.multipart_copy_threshold:
            if not source.readable:
                raise ObjectArchived(f"object {src!r} is archived: restore it before copying", key=src)
            return self._multipart_copy(source, src_full, dst, dst_full, storage_class, user_meta)
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": dst_full,
            "CopySource": {"Bucket": self.bucket, "Key": src_full},
            "StorageClass": storage_class.value,
            "ServerSideEncryption": SSE,
            "MetadataDirective": "COPY" if user_meta is None else "REPLACE",
        }
        if user_meta is not None:
            args["Metadata"] = user_meta

        def copy(client: Any, checksums: bool) -> Any:
            return client.copy_object(**args, **self._checksum_args(checksums, None))

        resp = self._write_call("CopyObject", src, copy)
        result = resp.get("CopyObjectResult", {})
        last_modified = result.get("LastModified") or self._server_time(resp)
        return ObjectInfo(
            key=dst,
            size=source.size,
            etag=_etag(result.get("ETag")),
            storage_class=storage_class,
            last_modified=last_modified.astimezone(UTC),
            metadata=MappingProxyType(dict(user_meta if user_meta is not None else source.metadata)),
            checksum=self._checksum_of(result),
            server_side_encryption=resp.get("ServerSideEncryption"),
        )

    def _multipart_copy(
        self,
        source: ObjectInfo,
        src_full: str,
        dst: str,
        dst_full: str,
        storage_class: StorageClass,
        metadata: dict[str, str] | None,
    ) -> ObjectInfo:
        meta = dict(metadata if metadata is not None else source.metadata)
        part = max(self._part_size_for(source.size), min(self.multipart_copy_threshold, MAX_SINGLE_COPY))
        part = max(part, MIN_PART_SIZE)
        if -(-source.size // part) > MAX_PARTS:
            part = -(-source.size // MAX_PARTS)
        upload_id = self._call(
            "CreateMultipartUpload",
            dst,
            lambda: self._client.create_multipart_upload(
                Bucket=self.bucket, Key=dst_full, StorageClass=storage_class.value, Metadata=meta, ServerSideEncryption=SSE
            ),
        )["UploadId"]

        def copy_part(number: int, first: int, last: int) -> dict[str, Any]:
            resp = self._client.upload_part_copy(
                Bucket=self.bucket,
                Key=dst_full,
                UploadId=upload_id,
                PartNumber=number,
                CopySource={"Bucket": self.bucket, "Key": src_full},
                CopySourceRange=f"bytes={first}-{last}",
            )
            return {"ETag": resp["CopyPartResult"]["ETag"], "PartNumber": number}

        ranges = [(i + 1, off, min(off + part, source.size) - 1) for i, off in enumerate(range(0, source.size, part))]
        try:
            with ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="vtl-s3-copy") as pool:
                futures = [pool.submit(copy_part, *r) for r in ranges]
                try:
                    parts = [f.result() for f in futures]
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
            resp = self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=dst_full, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException as exc:
            self._abort(dst_full, upload_id)
            if isinstance(exc, (BotoCoreError, ClientError, OSError)):
                raise self._map(exc, "multipart copy", source.key) from exc
            raise
        return ObjectInfo(
            key=dst,
            size=source.size,
            etag=_etag(resp.get("ETag")),
            storage_class=storage_class,
            last_modified=self._server_time(resp),
            metadata=MappingProxyType(meta),
            server_side_encryption=resp.get("ServerSideEncryption"),
        )

    # ------------------------------------------------------------------------------ archive

    def restore_object(self, key: str, *, days: int, tier: RestoreTier = RestoreTier.STANDARD) -> bool:
        """S3 RestoreObject with the given tier; True when S3 accepted a new restore (202)."""
        if days < 1:
            raise StoreError("restore days must be at least 1", code="InvalidArgument", key=key)
        full = self._full_key(key)
        try:
            resp = self._client.restore_object(
                Bucket=self.bucket,
                Key=full,
                RestoreRequest={"Days": days, "GlacierJobParameters": {"Tier": tier.value}},
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code == "RestoreAlreadyInProgress":
                return False
            if code == "InvalidObjectState":
                raise StoreError(f"object {key!r} is not archived: nothing to restore", code=code, key=key) from exc
            raise self._map(exc, "RestoreObject", key) from exc
        except (BotoCoreError, OSError) as exc:
            raise self._map(exc, "RestoreObject", key) from exc
        return int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)) == 202

    # ------------------------------------------------------------------------------ upkeep

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (in the client's region)."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise self._map(exc, "HeadBucket", None) from exc
        except (BotoCoreError, OSError) as exc:
            raise self._map(exc, "HeadBucket", None) from exc
        region = self._client.meta.region_name
        args: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": region}
        self._call("CreateBucket", None, lambda: self._client.create_bucket(**args))

    def list_multipart_uploads(self, prefix: str = "") -> list[MultipartUpload]:
        """Unfinished multipart uploads under ``prefix`` (keys without the store prefix)."""
        args = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}

        def collect() -> list[MultipartUpload]:
            out: list[MultipartUpload] = []
            for page in self._client.get_paginator("list_multipart_uploads").paginate(**args):
                for up in page.get("Uploads", []):
                    out.append(MultipartUpload(self._strip(up["Key"]), up["UploadId"], up["Initiated"].astimezone(UTC)))
            return out

        return self._call("ListMultipartUploads", prefix, collect)

    def abort_stale_multipart_uploads(self, prefix: str = "", *, older_than: timedelta = timedelta(days=1)) -> int:
        """Abort unfinished multipart uploads started more than ``older_than`` ago (by the
        store's clock); returns how many were aborted."""
        cutoff = self.clock.now() - older_than
        count = self._abort_leftovers()
        for up in self.list_multipart_uploads(prefix):
            if up.initiated <= cutoff:
                self._call(
                    "AbortMultipartUpload",
                    up.key,
                    lambda up=up: self._client.abort_multipart_upload(  # type: ignore[misc]
                        Bucket=self.bucket, Key=self.prefix + up.key, UploadId=up.upload_id
                    ),
                )
                count += 1
        return count
