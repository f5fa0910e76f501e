"""Drive workers: tape drives served by their own processes (the process-pool engine).

Process tree: ``vtl serve`` (the supervisor: listener, login, control API, changer, catalog)
and N drive workers, ``python -m vtl.engine.workers``, each owning some tape drives
(drive *i* goes to worker *i mod N*). A worker owns its drives' cartridges (it opens, writes,
fsyncs and closes them) and serves the iSCSI connections of its drive targets with the same
sans-I/O :class:`~vtl.iscsi.connection.IscsiConnection`, resumed from the state the supervisor
negotiated at login, each connection in its own thread (:mod:`vtl.iscsi.threads`: blocking
``recv_into``/``sendmsg``, no event loop on the data path). The event loop of a worker only
serves the channel and the throughput sampler; a drive is touched under its target's lock,
by its connection thread or by the channel (load, unload, status).

Channel: one ``AF_UNIX``/``SOCK_SEQPACKET`` socketpair per worker; every message is one JSON
object (datagram boundaries frame it). The supervisor asks, the worker answers between SCSI
commands; the worker never speaks first:

- ``{"op": "adopt", "state": SessionState, "out": b64, "in": b64}`` + one descriptor (the TCP
  socket, ``socket.send_fds``): serve this logged-in connection; no answer.
- ``{"id": n, "op": "hello"}``, ``"load"`` (drive, path, read_only), ``"unload"`` (drive,
  force), ``"status"``, ``"shutdown"``: answered by ``{"id": n, "ok": true, ...}`` or
  ``{"id": n, "ok": false, "sense": [key, asc, ascq]}`` / ``{"id": n, "ok": false, "error": s}``.

Invariants:

- The supervisor never opens a cartridge that sits in a remote drive (cartridges are flocked;
  :class:`~vtl.library.library.CartridgeRef` names it instead). It remembers what it loaded into
  each drive, so a worker that dies is restarted and gets the same tapes loaded again; the
  cartridge recovers on open to its last intact record, which includes every durability point.
  The initiator sees its TCP connection drop (the kernel closes it with the process) and logs
  in again.
- A worker exits when its channel closes (the supervisor died): it flushes and closes its
  cartridges first. It ignores SIGINT (the terminal's Ctrl-C is the supervisor's business).
- Calls have timeouts; a worker that does not answer is treated as unavailable (HARDWARE ERROR
  for the changer command that needed it), never waited on forever.

Memory bound of a worker (per session): the iSCSI receive buffer (<= one PDU, 256 KiB + 48),
the data of commands queued in the session (<= ``WORKER_SESSION_DATA``, 32 MiB; an initiator
streaming at queue depth 1 uses one block), four pooled write buffers of the block size, one
READ's data (sends block: nothing queues behind a peer that reads slowly) and the connection
thread's stack; per loaded cartridge, the read-ahead buffer (<= max(1 MiB, one record + 64
bytes)), 8 bytes per 64 logical objects plus 8 per filemark (the sparse index). Nothing else
grows with the bytes written.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from vtl.iscsi.connection import SessionState
from vtl.iscsi.threads import ThreadedServer
from vtl.iscsi.target import IscsiTarget, Targets
from vtl.library.cartridge import Cartridge, CartridgeError
from vtl.library.drive import TapeDrive
from vtl.library.library import CartridgeRef
from vtl.scsi.command import ScsiCommand, ScsiResult, ScsiStatus
from vtl.scsi.sense import Asc, SenseError, SenseKey
from vtl.scsi.target import ScsiTarget

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 16
RPC_TIMEOUT = 30.0
START_TIMEOUT = 60.0
MONITOR_INTERVAL = 0.2
SAMPLE_INTERVAL = 1.0
SAMPLES = 6  # throughput is averaged over the last ~5 s
WORKER_SESSION_DATA = 32 * 1024 * 1024
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s[w{slot}]: %(message)s"


def default_workers(drives: int) -> int:
    """One worker per drive, capped at twice the CPUs (at least 2): more processes than
    that only add context switches on a small machine."""
    return max(0, min(drives, max(2, 2 * (os.cpu_count() or 1))))


class WorkerUnavailable(Exception):
    """The worker is dead, restarting, or did not answer in time."""


@dataclass(frozen=True, slots=True)
class DriveSpec:
    """What a worker needs to build one drive and its target."""

    index: int
    serial: str
    target_iqn: str
    alias: str = ""


# --- wire ---------------------------------------------------------------------------------------

def send_msg(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    raw = json.dumps(msg, separators=(",", ":")).encode()
    if len(raw) > MAX_MESSAGE:
        raise ValueError("channel message too long")
    if fds:
        socket.send_fds(sock, [raw], fds)
    else:
        sock.send(raw)


def recv_msg(sock: socket.socket, flags: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the descriptors that came with it; (None, []) at end of stream."""
    raw, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 4, flags)
    if not raw:
        for fd in fds:
            os.close(fd)
        return None, []
    try:
        msg = json.loads(raw)
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise
    if not isinstance(msg, dict):
        raise ValueError("channel message is not an object")
    return msg, fds


def _sense_reply(err: SenseError) -> dict[str, Any]:
    return {"ok": False, "sense": [int(err.key), err.asc[0], err.asc[1]]}


def _sense_from(reply: dict[str, Any]) -> SenseError:
    key, asc, ascq = reply["sense"]
    return SenseError(SenseKey(key), (asc, ascq))


# --- the worker process -------------------------------------------------------------------------

class _Rate:
    """Bytes/s over the last few samples of a monotonic counter."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int, int]] = deque(maxlen=SAMPLES)

    def sample(self, now: float, written: int, read: int) -> None:
        self.samples.append((now, written, read))

    def rates(self) -> tuple[float, float]:
        if len(self.samples) < 2:
            return 0.0, 0.0
        (t0, w0, r0), (t1, w1, r1) = self.samples[0], self.samples[-1]
        dt = t1 - t0
        if dt <= 0:
            return 0.0, 0.0
        return max(0, w1 - w0) / dt, max(0, r1 - r0) / dt


class DriveWorker:
    """The worker side: drives, their targets, an iSCSI server without a listener."""

    def __init__(self, chan: socket.socket, specs: list[DriveSpec], *,
                 nop_interval: float | None = 5.0, nop_timeout: float = 15.0) -> None:
        self.chan = chan
        self.drives: dict[int, TapeDrive] = {}
        self.targets = Targets()
        for spec in specs:
            drive = TapeDrive(index=spec.index, serial=spec.serial, device_name=spec.target_iqn)
            self.drives[spec.index] = drive
            self.targets.add(IscsiTarget(name=spec.target_iqn, device=ScsiTarget({0: drive}),
                                         alias=spec.alias))
        self.server = ThreadedServer(self.targets, nop_interval=nop_interval,
                                     nop_timeout=nop_timeout,
                                     max_session_data=WORKER_SESSION_DATA, recycle_buffers=True)
        self.locks = {spec.index: self.server.lock_for(spec.target_iqn) for spec in specs}
        self.rates = {i: _Rate() for i in self.drives}
        self._stop: asyncio.Event | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        self.chan.setblocking(True)
        loop.add_reader(self.chan.fileno(), self._on_channel)
        sampler = loop.create_task(self._sample())
        try:
            await self._stop.wait()
        finally:
            sampler.cancel()
            loop.remove_reader(self.chan.fileno())
            await loop.run_in_executor(None, self.server.stop)
            self.close_drives()

    def close_drives(self) -> None:
        """Flush and close every loaded cartridge (a durability point for each)."""
        for i, drive in self.drives.items():
            try:
                with self.locks[i]:
                    drive.close()
            except Exception:
                log.exception("closing drive %d failed", drive.index)

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            for i, drive in self.drives.items():
                self.rates[i].sample(now, drive.bytes_written, drive.bytes_read)
            await asyncio.sleep(SAMPLE_INTERVAL)

    def _on_channel(self) -> None:
        try:
            msg, fds = recv_msg(self.chan, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, ValueError) as exc:
            log.error("bad message from the supervisor: %s", exc)
            return
        if msg is None:  # the supervisor is gone: flush and leave
            log.warning("supervisor channel closed; stopping")
            assert self._stop is not None
            self._stop.set()
            return
        op = msg.get("op")
        if op == "adopt":
            self._adopt(msg, fds)
            return
        for fd in fds:
            os.close(fd)
        try:
            reply = self.handle(str(op), msg)
        except SenseError as err:
            reply = _sense_reply(err)
        except Exception as exc:  # a bug: answer it, keep serving
            log.exception("worker op %s failed", op)
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        reply["id"] = msg.get("id")
        try:
            send_msg(self.chan, reply)
        except OSError as exc:
            log.error("cannot answer the supervisor: %s", exc)
        if op == "shutdown":
            assert self._stop is not None
            self._stop.set()

    def _adopt(self, msg: dict[str, Any], fds: list[int]) -> None:
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            log.error("adopt without exactly one descriptor")
            return
        try:
            state = SessionState.from_json(msg["state"])
            out = base64.b64decode(msg.get("out", ""))
            received = base64.b64decode(msg.get("in", ""))
        except (KeyError, TypeError, ValueError) as exc:
            os.close(fds[0])
            log.error("bad adopt message: %s", exc)
            return
        try:
            self.server.adopt(fds[0], state, out, received)
        except Exception:
            log.exception("cannot serve the connection for %s", state.target_name)

    def handle(self, op: str, msg: dict[str, Any]) -> dict[str, Any]:
        """One control message; a drive is touched under its lock (its connection thread may
        be executing a command)."""
        if op == "hello":
            return {"ok": True, "pid": os.getpid()}
        if op == "load":
            drive = self._drive(msg)
            with self.locks[drive.index]:
                return self._load(drive, str(msg["path"]), bool(msg.get("read_only")))
        if op == "begin_load":
            drive = self._drive(msg)
            with self.locks[drive.index]:
                drive.begin_load(str(msg["barcode"]))
            return {"ok": True}
        if op == "unload":
            drive = self._drive(msg)
            with self.locks[drive.index]:
                barcode = drive.barcode
                cart = drive.unload(force=bool(msg.get("force")))
                used = None
                if cart is not None:
                    used = cart.used_bytes
                    cart.close()
            return {"ok": True, "barcode": barcode, "used_bytes": used}
        if op == "status":
            drives = []
            for i, d in self.drives.items():
                with self.locks[i]:
                    drives.append(self._status(d))
            return {"ok": True, "drives": drives}
        if op == "shutdown":
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _drive(self, msg: dict[str, Any]) -> TapeDrive:
        drive = self.drives.get(msg.get("drive"))  # type: ignore[arg-type]
        if drive is None:
            raise KeyError(f"no drive {msg.get('drive')!r} in this worker")
        return drive

    @staticmethod
    def _load(drive: TapeDrive, path: str, read_only: bool) -> dict[str, Any]:
        try:
            cart = Cartridge.open(Path(path))
        except (CartridgeError, OSError, ValueError) as exc:
            log.error("cannot open cartridge %s: %s", path, exc)
            raise SenseError(SenseKey.MEDIUM_ERROR, Asc.MEDIUM_LOAD_OR_EJECT_FAILED) from None
        try:
            drive.load(cart, read_only=read_only)
        except BaseException:
            cart.close()
            raise
        return {"ok": True, "barcode": cart.barcode}

    def _status(self, drive: TapeDrive) -> dict[str, Any]:
        w, r = self.rates[drive.index].rates()
        return {"index": drive.index, "barcode": drive.barcode,
                "removal_prevented": drive.removal_prevented,
                "bytes_written": drive.bytes_written, "bytes_read": drive.bytes_read,
                "write_bytes_per_s": round(w), "read_bytes_per_s": round(r),
                "pid": os.getpid()}


def worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtl.engine.workers")
    parser.add_argument("--fd", type=int, required=True, help="channel socket descriptor")
    parser.add_argument("--slot", type=int, default=0)
    parser.add_argument("--spec", required=True, help="JSON list of drive specs")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--nop-interval", type=float, default=5.0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format=LOG_FORMAT.format(slot=args.slot), force=True)
    specs = [DriveSpec(**d) for d in json.loads(args.spec)]
    chan = socket.socket(fileno=args.fd)
    worker = DriveWorker(chan, specs,
                         nop_interval=args.nop_interval if args.nop_interval > 0 else None)
    try:
        asyncio.run(worker.run())
    finally:
        chan.close()
    return 0


# --- the supervisor side ------------------------------------------------------------------------

class WorkerHandle:
    """One worker process as the supervisor sees it: spawn, call, respawn."""

    def __init__(self, slot: int, specs: list[DriveSpec], *, log_level: str,
                 nop_interval: float | None) -> None:
        self.slot = slot
        self.specs = specs
        self.log_level = log_level
        self.nop_interval = nop_interval
        self.proc: subprocess.Popen[bytes] | None = None
        self.chan: socket.socket | None = None
        self.ready = False
        self.restarts = 0
        self._seq = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def spawn(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            cmd = [sys.executable, "-m", "vtl.engine.workers", "--fd", str(child.fileno()),
                   "--slot", str(self.slot), "--log-level", self.log_level,
                   "--nop-interval", str(self.nop_interval or 0),
                   "--spec", json.dumps([asdict(s) for s in self.specs])]
            self.proc = subprocess.Popen(cmd, pass_fds=[child.fileno()],
                                         stdin=subprocess.DEVNULL)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.chan = parent
        self.ready = False
        log.info("drive worker %d started (pid %d, drives %s)", self.slot, self.proc.pid,
                 ",".join(str(s.index + 1) for s in self.specs))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def call(self, op: str, timeout: float = RPC_TIMEOUT, **args: Any) -> dict[str, Any]:
        """One request/answer. Raises WorkerUnavailable, or SenseError for a sense answer."""
        chan = self.chan
        if chan is None or not self.alive() or (not self.ready and op != "hello"):
            raise WorkerUnavailable(f"drive worker {self.slot} is not running")
        self._seq += 1
        seq = self._seq
        deadline = time.monotonic() + timeout
        try:
            chan.settimeout(timeout)
            send_msg(chan, {"id": seq, "op": op, **args})
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout
                chan.settimeout(left)
                msg, fds = recv_msg(chan)
                for fd in fds:
                    os.close(fd)
                if msg is None:
                    raise WorkerUnavailable(f"drive worker {self.slot} closed its channel")
                if msg.get("id") == seq:
                    break
                log.debug("stale answer %s from worker %d", msg.get("id"), self.slot)
        except socket.timeout:
            raise WorkerUnavailable(f"drive worker {self.slot} did not answer {op} within "
                                    f"{timeout:g} s") from None
        except (OSError, ValueError) as exc:
            raise WorkerUnavailable(f"drive worker {self.slot}: {exc}") from None
        if not msg.get("ok"):
            if "sense" in msg:
                raise _sense_from(msg)
            raise WorkerUnavailable(f"drive worker {self.slot}: {msg.get('error')}")
        return msg

    def send_connection(self, fd: int, state: SessionState, to_send: bytes,
                        received: bytes) -> None:
        chan = self.chan
        if chan is None or not self.ready or not self.alive():
            raise WorkerUnavailable(f"drive worker {self.slot} is not running")
        chan.settimeout(RPC_TIMEOUT)
        send_msg(chan, {"op": "adopt", "state": state.to_json(),
                        "out": base64.b64encode(to_send).decode(),
                        "in": base64.b64encode(received).decode()}, [fd])

    def close_channel(self) -> None:
        if self.chan is not None:
            self.chan.close()
            self.chan = None
        self.ready = False

    def stop(self, timeout: float = 20.0) -> None:
        """Ask the worker to close its cartridges and exit; kill it if it does not."""
        if self.alive() and self.ready:
            try:
                self.call("shutdown", timeout=timeout)
            except (WorkerUnavailable, SenseError) as exc:
                log.warning("drive worker %d: %s", self.slot, exc)
        self.close_channel()  # EOF also tells a busy worker to leave
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("drive worker %d (pid %d) did not exit; killing it", self.slot,
                          self.proc.pid)
                self.proc.kill()
                self.proc.wait(5)


class _DetachedDevice:
    """The supervisor's stand-in for a drive served by a worker. Logins to the target hand the
    connection over, so commands never reach this; if one does (no worker), it is BUSY."""

    def execute(self, cmd: ScsiCommand) -> ScsiResult:
        return ScsiResult(ScsiStatus.BUSY)

    def has_lun(self, lun: int) -> bool:
        return lun == 0

    def reset_lun(self, lun: int) -> None:
        pass

    def reset_target(self, cold: bool) -> None:
        pass

    def nexus_lost(self, nexus: str) -> None:
        pass


class RemoteDrive:
    """The changer-facing proxy of a drive in a worker (``vtl.library.changer.Drive``)."""

    def __init__(self, index: int, handle: WorkerHandle) -> None:
        self.index = index
        self.handle = handle
        self.loaded: tuple[CartridgeRef, bool] | None = None  # what we asked the worker to hold
        self.becoming_ready: str | None = None  # a tape whose data is still being fetched

    def _hw(self, exc: Exception) -> SenseError:
        log.error("drive %d: %s", self.index + 1, exc)
        return SenseError(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)

    def load(self, cartridge: CartridgeRef, *, read_only: bool = False) -> None:
        if not isinstance(cartridge, CartridgeRef):
            raise TypeError("a remote drive loads cartridges by reference")
        try:
            self.handle.call("load", drive=self.index, path=str(cartridge.path),
                             read_only=read_only)
        except WorkerUnavailable as exc:
            raise self._hw(exc) from None
        self.loaded = (cartridge, read_only)
        self.becoming_ready = None

    def begin_load(self, barcode: str) -> None:
        try:
            self.handle.call("begin_load", drive=self.index, barcode=barcode)
        except WorkerUnavailable as exc:
            raise self._hw(exc) from None
        self.becoming_ready = barcode

    def unload(self, *, force: bool = False) -> CartridgeRef | None:
        if self.loaded is None:
            if self.becoming_ready is not None:
                self.becoming_ready = None
                try:
                    self.handle.call("unload", drive=self.index, force=True)
                except (WorkerUnavailable, SenseError) as exc:
                    log.warning("drive %d: %s", self.index + 1, exc)
            return None
        ref = self.loaded[0]
        try:
            reply = self.handle.call("unload", drive=self.index, force=force)
        except WorkerUnavailable as exc:
            if self.handle.alive() and not force:
                raise self._hw(exc) from None
            # the worker is gone (its cartridges are closed with it) or we must let go anyway
            log.warning("drive %d: unloading %s without its worker: %s", self.index + 1,
                        ref.barcode, exc)
            self.loaded = None
            return ref
        self.loaded = None
        used = reply.get("used_bytes")
        return CartridgeRef(ref.barcode, ref.path, used if isinstance(used, int) else None)

    def reload(self) -> None:
        """After a restart: put the tape back that the changer believes is in the drive."""
        if self.loaded is None:
            if self.becoming_ready is not None:
                try:
                    self.handle.call("begin_load", drive=self.index, barcode=self.becoming_ready)
                except (WorkerUnavailable, SenseError) as exc:
                    log.error("drive %d: %s", self.index + 1, exc)
            return
        ref, read_only = self.loaded
        try:
            self.handle.call("load", drive=self.index, path=str(ref.path), read_only=read_only)
        except (WorkerUnavailable, SenseError) as exc:
            log.error("drive %d: cannot reload %s after a worker restart: %s", self.index + 1,
                      ref.barcode, exc)

    def status(self) -> dict[str, Any] | None:
        try:
            reply = self.handle.call("status", timeout=5.0)
        except (WorkerUnavailable, SenseError):
            return None
        for d in reply.get("drives", []):
            if d.get("index") == self.index:
                return d
        return None

    @property
    def removal_prevented(self) -> bool:
        st = self.status()
        return bool(st and st.get("removal_prevented"))

    @property
    def barcode(self) -> str | None:
        return self.loaded[0].barcode if self.loaded is not None else None

    @property
    def bytes_written(self) -> int:
        st = self.status()
        return int(st["bytes_written"]) if st else 0

    @property
    def bytes_read(self) -> int:
        st = self.status()
        return int(st["bytes_read"]) if st else 0

    def close(self) -> None:
        pass


class WorkerPool:
    """The supervisor's drive workers: the library's DriveHost and the iSCSI Handoff."""

    def __init__(self, workers: int, *, log_level: str = "INFO",
                 nop_interval: float | None = 5.0) -> None:
        if workers < 1:
            raise ValueError("a worker pool needs at least one worker")
        self.size = workers
        self.log_level = log_level
        self.nop_interval = nop_interval
        self.handles: list[WorkerHandle] = []
        self.drives: list[RemoteDrive] = []
        self._specs: list[DriveSpec] = []
        self._by_target: dict[str, RemoteDrive] = {}
        self._monitor: asyncio.Task[None] | None = None
        self._stopping = False
        self.on_restart: Callable[[WorkerHandle], None] | None = None

    # --- DriveHost (vtl.library.library) -------------------------------------------------------
    def attach(self, index: int, serial: str, target_iqn: str, alias: str) -> None:
        """Declare drive ``index``; call before :meth:`start`."""
        self._specs.append(DriveSpec(index, serial, target_iqn, alias))

    def device(self, index: int) -> _DetachedDevice:
        return _DetachedDevice()

    def start(self) -> None:
        """Spawn the workers and wait until each answers."""
        n = min(self.size, len(self._specs)) or 1
        groups: list[list[DriveSpec]] = [[] for _ in range(n)]
        for spec in self._specs:
            groups[spec.index % n].append(spec)
        self.handles = [WorkerHandle(i, g, log_level=self.log_level,
                                     nop_interval=self.nop_interval)
                        for i, g in enumerate(groups)]
        by_index: dict[int, RemoteDrive] = {}
        for handle in self.handles:
            for spec in handle.specs:
                drive = RemoteDrive(spec.index, handle)
                by_index[spec.index] = drive
                self._by_target[spec.target_iqn] = drive
        self.drives = [by_index[s.index] for s in sorted(self._specs, key=lambda s: s.index)]
        for handle in self.handles:
            handle.spawn()
        for handle in self.handles:
            handle.call("hello", timeout=START_TIMEOUT)
            handle.ready = True

    def drive(self, index: int) -> RemoteDrive:
        for d in self.drives:
            if d.index == index:
                return d
        raise KeyError(index)

    def pids(self) -> list[int | None]:
        return [h.pid for h in self.handles]

    # --- Handoff (vtl.iscsi.server) ------------------------------------------------------------
    def wants(self, target_name: str) -> bool:
        return target_name in self._by_target

    def take(self, fd: int, state: SessionState, to_send: bytes, received: bytes) -> None:
        drive = self._by_target.get(state.target_name)
        try:
            if drive is None:
                raise WorkerUnavailable(f"no worker serves {state.target_name}")
            drive.handle.send_connection(fd, state, to_send, received)
        except (WorkerUnavailable, OSError, ValueError) as exc:
            log.warning("dropping the connection to %s: %s", state.target_name, exc)
        finally:
            os.close(fd)

    # --- supervision -------------------------------------------------------------------------------
    def start_monitor(self) -> None:
        self._monitor = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = {h.slot: 0.0 for h in self.handles}
        while not self._stopping:
            await asyncio.sleep(MONITOR_INTERVAL)
            for handle in self.handles:
                if self._stopping or handle.alive():
                    continue
                code = handle.proc.returncode if handle.proc is not None else None
                log.error("drive worker %d (pid %s) died (exit %s); restarting", handle.slot,
                          handle.pid, code)
                handle.close_channel()
                delay = backoff[handle.slot]
                if delay:
                    await asyncio.sleep(delay)
                backoff[handle.slot] = min(5.0, max(0.5, delay * 2))
                try:
                    handle.spawn()
                    await loop.run_in_executor(None, lambda: handle.call(
                        "hello", timeout=START_TIMEOUT))
                except (WorkerUnavailable, OSError) as exc:
                    log.error("drive worker %d did not start: %s", handle.slot, exc)
                    continue
                handle.ready = True
                handle.restarts += 1
                for drive in self.drives:
                    if drive.handle is handle:
                        drive.reload()
                if self.on_restart is not None:
                    self.on_restart(handle)
            for slot in backoff:
                h = self.handles[slot]
                if h.alive() and h.ready and backoff[slot]:
                    backoff[slot] = max(0.0, backoff[slot] - MONITOR_INTERVAL / 10)

    async def stop(self) -> None:
        self._stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
            try:
                await self._monitor
            except asyncio.CancelledError:
                pass
            self._monitor = None
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, h.stop) for h in self.handles),
                             return_exceptions=True)

    def status(self) -> dict[int, dict[str, Any]]:
        """Per drive index: the worker's live figures (one call per worker)."""
        out: dict[int, dict[str, Any]] = {}
        for handle in self.handles:
            try:
                reply = handle.call("status", timeout=5.0)
            except (WorkerUnavailable, SenseError):
                continue
            for d in reply.get("drives", []):
                out[int(d["index"])] = {**d, "worker": handle.slot}
        return out


if __name__ == "__main__":
    sys.exit(worker_main())
