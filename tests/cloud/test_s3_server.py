"""S3Store against a real S3-compatible HTTP server (moto_server on 127.0.0.1): an outage.

The contract itself also runs over HTTP (the ``moto-server`` parameter of ``store``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cloud.conftest import MotoServer
from vtl.cloud.s3 import S3Store
from vtl.cloud.store import MiB, ObjectNotFound, StoreUnavailable

pytestmark = pytest.mark.integration


@pytest.fixture
def own_server() -> Any:
    server = MotoServer()
    server.start()
    yield server
    server.stop()


def test_outage_is_reported_promptly_and_recovered(own_server: MotoServer, boto_session: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = S3Store(
        "vtl-outage",
        "gw/",
        endpoint_url=own_server.url,
        session=boto_session,
        max_attempts=2,
        connect_timeout=1,
        read_timeout=3,
        part_size=5 * MiB,
        max_concurrency=2,
    )
    s.ensure_bucket()
    s.put_object("before", b"1")
    data = os.urandom(11 * MiB)
    path = tmp_path / "seg"
    path.write_bytes(data)

    # the server dies in the middle of a multipart upload
    original = s._upload_part

    def kill_on_part_two(full: str, upload_id: str, number: int, body: bytes, checksums: bool) -> Any:
        if number == 2:
            own_server.stop()
        return original(full, upload_id, number, body, checksums)

    monkeypatch.setattr(s, "_upload_part", kill_on_part_two)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable):
        s.put_file("tapes/T/seg", path)
    monkeypatch.setattr(s, "_upload_part", original)
    assert own_server.proc is None

    for op in (
        lambda: s.head_object("before"),
        lambda: s.get_object("before"),
        lambda: s.put_object("k", b"x"),
        lambda: list(s.list_objects()),
        lambda: s.restore_object("before", days=1),
    ):
        t = time.monotonic()
        with pytest.raises(StoreUnavailable):
            op()
        assert time.monotonic() - t < 8, "bounded retries and short timeouts"
    assert time.monotonic() - t0 < 30

    own_server.start()  # state is in memory: the bucket is gone
    s.ensure_bucket()
    with pytest.raises(ObjectNotFound):
        s.head_object("before")
    s.put_file("tapes/T/seg", path)
    assert s.get_object("tapes/T/seg", byte_range=(0, 99)) == data[:100]
    assert s.list_multipart_uploads() == []


def test_open_store_from_s3_url(moto_server: MotoServer, boto_session: Any) -> None:
    from vtl.cloud.store import open_store

    store = open_store(f"s3://vtl-url/appliance?endpoint={moto_server.url}", session=boto_session, max_attempts=2)
    assert isinstance(store, S3Store) and store.prefix == "appliance/"
    store.ensure_bucket()
    store.put_object("k", b"via url")
    assert store.get_object("k") == b"via url"
    assert store._client.head_object(Bucket="vtl-url", Key="appliance/k")["ContentLength"] == 7
