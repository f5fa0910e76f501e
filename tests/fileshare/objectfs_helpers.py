"""Building ObjectFS instances for tests: a manual clock, a cache, a handle codec."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fileshare.cache import FileCache
from fileshare.fs import Cred
from fileshare.objectfs import HandleCodec, ObjectFS, ShareConfig
from vtl.cloud.store import ObjectStore

KEY = b"k" * 32
ROOT = Cred(0, 0)
ALICE = Cred(1000, 1000)
BOB = Cred(1001, 1001)
CAROL_IN_ALICES_GROUP = Cred(1002, 1002, (1000,))


@dataclass
class Tick:
    """A manual wall clock (seconds)."""

    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Rig:
    store: ObjectStore
    root: Path
    clock: Tick = field(default_factory=Tick)
    cache_limit: int | None = None
    chunk: int = 64 * 1024
    prefix: str = "share1/"
    config: ShareConfig = field(default_factory=lambda: ShareConfig(settle=5.0))
    cache: FileCache | None = None

    def open(self, **kw: object) -> ObjectFS:
        if self.cache is None:
            self.cache = FileCache(self.root / "cache", self.cache_limit, chunk=self.chunk,
                                   durable=False)
        return ObjectFS("share1", 0x1234ABCD, self.store, self.prefix, self.root / "share1.db",
                        self.cache, HandleCodec(KEY), config=self.config, clock=self.clock,
                        uploader=False, durable=False, **kw)  # type: ignore[arg-type]

    def reopen(self, fs: ObjectFS) -> ObjectFS:
        fs.close()
        self.cache = None  # a new process: a new cache index rebuilt from disk
        return self.open()
