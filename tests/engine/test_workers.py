"""The process-pool engine: drive targets served by worker processes (vtl/engine/workers.py).

Real ``vtl serve`` processes, real iSCSI sessions through libiscsi over 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from tests.engine.helpers import block, load_tapes, start, status, wait_for
from tests.support.libiscsi import LibiscsiError, Session, library_available

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not library_available(), reason="libiscsi not installed")]

KiB = 1024
MiB = 1024 * KiB


def test_drive_targets_run_in_worker_processes(tmp_path: Path) -> None:
    app = start(tmp_path / "data", workers=2)
    try:
        info = app.call("DescribeGatewayInformation")["result"]
        assert info["workers"] == 2
        pids = info["worker_pids"]
        assert len(pids) == 2 and info["pid"] not in pids
        [drive1, drive2] = load_tapes(app, 2)
        with Session((app.portal, drive1, 0)) as s1, Session((app.portal, drive2, 0)) as s2:
            s1.write6(block(1, 0, 64 * KiB)).check()
            s2.write6(block(2, 0, 256 * KiB)).check()
            drives = status(app)["drives"]
        assert drives[0]["worker_pid"] == pids[0] and drives[1]["worker_pid"] == pids[1]
        assert drives[0]["bytes_written"] == 64 * KiB
        assert drives[1]["bytes_written"] == 256 * KiB
        out = app.cli("library", "status").output
        assert "WRITE/s" in out and "256 KiB" in out
    finally:
        assert app.stop() == 0, app.log_tail()


def test_in_process_mode_still_serves(tmp_path: Path) -> None:
    app = start(tmp_path / "data", workers=0)
    try:
        assert app.call("DescribeGatewayInformation")["result"]["worker_pids"] == []
        [drive1] = load_tapes(app, 1)
        with Session((app.portal, drive1, 0)) as s:
            s.write6(block(1, 0, 64 * KiB)).check()
            s.rewind().check()
            assert s.read6(64 * KiB).check().data == block(1, 0, 64 * KiB)
        assert status(app)["drives"][0]["bytes_written"] == 64 * KiB
    finally:
        assert app.stop() == 0, app.log_tail()


def test_killed_worker_is_restarted_and_tape_is_intact_to_last_filemark(tmp_path: Path) -> None:
    app = start(tmp_path / "data", workers=2)
    size = 64 * KiB
    try:
        [drive1] = load_tapes(app, 1)
        pid = status(app)["drives"][0]["worker_pid"]
        with Session((app.portal, drive1, 0), timeout=10) as s:
            for n in range(40):
                s.write6(block(1, n, size)).check()
            s.write_filemarks(1).check()  # durability point
            written = 40
            # kill the worker while a writer is streaming
            killed = threading.Event()

            def kill_soon() -> None:
                wait_for(lambda: written > 60, 30, "writes after the filemark")
                os.kill(pid, signal.SIGKILL)
                killed.set()

            killer = threading.Thread(target=kill_soon)
            killer.start()
            with pytest.raises((LibiscsiError, Exception)):
                while True:
                    res = s.write6(block(1, written, size))
                    res.check()
                    written += 1
            killer.join()
            assert killed.is_set()
        # the supervisor restarts the worker and loads the tape again
        new = wait_for(lambda: (d := status(app)["drives"][0])["worker_pid"] not in (None, pid)
                       and d["barcode"] and d, 60, "worker restart")
        assert new["barcode"] == status(app)["drives"][0]["barcode"]
        with Session((app.portal, drive1, 0)) as s:  # the initiator logs in again
            s.rewind().check()
            for n in range(40):
                assert s.read6(size).check().data == block(1, n, size), f"block {n}"
            fm = s.read6(size)
            assert fm.check_condition and fm.filemark
            # after the durability point: a prefix of what was sent, each block intact
            n = 40
            while True:
                res = s.read6(size)
                if not res.good:
                    break
                assert res.data == block(1, n, size), f"block {n} after the filemark"
                n += 1
            assert n <= written + 1
        assert "died" in app.log_tail(200)
    finally:
        assert app.stop() == 0, app.log_tail()


def test_ten_drives_written_in_parallel_read_back_bit_exact(tmp_path: Path) -> None:
    app = start(tmp_path / "data", workers=4)
    blocks, size = 24, 256 * KiB
    try:
        iqns = load_tapes(app, 10)
        errors: list[BaseException] = []
        barrier = threading.Barrier(10)

        def write(i: int, iqn: str) -> None:
            try:
                with Session((app.portal, iqn, 0)) as s:
                    barrier.wait(30)
                    for n in range(blocks):
                        s.write6(block(i, n, size)).check()
                    s.write_filemarks(1).check()
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(i, iqn)) for i, iqn in enumerate(iqns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        drives = status(app)["drives"]
        assert len({d["worker_pid"] for d in drives}) == 4
        assert all(d["bytes_written"] == blocks * size for d in drives)
        for i, iqn in enumerate(iqns):
            with Session((app.portal, iqn, 0)) as s:
                s.rewind().check()
                for n in range(blocks):
                    assert s.read6(size).check().data == block(i, n, size), (i, n)
                assert s.read6(size).filemark
    finally:
        assert app.stop() == 0, app.log_tail()


def test_header_digests_negotiated_at_login_hold_in_the_worker(tmp_path: Path) -> None:
    """The supervisor negotiates CRC32C header digests; the worker resumes with them."""
    app = start(tmp_path / "data", workers=1)
    size = 300_000  # not a multiple of anything: several Data-Out PDUs and a partial one
    try:
        [drive1] = load_tapes(app, 1)
        with Session((app.portal, drive1, 0), header_digest="crc32c") as s:
            for n in range(8):
                s.write6(block(1, n, size)).check()
            s.rewind().check()
            for n in range(8):
                assert s.read6(size).check().data == block(1, n, size)
    finally:
        assert app.stop() == 0, app.log_tail()
