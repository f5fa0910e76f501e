"""Start and stop tgt (Linux SCSI target framework) as an independent reference peer on 127.0.0.1.

``TgtPeer`` runs ``tgtd -f`` as a child process in its own session with its own control socket
(``tgtd -C N``) and state directory, then builds with ``tgtadm``:

- a disk target ``<prefix>:disk`` with LUN 1 on a fallocated file (``bstype rdwr``);
- a tape library laid out like AWS Storage Gateway: ``<prefix>:mediachanger`` (changer on LUN 1,
  INQUIRY "STK L700") and ``<prefix>:tapedrive-NN`` (one IBM ULT3580-TD5 drive on LUN 1 each),
  thin cartridges made with ``tgtimg``. Element addresses: medium transport 1, import/export
  10.., drives 100.. (element 100 + i is drive target i + 1), storage 1000.. (tapes first).
  LUN 0 of every target is tgt's own controller LUN.

With ``tuned=True`` (the default) every target gets the iSCSI parameters AWS advises for tape
gateways, so a comparison against tgt is against a fairly configured peer.

Invariants: tgtd is only ever signalled by the PID this module started; ``stop()`` runs in every
exit path (context manager, start-up failure) and leaves no tgtd behind.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = ["TgtPeer", "TgtUnavailable", "ensure_tgt", "free_port", "TUNED_PARAMS"]

TUNED_PARAMS: dict[str, str] = {
    "MaxRecvDataSegmentLength": "262144",
    "MaxXmitDataSegmentLength": "262144",
    "FirstBurstLength": "262144",
    "MaxBurstLength": "1048576",
    "InitialR2T": "No",
    "ImmediateData": "Yes",
}

PICKER_ADDRESS = 1
IE_START = 10
DRIVE_START = 100
SLOT_START = 1000
EXTRA_SLOTS = 4


class _PortLost(RuntimeError):
    """tgtd could not bind its portal: another process took the port first."""


class TgtUnavailable(RuntimeError):
    """tgt is not installed and could not be installed (or we are not root)."""


def ensure_tgt(install: bool = True) -> None:
    """Make sure tgtd, tgtadm and tgtimg exist, installing Debian's ``tgt`` package if allowed."""
    missing = [t for t in ("tgtd", "tgtadm", "tgtimg") if shutil.which(t) is None]
    if not missing:
        return
    if not install:
        raise TgtUnavailable(f"{', '.join(missing)} not found")
    if os.geteuid() != 0:
        raise TgtUnavailable(f"{', '.join(missing)} not found and not root to apt-get install tgt")
    if shutil.which("apt-get") is None:
        raise TgtUnavailable(f"{', '.join(missing)} not found and no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "tgt"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or shutil.which("tgtd") is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise TgtUnavailable("apt-get install tgt failed: " + " | ".join(tail))


def free_port(low: int = 13300, high: int = 13399, host: str = "127.0.0.1") -> int:
    """A TCP port in [low, high] that nothing listens on right now (tried in random order, so
    that concurrent runs rarely race for the same one)."""
    ports = list(range(low, high + 1))
    random.shuffle(ports)
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}..{high}")


@dataclass(frozen=True)
class LunRef:
    """One iSCSI target name and LUN on the peer's portal."""

    iqn: str
    lun: int


@dataclass
class TgtPeer:
    """A running tgtd with a disk LUN and/or a VTL; use as a context manager.

    ``chap=(user, secret)`` requires CHAP on every target; ``mutual_chap=(user, secret)`` makes
    the targets authenticate themselves to the initiator as well.
    """

    port: int = 0
    disk_mb: int = 0
    vtl: bool = True
    drives: int = 10
    tapes: int = 12
    tape_mb: int = 4096
    ie: int = 2
    tuned: bool = True
    iqn_prefix: str = "iqn.2025-01.org.vtl.bench.tgt"
    state_root: str | None = None
    install: bool = True
    host: str = "127.0.0.1"
    chap: tuple[str, str] | None = None
    mutual_chap: tuple[str, str] | None = None
    state_dir: Path = field(init=False)
    control: int = field(init=False, default=-1)
    pid: int | None = field(init=False, default=None)
    _proc: subprocess.Popen[bytes] | None = field(init=False, default=None, repr=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(init=False, default=None, repr=False)
    _tids: list[int] = field(init=False, default_factory=list, repr=False)

    # -- layout --------------------------------------------------------------------------------

    @property
    def portal(self) -> str:
        """``host:port`` of the iSCSI portal."""
        return f"{self.host}:{self.port}"

    @property
    def disk(self) -> LunRef:
        """The disk LUN."""
        return LunRef(f"{self.iqn_prefix}:disk", 1)

    @property
    def changer(self) -> LunRef:
        """The media changer LUN."""
        return LunRef(f"{self.iqn_prefix}:mediachanger", 1)

    def drive(self, index: int) -> LunRef:
        """Drive ``index`` (0-based) LUN; its element address is ``drive_address(index)``."""
        return LunRef(f"{self.iqn_prefix}:tapedrive-{index + 1:02d}", 1)

    @staticmethod
    def drive_address(index: int) -> int:
        """Element address of drive ``index`` (0-based)."""
        return DRIVE_START + index

    @staticmethod
    def slot_address(index: int) -> int:
        """Element address of storage slot ``index`` (0-based); tape ``index`` starts there."""
        return SLOT_START + index

    @staticmethod
    def barcode(index: int) -> str:
        """Barcode of tape ``index`` (0-based)."""
        return f"TGT{index + 1:03d}L5"

    def url(self, ref: LunRef) -> str:
        """``iscsi://`` URL of a LUN on this peer."""
        return f"iscsi://{self.portal}/{ref.iqn}/{ref.lun}"

    # -- lifetime ------------------------------------------------------------------------------

    def __enter__(self) -> TgtPeer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        """Start tgtd and configure the targets; on any failure stop what was started.

        With ``port=0`` a free port of 13300-13399 is chosen, and another one if tgtd loses
        the race for it to a concurrent process.
        """
        if not self.vtl and not self.disk_mb:
            raise ValueError("nothing to serve: give vtl=True and/or disk_mb > 0")
        ensure_tgt(self.install)
        if self.port:
            self._start_once()
            return
        for attempt in range(5):
            self.port = free_port()
            try:
                self._start_once()
                return
            except _PortLost:
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=f"vtl-bench-tgt-{self.port}-",
                                                dir=self.state_root)
        self.state_dir = Path(self._tmp.name)
        try:
            self.control = self._pick_control()
            log = open(self.state_dir / "tgtd.log", "ab")
            try:
                self._proc = subprocess.Popen(
                    ["tgtd", "-f", "-C", str(self.control), "--iscsi", f"portal={self.portal}"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True)
            finally:
                log.close()
            self.pid = self._proc.pid
            (self.state_dir / "tgtd.pid").write_text(f"{self.pid}\n")
            self._wait_ready()
            self._configure()
        except BaseException:
            self.stop()
            raise

    def _pick_control(self) -> int:
        """A tgtd control instance number nobody answers on (derived from the port)."""
        for k in range(20):
            candidate = self.port + 100000 * k
            if not Path(f"/var/run/tgtd/socket.{candidate}").exists() or not self._ctl_busy(candidate):
                return candidate
        raise RuntimeError(f"no free tgtd control number near {self.port}")

    @staticmethod
    def _ctl_busy(control: int) -> bool:
        proc = subprocess.run(["tgtadm", "-C", str(control), "--op", "show", "--mode", "sys"],
                              capture_output=True, timeout=10)
        return proc.returncode == 0

    def _wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self.log_tail()
                error = _PortLost if "Address already in use" in tail else RuntimeError
                raise error(f"tgtd exited during start-up (rc={self._proc.returncode}): {tail}")
            if self._ctl_busy(self.control):
                # tgtd keeps running when it cannot bind the portal (and then listens on its
                # default 0.0.0.0:3260 instead): that start-up is a failure, not a peer.
                if "failed to create/bind to portal" in self.log_tail(50):
                    raise _PortLost(f"tgtd could not bind {self.portal}: {self.log_tail(3)}")
                if self._listening():
                    return
            time.sleep(0.1)
        raise RuntimeError(f"tgtd not ready within {timeout} s: {self.log_tail()}")

    def _listening(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def log_tail(self, lines: int = 10) -> str:
        """Last lines of tgtd's log, for error messages."""
        try:
            text = (self.state_dir / "tgtd.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def tgtadm(self, *args: str) -> str:
        """Run ``tgtadm -C <control> --lld iscsi ARGS``; raise with its message on failure."""
        cmd = ["tgtadm", "-C", str(self.control), "--lld", "iscsi", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def _new_target(self, tid: int, iqn: str) -> None:
        self.tgtadm("--mode", "target", "--op", "new", "--tid", str(tid), "--targetname", iqn)
        self._tids.append(tid)

    def _lu_update(self, tid: int, lun: int, params: str) -> None:
        self.tgtadm("--mode", "logicalunit", "--op", "update", "--tid", str(tid), "--lun", str(lun),
                    "--params", params)

    def _tgtimg(self, path: Path, barcode: str, size_mb: int) -> None:
        subprocess.run(["tgtimg", "--op", "new", "--device-type", "tape", "--barcode", barcode,
                        "--size", str(size_mb), "--type", "data", "--file", str(path),
                        "--thin-provisioning"], check=True, capture_output=True, timeout=60)

    def _configure(self) -> None:
        tid = 0
        if self.vtl:
            tapes_dir = self.state_dir / "tapes"
            tapes_dir.mkdir()
            (tapes_dir / "smc").write_bytes(bytes(1024))
            for i in range(self.tapes):
                self._tgtimg(tapes_dir / self.barcode(i), self.barcode(i), self.tape_mb)
            tid += 1
            changer_tid = tid
            self._new_target(changer_tid, self.changer.iqn)
            drive_tids: list[int] = []
            for d in range(self.drives):
                tid += 1
                drive_tids.append(tid)
                self._new_target(tid, self.drive(d).iqn)
                placeholder = tapes_dir / f"notape{d + 1}"
                self._tgtimg(placeholder, f"NOTAPE{d + 1:02d}", 1)
                self.tgtadm("--mode", "logicalunit", "--op", "new", "--tid", str(tid), "--lun", "1",
                            "--backing-store", str(placeholder), "--device-type", "tape")
                self._lu_update(tid, 1, "vendor_id=IBM,product_id=ULT3580-TD5,product_rev=0001,"
                                        f"removable=1,scsi_sn=DRV{d + 1:07d}")
                self._lu_update(tid, 1, "online=0")
            self.tgtadm("--mode", "logicalunit", "--op", "new", "--tid", str(changer_tid), "--lun", "1",
                        "--backing-store", str(tapes_dir / "smc"), "--device-type", "changer")
            self._lu_update(changer_tid, 1, "vendor_id=STK,product_id=L700,product_rev=0001,"
                                            "removable=1,scsi_sn=CHG0000001")
            self._lu_update(changer_tid, 1, f"media_home={tapes_dir}")
            self._lu_update(changer_tid, 1, f"element_type=1,start_address={PICKER_ADDRESS},quantity=1")
            self._lu_update(changer_tid, 1,
                            f"element_type=4,start_address={DRIVE_START},quantity={self.drives}")
            for d, dtid in enumerate(drive_tids):
                self._lu_update(changer_tid, 1,
                                f"element_type=4,address={self.drive_address(d)},tid={dtid},lun=1")
            if self.ie:
                self._lu_update(changer_tid, 1,
                                f"element_type=3,start_address={IE_START},quantity={self.ie}")
            self._lu_update(changer_tid, 1, f"element_type=2,start_address={SLOT_START},"
                                            f"quantity={self.tapes + EXTRA_SLOTS}")
            for i in range(self.tapes):
                self._lu_update(changer_tid, 1, f"element_type=2,address={self.slot_address(i)},"
                                                f"barcode={self.barcode(i)},sides=1")
        if self.disk_mb:
            tid += 1
            image = self.state_dir / "disk.img"
            with open(image, "wb") as f:
                try:
                    os.posix_fallocate(f.fileno(), 0, self.disk_mb << 20)
                except OSError:
                    f.truncate(self.disk_mb << 20)
            self._new_target(tid, self.disk.iqn)
            self.tgtadm("--mode", "logicalunit", "--op", "new", "--tid", str(tid), "--lun", "1",
                        "--backing-store", str(image), "--bstype", "rdwr")
            self._lu_update(tid, 1, "scsi_sn=DSK0000001")
        for user, password, outgoing in self._accounts():
            self.tgtadm("--mode", "account", "--op", "new", "--user", user, "--password", password)
            for t in self._tids:
                self.tgtadm("--mode", "account", "--op", "bind", "--tid", str(t), "--user", user,
                            *(["--outgoing"] if outgoing else []))
        for t in self._tids:
            if self.tuned:
                for name, value in TUNED_PARAMS.items():
                    self.tgtadm("--mode", "target", "--op", "update", "--tid", str(t),
                                "--name", name, "--value", value)
            self.tgtadm("--mode", "target", "--op", "bind", "--tid", str(t),
                        "--initiator-address", "ALL")

    def _accounts(self) -> list[tuple[str, str, bool]]:
        """(user, password, outgoing) CHAP accounts to bind to every target."""
        accounts: list[tuple[str, str, bool]] = []
        if self.chap is not None:
            accounts.append((*self.chap, False))
        if self.mutual_chap is not None:
            if self.chap is None:
                raise ValueError("mutual_chap needs chap")
            accounts.append((*self.mutual_chap, True))
        return accounts

    def show(self) -> str:
        """``tgtadm --mode target --op show`` of this instance."""
        return self.tgtadm("--mode", "target", "--op", "show")

    def alive(self) -> bool:
        """True while our tgtd process runs."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Take the targets offline, ask tgtd to exit, then SIGTERM/SIGKILL our PID only."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                for args in (["--op", "update", "--mode", "sys", "--name", "State", "-v", "offline"],
                             ["--op", "delete", "--mode", "system"]):
                    subprocess.run(["tgtadm", "-C", str(self.control), *args],
                                   capture_output=True, timeout=10)
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=3)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(timeout=10)
        finally:
            self.pid = None
            self._tids.clear()
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None
