"""Custom pools with retention locks, and deleting tapes with their objects (CloudService
in-process on a real Library, catalog and LocalStore with a ManualClock)."""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta
from typing import Any

import pytest

from catalog import tapes as q
from tests.cloud.test_jobs import _service, _write, rig  # noqa: F401  (the fixture)
from vtl.cloud import tapestore as ts
from vtl.cloud.store import StorageClass
from vtl.errors import Conflict, InvalidRequest, NotFound
from vtl.library.library import GiB


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def _archived(svc: Any, catalog: Any, barcode: str) -> dict[str, Any]:
    async def go() -> None:
        svc.archive_tape({"barcode": barcode})
        await svc._job_archive(barcode, {})
    run(go())
    row = q.get_tape(catalog.db, barcode)
    assert row is not None and row["status"] == "ARCHIVED"
    return row


def test_pool_create_list_delete_and_validation(rig: Any) -> None:
    lib, store, clock, catalog = rig
    svc = _service(lib, store, clock, catalog)
    ops = svc.ops()
    made = ops["CreateTapePool"]({"name": "Legal", "storage_class": "deep-archive",
                                  "retention_lock": "compliance", "retention_days": 365})
    assert made == {**made, "name": "Legal", "storage_class": "deep-archive",
                    "retention_lock": "compliance", "retention_days": 365, "custom": True}
    bad = [
        {"name": "glacier", "storage_class": "glacier"},  # a built-in name
        {"name": "Legal", "storage_class": "glacier"},  # exists
        {"name": "x", "storage_class": "tape-vault"},
        {"name": "x", "storage_class": "glacier", "retention_lock": "forever",
         "retention_days": 1},
        {"name": "x", "storage_class": "glacier", "retention_lock": "governance",
         "retention_days": 36_501},
        {"name": "x", "storage_class": "glacier", "retention_lock": "governance"},
        {"name": "x", "storage_class": "glacier", "retention_days": 5},
        {"name": "", "storage_class": "glacier"},
        {"name": "a/b", "storage_class": "glacier"},
    ]
    for args in bad:
        with pytest.raises((InvalidRequest, Conflict)):
            ops["CreateTapePool"](args)
    names = [p["name"] for p in ops["ListTapePools"]({})["pools"]]
    assert names == ["glacier", "deep-archive", "Legal"]

    tape = lib.create_tapes({"prefix": "PL", "count": 1, "size_bytes": 100 * GiB,
                             "pool": "legal"})["tapes"][0]
    assert tape["pool"] == "Legal"
    with pytest.raises(InvalidRequest):
        lib.create_tapes({"prefix": "PL", "count": 1, "size_bytes": 100 * GiB, "pool": "nope"})
    with pytest.raises(Conflict, match="still holds 1 tape"):
        ops["DeleteTapePool"]({"name": "Legal"})
    listed = {p["name"]: p for p in ops["ListTapePools"]({})["pools"]}
    assert listed["Legal"]["tapes"] == 1
    with pytest.raises(NotFound):
        ops["DeleteTapePool"]({"name": "glacier"})
    svc.close()


def test_retention_locks_hold_deletes(rig: Any) -> None:
    lib, store, clock, catalog = rig
    svc = _service(lib, store, clock, catalog)
    ops = svc.ops()
    ops["CreateTapePool"]({"name": "comp", "storage_class": "deep-archive",
                           "retention_lock": "compliance", "retention_days": 30})
    ops["CreateTapePool"]({"name": "gov", "storage_class": "glacier",
                           "retention_lock": "governance", "retention_days": 30})
    comp = lib.create_tapes({"prefix": "CO", "count": 1, "size_bytes": 100 * GiB,
                             "pool": "comp"})["tapes"][0]["barcode"]
    gov = lib.create_tapes({"prefix": "GO", "count": 1, "size_bytes": 100 * GiB,
                            "pool": "gov"})["tapes"][0]["barcode"]
    _write(lib, comp, [os.urandom(5000)])
    row = _archived(svc, catalog, comp)
    assert row["retention_lock"] == "compliance"
    key = ts.segment_key(comp, "seg-000000.dat")
    assert store.head_object(key).storage_class is StorageClass.DEEP_ARCHIVE  # pool's class
    _archived(svc, catalog, gov)

    with pytest.raises(Conflict, match="compliance retention lock until .*cannot be deleted"):
        svc.delete_archive({"barcode": comp, "bypass_governance": True})
    with pytest.raises(Conflict, match="governance retention lock .*--bypass-governance"):
        svc.delete_archive({"barcode": gov})
    assert svc.delete_archive({"barcode": gov, "bypass_governance": True})["status"] == "DELETING"
    clock.advance(timedelta(days=29))
    with pytest.raises(Conflict):
        svc.delete_archive({"barcode": comp})
    clock.advance(timedelta(days=1, seconds=1))  # the lock has ended
    assert svc.delete_archive({"barcode": comp})["status"] == "DELETING"

    async def deleted() -> None:
        await svc._job_delete(comp, {})
    run(deleted())
    assert q.get_tape(catalog.db, comp)["status"] == "DELETED"
    assert list(store.list_objects(ts.tape_prefix(comp))) == []
    run(svc._job_delete(gov, {}))
    assert ops["DeleteTapePool"]({"name": "comp"})["name"] == "comp"  # empty now
    assert [p["name"] for p in ops["ListTapePools"]({})["pools"]] == [
        "glacier", "deep-archive", "gov"]
    svc.close()


def test_deleting_a_tape_removes_its_uploaded_objects(rig: Any) -> None:
    lib, store, clock, catalog = rig
    svc = _service(lib, store, clock, catalog)
    lib.defer_delete = True  # what CloudService.start sets
    barcode = lib.create_tapes({"prefix": "DL", "count": 1,
                                "size_bytes": 100 * GiB})["tapes"][0]["barcode"]
    _write(lib, barcode, [os.urandom(20_000) for _ in range(12)])
    run(svc._job_upload(barcode, {}))
    assert list(store.list_objects(ts.tape_prefix(barcode)))  # sealed segments + manifest
    reply = lib.ops()["DeleteTape"]({"barcode": barcode})
    assert reply["status"] == "DELETING"
    svc._resume_tapes()  # the job loop gives every DELETING tape its job
    from catalog import jobs as jq
    assert jq.unfinished_job(catalog.db, "delete", barcode) is not None
    run(svc._job_delete(barcode, {}))
    assert q.get_tape(catalog.db, barcode)["status"] == "DELETED"
    assert list(store.list_objects(ts.tape_prefix(barcode))) == []
    assert not lib.tape_dir(barcode).exists()
    svc.close()
