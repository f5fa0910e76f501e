"""Pools, retrieval model, retention, clocks, store URLs, and the layering rules of vtl.cloud."""

from __future__ import annotations

import ast
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from vtl.cloud import tiers
from vtl.cloud.clock import ClockEpoch, FastClock, ManualClock, SystemClock
from vtl.cloud.store import RestoreTier, StorageClass, StoreError, parse_store_url
from vtl.cloud.tiers import LockMode, Pool, RetentionLock, can_delete, can_move, draw_ready_time
from vtl.errors import InvalidRequest

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
VTL = Path(__file__).resolve().parents[2] / "vtl"


# ---------------------------------------------------------------------------------------- tiers


def test_ready_time_is_deterministic_per_seed() -> None:
    a = draw_ready_time(Pool.GLACIER, T0, "TEST01:req-1")
    assert a == draw_ready_time(Pool.GLACIER, T0, "TEST01:req-1")
    draws = {draw_ready_time(Pool.GLACIER, T0, f"TEST01:req-{i}") for i in range(50)}
    assert len(draws) > 40  # seeds matter


@pytest.mark.parametrize(("pool", "low", "high"), [(Pool.GLACIER, 3, 5), (Pool.DEEP_ARCHIVE, 9, 12)])
def test_ready_time_windows(pool: Pool, low: int, high: int) -> None:
    delays = [draw_ready_time(pool, T0, f"B{i}") - T0 for i in range(500)]
    assert min(delays) >= timedelta(hours=low) and max(delays) <= timedelta(hours=high)
    assert max(delays) - min(delays) > timedelta(hours=(high - low) * 0.8)  # spread over the window
    assert all(d.microseconds == 0 for d in delays)


def test_deeper_pool_is_never_faster() -> None:
    assert Pool.GLACIER.retrieval_window.high <= Pool.DEEP_ARCHIVE.retrieval_window.low


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError):
        draw_ready_time(Pool.GLACIER, datetime(2026, 1, 1), "x")


def test_pools() -> None:
    assert Pool.GLACIER.storage_class is StorageClass.GLACIER
    assert Pool.DEEP_ARCHIVE.storage_class is StorageClass.DEEP_ARCHIVE
    assert Pool.parse("DEEP_ARCHIVE") is Pool.DEEP_ARCHIVE and Pool.parse("glacier") is Pool.GLACIER
    with pytest.raises(InvalidRequest):
        Pool.parse("tape-closet")


def test_pool_moves_are_one_way() -> None:
    assert can_move(Pool.GLACIER, Pool.DEEP_ARCHIVE)
    back = can_move(Pool.DEEP_ARCHIVE, Pool.GLACIER)
    assert not back and "one-way" in back.reason
    assert not can_move(Pool.GLACIER, Pool.GLACIER)


def test_minimum_storage_charge() -> None:
    assert tiers.incurs_early_deletion_charge(Pool.GLACIER, T0, T0 + timedelta(days=89))
    assert not tiers.incurs_early_deletion_charge(Pool.GLACIER, T0, T0 + timedelta(days=90))
    assert tiers.early_deletion_remaining(Pool.GLACIER, T0, T0 + timedelta(days=30)) == timedelta(days=60)
    assert tiers.incurs_early_deletion_charge(Pool.DEEP_ARCHIVE, T0, T0 + timedelta(days=120))


def test_restore_tiers() -> None:
    w = tiers.restore_window(StorageClass.GLACIER, RestoreTier.EXPEDITED)
    assert w.high == timedelta(minutes=5)
    with pytest.raises(InvalidRequest):
        tiers.restore_window(StorageClass.DEEP_ARCHIVE, RestoreTier.EXPEDITED)
    r = tiers.restore_ready_time(StorageClass.DEEP_ARCHIVE, RestoreTier.BULK, T0, "k")
    assert T0 + timedelta(hours=36) <= r <= T0 + timedelta(hours=48)


def test_retention_lock_validation() -> None:
    RetentionLock(LockMode.COMPLIANCE, 0)
    RetentionLock(LockMode.COMPLIANCE, 36_500)
    for bad in (-1, 36_501):
        with pytest.raises(InvalidRequest):
            RetentionLock(LockMode.GOVERNANCE, bad)
    with pytest.raises(InvalidRequest):
        RetentionLock(LockMode.GOVERNANCE, True)  # type: ignore[arg-type]


def test_can_delete_under_retention() -> None:
    assert can_delete(T0, None, T0)
    assert can_delete(T0, RetentionLock(LockMode.COMPLIANCE, 0), T0)
    comp = RetentionLock(LockMode.COMPLIANCE, 30)
    gov = RetentionLock(LockMode.GOVERNANCE, 30)
    early = T0 + timedelta(days=29, hours=23)
    v = can_delete(T0, comp, early)
    assert not v and "compliance" in v.reason
    assert not can_delete(T0, comp, early, bypass_governance=True)
    assert not can_delete(T0, gov, early)
    assert can_delete(T0, gov, early, bypass_governance=True)
    assert can_delete(T0, comp, T0 + timedelta(days=30))


# ---------------------------------------------------------------------------------------- clocks


def test_manual_clock() -> None:
    c = ManualClock(T0)
    assert c.now() == T0 and c.monotonic() == 0
    c.advance(90)
    c.advance(timedelta(minutes=1))
    assert c.now() == T0 + timedelta(seconds=150) and c.monotonic() == 150
    with pytest.raises(ValueError):
        c.advance(-1)
    with pytest.raises(ValueError):
        ManualClock(datetime(2026, 1, 1))


def test_system_clock_is_aware_utc() -> None:
    now = SystemClock().now()
    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)
    c = SystemClock()
    assert c.monotonic() <= c.monotonic()


def test_fast_clock_runs_n_times_faster() -> None:
    base = ManualClock(T0)
    fast = FastClock(3600, base=base)
    assert fast.now() == T0
    base.advance(5)
    assert fast.now() == T0 + timedelta(hours=5)
    assert fast.monotonic() == 5 * 3600


def test_fast_clock_epoch_survives_restart() -> None:
    base = ManualClock(T0)
    fast = FastClock(60, base=base)
    base.advance(10)
    stored = fast.epoch.to_json()
    base.advance(100)  # the appliance is down: model time keeps running with wall time
    again = FastClock(60, base=base, epoch=ClockEpoch.from_json(stored))
    assert again.now() == fast.now() == T0 + timedelta(seconds=110 * 60)
    with pytest.raises(ValueError):
        FastClock(10, base=base, epoch=ClockEpoch.from_json(stored))
    with pytest.raises(ValueError):
        ClockEpoch(T0, T0, 0)


# ---------------------------------------------------------------------------------------- URLs


def test_parse_store_url() -> None:
    u = parse_store_url("s3://bucket/vtl/gw1")
    assert (u.scheme, u.bucket, u.prefix) == ("s3", "bucket", "vtl/gw1/")
    assert parse_store_url("s3://bucket").prefix == ""
    u = parse_store_url("s3://b/p/?endpoint=http://127.0.0.1:9000&region=eu-west-1")
    assert (u.endpoint_url, u.region, u.prefix) == ("http://127.0.0.1:9000", "eu-west-1", "p/")
    assert parse_store_url("file:///var/lib/vtl/store").path == Path("/var/lib/vtl/store")
    assert parse_store_url("/data/store").path == Path("/data/store")
    assert parse_store_url("relative/store").scheme == "file"
    for bad in ("", "s3:///prefix", "gs://bucket", "s3://b/p?colour=red", "file://host/x"):
        with pytest.raises(StoreError):
            parse_store_url(bad)


def test_open_store_local(tmp_path: Path) -> None:
    from vtl.cloud.local import LocalStore
    from vtl.cloud.store import open_store

    store = open_store(str(tmp_path / "s"), clock=ManualClock())
    assert isinstance(store, LocalStore)
    store.put_object("k", b"v")
    assert open_store(f"file://{tmp_path / 's'}").get_object("k") == b"v"


# ---------------------------------------------------------------------------------------- layering


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_s3_module_imports_boto() -> None:
    offenders = [
        str(p.relative_to(VTL.parent))
        for p in VTL.rglob("*.py")
        if p.name != "s3.py" or p.parent.name != "cloud"
        if _imports(p) & {"boto3", "botocore", "s3transfer"}
    ]
    assert offenders == []


def test_tiers_model_is_pure() -> None:
    src = VTL / "cloud" / "tiers.py"
    assert not _imports(src) & {"time", "threading", "asyncio", "socket", "boto3", "botocore", "sqlite3"}
    calls = {n.func.attr for n in ast.walk(ast.parse(src.read_text())) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert not calls & {"now", "utcnow", "today", "time", "monotonic"}
