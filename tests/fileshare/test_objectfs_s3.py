"""ObjectFS over S3 (moto in-process): SSE-S3, metadata, ranged reads, refresh, rename."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from fileshare.fs import CreateMode, FsErrno, FsError, SetAttr
from tests.cloud.conftest import _fake_aws_env, boto_session, moto_s3  # noqa: F401 (fixtures)
from tests.fileshare.objectfs_helpers import ALICE, ROOT, Rig
from vtl.cloud.store import ObjectNotFound


@pytest.fixture
def rig(moto_s3: Any, tmp_path: Path) -> Rig:  # noqa: F811
    return Rig(moto_s3, tmp_path, cache_limit=96 * 1024, chunk=16 * 1024)


def test_upload_after_settle_carries_sse_metadata_and_exact_bytes(rig: Rig) -> None:
    fs = rig.open()
    root = fs.root_handle()
    data = os.urandom(200_000)
    fh, _ = fs.create(ALICE, root, "report.bin", CreateMode.GUARDED, attrs=SetAttr(mode=0o640))
    fs.write(ALICE, fh, 0, data[:150_000], False)
    fs.write(ALICE, fh, 150_000, data[150_000:], False)
    fs.commit(ALICE, fh)
    assert fs.run_uploads() == 0
    with pytest.raises(ObjectNotFound):
        rig.store.head_object("share1/report.bin")
    rig.clock.advance(5)
    assert fs.run_uploads() == 1
    assert rig.store.get_object("share1/report.bin") == data
    info = rig.store.head_object("share1/report.bin")
    assert info.server_side_encryption == "AES256"
    assert info.metadata["file-permissions"] == "0100640"
    assert info.metadata["file-owner"] == "1000"


def test_ranged_reads_evict_and_refetch_bit_exact(rig: Rig) -> None:
    blobs = {f"d/f{i}": os.urandom(70_000 + 7 * i) for i in range(3)}
    for key, data in blobs.items():
        rig.store.put_object(f"share1/{key}", data)
    fs = rig.open()
    d, _ = fs.lookup(ROOT, fs.root_handle(), "d")
    for _ in range(2):
        for key, data in blobs.items():
            fh, _ = fs.lookup(ROOT, d, key.split("/")[1])
            assert fs.read(ROOT, fh, 33_333, 20_000)[0] == data[33_333:53_333]
            assert fs.read(ROOT, fh, 0, 100_000) == (data, True)
    assert rig.cache is not None and rig.cache.evictions > 0
    assert rig.cache.usage() <= 96 * 1024


def test_refresh_and_directory_rename_on_s3(rig: Rig) -> None:
    fs = rig.open()
    root = fs.root_handle()
    rig.store.put_object("share1/in/a", b"a")
    rig.store.put_object("share1/in/b/c", b"c")
    assert fs.refresh("/", recursive=True)["added"] == 4  # in, in/a, in/b, in/b/c
    fs.rename(ROOT, root, "in", root, "out")
    keys = sorted(o.key for o in rig.store.list_objects("share1/"))
    assert keys == ["share1/out/a", "share1/out/b/c"]
    out, _ = fs.lookup(ROOT, root, "out")
    b, _ = fs.lookup(ROOT, out, "b")
    fh, _ = fs.lookup(ROOT, b, "c")
    assert fs.read(ROOT, fh, 0, 10) == (b"c", True)
    rig.store.delete_object("share1/out/b/c")
    fs.refresh("out/b")
    with pytest.raises(FsError) as info:
        fs.getattr(fh)
    assert info.value.errno == FsErrno.STALE
