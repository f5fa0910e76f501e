"""The volume gateway end to end: snapshots, restores, clones and cached volumes on a real
``vtl serve``, data through a real iSCSI initiator (libiscsi), the object store inspected
directly (the embedded store under ``<data-dir>/store``).

Covers: bit-exact restore of a snapshot into new stored and cached volumes (readable at once),
incremental snapshots (the second uploads only the changed chunks, counted in the store),
garbage collection that keeps shared chunks, clone from the latest recovery point, a cached
volume four times larger than its cache read back after eviction, schedules and one-line
errors. The crash tests (kill -9) are in ``test_volume_gateway_crash.py``.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support.appliance import ApplianceProcess
from tests.support.libiscsi import Session, library_available
from volumes.chunks import ChunkStore
from vtl.cloud.local import LocalStore

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
BLOCKS_PER_MIB = MiB // 512
INITIATOR = "iqn.2026-11.org.vtl-appliance.test:gateway"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not library_available(), reason="libiscsi is not installed"),
]


# --- helpers -------------------------------------------------------------------------------------
def cli_json(app: ApplianceProcess, *args: str) -> Any:
    result = app.cli(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def create(app: ApplianceProcess, name: str, *args: str) -> dict[str, Any]:
    return cli_json(app, "volume", "create", name, *args)


def session(app: ApplianceProcess, vol: dict[str, Any]) -> Session:
    return Session(f"iscsi://{app.portal}/{vol['target_iqn']}/0", initiator_name=INITIATOR)


def write_mib(s: Session, index: int, data: bytes) -> None:
    """Write ``data`` (whole 512-byte blocks) at MiB ``index``."""
    s.write10(index * BLOCKS_PER_MIB, data).check()


def read_mib(s: Session, index: int, count: int = 1) -> bytes:
    return b"".join(s.read10((index + k) * BLOCKS_PER_MIB, BLOCKS_PER_MIB).check().data
                    for k in range(count))


def sync_cache(s: Session) -> None:
    s.execute(bytes([0x35]) + bytes(9)).check()  # SYNCHRONIZE CACHE(10), whole medium


def snapshot(app: ApplianceProcess, name: str, description: str = "") -> dict[str, Any]:
    snap = cli_json(app, "volume", "snapshot", name, "--description", description, "--wait")
    assert snap["status"] == "COMPLETED", snap
    return snap


def chunk_objects(data_dir: Path) -> dict[str, int]:
    """Chunk objects in the appliance's embedded store: key -> size."""
    store = ChunkStore(LocalStore(data_dir / "store"))
    return {o.key: o.size for o in store.list_chunks()}


def wait_status(app: ApplianceProcess, name: str, status: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        vol = cli_json(app, "volume", "show", name)
        if vol["status"] == status:
            return vol
        assert time.monotonic() < deadline, vol
        time.sleep(0.1)


def wait_snapshot_gone(app: ApplianceProcess, sid: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(s["snapshot_id"] == sid for s in cli_json(app, "snapshot", "list")):
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApplianceProcess]:
    data_dir = tmp_path_factory.mktemp("gateway") / "data"
    proc = ApplianceProcess(data_dir, extra_args=["--workers", "0"]).start()
    try:
        yield proc
    finally:
        if proc.running:
            assert proc.stop() == 0, proc.log_tail()


# --- snapshots and restores ----------------------------------------------------------------------
def test_snapshot_restore_incremental_clone_and_gc(app: ApplianceProcess) -> None:
    rnd = random.Random(6)
    src = create(app, "src", "--type", "stored", "--size", "1GiB")
    assert src["snapshot_schedule"]["every_hours"] == 24  # stored volumes: daily by default
    model: dict[int, bytes] = {}  # MiB index -> content; everything else is zeros
    with session(app, src) as s:
        for i in list(range(32)) + [512, 1023]:
            model[i] = rnd.randbytes(MiB)
            write_mib(s, i, model[i])
        sync_cache(s)
        first = snapshot(app, "src", "before the overwrite")
        objects1 = chunk_objects(app.data_dir)
        assert len(objects1) == 34 and sum(objects1.values()) == 34 * MiB
        assert first["uploaded_chunks"] == 34 and first["uploaded_bytes"] == 34 * MiB
        image1 = dict(model)

        # change 3 chunks: one whole, 4 KiB of another, one 512-byte block of a third
        model[3] = rnd.randbytes(MiB)
        write_mib(s, 3, model[3])
        patch = rnd.randbytes(4096)
        s.write10(10 * BLOCKS_PER_MIB + 8, patch).check()
        model[10] = model[10][:4096] + patch + model[10][8192:]
        block = rnd.randbytes(512)
        s.write10(512 * BLOCKS_PER_MIB + 2047, block).check()
        model[512] = model[512][:MiB - 512] + block
        sync_cache(s)
        second = snapshot(app, "src")
    objects2 = chunk_objects(app.data_dir)
    assert second["uploaded_chunks"] == 3 and second["uploaded_bytes"] == 3 * MiB, second
    assert len(objects2) == 37 and set(objects1) < set(objects2)
    assert sum(objects2.values()) - sum(objects1.values()) == 3 * MiB
    listed = {s["snapshot_id"]: s for s in cli_json(app, "snapshot", "list")}
    assert listed[first["snapshot_id"]]["description"] == "before the overwrite"
    assert {listed[k]["status"] for k in (first["snapshot_id"], second["snapshot_id"])} == {
        "COMPLETED"}

    def check(vol: dict[str, Any], image: dict[int, bytes], mibs: int = 1024) -> None:
        with session(app, vol) as s:
            blocks, size = s.capacity()
            assert blocks * size == mibs * MiB
            for i in sorted(image) + [100, 700]:
                assert read_mib(s, i) == image.get(i, bytes(MiB)), f"MiB {i} of {vol['name']}"

    # the first snapshot into a stored volume, the second into a larger cached one
    r1 = create(app, "r1", "--from-snapshot", first["snapshot_id"])
    assert r1["status"] in ("RESTORING", "AVAILABLE") and r1["type"] == "stored"
    assert r1["source_snapshot"] == first["snapshot_id"] and r1["size_bytes"] == 1 << 30
    check(r1, image1)  # readable at once, while chunks are fetched
    r2 = create(app, "r2", "--type", "cached", "--size", "2GiB", "--from-snapshot",
                second["snapshot_id"])
    assert r2["status"] in ("BOOTSTRAPPING", "AVAILABLE")
    check(r2, model, mibs=2048)
    wait_status(app, "r1", "AVAILABLE")
    wait_status(app, "r2", "AVAILABLE")
    check(r1, image1)

    # clone: from the latest recovery point (the second snapshot)
    clone = cli_json(app, "volume", "clone", "src", "--name", "c1")
    assert clone["source_snapshot"] == second["snapshot_id"]
    check(clone, model)
    points = cli_json(app, "volume", "recovery-points")
    assert {"name": "src", "snapshot_id": second["snapshot_id"]}.items() <= next(
        p for p in points if p["name"] == "src").items()

    # GC: deleting the first snapshot frees exactly its 3 chunks nobody else uses
    for name in ("r1", "r2", "c1"):
        assert app.cli("volume", "delete", name, "--yes").exit_code == 0
    result = app.cli("snapshot", "delete", first["snapshot_id"])
    assert result.exit_code == 0, result.output
    wait_snapshot_gone(app, first["snapshot_id"])
    deadline = time.monotonic() + 30  # the manifest goes first, then the collection runs
    while len(objects3 := chunk_objects(app.data_dir)) > 34 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(objects3) == 34 and set(objects3) <= set(objects2)
    assert set(objects2) - set(objects1) <= set(objects3)  # the second snapshot's new chunks
    again = create(app, "r3", "--from-snapshot", second["snapshot_id"])
    check(again, model)
    assert app.cli("volume", "delete", "r3", "--yes").exit_code == 0


def test_cached_volume_larger_than_its_cache(app: ApplianceProcess) -> None:
    """64 MiB written to a cached volume with a 16 MiB cache: evicted chunks come back from the
    store bit for bit."""
    rnd = random.Random(7)
    vol = create(app, "big", "--type", "cached", "--size", "1GiB", "--cache-size", "16MiB",
                 "--upload-buffer-size", "32MiB")
    assert vol["cache_bytes"] == 16 * MiB and vol["upload_buffer_bytes"] == 32 * MiB
    data = {i * 3: rnd.randbytes(MiB) for i in range(64)}
    with session(app, vol) as s:
        for i, chunk in data.items():
            write_mib(s, i, chunk)
        sync_cache(s)
        deadline = time.monotonic() + 60
        while (info := cli_json(app, "volume", "show", "big"))["upload_buffer_used_bytes"]:
            assert time.monotonic() < deadline, info
            time.sleep(0.1)
        assert info["cache_used_bytes"] <= 16 * MiB, info
        fetched = info["fetched_bytes"]
        for i, chunk in data.items():
            assert read_mib(s, i) == chunk, f"MiB {i}"
        assert read_mib(s, 1) == bytes(MiB)
    info = cli_json(app, "volume", "show", "big")
    assert info["fetched_bytes"] - fetched >= 48 * MiB, info  # most of it came from the store
    assert info["cache_used_bytes"] <= 16 * MiB and info["status"] == "AVAILABLE"
    listed = next(v for v in cli_json(app, "volume", "list") if v["name"] == "big")
    assert listed["type"] == "cached" and listed["status"] == "AVAILABLE"


def test_cached_snapshot_restores_into_stored(app: ApplianceProcess) -> None:
    rnd = random.Random(8)
    vol = create(app, "cs", "--type", "cached", "--size", "1GiB")
    data = {i: rnd.randbytes(MiB) for i in (0, 5, 900)}
    with session(app, vol) as s:
        for i, chunk in data.items():
            write_mib(s, i, chunk)
        sync_cache(s)
    snap = snapshot(app, "cs")
    assert snap["volume_type"] == "cached"
    with session(app, vol) as s:  # written after the snapshot: not in it
        write_mib(s, 0, bytes(MiB))
    rest = create(app, "cs-r", "--from-snapshot", snap["snapshot_id"])
    with session(app, rest) as s:
        for i, chunk in data.items():
            assert read_mib(s, i) == chunk
    # a clone of a cached volume: its recovery point now (with the overwrite), uploaded first
    clone = cli_json(app, "volume", "clone", "cs", "--name", "cs-clone")
    assert clone["status"] in ("CREATING", "BOOTSTRAPPING", "AVAILABLE"), clone
    clone = wait_status(app, "cs-clone", "AVAILABLE")
    assert clone["type"] == "cached" and clone["source_snapshot"]
    origin = next(s for s in cli_json(app, "snapshot", "list")
                  if s["snapshot_id"] == clone["source_snapshot"])
    assert origin["origin"] == "clone" and origin["status"] == "COMPLETED"
    with session(app, clone) as s:
        assert read_mib(s, 0) == bytes(MiB)
        for i in (5, 900):
            assert read_mib(s, i) == data[i]


def test_schedule_and_errors(app: ApplianceProcess) -> None:
    create(app, "sched", "--size", "1GiB")
    out = cli_json(app, "volume", "schedule", "sched", "--every", "4h", "--start-hour", "3")
    assert out["every_hours"] == 4 and out["start_hour"] == 3
    assert out["next_run_at"] and out["next_run_at"][14:19] == "00:00"
    assert int(out["next_run_at"][11:13]) % 4 == 3
    assert cli_json(app, "volume", "schedule", "sched")["every_hours"] == 4
    assert cli_json(app, "volume", "schedule", "sched", "--off")["every_hours"] is None
    for args in (
        ["volume", "schedule", "sched", "--every", "3h"],
        ["volume", "schedule", "sched", "--every", "4h", "--start-hour", "24"],
        ["volume", "snapshot", "nope"],
        ["snapshot", "delete", "snap-00000000000000000"],
        ["volume", "create", "x", "--from-snapshot", "snap-00000000000000000"],
        ["volume", "create", "x", "--type", "cached", "--size", "33TiB"],
        ["volume", "create", "x", "--type", "cached", "--size", "1GiB", "--cache-size", "1MiB"],
        ["volume", "create", "x"],
        ["volume", "clone", "sched", "--name", "y"],  # no snapshot yet
        ["volume", "clone", "nope", "--name", "y"],
    ):
        result = app.cli(*args)
        assert result.exit_code in (1, 2), (args, result.output)
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1, (
            args, result.output)
    assert app.running


def test_export_snapshot_to_ebs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`vtl snapshot export` writes a snapshot through the EBS direct APIs (moto_server)."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto")
    from tests.cloud.conftest import MotoServer

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")  # the appliance's boto3 reads the standard chain
    server = MotoServer()
    server.start()
    app = ApplianceProcess(tmp_path / "data", extra_args=["--workers", "0"]).start()
    try:
        rnd = random.Random(12)
        vol = create(app, "ebs-src", "--size", "1GiB")
        chunk = rnd.randbytes(MiB)
        with session(app, vol) as s:
            write_mib(s, 7, chunk)
            sync_cache(s)
        snap = snapshot(app, "ebs-src")
        out = cli_json(app, "snapshot", "export", snap["snapshot_id"], "--endpoint-url",
                       server.url, "--wait")
        assert out["status"] == "COMPLETED" and out["blocks"] == 2, out
        client = boto3.client("ebs", region_name="us-east-1", endpoint_url=server.url,
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        blocks = client.list_snapshot_blocks(SnapshotId=out["ebs_snapshot_id"])["Blocks"]
        assert sorted(b["BlockIndex"] for b in blocks) == [14, 15]
        got = b"".join(client.get_snapshot_block(
            SnapshotId=out["ebs_snapshot_id"], BlockIndex=b["BlockIndex"],
            BlockToken=b["BlockToken"])["BlockData"].read()
            for b in sorted(blocks, key=lambda b: b["BlockIndex"]))
        assert got == chunk
    finally:
        assert app.stop() == 0, app.log_tail()
        server.stop()
