"""Cartridge on-disk format: round trips, index rebuild, truncation, crash recovery, a model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtl.library.cartridge import (
    INDEX_NAME,
    META_NAME,
    REC_HDR_LEN,
    SEG_HDR_LEN,
    Cartridge,
    CartridgeBusy,
    FormatError,
    MediumCorrupt,
    RecordHeader,
    RecordType,
    SegmentHeader,
    SpaceResult,
    Stop,
    VolumeOverflow,
    WormViolation,
    early_warning_size,
)

MiB = 1024 * 1024


def block(i: int, size: int = 1000) -> bytes:
    return (i.to_bytes(4, "big") * (size // 4 + 1))[:size]


def read_all(c: Cartridge) -> list[bytes | None]:
    """Every object from BOT: bytes for data, None for a filemark."""
    c.rewind()
    out: list[bytes | None] = []
    while (obj := c.read_next()) is not None:
        out.append(None if obj.is_filemark else obj.data)
    return out


@pytest.fixture
def cart(tmp_path: Path) -> Cartridge:
    c = Cartridge.create(tmp_path / "T", "TEST01L5", 64 * MiB, segment_size=8192)
    yield c
    c.close()


def test_codecs_round_trip() -> None:
    h = RecordHeader(RecordType.DATA, 7, 10, 10, 1234)
    raw = h.encode()
    assert len(raw) == REC_HDR_LEN
    assert RecordHeader.decode(raw) == h
    bad = bytearray(raw)
    bad[9] ^= 1
    with pytest.raises(MediumCorrupt):
        RecordHeader.decode(bytes(bad))
    s = SegmentHeader(3, 99)
    assert SegmentHeader.decode(s.encode()) == s
    assert len(s.encode()) == SEG_HDR_LEN


@given(st.binary(max_size=64))
def test_record_header_decode_arbitrary_bytes(raw: bytes) -> None:
    try:
        RecordHeader.decode(raw)
    except MediumCorrupt:
        pass


def test_create_open_metadata(tmp_path: Path) -> None:
    c = Cartridge.create(tmp_path / "T", "ABC123", 100 * MiB, worm=True)
    assert (c.barcode, c.capacity_bytes, c.worm, c.used_bytes) == ("ABC123", 100 * MiB, True, 0)
    c.update_meta(load_count=5)
    c.close()
    c2 = Cartridge.open(tmp_path / "T")
    assert c2.meta.load_count == 5 and c2.worm and c2.barcode == "ABC123"
    assert c2.eod == 0 and c2.at_bot and c2.read_next() is None
    c2.close()
    with pytest.raises(FileExistsError):
        Cartridge.create(tmp_path / "T", "X", MiB)
    with pytest.raises(FormatError):
        Cartridge.open(tmp_path / "missing")
    (tmp_path / "T" / META_NAME).write_text('{"format": "other"}')
    with pytest.raises(FormatError):
        Cartridge.open(tmp_path / "T")


def test_round_trip_across_segments(cart: Cartridge, tmp_path: Path) -> None:
    expect: list[bytes | None] = []
    for i in range(50):
        data = block(i, 100 + 97 * i)
        cart.write_block(data)
        expect.append(data)
        if i % 10 == 9:
            cart.write_filemarks(1)
            expect.append(None)
    assert len(cart.segment_paths()) > 3
    assert cart.used_bytes == sum(REC_HDR_LEN + (len(e) if e else 0) for e in expect)
    assert read_all(cart) == expect
    cart.close()
    reopened = Cartridge.open(tmp_path / "T")
    assert reopened.eod == len(expect) and reopened.filemark_count == 5
    assert read_all(reopened) == expect
    reopened.close()
    (tmp_path / "T" / INDEX_NAME).unlink()
    rebuilt = Cartridge.open(tmp_path / "T")
    assert read_all(rebuilt) == expect
    assert rebuilt.used_bytes == reopened.used_bytes
    rebuilt.close()


def test_thin_provisioning(tmp_path: Path) -> None:
    c = Cartridge.create(tmp_path / "T", "BIG001", 15 * 1024**4)
    c.write_block(b"x" * 1000)
    c.close()
    on_disk = sum(p.stat().st_size for p in (tmp_path / "T").iterdir())
    assert on_disk < 64 * 1024


def test_locate_and_read(cart: Cartridge) -> None:
    for i in range(200):
        cart.write_block(block(i, 10))
    for target in (0, 1, 63, 64, 65, 130, 199):
        assert cart.locate(target)
        assert cart.position == target
        assert cart.read_next().data == block(target, 10)
    assert not cart.locate(500)
    assert cart.position == 200 and cart.at_eod


def layout(c: Cartridge) -> None:
    """file 0: blocks 0-2, FM 3; file 1: blocks 4-5, FM 6; file 2: block 7; EOD = 8."""
    for i in range(3):
        c.write_block(block(i))
    c.write_filemarks(1)
    c.write_block(block(4))
    c.write_block(block(5))
    c.write_filemarks(1)
    c.write_block(block(7))


@pytest.mark.parametrize(
    ("start", "count", "pos", "result"),
    [
        (0, 2, 2, SpaceResult()),
        (0, 3, 3, SpaceResult()),
        (0, 5, 4, SpaceResult(Stop.FILEMARK, 2)),
        (4, 1, 5, SpaceResult()),
        (7, 3, 8, SpaceResult(Stop.EOD, 2)),
        (8, 1, 8, SpaceResult(Stop.EOD, 1)),
        (6, -2, 4, SpaceResult()),
        (6, -3, 3, SpaceResult(Stop.FILEMARK, 1)),
        (2, -5, 0, SpaceResult(Stop.BOP, 3)),
        (5, 0, 5, SpaceResult()),
    ],
)
def test_space_blocks(cart: Cartridge, start: int, count: int, pos: int, result: SpaceResult) -> None:
    layout(cart)
    cart.locate(start)
    assert cart.space_blocks(count) == result
    assert cart.position == pos


@pytest.mark.parametrize(
    ("start", "count", "pos", "result"),
    [
        (0, 1, 4, SpaceResult()),
        (0, 2, 7, SpaceResult()),
        (0, 10, 8, SpaceResult(Stop.EOD, 8)),
        (5, 1, 7, SpaceResult()),
        (7, -1, 6, SpaceResult()),
        (7, -2, 3, SpaceResult()),
        (7, -3, 0, SpaceResult(Stop.BOP, 1)),
        (4, -1, 3, SpaceResult()),
        (3, -1, 0, SpaceResult(Stop.BOP, 1)),
    ],
)
def test_space_filemarks(cart: Cartridge, start: int, count: int, pos: int,
                         result: SpaceResult) -> None:
    layout(cart)
    cart.locate(start)
    assert cart.space_filemarks(count) == result
    assert cart.position == pos
    assert cart.filemarks_before(pos) == sum(1 for f in (3, 6) if f < pos)


def test_overwrite_truncates(cart: Cartridge, tmp_path: Path) -> None:
    for i in range(40):
        cart.write_block(block(i, 900))
    cart.write_filemarks(2)
    cart.sync()
    nsegs = len(cart.segment_paths())
    cart.locate(5)
    cart.write_block(b"new")
    assert cart.eod == 6 and cart.filemark_count == 0
    assert len(cart.segment_paths()) < nsegs
    assert (tmp_path / "T" / INDEX_NAME).exists()  # rewritten for the new, durable EOD
    assert [p.name for p in sorted((tmp_path / "T").glob("seg-*"))] == [
        p.name for p in cart.segment_paths()]
    expect = [block(i, 900) for i in range(5)] + [b"new"]
    assert read_all(cart) == expect
    cart.close()
    again = Cartridge.open(tmp_path / "T")
    assert read_all(again) == expect
    again.close()


def test_erase_and_rewrite_at_bot(cart: Cartridge) -> None:
    layout(cart)
    cart.rewind()
    cart.erase()
    assert cart.eod == 0 and cart.used_bytes == 0
    cart.write_block(b"a")
    assert read_all(cart) == [b"a"]


def test_worm(tmp_path: Path) -> None:
    c = Cartridge.create(tmp_path / "W", "WORM01", 8 * MiB, worm=True)
    c.write_block(b"one")
    c.write_filemarks(1)
    c.rewind()
    with pytest.raises(WormViolation):
        c.write_block(b"two")
    with pytest.raises(WormViolation):
        c.erase()
    c.space_eod()
    c.write_block(b"two")  # appending at EOD is allowed
    assert read_all(c) == [b"one", None, b"two"]
    c.close()


def test_capacity_early_warning_and_overflow(tmp_path: Path) -> None:
    cap = 1 * MiB
    c = Cartridge.create(tmp_path / "C", "CAP001", cap)
    assert c.early_warning_bytes == cap - early_warning_size(cap)
    n = 0
    while not c.early_warning:
        c.write_block(b"z" * 4096)
        n += 1
    assert c.used_bytes >= c.early_warning_bytes
    with pytest.raises(VolumeOverflow):
        for _ in range(1000):
            c.write_block(b"z" * 4096)
    used = c.used_bytes
    assert used <= cap
    with pytest.raises(VolumeOverflow):
        c.write_block(b"z" * 4096)
    assert c.used_bytes == used  # nothing written on overflow
    c.close()


def _tail(path: Path) -> Path:
    return sorted(path.glob("seg-*.dat"))[-1]


@pytest.mark.parametrize("damage", ["truncate-mid-record", "flip-payload", "flip-header", "garbage"])
def test_crash_recovery_to_durability_point(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "T"
    c = Cartridge.create(path, "CRASH1", 64 * MiB, segment_size=1 << 20)
    durable = [block(i, 3000) for i in range(30)]
    for d in durable:
        c.write_block(d)
    c.write_filemarks(1)
    c.sync()  # durability point: 31 objects
    for i in range(5):
        c.write_block(block(100 + i, 3000))
    c._release()  # crash: descriptors and lock go away, nothing is flushed or closed
    tail = _tail(path)
    size = tail.stat().st_size
    with open(tail, "r+b") as f:
        if damage == "truncate-mid-record":
            f.truncate(size - 1000)
        elif damage == "flip-payload":
            f.seek(size - 3000 * 3 - 50)
            f.write(b"\xff")
        elif damage == "flip-header":
            f.seek(size - (3000 + REC_HDR_LEN) * 2 + 12)
            f.write(b"\x55")
        else:
            f.seek(size)
            f.write(os.urandom(777))
    r = Cartridge.open(path)
    got = read_all(r)
    assert got[:31] == durable + [None]
    assert got[31:] == [block(100 + i, 3000) for i in range(len(got) - 31)]
    assert len(got) < 36 or damage == "garbage"
    # the cut is durable and the log appendable
    r.space_eod()
    r.write_block(b"after")
    r.close()
    assert read_all(Cartridge.open(path))[-1] == b"after"


def test_recovery_drops_orphan_segments(tmp_path: Path) -> None:
    path = tmp_path / "T"
    c = Cartridge.create(path, "ORPH01", 64 * MiB, segment_size=4096)
    for i in range(10):
        c.write_block(block(i, 1500))
    c.sync()
    segs = c.segment_paths()
    assert len(segs) >= 4
    c._release()
    # damage the middle segment's header: everything from there on is lost, not resurrected
    with open(segs[2], "r+b") as f:
        f.write(b"XXXX")
    r = Cartridge.open(path)
    assert read_all(r) == [block(i, 1500) for i in range(r.eod)]
    assert r.eod == 4
    assert len(list(path.glob("seg-*.dat"))) == 2
    r.close()


def test_exclusive_open(tmp_path: Path) -> None:
    c = Cartridge.create(tmp_path / "T", "LOCK01", MiB)
    with pytest.raises(CartridgeBusy):
        Cartridge.open(tmp_path / "T")
    c.close()
    Cartridge.open(tmp_path / "T").close()


def test_stale_index_ignored(tmp_path: Path) -> None:
    path = tmp_path / "T"
    c = Cartridge.create(path, "IDX001", 64 * MiB, segment_size=4096)
    for i in range(20):
        c.write_block(block(i, 500))
    c.close()  # index.dat now covers 20 objects
    (path / INDEX_NAME).write_bytes(b"garbage")
    r = Cartridge.open(path)
    assert read_all(r) == [block(i, 500) for i in range(20)]
    r.close()


@pytest.mark.parametrize("writeback", [None, 16384], ids=["default", "writeback-16KiB"])
def test_kill_9_keeps_acknowledged_data(tmp_path: Path, writeback: int | None) -> None:
    """kill -9 mid-stream (64 KiB segments; also with early writeback every 16 KiB): everything
    up to sync() reads back, what follows is a clean prefix of what was being written."""
    path = tmp_path / "K"
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from vtl.library import segio
        from vtl.library.cartridge import Cartridge
        if {writeback!r}:
            segio.WRITEBACK_CHUNK = {writeback!r}
        c = Cartridge.create(Path({str(path)!r}), "KILL01", 1 << 30, segment_size=1 << 16)
        for i in range(300):
            c.write_block(i.to_bytes(4, "big") * 1000)
        c.write_filemarks(1)
        c.sync()
        sys.stdout.write("synced\\n"); sys.stdout.flush()
        while True:
            c.write_block(b"u" * 4000)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"synced\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = Cartridge.open(path)
    got = read_all(r)
    assert got[:301] == [i.to_bytes(4, "big") * 1000 for i in range(300)] + [None]
    assert all(g == b"u" * 4000 for g in got[301:])
    r.close()


# --- a model-based test ------------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 2500)),
        st.tuples(st.just("fm"), st.integers(0, 2)),
        st.tuples(st.just("locate"), st.integers(0, 40)),
        st.tuples(st.just("blocks"), st.integers(-6, 6)),
        st.tuples(st.just("files"), st.integers(-3, 3)),
        st.tuples(st.just("read"), st.just(0)),
        st.tuples(st.just("rewind"), st.just(0)),
        st.tuples(st.just("erase"), st.just(0)),
        st.tuples(st.just("reopen"), st.just(0)),
        st.tuples(st.just("eod"), st.just(0)),
    ),
    max_size=40,
)


class Model:
    def __init__(self) -> None:
        self.objs: list[bytes | None] = []
        self.pos = 0

    def fms(self) -> list[int]:
        return [i for i, o in enumerate(self.objs) if o is None]

    def write(self, obj: bytes | None) -> None:
        del self.objs[self.pos:]
        self.objs.append(obj)
        self.pos += 1

    def space_blocks(self, n: int) -> SpaceResult:
        moved = 0
        while moved < abs(n):
            if n > 0:
                if self.pos == len(self.objs):
                    return SpaceResult(Stop.EOD, n - moved)
                self.pos += 1
                if self.objs[self.pos - 1] is None:
                    return SpaceResult(Stop.FILEMARK, n - moved)
            else:
                if self.pos == 0:
                    return SpaceResult(Stop.BOP, -n - moved)
                self.pos -= 1
                if self.objs[self.pos] is None:
                    return SpaceResult(Stop.FILEMARK, -n - moved)
            moved += 1
        return SpaceResult()

    def space_files(self, n: int) -> SpaceResult:
        moved = 0
        while moved < abs(n):
            if n > 0:
                nxt = [f for f in self.fms() if f >= self.pos]
                if not nxt:
                    self.pos = len(self.objs)
                    return SpaceResult(Stop.EOD, n - moved)
                self.pos = nxt[0] + 1
            else:
                prv = [f for f in self.fms() if f < self.pos]
                if not prv:
                    self.pos = 0
                    return SpaceResult(Stop.BOP, -n - moved)
                self.pos = prv[-1]
            moved += 1
        return SpaceResult()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops)
def test_model(tmp_path_factory: pytest.TempPathFactory, sequence: list[tuple[str, int]]) -> None:
    path = tmp_path_factory.mktemp("model") / "T"
    c = Cartridge.create(path, "MODEL1", 64 * MiB, segment_size=6000)
    m = Model()
    serial = 0
    try:
        for op, arg in sequence:
            if op == "write":
                serial += 1
                data = block(serial, arg)
                c.write_block(data)
                m.write(data)
            elif op == "fm":
                c.write_filemarks(arg)
                for _ in range(arg):
                    m.write(None)
            elif op == "locate":
                assert c.locate(arg) == (arg <= len(m.objs))
                m.pos = min(arg, len(m.objs))
            elif op == "blocks":
                assert c.space_blocks(arg) == m.space_blocks(arg)
            elif op == "files":
                assert c.space_filemarks(arg) == m.space_files(arg)
            elif op == "read":
                obj = c.read_next()
                if m.pos == len(m.objs):
                    assert obj is None
                else:
                    assert obj is not None
                    assert (None if obj.is_filemark else obj.data) == m.objs[m.pos]
                    m.pos += 1
            elif op == "rewind":
                c.rewind()
                m.pos = 0
            elif op == "erase":
                c.erase()
                del m.objs[m.pos:]
            elif op == "eod":
                c.space_eod()
                m.pos = len(m.objs)
            elif op == "reopen":
                c.close()
                c = Cartridge.open(path, segment_size=6000)
                m.pos = 0
            assert c.position == m.pos and c.eod == len(m.objs)
        assert read_all(c) == m.objs
    finally:
        c.close()
