"""ShareService in process: the Exports registry, share operations, restarts, RPC servers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from catalog.db import open_catalog
from fileshare.fs import CreateMode, Cred, FsErrno, FsError
from fileshare.service import SharePorts, ShareService
from vtl.cloud.local import LocalStore
from vtl.errors import Conflict, InvalidRequest, NotFound


class Gateway:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = LocalStore(root / "store", durable=False)
        self.catalog = open_catalog(root / "catalog.db")
        self.service = self._service()

    def _service(self) -> ShareService:
        svc = ShareService(self.catalog, self.root, self.store, uploader=False, durable=False,
                           ports=SharePorts("127.0.0.1", 0, 0, 0), settle=0.0)
        svc.start()
        return svc

    def restart(self) -> ShareService:
        self.service.close()
        self.catalog.close()
        self.catalog = open_catalog(self.root / "catalog.db")
        self.service = self._service()
        return self.service


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    g = Gateway(tmp_path)
    yield g
    g.service.close()
    g.catalog.close()


def test_create_list_and_export_lookup(gw: Gateway) -> None:
    svc = gw.service
    info = svc.create_share({"name": "docs", "clients": ["10.1.0.0/16", "127.0.0.1"],
                             "file_mode": "0644", "owner_uid": 1000, "owner_gid": 100})
    assert info["path"] == "/docs" and info["prefix"] == "docs/"
    assert info["clients"] == ["10.1.0.0/16", "127.0.0.1/32"]
    assert (info["file_mode"], info["owner"], info["squash"]) == ("0644", "1000:100", "root")
    assert [s["name"] for s in svc.list_shares({})] == ["docs"]
    fs, opts = svc.by_path("/docs")  # type: ignore[misc]
    assert svc.by_path("docs/") is not None and svc.by_path("/nope") is None
    assert svc.by_handle(fs.root_handle()) == (fs, opts)
    assert svc.by_handle(b"\x00" * 29) is None
    assert [p for p, _, _ in svc.exports()] == ["/docs"]
    assert svc.allowed(opts, "10.1.200.3") and svc.allowed(opts, "127.0.0.1")
    assert svc.allowed(opts, "::ffff:10.1.0.9")  # IPv4-mapped IPv6 peers
    assert not svc.allowed(opts, "10.2.0.1") and not svc.allowed(opts, "::1")
    assert not svc.allowed(opts, "not an address")


def test_squash_policies(gw: Gateway) -> None:
    svc = gw.service
    svc.create_share({"name": "r"})
    svc.create_share({"name": "a", "squash": "all"})
    svc.create_share({"name": "n", "squash": "none"})
    root, user = Cred(0, 0, (0, 5)), Cred(1000, 100, (5,))
    r, a, n = (svc.by_path(x)[1] for x in ("r", "a", "n"))  # type: ignore[index]
    assert svc.squash(r, root) == Cred(65534, 65534)
    assert svc.squash(r, user) == user
    assert svc.squash(a, user) == Cred(65534, 65534)
    assert svc.squash(n, root) == root


def test_bad_requests_are_refused_with_a_reason(gw: Gateway) -> None:
    svc = gw.service
    svc.create_share({"name": "one", "prefix": "data/one"})
    cases = [
        ({"name": "bad/name"}, InvalidRequest, "invalid share name"),
        ({"name": "x", "clients": ["300.1.1.1"]}, InvalidRequest, "invalid client"),
        ({"name": "x", "squash": "some"}, InvalidRequest, "invalid squash"),
        ({"name": "x", "file_mode": "999"}, InvalidRequest, "octal"),
        ({"name": "x", "storage_class": "GLACIER"}, InvalidRequest, "not supported"),
        ({"name": "x", "prefix": "tapes/"}, InvalidRequest, "appliance's own"),
        ({"name": "x", "prefix": "data/"}, Conflict, "overlaps share 'one'"),
        ({"name": "x", "prefix": "data/one/sub"}, Conflict, "overlaps"),
        ({"name": "one", "prefix": "other"}, Conflict, "exists"),
        ({"name": "x", "color": "red"}, InvalidRequest, "unknown argument"),
    ]
    for args, kind, text in cases:
        with pytest.raises(kind) as info:
            svc.create_share(args)
        assert text in info.value.message
    with pytest.raises(NotFound):
        svc.refresh_cache({"name": "ghost"})
    with pytest.raises(InvalidRequest):
        svc.refresh_cache({"name": "one", "path": "/no/such/dir"})


def test_update_applies_live(gw: Gateway) -> None:
    svc = gw.service
    svc.create_share({"name": "s"})
    fs, opts = svc.by_path("/s")  # type: ignore[misc]
    assert svc.allowed(opts, "127.0.0.1")
    svc.update_share({"name": "s", "clients": ["192.168.0.0/24"], "read_only": True,
                      "squash": "all", "cache_stale_after": 60})
    fs2, opts2 = svc.by_path("/s")  # type: ignore[misc]
    assert fs2 is fs and not svc.allowed(opts2, "127.0.0.1") and opts2.squash == "all"
    assert fs.read_only and fs.config.stale_after == 60.0
    with pytest.raises(FsError) as info:
        fs.mkdir(Cred(0, 0), fs.root_handle(), "d")
    assert info.value.errno == FsErrno.ROFS
    assert svc.describe_shares({"names": ["s"]})[0]["read_only"] is True


def test_handles_and_files_survive_a_service_restart(gw: Gateway) -> None:
    svc = gw.service
    svc.create_share({"name": "s", "squash": "none"})
    fs, _ = svc.by_path("/s")  # type: ignore[misc]
    me = Cred(1000, 1000)
    fh, _ = fs.create(me, fs.root_handle(), "f", CreateMode.GUARDED)
    fs.write(me, fh, 0, b"kept across restarts", True)
    svc = gw.restart()  # before the upload: the dirty file comes back from the cache
    found = svc.by_handle(fh)
    assert found is not None
    fs2 = found[0]
    assert fs2.read(me, fh, 0, 100) == (b"kept across restarts", True)
    fs2.run_uploads(now=float("inf"))
    assert gw.store.get_object("s/f") == b"kept across restarts"


def test_refresh_cache_op_and_delete(gw: Gateway) -> None:
    svc = gw.service
    svc.create_share({"name": "s"})
    fs, _ = svc.by_path("/s")  # type: ignore[misc]
    fh, _ = fs.create(Cred(0, 0), fs.root_handle(), "local", CreateMode.GUARDED)
    gw.store.put_object("s/dir/x", b"x")
    result = svc.refresh_cache({"name": "s", "recursive": True})
    assert (result["added"], result["directories"]) == (2, 2)
    out = svc.delete_share({"name": "s"})  # uploads the unsynced file first
    assert out["deleted"] and gw.store.head_object("s/local").size == 0
    assert svc.by_handle(fh) is None and svc.list_shares({}) == []
    assert gw.store.get_object("s/dir/x") == b"x"  # objects stay in the bucket
    svc.create_share({"name": "s"})  # same name again: a new share id, old handles unknown
    assert svc.by_handle(fh) is None


def test_rpc_servers_bind_free_ports_and_skip_a_busy_portmapper(gw: Gateway) -> None:
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    svc = gw.service
    svc.ports = SharePorts("127.0.0.1", 0, 0, busy.getsockname()[1])

    async def run() -> None:
        await svc.start_servers()
        try:
            assert svc.nfs_port and svc.mount_port and svc.portmap_port is None
            for port in (svc.nfs_port, svc.mount_port):
                with socket.create_connection(("127.0.0.1", port), timeout=5):
                    pass
        finally:
            await svc.stop_servers()

    try:
        asyncio.run(run())
    finally:
        busy.close()
