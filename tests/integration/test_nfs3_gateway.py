"""The file gateway over NFS v3 end to end: ``vtl serve`` with its bucket on a moto_server (S3
over HTTP on 127.0.0.1), shares made with ``vtl share create``, and two independent clients:
libnfs-utils (``nfs-cp``, ``nfs-ls``, ``nfs-cat``) and the PyPI ``nfs-rs``.

What a user would notice: files written over NFS read back bit-exact and appear in the bucket as
objects with the same bytes and SSE-S3; objects other tools put in the bucket appear after
``vtl share refresh``; a client outside ``--clients`` is refused; a read-only share refuses
writes.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cloud.conftest import _AWS_ENV, MotoServer
from tests.engine.helpers import wait_for
from tests.fileshare.nfsclients import libnfs_url, need_libnfs, nfs_ls, nfs_rs_connect, run_tool
from tests.support.appliance import ApplianceProcess

pytestmark = [pytest.mark.integration]

BUCKET = "vtl-files"
SETTLE = "0.3"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Gateway:
    """One appliance on moto_server plus the boto3 client that looks into its bucket."""

    def __init__(self, app: ApplianceProcess, s3: Any) -> None:
        self.app = app
        self.s3 = s3

    def share(self, name: str, *args: str) -> dict[str, Any]:
        import json

        result = self.app.cli("share", "create", "--name", name, "--json", *args)
        assert result.exit_code == 0, result.output
        return dict(json.loads(result.output))

    def url(self, export: str, path: str = "") -> str:
        return libnfs_url(self.app.nfs_port, self.app.mount_port, export, path)

    def client(self, export: str, **kw: Any) -> Any:
        return nfs_rs_connect(self.app.nfs_port, self.app.mount_port, export, **kw)

    def object(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(self.s3.get_object(Bucket=BUCKET, Key=key))
        except self.s3.exceptions.NoSuchKey:
            return None

    def keys(self, prefix: str) -> list[str]:
        out = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for o in out.get("Contents", []))

    def wait_object(self, key: str, data: bytes, timeout: float = 60.0) -> dict[str, Any]:
        """The object once it holds exactly ``data`` (uploads follow the settle time)."""
        def ready() -> dict[str, Any] | None:
            obj = self.object(key)
            if obj is None:
                return None
            body = obj["Body"].read()
            return obj if sha(body) == sha(data) else None
        return dict(wait_for(ready, timeout, f"object {key} with the written bytes"))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    need_libnfs()
    pytest.importorskip("nfs_rs")
    saved = {k: os.environ.get(k) for k in (*_AWS_ENV, "AWS_PROFILE", "AWS_ENDPOINT_URL")}
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    os.environ.update(_AWS_ENV)
    server = MotoServer()
    server.start()
    try:
        import boto3

        s3 = boto3.session.Session(region_name="us-east-1").client("s3", endpoint_url=server.url)
        s3.create_bucket(Bucket=BUCKET)
        data = tmp_path_factory.mktemp("nfs-gateway") / "data"
        args = ["--store", f"s3://{BUCKET}", "--s3-endpoint", server.url,
                "--share-settle", SETTLE]
        with ApplianceProcess(data, extra_args=args) as app:
            assert app.nfs_port and app.mount_port, app.log_tail()
            yield Gateway(app, s3)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_libnfs_write_read_list_and_the_object_in_the_bucket(
        gateway: Gateway, tmp_path: Path) -> None:
    info = gateway.share("docs")
    assert info["path"] == "/docs"
    data = os.urandom(5 * 1024 * 1024 + 4321)
    src = tmp_path / "report.bin"
    src.write_bytes(data)
    run_tool("nfs-cp", str(src), gateway.url("/docs", "report.bin"))
    assert nfs_ls(gateway.url("/docs")) == ["report.bin"]
    assert sha(run_tool("nfs-cat", gateway.url("/docs", "report.bin")).stdout) == sha(data)
    back = tmp_path / "back.bin"
    run_tool("nfs-cp", gateway.url("/docs", "report.bin"), str(back))
    assert sha(back.read_bytes()) == sha(data)

    obj = gateway.wait_object("docs/report.bin", data)
    assert obj["ServerSideEncryption"] == "AES256"
    assert obj["ContentLength"] == len(data)
    # owner, group, mode and mtime ride in the object's metadata
    meta = obj["Metadata"]
    assert {"file-owner", "file-group", "file-permissions", "file-mtime"} <= set(meta), meta


def test_nfs_rs_create_rename_remove_mkdir_rmdir(gateway: Gateway) -> None:
    gateway.share("team")
    data = os.urandom(3 * 1024 * 1024 + 17)
    small = b"hello, bucket\n"
    with gateway.client("/team", uid=1000, gid=1000) as c:
        c.mkdir("projects/2026", parents=True)
        with c.open("projects/2026/plan.bin", "wb") as f:
            f.write(data)
        with c.open("notes.txt", "wb") as f:
            f.write(small)
        info = c.stat("projects/2026/plan.bin")
        assert (info.size, info.uid, info.gid) == (len(data), 1000, 1000)
        with c.open("projects/2026/plan.bin", "rb") as f:
            assert sha(f.read()) == sha(data)
        assert sorted(c.listdir("")) == ["notes.txt", "projects"]
        gateway.wait_object("team/projects/2026/plan.bin", data)
        gateway.wait_object("team/notes.txt", small)

        c.rename("projects/2026/plan.bin", "projects/final.bin")
        assert sorted(c.listdir("projects")) == ["2026", "final.bin"]
        with c.open("projects/final.bin", "rb") as f:
            assert sha(f.read()) == sha(data)
        gateway.wait_object("team/projects/final.bin", data)
        wait_for(lambda: gateway.object("team/projects/2026/plan.bin") is None,
                 what="the old key to go")

        c.unlink("notes.txt")
        assert not c.exists("notes.txt")
        wait_for(lambda: gateway.object("team/notes.txt") is None,
                 what="the removed file's object to go")
        c.rmdir("projects/2026")
        assert c.listdir("projects") == ["final.bin"]
        with pytest.raises(OSError):
            c.rmdir("projects")  # not empty
    assert "team/projects/2026/" not in gateway.keys("team/")


def test_objects_put_in_the_bucket_appear_after_refresh(gateway: Gateway) -> None:
    gateway.share("ingest")
    with gateway.client("/ingest") as c:
        assert c.listdir("") == []
    payload = os.urandom(200_000)
    gateway.s3.put_object(Bucket=BUCKET, Key="ingest/incoming/data.bin", Body=payload)
    gateway.s3.put_object(Bucket=BUCKET, Key="ingest/top.txt", Body=b"top\n")
    result = gateway.app.cli("share", "refresh", "ingest", "--recursive")
    assert result.exit_code == 0, result.output
    assert sorted(nfs_ls(gateway.url("/ingest"))) == ["incoming", "top.txt"]
    cat = run_tool("nfs-cat", gateway.url("/ingest", "incoming/data.bin")).stdout
    assert sha(cat) == sha(payload)
    with gateway.client("/ingest") as c:
        with c.open("incoming/data.bin", "rb") as f:
            assert sha(f.read()) == sha(payload)

    gateway.s3.delete_object(Bucket=BUCKET, Key="ingest/top.txt")
    result = gateway.app.cli("share", "refresh", "ingest")
    assert result.exit_code == 0, result.output
    assert nfs_ls(gateway.url("/ingest")) == ["incoming"]


def test_a_client_outside_the_share_clients_is_refused(gateway: Gateway, tmp_path: Path) -> None:
    gateway.share("lan", "--clients", "10.20.0.0/16")
    proc = run_tool("nfs-ls", gateway.url("/lan"), check=False)
    assert proc.returncode != 0
    src = tmp_path / "f"
    src.write_bytes(b"x")
    assert run_tool("nfs-cp", str(src), gateway.url("/lan", "f"), check=False).returncode != 0
    import nfs_rs

    with pytest.raises(nfs_rs.NfsError):
        gateway.client("/lan").close()
    assert gateway.keys("lan/") == []


def test_a_read_only_share_refuses_writes(gateway: Gateway, tmp_path: Path) -> None:
    gateway.s3.put_object(Bucket=BUCKET, Key="archive/old.txt", Body=b"old\n")
    gateway.share("archive", "--read-only")
    src = tmp_path / "f"
    src.write_bytes(b"new\n")
    assert run_tool("nfs-cp", str(src), gateway.url("/archive", "new.txt"),
                    check=False).returncode != 0
    assert run_tool("nfs-cat", gateway.url("/archive", "old.txt")).stdout == b"old\n"
    with gateway.client("/archive") as c:
        with pytest.raises(OSError):
            c.mkdir("d")
        with pytest.raises(OSError):
            c.unlink("old.txt")
    assert gateway.keys("archive/") == ["archive/old.txt"]


def test_clients_changed_live_refuse_the_next_nfs_call(gateway: Gateway) -> None:
    """MOUNT let the client in; ``vtl share update --clients`` then shuts it out of NFS itself
    (NFS3ERR_ACCES on the very next call), and letting it back in works as live."""
    import nfs_rs

    gateway.share("moving")
    with gateway.client("/moving", uid=1000, gid=1000) as c:
        c.mkdir("d")
        result = gateway.app.cli("share", "update", "moving", "--clients", "10.9.0.0/16")
        assert result.exit_code == 0, result.output
        with pytest.raises(nfs_rs.NfsPermissionError):
            c.listdir("")
        with pytest.raises(nfs_rs.NfsPermissionError):
            c.mkdir("e")
        result = gateway.app.cli("share", "update", "moving", "--clients", "127.0.0.0/8")
        assert result.exit_code == 0, result.output
        assert c.listdir("") == ["d"]


def test_bad_names_and_paths(gateway: Gateway) -> None:
    """Names over 255 bytes and paths over 1,024 bytes are refused (NAMETOOLONG), not cut."""
    gateway.share("names")
    with gateway.client("/names", uid=1000, gid=1000) as c:
        with pytest.raises(OSError) as err:
            c.mkdir("n" * 256)
        assert err.value.errno == errno.ENAMETOOLONG, err.value
        c.mkdir("n" * 255)
        deep = "/".join(f"{i}" * 250 for i in range(4))
        c.mkdir(deep, parents=True)
        with pytest.raises(OSError) as err:
            c.touch(deep + "/" + "x" * 30)
        assert err.value.errno == errno.ENAMETOOLONG, err.value
        c.touch(deep + "/" + "x" * 10)
        assert sorted(c.listdir("")) == ["0" * 250, "n" * 255]


def test_raw_rpc_errors_from_the_appliance(gateway: Gateway) -> None:
    """Bad input on the appliance's NFS port gets the RFC's answer and the port keeps serving."""
    import socket

    from fileshare.nfs3types import FhArgs, Proc, Stat
    from fileshare.rpc import (
        AcceptStat, AuthSys, AuthStat, RecordReassembler, decode_reply, encode_call, frame,
    )
    from fileshare.xdr import Packer, Unpacker

    gateway.share("raw")
    cred = AuthSys(0, "test", 1000, 1000, ())

    def fh_body(fh: bytes) -> bytes:
        p = Packer()
        FhArgs(fh).encode(p)
        return p.getvalue()

    with socket.create_connection(("127.0.0.1", gateway.app.nfs_port), timeout=30) as s:
        records = RecordReassembler()

        def call(xid: int, proc: int, body: bytes, auth: AuthSys | None = cred,
                 vers: int = 3) -> Any:
            s.sendall(frame(encode_call(xid, 100003, vers, proc, body, auth)))
            while (rec := records.next_record()) is None:
                data = s.recv(65536)
                assert data, "the appliance closed the connection"
                records.receive_data(data)
            reply = decode_reply(rec)
            assert reply.xid == xid
            return reply

        assert call(1, Proc.NULL, b"", None).accept_stat == AcceptStat.SUCCESS
        assert call(2, Proc.GETATTR, fh_body(b"x" * 20), None).auth_stat == AuthStat.AUTH_TOOWEAK
        reply = call(3, Proc.GETATTR, fh_body(b"x" * 20))
        assert Unpacker(reply.body).uint() == Stat.BADHANDLE
        assert call(4, Proc.GETATTR, b"\0\0\0\x50").accept_stat == AcceptStat.GARBAGE_ARGS
        assert call(5, 99, b"").accept_stat == AcceptStat.PROC_UNAVAIL
        reply = call(6, 0, b"", vers=2)
        assert reply.accept_stat == AcceptStat.PROG_MISMATCH and reply.low == 3
        assert call(7, Proc.NULL, b"").accept_stat == AcceptStat.SUCCESS
