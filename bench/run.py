"""``make bench``: the appliance against tgt, same initiator, same machine, same run.

Both peers are started here on free ports of 127.0.0.1 (13300-13399): tgt through ``bench.tgt``
with the tuned iSCSI parameters, the appliance through its CLI (``vtl serve``). Every figure is
measured through the ctypes libiscsi initiator of ``tests.support.libiscsi``:

- disk LUN: sequential 1 MiB WRITE(10) then READ(10) over ``--size-mb``; 4 KiB random READ(10) at
  queue depth 16 (a fixed count);
- tape: one drive writing then reading ``--size-mb`` in 64 KiB, 256 KiB and 1 MiB variable blocks;
  4 and 10 drives writing 1 MiB blocks at once, one process per drive (aggregate MB/s);
  8 KiB WRITE(6) latency at queue depth 1 (median and p99).

A figure that cannot be measured is reported as "n/a (reason)", never a crash. Each figure has a
time budget; one cut short by it is computed from the work done and marked with "~".
The cloud figure (bench/cloud.py): upload of a 2 GiB tape to a moto S3 server by the archive
pipeline against a plain boto3 multipart upload of the same bytes (ratio); `--only cloud`.
The NFS figures (bench/nfs.py): 1 GiB written and read with nfs-cp against the appliance's share
and against NFS-Ganesha, each in a loopback-only network namespace (ratios); `--only nfs`.

The report is printed and appended to bench/RESULTS.md. MB/s are 10^6 bytes per second.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import platform
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (make bench: python bench/run.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import cached as cached_bench  # noqa: E402
from bench.tgt import TgtPeer, TgtUnavailable, free_port  # noqa: E402
from tests.support.libiscsi import (
    Command,
    LibiscsiError,
    Result,
    ScsiStatusError,
    Status,
    Session,
    library_available,
    parse_element_status,
    run_queue_depth,
)

MiB = 1 << 20
BENCH_INITIATOR = "iqn.2025-01.org.vtl.bench:initiator"
RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
BLOCK_SIZES = (64 * 1024, 256 * 1024, MiB)
MULTI_DRIVES = (4, 10)
LATENCY_COUNT = 3000
QD_COUNT = 20000
QD_DEPTH = 16


# ---------------------------------------------------------------------------------------------
# figures


@dataclass(frozen=True)
class NA:
    """A figure that could not be measured, with the reason."""

    reason: str

    def __str__(self) -> str:
        return f"n/a ({self.reason})"


@dataclass(frozen=True)
class Figure:
    """One measured value; ``partial`` when the time budget cut the run short."""

    value: float
    partial: bool = False


Outcome = Figure | NA


@dataclass(frozen=True)
class Spec:
    """A row of the report: label, unit, and whether higher is better."""

    key: str
    label: str
    unit: str
    higher_is_better: bool = True
    group: str = "disk"


def _specs(size_mb: int) -> list[Spec]:
    specs = [
        Spec("disk_seq_write", f"disk seq write 1 MiB x {size_mb} MiB", "MB/s"),
        Spec("disk_seq_read", f"disk seq read 1 MiB x {size_mb} MiB", "MB/s"),
        Spec("disk_rand_read_qd16", f"disk 4 KiB random read QD{QD_DEPTH} x {QD_COUNT}", "IOPS"),
    ]
    for bs in BLOCK_SIZES:
        specs.append(Spec(f"tape_write_{bs}", f"tape write {_kib(bs)} blocks x {size_mb} MiB",
                          "MB/s", group="tape"))
        specs.append(Spec(f"tape_read_{bs}", f"tape read {_kib(bs)} blocks x {size_mb} MiB",
                          "MB/s", group="tape"))
    for n in MULTI_DRIVES:
        specs.append(Spec(f"tape_multi_{n}", f"tape {n} drives write 1 MiB x {_multi_mb(size_mb)} "
                                             "MiB each (aggregate)", "MB/s", group="tape"))
    for key, label, unit in cached_bench.ROWS:
        size = f" x {size_mb} MiB" if unit == "MB/s" else f" x {QD_COUNT}"
        specs.append(Spec(key, f"{label}{size} (vs tgt disk)", unit))
    specs.append(Spec("tape_lat_p50", "tape WRITE(6) 8 KiB QD1 median", "us", False, "tape"))
    specs.append(Spec("tape_lat_p99", "tape WRITE(6) 8 KiB QD1 p99", "us", False, "tape"))
    return specs


def _kib(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // 1024} KiB"


def _multi_mb(size_mb: int) -> int:
    return max(16, size_mb // 4)


class Budget:
    """A deadline for one figure."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def over(self) -> bool:
        """True once the deadline has passed."""
        return time.monotonic() > self.deadline


# ---------------------------------------------------------------------------------------------
# endpoints of one peer


@dataclass
class Endpoints:
    """Where one peer's LUNs are, or why they are missing."""

    name: str
    disk: str | None = None
    changer: str | None = None
    drives: list[str] = field(default_factory=list)
    disk_na: str = "not configured"
    tape_na: str = "not configured"
    alive: Callable[[], bool] = lambda: True
    cached: dict[str, str] = field(default_factory=dict)  # cached volume name -> URL
    cached_na: str = "not configured"
    vtl: str | None = None
    data_dir: str | None = None


# ---------------------------------------------------------------------------------------------
# disk figures


def _mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else 0.0


def _block_payload(base: bytes, index: int) -> bytes:
    """A distinct payload per block so no peer can deduplicate the stream."""
    return struct.pack(">Q", index) + base[8:]


_DISK_ERRORS = (LibiscsiError, ScsiStatusError, OSError, ValueError)


class DiskRig:
    """The disk figures of one peer, one step at a time, each step with its own session (an idle
    session could miss the target's NOP-In pings while the other peer is measured)."""

    def __init__(self, ep: Endpoints, size_mb: int, budget_s: float) -> None:
        self.ep = ep
        self.size_mb = size_mb
        self.budget_s = budget_s
        self.written_mib = 0
        self.na: NA | None = None if ep.disk else NA(ep.disk_na)

    def _session(self) -> Session:
        assert self.ep.disk is not None
        return Session(self.ep.disk, initiator_name=BENCH_INITIATOR)

    def seq_write(self) -> dict[str, Outcome]:
        """1 MiB WRITE(10)s from LBA 0."""
        if self.na:
            return {"disk_seq_write": self.na}
        try:
            with self._session() as s:
                blocks, bs = s.capacity()
                per_mib = MiB // bs
                total = min(self.size_mb, blocks // per_mib)
                if total < 1:
                    self.na = NA(f"LUN too small ({blocks * bs} bytes)")
                    return {"disk_seq_write": self.na}
                base = os.urandom(MiB)
                budget = Budget(self.budget_s)
                done = 0
                t0 = time.perf_counter()
                for i in range(total):
                    s.write10(i * per_mib, _block_payload(base, i), block_size=bs).check()
                    done += 1
                    if budget.over():
                        break
                elapsed = time.perf_counter() - t0
                self.written_mib = done
                return {"disk_seq_write": Figure(_mbps(done * MiB, elapsed), done < total)}
        except _DISK_ERRORS as exc:
            self.na = NA(_short(exc))
            return {"disk_seq_write": self.na}

    def seq_read(self) -> dict[str, Outcome]:
        """1 MiB READ(10)s of what ``seq_write`` wrote, each checked."""
        if self.na:
            return {"disk_seq_read": self.na}
        try:
            with self._session() as s:
                _, bs = s.capacity()
                per_mib = MiB // bs
                budget = Budget(self.budget_s)
                done = 0
                t0 = time.perf_counter()
                for i in range(self.written_mib):
                    data = s.read10(i * per_mib, per_mib, block_size=bs).check().data
                    if data[:8] != struct.pack(">Q", i):
                        raise ValueError(f"READ(10) of MiB {i} returned other data than written")
                    done += 1
                    if budget.over():
                        break
                elapsed = time.perf_counter() - t0
                return {"disk_seq_read": Figure(_mbps(done * MiB, elapsed), done < self.written_mib)}
        except _DISK_ERRORS as exc:
            return {"disk_seq_read": NA(_short(exc))}

    def random_read(self) -> dict[str, Outcome]:
        """4 KiB READ(10)s at random offsets of the written range, QD16."""
        if self.na:
            return {"disk_rand_read_qd16": self.na}
        try:
            with self._session() as s:
                _, bs = s.capacity()
                outcome = _random_reads(s, self.written_mib * (MiB // bs), bs, self.budget_s)
                return {"disk_rand_read_qd16": outcome}
        except _DISK_ERRORS as exc:
            return {"disk_rand_read_qd16": NA(_short(exc))}


def _offset(factory: Callable[[int], Command], base: int, i: int) -> Command:
    return factory(base + i)


def _random_reads(s: Session, nblocks: int, bs: int, budget_s: float) -> Outcome:
    per4k = max(1, 4096 // bs)
    slots = nblocks // per4k
    if slots < 1:
        return NA("nothing written to read")
    rng = random.Random(42)
    lbas = [rng.randrange(slots) * per4k for _ in range(QD_COUNT)]

    def factory(i: int) -> Command:
        return Command(struct.pack(">BBIBHB", 0x28, 0, lbas[i], 0, per4k, 0), expect_in=per4k * bs)

    budget = Budget(budget_s)
    done = 0
    chunk = 2000
    t0 = time.perf_counter()
    while done < QD_COUNT and not budget.over():
        n = min(chunk, QD_COUNT - done)
        report = run_queue_depth(s, functools.partial(_offset, factory, done), n, QD_DEPTH)
        if report.first_failure is not None:
            return NA(f"READ failed: {report.first_failure.describe()}")
        done += n
    return Figure(done / (time.perf_counter() - t0), done < QD_COUNT)


def _cached_figures(rig: DiskRig) -> dict[str, Outcome]:
    """The cached-volume figures on the appliance; on tgt, the disk's random write (the
    comparison figure the disk steps do not measure)."""
    ep = rig.ep
    if ep.name != "ours":
        if rig.na or not ep.disk:
            return {"disk_rand_write_qd16": rig.na or NA(ep.disk_na)}
        try:
            return {"disk_rand_write_qd16": cached_bench.random_writes(
                ep.disk, BENCH_INITIATOR, rig.written_mib * (MiB // 512), QD_COUNT, QD_DEPTH,
                rig.budget_s, Figure, NA)}
        except _DISK_ERRORS as exc:
            return {"disk_rand_write_qd16": NA(_short(exc))}
    if not ep.cached or ep.vtl is None or ep.data_dir is None:
        return dict.fromkeys(cached_bench.TGT_FIGURE, NA(ep.cached_na))
    vtl, data_dir = ep.vtl, ep.data_dir

    def factory(url: str) -> DiskRig:
        return DiskRig(Endpoints("ours", disk=url), rig.size_mb, rig.budget_s)

    def drained(name: str) -> None:
        cached_bench.wait_drained(_run_cli, vtl, data_dir, name)

    def write(url: str, mib: int) -> Outcome:
        return cached_bench.random_writes(url, BENCH_INITIATOR, mib * (MiB // 512), QD_COUNT,
                                          QD_DEPTH, rig.budget_s, Figure, NA)

    try:
        return cached_bench.measure_ours(factory, ep.cached, drained, write,
                                         lambda m: print(f"bench: {m}", file=sys.stderr))
    except (*_DISK_ERRORS, RuntimeError, subprocess.SubprocessError) as exc:
        return dict.fromkeys(cached_bench.TGT_FIGURE, NA(_short(exc)))


# ---------------------------------------------------------------------------------------------
# tape figures


@dataclass
class Library:
    """Element addresses of a changer found with READ ELEMENT STATUS, one type at a time."""

    transport: int
    drives: list[int]
    sources: list[int]  # full storage or import/export elements
    empty_slots: list[int]


def discover_library(changer: Session) -> Library:
    """Query element types 1-4 separately (type 0 can crash tgt) and sort them out."""
    found: dict[int, list[Any]] = {}
    for etype in (1, 2, 3, 4):
        result = changer.read_element_status(element_type=etype, alloc=256 * 1024)
        found[etype] = parse_element_status(result.data) if result.good else []
    transport = found[1][0].address if found[1] else 0
    drives = sorted(e.address for e in found[4])
    sources = [e.address for e in found[2] + found[3] if e.full]
    empty = [e.address for e in found[2] if not e.full]
    return Library(transport, drives, sources, empty)


def _wait_ready(s: Session, tries: int = 50) -> None:
    """TEST UNIT READY until GOOD (a freshly loaded drive may report UNIT ATTENTION)."""
    for _ in range(tries):
        if s.test_unit_ready().good:
            return
        time.sleep(0.1)
    s.test_unit_ready().check()


def tape_stream(url: str, block: int, total: int, budget_s: float) -> tuple[Outcome, Outcome]:
    """Write ``total`` bytes in ``block``-byte variable blocks from BOT + a filemark, then read."""
    with Session(url, initiator_name=BENCH_INITIATOR) as s:
        _wait_ready(s)
        s.rewind().check()
        base = os.urandom(block)
        count = total // block
        budget = Budget(budget_s)
        done = 0
        t0 = time.perf_counter()
        for i in range(count):
            s.write6(_block_payload(base, i)).check()
            done += 1
            if budget.over():
                break
        s.write_filemarks(1).check()
        write = Figure(_mbps(done * block, time.perf_counter() - t0), done < count)
        s.rewind().check()
        budget = Budget(budget_s)
        got = 0
        t0 = time.perf_counter()
        for i in range(done):
            r = s.read6(block, sili=True)
            if not r.good or len(r.data) != block:
                return write, NA(f"READ(6) block {i}: {r.describe()}")
            if r.data[:8] != struct.pack(">Q", i):
                return write, NA(f"READ(6) block {i} returned other data than written")
            got += 1
            if budget.over():
                break
        read = Figure(_mbps(got * block, time.perf_counter() - t0), got < done)
        return write, read


def _drive_worker(url: str, initiator: str, nbytes: int, block: int, budget_s: float,
                  barrier: Any, results: Any) -> None:
    """One process per drive: rewind, wait for the others, stream 1 MiB blocks, report."""
    try:
        with Session(url, initiator_name=initiator) as s:
            _wait_ready(s)
            s.rewind().check()
            base = os.urandom(block)
            barrier.wait(timeout=60)
            budget = Budget(budget_s)
            t0 = time.monotonic()
            done = 0
            for i in range(nbytes // block):
                s.write6(_block_payload(base, i)).check()
                done += block
                if budget.over():
                    break
            s.write_filemarks(1).check()
            results.put(("ok", t0, time.monotonic(), done, done < nbytes))
    except BaseException as exc:  # reported to the parent, which decides
        try:
            barrier.abort()
        finally:
            results.put(("error", 0.0, 0.0, 0, _short(exc)))


def multi_drive(urls: list[str], nbytes: int, budget_s: float) -> Outcome:
    """Aggregate MB/s of ``len(urls)`` drives writing at once, one process each."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(urls))
    results = ctx.Queue()
    procs = [ctx.Process(target=_drive_worker,
                         args=(url, f"{BENCH_INITIATOR}-{i}", nbytes, MiB, budget_s, barrier, results),
                         daemon=True) for i, url in enumerate(urls)]
    try:
        for p in procs:
            p.start()
        reports = [results.get(timeout=budget_s + 60) for _ in procs]
    except Exception as exc:
        return NA(f"drive workers: {_short(exc)}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    errors = [r[4] for r in reports if r[0] == "error"]
    if errors:
        return NA(str(errors[0]))
    start = min(r[1] for r in reports)
    end = max(r[2] for r in reports)
    return Figure(_mbps(sum(r[3] for r in reports), end - start), any(r[4] for r in reports))


def latency(url: str, budget_s: float) -> tuple[Outcome, Outcome]:
    """Median and p99 of 8 KiB WRITE(6) at QD1, in microseconds: each command is one call into
    libiscsi's synchronous API (its poll loop runs in C), so the figure is the target and the
    loopback more than our Python initiator."""
    cdb = bytes([0x0A, 0]) + (8192).to_bytes(3, "big") + bytes(1)
    with Session(url, initiator_name=BENCH_INITIATOR) as s:
        _wait_ready(s)
        s.rewind().check()
        payload = os.urandom(8192)
        samples: list[float] = []
        budget = Budget(budget_s)
        for i in range(LATENCY_COUNT):
            data = _block_payload(payload, i)
            t0 = time.perf_counter_ns()
            status = s.command_status(cdb, data)
            samples.append((time.perf_counter_ns() - t0) / 1000)
            if status != Status.GOOD:
                raise ScsiStatusError(Result(status))
            if budget.over():
                break
        s.write_filemarks(1).check()
    partial = len(samples) < LATENCY_COUNT
    p99 = statistics.quantiles(samples, n=100)[98] if len(samples) >= 100 else max(samples)
    return Figure(statistics.median(samples), partial), Figure(p99, partial)


_TAPE_ERRORS = (LibiscsiError, ScsiStatusError, OSError)


class TapeRig:
    """The tape figures of one peer, step by step: ``setup`` loads a tape into the first drive,
    ``multi`` loads more as needed, ``teardown`` puts them all back. The changer session is
    opened per step."""

    def __init__(self, ep: Endpoints, size_mb: int, budget_s: float) -> None:
        self.ep = ep
        self.size_mb = size_mb
        self.budget_s = budget_s
        self.lib: Library | None = None
        self.moves: list[tuple[int, int]] = []  # (drive, source)
        self.na: NA | None = None if ep.changer and ep.drives else NA(ep.tape_na)

    def _changer(self) -> Session:
        assert self.ep.changer is not None
        return Session(self.ep.changer, initiator_name=BENCH_INITIATOR)

    def _load(self, count: int) -> int:
        """Load tapes into drives 0..count-1 as far as tapes go; returns drives loaded."""
        assert self.lib is not None
        with self._changer() as changer:
            while len(self.moves) < min(count, len(self.lib.drives)) and self.lib.sources:
                src = self.lib.sources.pop(0)
                dst = self.lib.drives[len(self.moves)]
                changer.move_medium(src, dst, self.lib.transport).check()
                self.moves.append((dst, src))
        return len(self.moves)

    def setup(self) -> dict[str, Outcome]:
        """Discover the library and load drive 1; on failure every tape figure is n/a."""
        if self.na:
            return {}
        try:
            with self._changer() as changer:
                self.lib = discover_library(changer)
            if not self.lib.drives:
                self.na = NA("no drive elements")
            elif not self.lib.sources:
                self.na = NA("no tapes in the library")
            elif self._load(1) < 1:
                self.na = NA("could not load a tape")
        except _TAPE_ERRORS as exc:
            self.na = NA(_short(exc))
        return {}

    def stream(self, block: int) -> dict[str, Outcome]:
        """Single-drive write then read of ``--size-mb`` in ``block``-byte blocks."""
        keys = (f"tape_write_{block}", f"tape_read_{block}")
        if self.na:
            return dict.fromkeys(keys, self.na)
        try:
            w, r = tape_stream(self.ep.drives[0], block, self.size_mb * MiB, self.budget_s)
        except _TAPE_ERRORS as exc:
            w = r = NA(_short(exc))
        return {keys[0]: w, keys[1]: r}

    def multi(self, n: int) -> dict[str, Outcome]:
        """``n`` drives writing 1 MiB blocks at once."""
        key = f"tape_multi_{n}"
        if self.na:
            return {key: self.na}
        if len(self.ep.drives) < n:
            return {key: NA(f"only {len(self.ep.drives)} drives")}
        try:
            loaded = self._load(n)
        except _TAPE_ERRORS as exc:
            return {key: NA(f"loading tapes: {_short(exc)}")}
        if loaded < n:
            return {key: NA(f"only {loaded} tapes could be loaded")}
        return {key: multi_drive(self.ep.drives[:n], _multi_mb(self.size_mb) * MiB, self.budget_s)}

    def latency(self) -> dict[str, Outcome]:
        """8 KiB WRITE(6) at QD1 on drive 1."""
        if self.na:
            return {"tape_lat_p50": self.na, "tape_lat_p99": self.na}
        try:
            p50, p99 = latency(self.ep.drives[0], self.budget_s)
        except _TAPE_ERRORS as exc:
            p50 = p99 = NA(_short(exc))
        return {"tape_lat_p50": p50, "tape_lat_p99": p99}

    def teardown(self) -> dict[str, Outcome]:
        """Best effort: put every tape back where it came from."""
        if not self.moves or self.lib is None:
            return {}
        try:
            with self._changer() as changer:
                for drive, src in reversed(self.moves):
                    changer.move_medium(drive, src, self.lib.transport)
        except _TAPE_ERRORS:
            pass  # the figures are what matters; the peer is thrown away anyway
        self.moves.clear()
        return {}


def _short(exc: BaseException, limit: int = 70) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# peers


@contextmanager
def tgt_peer(size_mb: int, want_disk: bool, want_tape: bool) -> Iterator[Endpoints]:
    """tgt, tuned, with a disk LUN and a 10-drive VTL of 12 thin tapes."""
    ep = Endpoints("tgt")
    if os.geteuid() != 0:
        ep.disk_na = ep.tape_na = "tgtd needs root"
        yield ep
        return
    peer = TgtPeer(0, disk_mb=max(64, size_mb) if want_disk else 0, vtl=want_tape,
                   drives=10, tapes=12, tape_mb=max(1024, 4 * size_mb), tuned=True)
    try:
        peer.start()
    except (TgtUnavailable, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        ep.disk_na = ep.tape_na = f"tgt: {_short(exc)}"
        yield ep
        return
    try:
        if want_disk:
            ep.disk = peer.url(peer.disk)
        if want_tape:
            ep.changer = peer.url(peer.changer)
            ep.drives = [peer.url(peer.drive(d)) for d in range(peer.drives)]
        ep.alive = peer.alive
        yield ep
    finally:
        peer.stop()


def _vtl_bin() -> str | None:
    candidate = Path(sys.executable).parent / "vtl"
    if candidate.exists():
        return str(candidate)
    return shutil.which("vtl")


def _run_cli(vtl: str, *args: str, timeout: float = 120) -> str:
    proc = subprocess.run([vtl, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        msg = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()
        raise RuntimeError(f"vtl {args[0]} {args[1] if len(args) > 1 else ''}: {msg[-1]}")
    return proc.stdout


def _targets(doc: Any, path: str = "") -> Iterator[tuple[str, str, int]]:
    """(context words, target_iqn, lun) for every object in a JSON document with a target_iqn."""
    if isinstance(doc, dict):
        if isinstance(doc.get("target_iqn"), str):
            words = " ".join([path, *(str(v) for v in doc.values() if isinstance(v, str))])
            lun = doc.get("lun", 0)
            yield words.lower(), doc["target_iqn"], int(lun) if isinstance(lun, int) else 0
        for k, v in doc.items():
            yield from _targets(v, f"{path} {k}")
    elif isinstance(doc, list):
        for v in doc:
            yield from _targets(v, path)


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vtl serve exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"vtl serve not listening on {port} after {timeout:.0f} s")


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM then SIGKILL this one process (by PID), waiting for it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _create_with_retry(vtl: str, *args: str, tries: int = 20) -> str:
    """Run a CLI command, retrying while the control socket is not up yet."""
    for attempt in range(tries):
        try:
            return _run_cli(vtl, *args)
        except RuntimeError as exc:
            if "no appliance answers" not in str(exc) or attempt == tries - 1:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


@contextmanager
def appliance_peer(size_mb: int, want_disk: bool, want_tape: bool, workdir: Path
                   ) -> Iterator[Endpoints]:
    """The appliance through its CLI (``vtl serve``, then ``vtl volume``/``tape`` against it);
    whatever does not work yet becomes n/a with the CLI's own one-line error."""
    ep = Endpoints("ours")
    vtl = _vtl_bin()
    if vtl is None:
        ep.disk_na = ep.tape_na = "vtl CLI not installed"
        yield ep
        return
    data = workdir / "ours"
    data.mkdir()
    port = free_port()
    log_path = workdir / "vtl-serve.log"
    log = open(log_path, "ab")
    try:
        # NFS/MOUNT/portmapper on ports of their own choice: an appliance or another bench
        # already holding 2049/20048/111 must not stop this one (the figures are iSCSI's)
        proc = subprocess.Popen([vtl, "serve", "--data-dir", str(data), "--listen",
                                 f"127.0.0.1:{port}", "--nfs-port", "0", "--mount-port", "0",
                                 "--portmap-port", "0"], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        log.close()
        ep.disk_na = ep.tape_na = f"vtl serve: {_short(exc)}"
        yield ep
        return
    try:
        try:
            _wait_port(port, proc)
        except RuntimeError as exc:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            ep.disk_na = ep.tape_na = _short(RuntimeError(f"{exc}: {tail[0]}"), 90)
            yield ep
            return
        portal = f"127.0.0.1:{port}"
        d = ("--data-dir", str(data))
        if want_disk:
            try:
                gib = max(1, -(-size_mb // 1024))
                _create_with_retry(vtl, "volume", "create", *d, "--name", "bench", "--size", f"{gib}GiB")
                vols = json.loads(_run_cli(vtl, "volume", "list", *d, "--json"))
                found = [t for t in _targets(vols) if "bench" in t[0]] or list(_targets(vols))
                if found:
                    ep.disk = f"iscsi://{portal}/{found[0][1]}/{found[0][2]}"
                else:
                    ep.disk_na = "volume list shows no target_iqn"
            except (RuntimeError, ValueError, OSError, subprocess.SubprocessError) as exc:
                ep.disk_na = _short(exc)
            try:
                made = cached_bench.create_volumes(_run_cli, vtl, str(data), size_mb)
                ep.cached = {n: f"iscsi://{portal}/{iqn}/0" for n, iqn in made.items()}
                ep.vtl, ep.data_dir = vtl, str(data)
            except (RuntimeError, ValueError, KeyError, OSError,
                    subprocess.SubprocessError) as exc:
                ep.cached_na = _short(exc)
        if want_tape:
            try:
                for count in (10, 2):  # at most 10 tapes per call
                    _create_with_retry(vtl, "tape", "create", *d, "--prefix", "BN",
                                       "--count", str(count), "--size", "100GiB")
                status = json.loads(_run_cli(vtl, "library", "status", *d, "--json"))
                targets = list(_targets(status))
                changers = [t for t in targets if "changer" in t[0]]
                drives = sorted({(t[1], t[2]) for t in targets
                                 if "drive" in t[0] and t not in changers})
                if changers and drives:
                    ep.changer = f"iscsi://{portal}/{changers[0][1]}/{changers[0][2]}"
                    ep.drives = [f"iscsi://{portal}/{iqn}/{lun}" for iqn, lun in drives]
                else:
                    ep.tape_na = "library status lists no changer/drive target_iqn"
            except (RuntimeError, ValueError, OSError, subprocess.SubprocessError) as exc:
                ep.tape_na = _short(exc)
        ep.alive = lambda: proc.poll() is None
        yield ep
    finally:
        _stop_process(proc)
        log.close()


# ---------------------------------------------------------------------------------------------
# report


def machine() -> str:
    """nproc, CPU model and kernel, for the results file."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs, {model}, Linux {platform.release()}, Python {platform.python_version()}"


def _fmt(o: Outcome | None, unit: str) -> str:
    if o is None:
        return "-"
    if isinstance(o, NA):
        return str(o)
    digits = 1 if unit == "MB/s" else 0
    return f"{'~' if o.partial else ''}{o.value:,.{digits}f}"


def _ratio(ours: Outcome | None, theirs: Outcome | None) -> str:
    if isinstance(ours, Figure) and isinstance(theirs, Figure) and theirs.value > 0:
        return f"{ours.value / theirs.value:.2f}"
    return "-"


def render(specs: list[Spec], ours: dict[str, Outcome], theirs: dict[str, Outcome]) -> str:
    """The markdown table: figure, ours, tgt, ratio."""
    rows = [("figure", "ours", "tgt (tuned)", "ours/tgt")]
    for spec in specs:
        if spec.key not in ours and spec.key not in theirs:
            continue
        better = "" if spec.higher_is_better else ", lower is better"
        rows.append((f"{spec.label} ({spec.unit}{better})", _fmt(ours.get(spec.key), spec.unit),
                     _fmt(theirs.get(spec.key), spec.unit),
                     _ratio(ours.get(spec.key), theirs.get(spec.key))))
    return markdown_table(rows)


def markdown_table(rows: list[tuple[str, ...]]) -> str:
    """Rows (the first is the header) as an aligned markdown table, figures right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 1) + (":" if i else "-")
                                        for i, w in enumerate(widths)) + "|")
    return "\n".join(lines)


def append_results(path: Path, table: str, args: argparse.Namespace, elapsed: float,
                   load: tuple[float, float]) -> None:
    """Append this run (date, machine, options, table) to RESULTS.md."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = "" if path.exists() else (
        "# Benchmark results\n\nAppended by `make bench` (`python -m bench`); see bench/README.md "
        "for what each figure measures. `~` marks a figure cut short by its time budget.\n")
    section = (f"\n## {stamp}\n\n- machine: {machine()}\n"
               f"- options: size {args.size_mb} MiB, only {args.only or 'all'}, peers {args.peers}, "
               f"budget {args.budget_s:.0f} s per figure, NFS {args.nfs_mb} MiB; "
               f"run took {elapsed:.0f} s\n"
               f"- 1-minute load average: {load[0]:.2f} before, {load[1]:.2f} after "
               f"(above the CPU count the figures are noisy)\n\n{table}\n")
    with open(path, "a", encoding="utf-8") as f:
        f.write(header + section)


# ---------------------------------------------------------------------------------------------
# main


Step = Callable[[], dict[str, Outcome]]


def plan(rigs: list[tuple[DiskRig | None, TapeRig | None]]) -> list[tuple[str, list[Step]]]:
    """The steps in order; each step lists one call per peer, run back to back, so that a change
    of background load on a shared machine hits both peers alike."""
    steps: list[tuple[str, list[Step]]] = []
    disks = [d for d, _ in rigs if d is not None]
    tapes = [t for _, t in rigs if t is not None]
    if disks:
        steps += [("disk seq write", [d.seq_write for d in disks]),
                  ("disk seq read", [d.seq_read for d in disks]),
                  ("disk random read", [d.random_read for d in disks]),
                  ("cached volume", [functools.partial(_cached_figures, d) for d in disks])]
    if tapes:
        steps.append(("tape setup", [t.setup for t in tapes]))
        for bs in BLOCK_SIZES:
            steps.append((f"tape {_kib(bs)} blocks",
                          [functools.partial(t.stream, bs) for t in tapes]))
        for n in MULTI_DRIVES:
            steps.append((f"tape {n} drives", [functools.partial(t.multi, n) for t in tapes]))
        steps.append(("tape latency", [t.latency for t in tapes]))
    return steps


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("disk", "tape", "cloud", "nfs"),
                   help="measure only the disk, the tape, the cloud upload or the NFS figures")
    p.add_argument("--nfs-mb", type=int, default=1024,
                   help="MiB written and read by nfs-cp for the NFS figures (default 1024)")
    p.add_argument("--cloud-mb", type=int, default=2048,
                   help="MiB of the tape uploaded for the cloud figure (default 2048)")
    p.add_argument("--size-mb", type=int, default=512,
                   help="MiB per sequential figure (default 512; multi-drive: a quarter per drive)")
    p.add_argument("--peers", default="ours,tgt", help="comma list of ours,tgt (default both)")
    p.add_argument("--budget-s", type=float, default=30.0,
                   help="time budget per figure in seconds (default 30)")
    p.add_argument("--results", type=Path, default=RESULTS_PATH, help="results file to append to")
    p.add_argument("--no-results", action="store_true", help="print only, do not append RESULTS.md")
    args = p.parse_args(argv)
    if args.size_mb < 16:
        p.error("--size-mb must be at least 16")
    peers = {x.strip() for x in args.peers.split(",") if x.strip()}
    if not peers or peers - {"ours", "tgt"}:
        p.error("--peers takes ours and/or tgt")
    args.peer_set = peers
    return args


def _cloud_figure(args: argparse.Namespace, log: Callable[[str], None]) -> str:
    """The cloud upload figure (bench/cloud.py), or "n/a (reason)"."""
    from bench import cloud

    try:
        return cloud.render(cloud.measure(args.cloud_mb, log=log))
    except Exception as exc:  # a figure that cannot be measured says why
        return f"| cloud upload | n/a ({_short(exc)}) |"


def _nfs_figure(args: argparse.Namespace, log: Callable[[str], None]) -> str:
    """The NFS table (bench/nfs.py): ours against NFS-Ganesha, or "n/a (reason)"."""
    from bench import nfs

    try:
        return nfs.render(nfs.measure(args.nfs_mb, log=log))
    except Exception as exc:  # a figure that cannot be measured says why
        return f"| nfs-cp write/read | n/a ({_short(exc)}) |"


def _cloud_only(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    table = _cloud_figure(args, log) if args.only == "cloud" else _nfs_figure(args, log)
    print(table)
    if not args.no_results:
        append_results(args.results, table, args, time.monotonic() - started,
                       (load_before, os.getloadavg()[0]))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 0 even when figures are n/a (they say why)."""
    args = parse_args(argv)
    if not library_available():
        print("bench: libiscsi.so.7 not found: apt-get install libiscsi7", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    if args.only in ("cloud", "nfs"):
        return _cloud_only(args, log)
    want_disk = args.only in (None, "disk")
    want_tape = args.only in (None, "tape")
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    results: dict[str, dict[str, Outcome]] = {"ours": {}, "tgt": {}}
    with tempfile.TemporaryDirectory(prefix="vtl-bench-") as tmp, ExitStack() as stack:
        peers: list[Endpoints] = []
        if "ours" in args.peer_set:
            log("starting the appliance")
            peers.append(stack.enter_context(
                appliance_peer(args.size_mb, want_disk, want_tape, Path(tmp))))
        if "tgt" in args.peer_set:
            log("starting tgt")
            peers.append(stack.enter_context(tgt_peer(args.size_mb, want_disk, want_tape)))
        rigs = [(DiskRig(ep, args.size_mb, args.budget_s) if want_disk else None,
                 TapeRig(ep, args.size_mb, args.budget_s) if want_tape else None) for ep in peers]
        try:
            for label, calls in plan(rigs):
                for ep, call in zip(peers, calls):
                    if not ep.alive():
                        log(f"{ep.name}: target process died")
                    log(f"{ep.name}: {label}")
                    results[ep.name].update(call())
        finally:
            for _, tape in rigs:
                if tape is not None:
                    tape.teardown()
    elapsed = time.monotonic() - started
    for key, tgt_key in cached_bench.TGT_FIGURE.items():  # cached rows compare with tgt's disk
        if tgt_key in results["tgt"]:
            results["tgt"][key] = results["tgt"][tgt_key]
    specs = [s for s in _specs(args.size_mb) if args.only is None or s.group == args.only]
    table = render(specs, results["ours"], results["tgt"])
    if args.only is None:
        table += "\n\n" + _cloud_figure(args, log)
        table += "\n\n" + _nfs_figure(args, log)
    print(table)
    if not args.no_results:
        append_results(args.results, table, args, elapsed, (load_before, os.getloadavg()[0]))
        log(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
