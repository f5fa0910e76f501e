"""Cached-volume figures of ``make bench``: the appliance's cached volume against tgt's disk LUN.

Two cached volumes on the appliance, both written the same way and drained (every chunk in the
object store, the upload buffer empty) before they are read:

- ``bench-warm``: cache larger than what is written, so reads hit the local cache;
- ``bench-cold``: the smallest cache (16 MiB), so almost every read fetches its 1 MiB chunk from
  the store (the embedded directory store under the data dir) and verifies its SHA-256.

Figures (each against the same kind of figure on tgt's disk LUN, whose file lives in the page
cache: tgt has no cold case, so both cached rows compare against the same tgt number):
1 MiB sequential write; 1 MiB sequential read warm and cold; 4 KiB random read at QD16 warm and
cold; 4 KiB random write at QD16 (tgt's random write is measured here too, after its sequential
write, on the same range).
"""

from __future__ import annotations

import functools
import json
import random
import struct
import time
from collections.abc import Callable
from typing import Any

from tests.support.libiscsi import Command, Session, run_queue_depth

MiB = 1 << 20

#: (key, label, unit) of the rows, in report order.
ROWS: list[tuple[str, str, str]] = [
    ("cached_seq_write", "cached volume seq write 1 MiB", "MB/s"),
    ("cached_seq_read_warm", "cached volume seq read 1 MiB, cache warm", "MB/s"),
    ("cached_seq_read_cold", "cached volume seq read 1 MiB, cache cold", "MB/s"),
    ("cached_rand_read_warm", "cached volume 4 KiB random read QD16, cache warm", "IOPS"),
    ("cached_rand_read_cold", "cached volume 4 KiB random read QD16, cache cold", "IOPS"),
    ("cached_rand_write", "cached volume 4 KiB random write QD16", "IOPS"),
]

#: Which tgt disk figure each row is compared with.
TGT_FIGURE = {
    "cached_seq_write": "disk_seq_write",
    "cached_seq_read_warm": "disk_seq_read",
    "cached_seq_read_cold": "disk_seq_read",
    "cached_rand_read_warm": "disk_rand_read_qd16",
    "cached_rand_read_cold": "disk_rand_read_qd16",
    "cached_rand_write": "disk_rand_write_qd16",
}


def create_volumes(run_cli: Callable[..., str], vtl: str, data_dir: str, size_mb: int
                   ) -> dict[str, str]:
    """Create the two cached volumes; return {name: target_iqn}."""
    gib = max(1, -(-size_mb // 1024))
    warm_cache = max(64, size_mb + 64)
    out = {}
    for name, cache in (("bench-warm", f"{warm_cache}MiB"), ("bench-cold", "16MiB")):
        vol = json.loads(run_cli(vtl, "volume", "create", name, "--type", "cached", "--size",
                                 f"{gib}GiB", "--cache-size", cache, "--upload-buffer-size",
                                 f"{max(256, size_mb + 64)}MiB", "--data-dir", data_dir,
                                 "--json"))
        out[name] = vol["target_iqn"]
    return out


def wait_drained(run_cli: Callable[..., str], vtl: str, data_dir: str, name: str,
                 timeout: float = 300.0) -> None:
    """Until every chunk written to ``name`` is in the store (upload buffer empty)."""
    deadline = time.monotonic() + timeout
    while True:
        info = json.loads(run_cli(vtl, "volume", "show", name, "--data-dir", data_dir, "--json"))
        if not info.get("upload_buffer_used_bytes"):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: upload buffer not drained after {timeout:.0f} s")
        time.sleep(0.2)


def random_writes(url: str, initiator: str, nblocks: int, count: int, depth: int,
                  budget_s: float, figure: Callable[..., Any], na: Callable[[str], Any]) -> Any:
    """4 KiB WRITE(10)s at random 4 KiB-aligned offsets of the first ``nblocks`` blocks."""
    with Session(url, initiator_name=initiator) as s:
        _, bs = s.capacity()
        per4k = max(1, 4096 // bs)
        slots = nblocks // per4k
        if slots < 1:
            return na("nothing written to overwrite")
        rng = random.Random(43)
        lbas = [rng.randrange(slots) * per4k for _ in range(count)]
        payload = random.Random(44).randbytes(per4k * bs)

        def factory(base: int, i: int) -> Command:
            lba = lbas[base + i]
            return Command(struct.pack(">BBIBHB", 0x2A, 0, lba, 0, per4k, 0),
                           data_out=struct.pack(">Q", lba) + payload[8:])

        deadline = time.monotonic() + budget_s
        done = 0
        t0 = time.perf_counter()
        while done < count and time.monotonic() < deadline:
            n = min(2000, count - done)
            report = run_queue_depth(s, functools.partial(factory, done), n, depth)
            if report.first_failure is not None:
                return na(f"WRITE failed: {report.first_failure.describe()}")
            done += n
        return figure(done / (time.perf_counter() - t0), done < count)


def _one(outcomes: dict[str, Any]) -> Any:
    """The single outcome of a DiskRig step."""
    return next(iter(outcomes.values())) if outcomes else None


def measure_ours(rig_factory: Callable[[str], Any], urls: dict[str, str],
                 drained: Callable[[str], None], write: Callable[[str, int], Any],
                 log: Callable[[str], None]) -> dict[str, Any]:
    """Run the cached figures on the appliance with ``DiskRig``s made by ``rig_factory(url)``."""
    out: dict[str, Any] = {}
    warm = rig_factory(urls["bench-warm"])
    cold = rig_factory(urls["bench-cold"])
    log("ours: cached volume seq write (warm cache)")
    out["cached_seq_write"] = _one(warm.seq_write())
    log("ours: cached volume seq write (cold cache), draining both")
    cold.seq_write()
    drained("bench-warm")
    drained("bench-cold")
    log("ours: cached volume reads")
    out["cached_seq_read_warm"] = _one(warm.seq_read())
    out["cached_seq_read_cold"] = _one(cold.seq_read())
    drained("bench-cold")
    out["cached_rand_read_warm"] = _one(warm.random_read())
    out["cached_rand_read_cold"] = _one(cold.random_read())
    log("ours: cached volume random write")
    out["cached_rand_write"] = write(urls["bench-warm"], warm.written_mib)
    return out


__all__ = ["ROWS", "TGT_FIGURE", "create_volumes", "measure_ours", "random_writes",
           "wait_drained"]
