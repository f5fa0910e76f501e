"""The share file cache: chunk bookkeeping, LRU eviction of clean files, adoption at start."""

from __future__ import annotations

from pathlib import Path

from fileshare.cache import FileCache


def test_missing_ranges_are_chunk_aligned_and_merged(tmp_path: Path) -> None:
    cache = FileCache(tmp_path, chunk=10)
    key = ("s", 1)
    assert cache.missing(key, 35, 0, 100) == [(0, 34)]
    cache.fill(key, 35, 10, b"b" * 10)
    assert cache.missing(key, 35, 0, 100) == [(0, 9), (20, 34)]
    assert cache.missing(key, 35, 12, 5) == []
    cache.fill(key, 35, 0, b"a" * 10)
    cache.fill(key, 35, 20, b"c" * 10)
    assert not cache.is_complete(key)
    cache.fill(key, 35, 30, b"d" * 5)  # the short tail chunk completes the file
    assert cache.is_complete(key)
    assert cache.read(key, 0, 100) == b"a" * 10 + b"b" * 10 + b"c" * 10 + b"d" * 5
    assert cache.missing(key, 35, 0, 0) == [] and cache.missing(key, 35, 40, 5) == []


def test_lru_eviction_skips_dirty_and_protected_files(tmp_path: Path) -> None:
    cache = FileCache(tmp_path, limit=25, chunk=10)
    for fileid in (1, 2, 3):
        cache.fill(("s", fileid), 10, 0, bytes([fileid]) * 10)
    cache.write(("s", 4), 0, b"dirty" * 4, sync=False)  # 20 dirty bytes
    cache.read(("s", 1), 0, 1)
    cache.missing(("s", 1), 10, 0, 1)  # touch: 1 is now the most recently used
    gone = cache.evict(protect=[("s", 2)])
    assert ("s", 4) not in gone and ("s", 2) not in gone
    assert gone == [("s", 3), ("s", 1)]
    assert cache.usage() == 30  # over the limit only by dirty + protected bytes
    assert not cache.path(("s", 3)).exists()
    cache.mark_clean(("s", 4))
    assert cache.evict() == [("s", 2)]  # the older of the two clean files
    assert cache.usage() == 20


def test_adopt_keeps_complete_and_dirty_files_and_deletes_the_rest(tmp_path: Path) -> None:
    cache = FileCache(tmp_path, chunk=10)
    cache.write(("s", 1), 0, b"dirty", sync=True)
    cache.fill(("s", 2), 5, 0, b"clean")
    cache.fill(("s", 3), 50, 0, b"x" * 10)  # partial: dropped at the next start
    again = FileCache(tmp_path, chunk=10)
    again.adopt("s", [(1, 5, False, True), (2, 5, True, False)])
    assert again.is_dirty(("s", 1)) and again.is_complete(("s", 1))
    assert again.read(("s", 2), 0, 10) == b"clean"
    assert not again.path(("s", 3)).exists()
    again.forget_share("s")
    assert not again.share_dir("s").exists()


def test_truncate_extends_with_zeros(tmp_path: Path) -> None:
    cache = FileCache(tmp_path)
    cache.create(("s", 9))
    cache.write(("s", 9), 0, b"abc", sync=False)
    cache.truncate(("s", 9), 6)
    assert cache.read(("s", 9), 0, 10) == b"abc\0\0\0"
    cache.truncate(("s", 9), 1)
    assert cache.read(("s", 9), 0, 10) == b"a"
    cache.drop(("s", 9))
    assert cache.read(("s", 9), 0, 10) == b""


def test_usage_total_stays_equal_to_the_sum_of_entries(tmp_path: Path) -> None:
    cache = FileCache(tmp_path, limit=100, chunk=8)
    for i in range(30):
        key = ("s", i % 7)
        op = i % 5
        if op == 0:
            cache.fill(key, 40, (i % 5) * 8, b"x" * 8)
        elif op == 1:
            cache.write(key, i, b"y" * 9, sync=False)
        elif op == 2:
            cache.truncate(key, i)
            cache.mark_clean(key)
        elif op == 3:
            cache.drop(key)
        else:
            cache.evict()
        assert cache.usage() == sum(e.held(8) for e in cache._lru.values())
