"""The file gateway over NFS v4.1 end to end: ``vtl serve`` on a moto_server bucket, shares made
with ``vtl share create``, and the independent PyPI client ``nfs-rs`` speaking NFS v4.1
(EXCHANGE_ID, CREATE_SESSION, SEQUENCE, OPEN/WRITE/COMMIT/READ/CLOSE, READDIR, RENAME...).

What a user would notice: files written over v4.1 read back bit-exact, show in listings and land
in the bucket as objects with the same bytes and SSE-S3; v3 and v4.1 clients see the same
files; a client outside ``--clients`` is refused; a read-only share refuses writes; after a
kill -9 and restart a new v4.1 client finds the committed file (handles and data persist, the
session state does not).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.test_nfs3_gateway import BUCKET, Gateway, gateway
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration]

__all__ = ["gateway"]  # the module-scoped appliance fixture, shared by import


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def v41(gw: Gateway, export: str, **kw: Any) -> Any:
    nfs_rs = pytest.importorskip("nfs_rs")
    client = nfs_rs.Client.connect(f"nfs://127.0.0.1{export}?version=4.1",
                                   nfs_port=gw.app.nfs_port, connect_timeout=10,
                                   operation_timeout=60, **kw)
    assert client.version == nfs_rs.Version.NFS_V4_1
    return client


@pytest.fixture
def gw(gateway: Gateway) -> Iterator[Gateway]:
    yield gateway


def test_v41_create_write_read_list_rename_remove_mkdir_rmdir(gw: Gateway) -> None:
    gw.share("v4team")
    data = os.urandom(3 * 1024 * 1024 + 4099)
    small = b"hello over NFS v4.1\n"
    with v41(gw, "/v4team", uid=1000, gid=1000) as c:
        c.mkdir("projects/2026", parents=True)
        with c.open("projects/2026/plan.bin", "wb") as f:
            assert f.write(data) == len(data)
        with c.open("notes.txt", "wb") as f:
            f.write(small)
        info = c.stat("projects/2026/plan.bin")
        assert (info.size, info.uid, info.gid) == (len(data), 1000, 1000)
        assert (info.owner, info.group) == ("1000", "1000")
        with c.open("projects/2026/plan.bin", "rb") as f:
            assert sha(f.read()) == sha(data)
        with c.open("projects/2026/plan.bin", "rb") as f:
            assert f.read_at(1024 * 1024 - 3, 10) == data[1024 * 1024 - 3:1024 * 1024 + 7]
        assert sorted(c.listdir()) == ["notes.txt", "projects"]
        obj = gw.wait_object("v4team/projects/2026/plan.bin", data)
        assert obj["ServerSideEncryption"] == "AES256"
        gw.wait_object("v4team/notes.txt", small)

        c.rename("projects/2026/plan.bin", "projects/final.bin")
        assert sorted(c.listdir("projects")) == ["2026", "final.bin"]
        with c.open("projects/final.bin", "rb") as f:
            assert sha(f.read()) == sha(data)
        gw.wait_object("v4team/projects/final.bin", data)
        wait_for("the old key to go",
                 lambda: gw.object("v4team/projects/2026/plan.bin") is None)

        c.unlink("notes.txt")
        assert not c.exists("notes.txt")
        wait_for("the removed file's object to go", lambda: gw.object("v4team/notes.txt") is None)
        c.rmdir("projects/2026")
        assert c.listdir("projects") == ["final.bin"]
        with pytest.raises(OSError):
            c.rmdir("projects")  # not empty


def test_v3_and_v41_clients_see_the_same_files(gw: Gateway) -> None:
    gw.share("both")
    payload = os.urandom(300_000)
    with v41(gw, "/both", uid=1000, gid=1000) as c4:
        with c4.open("from-v4.bin", "wb") as f:
            f.write(payload)
    with gw.client("/both", uid=1000, gid=1000) as c3:
        with c3.open("from-v4.bin", "rb") as f:
            assert sha(f.read()) == sha(payload)
        with c3.open("from-v3.txt", "wb") as f:
            f.write(b"v3 wrote this\n")
    with v41(gw, "/both", uid=1000, gid=1000) as c4:
        assert sorted(c4.listdir()) == ["from-v3.txt", "from-v4.bin"]
        with c4.open("from-v3.txt", "rb") as f:
            assert f.read() == b"v3 wrote this\n"


def test_v41_objects_put_in_the_bucket_appear_after_refresh(gw: Gateway) -> None:
    gw.share("v4ingest")
    with v41(gw, "/v4ingest") as c:
        assert c.listdir() == []
        payload = os.urandom(100_000)
        gw.s3.put_object(Bucket=BUCKET, Key="v4ingest/in/data.bin", Body=payload)
        result = gw.app.cli("share", "refresh", "v4ingest", "--recursive")
        assert result.exit_code == 0, result.output
        assert c.listdir() == ["in"]
        with c.open("in/data.bin", "rb") as f:
            assert sha(f.read()) == sha(payload)


def test_v41_client_outside_the_share_clients_is_refused(gw: Gateway) -> None:
    import nfs_rs

    gw.share("v4lan", "--clients", "10.20.0.0/16")
    with pytest.raises(nfs_rs.NfsError):
        v41(gw, "/v4lan").close()
    assert gw.keys("v4lan/") == []


def test_v41_read_only_share_refuses_writes(gw: Gateway) -> None:
    gw.s3.put_object(Bucket=BUCKET, Key="v4archive/old.txt", Body=b"old\n")
    gw.share("v4archive", "--read-only")
    with v41(gw, "/v4archive") as c:
        with c.open("old.txt", "rb") as f:
            assert f.read() == b"old\n"
        with pytest.raises(OSError):
            c.mkdir("d")
        with pytest.raises(OSError):
            with c.open("new.txt", "wb") as f:
                f.write(b"x")
        with pytest.raises(OSError):
            c.unlink("old.txt")
    assert gw.keys("v4archive/") == ["v4archive/old.txt"]


def test_v41_after_kill_9_a_new_client_finds_the_committed_file(gw: Gateway) -> None:
    """Runs last in this module: it restarts the shared appliance."""
    gw.share("v4crash")
    data = os.urandom(2 * 1024 * 1024 + 5)
    with v41(gw, "/v4crash", uid=1000, gid=1000) as c:
        with c.open("kept.bin", "wb") as f:
            f.write(data)  # nfs-rs returns once the bytes are stable (FILE_SYNC or COMMIT)
    gw.app.kill9()
    gw.app.restart()
    with v41(gw, "/v4crash", uid=1000, gid=1000) as c:
        assert c.listdir() == ["kept.bin"]
        with c.open("kept.bin", "rb") as f:
            assert sha(f.read()) == sha(data)
