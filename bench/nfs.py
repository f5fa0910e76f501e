"""NFS figures for ``make bench``: 1 GiB written and read back with ``nfs-cp`` (libnfs-utils),
against the appliance's share and against NFS-Ganesha exporting a local directory, same run.

Both servers run in network namespaces this module creates (``ip netns add``, loopback only):
Ganesha needs rpcbind for NFS v3, and rpcbind will not bind to 127.0.0.1 alone, so inside a
namespace whose only interface is ``lo`` its wildcard bind reaches nothing else. rpcbind and
Ganesha also get a private mount namespace with their own ``/run`` (``unshare -m``), so a host
rpcbind, if any, is neither disturbed nor used. The appliance (``vtl serve``) runs in a second
namespace of its own, so its NFS, MOUNT and portmapper ports cannot collide with Ganesha's;
``vtl share create`` / ``vtl share list --json`` (control socket in the data directory) work
from outside. ``nfs-cp`` runs inside each namespace with ``ip netns exec``.

Each peer: write the 1 GiB source file (timed), read it back to a local file (timed), compare
SHA-256. Every process started here is stopped by its PID, and each namespace is deleted by
name, whatever happens. A figure that cannot be measured is "n/a (reason)".
MB/s are 10^6 bytes per second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20
NFS_CP_TIMEOUT = 900.0
GANESHA_NFS_PORT = 2049
GANESHA_MNT_PORT = 20048

Log = Callable[[str], None]


class Unavailable(Exception):
    """A peer cannot be set up; the message is the reason shown as n/a."""


@dataclass
class Peer:
    name: str
    url: str | None = None  # nfs://127.0.0.1/<export>/<file>?version=3[&nfsport=..&mountport=..]
    netns: str = ""
    na: str = ""


# --- processes and namespaces ----------------------------------------------------------------

def _run(*cmd: str, timeout: float = 60.0) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        msg = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}")
        raise Unavailable(f"{Path(cmd[0]).name} {' '.join(cmd[1:3])}: {msg.splitlines()[-1]}")
    return proc.stdout


def _stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, one process by PID (ours only: PIDs we started or were told)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return
        except ChildProcessError:  # not our child: poll for it to vanish
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _stop_popen(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def netns(name: str) -> Iterator[str]:
    """A network namespace with only ``lo`` (up); deleted on exit."""
    if os.geteuid() != 0:
        raise Unavailable("network namespaces need root")
    if shutil.which("ip") is None:
        raise Unavailable("ip (iproute2) not installed")
    _run("ip", "netns", "add", name)
    try:
        _run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        # Anything still inside (should be nothing: every process is stopped by PID first).
        left = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        for pid in left.stdout.split():
            _stop_pid(int(pid))
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _wait_tcp(ns: str, port: int, alive: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait until ``127.0.0.1:port`` inside ``ns`` accepts (probed with bash's /dev/tcp)."""
    deadline = time.monotonic() + timeout
    probe = ["ip", "netns", "exec", ns, "bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"]
    while time.monotonic() < deadline:
        if not alive():
            raise Unavailable("server exited while starting")
        if subprocess.run(probe, capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise Unavailable(f"nothing listens on port {port} after {timeout:.0f} s")


# --- NFS-Ganesha ----------------------------------------------------------------------------

GANESHA_CONF = """\
NFS_CORE_PARAM {{
    Protocols = 3;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    NFS_Port = {nfs_port};
    MNT_Port = {mnt_port};
}}
NFSV4 {{ Graceless = true; }}
EXPORT {{
    Export_Id = 1;
    Path = {path};
    Pseudo = /bench;
    Access_Type = RW;
    Squash = No_Root_Squash;
    SecType = sys;
    Protocols = 3;
    Transports = TCP;
    FSAL {{ Name = VFS; }}
}}
LOG {{ Default_Log_Level = WARN; }}
"""

# Runs inside the namespace with a private mount namespace: its own /run for rpcbind's socket
# and lock and Ganesha's files. Writes both PIDs, stops both on SIGTERM.
GANESHA_SCRIPT = """\
set -u
mount -t tmpfs vtlbench-run /run
mkdir -p /run/rpcbind /run/ganesha
rpcbind -f &
R=$!
echo "rpcbind $R" >> "$PIDS"
trap 'kill $G $R 2>/dev/null; wait; exit 0' TERM INT
for i in $(seq 50); do [ -S /run/rpcbind.sock ] && break; sleep 0.1; done
ganesha.nfsd -F -L "$WORK/ganesha.log" -f "$WORK/ganesha.conf" -p /run/ganesha/ganesha.pid &
G=$!
echo "ganesha $G" >> "$PIDS"
wait
"""


@contextmanager
def ganesha_peer(work: Path, ns: str, log: Log) -> Iterator[Peer]:
    for tool in ("ganesha.nfsd", "rpcbind", "unshare"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} not installed (apt-get install nfs-ganesha "
                              "nfs-ganesha-vfs rpcbind)")
    export = work / "ganesha-export"
    export.mkdir()
    (work / "ganesha.conf").write_text(GANESHA_CONF.format(
        nfs_port=GANESHA_NFS_PORT, mnt_port=GANESHA_MNT_PORT, path=export))
    pids = work / "ganesha.pids"
    out = open(work / "ganesha.out", "ab")
    env = {**os.environ, "PIDS": str(pids), "WORK": str(work)}
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "unshare", "--mount",
                             "--propagation", "private", "bash", "-c", GANESHA_SCRIPT],
                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    try:
        log("nfs: starting rpcbind + NFS-Ganesha in a namespace")
        _wait_tcp(ns, GANESHA_NFS_PORT, lambda: proc.poll() is None)
        _wait_tcp(ns, GANESHA_MNT_PORT, lambda: proc.poll() is None)
        # Ganesha v3 exports by their path (the pseudo path is for v4).
        yield Peer("ganesha", f"nfs://127.0.0.1{export}/bench.bin?version=3", ns)
    finally:
        children = []
        if pids.exists():
            children = [int(line.split()[1]) for line in pids.read_text().splitlines()
                        if len(line.split()) == 2 and line.split()[1].isdigit()]
        for pid in reversed(children):  # ganesha first, then rpcbind
            _stop_pid(pid)
        _stop_popen(proc)
        out.close()


# --- the appliance -------------------------------------------------------------------------

def _vtl_bin() -> str:
    candidate = Path(sys.executable).parent / "vtl"
    found = str(candidate) if candidate.exists() else shutil.which("vtl")
    if found is None:
        raise Unavailable("vtl CLI not installed")
    return found


def share_url(share: dict[str, Any], filename: str) -> str:
    """nfs:// URL of ``filename`` in a share of ``vtl share list --json`` (path, nfs_host,
    nfs_port, mount_port), with the ports explicit (no portmapper needed)."""
    try:
        path, host = str(share["path"]), str(share.get("nfs_host") or "127.0.0.1")
        nfs_port, mount_port = int(share["nfs_port"]), int(share["mount_port"])
    except (KeyError, TypeError, ValueError) as exc:
        raise Unavailable(f"share list --json lacks {exc}") from exc
    return (f"nfs://{host}/{path.strip('/')}/{filename}"
            f"?version=3&nfsport={nfs_port}&mountport={mount_port}")


@contextmanager
def appliance_peer(work: Path, ns: str, log: Log) -> Iterator[Peer]:
    vtl = _vtl_bin()
    data = work / "ours"
    data.mkdir()
    out = open(work / "vtl-serve.log", "ab")
    proc = subprocess.Popen(["ip", "netns", "exec", ns, vtl, "serve", "--data-dir", str(data),
                             "--listen", "127.0.0.1:3260", "--log-level", "warning"],
                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        log("nfs: starting the appliance in a namespace")
        _wait_tcp(ns, 3260, lambda: proc.poll() is None)
        d = ("--data-dir", str(data))
        for attempt in range(20):
            try:
                _run(vtl, "share", "create", *d, "--name", "bench", timeout=120)
                break
            except Unavailable as exc:
                if "no appliance answers" not in str(exc) or attempt == 19:
                    raise
                time.sleep(0.5)
        shares = json.loads(_run(vtl, "share", "list", *d, "--json"))
        share = next((s for s in shares if isinstance(s, dict) and s.get("name") == "bench"),
                     None)
        if share is None:
            raise Unavailable("share list --json does not show the share")
        url = share_url(share, "bench.bin")
        yield Peer("ours", url, ns)
    finally:
        _stop_popen(proc)
        out.close()


# --- measuring ---------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _nfs_cp(ns: str, src: str, dst: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(["ip", "netns", "exec", ns, "nfs-cp", src, dst], capture_output=True,
                          text=True, timeout=NFS_CP_TIMEOUT)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        msg = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}")
        raise Unavailable(f"nfs-cp: {msg.splitlines()[-1][:80]}")
    return elapsed


def _make_source(path: Path, size_mb: int) -> str:
    """``size_mb`` MiB of incompressible bytes (a random MiB, each copy stamped with its index)."""
    base = bytearray(os.urandom(MiB))
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(size_mb):
            base[:8] = i.to_bytes(8, "big")
            f.write(base)
            h.update(base)
    return h.hexdigest()


def _round_trip(peer: Peer, src: Path, digest: str, nbytes: int, work: Path,
                log: Log) -> dict[str, float | str]:
    if peer.url is None:
        return {"write": peer.na, "read": peer.na}
    out: dict[str, float | str] = {}
    try:
        log(f"nfs: {peer.name}: nfs-cp write {nbytes // MiB} MiB")
        out["write"] = nbytes / _nfs_cp(peer.netns, str(src), peer.url) / 1e6
        back = work / f"back-{peer.name}.bin"
        log(f"nfs: {peer.name}: nfs-cp read {nbytes // MiB} MiB")
        out["read"] = nbytes / _nfs_cp(peer.netns, peer.url, str(back)) / 1e6
        if back.stat().st_size != nbytes or _sha256(back) != digest:
            out["read"] = "read back differs"
        back.unlink()
    except (Unavailable, subprocess.TimeoutExpired, OSError) as exc:
        out.setdefault("write", _short(exc))
        out.setdefault("read", _short(exc))
    return out


def _short(exc: BaseException, limit: int = 70) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def measure(size_mb: int = 1024, log: Log = print) -> dict[str, Any]:
    """Return {"bytes", "ours": {"write", "read"}, "ganesha": {...}}: MB/s or a reason."""
    result: dict[str, Any] = {"bytes": size_mb * MiB}
    if shutil.which("nfs-cp") is None:
        reason = "nfs-cp not installed (apt-get install libnfs-utils)"
        return {**result, "ours": {"write": reason, "read": reason},
                "ganesha": {"write": reason, "read": reason}}
    tag = f"vtlbench-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="vtl-bench-nfs-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        os.chmod(work, 0o755)  # Ganesha's export lives below it
        src = work / "source.bin"
        log(f"nfs: writing a {size_mb} MiB source file")
        digest = _make_source(src, size_mb)
        peers: list[Peer] = []
        for name, start in (("ours", appliance_peer), ("ganesha", ganesha_peer)):
            try:
                ns = stack.enter_context(netns(f"{tag}-{name}"))
                peers.append(stack.enter_context(start(work, ns, log)))
            except (Unavailable, OSError, subprocess.SubprocessError, ValueError) as exc:
                peers.append(Peer(name, na=_short(exc)))
        for peer in peers:
            result[peer.name] = _round_trip(peer, src, digest, size_mb * MiB, work, log)
    return result


def _cell(value: float | str) -> str:
    return f"{value:,.1f}" if isinstance(value, float) else f"n/a ({value})"


def _ratio(a: float | str, b: float | str) -> str:
    return f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) and b > 0 else "-"


def render(r: dict[str, Any]) -> str:
    """Markdown table: figure, ours, NFS-Ganesha, ratio."""
    size = f"{r['bytes'] / MiB:.0f} MiB"
    rows = [("figure", "ours", "NFS-Ganesha (VFS)", "ours/ganesha")]
    for key, label in (("write", f"nfs-cp write {size}, NFS v3 (MB/s)"),
                       ("read", f"nfs-cp read {size}, NFS v3 (MB/s)")):
        a, b = r["ours"][key], r["ganesha"][key]
        rows.append((label, _cell(a), _cell(b), _ratio(a, b)))
    from bench.run import markdown_table

    return markdown_table(rows)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    print(render(measure(size, log=lambda m: print(m, file=sys.stderr, flush=True))))
