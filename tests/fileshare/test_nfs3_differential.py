"""Differential test: the same random NFS v3 calls against ObjectFS (on a LocalStore) and the
in-memory reference file system must give the same statuses, bytes and listings.

A seeded random walk over a small name space (so that names collide, directories nest, renames
replace and cross directories) with CREATE (unchecked, guarded, exclusive), MKDIR, REMOVE, RMDIR,
RENAME, WRITE at random offsets and stabilities, READ, SETATTR of the size and mode, ACCESS,
LOOKUP and READDIR, all through ``Nfs3Program``, each call as one of three users (two in one
group), so permission checks are compared too. A difference is a bug in one of them (or a gap in
the contract); the one known divergence (which check comes first in a directory the caller may
not modify) is counted, not failed.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import pytest

from fileshare.cache import FileCache
from fileshare.fs import ACCESS_MODIFY, CreateMode
from fileshare.nfs3 import Nfs3Program
from fileshare.nfs3types import DirOpArgs, Proc, RenameArgs, Sattr3, SetattrArgs, StableHow, Stat
from fileshare.objectfs import HandleCodec, ObjectFS, handle_share_id
from fileshare.rpc import AuthSys
from tests.fileshare.memfs import MemExports, MemFs
from tests.fileshare.test_nfs3 import Client
from vtl.cloud.local import LocalStore

NAMES = ["a", "b", "c", "d"]
MODES = (0o700, 0o755, 0o644, 0o640, 0o660, 0o750, 0o770, 0o600, 0o444, 0o777, 0o000)
MUTATIONS = ("create", "excl", "mkdir", "remove", "rmdir", "rename")
CREDS = [AuthSys(0, "m", 1000, 1000, ()), AuthSys(0, "m", 2000, 2000, ()),
         AuthSys(0, "m", 3000, 3000, (1000,))]
STEPS = 1200


class Pair:
    """One client per file system and the directories known in both, by path."""

    def __init__(self, tmp_path: Path) -> None:
        self.ofs = ObjectFS("s", 1, LocalStore(tmp_path / "store", durable=False), "s/",
                            tmp_path / "s.db", FileCache(tmp_path / "cache", None, durable=False),
                            HandleCodec(b"k" * 32), uploader=False, durable=False)
        ox = MemExports(handle_share_id)
        ox.add("/s", self.ofs)
        mx = MemExports()
        mfs = mx.add("/s", MemFs("s", 1))
        self.clients = (Client(Nfs3Program(ox)), Client(Nfs3Program(mx)))
        self.dirs: dict[str, tuple[bytes, bytes]] = {"": (self.ofs.root_handle(),
                                                          mfs.root_handle())}
        self.failures: list[str] = []
        self.known = 0

    def both(self, d: str, fn: Any) -> tuple[Any, Any]:
        o, m = self.dirs[d]
        return fn(self.clients[0], o), fn(self.clients[1], m)

    def check(self, step: int, what: str, a: Any, b: Any) -> bool:
        if a != b:
            self.failures.append(f"step {step} {what}: ObjectFS {_short(a)} vs reference "
                                 f"{_short(b)}")
            return False
        return True

    def may_modify(self, *dirs: str) -> bool:
        """Whether the reference lets the current caller change every one of ``dirs``."""
        ref = self.clients[1]
        return all(ref.access(self.dirs[d][1], ACCESS_MODIFY)[1] == ACCESS_MODIFY
                   for d in dirs if d in self.dirs)

    def move(self, src: str, dst: str) -> None:
        for key in sorted(k for k in self.dirs if k == src or k.startswith(src + "/")):
            self.dirs[dst + key[len(src):]] = self.dirs.pop(key)

    def drop(self, path: str) -> None:
        for key in [k for k in self.dirs if k == path or k.startswith(path + "/")]:
            del self.dirs[key]


def _short(x: Any) -> str:
    if isinstance(x, tuple) and len(x) == 3 and isinstance(x[1], bytes):
        return repr((x[0], f"{len(x[1])} bytes, sha256 {hashlib.sha256(x[1]).hexdigest()[:12]}",
                     x[2]))
    return repr(x)[:200]


def _join(d: str, n: str) -> str:
    return f"{d}/{n}" if d else n


@pytest.mark.parametrize("seed", [1, 2])
def test_objectfs_and_the_reference_agree(tmp_path: Path, seed: int) -> None:
    pair = Pair(tmp_path)
    rng = random.Random(seed)
    try:
        for step in range(STEPS):
            d = rng.choice(sorted(pair.dirs))
            n = rng.choice(NAMES)
            d2 = d
            cred = rng.choice(CREDS)
            for c in pair.clients:
                c.cred = cred
            op = rng.choice(["create", "excl", "mkdir", "remove", "rmdir", "rename", "write",
                             "write", "read", "read", "truncate", "lookup", "readdir", "chmod",
                             "access"])
            if op == "create":
                how = rng.choice([CreateMode.UNCHECKED, CreateMode.GUARDED])
                attrs = Sattr3(mode=rng.choice(MODES))
                a, b = pair.both(d, lambda c, h: c.create(h, n, how, attrs)[0])
            elif op == "excl":
                verf = rng.choice([b"11111111", b"22222222"])
                ra, rb = pair.both(d, lambda c, h: c.create(h, n, CreateMode.EXCLUSIVE,
                                                            verifier=verf))
                a, b = ra[0], rb[0]
                if a == b == Stat.OK:
                    # RFC 1813 3.3.8: EXCLUSIVE carries no attributes, the client sets them next
                    # (the mode in between is the server's choice and differs).
                    pair.check(step, "setattr after exclusive create", *(
                        c.wcc(Proc.SETATTR, SetattrArgs(r[1]["fh"], Sattr3(mode=0o644), None))
                        for c, r in zip(pair.clients, (ra, rb))))
            elif op == "mkdir":
                mode = rng.choice((0o755, 0o775, 0o750, 0o777, 0o700))
                ra, rb = pair.both(d, lambda c, h: c.mkdir(h, n, mode))
                a, b = ra[0], rb[0]
                if a == b == Stat.OK:
                    pair.dirs[_join(d, n)] = (ra[1]["fh"], rb[1]["fh"])
            elif op in ("remove", "rmdir"):
                proc = Proc.REMOVE if op == "remove" else Proc.RMDIR
                a, b = pair.both(d, lambda c, h: c.wcc(proc, DirOpArgs(h, n.encode())))
                if op == "rmdir" and a == b == Stat.OK:
                    pair.drop(_join(d, n))
            elif op == "rename":
                d2, n2 = rng.choice(sorted(pair.dirs)), rng.choice(NAMES)
                (of, mf), (ot, mt) = pair.dirs[d], pair.dirs[d2]
                a = pair.clients[0].wcc(Proc.RENAME, RenameArgs(of, n.encode(), ot, n2.encode()), 2)
                b = pair.clients[1].wcc(Proc.RENAME, RenameArgs(mf, n.encode(), mt, n2.encode()), 2)
                if a == b == Stat.OK and _join(d, n) != _join(d2, n2):
                    pair.drop(_join(d2, n2))  # a directory replaced at the target is gone
                    pair.move(_join(d, n), _join(d2, n2))
            else:
                la, lb = pair.both(d, lambda c, h: c.lookup(h, n))
                a, b = la[0], lb[0]
                if op in ("write", "read", "truncate", "chmod", "access") and a == b == Stat.OK:
                    fa, fb = la[1]["fh"], lb[1]["fh"]
                    oc, mc = pair.clients
                    if op == "write":
                        off, data = rng.randrange(5000), rng.randbytes(rng.randrange(3000))
                        stable = rng.choice(list(StableHow))
                        a, b = oc.write(fa, off, data, stable)[0], mc.write(fb, off, data, stable)[0]
                    elif op == "read":
                        off, count = rng.randrange(6000), rng.randrange(4000)
                        ra, rb = oc.read(fa, off, count), mc.read(fb, off, count)
                        a = (ra[0], ra[1].get("data"), ra[1].get("eof"))
                        b = (rb[0], rb[1].get("data"), rb[1].get("eof"))
                    elif op == "chmod":
                        mode = rng.choice(MODES)
                        args = [SetattrArgs(f, Sattr3(mode=mode), None) for f in (fa, fb)]
                        a, b = oc.wcc(Proc.SETATTR, args[0]), mc.wcc(Proc.SETATTR, args[1])
                    elif op == "access":
                        a, b = oc.access(fa, 0x3F), mc.access(fb, 0x3F)
                    else:
                        size = rng.randrange(6000)
                        args = [SetattrArgs(f, Sattr3(size=size), None) for f in (fa, fb)]
                        a, b = oc.wcc(Proc.SETATTR, args[0]), mc.wcc(Proc.SETATTR, args[1])
                elif op == "readdir":
                    ra, rb = pair.both(d, lambda c, h: c.readdir(h, 0, bytes(8), 65536))
                    a = (ra[0], sorted(e["name"] for e in ra[1].get("entries", [])))
                    b = (rb[0], sorted(e["name"] for e in rb[1].get("entries", [])))
            if (op in MUTATIONS and a == Stat.ACCES and b != Stat.ACCES
                    and not pair.may_modify(d, d2 if op == "rename" else d)):
                # Known divergence: in a directory the caller may not modify, ObjectFS refuses
                # first (EACCES); the reference, like Linux, looks the name up first and may
                # answer ENOENT, EEXIST, EISDIR, or succeed for an UNCHECKED create of an
                # existing file. Both refuse every change; only the code differs.
                pair.known += 1
                continue
            pair.check(step, f"{op} {d!r}/{n}", a, b)
            if len(pair.failures) >= 5:
                break
    finally:
        pair.ofs.close()
    assert not pair.failures, "\n".join(pair.failures)
    assert len(pair.dirs) > 5, "the walk built no real tree"
    assert pair.known < STEPS // 4, f"{pair.known} calls excused as the known divergence"
