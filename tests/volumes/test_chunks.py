"""Content-addressed chunks and snapshot manifests (volumes/chunks.py) on LocalStore and moto."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.cloud.conftest import _fake_aws_env, boto_session, moto_s3  # noqa: F401 (fixtures)
from vtl.cloud.clock import ManualClock
from vtl.cloud.local import LocalStore
from vtl.cloud.store import ObjectNotFound, ObjectStore, StoreUnavailable
from volumes.chunks import (CHUNK_BYTES, MANIFEST_MAGIC, ChunkCorrupt, ChunkStore, Manifest,
                            chunk_ref)


class Probe:
    """An ObjectStore wrapper counting the requests made (chunk PUTs/GETs apart), optionally
    failing chunk PUTs after ``fail_after`` of them or slowing them by ``delay`` seconds."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.puts: list[str] = []
        self.heads = 0
        self.chunk_puts = 0
        self.chunk_gets = 0
        self.fail_after: int | None = None
        self.delay = 0.0

    def put_object(self, key: str, data: Any, **kw: Any) -> Any:
        if "/chunks/" in key:
            if self.fail_after is not None and self.chunk_puts >= self.fail_after:
                raise StoreUnavailable("endpoint down (test)")
            if self.delay:
                time.sleep(self.delay)
            self.chunk_puts += 1
        self.puts.append(key)
        return self.inner.put_object(key, data, **kw)

    def get_object(self, key: str, **kw: Any) -> bytes:
        if "/chunks/" in key:
            self.chunk_gets += 1
        return self.inner.get_object(key, **kw)

    def head_object(self, key: str) -> Any:
        self.heads += 1
        return self.inner.head_object(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(params=["local", "moto"])
def backing(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "local":
        yield LocalStore(tmp_path / "store", clock=ManualClock())
    else:
        yield request.getfixturevalue("moto_s3")


@pytest.fixture
def chunks(backing: ObjectStore) -> ChunkStore:
    return ChunkStore(Probe(backing), prefix="vol/")  # type: ignore[arg-type]


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_put_get_roundtrip_and_key_layout(chunks: ChunkStore, backing: ObjectStore) -> None:
    data = rand(CHUNK_BYTES, 1)
    ref = chunks.put(data)
    assert ref == hashlib.sha256(data).hexdigest()
    keys = [e.key for e in backing.list_objects("vol/")]
    assert keys == [f"vol/chunks/{ref[:2]}/{ref}"]
    assert chunks.get(ref) == data


def test_zero_chunk_is_never_stored(chunks: ChunkStore, backing: ObjectStore) -> None:
    assert chunks.put(bytes(CHUNK_BYTES)) is None
    assert chunks.put(b"") is None
    assert list(backing.list_objects("vol/")) == []
    assert chunks.get(None) == bytes(CHUNK_BYTES)
    assert chunks.get(None, 10) == bytes(10)


def test_unchanged_data_is_uploaded_once(chunks: ChunkStore, backing: ObjectStore) -> None:
    store: Probe = chunks.store  # type: ignore[assignment]
    data = rand(4096, 2)
    r1 = chunks.put(data)
    r2 = chunks.put(bytearray(data))
    r3 = ChunkStore(store, prefix="vol/").put(memoryview(data))  # another instance, same store
    assert r1 == r2 == r3
    assert len(store.puts) == 1 and store.heads == 3
    assert chunks.uploaded == 1 and chunks.uploaded_bytes == 4096
    assert len(list(backing.list_objects("vol/chunks/"))) == 1


def test_short_chunk_pads_and_oversize_rejected(chunks: ChunkStore) -> None:
    data = rand(1000, 3)
    ref = chunks.put(data)
    assert ref is not None
    assert chunks.get(ref, 1000) == data
    assert chunks.get(ref, 1500) == data + bytes(500)
    with pytest.raises(ChunkCorrupt):
        chunks.get(ref, 999)
    with pytest.raises(ValueError):
        chunks.put(bytes(CHUNK_BYTES + 1))


def test_get_verifies_digest(chunks: ChunkStore, backing: ObjectStore) -> None:
    data = rand(5000, 4)
    ref = chunks.put(data)
    assert ref is not None
    backing.put_object(chunks.chunk_key(ref), data[:-1] + b"\x00")  # bit rot behind our back
    with pytest.raises(ChunkCorrupt):
        chunks.get(ref)
    with pytest.raises(ObjectNotFound):
        chunks.get("ab" * 32)
    with pytest.raises(ChunkCorrupt):
        chunks.get("../../etc/passwd")


def manifest(sid: str, refs: list[str | None], size: int | None = None) -> Manifest:
    size = len(refs) * CHUNK_BYTES if size is None else size
    return Manifest(sid, "vol1", size, "2026-11-25T23:00:00Z", "nightly ü", CHUNK_BYTES, refs)


def test_manifest_store_list_delete(chunks: ChunkStore, backing: ObjectStore) -> None:
    a = chunks.put(rand(100, 5))
    m = manifest("snap-1", [a, None, a], size=2 * CHUNK_BYTES + 7)
    chunks.put_manifest(m)
    chunks.put_manifest(manifest("snap-0", [None]))
    assert chunks.list_manifests() == ["snap-0", "snap-1"]
    assert backing.head_object("vol/snapshots/snap-1.manifest").size == len(m.encode())
    got = chunks.get_manifest("snap-1")
    assert got == m and list(got.chunks) == [a, None, a] and got.refs() == {a}
    assert got.chunk_length(2) == 7
    chunks.delete_manifest("snap-1")
    chunks.delete_manifest("snap-1")  # missing is fine
    assert chunks.list_manifests() == ["snap-0"]
    with pytest.raises(ObjectNotFound):
        chunks.get_manifest("snap-1")


def test_manifest_under_wrong_key_is_corrupt(chunks: ChunkStore, backing: ObjectStore) -> None:
    backing.put_object(chunks.manifest_key("b"), manifest("a", [None]).encode())
    with pytest.raises(ChunkCorrupt):
        chunks.get_manifest("b")


def test_collect_keeps_live_and_deletes_the_rest(chunks: ChunkStore, backing: ObjectStore) -> None:
    refs = [chunks.put(rand(64, s)) for s in range(6)]
    backing.put_object("vol/chunks/zz/not-a-chunk", b"x")  # foreign objects are left alone
    live = {r for r in refs[:3] if r}
    assert chunks.collect(live) == 3
    left = {e.key.rpartition("/")[2] for e in chunks.list_chunks()}
    assert left == live
    assert backing.head_object("vol/chunks/zz/not-a-chunk").size == 1
    assert chunks.collect(live) == 0


# --- manifest codec ------------------------------------------------------------------------

FIXTURE = manifest("s", ["00" * 31 + "01", None], size=CHUNK_BYTES + 1)


def test_manifest_fixture_bytes() -> None:
    raw = FIXTURE.encode()
    assert raw[:8] == MANIFEST_MAGIC
    version, hlen = struct.unpack_from(">HI", raw, 8)
    assert version == 1
    assert raw[14 + hlen:14 + hlen + 64] == bytes(31) + b"\x01" + bytes(32)
    assert struct.unpack(">I", raw[-4:])[0] == crc32c.crc32c(raw[:-4])
    assert len(raw) == 14 + hlen + 64 + 4


@pytest.mark.parametrize("mutate", [
    lambda b: b[:-1],                               # truncated
    lambda b: b + b"\x00",                          # trailing byte
    lambda b: b"X" + b[1:],                         # magic
    lambda b: b[:9] + b"\x02" + b[10:],             # version (checked before the CRC)
    lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:],  # a flipped bit
    lambda b: b"",
    lambda b: b[:14],
])
def test_manifest_decode_rejects(mutate: Any) -> None:
    with pytest.raises(ChunkCorrupt):
        Manifest.decode(mutate(FIXTURE.encode()))


def _recrc(body: bytes) -> bytes:
    return body + struct.pack(">I", crc32c.crc32c(body))


def test_manifest_decode_rejects_consistent_crc_but_bad_lengths() -> None:
    raw = FIXTURE.encode()[:-4]
    _, hlen = struct.unpack_from(">HI", raw, 8)
    with pytest.raises(ChunkCorrupt):  # one digest missing, count says two
        Manifest.decode(_recrc(raw[:-32]))
    with pytest.raises(ChunkCorrupt):  # header length past the end
        Manifest.decode(_recrc(raw[:10] + struct.pack(">I", 10**6) + raw[14:]))
    with pytest.raises(ChunkCorrupt):  # header not JSON
        Manifest.decode(_recrc(raw[:14] + b"{" * hlen + raw[14 + hlen:]))


def test_manifest_rejects_wrong_count_and_bad_refs() -> None:
    with pytest.raises(ValueError):
        manifest("s", [None], size=CHUNK_BYTES + 1)
    with pytest.raises(ValueError):
        manifest("s", ["xyz"])
    with pytest.raises(ValueError):
        manifest("../x", [None])


refs_st = st.lists(st.one_of(st.none(), st.binary(min_size=32, max_size=32).map(bytes.hex)),
                   max_size=40)


@given(refs=refs_st, tail=st.integers(0, CHUNK_BYTES - 1), desc=st.text(max_size=50))
@settings(max_examples=60, deadline=None)
def test_manifest_roundtrip(refs: list[str | None], tail: int, desc: str) -> None:
    size = max(0, len(refs) * CHUNK_BYTES - tail) if refs else 0
    m = Manifest("id", "v", size, "t", desc, CHUNK_BYTES, refs)
    refs = [None if r == "00" * 32 else r for r in refs]
    got = Manifest.decode(m.encode())
    assert list(got.chunks) == refs and got.size_bytes == size and got.description == desc


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_manifest_decode_arbitrary_bytes(raw: bytes) -> None:
    try:
        Manifest.decode(MANIFEST_MAGIC + raw)
    except ChunkCorrupt:
        pass


def test_chunk_ref_matches_put() -> None:
    data = os.urandom(333)
    assert chunk_ref(data) == hashlib.sha256(data).hexdigest()
    assert chunk_ref(bytes(CHUNK_BYTES)) is None
