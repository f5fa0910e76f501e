"""MOUNT v3 (fileshare/mount.py) against a fake share registry; one round over TCP."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections.abc import Sequence

import pytest

from fileshare.fs import Attr, Cred, ExportOptions, FileType, FsErrno, FsError
from fileshare.mount import MOUNT_PROG, MountProgram, MountStat, call_cred, pack_dirpath
from fileshare.rpc import (
    AcceptStat, AuthSys, RecordReassembler, RpcCall, RpcError, decode_reply, encode_call, frame,
)
from fileshare.server import RpcServer
from fileshare.xdr import Unpacker


def _attr(kind: FileType) -> Attr:
    return Attr(kind, 0o755, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0)


class FakeFs:
    """A root with a directory ``sub`` and a file ``file``; records the creds it was asked with."""

    read_only = False
    fsid = 1
    write_verifier = b"\0" * 8

    def __init__(self, name: str) -> None:
        self.name = name
        self.creds: list[Cred] = []

    def root_handle(self) -> bytes:
        return b"root:" + self.name.encode()

    def lookup(self, cred: Cred, dir_fh: bytes, name: str) -> tuple[bytes, Attr]:
        self.creds.append(cred)
        if dir_fh != self.root_handle():
            raise FsError(FsErrno.NOTDIR)
        if name == "sub":
            return b"sub:" + self.name.encode(), _attr(FileType.DIR)
        if name == "file":
            return b"file:" + self.name.encode(), _attr(FileType.REG)
        if name == "secret":
            raise FsError(FsErrno.ACCES)
        raise FsError(FsErrno.NOENT)


class FakeExports:
    def __init__(self) -> None:
        self.shares = {
            "/share1": (FakeFs("share1"), ExportOptions()),
            "/lan": (FakeFs("lan"), ExportOptions(clients=("10.0.0.0/8",))),
        }

    def exports(self) -> Sequence[tuple[str, FakeFs, ExportOptions]]:
        return [(path, fs, opts) for path, (fs, opts) in self.shares.items()]

    def by_path(self, path: str) -> tuple[FakeFs, ExportOptions] | None:
        return self.shares.get(path)

    def by_handle(self, fh: bytes) -> None:
        return None

    def allowed(self, opts: ExportOptions, client_host: str) -> bool:
        addr = ipaddress.ip_address(client_host)
        return any(addr in ipaddress.ip_network(c) for c in opts.clients
                   if ipaddress.ip_network(c).version == addr.version)

    def squash(self, opts: ExportOptions, cred: Cred) -> Cred:
        if cred.uid == 0 and opts.squash == "root":
            return Cred(opts.anon_uid, opts.anon_gid, (), cred.machine)
        return cred


ROOT = AuthSys(1, "client", 0, 0, ())


def _call(proc: int, body: bytes = b"", host: str = "127.0.0.1",
          cred: AuthSys | None = ROOT) -> RpcCall:
    return RpcCall(xid=1, prog=MOUNT_PROG, vers=3, proc=proc, flavor=1 if cred else 0,
                   cred=cred, body=body, client_host=host, client_port=900)


def _mnt(program: MountProgram, path: str | bytes, host: str = "127.0.0.1",
         cred: AuthSys | None = ROOT) -> tuple[MountStat, bytes, list[int]]:
    u = Unpacker(program.handle(_call(1, pack_dirpath(path), host, cred)))
    status = MountStat(u.enum())
    if status != MountStat.OK:
        u.done()
        return status, b"", []
    fh = u.opaque(64)
    flavors = u.array(u.uint)
    u.done()
    return status, fh, flavors


@pytest.fixture
def exports() -> FakeExports:
    return FakeExports()


@pytest.fixture
def program(exports: FakeExports) -> MountProgram:
    return MountProgram(exports)  # type: ignore[arg-type]


def test_mnt_gives_root_handle_and_auth_sys(program: MountProgram) -> None:
    assert _mnt(program, "/share1") == (MountStat.OK, b"root:share1", [1])
    assert _mnt(program, "//share1/")[:2] == (MountStat.OK, b"root:share1")
    assert program.mounts() == [("127.0.0.1", "/share1")]


def test_mnt_of_a_directory_below_the_export(program: MountProgram, exports: FakeExports) -> None:
    assert _mnt(program, "/share1/sub")[:2] == (MountStat.OK, b"sub:share1")
    # Root squash applies to the walk: uid 0 became 65534.
    assert exports.shares["/share1"][0].creds[-1].uid == 65534
    assert _mnt(program, "/share1/file")[0] == MountStat.NOTDIR
    assert _mnt(program, "/share1/missing")[0] == MountStat.NOENT
    assert _mnt(program, "/share1/secret")[0] == MountStat.ACCES
    assert _mnt(program, "/share1/..")[0] == MountStat.ACCES  # never above the export


def test_mnt_refusals(program: MountProgram) -> None:
    assert _mnt(program, "/nope")[0] == MountStat.NOENT
    assert _mnt(program, "/")[0] == MountStat.NOENT
    assert _mnt(program, "/lan")[0] == MountStat.ACCES  # 127.0.0.1 is not in 10.0.0.0/8
    assert _mnt(program, "/lan", host="10.1.2.3")[:2] == (MountStat.OK, b"root:lan")
    assert _mnt(program, "/share1", host="192.168.1.9")[0] == MountStat.ACCES
    assert _mnt(program, "/share1", host="::1")[0] == MountStat.OK
    assert _mnt(program, "/" + "a" * 1024)[0] == MountStat.NAMETOOLONG
    assert _mnt(program, "/" + "a" * 1023)[0] == MountStat.NOENT
    assert program.mounts() == [("10.1.2.3", "/lan"), ("::1", "/share1")]


def test_auth_none_mounts_as_anonymous(program: MountProgram, exports: FakeExports) -> None:
    assert _mnt(program, "/share1/sub", cred=None)[0] == MountStat.OK
    assert exports.shares["/share1"][0].creds[-1] == Cred(65534, 65534)


def test_dump_umnt_umntall(program: MountProgram) -> None:
    _mnt(program, "/share1")
    _mnt(program, "/share1/sub")
    _mnt(program, "/lan", host="10.0.0.1")

    def dump() -> list[tuple[str, str]]:
        u = Unpacker(program.handle(_call(2)))
        out = []
        while u.bool():
            out.append((u.string(255), u.string(1024)))
        u.done()
        return out

    assert dump() == [("127.0.0.1", "/share1"), ("127.0.0.1", "/share1/sub"),
                      ("10.0.0.1", "/lan")]
    assert program.handle(_call(3, pack_dirpath("/share1/"))) == b""
    assert dump() == [("127.0.0.1", "/share1/sub"), ("10.0.0.1", "/lan")]
    assert program.handle(_call(4)) == b""
    assert dump() == [("10.0.0.1", "/lan")]


def test_export_lists_shares_and_groups(program: MountProgram) -> None:
    u = Unpacker(program.handle(_call(5)))
    out = []
    while u.bool():
        path = u.string(1024)
        groups = []
        while u.bool():
            groups.append(u.string(255))
        out.append((path, groups))
    u.done()
    assert out == [("/share1", ["127.0.0.1/32", "::1/128"]), ("/lan", ["10.0.0.0/8"])]


def test_bad_arguments(program: MountProgram) -> None:
    for proc, body in [(0, b"\0\0\0\0"), (1, b""), (1, struct.pack(">I", 5) + b"ab"),
                       (1, pack_dirpath("/share1") + b"\0\0\0\0"), (2, b"x"),
                       (1, struct.pack(">I", 1 << 20) + b"\0" * 8)]:
        with pytest.raises(RpcError) as info:
            program.handle(_call(proc, body))
        assert info.value.stat == AcceptStat.GARBAGE_ARGS
    with pytest.raises(RpcError) as info:
        program.handle(_call(6))
    assert info.value.stat == AcceptStat.PROC_UNAVAIL
    assert program.handle(_call(0)) == b""


def test_call_cred(exports: FakeExports) -> None:
    opts = ExportOptions(squash="none")
    assert call_cred(_call(0), exports, opts) == Cred(0, 0, (), "client")  # type: ignore[arg-type]
    assert call_cred(_call(0), exports, ExportOptions()).uid == 65534  # type: ignore[arg-type]


def test_mount_over_tcp(program: MountProgram) -> None:
    async def main() -> None:
        server = RpcServer([program], "127.0.0.1", 0)
        await server.start()
        try:
            def client() -> list[bytes]:
                out = []
                with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                    records = RecordReassembler()
                    for xid, proc, body in [(1, 1, pack_dirpath("/share1")), (2, 0, b""),
                                            (3, 1, pack_dirpath("/lan"))]:
                        s.sendall(frame(encode_call(xid, MOUNT_PROG, 3, proc, body, ROOT)))
                        while (rec := records.next_record()) is None:
                            records.receive_data(s.recv(65536))
                        out.append(rec)
                    s.sendall(frame(encode_call(4, MOUNT_PROG, 1, 1, pack_dirpath("/share1"))))
                    while (rec := records.next_record()) is None:
                        records.receive_data(s.recv(65536))
                    out.append(rec)
                return out

            replies = [decode_reply(r) for r in await asyncio.to_thread(client)]
            assert replies[0].body == struct.pack(">II", 0, 11) + b"root:share1\0" + \
                struct.pack(">II", 1, 1)
            assert replies[1].body == b""
            assert replies[2].body == struct.pack(">I", MountStat.ACCES)
            assert (replies[3].accept_stat, replies[3].low, replies[3].high) == (
                AcceptStat.PROG_MISMATCH, 3, 3)
        finally:
            await server.stop()

    asyncio.run(main())
