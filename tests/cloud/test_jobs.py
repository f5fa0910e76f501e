"""CloudService in-process (no subprocess): a real Library on a catalog, a LocalStore and a
ManualClock. Covers the sealed-segment upload job, LRU cache eviction, the read-back of evicted
segments by ranged GETs when a drive loads the tape, and retrieval timing on the model clock."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from catalog import jobs as jq
from catalog import tapes as q
from catalog.db import open_catalog
from vtl.cloud import tapestore as ts
from vtl.cloud.clock import ManualClock
from vtl.cloud.local import LocalStore
from vtl.engine.jobs import CloudService, Wait
from vtl.iscsi.target import Targets
from vtl.library.cartridge import Cartridge
from vtl.library.elements import ElementLayout
from vtl.library.library import GiB, Library
from vtl.scsi.sense import Asc, SenseError, SenseKey

SEG = 64 * 1024


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def rig(tmp_path: Path) -> Any:
    catalog = open_catalog(tmp_path / "catalog.db")
    lib = Library(catalog, tmp_path, Targets(), "iqn.2026-11.org.test", "sgw-00000001",
                  layout=ElementLayout(drives=2, storage=4, import_export=4))
    lib.start()
    clock = ManualClock()
    store = LocalStore(tmp_path / "store", clock=clock, durable=False)
    yield lib, store, clock, catalog
    lib.close()
    catalog.close()


def _service(lib: Library, store: LocalStore, clock: ManualClock, catalog: Any,
             **kw: Any) -> CloudService:
    svc = CloudService(catalog, lib.data_dir, lib, store, clock=clock, **kw)
    lib.before_mount = svc._hydrate
    return svc


def _write(lib: Library, barcode: str, blocks: list[bytes]) -> None:
    with Cartridge.open(lib.tape_dir(barcode), segment_size=SEG) as cart:
        for b in blocks:
            cart.write_block(b)
        cart.write_filemarks(1)


def _first_file(cart: Any) -> list[bytes]:
    """The data blocks from the cartridge's position up to the next filemark or end of data."""
    got = []
    while (obj := cart.read_next()) is not None and not obj.is_filemark:
        got.append(obj.data)
    return got


async def _loaded(drive: Any, tries: int = 1000) -> None:
    """Give a drive that is becoming ready up to ~10 s to get its cartridge (a bound, not a
    timing claim; the caller asserts on the cartridge afterwards)."""
    for _ in range(tries):
        if drive.cartridge is not None:
            return
        await asyncio.sleep(0.01)


def test_upload_evict_and_read_back_on_load(rig: Any) -> None:
    lib, store, clock, catalog = rig
    barcode = lib.create_tapes({"prefix": "EV", "count": 1, "size_bytes": 100 * GiB})["tapes"][0]["barcode"]
    blocks = [os.urandom(20_000) for _ in range(12)]
    _write(lib, barcode, blocks)
    svc = _service(lib, store, clock, catalog, cache_size=0)

    async def scenario() -> None:
        svc._scan_uploads()
        assert jq.unfinished_job(catalog.db, "upload", barcode) is not None
        await svc._job_upload(barcode, {})
        tape = q.get_tape(catalog.db, barcode)
        manifest = ts.load_manifest(store, barcode)
        assert manifest is not None and tape is not None
        assert tape["cloud_bytes"] == manifest.cloud_bytes > 0
        freed = await svc._io(svc._evict_some, [barcode])
        assert freed == sum(e.size for e in manifest.segments)

    run(scenario())
    tape_dir = lib.tape_dir(barcode)
    assert len(ts.evicted_stubs(tape_dir)) >= 2 and len(ts.local_segments(tape_dir)) == 1
    changer = lib.changer
    assert changer is not None
    drive0 = lib.layout.drive_address(0)
    drive = changer.drive(0)
    held = threading.Event()
    real_get = store.get_object

    def held_get(key: str, **kw: Any) -> bytes:  # the store answers only when released
        assert held.wait(30)
        return real_get(key, **kw)

    store.get_object = held_get  # type: ignore[method-assign]

    async def load() -> None:
        # MOVE MEDIUM returns at once; the drive is becoming ready while the fetch is held
        changer.move_medium(changer.locate(barcode) or 0, drive0)
        with pytest.raises(SenseError) as err:
            drive.ready()
        assert (err.value.key, err.value.asc) == (SenseKey.NOT_READY, Asc.LUN_BECOMING_READY)
        assert drive.cartridge is None and changer.locate(barcode) == drive0
        held.set()
        for _ in range(500):
            if drive.cartridge is not None:
                break
            await asyncio.sleep(0.01)
        drive.ready()  # loaded now

    run(load())
    cart = drive.cartridge
    assert cart is not None and ts.evicted_stubs(tape_dir) == []
    assert _first_file(cart) == blocks
    svc.close()


def test_a_loaded_tape_is_never_evicted(rig: Any) -> None:
    lib, store, clock, catalog = rig
    barcode = lib.create_tapes({"prefix": "LD", "count": 1, "size_bytes": 100 * GiB})["tapes"][0]["barcode"]
    _write(lib, barcode, [os.urandom(20_000) for _ in range(12)])
    svc = _service(lib, store, clock, catalog, cache_size=0)
    ts.upload_tape(store, barcode, lib.tape_dir(barcode), final=False)
    with Cartridge.open(lib.tape_dir(barcode)):  # a drive holds the cartridge
        assert svc._evict_some([barcode]) == 0
    assert ts.evicted_stubs(lib.tape_dir(barcode)) == []
    svc.close()


def test_retrieval_waits_for_the_model_clock(rig: Any) -> None:
    lib, store, clock, catalog = rig
    barcode = lib.create_tapes({"prefix": "RT", "count": 1, "size_bytes": 100 * GiB})["tapes"][0]["barcode"]
    svc = _service(lib, store, clock, catalog)

    async def scenario() -> None:
        svc.archive_tape({"barcode": barcode})
        await svc._job_archive(barcode, {})
        assert q.get_tape(catalog.db, barcode)["status"] == "ARCHIVED"
        reply = svc.retrieve_tape({"barcode": barcode})
        assert 3 * 3600 <= reply["eta_seconds"] <= 5 * 3600
        with pytest.raises(Wait):
            await svc._job_retrieve(barcode, {})
        clock.advance(reply["eta_seconds"] - 60)
        with pytest.raises(Wait):
            await svc._job_retrieve(barcode, {"restores_requested": True})
        clock.advance(13 * 3600)  # past the ready time and the store's own restore
        await svc._job_retrieve(barcode, {"restores_requested": True})

    run(scenario())
    tape = q.get_tape(catalog.db, barcode)
    assert tape["status"] == "RETRIEVED" and tape["element_address"] is not None
    svc.close()


def test_jobs_left_running_by_a_dead_process_are_resumed(tmp_path: Path) -> None:
    catalog = open_catalog(tmp_path / "catalog.db")
    db = catalog.db
    first = jq.ensure_job(db, "archive", "AB00001", "2026-01-01T00:00:00+00:00")
    assert jq.ensure_job(db, "archive", "AB00001", "2026-01-01T00:00:01+00:00") == first
    jq.update_job(db, first, state="running")
    assert jq.due_jobs(db, "2026-01-01T00:00:05+00:00") == []
    assert jq.requeue_running(db, "2026-01-01T00:00:05+00:00") == 1
    assert [j["id"] for j in jq.due_jobs(db, "2026-01-01T00:00:05+00:00")] == [first]
    jq.update_job(db, first, state="done")
    assert jq.ensure_job(db, "archive", "AB00001", "2026-01-01T00:00:06+00:00") != first
    catalog.close()


def test_model_clock_epoch_is_kept_across_restarts(tmp_path: Path) -> None:
    from vtl.cloud.clock import FastClock, SystemClock
    from vtl.engine.cloudsetup import CLOCK_SETTING, model_clock

    catalog = open_catalog(tmp_path / "catalog.db")
    assert isinstance(model_clock(catalog, 1.0), SystemClock)
    a = model_clock(catalog, 3600.0)
    b = model_clock(catalog, 3600.0)
    assert isinstance(a, FastClock) and isinstance(b, FastClock) and a.epoch == b.epoch
    reached = b.now()
    c = model_clock(catalog, 10.0)  # a new speed continues from the model time reached
    assert isinstance(c, FastClock) and c.epoch.model >= reached and c.speed == 10.0
    assert catalog.get_setting(CLOCK_SETTING)
    catalog.close()


def _evicted_tape(rig: Any, prefix: str) -> tuple[str, list[bytes], Any]:
    """A new tape with one file of 12 random blocks, uploaded and evicted from the cache:
    (barcode, the blocks, the cloud service, cache size 0)."""
    lib, store, clock, catalog = rig
    barcode = lib.create_tapes({"prefix": prefix, "count": 1,
                                "size_bytes": 100 * GiB})["tapes"][0]["barcode"]
    blocks = [os.urandom(20_000) for _ in range(12)]
    _write(lib, barcode, blocks)
    svc = _service(lib, store, clock, catalog, cache_size=0)
    ts.upload_tape(store, barcode, lib.tape_dir(barcode), final=False)
    assert svc._evict_some([barcode]) > 0
    return barcode, blocks, svc


def test_a_load_waits_becoming_ready_while_the_store_is_down(
        rig: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from vtl.cloud.store import StoreUnavailable

    lib, store, clock, catalog = rig
    barcode, blocks, svc = _evicted_tape(rig, "DN")
    calls = []

    def down(*a: Any, **k: Any) -> bytes:
        calls.append(a)
        raise StoreUnavailable("endpoint down")

    monkeypatch.setattr(store, "get_object", down)
    changer = lib.changer
    assert changer is not None
    drive = changer.drive(0)

    async def scenario() -> None:
        changer.move_medium(changer.locate(barcode) or 0, lib.layout.drive_address(0))
        for _ in range(300):  # the fetch fails and is retried; the drive stays not ready
            if len(calls) >= 2:
                break
            await asyncio.sleep(0.01)
        assert len(calls) >= 2
        with pytest.raises(SenseError) as err:
            drive.ready()
        assert (err.value.key, err.value.asc) == (SenseKey.NOT_READY, Asc.LUN_BECOMING_READY)
        assert drive.cartridge is None
        assert ts.evicted_stubs(lib.tape_dir(barcode))  # nothing opened with a hole in it
        monkeypatch.undo()  # the endpoint is back: the retry loads the tape, data intact
        await _loaded(drive)

    run(scenario())
    cart = drive.cartridge
    assert cart is not None
    assert _first_file(cart) == blocks
    svc.close()


def test_a_restart_while_a_drive_is_becoming_ready_loses_nothing(rig: Any, tmp_path: Path) -> None:
    """The appliance stops while an evicted tape in a drive is being fetched back: at the next
    start the drive is becoming ready again (the cartridge is never opened with its segments
    missing, which recovery would take for a gap), the fetch runs again and the tape loads."""
    from vtl.library.cartridge import Cartridge as Cart
    from vtl.library.cartridge import SegmentsEvicted

    lib, store, clock, catalog = rig
    barcode, blocks, svc = _evicted_tape(rig, "RS")
    held = threading.Event()
    real_get = store.get_object

    def held_get(key: str, **kw: Any) -> bytes:  # held, then cut by the stop
        from vtl.cloud.store import StoreUnavailable
        held.wait(30)
        raise StoreUnavailable("connection lost at shutdown")

    store.get_object = held_get  # type: ignore[method-assign]
    changer = lib.changer
    assert changer is not None

    async def load_then_stop() -> None:
        changer.move_medium(changer.locate(barcode) or 0, lib.layout.drive_address(0))
        assert changer.drive(0).becoming_ready == barcode
        svc.close()  # the appliance stops with the fetch held

    run(load_then_stop())
    held.set()
    svc._pool.shutdown(wait=True)  # the cut fetch has ended
    lib.close()
    tape_dir = lib.tape_dir(barcode)
    with pytest.raises(SegmentsEvicted):
        Cart.open(tape_dir)  # never opened with a hole
    store.get_object = real_get  # type: ignore[method-assign]

    lib2 = Library(catalog, tmp_path, Targets(), "iqn.2026-11.org.test", "sgw-00000001",
                   layout=ElementLayout(drives=2, storage=4, import_export=4))
    lib2.start()
    drive = lib2.drives[0]
    assert drive.becoming_ready == barcode and ts.evicted_stubs(tape_dir)
    svc2 = CloudService(catalog, tmp_path, lib2, store, clock=clock, cache_size=None)

    async def restart() -> None:
        svc2.start()
        await _loaded(drive)
        svc2.close()

    run(restart())
    cart = drive.cartridge
    assert cart is not None
    assert _first_file(cart) == blocks
    lib2.close()
