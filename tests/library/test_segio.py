"""Cartridge file I/O (vtl/library/segio.py): read-ahead serves exact, never stale, bytes; early
writeback covers what was appended, in order, and changes nothing about durability."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

from vtl.library import segio
from vtl.library.cartridge import REC_HDR_LEN, Cartridge, MediumCorrupt

MiB = 1024 * 1024
KiB = 1024


def rand(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def read_all(c: Cartridge) -> list[bytes | None]:
    c.rewind()
    out: list[bytes | None] = []
    while (obj := c.read_next()) is not None:
        out.append(None if obj.is_filemark else bytes(obj.data))
    return out


SIZES = [1, 31, 32, 33, 4095, 4096, 65536, 65537, MiB - REC_HDR_LEN, MiB, MiB + 1, 2 * MiB + 3]


def write_mixed(c: Cartridge, seed: int, count: int) -> list[bytes | None]:
    """Blocks of sizes from 1 byte to past the read-ahead chunk, filemarks in between."""
    rng = random.Random(seed)
    expect: list[bytes | None] = []
    for i in range(count):
        if rng.random() < 0.1:
            c.write_filemarks(1)
            expect.append(None)
        size = SIZES[i % len(SIZES)] if i < len(SIZES) else rng.choice(SIZES[:8] * 4 + SIZES[8:])
        data = rand(rng, size)
        c.write_block(data)
        expect.append(data)
    return expect


@pytest.mark.parametrize("chunk", [None, 4096, 100_000])
def test_read_back_mixed_sizes_across_segments(tmp_path: Path, chunk: int | None) -> None:
    c = Cartridge.create(tmp_path / "T", "SEG001", 1 << 30, segment_size=3 * MiB)
    c._ra.chunk = chunk or segio.READ_AHEAD
    expect = write_mixed(c, 1, 60)
    assert len(c.segment_paths()) > 4
    assert read_all(c) == expect
    assert read_all(c) == expect  # a second pass, from a buffer left by the first
    c.close()
    r = Cartridge.open(tmp_path / "T", segment_size=3 * MiB)
    r._ra.chunk = chunk or segio.READ_AHEAD
    assert read_all(r) == expect
    r.close()


def test_overwrite_in_the_middle_never_serves_stale_read_ahead(tmp_path: Path) -> None:
    """Records overwritten with same-sized ones sit at the same offsets with the same object
    numbers and valid CRCs: only dropping the read-ahead buffer keeps the old ones out."""
    c = Cartridge.create(tmp_path / "T", "STALE1", 1 << 30, segment_size=64 * MiB)
    old = [bytes([i]) * 4000 for i in range(40)]
    for b in old:
        c.write_block(b)
    c.rewind()
    assert bytes(c.read_next().data) == old[0]  # fills the buffer with blocks 0..15 or so
    kept = c.read_next().data  # a view of the buffer, held across the overwrite
    assert c._ra.end - c._ra.start > 10 * 4000
    c.locate(5)
    new = [bytes([200 + i]) * 4000 for i in range(5)]
    for b in new:
        c.write_block(b)
    assert c.eod == 10
    c.locate(5)
    assert [bytes(c.read_next().data) for _ in range(5)] == new
    assert c.read_next() is None
    assert bytes(kept) == old[1]  # what a caller holds never changes under it
    # the same through a read that continues from a buffer filled before the overwrite
    c.locate(2)
    assert bytes(c.read_next().data) == old[2]
    c.erase()  # EOD at 3
    c.write_block(b"z" * 4000)
    c.locate(3)
    assert bytes(c.read_next().data) == b"z" * 4000
    assert read_all(c) == old[:3] + [b"z" * 4000]
    c.close()


def test_space_and_locate_back_and_forth_then_read(tmp_path: Path) -> None:
    c = Cartridge.create(tmp_path / "T", "SPACE1", 1 << 30, segment_size=MiB)
    c._ra.chunk = 64 * KiB
    rng = random.Random(7)
    expect: list[bytes | None] = []
    for i in range(400):
        if i % 37 == 36:
            c.write_filemarks(1)
            expect.append(None)
        else:
            data = rand(rng, rng.choice([1, 100, 5000, 40_000, 70_000]))
            c.write_block(data)
            expect.append(data)
    for _ in range(300):
        op = rng.randrange(5)
        if op == 0:
            c.locate(rng.randrange(len(expect) + 1))
        elif op == 1:
            c.space_blocks(rng.randint(-50, 50))
        elif op == 2:
            c.space_filemarks(rng.randint(-3, 3))
        elif op == 3:
            c.rewind()
        for _ in range(rng.randrange(1, 6)):
            pos = c.position
            obj = c.read_next()
            if pos == len(expect):
                assert obj is None
                break
            assert obj is not None
            assert (None if obj.is_filemark else bytes(obj.data)) == expect[pos]
            assert c.position == pos + 1
    c.close()


def test_compressed_records_read_back(tmp_path: Path) -> None:
    c = Cartridge.create(tmp_path / "T", "ZSTD01", 1 << 30, segment_size=2 * MiB)
    rng = random.Random(3)
    expect: list[bytes | None] = []
    for i in range(80):
        data = (b"compressible %d " % i) * rng.randrange(1, 20_000) if i % 3 else rand(rng, 3000)
        c.write_block(data, compress=True)
        expect.append(data)
        if i % 25 == 24:
            c.write_filemarks(1)
            expect.append(None)
    assert c._squeezer is not None and c._squeezer.kept > 10
    assert read_all(c) == expect
    c.close()


def test_payload_corruption_still_detected(tmp_path: Path) -> None:
    c = Cartridge.create(tmp_path / "T", "CRC001", 1 << 30)
    for i in range(20):
        c.write_block(bytes([i]) * 1000)
    c.sync()
    fd = os.open(c.segment_paths()[0], os.O_RDWR)
    os.pwrite(fd, b"\xff", 32 + 10 * (REC_HDR_LEN + 1000) + REC_HDR_LEN + 500)  # block 10
    os.close(fd)
    c.rewind()
    for i in range(10):
        assert bytes(c.read_next().data) == bytes([i]) * 1000
    with pytest.raises(MediumCorrupt):
        c.read_next()
    c.close()


# --- early writeback --------------------------------------------------------------------------


def record_writeback(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """Wrap segio.start_writeback: (segment file name, offset, length) of every call."""
    calls: list[tuple[str, int, int]] = []
    real = segio.start_writeback

    def spy(fd: int, offset: int, nbytes: int) -> None:
        calls.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), offset, nbytes))
        real(fd, offset, nbytes)

    monkeypatch.setattr(segio, "start_writeback", spy)
    return calls


def check_coverage(calls: list[tuple[str, int, int]], sizes: dict[str, int], chunk: int) -> None:
    """Per segment: contiguous ranges from 0, in order, page-aligned ends, within the file,
    leaving at most one chunk (plus a page) for the fsync."""
    by_seg: dict[str, list[tuple[int, int]]] = {}
    for name, off, n in calls:
        by_seg.setdefault(name, []).append((off, n))
    assert set(by_seg) == {name for name, size in sizes.items() if size >= chunk}
    for name, ranges in by_seg.items():
        mark = 0
        for off, n in ranges:
            assert off == mark, (name, ranges)
            assert n > 0 and (off + n) % segio.PAGE == 0
            mark = off + n
        assert mark <= sizes[name]
        assert sizes[name] - mark < chunk + segio.PAGE


@pytest.mark.parametrize("chunk", [None, 64 * KiB])
def test_writeback_covers_appended_data_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 chunk: int | None) -> None:
    if chunk:
        monkeypatch.setattr(segio, "WRITEBACK_CHUNK", chunk)
    chunk = chunk or segio.WRITEBACK_CHUNK
    calls = record_writeback(monkeypatch)
    seg_size = max(3 * chunk, 4 * MiB) + 12345
    c = Cartridge.create(tmp_path / "T", "WB0001", 1 << 34, segment_size=seg_size)
    rng = random.Random(5)
    expect: list[bytes | None] = []
    while c.used_bytes < 2.5 * seg_size:
        data = rand(rng, rng.choice([512, 3000, 65536, 262144 + 7]))
        c.write_block(data)
        expect.append(data)
    c.write_filemarks(1)
    expect.append(None)
    c.sync()
    sizes = {p.name: p.stat().st_size for p in c.segment_paths()}
    assert len(sizes) == 3 and calls
    check_coverage(calls, sizes, chunk)
    assert read_all(c) == expect
    c.close()
    r = Cartridge.open(tmp_path / "T", segment_size=seg_size)
    assert read_all(r) == expect
    r.close()


def test_writeback_after_overwrite_restarts_at_the_cut(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segio, "WRITEBACK_CHUNK", 64 * KiB)
    calls = record_writeback(monkeypatch)
    c = Cartridge.create(tmp_path / "T", "WB0002", 1 << 30, segment_size=64 * MiB)
    for i in range(100):
        c.write_block(bytes([i]) * 10_000)
    c.locate(30)
    calls.clear()
    cut = c._find(30)[1]
    for i in range(50):
        c.write_block(b"n" * 10_000)
    c.sync()
    assert calls[0][1] == cut
    for (_, off, n), (_, nxt, _) in zip(calls, calls[1:]):
        assert off + n == nxt
    size = c.segment_paths()[0].stat().st_size
    assert size - (calls[-1][1] + calls[-1][2]) < 64 * KiB + segio.PAGE
    assert read_all(c) == [bytes([i]) * 10_000 for i in range(30)] + [b"n" * 10_000] * 50
    c.close()


def test_writeback_call_is_real_and_optional(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    if sys.platform.startswith("linux"):
        assert segio._sync_file_range is not None
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, b"x" * 65536, 0)
    segio.start_writeback(fd, 0, 65536)  # must not raise
    segio.start_writeback(-1, 0, 4096)  # EBADF: ignored, not fatal
    os.close(fd)
    monkeypatch.setattr(segio, "_sync_file_range", None)
    monkeypatch.setattr(segio, "WRITEBACK_CHUNK", 4096)
    c = Cartridge.create(tmp_path / "T", "WB0003", 1 << 30)
    for i in range(50):
        c.write_block(bytes([i]) * 5000)
    c.sync()
    assert read_all(c) == [bytes([i]) * 5000 for i in range(50)]
    c.close()


# --- background seals ----------------------------------------------------------------------------

def test_a_sealed_segment_is_fsynced_in_the_background_and_sync_waits_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    gate, started = threading.Event(), threading.Event()
    synced: list[int] = []
    real = segio._fsync_and_close

    def slow_fsync(fd: int) -> None:
        started.set()
        assert gate.wait(10)
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(segio, "_fsync_and_close", slow_fsync)
    c = Cartridge.create(tmp_path / "t", "SEAL01", 1 << 30)
    c.close()
    c = Cartridge.open(tmp_path / "t", segment_size=256 * KiB)
    block = bytes(range(256)) * 256  # 64 KiB
    for _ in range(5):  # the fifth block starts segment 1: segment 0 is sealed
        c.write_block(block)
    assert started.wait(10)
    assert c._sealer.pending == 1 and synced == []  # the stream did not wait for the disk
    c.write_block(block)  # nor does the next block
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (c.sync(), done.set()))
    waiter.start()
    assert not done.wait(0.3)  # a durability point waits for the seal
    gate.set()
    waiter.join(10)
    assert done.is_set() and len(synced) == 1 and c._sealer.pending == 0
    assert read_all(c) == [block] * 6
    c.close()


def test_a_failed_background_seal_is_reported_at_the_next_durability_point(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The durability point fails (the drive answers MEDIUM ERROR), and the segment is
    fsynced again, in the foreground, by that and later durability points."""
    import vtl.library.cartridge as cartridge_mod

    def failing(fd: int) -> None:
        os.close(fd)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(segio, "_fsync_and_close", failing)
    c = Cartridge.create(tmp_path / "t", "SEAL02", 1 << 30)
    c.close()
    c = Cartridge.open(tmp_path / "t", segment_size=128 * KiB)
    for _ in range(3):
        c.write_block(bytes(64 * KiB))
    seg0 = os.fstat(c._fd(0)).st_ino
    fsynced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(cartridge_mod.os, "fsync",
                        lambda fd: (fsynced.append(os.fstat(fd).st_ino), real(fd))[1])
    with pytest.raises(OSError) as raised:
        c.sync()
    assert raised.value.errno == 5
    assert seg0 in fsynced  # retried in the foreground at once
    fsynced.clear()
    c.sync()  # that retry succeeded: the next durability point is clean
    c.close()
