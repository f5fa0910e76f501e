"""``vtl share`` against a real ``vtl serve``, with libnfs-utils as the independent NFS client."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fileshare.nfsclients import libnfs_url, need_libnfs, nfs_ls, run_tool
from tests.support.appliance import ApplianceProcess
from vtl.cloud.local import LocalStore
from vtl.cloud.store import ObjectNotFound


def wait_for_object(store: LocalStore, key: str, timeout: float = 30.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return store.get_object(key)
        except ObjectNotFound:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApplianceProcess]:
    a = ApplianceProcess(tmp_path_factory.mktemp("share") / "data",
                         extra_args=["--share-settle", "0.2", "--workers", "0"])
    a.start()
    try:
        yield a
    finally:
        if a.running:
            assert a.stop() == 0, a.log_tail()
        else:
            a.kill()


def one_line_error(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_cli_errors_are_one_line(app: ApplianceProcess) -> None:
    assert "invalid share name" in one_line_error(app.cli("share", "create", "--name", "a/b"))
    assert "not UID:GID" in one_line_error(
        app.cli("share", "create", "--name", "x", "--owner", "me"))
    assert "octal" in one_line_error(
        app.cli("share", "create", "--name", "x", "--file-mode", "rw"))
    assert "invalid client" in one_line_error(
        app.cli("share", "create", "--name", "x", "--clients", "10.0.0.0/33"))
    assert "no file share 'ghost'" in one_line_error(app.cli("share", "refresh", "ghost"))
    assert "no file share" in one_line_error(app.cli("share", "delete", "ghost", "--yes"))


def test_share_round_trip_over_nfs(app: ApplianceProcess, tmp_path: Path) -> None:
    need_libnfs()
    created = app.cli("share", "create", "--name", "docs", "--squash", "none", "--json")
    assert created.exit_code == 0, created.output
    listed = json.loads(app.cli("share", "list", "--json").output)
    docs = next(s for s in listed if s["name"] == "docs")
    assert (docs["path"], docs["prefix"]) == ("/docs", "docs/")
    assert (docs["nfs_port"], docs["mount_port"]) == (app.nfs_port, app.mount_port)
    assert docs["portmap_port"] == app.portmap_port
    info = json.loads(app.cli("status", "--json").output)
    assert info["nfs_port"] == app.nfs_port
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(2_500_000))
    url = libnfs_url(app.nfs_port, app.mount_port, "/docs", "data.bin")
    run_tool("nfs-cp", str(src), url)
    back = tmp_path / "back.bin"
    run_tool("nfs-cp", url, str(back))
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    store = LocalStore(app.data_dir / "store")
    assert wait_for_object(store, "docs/data.bin") == src.read_bytes()
    meta = store.head_object("docs/data.bin").metadata
    assert meta["file-permissions"].startswith("0100") and "file-mtime" in meta
    # an object put straight into the bucket shows up after a refresh
    store.put_object("docs/from-s3/hello.txt", b"hello from another tool")
    assert "from-s3" not in nfs_ls(libnfs_url(app.nfs_port, app.mount_port, "/docs"))
    out = app.cli("share", "refresh", "docs", "--recursive")
    assert out.exit_code == 0 and "2 added" in out.output, out.output
    assert "from-s3" in nfs_ls(libnfs_url(app.nfs_port, app.mount_port, "/docs"))
    cat = run_tool("nfs-cat", libnfs_url(app.nfs_port, app.mount_port, "/docs",
                                         "from-s3/hello.txt"))
    assert cat.stdout == b"hello from another tool"


def test_disallowed_client_is_refused_live(app: ApplianceProcess) -> None:
    need_libnfs()
    assert app.cli("share", "create", "--name", "locked").exit_code == 0
    url = libnfs_url(app.nfs_port, app.mount_port, "/locked")
    assert nfs_ls(url) == []
    changed = app.cli("share", "update", "locked", "--clients", "10.9.0.0/16")
    assert changed.exit_code == 0, changed.output
    refused = run_tool("nfs-ls", url, check=False)
    assert refused.returncode != 0
    listed = json.loads(app.cli("share", "list", "--json").output)
    assert next(s for s in listed if s["name"] == "locked")["clients"] == ["10.9.0.0/16"]
    assert app.cli("share", "delete", "locked", "--yes").exit_code == 0


def test_kill9_after_copy_loses_nothing_committed(tmp_path: Path) -> None:
    need_libnfs()
    app = ApplianceProcess(tmp_path / "data",
                           extra_args=["--share-settle", "3600", "--workers", "0"])
    app.start()
    try:
        assert app.cli("share", "create", "--name", "s", "--squash", "none").exit_code == 0
        src = tmp_path / "f.bin"
        src.write_bytes(os.urandom(1_000_000))
        run_tool("nfs-cp", str(src), libnfs_url(app.nfs_port, app.mount_port, "/s", "f.bin"))
        app.kill9()  # before the (hour-long) settle: the file lives only in the cache
        store = LocalStore(app.data_dir / "store")
        with pytest.raises(ObjectNotFound):
            store.head_object("s/f.bin")
        app.extra_args = ["--share-settle", "0.1", "--workers", "0"]
        app.restart()
        back = tmp_path / "back.bin"
        run_tool("nfs-cp", libnfs_url(app.nfs_port, app.mount_port, "/s", "f.bin"), str(back))
        assert back.read_bytes() == src.read_bytes()
        assert wait_for_object(store, "s/f.bin") == src.read_bytes()
    finally:
        if app.running:
            app.stop()
        else:
            app.kill()
