"""The cached volume's on-disk formats (volumes/cachemap.py): map header, journal, LRU list."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from volumes.cached import CachedBackend
from volumes.cachemap import (
    HEADER_BYTES, KIND_DIRTY, KIND_REF, ZERO_DIGEST, ChunkMap, Journal, MapCorrupt, Record,
    read_lru, replay, write_lru,
)
from volumes.chunks import CHUNK_BYTES, ChunkStore, chunk_ref
from vtl.cloud.clock import ManualClock
from vtl.cloud.local import LocalStore

MIB = CHUNK_BYTES
D1, D2 = bytes(range(32)), bytes(range(32, 64))


def test_map_header_round_trip_and_damage(tmp_path: Path) -> None:
    header = {"size_bytes": 5 * MIB, "chunk_bytes": MIB, "count": 5, "source_snapshot": "s"}
    block = ChunkMap.encode_header(header)
    assert len(block) == HEADER_BYTES and ChunkMap.decode_header(block) == header
    for at in (0, 9, 20, 40):
        bad = bytearray(block)
        bad[at] ^= 0x01
        with pytest.raises(MapCorrupt):
            ChunkMap.decode_header(bytes(bad))
    with pytest.raises(MapCorrupt):
        ChunkMap.decode_header(block[:100])
    ChunkMap.create(tmp_path / "m", header, [None, D1.hex(), None])
    m = ChunkMap.open(tmp_path / "m")
    try:
        assert [m.get(i) for i in range(5)] == [ZERO_DIGEST, D1, ZERO_DIGEST, ZERO_DIGEST,
                                                ZERO_DIGEST]
        m.set(4, D2)
        assert list(m.nonzero()) == [(1, D1), (4, D2)]
    finally:
        m.close()
    os.truncate(tmp_path / "m", HEADER_BYTES + 4 * 32)  # shorter than its count
    with pytest.raises(MapCorrupt):
        ChunkMap.open(tmp_path / "m")


def test_journal_replays_and_cuts_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "j"
    Journal.create(path)
    j, recs = Journal.open(path)
    assert recs == []
    j.append(Record(KIND_DIRTY, 3))
    j.append(Record(KIND_DIRTY, 4))
    assert j.sync() == 2
    j.append(Record(KIND_REF, 3, D1))
    j.sync()
    j.append(Record(KIND_REF, 9, D2))  # never synced: lost with the process
    j.close()
    with open(path, "ab") as f:
        f.write(Record(KIND_DIRTY, 7).encode()[:30])  # a torn record
    j, recs = Journal.open(path)
    assert recs == [Record(KIND_DIRTY, 3), Record(KIND_DIRTY, 4), Record(KIND_REF, 3, D1)]
    assert replay(recs, 10) == ({3: D1}, {4})
    size = path.stat().st_size
    j.append(Record(KIND_DIRTY, 5))
    j.sync()
    j.close()
    assert path.stat().st_size == size + 45  # appended after the cut, not after the junk
    j, recs = Journal.open(path)
    assert recs[-1] == Record(KIND_DIRTY, 5)
    j.rewrite([Record(KIND_DIRTY, 4)])
    j.close()
    j, recs = Journal.open(path)
    j.close()
    assert recs == [Record(KIND_DIRTY, 4)] and j.checkpoint == 1
    with pytest.raises(MapCorrupt):
        replay([Record(KIND_DIRTY, 10)], 10)  # another volume's journal
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(MapCorrupt):
        Journal.open(path)


def test_lru_list_round_trip_and_damage(tmp_path: Path) -> None:
    path = tmp_path / "lru"
    assert read_lru(path, 10) is None
    write_lru(path, [5, 1, 9])
    assert read_lru(path, 10) == [5, 1, 9]
    assert read_lru(path, 9) is None  # an index past the volume
    data = bytearray(path.read_bytes())
    data[-6] ^= 1
    path.write_bytes(bytes(data))
    assert read_lru(path, 10) is None


def test_torn_journal_tail_of_a_volume_reopens(tmp_path: Path) -> None:
    """Garbage after the last record (a crash mid-append) costs nothing that was flushed."""
    cs = ChunkStore(LocalStore(tmp_path / "store", clock=ManualClock()))
    v = CachedBackend.create(tmp_path / "v", 4 * MIB, cs, cache_bytes=MIB, buffer_bytes=4 * MIB)
    data = random.Random(1).randbytes(2 * MIB)
    v.write(0, data)
    v.flush()
    assert v.drain(30)
    refs = v.recovery_point()
    v.close()
    with open(tmp_path / "v" / "journal.log", "ab") as f:
        f.write(b"\x02" + bytes(20))
    (tmp_path / "v" / "lru.bin").unlink()  # as after a crash: nothing known to be cached
    v = CachedBackend.open(tmp_path / "v", cs, cache_bytes=MIB, buffer_bytes=4 * MIB)
    try:
        assert v.allocated_bytes == 0  # stale cache content was given back
        assert v.recovery_point() == refs == [chunk_ref(data[:MIB]), chunk_ref(data[MIB:]),
                                              None, None]
        assert v.read(0, 2 * MIB) == data
    finally:
        v.close()
