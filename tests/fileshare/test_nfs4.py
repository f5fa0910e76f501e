"""NFS v4.1 COMPOUNDs built byte by byte against Nfs4Program over the in-memory share.

The helpers below are a small test-side NFS v4.1 client: each ``op_*`` encodes one
``nfs_argop4`` and ``Reply`` decodes the results of the operations these tests use.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from fileshare.fs import ExportOptions
from fileshare.nfs4 import PSEUDO_PREFIX, Nfs4Program
from fileshare.nfs4types import A, Op, Stat, StateId, bitmap_decode, bitmap_encode
from fileshare.rpc import AcceptStat, AuthError, AuthFlavor, AuthSys, RpcCall, RpcError
from fileshare.xdr import Packer, Unpacker
from tests.fileshare.memfs import MemExports, MemFs

ROOT = AuthSys(0, "client", 0, 0, ())
USER = AuthSys(0, "client", 1000, 1000, (1000,))


# ------------------------------------------------------------------------- encoding


def _op(num: int, build: Callable[[Packer], None] | None = None) -> bytes:
    p = Packer()
    p.uint(num)
    if build:
        build(p)
    return p.getvalue()


def op_sequence(sid: bytes, seq: int, slot: int = 0, cache: bool = True) -> bytes:
    def b(p: Packer) -> None:
        p.fopaque(sid, 16)
        p.uint(seq)
        p.uint(slot)
        p.uint(slot)
        p.bool(cache)
    return _op(Op.SEQUENCE, b)


def op_exchange_id(owner: bytes, verifier: bytes = b"v" * 8, flags: int = 0) -> bytes:
    def b(p: Packer) -> None:
        p.fopaque(verifier, 8)
        p.opaque(owner)
        p.uint(flags)
        p.uint(0)  # SP4_NONE
        p.uint(0)  # no impl id
    return _op(Op.EXCHANGE_ID, b)


def op_create_session(clientid: int, seq: int, slots: int = 8, maxops: int = 16,
                      maxreq: int = 1 << 20) -> bytes:
    def b(p: Packer) -> None:
        p.uhyper(clientid)
        p.uint(seq)
        p.uint(0)
        for _ in range(2):
            for v in (0, maxreq, maxreq, 4096, maxops, slots):
                p.uint(v)
            p.uint(0)
        p.uint(0x40000000)
        p.uint(1)
        p.uint(0)  # AUTH_NONE callback security
    return _op(Op.CREATE_SESSION, b)


def op_putrootfh() -> bytes:
    return _op(Op.PUTROOTFH)


def op_putfh(fh: bytes) -> bytes:
    return _op(Op.PUTFH, lambda p: p.opaque(fh))


def op_getfh() -> bytes:
    return _op(Op.GETFH)


def op_lookup(name: str | bytes) -> bytes:
    return _op(Op.LOOKUP, lambda p: p.string(name))


def op_getattr(*bits: int) -> bytes:
    return _op(Op.GETATTR, lambda p: bitmap_encode(p, bits))


def _fattr(p: Packer, attrs: dict[int, Callable[[Packer], None]]) -> None:
    bitmap_encode(p, sorted(attrs))
    v = Packer()
    for k in sorted(attrs):
        attrs[k](v)
    p.opaque(v.getvalue())


def op_open(name: str | None, access: int = 3, deny: int = 0, create: int | None = 0,
            owner: bytes = b"owner", attrs: dict[int, Callable[[Packer], None]] | None = None,
            verifier: bytes = b"") -> bytes:
    """create: None = NOCREATE, else createmode4; name None = CLAIM_FH."""
    def b(p: Packer) -> None:
        p.uint(0)
        p.uint(access)
        p.uint(deny)
        p.uhyper(0)
        p.opaque(owner)
        if create is None:
            p.uint(0)
        else:
            p.uint(1)
            p.uint(create)
            if create in (0, 1):
                _fattr(p, attrs or {})
            elif create == 2:
                p.fopaque(verifier, 8)
            else:
                p.fopaque(verifier, 8)
                _fattr(p, attrs or {})
        if name is None:
            p.uint(4)
        else:
            p.uint(0)
            p.string(name)
    return _op(Op.OPEN, b)


def op_close(sid: StateId) -> bytes:
    def b(p: Packer) -> None:
        p.uint(0)
        sid.pack(p)
    return _op(Op.CLOSE, b)


def op_write(sid: StateId, offset: int, data: bytes, stable: int = 0) -> bytes:
    def b(p: Packer) -> None:
        sid.pack(p)
        p.uhyper(offset)
        p.uint(stable)
        p.opaque(data)
    return _op(Op.WRITE, b)


def op_read(sid: StateId, offset: int, count: int) -> bytes:
    def b(p: Packer) -> None:
        sid.pack(p)
        p.uhyper(offset)
        p.uint(count)
    return _op(Op.READ, b)


def op_commit() -> bytes:
    def b(p: Packer) -> None:
        p.uhyper(0)
        p.uint(0)
    return _op(Op.COMMIT, b)


def op_readdir(cookie: int = 0, verf: bytes = bytes(8), maxcount: int = 8192,
               bits: tuple[int, ...] = (A.TYPE, A.FILEID)) -> bytes:
    def b(p: Packer) -> None:
        p.uhyper(cookie)
        p.fopaque(verf, 8)
        p.uint(maxcount)
        p.uint(maxcount)
        bitmap_encode(p, bits)
    return _op(Op.READDIR, b)


def op_mkdir(name: str) -> bytes:
    def b(p: Packer) -> None:
        p.uint(2)
        p.string(name)
        _fattr(p, {})
    return _op(Op.CREATE, b)


def op_remove(name: str) -> bytes:
    return _op(Op.REMOVE, lambda p: p.string(name))


def op_rename(old: str, new: str) -> bytes:
    def b(p: Packer) -> None:
        p.string(old)
        p.string(new)
    return _op(Op.RENAME, b)


def op_setattr(sid: StateId, attrs: dict[int, Callable[[Packer], None]]) -> bytes:
    def b(p: Packer) -> None:
        sid.pack(p)
        _fattr(p, attrs)
    return _op(Op.SETATTR, b)


def op_access(bits: int) -> bytes:
    return _op(Op.ACCESS, lambda p: p.uint(bits))


def op_savefh() -> bytes:
    return _op(Op.SAVEFH)


# ------------------------------------------------------------------------- decoding


def _skip_fattr(u: Unpacker) -> tuple[frozenset[int], bytes]:
    return bitmap_decode(u), u.opaque()


def _res(op: int, u: Unpacker) -> dict[str, object]:
    """Decode the OK body of one result."""
    out: dict[str, object] = {}
    if op == Op.SEQUENCE:
        out.update(sessionid=u.fopaque(16), seqid=u.uint(), slot=u.uint(), highest=u.uint(),
                   target=u.uint(), flags=u.uint())
    elif op == Op.EXCHANGE_ID:
        out.update(clientid=u.uhyper(), seq=u.uint(), flags=u.uint())
        assert u.uint() == 0
        u.uhyper()
        u.opaque()
        u.opaque()
        for _ in range(u.uint()):
            u.string()
            u.string()
            u.hyper()
            u.uint()
    elif op == Op.CREATE_SESSION:
        out.update(sessionid=u.fopaque(16), seq=u.uint(), flags=u.uint())
        fore = [u.uint() for _ in range(6)]
        u.array(u.uint)
        [u.uint() for _ in range(6)]
        u.array(u.uint)
        out["fore"] = fore
    elif op == Op.GETFH:
        out["fh"] = u.opaque()
    elif op == Op.GETATTR:
        out["bits"], out["vals"] = _skip_fattr(u)
    elif op == Op.OPEN:
        out["stateid"] = StateId.unpack(u)
        out["cinfo"] = (u.bool(), u.uhyper(), u.uhyper())
        out["rflags"] = u.uint()
        out["attrset"] = bitmap_decode(u)
        out["deleg"] = u.uint()
        if out["deleg"] == 3:
            out["why"] = u.uint()
            if out["why"] in (1, 2):
                u.bool()
    elif op in (Op.CLOSE, Op.OPEN_DOWNGRADE, Op.LOCK, Op.LOCKU):
        out["stateid"] = StateId.unpack(u)
    elif op == Op.WRITE:
        out.update(count=u.uint(), committed=u.uint(), verf=u.fopaque(8))
    elif op == Op.READ:
        out.update(eof=u.bool(), data=u.opaque())
    elif op == Op.COMMIT:
        out["verf"] = u.fopaque(8)
    elif op == Op.READDIR:
        out["verf"] = u.fopaque(8)
        entries = []
        while u.bool():
            ck = u.uhyper()
            name = u.string()
            entries.append((ck, name, _skip_fattr(u)))
        out["entries"] = entries
        out["eof"] = u.bool()
    elif op == Op.CREATE:
        out["cinfo"] = (u.bool(), u.uhyper(), u.uhyper())
        out["attrset"] = bitmap_decode(u)
    elif op == Op.REMOVE:
        out["cinfo"] = (u.bool(), u.uhyper(), u.uhyper())
    elif op == Op.RENAME:
        out["src"] = (u.bool(), u.uhyper(), u.uhyper())
        out["dst"] = (u.bool(), u.uhyper(), u.uhyper())
    elif op == Op.SETATTR:
        out["attrsset"] = bitmap_decode(u)
    elif op == Op.ACCESS:
        out.update(supported=u.uint(), access=u.uint())
    elif op in (Op.SECINFO, Op.SECINFO_NO_NAME):
        out["flavors"] = u.array(u.uint)
    elif op == Op.TEST_STATEID:
        out["codes"] = u.array(u.uint)
    return out


@dataclass
class Reply:
    status: int
    tag: bytes
    ops: list[tuple[int, int, dict[str, object]]] = field(default_factory=list)

    @classmethod
    def decode(cls, body: bytes) -> Reply:
        u = Unpacker(body)
        r = cls(u.uint(), u.opaque())
        for _ in range(u.uint()):
            op, st = u.uint(), u.uint()
            res = _res(op, u) if st == 0 else {}
            if op == Op.SETATTR and st != 0:
                res["attrsset"] = bitmap_decode(u)
            if op in (Op.LOCK, Op.LOCKT) and st == Stat.DENIED:
                res["denied"] = (u.uhyper(), u.uhyper(), u.uint(), u.uhyper(), u.opaque())
            r.ops.append((op, st, res))
        u.done()
        return r

    def __getitem__(self, i: int) -> dict[str, object]:
        return self.ops[i][2]

    @property
    def last(self) -> dict[str, object]:
        return self.ops[-1][2]


class Client:
    """Drives an Nfs4Program with RpcCalls (no sockets)."""

    def __init__(self, prog: Nfs4Program, cred: AuthSys = ROOT, host: str = "127.0.0.1") -> None:
        self.prog = prog
        self.cred = cred
        self.host = host
        self.sessionid = b""
        self.clientid = 0
        self.seq = 0
        self.xid = 0

    def raw(self, body: bytes, proc: int = 1) -> bytes:
        self.xid += 1
        reply = self.prog.handle(RpcCall(self.xid, 100003, 4, proc, AuthFlavor.AUTH_SYS,
                                         self.cred, body, self.host, 800))
        return b"".join(reply) if isinstance(reply, list) else reply

    def send(self, ops: list[bytes], minor: int = 1, tag: bytes = b"t") -> Reply:
        p = Packer()
        p.opaque(tag)
        p.uint(minor)
        p.uint(len(ops))
        for o in ops:
            p.raw(o)
        return Reply.decode(self.raw(p.getvalue()))

    def connect(self, owner: bytes | None = None, reclaim_complete: bool = True) -> Client:
        r = self.send([op_exchange_id(owner or os.urandom(8))])
        assert r.status == 0, r
        self.clientid = int(r[0]["clientid"])  # type: ignore[call-overload]
        r = self.send([op_create_session(self.clientid, int(r[0]["seq"]))])  # type: ignore
        assert r.status == 0, r
        self.sessionid = r[0]["sessionid"]  # type: ignore[assignment]
        self.seq = 0
        if reclaim_complete:
            self.ok(_op(Op.RECLAIM_COMPLETE, lambda p: p.bool(False)))
        return self

    def __call__(self, *ops: bytes, slot: int = 0, retry: bool = False) -> Reply:
        if not retry:
            self.seq += 1
        return self.send([op_sequence(self.sessionid, self.seq, slot)] + list(ops))

    def ok(self, *ops: bytes) -> Reply:
        r = self(*ops)
        assert r.status == 0, [(Op(o).name, Stat(s).name) for o, s, _ in r.ops]
        return r


# ------------------------------------------------------------------------- fixtures


@pytest.fixture
def share() -> MemFs:
    return MemFs("share1", 7)


@pytest.fixture
def exports(share: MemFs) -> MemExports:
    ex = MemExports()
    ex.add("/share1", share, ExportOptions(squash="none"))
    return ex


@pytest.fixture
def prog(exports: MemExports) -> Nfs4Program:
    return Nfs4Program(exports, boot=b"BOOT")


@pytest.fixture
def c(prog: Nfs4Program) -> Client:
    return Client(prog).connect()


HOME = [op_putrootfh(), op_lookup("share1")]


def _mode(v: int) -> Callable[[Packer], None]:
    return lambda p: p.uint(v)


def create_file(c: Client, name: str, data: bytes = b"") -> tuple[bytes, StateId]:
    ops = [*HOME, op_open(name, create=0), op_getfh()]
    r = c.ok(*ops)
    sid = r[3]["stateid"]
    fh = r[4]["fh"]
    assert isinstance(sid, StateId) and isinstance(fh, bytes)
    if data:
        c.ok(op_putfh(fh), op_write(sid, 0, data, stable=2))
    return fh, sid


# ------------------------------------------------------------------------- tests: compound


def test_null_and_bad_procedure(c: Client) -> None:
    assert c.raw(b"", proc=0) == b""
    with pytest.raises(RpcError) as e:
        c.raw(b"", proc=2)
    assert e.value.stat == AcceptStat.PROC_UNAVAIL


@pytest.mark.parametrize("minor", [0, 2])
def test_other_minor_versions_mismatch(c: Client, minor: int) -> None:
    r = c.send([op_putrootfh()], minor=minor, tag=b"hello")
    assert r.status == Stat.MINOR_VERS_MISMATCH and r.tag == b"hello" and r.ops == []


def test_garbage_compound_is_garbage_args(c: Client) -> None:
    with pytest.raises(RpcError) as e:
        c.raw(b"\0\0\0\x05ab")
    assert e.value.stat == AcceptStat.GARBAGE_ARGS


def test_rpcsec_gss_is_refused(prog: Nfs4Program) -> None:
    with pytest.raises(AuthError):
        prog.handle(RpcCall(1, 100003, 4, 1, AuthFlavor.RPCSEC_GSS, None, b"", "127.0.0.1", 1))


def test_op_outside_session_and_not_only_op(c: Client) -> None:
    r = c.send([op_putrootfh()])
    assert r.status == Stat.OP_NOT_IN_SESSION
    r = c.send([op_exchange_id(b"x"), op_putrootfh()])
    assert r.status == Stat.NOT_ONLY_OP


def test_sequence_not_first(c: Client) -> None:
    r = c(op_putrootfh(), op_sequence(c.sessionid, 5))
    assert r.status == Stat.SEQUENCE_POS and r.ops[1][1] == 0 and r.ops[2][1] == r.status


def test_illegal_and_unsupported_ops(c: Client) -> None:
    r = c(_op(9999))
    assert r.status == Stat.OP_ILLEGAL and r.ops[-1][0] == Op.ILLEGAL
    r = c(_op(Op.LINK))
    assert r.status == Stat.NOTSUPP and r.ops[-1][0] == Op.LINK
    r = c(_op(Op.SETCLIENTID))
    assert r.status == Stat.NOTSUPP
    ctl = _op(Op.BACKCHANNEL_CTL, lambda p: (p.uint(0x40000000), p.uint(1), p.uint(0)))
    assert c(ctl).status == 0


def test_bad_xdr_in_op_args(c: Client) -> None:
    p = Packer()
    p.uint(Op.LOOKUP)
    p.uint(100)  # a string of 100 bytes that is not there
    r = c.send([op_sequence(c.sessionid, c.seq + 1), p.getvalue()])
    c.seq += 1
    assert r.status == Stat.BADXDR


# ------------------------------------------------------------------------- tests: sessions


def test_sequence_replay_returns_cached_reply(c: Client) -> None:
    first = c(*HOME, op_open("f", create=0))
    assert first.status == 0
    again = c(*HOME, op_open("f", create=0), retry=True)
    assert again == first  # byte-identical: the same stateid, not a second open
    r = c(*HOME, op_open("f", create=0))
    assert r[3]["stateid"].seqid == 2  # type: ignore[union-attr]


def test_sequence_misordered_badslot_badsession(c: Client) -> None:
    r = c.send([op_sequence(c.sessionid, c.seq + 5)])
    assert r.status == Stat.SEQ_MISORDERED
    r = c.send([op_sequence(c.sessionid, 1, slot=99)])
    assert r.status == Stat.BADSLOT
    r = c.send([op_sequence(b"x" * 16, 1)])
    assert r.status == Stat.BADSESSION
    c.ok()  # the slot is still usable
    r = c.send([op_sequence(c.sessionid, 1, slot=1)])
    assert r.status == 0 and r[0]["highest"] == 7


def test_too_many_ops(prog: Nfs4Program) -> None:
    c = Client(prog)
    r = c.send([op_exchange_id(b"o")])
    cid = int(r[0]["clientid"])  # type: ignore[call-overload]
    r = c.send([op_create_session(cid, 1, maxops=3)])
    c.sessionid = r[0]["sessionid"]  # type: ignore[assignment]
    r = c(op_putrootfh(), op_getfh(), op_getfh())
    assert r.status == Stat.TOO_MANY_OPS
    assert c(op_putrootfh(), op_getfh(), retry=True).status == 0


def test_exchange_id_cases(prog: Nfs4Program) -> None:
    c = Client(prog)
    r1 = c.send([op_exchange_id(b"owner", b"1" * 8)])
    r2 = c.send([op_exchange_id(b"owner", b"1" * 8)])
    assert r1[0]["clientid"] != r2[0]["clientid"]  # unconfirmed records are replaced
    cid = r2[0]["clientid"]
    assert c.send([op_create_session(cid, 1)]).status == 0  # type: ignore[arg-type]
    r3 = c.send([op_exchange_id(b"owner", b"1" * 8)])
    assert r3[0]["clientid"] == cid and int(r3[0]["flags"]) & 0x80000000  # type: ignore
    r4 = c.send([op_exchange_id(b"owner", b"2" * 8, flags=0x40000000)])
    assert r4.status == Stat.NOT_SAME
    assert c.send([op_exchange_id(b"other", flags=0x40000000)]).status == Stat.NOENT
    assert c.send([op_exchange_id(b"owner", flags=0x8)]).status == Stat.INVAL
    r5 = c.send([op_exchange_id(b"owner", b"2" * 8)])  # client reboot: a new record
    assert r5[0]["clientid"] != cid


def test_create_session_replay_and_misordered(prog: Nfs4Program) -> None:
    c = Client(prog)
    cid = int(c.send([op_exchange_id(b"o")])[0]["clientid"])  # type: ignore[call-overload]
    a = c.send([op_create_session(cid, 1)])
    b = c.send([op_create_session(cid, 1)])
    assert a == b
    assert c.send([op_create_session(cid, 5)]).status == Stat.SEQ_MISORDERED
    assert c.send([op_create_session(cid ^ 1 << 40, 1)]).status == Stat.STALE_CLIENTID


def test_destroy_session_and_clientid(c: Client) -> None:
    assert c.send([op_create_session(c.clientid, 2)]).status == 0
    r = c.send([_op(Op.DESTROY_CLIENTID, lambda p: p.uhyper(c.clientid))])
    assert r.status == Stat.CLIENTID_BUSY
    r = c.send([_op(Op.DESTROY_SESSION, lambda p: p.fopaque(c.sessionid, 16))])
    assert r.status == 0
    assert c(op_putrootfh()).status == Stat.BADSESSION
    r = c.send([_op(Op.DESTROY_SESSION, lambda p: p.fopaque(c.sessionid, 16))])
    assert r.status == Stat.BADSESSION


def test_restart_gives_badsession_and_stale_clientid(exports: MemExports, c: Client) -> None:
    fh, _ = create_file(c, "keep", b"data")
    c.prog = Nfs4Program(exports, boot=b"AGIN")
    assert c(op_putrootfh()).status == Stat.BADSESSION
    assert c.send([op_create_session(c.clientid, 2)]).status == Stat.STALE_CLIENTID
    c.connect()
    r = c.ok(op_putfh(fh), op_read(StateId(0, bytes(12)), 0, 10))
    assert r[2]["data"] == b"data"  # handles outlive the server's state


def test_reclaim_complete_before_open(prog: Nfs4Program) -> None:
    c = Client(prog).connect(reclaim_complete=False)
    assert c(*HOME, op_open("f", create=0)).status == Stat.GRACE
    assert c(*HOME, op_lookup("f")).status == Stat.NOENT  # nothing was created
    rc = _op(Op.RECLAIM_COMPLETE, lambda p: p.bool(False))
    assert c(rc).status == 0
    assert c(rc).status == Stat.COMPLETE_ALREADY
    assert c(*HOME, op_open("f", create=0)).status == 0


def test_reply_size_limits(prog: Nfs4Program, c: Client) -> None:
    r = c.send([op_create_session(c.clientid, 2, maxreq=400)])
    c.sessionid, c.seq = r[0]["sessionid"], 0  # type: ignore[assignment]
    big = op_getattr(*(n for n in range(0, 76) if n not in (A.TIME_ACCESS_SET, A.TIME_MODIFY_SET)))
    r = c(op_putrootfh(), big, big, big, big)
    assert r.status == Stat.REP_TOO_BIG


# ------------------------------------------------------------------------- tests: files


def test_pseudo_root_lists_exports_and_crosses(c: Client, share: MemFs) -> None:
    r = c.ok(op_putrootfh(), op_getfh(), op_readdir())
    assert bytes(r[2]["fh"]).startswith(PSEUDO_PREFIX)  # type: ignore[arg-type]
    assert [e[1] for e in r[3]["entries"]] == ["share1"]  # type: ignore[union-attr]
    r = c.ok(*HOME, op_getfh())
    assert r[3]["fh"] == share.root_handle()
    r = c.ok(*HOME, _op(Op.LOOKUPP), op_getfh())
    assert r[4]["fh"] == r[4]["fh"] and bytes(r[4]["fh"]).startswith(PSEUDO_PREFIX)  # type: ignore
    assert c(op_putrootfh(), op_lookup("nope")).status == Stat.NOENT
    assert c(op_putrootfh(), _op(Op.LOOKUPP)).status == Stat.NOENT


def test_create_write_read_commit_close(c: Client, share: MemFs) -> None:
    fh, sid = create_file(c, "a.txt")
    r = c.ok(op_putfh(fh), op_write(sid, 0, b"hello world"), op_commit())
    assert r[2]["count"] == 11 and r[2]["committed"] == 0 and r[3]["verf"] == r[2]["verf"]
    r = c.ok(op_putfh(fh), op_read(sid, 6, 100))
    assert r[2] == {"eof": True, "data": b"world"}
    assert share.durable_bytes(fh) == b"hello world"
    assert c(op_putfh(fh), op_write(sid, 5 * 1024**4, b"x")).status == Stat.FBIG
    r = c.ok(op_putfh(fh), op_close(sid))
    assert c(op_putfh(fh), op_read(sid, 0, 1)).status == Stat.BAD_STATEID


def test_getattr_values_and_bitmap(c: Client) -> None:
    fh, sid = create_file(c, "g", b"12345")
    r = c.ok(op_putfh(fh), op_getattr(A.TYPE, A.SIZE, A.MODE, A.OWNER, A.OWNER_GROUP,
                                      A.NUMLINKS, A.FILEHANDLE, A.SUPPATTR_EXCLCREAT, 62))
    bits, vals = r[2]["bits"], r[2]["vals"]
    assert bits == {A.TYPE, A.SIZE, A.MODE, A.OWNER, A.OWNER_GROUP, A.NUMLINKS, A.FILEHANDLE,
                    A.SUPPATTR_EXCLCREAT}  # 62 (fs_layout_type) is not supported: left out
    u = Unpacker(vals)  # type: ignore[arg-type]
    assert u.uint() == 1 and u.uhyper() == 5 and u.opaque() == fh and u.uint() == 0o644
    assert u.uint() == 1 and u.string() == "0" and u.string() == "0"
    bitmap_decode(u)
    u.done()
    assert c(op_putfh(fh), op_getattr(A.TIME_MODIFY_SET)).status == Stat.INVAL
    r = c.ok(op_putfh(fh), op_getattr(A.SUPPORTED_ATTRS))
    u = Unpacker(r[2]["vals"])  # type: ignore[arg-type]
    supported = bitmap_decode(u)
    assert {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 19, 75} <= supported


def test_open_guarded_exclusive_and_nocreate(c: Client) -> None:
    create_file(c, "x")
    assert c(*HOME, op_open("x", create=1)).status == Stat.EXIST
    assert c(*HOME, op_open("y", create=None)).status == Stat.NOENT
    r1 = c.ok(*HOME, op_open("e", create=3, verifier=b"V" * 8, attrs={A.MODE: _mode(0o600)}))
    assert r1[3]["attrset"] == {A.MODE}
    r2 = c.ok(*HOME, op_open("e", create=3, verifier=b"V" * 8))
    assert c(*HOME, op_open("e", create=3, verifier=b"W" * 8)).status == Stat.EXIST
    assert r2[3]["stateid"].other == r1[3]["stateid"].other  # type: ignore[union-attr]
    r = c.ok(*HOME, op_lookup("e"), op_getattr(A.MODE))
    assert Unpacker(r[4]["vals"]).uint() == 0o600  # type: ignore[arg-type]
    c.ok(*HOME, op_mkdir("d"))
    assert c(*HOME, op_open("d", create=None)).status == Stat.ISDIR


def test_open_claim_fh_and_share_deny(c: Client, prog: Nfs4Program) -> None:
    fh, sid = create_file(c, "s")
    assert c(op_putfh(fh), op_open(None, access=1, deny=2, create=None, owner=b"o2")).status \
        == Stat.SHARE_DENIED  # "owner" has it open for writing
    c.ok(op_putfh(fh), op_close(sid))
    r = c.ok(op_putfh(fh), op_open(None, access=1, deny=2, create=None, owner=b"o2"))
    assert r[2]["deleg"] == 0
    assert c(op_putfh(fh), op_open(None, access=2, create=None, owner=b"o3")).status == \
        Stat.SHARE_DENIED
    other = Client(prog).connect()
    assert other(op_putfh(fh), op_open(None, access=1, create=None)).status == 0


def test_write_needs_write_open_and_current_stateid(c: Client) -> None:
    fh, _ = create_file(c, "w")
    r = c.ok(op_putfh(fh), op_open(None, access=1, create=None, owner=b"reader"))
    rsid = r[2]["stateid"]
    assert isinstance(rsid, StateId)
    assert c(op_putfh(fh), op_write(rsid, 0, b"x")).status == Stat.OPENMODE
    current = StateId(1, bytes(12))
    r = c.ok(*HOME, op_open("cur", create=0), op_write(current, 0, b"abc"),
             op_close(current))
    assert r[4]["count"] == 3
    assert c(op_putfh(fh), op_read(StateId(rsid.seqid + 5, rsid.other), 0, 1)).status == \
        Stat.BAD_STATEID


def test_readdir_pages_and_cookies(c: Client) -> None:
    c.ok(*HOME, op_mkdir("dir"))
    for i in range(30):
        c.ok(*HOME, op_lookup("dir"), op_open(f"file{i:02}", create=0))
    names: list[str] = []
    cookie, verf = 0, bytes(8)
    while True:
        r = c.ok(*HOME, op_lookup("dir"), op_readdir(cookie, verf, maxcount=400))
        ents = r[4]["entries"]
        assert ents and all(ck > 2 for ck, _, _ in ents)  # type: ignore[union-attr]
        names += [n for _, n, _ in ents]  # type: ignore[union-attr]
        cookie, verf = ents[-1][0], r[4]["verf"]  # type: ignore[index]
        if r[4]["eof"]:
            break
    assert names == [f"file{i:02}" for i in range(30)]
    assert c(*HOME, op_readdir(maxcount=20)).status == Stat.TOOSMALL
    assert c(*HOME, op_readdir(cookie=1)).status == Stat.BAD_COOKIE


def test_mkdir_rename_remove(c: Client) -> None:
    c.ok(*HOME, op_mkdir("d1"))
    create_file(c, "f1", b"abc")
    r = c.ok(*HOME, op_savefh(), op_lookup("d1"), op_rename("f1", "f2"))
    assert r[5]["src"][2] > r[5]["src"][1]  # type: ignore[index]
    assert c(*HOME, op_lookup("f1")).status == Stat.NOENT
    c.ok(*HOME, op_lookup("d1"), op_lookup("f2"))
    assert c(*HOME, op_remove("d1")).status == Stat.NOTEMPTY
    c.ok(*HOME, op_lookup("d1"), op_remove("f2"))
    c.ok(*HOME, op_remove("d1"))
    assert c(*HOME, op_lookup("d1")).status == Stat.NOENT
    assert c(*HOME, op_rename("a", "b")).status == Stat.NOFILEHANDLE


def test_create_other_types_badtype_and_names(c: Client) -> None:
    lnk = _op(Op.CREATE, lambda p: (p.uint(5), p.string("target"), p.string("l"), _fattr(p, {})))
    assert c(*HOME, lnk).status == Stat.BADTYPE
    reg = _op(Op.CREATE, lambda p: (p.uint(1), p.string("r"), _fattr(p, {})))
    assert c(*HOME, reg).status == Stat.BADTYPE
    assert c(*HOME, op_lookup("")).status == Stat.INVAL
    assert c(*HOME, op_lookup("..")).status == Stat.BADNAME
    assert c(*HOME, op_open("..", create=0)).status == Stat.BADNAME
    r = c.ok(*HOME, op_lookup("."), op_getfh(), *HOME, op_getfh())
    assert r[4]["fh"] == r[7]["fh"]  # "." is the directory itself (nfs-rs lists roots so)
    assert c(*HOME, op_lookup("a/b")).status == Stat.BADCHAR
    assert c(*HOME, op_lookup("n" * 256)).status == Stat.NAMETOOLONG
    assert c(*HOME, op_lookup(b"\xff\xfe")).status == Stat.INVAL
    assert c(*HOME, op_lookup("\ufffe")).status == Stat.INVAL
    assert c.send([op_putrootfh()], tag=b"\xc0\xc1").status == Stat.INVAL


def test_setattr_mode_size_owner(c: Client) -> None:
    fh, sid = create_file(c, "sa", b"0123456789")
    r = c.ok(op_putfh(fh), op_setattr(sid, {A.SIZE: lambda p: p.uhyper(4),
                                            A.MODE: _mode(0o640),
                                            A.OWNER: lambda p: p.string("1000@example")}))
    assert r[2]["attrsset"] == {A.SIZE, A.MODE, A.OWNER}
    r = c.ok(op_putfh(fh), op_getattr(A.SIZE, A.MODE, A.OWNER))
    u = Unpacker(r[2]["vals"])  # type: ignore[arg-type]
    assert (u.uhyper(), u.uint(), u.string()) == (4, 0o640, "1000")
    r = c(op_putfh(fh), op_setattr(sid, {A.OWNER: lambda p: p.string("alice")}))
    assert r.status == Stat.BADOWNER and r[2]["attrsset"] == frozenset()
    assert c(op_putfh(fh), op_setattr(sid, {A.TYPE: _mode(1)})).status == Stat.INVAL
    assert c(op_putfh(fh), op_setattr(sid, {A.MODE: _mode(0o10000)})).status == Stat.INVAL
    assert c(op_putfh(fh), op_setattr(sid, {62: _mode(1)})).status == Stat.ATTRNOTSUPP


def test_access_and_root_squash(prog: Nfs4Program, c: Client, exports: MemExports) -> None:
    fh, _ = create_file(c, "root-only")
    c.ok(op_putfh(fh), op_setattr(StateId(0, bytes(12)), {A.MODE: _mode(0o600)}))
    user = Client(prog, USER).connect()
    r = user.ok(op_putfh(fh), op_access(0x3F))
    assert r[2]["access"] == 0
    assert user(op_putfh(fh), op_open(None, access=1, create=None)).status == Stat.ACCESS
    # the default export options squash root to 65534
    sq = exports.add("/squashed", MemFs("sq", 11))
    r = c.ok(op_putfh(sq.root_handle()), op_open("mine", create=0), op_getattr(A.OWNER))
    assert Unpacker(r[3]["vals"]).string() == "65534"  # type: ignore[arg-type]


def test_client_outside_export_is_refused(prog: Nfs4Program, share: MemFs) -> None:
    outsider = Client(prog, host="192.0.2.9").connect()
    assert outsider(*HOME).status == Stat.ACCESS
    assert outsider(op_putfh(share.root_handle())).status == Stat.ACCESS


def test_read_only_share(exports: MemExports) -> None:
    ro = exports.add("/ro", MemFs("ro", 9, read_only=True), ExportOptions(read_only=True))
    c = Client(Nfs4Program(exports)).connect()
    assert c(op_putfh(ro.root_handle()), op_open("f", create=0)).status == Stat.ROFS
    assert c(op_putfh(ro.root_handle()), op_mkdir("d")).status == Stat.ROFS


def test_secinfo_no_name_consumes_fh(c: Client) -> None:
    r = c.ok(*HOME, _op(Op.SECINFO_NO_NAME, lambda p: p.uint(0)))
    assert r[3]["flavors"] == [1]
    assert c(*HOME, _op(Op.SECINFO_NO_NAME, lambda p: p.uint(0)), op_getfh()).status == \
        Stat.NOFILEHANDLE


def test_test_and_free_stateid(c: Client) -> None:
    fh, sid = create_file(c, "ts")
    test = _op(Op.TEST_STATEID, lambda p: p.array([sid, StateId(1, b"BOOT" + b"B" * 8), StateId(1, b"OLD!" + b"B" * 8)], lambda s: s.pack(p)))
    r = c.ok(test)
    assert r[1]["codes"] == [0, Stat.BAD_STATEID, Stat.STALE_STATEID]
    free = _op(Op.FREE_STATEID, lambda p: sid.pack(p))
    assert c(free).status == Stat.LOCKS_HELD
    c.ok(op_putfh(fh), op_close(sid))
    assert c(free).status == Stat.BAD_STATEID


def test_verify_nverify(c: Client) -> None:
    fh, _ = create_file(c, "v", b"xyz")
    size3 = {A.SIZE: lambda p: p.uhyper(3)}
    verify = _op(Op.VERIFY, lambda p: _fattr(p, size3))
    nverify = _op(Op.NVERIFY, lambda p: _fattr(p, size3))
    assert c(op_putfh(fh), verify).status == 0
    assert c(op_putfh(fh), nverify).status == Stat.SAME

