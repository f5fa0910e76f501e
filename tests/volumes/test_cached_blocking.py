"""A cached volume waiting on the object store holds up nobody else.

A READ of an evicted chunk of a cached volume GETs the chunk from the store; here that GET is held
on a gate. The volume's target is a blocking target (volumes/service.py), so the command runs on
the iSCSI server's worker thread: a stored volume on the same portal and the control
operations answer meanwhile; after the gate opens the held READ
returns the volume's data.
"""

from __future__ import annotations

import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest

from catalog.db import Catalog, open_catalog
from volumes.service import VolumeService
from vtl.cloud.local import LocalStore
from vtl.iscsi.initiator import Initiator
from vtl.iscsi.target import Targets

from tests.iscsi.helpers import HANG_GUARD, ServerThread

AUTH = "iqn.2026-11.org.vtl.test"
MiB = 1024 * 1024
GIB = 1024 * MiB
WAIT = 10.0


class GatedStore(LocalStore):
    """A LocalStore whose chunk GETs wait for ``gate`` (and say when one is waiting)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()

    def get_object(self, key: str, **kwargs: Any) -> bytes:
        if "/chunks/" in key and not self.gate.is_set():
            self.waiting.set()
            assert self.gate.wait(HANG_GUARD)
        return super().get_object(key, **kwargs)


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    cat = open_catalog(tmp_path / "catalog.db")
    yield cat
    cat.close()


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def login(srv: ServerThread, target: str) -> Initiator:
    """A session whose power-on UNIT ATTENTION is already taken by a TEST UNIT READY."""
    ini = Initiator.connect("127.0.0.1", srv.server.port, timeout=WAIT)
    ini.login(target, initiator_name="iqn.2026-11.org.vtl.test:ini")
    for _ in range(3):
        if ini.execute(0, bytes(6)).status == 0:
            break
    return ini


def test_a_held_store_get_blocks_only_its_own_command(catalog: Catalog, tmp_path: Path) -> None:
    store = GatedStore(tmp_path / "store")
    targets = Targets()
    svc = VolumeService(catalog, tmp_path, targets, AUTH, store=store,
                        cache_bytes=16 * MiB, upload_buffer_bytes=16 * MiB)
    svc.start()
    try:
        ops = svc.ops()
        slow = ops["CreateCachediSCSIVolume"]({"name": "slow", "size_bytes": GIB})
        fast = ops["CreateStorediSCSIVolume"]({"name": "fast", "size_bytes": GIB})
        assert targets.lookup(slow["target_iqn"]).blocking
        assert not targets.lookup(fast["target_iqn"]).blocking

        data = os.urandom(MiB)
        cached = svc._live["slow"].backend
        cached.write(0, data)
        cached.flush()
        assert cached.drain(timeout=HANG_GUARD)
        assert cached.evict_all() > 0  # the chunk is only in the store now

        store.gate.clear()
        with ServerThread(targets) as srv, ThreadPoolExecutor(1) as pool:
            held = login(srv, slow["target_iqn"])
            other = login(srv, fast["target_iqn"])
            try:
                pending = pool.submit(held.execute, 0, read10(0, 8), expect_in=8 * 512)
                assert store.waiting.wait(WAIT)
                # the stored volume, and the control API, answer while the GET is held
                assert other.execute(0, read10(0, 1), expect_in=512).status == 0
                assert ops["DescribeVolume"]({"name": "fast"})["status"] == "AVAILABLE"
                assert not pending.done()
                store.gate.set()
                reply = pending.result(WAIT)
                assert reply.status == 0
                assert reply.data_in == data[:8 * 512]
                assert held.ping(b"after") == b"after"
            finally:
                store.gate.set()
                held.close()
                other.close()
    finally:
        store.gate.set()
        svc.close()
