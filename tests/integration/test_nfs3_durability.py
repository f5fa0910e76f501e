"""NFS v3 at size and across a crash, on ``vtl serve`` with its embedded store.

- A 1 GiB file goes in with ``nfs-cp`` and comes back bit-exact (SHA-256 of both streams).
- kill -9 while a client writes: every byte the client had acknowledged as durable (``nfs-rs``
  returns from ``write_at`` only after COMMIT, or a FILE_SYNC reply) reads back after the
  restart; the file handle the client held still names the same file (handles survive
  restarts) and the write verifier is a new one, so a client holding UNSTABLE writes resends
  them. The settle time is long, so the data is only in the local cache when the appliance
  dies: the cache itself must be durable.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import threading
from pathlib import Path

import pytest

from fileshare.nfs3types import Proc, ReadArgs, StableHow, Stat, WriteArgs, unpack_wcc_data
from tests.fileshare.nfsclients import RawNfs, libnfs_url, need_libnfs, nfs_rs_connect, run_tool
from tests.support.appliance import ApplianceProcess

pytestmark = [pytest.mark.integration]

MiB = 1 << 20
GiB = 1 << 30


def _share(app: ApplianceProcess, name: str) -> None:
    result = app.cli("share", "create", "--name", name)
    assert result.exit_code == 0, result.output


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def test_one_gib_round_trips_bit_exact_with_nfs_cp(tmp_path: Path) -> None:
    need_libnfs()
    src = tmp_path / "big.bin"
    h = hashlib.sha256()
    with open(src, "wb") as f:
        for _ in range(GiB // (8 * MiB)):
            # random throughout: a chunk at a wrong offset cannot match by chance
            block = os.urandom(8 * MiB)
            h.update(block)
            f.write(block)
    want = h.hexdigest()
    with ApplianceProcess(tmp_path / "data") as app:
        _share(app, "big")
        url = libnfs_url(app.nfs_port, app.mount_port, "/big", "big.bin")
        run_tool("nfs-cp", str(src), url, timeout=600)
        src.unlink()  # the copy back must come from the appliance
        back = tmp_path / "back.bin"
        try:
            run_tool("nfs-cp", url, str(back), timeout=600)
            assert back.stat().st_size == GiB
            assert _file_sha(back) == want
        finally:
            back.unlink(missing_ok=True)  # pytest keeps old tmp dirs: leave no GiB behind
    shutil.rmtree(tmp_path / "data", ignore_errors=True)


def test_kill_9_during_writes_loses_nothing_committed(tmp_path: Path) -> None:
    nfs_rs = pytest.importorskip("nfs_rs")
    chunk = MiB
    rng = random.Random(7)
    chunks = [rng.randbytes(chunk) for _ in range(64)]
    app = ApplianceProcess(tmp_path / "data", extra_args=["--share-settle", "3600"])
    app.start()
    try:
        _share(app, "crash")
        acked = 0
        killed = threading.Event()
        errors: list[BaseException] = []
        c = nfs_rs_connect(app.nfs_port, app.mount_port, "/crash", uid=1000, gid=1000)
        try:
            c.mkdir("sub")
            with c.open("sub/before.bin", "wb") as f:  # complete and durable before the crash
                f.write(b"".join(chunks[:4]))
            before = c.stat("sub/before.bin")
            sub_fh = next(e.fh for e in c.scandir("") if e.name == "sub")
            file_fh = next(e.fh for e in c.scandir("sub") if e.name == "before.bin")
            assert sub_fh and file_fh
            # An UNSTABLE write that is never committed (of the bytes already there, so the
            # content checks hold whether it survives or not): its verifier must change.
            raw = RawNfs(app.nfs_port)
            try:
                stat, u = raw.call(Proc.WRITE, WriteArgs(file_fh, 0, 4, StableHow.UNSTABLE,
                                                         chunks[0][:4]))
                assert stat == Stat.OK
                unpack_wcc_data(u)
                assert (u.uint(), u.uint()) == (4, StableHow.UNSTABLE)
                verf_before = u.fopaque(8)
            finally:
                raw.close()

            def killer() -> None:
                while acked < 6:
                    if errors:
                        return
                    threading.Event().wait(0.005)
                app.kill9()
                killed.set()

            t = threading.Thread(target=killer)
            t.start()
            try:
                with c.open("log.bin", "wb") as f:
                    for i, data in enumerate(chunks):
                        f.write_at(data, i * chunk)  # returns once the bytes are committed
                        acked = i + 1
            except nfs_rs.NfsError:
                pass  # the server died under the writer: expected
            except BaseException as exc:  # noqa: BLE001 - let the killer thread stop
                errors.append(exc)
                raise
            finally:
                t.join(30)
        finally:
            with contextlib.suppress(nfs_rs.NfsError):
                c.close()  # the server is gone: UMNT fails
        assert killed.is_set(), "the appliance finished before it could be killed"
        assert 6 <= acked < len(chunks), acked

        app.restart()
        with nfs_rs_connect(app.nfs_port, app.mount_port, "/crash", uid=1000, gid=1000) as c:
            assert c.stat("sub/before.bin").fileid == before.fileid
            # the directory handle from before the crash still works (READDIRPLUS on it)
            listed = c.scandir(nfs_rs.DirectoryRef("sub", fh=sub_fh))
            assert [e.name for e in listed] == ["before.bin"]
            with c.open("sub/before.bin", "rb") as f:
                assert f.read() == b"".join(chunks[:4])
        raw = RawNfs(app.nfs_port)
        try:
            stat, u = raw.call(Proc.COMMIT, ReadArgs(file_fh, 0, 0))
            assert stat == Stat.OK
            unpack_wcc_data(u)
            assert u.fopaque(8) != verf_before  # the client knows to resend uncommitted writes
        finally:
            raw.close()
        with nfs_rs_connect(app.nfs_port, app.mount_port, "/crash", uid=1000, gid=1000) as c:
            info = c.stat("log.bin")
            assert info.size >= acked * chunk
            with c.open("log.bin", "rb") as f:
                got = f.read_at(0, acked * chunk)
            for i in range(acked):
                assert got[i * chunk:(i + 1) * chunk] == chunks[i], f"chunk {i} lost"
        assert app.stop() == 0
    finally:
        app.kill()
