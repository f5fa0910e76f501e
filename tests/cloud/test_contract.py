"""The ObjectStore contract, run against LocalStore, S3Store on moto, S3Store over HTTP."""

from __future__ import annotations

import base64
import hashlib
import io
import os
from pathlib import Path
from typing import Any

import crc32c
import pytest

from tests.cloud.conftest import Harness
from vtl.cloud.store import (
    ChecksumAlgorithm,
    CommonPrefix,
    InvalidKey,
    MiB,
    ObjectArchived,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    RestoreState,
    RestoreTier,
    StorageClass,
    StoreError,
)


def crc32c_b64(data: bytes) -> str:
    return base64.b64encode(crc32c.crc32c(data).to_bytes(4, "big")).decode()


def listing(store: ObjectStore, prefix: str = "", delimiter: str | None = None) -> list[str]:
    out = []
    for entry in store.list_objects(prefix, delimiter):
        out.append(entry.prefix + "*" if isinstance(entry, CommonPrefix) else entry.key)
    return out


def test_is_an_object_store(store: Harness) -> None:
    assert isinstance(store.store, ObjectStore)


def test_put_get_head_roundtrip(store: Harness) -> None:
    s = store.store
    data = b"tape segment " * 1000
    info = s.put_object("tapes/TEST01/seg-000000", data, metadata={"Barcode": "TEST01", "segment": "0"})
    assert info.size == len(data)
    assert info.etag == hashlib.md5(data).hexdigest()
    assert info.checksum is not None and info.checksum.algorithm is ChecksumAlgorithm.CRC32C
    assert info.checksum.value == crc32c_b64(data)
    assert s.get_object("tapes/TEST01/seg-000000") == data
    head = s.head_object("tapes/TEST01/seg-000000")
    assert (head.key, head.size, head.etag, head.storage_class) == (info.key, len(data), info.etag, StorageClass.STANDARD)
    assert dict(head.metadata) == {"barcode": "TEST01", "segment": "0"}
    assert head.checksum == info.checksum
    assert head.restore is None and head.readable
    assert head.last_modified.tzinfo is not None


def test_overwrite_replaces_whole_object(store: Harness) -> None:
    s = store.store
    s.put_object("k", b"old contents, longer")
    s.put_object("k", b"new")
    assert s.get_object("k") == b"new"
    assert s.head_object("k").size == 3
    assert listing(s) == ["k"]


def test_empty_object(store: Harness) -> None:
    store.store.put_object("empty", b"")
    assert store.store.get_object("empty") == b""
    assert store.store.head_object("empty").size == 0


def test_ranged_get(store: Harness) -> None:
    s = store.store
    data = bytes(range(256)) * 4
    s.put_object("r", data)
    assert s.get_object("r", byte_range=(0, 0)) == data[:1]
    assert s.get_object("r", byte_range=(10, 19)) == data[10:20]
    assert s.get_object("r", byte_range=(1000, 5000)) == data[1000:]  # cut at the end, as S3 does
    with pytest.raises(StoreError) as exc:
        s.get_object("r", byte_range=(1024, 2000))
    assert exc.value.code == "InvalidRange"
    with pytest.raises(StoreError):
        s.get_object("r", byte_range=(5, 2))


def test_open_object_streams_a_range(store: Harness) -> None:
    s = store.store
    data = os.urandom(300_000)
    s.put_object("stream", data)
    with s.open_object("stream", byte_range=(1000, 250_999)) as reader:
        got = b"".join(iter(lambda: reader.read(7777), b""))
    assert got == data[1000:251_000]
    with s.open_object("stream") as reader:
        assert reader.read() == data


def test_missing_objects(store: Harness) -> None:
    s = store.store
    with pytest.raises(ObjectNotFound):
        s.get_object("nope")
    with pytest.raises(ObjectNotFound):
        s.head_object("nope/deeper")
    with pytest.raises(ObjectNotFound):
        s.open_object("nope")
    s.delete_object("nope")  # deleting what is not there is fine, as in S3


def test_list_order_and_delimiter(store: Harness) -> None:
    s = store.store
    keys = ["a", "a/b", "a/c/d", "a-b", "a0", "b", "tapes/AB1/s1", "tapes/AB1/s0", "tapes/AB2/s0", "tapes/X/s0", "é", "z"]
    for k in keys:
        s.put_object(k, k.encode())
    assert listing(s) == sorted(keys)  # code-point order == UTF-8 byte order, as S3 lists
    assert listing(s, delimiter="/") == ["a", "a-b", "a/*", "a0", "b", "tapes/*", "z", "é"]
    assert listing(s, "tapes/", "/") == ["tapes/AB1/*", "tapes/AB2/*", "tapes/X/*"]
    assert listing(s, "tapes/AB") == ["tapes/AB1/s0", "tapes/AB1/s1", "tapes/AB2/s0"]
    assert listing(s, "tapes/AB", "/") == ["tapes/AB1/*", "tapes/AB2/*"]
    assert listing(s, "a/") == ["a/b", "a/c/d"]
    assert listing(s, "a/", "/") == ["a/b", "a/c/*"]
    assert listing(s, "nothing/") == []
    entries = [e for e in s.list_objects("tapes/AB1/") if isinstance(e, ObjectInfo)]
    assert [(e.key, e.size, e.storage_class) for e in entries] == [("tapes/AB1/s0", 12, StorageClass.STANDARD), ("tapes/AB1/s1", 12, StorageClass.STANDARD)]
    assert entries[0].etag == hashlib.md5(b"tapes/AB1/s0").hexdigest()


def test_list_with_other_delimiter(store: Harness) -> None:
    s = store.store
    for k in ["seg-1", "seg-2", "seg", "idx-a/b", "z"]:
        s.put_object(k, b"")
    assert listing(s, delimiter="-") == ["idx-*", "seg", "seg-*", "z"]
    assert listing(s, "seg", "-") == ["seg", "seg-*"]


def test_delete_and_delete_objects(store: Harness) -> None:
    s = store.store
    for k in ["x/1", "x/2", "x/y/3", "w"]:
        s.put_object(k, b"1")
    s.delete_object("x/y/3")
    assert listing(s, delimiter="/") == ["w", "x/*"]
    assert listing(s, "x/", "/") == ["x/1", "x/2"]  # no empty "x/y/" left behind
    s.delete_objects(["x/1", "x/2", "never-existed"])
    assert listing(s) == ["w"]
    assert listing(s, delimiter="/") == ["w"]
    s.delete_objects([])


def test_copy_keeps_or_replaces_metadata(store: Harness) -> None:
    s = store.store
    s.put_object("src", b"payload", metadata={"barcode": "T1"})
    info = s.copy_object("src", "dst/copy")
    assert info.size == 7 and info.storage_class is StorageClass.STANDARD
    assert s.get_object("dst/copy") == b"payload"
    assert dict(s.head_object("dst/copy").metadata) == {"barcode": "T1"}
    s.copy_object("src", "dst/copy2", metadata={"barcode": "T2"})
    assert dict(s.head_object("dst/copy2").metadata) == {"barcode": "T2"}
    assert s.get_object("src") == b"payload"
    s.copy_object("src", "src")  # onto itself: allowed (every copy re-asserts SSE-S3)
    assert s.get_object("src") == b"payload"
    assert dict(s.head_object("src").metadata) == {"barcode": "T1"}
    with pytest.raises(ObjectNotFound):
        s.copy_object("missing", "dst/x")


@pytest.mark.parametrize("cls", [StorageClass.GLACIER, StorageClass.DEEP_ARCHIVE])
def test_archive_by_copy_then_restore(store: Harness, cls: StorageClass) -> None:
    s = store.store
    data = b"archived tape segment"
    s.put_object("tapes/T1/seg", data, metadata={"barcode": "T1"})
    info = s.copy_object("tapes/T1/seg", "tapes/T1/seg", storage_class=cls)
    assert info.storage_class is cls
    head = s.head_object("tapes/T1/seg")
    assert head.storage_class is cls and head.restore is None and not head.readable
    assert dict(head.metadata) == {"barcode": "T1"}
    assert [e.storage_class for e in s.list_objects("tapes/") if isinstance(e, ObjectInfo)] == [cls]
    with pytest.raises(ObjectArchived):
        s.get_object("tapes/T1/seg")
    with pytest.raises(ObjectArchived):
        s.get_object("tapes/T1/seg", byte_range=(0, 3))
    with pytest.raises(ObjectArchived):
        s.copy_object("tapes/T1/seg", "elsewhere")

    assert s.restore_object("tapes/T1/seg", days=2, tier=RestoreTier.STANDARD) is True
    if store.hold_restore is not None:
        store.hold_restore("tapes/T1/seg")
        head = s.head_object("tapes/T1/seg")
        assert head.restore is not None and head.restore.state is RestoreState.ONGOING
        assert not head.readable
        with pytest.raises(ObjectArchived):
            s.get_object("tapes/T1/seg")
        assert s.restore_object("tapes/T1/seg", days=2) is False  # already in progress
    store.finish_restores()
    head = s.head_object("tapes/T1/seg")
    assert head.restore is not None and head.restore.state is RestoreState.AVAILABLE
    assert head.restore.expiry is not None and head.restore.expiry > head.last_modified
    assert head.readable and head.storage_class is cls
    assert s.get_object("tapes/T1/seg") == data
    assert s.get_object("tapes/T1/seg", byte_range=(0, 7)) == data[:8]
    # a restored object can be copied back to STANDARD (the RETRIEVED path)
    s.copy_object("tapes/T1/seg", "retrieved/T1/seg", storage_class=StorageClass.STANDARD)
    assert s.get_object("retrieved/T1/seg") == data


def test_put_straight_into_archive_class(store: Harness) -> None:
    s = store.store
    info = s.put_object("deep", b"cold", storage_class=StorageClass.DEEP_ARCHIVE)
    assert info.storage_class is StorageClass.DEEP_ARCHIVE
    assert s.head_object("deep").storage_class is StorageClass.DEEP_ARCHIVE
    with pytest.raises(ObjectArchived):
        s.get_object("deep")


def test_restore_of_standard_object_is_refused(store: Harness) -> None:
    s = store.store
    s.put_object("hot", b"x")
    with pytest.raises(StoreError) as exc:
        s.restore_object("hot", days=1)
    assert not isinstance(exc.value, ObjectArchived)
    assert exc.value.code == "InvalidObjectState"
    with pytest.raises(ObjectNotFound):
        s.restore_object("missing", days=1)


def test_large_stream_and_file_uploads(store: Harness, tmp_path: Path) -> None:
    s = store.store
    data = os.urandom(12 * MiB + 12345)  # over the 5 MiB part size of the S3 fixtures: multipart
    info = s.put_object("big/stream", io.BytesIO(data), metadata={"k": "v"})
    assert info.size == len(data)
    assert s.head_object("big/stream").size == len(data)
    assert s.get_object("big/stream", byte_range=(5 * MiB - 10, 5 * MiB + 9)) == data[5 * MiB - 10 : 5 * MiB + 10]
    path = tmp_path / "segment.bin"
    path.write_bytes(data)
    seen: list[int] = []
    info = s.put_file("big/file", path, metadata={"barcode": "T9"}, progress=seen.append)
    assert info.size == len(data)
    assert seen and seen[-1] == len(data) and seen == sorted(seen)
    assert s.get_object("big/file") == data
    assert dict(s.head_object("big/file").metadata) == {"barcode": "T9"}


def test_small_file_upload(store: Harness, tmp_path: Path) -> None:
    path = tmp_path / "small"
    path.write_bytes(b"abc")
    seen: list[int] = []
    info = store.store.put_file("f", path, storage_class=StorageClass.GLACIER, progress=seen.append)
    assert info.size == 3 and seen[-1] == 3
    assert store.store.head_object("f").storage_class is StorageClass.GLACIER


BAD_KEYS = ["", "/abs", "a/../b", "..", "a/./b", "nul\x00byte", "line\nfeed", "x" * 1025, "\udcff"]


def test_invalid_keys_rejected(store: Harness) -> None:
    for key in BAD_KEYS:
        with pytest.raises(InvalidKey):
            store.store.put_object(key, b"x")
        with pytest.raises(InvalidKey):
            store.store.get_object(key)
        with pytest.raises(InvalidKey):
            store.store.copy_object("src", key)
    assert listing(store.store) == []


def test_invalid_metadata_rejected(store: Harness) -> None:
    with pytest.raises(InvalidKey):
        store.store.put_object("m", b"x", metadata={"bad name": "v"})
    with pytest.raises(InvalidKey):
        store.store.put_object("m", b"x", metadata={"k": "non-ascii é"})


def test_failed_stream_leaves_old_object(store: Harness) -> None:
    s = store.store
    s.put_object("victim", b"old")

    class Broken(io.RawIOBase):
        def __init__(self) -> None:
            self.sent = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            if self.sent > 7 * MiB:
                raise OSError("source disk failed")
            n = min(len(b), 1 * MiB)
            b[:n] = b"\x00" * n
            self.sent += n
            return n

    with pytest.raises(OSError):
        s.put_object("victim", io.BufferedReader(Broken()))  # type: ignore[type-var]
    assert s.get_object("victim") == b"old"
    assert listing(s) == ["victim"]
    if store.is_s3:
        assert store.store.list_multipart_uploads() == []  # type: ignore[attr-defined]
