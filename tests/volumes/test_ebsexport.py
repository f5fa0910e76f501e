"""Snapshot export to EBS direct APIs, against moto's ``ebs`` service (in-process)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from volumes.chunks import CHUNK_BYTES, ChunkStore, Manifest
from volumes.ebsexport import EBS_BLOCK, export_snapshot
from vtl.cloud.local import LocalStore

moto = pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")


@pytest.fixture
def ebs(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    with moto.mock_aws():
        yield boto3.client("ebs", region_name="us-east-1")


def test_export_writes_every_nonzero_block(tmp_path: Path, ebs) -> None:  # type: ignore[no-untyped-def]
    chunks = ChunkStore(LocalStore(tmp_path / "store"))
    half_zero = bytes(EBS_BLOCK) + os.urandom(EBS_BLOCK)
    data = [os.urandom(CHUNK_BYTES), None, half_zero, os.urandom(CHUNK_BYTES // 2)]
    refs = [chunks.put(d) if d is not None else None for d in data]
    size = 3 * CHUNK_BYTES + CHUNK_BYTES // 2
    manifest = Manifest("snap-0123456789abcdef0", "v", size, "2026-11-26T00:00:00+00:00",
                        "test", CHUNK_BYTES, refs)
    seen: list[tuple[int, int]] = []
    out = export_snapshot(chunks, manifest, ebs, progress=lambda d, t: seen.append((d, t)))
    assert out["volume_size_gib"] == 1 and out["blocks"] == 4  # 2 + 0 + 1 + 1
    assert seen[-1] == (4, 4)
    listed = ebs.list_snapshot_blocks(SnapshotId=out["ebs_snapshot_id"])
    indexes = sorted(b["BlockIndex"] for b in listed["Blocks"])
    assert indexes == [0, 1, 5, 6]
    expected = {0: data[0][:EBS_BLOCK], 1: data[0][EBS_BLOCK:], 5: half_zero[EBS_BLOCK:],
                6: data[3]}
    for block in listed["Blocks"]:
        got = ebs.get_snapshot_block(SnapshotId=out["ebs_snapshot_id"],
                                     BlockIndex=block["BlockIndex"], BlockToken=block["BlockToken"])
        assert got["BlockData"].read() == expected[block["BlockIndex"]]
