"""StoredBackend: sparse file creation, pread/pwrite, hole punching, durability calls."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.volumes.helpers import cdb10, clear_ua, run, write10
from volumes import stored
from volumes.memory import MemoryBackend
from volumes.sbc import BlockDevice
from volumes.stored import StoredBackend

MIB = 1024 * 1024


@pytest.fixture
def vol(tmp_path: Path) -> StoredBackend:
    backend = StoredBackend.create(tmp_path / "v.img", 64 * MIB)
    yield backend
    backend.close()


def test_create_is_sparse(vol: StoredBackend, tmp_path: Path) -> None:
    assert vol.size == 64 * MIB
    assert os.stat(tmp_path / "v.img").st_size == 64 * MIB
    assert vol.allocated_bytes < MIB
    assert vol.read(0, 4096) == bytes(4096)
    assert vol.extents(0, 64 * MIB) == [(0, 64 * MIB, False)]


def test_create_refuses_existing_file_and_bad_size(vol: StoredBackend, tmp_path: Path) -> None:
    with pytest.raises(FileExistsError):
        StoredBackend.create(tmp_path / "v.img", MIB)
    with pytest.raises(ValueError):
        StoredBackend.create(tmp_path / "w.img", 0)


def test_write_read_round_trip_and_allocation(vol: StoredBackend) -> None:
    data = os.urandom(3 * MIB)
    vol.write(5 * MIB + 17, data)
    assert vol.read(5 * MIB + 17, len(data)) == data
    assert vol.read(5 * MIB, 17) == bytes(17)
    assert 3 * MIB <= vol.allocated_bytes <= 4 * MIB + 65536
    runs = vol.extents(0, 64 * MIB)
    assert any(mapped for _, _, mapped in runs)
    assert sum(length for _, length, _ in runs) == 64 * MIB
    covered = [(o, n) for o, n, m in runs if m]
    assert covered[0][0] <= 5 * MIB + 17 and covered[-1][0] + covered[-1][1] >= 8 * MIB + 17


def test_out_of_range_is_refused(vol: StoredBackend) -> None:
    with pytest.raises(ValueError):
        vol.read(64 * MIB - 1, 2)
    with pytest.raises(ValueError):
        vol.write(64 * MIB, b"x")
    with pytest.raises(ValueError):
        vol.discard(-1, 10)


def test_discard_punches_a_hole(vol: StoredBackend) -> None:
    vol.write(0, b"\xab" * 8 * MIB)
    before = vol.allocated_bytes
    vol.discard(MIB, 4 * MIB)
    assert vol.read(MIB, 4 * MIB) == bytes(4 * MIB)
    assert vol.read(0, MIB) == b"\xab" * MIB
    assert vol.read(5 * MIB, MIB) == b"\xab" * MIB
    assert vol.size == 64 * MIB
    assert vol.allocated_bytes <= before - 4 * MIB
    assert (MIB, 4 * MIB, False) in vol.extents(0, 8 * MIB)


def test_discard_unaligned_zeroes_exactly(vol: StoredBackend) -> None:
    vol.write(0, b"\xcd" * 16384)
    vol.discard(100, 9000)
    data = vol.read(0, 16384)
    assert data == b"\xcd" * 100 + bytes(9000) + b"\xcd" * (16384 - 9100)


def test_discard_falls_back_to_zeros(vol: StoredBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    vol.write(0, b"\xef" * 3 * MIB)
    monkeypatch.setattr(stored, "punch_hole", lambda fd, off, n: False)
    vol.discard(MIB // 2, 2 * MIB)
    assert vol.read(0, 3 * MIB) == b"\xef" * (MIB // 2) + bytes(2 * MIB) + b"\xef" * (MIB // 2)


def test_flush_is_fdatasync(vol: StoredBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd)))
    vol.flush()
    assert len(calls) == 1


def test_fua_and_synchronize_cache_reach_the_disk(vol: StoredBackend,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append(fd))
    dev = BlockDevice(vol, serial="S")
    clear_ua(dev)
    assert run(dev, write10(0, 1), bytes(512)).ok
    assert calls == []  # write-back: a plain WRITE stays in the page cache
    assert run(dev, write10(0, 1, flags=0x08), bytes(512)).ok
    assert len(calls) == 1
    assert run(dev, cdb10(0x35, 0, 0)).ok
    assert len(calls) == 2


def test_reopen_sees_the_data_and_read_only(tmp_path: Path) -> None:
    path = tmp_path / "r.img"
    with StoredBackend.create(path, 8 * MIB) as b:
        b.write(4096, b"hello")
        b.flush()
    with StoredBackend(path, read_only=True) as ro:
        assert ro.size == 8 * MIB
        assert ro.read(4096, 5) == b"hello"
        with pytest.raises(OSError):
            ro.write(0, b"x")


def test_closed_backend_errors_become_sense(tmp_path: Path) -> None:
    b = StoredBackend.create(tmp_path / "c.img", MIB)
    dev = BlockDevice(b, serial="S")
    clear_ua(dev)
    b.close()
    res = run(dev, cdb10(0x28, 0, 1))
    assert res.status == 2  # MEDIUM ERROR from EBADF, never an exception


def test_block_device_semantics_match_memory_backend(vol: StoredBackend) -> None:
    """The same WRITE / WRITE SAME / UNMAP sequence leaves the same bytes in both backends."""
    mem = MemoryBackend(vol.size)
    for backend in (vol, mem):
        dev = BlockDevice(backend, serial="S")
        clear_ua(dev)
        assert run(dev, write10(0, 64), bytes(range(256)) * 128).ok
        assert run(dev, cdb10(0x41, 8, 8, 0x08), bytes(512)).ok
        assert run(dev, cdb10(0x41, 40, 4), b"\x11" * 512).ok
    assert vol.read(0, 64 * 512) == mem.read(0, 64 * 512)


@pytest.fixture
def small_segments(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(stored, "SEGMENT_BYTES", MIB)
    return MIB


def test_large_volumes_span_segment_files(tmp_path: Path, small_segments: int) -> None:
    path = tmp_path / "big.img"
    b = StoredBackend.create(path, 2 * MIB + 4096)
    assert [p.name for p in stored.segment_paths(path)] == ["big.img", "big.img.1", "big.img.2"]
    assert [p.stat().st_size for p in stored.segment_paths(path)] == [MIB, MIB, 4096]
    assert b.size == stored.stored_size(path) == 2 * MIB + 4096
    data = os.urandom(MIB + MIB // 2 + 2048)
    b.write(MIB // 2, data)  # spans all three segments
    assert b.read(MIB // 2, len(data)) == data
    assert (tmp_path / "big.img.1").read_bytes() == data[MIB // 2:MIB // 2 + MIB]
    assert (tmp_path / "big.img.2").read_bytes()[:2048] == data[-2048:]
    b.discard(MIB - 4096, 8192)  # across the first boundary
    assert b.read(MIB - 4096, 8192) == bytes(8192)
    runs = b.extents(0, b.size)
    assert sum(n for _, n, _ in runs) == b.size
    assert (MIB - 4096, 8192, False) in runs
    assert all(a[2] != c[2] for a, c in zip(runs, runs[1:]))  # coalesced across files
    b.flush()
    b.close()
    with StoredBackend(path) as again:
        assert again.size == 2 * MIB + 4096
        assert again.read(MIB // 2, 100) == data[:100]
    assert stored.allocated_bytes(path) > 0
    stored.remove_volume_files(path)
    assert stored.segment_paths(path) == [] and stored.stored_size(path) is None


def test_failed_create_removes_its_segments(tmp_path: Path, small_segments: int) -> None:
    (tmp_path / "x.img.1").write_bytes(b"in the way")
    with pytest.raises(FileExistsError):
        StoredBackend.create(tmp_path / "x.img", 3 * MIB)
    assert not (tmp_path / "x.img").exists()
    assert (tmp_path / "x.img.1").read_bytes() == b"in the way"


def test_wrong_segment_size_is_refused(tmp_path: Path, small_segments: int) -> None:
    path = tmp_path / "y.img"
    StoredBackend.create(path, 2 * MIB).close()
    os.truncate(path, MIB // 2)
    with pytest.raises(OSError):
        StoredBackend(path)


def test_block_device_over_segments(tmp_path: Path, small_segments: int) -> None:
    b = StoredBackend.create(tmp_path / "z.img", 3 * MIB)
    dev = BlockDevice(b, serial="S")
    clear_ua(dev)
    lba = MIB // 512 - 2
    assert run(dev, write10(lba, 4), b"\x5a" * 2048).ok
    assert bytes(run(dev, cdb10(0x28, lba, 4)).data_in) == b"\x5a" * 2048
    assert run(dev, cdb10(0x41, lba, 4, 0x08), bytes(512)).ok
    assert bytes(run(dev, cdb10(0x28, lba, 4)).data_in) == bytes(2048)
    b.close()
