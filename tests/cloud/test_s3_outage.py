"""S3Store through an outage, under moto's in-process mock: a multipart upload whose abort
failed is aborted later, self-copies restate metadata, and the upload bandwidth limit."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError

from vtl.cloud import s3 as s3mod
from vtl.cloud.s3 import S3Store
from vtl.cloud.store import MiB, StorageClass, StoreError, StoreUnavailable


def test_an_upload_whose_abort_failed_is_aborted_once_the_endpoint_is_back(
        moto_s3: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = moto_s3
    path = tmp_path / "seg"
    data = os.urandom(16 * MiB)
    path.write_bytes(data)
    client = s._client
    real_part = client.upload_part
    parts = []

    def down(**kw: Any) -> Any:
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")

    def part_then_down(**kw: Any) -> Any:
        parts.append(kw["PartNumber"])
        if len(parts) > 1:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
        return real_part(**kw)

    monkeypatch.setattr(client, "upload_part", part_then_down)
    monkeypatch.setattr(client, "abort_multipart_upload", down)
    with pytest.raises(StoreUnavailable):
        s.put_file("tapes/T1/seg-000000.dat", path)
    assert [u.key for u in s.list_multipart_uploads()] == ["tapes/T1/seg-000000.dat"]
    monkeypatch.undo()  # the endpoint is back: the next upload aborts the leftover first
    s.put_file("tapes/T1/seg-000000.dat", path)
    assert s.list_multipart_uploads() == []
    assert s.get_object("tapes/T1/seg-000000.dat") == data


def test_abort_stale_also_aborts_the_leftovers(moto_s3: S3Store, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    s = moto_s3
    path = tmp_path / "seg"
    path.write_bytes(os.urandom(11 * MiB))
    client = s._client

    def down(**kw: Any) -> Any:
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")

    monkeypatch.setattr(client, "complete_multipart_upload", down)
    monkeypatch.setattr(client, "abort_multipart_upload", down)
    with pytest.raises(StoreUnavailable):
        s.put_file("k", path)
    monkeypatch.undo()
    assert len(s.list_multipart_uploads()) == 1
    from datetime import timedelta
    assert s.abort_stale_multipart_uploads(older_than=timedelta(days=365)) == 1  # not stale: ours
    assert s.list_multipart_uploads() == []


def test_a_self_copy_restates_the_metadata(moto_s3: S3Store) -> None:
    s = moto_s3
    s.put_object("obj", b"payload", metadata={"crc32c": "123", "barcode": "T1"})
    seen: list[str | None] = []

    def capture(request: Any, **kw: Any) -> None:
        seen.append(request.headers.get("x-amz-metadata-directive"))

    s._client.meta.events.register("before-send.s3.CopyObject", capture)
    s.copy_object("obj", "other")  # a copy to another key keeps MetadataDirective=COPY
    assert seen[-1] in ("COPY", b"COPY")
    info = s.copy_object("obj", "obj", storage_class=StorageClass.GLACIER)
    assert seen and seen[-1] in ("REPLACE", b"REPLACE")
    assert dict(info.metadata) == {"crc32c": "123", "barcode": "T1"}
    head = s.head_object("obj")
    assert head.storage_class is StorageClass.GLACIER
    assert dict(head.metadata) == {"crc32c": "123", "barcode": "T1"}


def test_the_upload_rate_limit_spaces_the_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    slept: list[float] = []
    monkeypatch.setattr(s3mod.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(s3mod.time, "sleep", slept.append)
    bucket = s3mod._Throttle(5 * MiB)
    bucket.take(5 * MiB)  # the first second's worth goes at once
    bucket.take(10 * MiB)  # then waits until the first 5 MiB had their second
    bucket.take(5 * MiB)
    assert slept == [pytest.approx(1.0), pytest.approx(3.0)]
    now[0] = 110.0  # idle time is not banked as a burst beyond the next request
    bucket.take(MiB)
    assert len(slept) == 2


def test_upload_rate_must_be_positive(boto_session: Any) -> None:
    with pytest.raises(StoreError):
        S3Store("b", session=boto_session, upload_rate=0)
