"""NFS v4.1 byte-range locks, OPEN_DOWNGRADE, large READs, nested exports and fuzzing of the
COMPOUND decoder, with the test-side client of ``test_nfs4``."""

from __future__ import annotations

import os
from typing import Any

from fileshare.fs import ExportOptions, FsErrno, FsError
from fileshare.nfs4 import PSEUDO_PREFIX, Nfs4Program
from fileshare.nfs4types import A, Op, Stat, StateId
from fileshare.rpc import AuthError, AuthFlavor, AuthSys, RpcCall, RpcError
from fileshare.xdr import Packer, Unpacker
from tests.fileshare.memfs import MemExports, MemFs
from tests.fileshare.test_nfs4 import (  # noqa: F401 - fixtures are used by name
    HOME,
    ROOT,
    USER,
    Client,
    Reply,
    _mode,
    _op,
    c,
    create_file,
    exports,
    op_close,
    op_exchange_id,
    op_getattr,
    op_getfh,
    op_lookup,
    op_mkdir,
    op_open,
    op_putfh,
    op_putrootfh,
    op_read,
    op_readdir,
    op_sequence,
    op_setattr,
    op_write,
    prog,
    share,
)


# ------------------------------------------------------------------------- tests: locks


def op_lock_new(open_sid: StateId, owner: bytes, locktype: int, offset: int, length: int
                ) -> bytes:
    def b(p: Packer) -> None:
        p.uint(locktype)
        p.bool(False)
        p.uhyper(offset)
        p.uhyper(length)
        p.bool(True)
        p.uint(0)
        open_sid.pack(p)
        p.uint(0)
        p.uhyper(0)
        p.opaque(owner)
    return _op(Op.LOCK, b)


def op_lock_existing(lock_sid: StateId, locktype: int, offset: int, length: int) -> bytes:
    def b(p: Packer) -> None:
        p.uint(locktype)
        p.bool(False)
        p.uhyper(offset)
        p.uhyper(length)
        p.bool(False)
        lock_sid.pack(p)
        p.uint(0)
    return _op(Op.LOCK, b)


def op_locku(lock_sid: StateId, offset: int, length: int) -> bytes:
    def b(p: Packer) -> None:
        p.uint(2)
        p.uint(0)
        lock_sid.pack(p)
        p.uhyper(offset)
        p.uhyper(length)
    return _op(Op.LOCKU, b)


def op_lockt(owner: bytes, locktype: int, offset: int, length: int) -> bytes:
    def b(p: Packer) -> None:
        p.uint(locktype)
        p.uhyper(offset)
        p.uhyper(length)
        p.uhyper(0)
        p.opaque(owner)
    return _op(Op.LOCKT, b)


def _lock_sid(body: bytes) -> StateId:
    u = Unpacker(body)
    return StateId.unpack(u)


def test_byte_range_locks(c: Client, prog: Nfs4Program) -> None:
    fh, sid = create_file(c, "locked", b"x" * 100)
    raw = c.send([op_sequence(c.sessionid, c.seq + 1), op_putfh(fh),
                  op_lock_new(sid, b"lo1", 2, 10, 20)])
    c.seq += 1
    assert raw.status == 0
    other = Client(prog).connect()
    _, osid = create_file(other, "other-open")
    r = other.ok(op_putfh(fh), op_open(None, access=3, create=None))
    osid = r[2]["stateid"]
    assert isinstance(osid, StateId)
    # a write lock of another owner overlapping [10, 30) is denied, with the holder named
    deny = other(op_putfh(fh), op_lockt(b"lo2", 1, 25, 10))
    assert deny.status == Stat.DENIED
    assert deny[2]["denied"] == (10, 20, 2, c.clientid, b"lo1")
    assert other(op_putfh(fh), op_lock_new(osid, b"lo2", 1, 0, 10)).status == 0  # no overlap
    assert other(op_putfh(fh), op_lockt(b"lo2", 2, 29, 0xFFFFFFFFFFFFFFFF)).status == \
        Stat.DENIED
    assert other(op_putfh(fh), op_lockt(b"lo2", 2, 30, 5)).status == 0
    assert other(op_putfh(fh), op_lockt(b"lo2", 2, 0, 0)).status == Stat.INVAL
    # the holder unlocks; CLOSE with locks held is refused until then
    r = c(op_putfh(fh), op_lockt(b"nobody", 2, 0, 5))
    assert r.status == Stat.DENIED  # lo2 holds [0, 10) as a read lock
    assert c(op_putfh(fh), op_close(sid)).status == Stat.LOCKS_HELD
    current = StateId(1, bytes(12))
    r = c(op_putfh(fh), op_lock_new(sid, b"lo1", 2, 50, 1), op_locku(current, 0,
                                                                   0xFFFFFFFFFFFFFFFF))
    assert r.status == 0
    assert other(op_putfh(fh), op_lockt(b"lo2", 2, 10, 20)).status == 0
    assert c(op_putfh(fh), op_close(sid)).status == 0


# ------------------------------------------------------------------------- tests: robustness


def test_nfs4_codecs_and_state_stay_pure() -> None:
    from tests.test_layering import PURE_FORBIDDEN, ROOT, imports, offending

    for module in ("fileshare/nfs4types.py", "fileshare/nfs4state.py"):
        assert offending(imports(ROOT / module), PURE_FORBIDDEN) == [], module


class SmallMemFs(MemFs):
    LIMIT = 1 << 20

    def write(self, cred: Any, fh: bytes, offset: int, data: Any, stable: bool) -> Any:
        if offset + len(data) > self.LIMIT:
            raise FsError(FsErrno.FBIG)
        return super().write(cred, fh, offset, data, stable)

    def setattr(self, cred: Any, fh: bytes, changes: Any, guard_ctime_ns: Any = None) -> Any:
        if changes.size is not None and changes.size > self.LIMIT:
            raise FsError(FsErrno.FBIG)
        return super().setattr(cred, fh, changes, guard_ctime_ns)


def _valid_compound(c: Client) -> bytes:
    fh, sid = create_file(c, "fuzz", b"0123456789")
    p = Packer()
    p.opaque(b"fuzz")
    p.uint(1)
    ops = [op_sequence(c.sessionid, c.seq + 1), op_putfh(fh), op_read(sid, 0, 5),
           op_write(sid, 3, b"abc"), op_getattr(A.SIZE, A.MODE), *HOME,
           op_open("n", create=3, verifier=b"V" * 8, attrs={A.MODE: _mode(0o600)}),
           op_readdir(), op_setattr(sid, {A.SIZE: lambda q: q.uhyper(2)})]
    p.uint(len(ops))
    for o in ops:
        p.raw(o)
    return p.getvalue()


def _check_reply(c: Client, body: bytes) -> None:
    try:
        reply = c.raw(body)
    except (RpcError, AuthError):
        return
    u = Unpacker(reply)
    status = u.uint()
    assert status != Stat.SERVERFAULT
    u.opaque()
    assert u.uint() <= 1024


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    pass
else:
    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=st.binary(max_size=400))
    def test_fuzz_arbitrary_bytes_only_our_errors(c: Client, data: bytes) -> None:
        _check_reply(c, data)

    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
           cut=st.integers(0, 10_000))
    def test_fuzz_mutated_compounds_never_fault(c: Client, flips: list[tuple[int, int]],
                                                cut: int) -> None:
        # a session of its own (the mutated SEQUENCE may stick) on a share that keeps files
        # small: MemFs holds files in memory, a flipped offset byte would ask for terabytes
        ex = MemExports()
        ex.add("/share1", SmallMemFs("small", 5), ExportOptions(squash="none"))
        c = Client(Nfs4Program(ex)).connect()
        body = bytearray(_valid_compound(c))
        for pos, value in flips:
            body[pos % len(body)] = value
        _check_reply(c, bytes(body[:max(12, cut % (len(body) + 1))]))


def test_open_downgrade(c: Client, prog: Nfs4Program) -> None:
    fh, sid = create_file(c, "dg")
    r = c.ok(op_putfh(fh), op_open(None, access=3, deny=2, create=None))
    sid = r[2]["stateid"]
    assert isinstance(sid, StateId)
    other = Client(prog).connect()
    assert other(op_putfh(fh), op_open(None, access=2, create=None)).status == Stat.SHARE_DENIED
    down = _op(Op.OPEN_DOWNGRADE, lambda p: (sid.pack(p), p.uint(0), p.uint(1), p.uint(0)))
    r = c.ok(op_putfh(fh), down)
    new = r[2]["stateid"]
    assert isinstance(new, StateId) and new.other == sid.other and new.seqid == sid.seqid + 1
    assert other(op_putfh(fh), op_open(None, access=2, create=None)).status == 0
    assert c(op_putfh(fh), op_write(new, 0, b"x")).status == Stat.OPENMODE
    assert c(op_putfh(fh), op_write(sid, 0, b"x")).status == Stat.OLD_STATEID
    up = _op(Op.OPEN_DOWNGRADE, lambda p: (new.pack(p), p.uint(0), p.uint(3), p.uint(0)))
    assert c(op_putfh(fh), up).status == Stat.INVAL  # a downgrade cannot widen


def test_exchange_id_principal_collision(prog: Nfs4Program) -> None:
    alice = Client(prog, USER).connect(owner=b"shared-owner")
    create_file(alice, "held")
    mallory = Client(prog, AuthSys(0, "m", 2000, 2000, ()))
    r = mallory.send([op_exchange_id(b"shared-owner", b"x" * 8)])
    assert r.status == Stat.CLID_INUSE


def test_large_read_goes_out_as_buffers(c: Client) -> None:
    data = os.urandom(300_001)
    fh, sid = create_file(c, "big", data)
    c.seq += 1
    p = Packer()
    p.opaque(b"")
    p.uint(1)
    p.uint(3)
    for o in (op_sequence(c.sessionid, c.seq, cache=False), op_putfh(fh),
              op_read(sid, 0, 400_000)):
        p.raw(o)
    reply = c.prog.handle(RpcCall(99, 100003, 4, 1, AuthFlavor.AUTH_SYS, ROOT, p.getvalue(),
                                  "127.0.0.1", 800))
    assert isinstance(reply, list) and any(part is data or part == data for part in reply)
    r = Reply.decode(b"".join(reply))
    assert r[2] == {"eof": True, "data": data}
    # not cached (large, cachethis false): a retry is refused rather than re-read
    again = c.send([op_sequence(c.sessionid, c.seq, cache=False), op_putfh(fh),
                    op_read(sid, 0, 400_000)])
    assert again.status == Stat.RETRY_UNCACHED_REP


def test_nested_export_paths_make_pseudo_directories(exports: MemExports) -> None:
    deep = exports.add("/teams/blue", MemFs("blue", 12), ExportOptions(squash="none"))
    c = Client(Nfs4Program(exports)).connect()
    r = c.ok(op_putrootfh(), op_readdir())
    assert sorted(e[1] for e in r[2]["entries"]) == ["share1", "teams"]  # type: ignore[union-attr]
    r = c.ok(op_putrootfh(), op_lookup("teams"), op_getfh(), op_lookup("blue"), op_getfh(),
             _op(Op.LOOKUPP), op_getfh(), op_getattr(A.TYPE, A.FSID))
    assert bytes(r[3]["fh"]).startswith(PSEUDO_PREFIX)  # type: ignore[arg-type]
    assert r[5]["fh"] == deep.root_handle()
    assert r[7]["fh"] == r[3]["fh"]
    assert c(op_putrootfh(), op_lookup("teams"), op_mkdir("x")).status == Stat.ROFS
    r = c.ok(op_putfh(deep.root_handle()), op_getattr(A.MOUNTED_ON_FILEID, A.FILEID))
    u = Unpacker(r[2]["vals"])  # type: ignore[arg-type]
    assert u.uhyper() != u.uhyper()  # the share root is mounted on a pseudo directory
