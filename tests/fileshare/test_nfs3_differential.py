"""Differential test: the same random NFS v3 calls against ObjectFS (on a LocalStore) and the
in-memory reference file system must give the same statuses, bytes and listings.

A seeded random walk over a small name space (so that names collide, directories nest, renames
replace and cross directories) with CREATE (unchecked, guarded, exclusive), MKDIR, REMOVE, RMDIR,
RENAME, WRITE at random offsets and stabilities, READ, SETATTR of the size, LOOKUP and READDIR,
all through ``Nfs3Program``. A difference is a bug in one of them (or a gap in the contract).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import pytest

from fileshare.cache import FileCache
from fileshare.fs import CreateMode
from fileshare.nfs3 import Nfs3Program
from fileshare.nfs3types import DirOpArgs, Proc, RenameArgs, Sattr3, SetattrArgs, StableHow, Stat
from fileshare.objectfs import HandleCodec, ObjectFS, handle_share_id
from tests.fileshare.memfs import MemExports, MemFs
from tests.fileshare.test_nfs3 import Client
from vtl.cloud.local import LocalStore

NAMES = ["a", "b", "c", "d"]
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

    def both(self, d: str, fn: Any) -> tuple[Any, Any]:
        o, m = self.dirs[d]
        return fn(self.clients[0], o), fn(self.clients[1], m)

    def check(self, step: int, what: str, a: Any, b: Any) -> bool:
        if a != b:
            self.failures.append(f"step {step} {what}: ObjectFS {_short(a)} vs reference "
                                 f"{_short(b)}")
            return False
        return True

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
            op = rng.choice(["create", "excl", "mkdir", "remove", "rmdir", "rename", "write",
                             "write", "read", "read", "truncate", "lookup", "readdir"])
            if op == "create":
                how = rng.choice([CreateMode.UNCHECKED, CreateMode.GUARDED])
                a, b = pair.both(d, lambda c, h: c.create(h, n, how)[0])
            elif op == "excl":
                verf = rng.choice([b"11111111", b"22222222"])
                a, b = pair.both(d, lambda c, h: c.create(h, n, CreateMode.EXCLUSIVE,
                                                          verifier=verf)[0])
            elif op == "mkdir":
                ra, rb = pair.both(d, lambda c, h: c.mkdir(h, n))
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
                if op in ("write", "read", "truncate") and a == b == Stat.OK:
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
                    else:
                        size = rng.randrange(6000)
                        args = [SetattrArgs(f, Sattr3(size=size), None) for f in (fa, fb)]
                        a, b = oc.wcc(Proc.SETATTR, args[0]), mc.wcc(Proc.SETATTR, args[1])
                elif op == "readdir":
                    ra, rb = pair.both(d, lambda c, h: c.readdir(h, 0, bytes(8), 65536))
                    a = (ra[0], sorted(e["name"] for e in ra[1].get("entries", [])))
                    b = (rb[0], sorted(e["name"] for e in rb[1].get("entries", [])))
            pair.check(step, f"{op} {d!r}/{n}", a, b)
            if len(pair.failures) >= 5:
                break
    finally:
        pair.ofs.close()
    assert not pair.failures, "\n".join(pair.failures)
    assert len(pair.dirs) > 10  # the walk built a real tree
