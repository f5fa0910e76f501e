"""Tapes in the object store (vtl.cloud.tapestore) on every backend: LocalStore, moto
(mock_aws) and a moto server over HTTP. Segments, manifest, storage classes, restore states."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.cloud.conftest import Harness
from vtl.cloud import tapestore as ts
from vtl.cloud.store import ObjectArchived, StorageClass
from vtl.library.cartridge import Cartridge

SEG = 64 * 1024  # tiny segments: several per tape


def write_tape(path: Path, blocks: list[bytes]) -> None:
    cart = Cartridge.create(path, "TS0001", 100 << 30, segment_size=SEG)
    for b in blocks:
        cart.write_block(b)
    cart.write_filemarks(1)
    cart.close()


def read_tape(path: Path) -> list[bytes]:
    out = []
    with Cartridge.open(path, segment_size=SEG) as cart:
        while (obj := cart.read_next()) is not None:
            if obj.is_filemark:
                break
            out.append(obj.data)
    return out


def test_sealed_then_final_upload_archive_restore_download(store: Harness, tmp_path: Path) -> None:
    s = store.store
    tape = tmp_path / "tape"
    blocks = [os.urandom(20_000) for _ in range(12)]
    write_tape(tape, blocks)
    segs = ts.local_segments(tape)
    assert len(segs) >= 3
    seen: list[int] = []

    partial = ts.upload_tape(s, "TS0001", tape, final=False, progress=seen.append)
    assert [e.name for e in partial.segments] == [p.name for p in segs[:-1]]
    assert not partial.complete and seen and seen[-1] == partial.cloud_bytes
    full = ts.upload_tape(s, "TS0001", tape, final=True)
    assert full.complete and len(full.segments) == len(segs)
    assert full.cloud_bytes == sum(p.stat().st_size - 32 for p in segs)
    assert ts.load_manifest(s, "TS0001") == full
    # idempotent: nothing changed, nothing re-read or re-uploaded, same manifest
    assert ts.upload_tape(s, "TS0001", tape, final=True) == full

    assert ts.transition_tape(s, full, StorageClass.GLACIER) == []
    key = ts.segment_key("TS0001", segs[0].name)
    assert s.head_object(key).storage_class is StorageClass.GLACIER
    if store.kind != "moto-server":
        with pytest.raises(ObjectArchived):
            s.get_object(key)
    ts.request_restores(s, full, days=7)
    store.finish_restores()
    assert ts.restores_done(s, full)

    back = tmp_path / "back"
    ts.download_tape(s, full, back)
    assert read_tape(back) == blocks


def test_overwrite_reuploads_and_drops_stale_objects(store: Harness, tmp_path: Path) -> None:
    s = store.store
    tape = tmp_path / "tape"
    write_tape(tape, [os.urandom(20_000) for _ in range(12)])
    first = ts.upload_tape(s, "TS0001", tape, final=True)
    with Cartridge.open(tape, segment_size=SEG) as cart:  # rewind and overwrite: shorter tape
        cart.rewind()
        cart.write_block(b"new data")
        cart.write_filemarks(1)
    second = ts.upload_tape(s, "TS0001", tape, final=True)
    assert len(second.segments) == 1 < len(first.segments)
    keys = {e.key for e in s.list_objects("tapes/TS0001/")}  # type: ignore[union-attr]
    assert keys == {ts.manifest_key("TS0001"), ts.segment_key("TS0001", "seg-000000.dat")}
    back = tmp_path / "back"
    ts.download_tape(s, second, back)
    assert read_tape(back) == [b"new data"]


def test_manifest_is_versioned_json(tmp_path: Path) -> None:
    m = ts.Manifest("AB12345", {"barcode": "AB12345"},
                    (ts.SegmentEntry("seg-000000.dat", 132, 7, 1),), True)
    assert ts.Manifest.decode(m.encode()) == m
    with pytest.raises(ValueError):
        ts.Manifest.decode(b'{"format": "vtl-tape-manifest", "version": 99}')


def test_evict_then_hydrate_with_ranged_gets(store: Harness, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    s = store.store
    tape = tmp_path / "tape"
    blocks = [os.urandom(20_000) for _ in range(12)]
    write_tape(tape, blocks)
    manifest = ts.upload_tape(s, "TS0001", tape, final=False)
    segs = ts.local_segments(tape)
    freed = sum(ts.evict_segment(tape / e.name, e) for e in manifest.segments)
    assert freed == sum(e.size for e in manifest.segments) > 0
    assert ts.local_segments(tape) == segs[-1:]  # only the open last segment stays
    assert len(ts.evicted_stubs(tape)) == len(manifest.segments)
    ranges: list[tuple[int, int]] = []
    real_get = s.get_object

    def spy(key: str, *, byte_range: tuple[int, int] | None = None) -> bytes:
        if byte_range is not None:
            ranges.append(byte_range)
        return real_get(key, byte_range=byte_range)

    monkeypatch.setattr(ts, "RANGE_SIZE", 16 * 1024)
    monkeypatch.setattr(s, "get_object", spy)
    assert ts.hydrate_tape(s, "TS0001", tape) == freed
    assert len(ranges) > len(manifest.segments)  # several ranges per segment
    assert ts.local_segments(tape) == segs and ts.evicted_stubs(tape) == []
    assert read_tape(tape) == blocks
    # hydrated segments match their manifest entries again: nothing to upload
    assert ts.upload_tape(s, "TS0001", tape, final=False) == manifest
    # and an upload while segments are evicted keeps their objects and entries
    for e in manifest.segments:
        ts.evict_segment(tape / e.name, e)
    again = ts.upload_tape(s, "TS0001", tape, final=True)
    assert again.complete and again.segments[:-1] == manifest.segments


def test_a_changed_segment_is_not_evicted(tmp_path: Path) -> None:
    tape = tmp_path / "tape"
    write_tape(tape, [os.urandom(20_000) for _ in range(6)])
    seg = ts.local_segments(tape)[0]
    entry = ts.SegmentEntry(seg.name, seg.stat().st_size, 0, seg.stat().st_mtime_ns + 1)
    assert ts.evict_segment(seg, entry) == 0 and seg.exists()


def test_restore_states_gate_the_download(store: Harness, tmp_path: Path) -> None:
    if store.hold_restore is None:
        pytest.skip("the HTTP moto server cannot hold a restore ongoing")
    s = store.store
    tape = tmp_path / "tape"
    write_tape(tape, [os.urandom(20_000) for _ in range(6)])
    manifest = ts.upload_tape(s, "TS0001", tape, final=True)
    ts.transition_tape(s, manifest, StorageClass.DEEP_ARCHIVE)
    assert not ts.restores_done(s, manifest)  # archived, no restore asked for
    ts.request_restores(s, manifest, days=1)
    for seg in manifest.segments:
        store.hold_restore(ts.segment_key("TS0001", seg.name))
    assert not ts.restores_done(s, manifest)  # ongoing
    with pytest.raises(ObjectArchived):
        ts.download_tape(s, manifest, tmp_path / "early")
    store.finish_restores()
    assert ts.restores_done(s, manifest)
    ts.download_tape(s, manifest, tmp_path / "back")
    assert len(read_tape(tmp_path / "back")) == 6


def test_upload_stops_between_segments_when_the_appliance_stops(tmp_path: Path) -> None:
    from vtl.cloud.local import LocalStore

    s = LocalStore(tmp_path / "store", durable=False)
    tape = tmp_path / "tape"
    write_tape(tape, [os.urandom(20_000) for _ in range(12)])
    calls = iter([False, True])
    with pytest.raises(ts.Stopped):
        ts.upload_tape(s, "TS0001", tape, final=True, stopping=lambda: next(calls, True))
    assert ts.load_manifest(s, "TS0001") is None  # no manifest names a missing segment
    assert ts.upload_tape(s, "TS0001", tape, final=True).complete  # the next run finishes
