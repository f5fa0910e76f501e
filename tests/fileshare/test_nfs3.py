"""NFS v3 (fileshare/nfs3.py) procedure by procedure against the in-memory file system.

Calls are encoded with the argument types of fileshare/nfs3types.py and go through
``Nfs3Program.handle`` as the RPC server would hand them over; results are decoded field by
field with the XDR unpacker, so a wrong shape fails the ``done()`` at the end of each decode.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fileshare.fs import (
    ACCESS_DELETE, ACCESS_EXECUTE, ACCESS_EXTEND, ACCESS_LOOKUP, ACCESS_MODIFY, ACCESS_READ,
    CreateMode, ExportOptions, FsErrno, FsError,
)
from fileshare.nfs import NfsProgram
from fileshare.nfs3 import MAXFILESIZE, RTMAX, WTMAX, Nfs3Program
from fileshare.nfs3types import (
    FSF3_CANSETTIME, FSF3_HOMOGENEOUS, FSF3_LINK, FSF3_SYMLINK, AccessArgs, CreateArgs,
    DirOpArgs, Fattr3, FhArgs, Ftype, LinkArgs, MkdirArgs, MknodArgs, Proc, ReadArgs, ReaddirArgs,
    RenameArgs, Sattr3, SetattrArgs, StableHow, Stat, SymlinkArgs, TimeHow, WriteArgs,
    unpack_fattr3, unpack_fh, unpack_post_op_attr, unpack_post_op_fh3, unpack_wcc_data,
)
from fileshare.rpc import AcceptStat, AuthError, AuthFlavor, AuthStat, AuthSys, RpcCall, RpcError
from fileshare.xdr import Packer, Unpacker
from tests.fileshare.memfs import MemExports, MemFs

USER = AuthSys(0, "client", 1000, 1000, (1000,))
ROOT = AuthSys(0, "client", 0, 0, ())
OTHER = AuthSys(0, "client", 2000, 2000, ())


def _body(args: Any) -> bytes:
    p = Packer()
    args.encode(p)
    return p.getvalue()


@dataclass
class Client:
    """Encodes calls, runs them through the program, decodes the results."""

    program: Any
    cred: AuthSys | None = USER
    host: str = "127.0.0.1"

    def raw(self, proc: int, body: bytes, vers: int = 3) -> bytes:
        call = RpcCall(xid=1, prog=100003, vers=vers, proc=proc,
                       flavor=AuthFlavor.AUTH_SYS if self.cred else AuthFlavor.AUTH_NONE,
                       cred=self.cred, body=body, client_host=self.host, client_port=700)
        return self.program.handle(call)

    def call(self, proc: Proc, args: Any) -> tuple[Stat, Unpacker]:
        u = Unpacker(self.raw(proc, _body(args)))
        return Stat(u.uint()), u

    # --- decoded procedures (return status and a dict of fields) ----------------------------
    def getattr(self, fh: bytes) -> tuple[Stat, Fattr3 | None]:
        stat, u = self.call(Proc.GETATTR, FhArgs(fh))
        attr = unpack_fattr3(u) if stat == Stat.OK else None
        u.done()
        return stat, attr

    def lookup(self, d: bytes, name: bytes | str) -> tuple[Stat, dict[str, Any]]:
        stat, u = self.call(Proc.LOOKUP, DirOpArgs(d, _b(name)))
        out: dict[str, Any] = {}
        if stat == Stat.OK:
            out["fh"] = unpack_fh(u)
            out["attr"] = unpack_post_op_attr(u)
        out["dir_attr"] = unpack_post_op_attr(u)
        u.done()
        return stat, out

    def create(self, d: bytes, name: bytes | str, mode: CreateMode = CreateMode.UNCHECKED,
               attrs: Sattr3 | None = None, verifier: bytes | None = None
               ) -> tuple[Stat, dict[str, Any]]:
        return self._newobj(Proc.CREATE, CreateArgs(d, _b(name), mode, attrs or (
            None if mode == CreateMode.EXCLUSIVE else Sattr3(mode=0o644)), verifier))

    def mkdir(self, d: bytes, name: bytes | str, mode: int = 0o755) -> tuple[Stat, dict[str, Any]]:
        return self._newobj(Proc.MKDIR, MkdirArgs(d, _b(name), Sattr3(mode=mode)))

    def _newobj(self, proc: Proc, args: Any) -> tuple[Stat, dict[str, Any]]:
        stat, u = self.call(proc, args)
        out: dict[str, Any] = {}
        if stat == Stat.OK:
            out["fh"] = unpack_post_op_fh3(u)
            out["attr"] = unpack_post_op_attr(u)
        out["wcc"] = unpack_wcc_data(u)
        u.done()
        return stat, out

    def write(self, fh: bytes, offset: int, data: bytes,
              stable: StableHow = StableHow.UNSTABLE) -> tuple[Stat, dict[str, Any]]:
        stat, u = self.call(Proc.WRITE, WriteArgs(fh, offset, len(data), stable, data))
        out: dict[str, Any] = {"wcc": unpack_wcc_data(u)}
        if stat == Stat.OK:
            out["count"] = u.uint()
            out["committed"] = u.uint()
            out["verf"] = u.fopaque(8)
        u.done()
        return stat, out

    def read(self, fh: bytes, offset: int, count: int) -> tuple[Stat, dict[str, Any]]:
        stat, u = self.call(Proc.READ, ReadArgs(fh, offset, count))
        out: dict[str, Any] = {"attr": unpack_post_op_attr(u)}
        if stat == Stat.OK:
            out["count"] = u.uint()
            out["eof"] = u.bool()
            out["data"] = u.opaque()
        u.done()
        return stat, out

    def commit(self, fh: bytes) -> tuple[Stat, dict[str, Any]]:
        stat, u = self.call(Proc.COMMIT, ReadArgs(fh, 0, 0))
        out: dict[str, Any] = {"wcc": unpack_wcc_data(u)}
        if stat == Stat.OK:
            out["verf"] = u.fopaque(8)
        u.done()
        return stat, out

    def wcc(self, proc: Proc, args: Any, n: int = 1) -> Stat:
        stat, u = self.call(proc, args)
        for _ in range(n):
            unpack_wcc_data(u)
        u.done()
        return stat

    def access(self, fh: bytes, bits: int) -> tuple[Stat, int | None]:
        stat, u = self.call(Proc.ACCESS, AccessArgs(fh, bits))
        unpack_post_op_attr(u)
        granted = u.uint() if stat == Stat.OK else None
        u.done()
        return stat, granted

    def readdir(self, d: bytes, cookie: int, verf: bytes, count: int,
                dircount: int | None = None) -> tuple[Stat, dict[str, Any], int]:
        plus = dircount is not None
        body = self.raw(Proc.READDIRPLUS if plus else Proc.READDIR,
                        _body(ReaddirArgs(d, cookie, verf, count, dircount)))
        u = Unpacker(body)
        stat = Stat(u.uint())
        out: dict[str, Any] = {"dir_attr": unpack_post_op_attr(u)}
        if stat == Stat.OK:
            out["verf"] = u.fopaque(8)
            entries = []
            while u.bool():
                e: dict[str, Any] = {"fileid": u.uhyper(), "name": u.opaque(),
                                     "cookie": u.uhyper()}
                if plus:
                    e["attr"] = unpack_post_op_attr(u)
                    e["fh"] = unpack_post_op_fh3(u)
                entries.append(e)
            out["entries"] = entries
            out["eof"] = u.bool()
        u.done()
        return stat, out, len(body)


def _b(name: bytes | str) -> bytes:
    return name.encode() if isinstance(name, str) else name


@pytest.fixture
def exports() -> MemExports:
    ex = MemExports()
    ex.add("/share1", MemFs("share1", 1))
    ex.add("/ro", MemFs("ro", 2), ExportOptions(read_only=True))
    ex.add("/lan", MemFs("lan", 3), ExportOptions(clients=("10.0.0.0/8",)))
    ex.add("/open", MemFs("open", 4), ExportOptions(squash="none"))
    return ex


@pytest.fixture
def client(exports: MemExports) -> Client:
    return Client(Nfs3Program(exports))


def _root(exports: MemExports, path: str = "/share1") -> bytes:
    found = exports.by_path(path)
    assert found is not None
    return found[0].root_handle()


def _fs(exports: MemExports, path: str = "/share1") -> MemFs:
    found = exports.by_path(path)
    assert found is not None
    return found[0]


# --- RPC-level behaviour ---------------------------------------------------------------------------

def test_null_needs_no_credential_but_every_other_procedure_wants_auth_sys(
        client: Client, exports: MemExports) -> None:
    client.cred = None
    assert client.raw(Proc.NULL, b"") == b""
    with pytest.raises(AuthError) as err:
        client.raw(Proc.GETATTR, _body(FhArgs(_root(exports))))
    assert err.value.stat == AuthStat.AUTH_TOOWEAK


def test_wrong_version_and_unknown_procedure(client: Client) -> None:
    with pytest.raises(RpcError) as err:
        client.raw(0, b"", vers=2)
    assert (err.value.stat, err.value.low, err.value.high) == (AcceptStat.PROG_MISMATCH, 3, 3)
    with pytest.raises(RpcError) as err:
        client.raw(22, b"")
    assert err.value.stat == AcceptStat.PROC_UNAVAIL


def test_nfs_dispatcher_routes_by_version(exports: MemExports) -> None:
    class V4:
        prog = 100003
        versions = (4,)

        def handle(self, call: RpcCall) -> bytes:
            return b"v4"

    nfs = NfsProgram(Nfs3Program(exports), V4())
    assert nfs.versions == (3, 4)
    c = Client(nfs)
    assert c.raw(Proc.NULL, b"", vers=4) == b"v4"
    assert Stat(Unpacker(c.raw(Proc.GETATTR, _body(FhArgs(_root(exports))))).uint()) == Stat.OK
    with pytest.raises(RpcError) as err:
        c.raw(0, b"", vers=2)
    assert (err.value.stat, err.value.low, err.value.high) == (AcceptStat.PROG_MISMATCH, 3, 4)
    with pytest.raises(ValueError):
        NfsProgram(Nfs3Program(exports), Nfs3Program(exports))


@pytest.mark.parametrize("proc, body", [
    (Proc.GETATTR, b""),
    (Proc.GETATTR, b"\0\0\0\x04abc"),  # handle cut short
    (Proc.GETATTR, struct.pack(">I", 65) + bytes(68)),  # handle over 64 bytes
    (Proc.GETATTR, struct.pack(">I", 0) + b"junk"),  # trailing bytes
    (Proc.WRITE, _body(WriteArgs(b"h" * 16, 0, 10, StableHow.UNSTABLE, b"abc"))),
    (Proc.WRITE, _body(WriteArgs(b"h" * 16, 0, 3, 7, b"abc"))),  # bad stable_how
    (Proc.WRITE, _body(WriteArgs(b"h" * 16, 0, 3, 0, b"abc")) + b"\0\0\0\0"),  # trailing
    (Proc.CREATE, _body(DirOpArgs(b"h" * 16, b"x")) + struct.pack(">I", 3)),  # bad createmode
    (Proc.SETATTR, _body(FhArgs(b"h" * 16)) + struct.pack(">IIIII", 0, 0, 0, 0, 9)),  # time_how
])
def test_malformed_arguments_are_garbage_args(client: Client, proc: Proc, body: bytes) -> None:
    with pytest.raises(RpcError) as err:
        client.raw(proc, body)
    assert err.value.stat == AcceptStat.GARBAGE_ARGS


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(proc=st.integers(0, 23), body=st.binary(max_size=200))
def test_arbitrary_bytes_never_crash(client: Client, exports: MemExports, proc: int,
                                     body: bytes) -> None:
    """Random argument bytes, and random bytes after a real handle: a reply or an RPC error."""
    for data in (body, _body(FhArgs(_root(exports))) + body):
        try:
            out = client.raw(proc, data)
        except RpcError as exc:
            assert exc.stat in (AcceptStat.GARBAGE_ARGS, AcceptStat.PROC_UNAVAIL)
        else:
            assert isinstance(out, bytes) and len(out) % 4 == 0


def test_bad_handles(client: Client, exports: MemExports) -> None:
    assert client.getattr(b"")[0] == Stat.BADHANDLE
    assert client.getattr(b"not ours at all!")[0] == Stat.BADHANDLE
    fh = client.create(_root(exports), "gone")[1]["fh"]
    assert client.wcc(Proc.REMOVE, DirOpArgs(_root(exports), b"gone")) == Stat.OK
    assert client.getattr(fh)[0] == Stat.STALE
    stat, out = client.read(fh, 0, 10)
    assert stat == Stat.STALE and out["attr"] is None


def test_client_outside_the_share_clients_is_refused(client: Client, exports: MemExports) -> None:
    lan = _root(exports, "/lan")
    assert client.getattr(lan)[0] == Stat.ACCES
    stat, out = client.lookup(lan, "x")
    assert stat == Stat.ACCES and out["dir_attr"] is None  # nothing leaks to a refused client
    client.host = "10.1.2.3"
    assert client.getattr(lan)[0] == Stat.OK


def test_root_is_squashed_unless_the_share_says_none(client: Client, exports: MemExports) -> None:
    client.cred = ROOT
    stat, out = client.create(_root(exports), "by-root")
    assert stat == Stat.OK and (out["attr"].uid, out["attr"].gid) == (65534, 65534)
    stat, out = client.create(_root(exports, "/open"), "by-root")
    assert stat == Stat.OK and (out["attr"].uid, out["attr"].gid) == (0, 0)


# --- files -------------------------------------------------------------------------------------------

def test_create_write_commit_read(client: Client, exports: MemExports) -> None:
    root = _root(exports)
    stat, out = client.create(root, "a.txt", attrs=Sattr3(mode=0o640))
    assert stat == Stat.OK
    fh, attr = out["fh"], out["attr"]
    assert (attr.type, attr.mode, attr.uid, attr.size) == (Ftype.REG, 0o640, 1000, 0)
    before, after = out["wcc"]
    assert before is not None and after is not None and after.mtime_ns > before.mtime_ns

    stat, out = client.write(fh, 0, b"hello ")
    assert stat == Stat.OK and out["count"] == 6 and out["committed"] == StableHow.UNSTABLE
    verf = out["verf"]
    assert verf == _fs(exports).write_verifier
    stat, out = client.write(fh, 6, b"world", StableHow.FILE_SYNC)
    assert out["committed"] == StableHow.FILE_SYNC and out["wcc"][1].size == 11
    assert out["wcc"][0].size == 6  # pre-operation size

    stat, out = client.read(fh, 0, 100)
    assert (stat, out["data"], out["eof"], out["count"]) == (Stat.OK, b"hello world", True, 11)
    stat, out = client.read(fh, 0, 5)
    assert (out["data"], out["eof"]) == (b"hello", False)
    stat, out = client.read(fh, 50, 5)
    assert (out["data"], out["eof"]) == (b"", True)

    client.write(fh, 11, b"!")
    stat, out = client.commit(fh)
    assert stat == Stat.OK and out["verf"] == verf
    assert _fs(exports).durable_bytes(fh) == b"hello world!"

    stat, out = client.lookup(root, "a.txt")
    assert stat == Stat.OK and out["fh"] == fh and out["attr"].size == 12
    assert out["dir_attr"].type == Ftype.DIR


def test_verifier_changes_and_uncommitted_writes_are_lost_on_restart(
        client: Client, exports: MemExports) -> None:
    fh = client.create(_root(exports), "v")[1]["fh"]
    verf = client.write(fh, 0, b"kept")[1]["verf"]
    client.commit(fh)
    client.write(fh, 4, b"lost")
    _fs(exports).crash()
    stat, out = client.commit(fh)
    assert out["verf"] != verf  # the client sees it and resends its uncommitted writes
    assert client.read(fh, 0, 100)[1]["data"] == b"kept"


def test_read_is_capped_at_rtmax(client: Client, exports: MemExports) -> None:
    fh = client.create(_root(exports), "big")[1]["fh"]
    data = bytes(range(256)) * (RTMAX // 256 + 16)
    for off in range(0, len(data), WTMAX):
        assert client.write(fh, off, data[off:off + WTMAX])[0] == Stat.OK
    stat, out = client.read(fh, 0, 4 * RTMAX)
    assert stat == Stat.OK and out["count"] == RTMAX and out["data"] == data[:RTMAX]
    assert out["eof"] is False


def test_write_past_the_largest_object_is_fbig(client: Client, exports: MemExports) -> None:
    fh = client.create(_root(exports), "f")[1]["fh"]
    assert client.write(fh, MAXFILESIZE - 1, b"xy")[0] == Stat.FBIG
    stat = client.wcc(Proc.SETATTR, SetattrArgs(fh, Sattr3(size=MAXFILESIZE + 1), None))
    assert stat == Stat.FBIG


def test_create_modes(client: Client, exports: MemExports) -> None:
    root = _root(exports)
    fh = client.create(root, "c")[1]["fh"]
    client.write(fh, 0, b"data")
    # UNCHECKED on an existing file succeeds (and applies a size of 0: truncation).
    stat, out = client.create(root, "c", CreateMode.UNCHECKED, Sattr3(size=0))
    assert stat == Stat.OK and out["fh"] == fh and out["attr"].size == 0
    assert client.create(root, "c", CreateMode.GUARDED)[0] == Stat.EXIST
    # EXCLUSIVE: a retry with the same verifier gets the same file; another verifier EXIST.
    stat, first = client.create(root, "x", CreateMode.EXCLUSIVE, verifier=b"12345678")
    assert stat == Stat.OK
    stat, again = client.create(root, "x", CreateMode.EXCLUSIVE, verifier=b"12345678")
    assert stat == Stat.OK and again["fh"] == first["fh"]
    assert client.create(root, "x", CreateMode.EXCLUSIVE, verifier=b"87654321")[0] == Stat.EXIST
    stat, out = client.create(root, "c", CreateMode.EXCLUSIVE, verifier=b"12345678")
    assert stat == Stat.EXIST and out["wcc"][1] is not None  # failure carries dir attributes


@pytest.mark.parametrize("name, stat", [
    (b"a/b", Stat.INVAL), (b"a\0b", Stat.INVAL), (b"", Stat.INVAL),
    (b"n" * 256, Stat.NAMETOOLONG), (b"\xc3\xa9" * 128, Stat.NAMETOOLONG),
])
def test_bad_names(client: Client, exports: MemExports, name: bytes, stat: Stat) -> None:
    root = _root(exports)
    assert client.create(root, name)[0] == stat
    assert client.mkdir(root, name)[0] == stat
    assert client.lookup(root, name)[0] == stat
    assert client.wcc(Proc.REMOVE, DirOpArgs(root, name)) == stat
    assert client.wcc(Proc.RENAME, RenameArgs(root, name, root, b"ok"), 2) == stat


def test_longest_name_and_dot_names(client: Client, exports: MemExports) -> None:
    root = _root(exports)
    assert client.create(root, b"n" * 255)[0] == Stat.OK
    assert client.create(root, ".")[0] == Stat.EXIST
    assert client.mkdir(root, "..")[0] == Stat.EXIST
    assert client.wcc(Proc.RMDIR, DirOpArgs(root, b".")) == Stat.INVAL
    d = client.mkdir(root, "d")[1]["fh"]
    assert client.lookup(d, ".")[1]["fh"] == d
    assert client.lookup(d, "..")[1]["fh"] == root


def test_paths_past_1024_bytes(client: Client, exports: MemExports) -> None:
    d = _root(exports)
    for i in range(4):
        d = client.mkdir(d, f"{i}" * 250)[1]["fh"]
    assert client.create(d, "x" * 30)[0] == Stat.NAMETOOLONG  # 4 * 251 + 31 > 1024
    assert client.create(d, "x" * 10)[0] == Stat.OK


def test_unsupported_procedures(client: Client, exports: MemExports) -> None:
    root = _root(exports)
    fh = client.create(root, "f")[1]["fh"]
    stat, u = client.call(Proc.READLINK, FhArgs(fh))
    assert stat == Stat.NOTSUPP
    unpack_post_op_attr(u)
    u.done()
    assert client.wcc(Proc.SYMLINK, SymlinkArgs(root, b"l", Sattr3(), b"f")) == Stat.NOTSUPP
    for kind in (Ftype.FIFO, Ftype.CHR, Ftype.REG):
        assert client.wcc(Proc.MKNOD, MknodArgs(root, b"n", kind)) == Stat.NOTSUPP
    stat, u = client.call(Proc.LINK, LinkArgs(fh, root, b"hard"))
    assert stat == Stat.NOTSUPP
    unpack_post_op_attr(u)
    unpack_wcc_data(u)
    u.done()
    assert client.lookup(root, "l")[0] == Stat.NOENT


def test_read_only_share(client: Client, exports: MemExports) -> None:
    root = _root(exports, "/ro")
    assert client.create(root, "f")[0] == Stat.ROFS
    assert client.mkdir(root, "d")[0] == Stat.ROFS
    assert client.wcc(Proc.REMOVE, DirOpArgs(root, b"f")) == Stat.ROFS
    assert client.wcc(Proc.RMDIR, DirOpArgs(root, b"f")) == Stat.ROFS
    assert client.wcc(Proc.RENAME, RenameArgs(root, b"a", root, b"b"), 2) == Stat.ROFS
    assert client.wcc(Proc.SETATTR, SetattrArgs(root, Sattr3(mode=0o700), None)) == Stat.ROFS
    assert client.write(root, 0, b"x")[0] == Stat.ROFS
    stat, granted = client.access(root, ACCESS_READ | ACCESS_LOOKUP | ACCESS_MODIFY)
    assert (stat, granted) == (Stat.OK, ACCESS_READ | ACCESS_LOOKUP)


def test_access_grants_exactly_the_allowed_requested_bits(
        client: Client, exports: MemExports) -> None:
    root = _root(exports)
    fh = client.create(root, "f", attrs=Sattr3(mode=0o640))[1]["fh"]
    every = (ACCESS_READ | ACCESS_LOOKUP | ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE
             | ACCESS_EXECUTE)
    assert client.access(fh, every) == (Stat.OK, ACCESS_READ | ACCESS_MODIFY | ACCESS_EXTEND)
    assert client.access(fh, ACCESS_READ) == (Stat.OK, ACCESS_READ)
    assert client.access(fh, 0xFFFF_FF00) == (Stat.OK, 0)  # undefined bits are never granted
    client.cred = OTHER
    assert client.access(fh, every) == (Stat.OK, 0)
    assert client.read(fh, 0, 1)[0] == Stat.ACCES
    assert client.write(fh, 0, b"x")[0] == Stat.ACCES
    assert client.access(root, every) == (
        Stat.OK, ACCESS_READ | ACCESS_LOOKUP | ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE)


def test_setattr_and_its_guard(client: Client, exports: MemExports) -> None:
    fh = client.create(_root(exports), "s")[1]["fh"]
    client.write(fh, 0, b"0123456789")
    ctime = client.getattr(fh)[1].ctime_ns  # type: ignore[union-attr]
    guard = (ctime // 10**9, ctime % 10**9)
    stat, u = client.call(Proc.SETATTR, SetattrArgs(fh, Sattr3(size=4), (guard[0], guard[1] + 1)))
    assert stat == Stat.NOT_SYNC
    assert unpack_wcc_data(u)[1].size == 10  # type: ignore[union-attr]
    stat, u = client.call(Proc.SETATTR, SetattrArgs(fh, Sattr3(
        size=4, mode=0o600, mtime=(TimeHow.SET_TO_CLIENT_TIME, 1_600_000_000, 5)), guard))
    assert stat == Stat.OK
    before, after = unpack_wcc_data(u)
    u.done()
    assert before.size == 10 and after.size == 4 and after.mode == 0o600  # type: ignore[union-attr]
    assert after.mtime_ns == 1_600_000_000 * 10**9 + 5  # type: ignore[union-attr]
    bad = Sattr3(atime=(TimeHow.SET_TO_CLIENT_TIME, 1, 10**9))
    assert client.wcc(Proc.SETATTR, SetattrArgs(fh, bad, None)) == Stat.INVAL
    client.cred = OTHER
    assert client.wcc(Proc.SETATTR, SetattrArgs(fh, Sattr3(mode=0o777), None)) == Stat.PERM


def test_directories_remove_and_rename(client: Client, exports: MemExports) -> None:
    root = _root(exports)
    d = client.mkdir(root, "d", 0o700)[1]["fh"]
    assert client.getattr(d)[1].mode == 0o700  # type: ignore[union-attr]
    f = client.create(d, "f")[1]["fh"]
    assert client.mkdir(root, "d")[0] == Stat.EXIST
    assert client.wcc(Proc.RMDIR, DirOpArgs(root, b"d")) == Stat.NOTEMPTY
    assert client.wcc(Proc.REMOVE, DirOpArgs(root, b"d")) == Stat.ISDIR
    assert client.wcc(Proc.RMDIR, DirOpArgs(d, b"f")) == Stat.NOTDIR
    assert client.wcc(Proc.REMOVE, DirOpArgs(d, b"nope")) == Stat.NOENT
    assert client.create(f, "x")[0] == Stat.NOTDIR
    assert client.read(d, 0, 10)[0] == Stat.ISDIR

    stat, u = client.call(Proc.RENAME, RenameArgs(d, b"f", root, b"g"))
    assert stat == Stat.OK
    (fb, fa), (tb, ta) = unpack_wcc_data(u), unpack_wcc_data(u)
    u.done()
    assert fb is not None and tb is not None and fa is not None and ta is not None
    assert client.lookup(root, "g")[1]["fh"] == f  # the handle follows the file
    assert client.lookup(d, "f")[0] == Stat.NOENT
    assert client.wcc(Proc.RENAME, RenameArgs(root, b"d", d, b"inside"), 2) == Stat.INVAL
    other = _root(exports, "/open")
    assert client.wcc(Proc.RENAME, RenameArgs(root, b"g", other, b"g"), 2) == Stat.XDEV
    assert client.wcc(Proc.RMDIR, DirOpArgs(root, b"d")) == Stat.OK
    assert client.getattr(d)[0] == Stat.STALE


def _names(entries: list[dict[str, Any]]) -> list[bytes]:
    return [e["name"] for e in entries]


@pytest.mark.parametrize("plus", [False, True])
def test_readdir_pages_within_the_count(client: Client, exports: MemExports, plus: bool) -> None:
    root = _root(exports)
    names = [f"file-{i:03d}-{'x' * (i % 7)}".encode() for i in range(150)]
    for n in names:
        assert client.create(root, n)[0] == Stat.OK
    count = 1024 if plus else 512
    seen: list[bytes] = []
    cookie, verf, rounds = 0, bytes(8), 0
    while True:
        stat, out, size = client.readdir(root, cookie, verf, count, 400 if plus else None)
        assert stat == Stat.OK and size <= count
        if plus:
            dir_bytes = sum(24 + (len(e["name"]) + 3) // 4 * 4 for e in out["entries"])
            assert dir_bytes <= 400
            for e in out["entries"]:
                assert client.getattr(e["fh"])[1].fileid == e["fileid"]  # type: ignore[union-attr]
                assert e["attr"].fileid == e["fileid"]
        seen += _names(out["entries"])
        rounds += 1
        if out["eof"]:
            break
        assert out["entries"]
        cookie, verf = out["entries"][-1]["cookie"], out["verf"]
    assert sorted(seen) == sorted(names) and rounds > 3


def test_readdir_edge_cases(client: Client, exports: MemExports) -> None:
    root = _root(exports)
    stat, out, _ = client.readdir(root, 0, bytes(8), 4096)
    assert (stat, out["entries"], out["eof"]) == (Stat.OK, [], True)
    client.create(root, "n" * 200)
    assert client.readdir(root, 0, bytes(8), 200)[0] == Stat.TOOSMALL
    assert client.readdir(root, 0, bytes(8), 50)[0] == Stat.TOOSMALL
    assert client.readdir(root, 0, bytes(8), 8192, 100)[0] == Stat.TOOSMALL  # dircount
    stat, out, _ = client.readdir(root, 0, bytes(8), 8192, 8192)
    assert stat == Stat.OK and len(out["entries"]) == 1
    cookie = out["entries"][0]["cookie"]
    assert client.readdir(root, cookie, b"stale!!!", 4096)[0] == Stat.BAD_COOKIE
    f = client.create(root, "file")[1]["fh"]
    assert client.readdir(f, 0, bytes(8), 4096)[0] == Stat.NOTDIR


def test_fsstat_fsinfo_pathconf(client: Client, exports: MemExports) -> None:
    root = _root(exports)
    stat, u = client.call(Proc.FSSTAT, FhArgs(root))
    assert stat == Stat.OK and unpack_post_op_attr(u) is not None
    assert [u.uhyper() for _ in range(6)] == [1 << 40, 1 << 39, 1 << 39, 1 << 20, 1 << 19, 1 << 19]
    u.uint()
    u.done()

    stat, u = client.call(Proc.FSINFO, FhArgs(root))
    assert stat == Stat.OK and unpack_post_op_attr(u) is not None
    rtmax, rtpref, rtmult, wtmax, wtpref, wtmult, dtpref = (u.uint() for _ in range(7))
    assert 64 * 1024 <= rtmax <= 1024 * 1024 and 64 * 1024 <= wtmax <= 1024 * 1024
    assert rtpref <= rtmax and wtpref <= wtmax and rtmult and wtmult and dtpref
    assert u.uhyper() == MAXFILESIZE
    assert (u.uint(), u.uint()) == (0, 1)
    props = u.uint()
    u.done()
    assert props & FSF3_HOMOGENEOUS and props & FSF3_CANSETTIME
    assert not props & (FSF3_LINK | FSF3_SYMLINK)

    stat, u = client.call(Proc.PATHCONF, FhArgs(root))
    assert stat == Stat.OK and unpack_post_op_attr(u) is not None
    assert (u.uint(), u.uint(), u.bool(), u.bool(), u.bool(), u.bool()) == (
        1, 255, True, True, False, True)
    u.done()


def test_unexpected_file_system_error_is_serverfault(
        client: Client, exports: MemExports, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _root(exports)
    fs = _fs(exports)

    def broken(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(fs, "mkdir", broken)
    stat, out = client.mkdir(root, "d")
    assert stat == Stat.SERVERFAULT and out["wcc"][1] is not None
    monkeypatch.setattr(fs, "mkdir", lambda *a, **k: (_ for _ in ()).throw(
        FsError(FsErrno.JUKEBOX)))
    assert client.mkdir(root, "d")[0] == Stat.JUKEBOX


def test_a_stable_write_the_file_system_left_unstable_is_committed(
        client: Client, exports: MemExports, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = _fs(exports)
    fh = client.create(_root(exports), "f")[1]["fh"]
    real = fs.write
    monkeypatch.setattr(fs, "write", lambda cred, h, off, data, stable: (
        real(cred, h, off, data, False)[:1] + (False,) + real(cred, h, off, b"", False)[2:]))
    stat, out = client.write(fh, 0, b"abc", StableHow.DATA_SYNC)
    assert (stat, out["committed"]) == (Stat.OK, StableHow.FILE_SYNC)
    assert fs.calls == ["commit"] and fs.durable_bytes(fh) == b"abc"
    stat, out = client.write(fh, 3, b"def", StableHow.UNSTABLE)
    assert (stat, out["committed"], fs.calls) == (Stat.OK, StableHow.UNSTABLE, ["commit"])


def test_attributes_out_of_xdr_range_are_clamped_not_fatal(
        client: Client, exports: MemExports, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    fs = _fs(exports)
    real = fs.getattr
    monkeypatch.setattr(fs, "getattr", lambda fh: dataclasses.replace(
        real(fh), uid=1 << 40, size=-5, mtime_ns=-1, ctime_ns=1 << 80))
    stat, attr = client.getattr(_root(exports))
    assert stat == Stat.OK and attr is not None
    assert (attr.uid, attr.size, attr.mtime_ns) == (0xFFFF_FFFF, 0, 0)
    assert attr.ctime_ns == 0xFFFF_FFFF * 10**9 + 10**9 - 1
