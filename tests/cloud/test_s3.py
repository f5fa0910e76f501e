"""S3Store specifics under moto's in-process mock: SSE, multipart, checksums, error mapping."""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError

from vtl.cloud.clock import ManualClock
from vtl.cloud.s3 import S3Store, parse_restore_header
from vtl.cloud.store import (
    ChecksumAlgorithm,
    MiB,
    ObjectArchived,
    ObjectNotFound,
    RestoreState,
    StorageClass,
    StoreError,
    StoreUnavailable,
)


def raw_head(store: S3Store, key: str) -> dict[str, Any]:
    return store._client.head_object(Bucket=store.bucket, Key=store.prefix + key)  # type: ignore[no-any-return]


def big_file(tmp_path: Path, size: int = 11 * MiB) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    return path, data


def test_every_write_is_sse_s3(moto_s3: S3Store, tmp_path: Path) -> None:
    s = moto_s3
    info = s.put_object("single", b"x" * 100)
    assert info.server_side_encryption == "AES256"
    path, _ = big_file(tmp_path)
    assert s.put_file("multi", path).server_side_encryption == "AES256"
    s.copy_object("single", "copied", storage_class=StorageClass.GLACIER)
    for key in ("single", "multi", "copied"):
        assert raw_head(s, key)["ServerSideEncryption"] == "AES256"
        assert s.head_object(key).server_side_encryption == "AES256"


def test_prefix_isolates_stores(moto_s3: S3Store, boto_session: Any) -> None:
    other = S3Store(moto_s3.bucket, "gw2", session=boto_session)
    moto_s3.put_object("k", b"one")
    other.put_object("k", b"two")
    assert moto_s3.get_object("k") == b"one" and other.get_object("k") == b"two"
    assert [e.key for e in other.list_objects()] == ["k"]  # type: ignore[union-attr]
    assert raw_head(moto_s3, "k")["ContentLength"] == 3
    assert other.prefix == "gw2/"


def test_multipart_parts_run_in_parallel(moto_s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = moto_s3
    original = s._upload_part
    active = 0
    peak = 0
    numbers: list[int] = []
    lock = threading.Lock()

    def slow_part(*args: Any) -> dict[str, Any]:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
            numbers.append(args[2])
        time.sleep(0.15)
        try:
            return original(*args)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(s, "_upload_part", slow_part)
    path, data = big_file(tmp_path, 16 * MiB + 1)  # 4 parts of 5 MiB (last 1 MiB + 1)
    info = s.put_file("tapes/T/seg", path)
    assert sorted(numbers) == [1, 2, 3, 4]
    assert peak >= 2
    assert info.etag.endswith("-4")  # S3's multipart etag
    assert s.get_object("tapes/T/seg") == data
    assert s.list_multipart_uploads() == []


def test_multipart_failure_aborts_upload(moto_s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = moto_s3
    original = s._upload_part
    created: list[str] = []
    real_create = s._client.create_multipart_upload

    def spy_create(**kw: Any) -> Any:
        resp = real_create(**kw)
        created.append(resp["UploadId"])
        assert s.list_multipart_uploads() != []  # it exists while in flight
        return resp

    def failing_part(full: str, upload_id: str, number: int, body: bytes, checksums: bool) -> dict[str, Any]:
        if number == 2:
            raise EndpointConnectionError(endpoint_url="https://s3.example")
        return original(full, upload_id, number, body, checksums)

    monkeypatch.setattr(s._client, "create_multipart_upload", spy_create)
    monkeypatch.setattr(s, "_upload_part", failing_part)
    path, _ = big_file(tmp_path)
    with pytest.raises(StoreUnavailable):
        s.put_file("tapes/T/seg", path)
    assert len(created) == 1
    assert s.list_multipart_uploads() == []
    with pytest.raises(ObjectNotFound):
        s.head_object("tapes/T/seg")


def test_abort_stale_multipart_uploads(moto_s3: S3Store, boto_session: Any) -> None:
    # moto reports every upload as initiated at 2010-11-10T20:48:33Z: judge age by our clock
    clock = ManualClock(datetime(2010, 11, 10, 21, 0, tzinfo=UTC))
    s = S3Store(moto_s3.bucket, "gw1", session=boto_session, clock=clock)
    s._client.create_multipart_upload(Bucket=s.bucket, Key=s.prefix + "tapes/old")
    s._client.create_multipart_upload(Bucket="vtl-test", Key="outside-prefix")
    ups = s.list_multipart_uploads()
    assert [u.key for u in ups] == ["tapes/old"]
    assert s.abort_stale_multipart_uploads(older_than=timedelta(hours=1)) == 0  # too young
    assert s.abort_stale_multipart_uploads("other/", older_than=timedelta(minutes=5)) == 0
    assert s.abort_stale_multipart_uploads("tapes/", older_than=timedelta(minutes=5)) == 1
    assert s.list_multipart_uploads() == []


def test_multipart_copy_above_threshold(moto_s3: S3Store, tmp_path: Path, boto_session: Any) -> None:
    s = S3Store(moto_s3.bucket, "gw1", session=boto_session, part_size=5 * MiB, multipart_copy_threshold=5 * MiB)
    path, data = big_file(tmp_path)
    s.put_file("src", path, metadata={"barcode": "B1"})
    info = s.copy_object("src", "dst", storage_class=StorageClass.DEEP_ARCHIVE)
    assert info.size == len(data) and info.storage_class is StorageClass.DEEP_ARCHIVE
    head = s.head_object("dst")
    assert head.storage_class is StorageClass.DEEP_ARCHIVE and dict(head.metadata) == {"barcode": "B1"}
    assert head.server_side_encryption == "AES256"
    assert s.list_multipart_uploads() == []
    with pytest.raises(ObjectArchived):
        s.copy_object("dst", "again")


def test_checksum_refusal_degrades_to_content_md5(moto_s3: S3Store, tmp_path: Path) -> None:
    """An S3-compatible server without flexible checksums: the store falls back to Content-MD5."""
    s = moto_s3
    refused: list[str] = []
    md5_seen: list[str] = []

    def refuse_checksums(params: dict[str, Any], model: Any, **_: Any) -> Any:
        headers = params.get("headers", {})
        if model.name in ("PutObject", "UploadPart", "CreateMultipartUpload", "CopyObject") and any(h.lower().startswith("x-amz-checksum") or h.lower() == "x-amz-sdk-checksum-algorithm" for h in headers):
            refused.append(model.name)
            return (
                AWSResponse("https://s3", 501, {}, None),
                {
                    "Error": {"Code": "NotImplemented", "Message": "A header you provided implies functionality that is not implemented"},
                    "ResponseMetadata": {"HTTPStatusCode": 501},
                },
            )
        return None

    def watch_md5(params: dict[str, Any], **_: Any) -> None:
        if "Content-MD5" in params.get("headers", {}):
            md5_seen.append("yes")

    s._client.meta.events.register("before-call.s3", refuse_checksums)
    s._legacy_client().meta.events.register("before-call.s3.PutObject", watch_md5)
    s._legacy_client().meta.events.register("before-call.s3.UploadPart", watch_md5)
    info = s.put_object("k", b"hello")
    assert refused == ["PutObject"] and not s.checksums_supported
    assert md5_seen == ["yes"]
    assert s.get_object("k") == b"hello" and info.size == 5
    path, data = big_file(tmp_path)
    s.put_file("big", path)  # later uploads go straight to Content-MD5
    assert refused == ["PutObject"]
    assert len(md5_seen) == 4
    assert s.get_object("big") == data


def test_checksums_can_be_turned_off(boto_session: Any, moto_s3: S3Store) -> None:
    s = S3Store(moto_s3.bucket, session=boto_session, checksum_algorithm=None)
    assert not s.checksums_supported
    info = s.put_object("plain", b"abc")
    assert info.checksum is None and s.get_object("plain") == b"abc"


def test_sha256_checksums(boto_session: Any, moto_s3: S3Store) -> None:
    s = S3Store(moto_s3.bucket, session=boto_session, checksum_algorithm=ChecksumAlgorithm.SHA256)
    info = s.put_object("sha", b"abc")
    assert info.checksum is not None and info.checksum.algorithm is ChecksumAlgorithm.SHA256
    assert info.checksum.value == "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="


def test_missing_bucket_is_a_config_error(boto_session: Any, moto_s3: S3Store) -> None:
    s = S3Store("no-such-bucket-here", session=boto_session)
    with pytest.raises(StoreError) as exc:
        s.put_object("k", b"x")
    assert exc.value.code == "NoSuchBucket" and not isinstance(exc.value, StoreUnavailable)


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_client_error("NoSuchKey", 404), ObjectNotFound),
        (_client_error("404", 404), ObjectNotFound),
        (_client_error("InvalidObjectState", 403), ObjectArchived),
        (_client_error("SlowDown", 503), StoreUnavailable),
        (_client_error("InternalError", 500), StoreUnavailable),
        (_client_error("Whatever", 502), StoreUnavailable),
        (_client_error("AccessDenied", 403), StoreError),
        (EndpointConnectionError(endpoint_url="http://x"), StoreUnavailable),
        (ReadTimeoutError(endpoint_url="http://x"), StoreUnavailable),
        (NoCredentialsError(), StoreError),
    ],
)
def test_error_mapping(moto_s3: S3Store, exc: Exception, expected: type[StoreError]) -> None:
    mapped = moto_s3._map(exc, "Op", "k")
    assert type(mapped) is expected
    assert mapped.retryable is (expected is StoreUnavailable)
    assert mapped.to_json()["code"]  # surfaces through the control API like any ApplianceError


def test_parse_restore_header() -> None:
    assert parse_restore_header(None) is None
    assert parse_restore_header('ongoing-request="true"').state is RestoreState.ONGOING  # type: ignore[union-attr]
    r = parse_restore_header('ongoing-request="false", expiry-date="Fri, 21 Dec 2012 00:00:00 GMT"')
    assert r is not None and r.state is RestoreState.AVAILABLE
    assert r.expiry == datetime(2012, 12, 21, tzinfo=UTC)
    assert parse_restore_header("garbage") is None


def test_bad_construction() -> None:
    with pytest.raises(StoreError):
        S3Store("b", part_size=1 * MiB)
    with pytest.raises(StoreError):
        S3Store("")


def test_full_reads_are_verified(moto_s3: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    s = moto_s3
    s.put_object("k", b"good data")
    seen: list[str] = []
    real_verify = s._verify

    def spy(key: str, data: bytes, resp: Any) -> None:
        seen.append(resp.get("ChecksumCRC32C", ""))
        real_verify(key, data, resp)

    monkeypatch.setattr(s, "_verify", spy)
    assert s.get_object("k") == b"good data"
    assert seen and seen[0]  # the server reported a checksum and it matched
    with pytest.raises(StoreError) as exc:
        real_verify("k", b"evil data", {"ChecksumCRC32C": seen[0]})
    assert exc.value.code == "BadDigest"
