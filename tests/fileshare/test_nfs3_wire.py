"""NFS v3 with real clients (libnfs-utils, nfs-rs) over TCP against the in-process RPC server.

The server is ``fileshare.server.RpcServer`` carrying NFS (through the ``fileshare.nfs``
dispatcher) and MOUNT on one port, over the in-memory file system, so these tests pin the wire
behaviour of ``fileshare/nfs3.py`` independently of the object store; the same clients run
against ``vtl serve`` in tests/integration/test_nfs*.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fileshare.fs import ExportOptions
from fileshare.mount import MountProgram
from fileshare.nfs import NfsProgram
from fileshare.nfs3 import Nfs3Program
from fileshare.server import RpcServer
from tests.fileshare.memfs import MemExports, MemFs
from tests.fileshare.nfsclients import libnfs_url, need_libnfs, nfs_ls, nfs_rs_connect, run_tool


@dataclass
class Served:
    exports: MemExports
    port: int

    def url(self, export: str, path: str = "") -> str:
        return libnfs_url(self.port, self.port, export, path)


def _objectfs_exports(tmp_path: Path) -> MemExports:
    """The same three shares as ObjectFS over a LocalStore (uploads left to the service)."""
    from fileshare.cache import FileCache
    from fileshare.objectfs import HandleCodec, ObjectFS, ShareConfig, handle_share_id
    from vtl.cloud.local import LocalStore

    store = LocalStore(tmp_path / "store", durable=False)
    cache = FileCache(tmp_path / "cache", None, durable=False)
    codec = HandleCodec(b"k" * 32)
    exports = MemExports(handle_share_id)
    for path, share_id, opts, ro in (("/share1", 1, ExportOptions(), False),
                                     ("/lan", 2, ExportOptions(clients=("10.0.0.0/8",)), False),
                                     ("/ro", 3, ExportOptions(read_only=True), True)):
        exports.add(path, ObjectFS(path[1:], share_id, store, path[1:] + "/",
                                   tmp_path / f"{share_id}.db", cache, codec,
                                   config=ShareConfig(read_only=ro), uploader=False,
                                   durable=False), opts)
    return exports


@pytest.fixture(params=["memfs", "objectfs"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    if request.param == "objectfs":
        exports = _objectfs_exports(tmp_path)
    else:
        exports = MemExports()
        exports.add("/share1", MemFs("share1", 1))
        exports.add("/lan", MemFs("lan", 2), ExportOptions(clients=("10.0.0.0/8",)))
        exports.add("/ro", MemFs("ro", 3), ExportOptions(read_only=True))
    loop = asyncio.new_event_loop()
    server = RpcServer([NfsProgram(Nfs3Program(exports)), MountProgram(exports)],
                       "127.0.0.1", 0)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        yield Served(exports, server.port)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        for _, fs, _ in exports.exports():
            if hasattr(fs, "close"):
                fs.close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_libnfs_copy_in_list_cat_copy_out(served: Served, tmp_path: Path) -> None:
    need_libnfs()
    data = os.urandom(3 * 1024 * 1024 + 12345)  # several 1 MiB WRITEs and a short tail
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    run_tool("nfs-cp", str(src), served.url("/share1", "a.bin"))
    assert nfs_ls(served.url("/share1")) == ["a.bin"]
    cat = run_tool("nfs-cat", served.url("/share1", "a.bin")).stdout
    assert _sha(cat) == _sha(data)
    back = tmp_path / "back.bin"
    run_tool("nfs-cp", served.url("/share1", "a.bin"), str(back))
    assert _sha(back.read_bytes()) == _sha(data)


def test_libnfs_lists_a_directory_over_many_readdir_pages(served: Served) -> None:
    need_libnfs()
    fs = served.exports.by_path("/share1")[0]  # type: ignore[index]
    from fileshare.fs import CreateMode, Cred
    names = [f"file-{i:04d}-{'n' * (i % 50)}" for i in range(600)]
    for name in names:
        fs.create(Cred(0, 0), fs.root_handle(), name, CreateMode.GUARDED)
    assert sorted(nfs_ls(served.url("/share1"))) == sorted(names)


def test_libnfs_refused_client_and_read_only_share(served: Served, tmp_path: Path) -> None:
    need_libnfs()
    proc = run_tool("nfs-ls", served.url("/lan"), check=False)
    assert proc.returncode != 0
    src = tmp_path / "f"
    src.write_bytes(b"x")
    proc = run_tool("nfs-cp", str(src), served.url("/ro", "f"), check=False)
    assert proc.returncode != 0


def test_nfs_rs_file_and_directory_round_trip(served: Served) -> None:
    data = os.urandom(5 * 1024 * 1024 + 7)
    with nfs_rs_connect(served.port, served.port, "/share1", uid=1000, gid=1000) as c:
        assert c.io_limits.max_read == c.io_limits.max_write == 1024 * 1024
        c.mkdir("docs/2026", parents=True)
        with c.open("docs/2026/report.bin", "wb") as f:
            f.write(data)
        info = c.stat("docs/2026/report.bin")
        assert (info.size, info.uid, info.gid) == (len(data), 1000, 1000)
        with c.open("docs/2026/report.bin", "rb") as f:
            assert _sha(f.read()) == _sha(data)
        c.rename("docs/2026/report.bin", "docs/final.bin")
        assert sorted(c.listdir("docs")) == ["2026", "final.bin"]
        assert c.listdir("docs/2026") == []
        with pytest.raises(OSError):
            c.rmdir("docs")  # not empty
        c.unlink("docs/final.bin")
        c.rmdir("docs/2026")
        c.rmdir("docs")
        assert c.listdir("") == []
        info2 = c.fs_info()
        assert not info2.supports_links and not info2.supports_symlinks
        with pytest.raises(NotImplementedError):
            c.symlink("target", "link")


def test_nfs_rs_refused_client(served: Served) -> None:
    nfs_rs = pytest.importorskip("nfs_rs")
    with pytest.raises(nfs_rs.NfsError):
        nfs_rs_connect(served.port, served.port, "/lan").close()
