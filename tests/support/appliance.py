"""Run a real ``vtl serve`` process for a test and talk to it.

``ApplianceProcess(data_dir).start()`` launches ``python -m cli.main serve`` on 127.0.0.1 with
port 0, so the kernel picks a free port with no race; the actual port is read back from the
control API (``DescribeGatewayInformation``). ``stop()`` sends SIGTERM and insists on exit 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from vtl.engine.control import socket_path

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Seconds allowed for start-up and for a clean stop.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind port 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def control_request(data_dir: Path, op: str, args: dict[str, Any] | None = None,
                    timeout: float = 10.0) -> dict[str, Any]:
    """Send one raw control API request; return the decoded reply (raises OSError if down)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        with socket_path(data_dir / "control.sock") as path:
            sock.connect(path)
        sock.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


class ApplianceProcess:
    """One ``vtl serve`` subprocess on a data directory."""

    def __init__(self, data_dir: Path, host: str = "127.0.0.1", port: int = 0,
                 extra_args: tuple[str, ...] | list[str] = ()) -> None:
        self.data_dir = Path(data_dir)
        self.extra_args = list(extra_args)  # more ``vtl serve`` flags (--clock-speed, --store...)
        self.host = host
        self.requested_port = port
        self.port = 0
        self.nfs_port = 0  # the file shares' NFS, MOUNT and portmapper ports once started
        self.mount_port = 0
        self.portmap_port = 0
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._runner = CliRunner()

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "ApplianceProcess":
        """Launch and wait until the control socket answers and the iSCSI port accepts TCP."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                          env.get("PYTHONPATH")]))
        env.pop("VTL_DATA_DIR", None)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--data-dir", str(self.data_dir),
             "--listen", f"{self.host}:{self.requested_port}",
             "--log-level", os.environ.get("VTL_TEST_LOG_LEVEL", "info"),
             # file shares on free ports, so concurrent test appliances never collide
             "--nfs-port", "0", "--mount-port", "0", "--portmap-port", "0", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        info: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vtl serve exited with {self.proc.returncode} at start-up:\n"
                                   f"{self.log_tail()}")
            try:
                reply = control_request(self.data_dir, "DescribeGatewayInformation")
            except (OSError, ValueError):
                time.sleep(0.05)
                continue
            info = reply.get("result")
            break
        if info is None:
            self.kill()
            raise RuntimeError(f"vtl serve did not answer within {START_TIMEOUT} s:\n"
                               f"{self.log_tail()}")
        self.info = info
        self.port = int(info.get("iscsi_port") or 0)
        self.nfs_port = int(info.get("nfs_port") or 0)
        self.mount_port = int(info.get("mount_port") or 0)
        self.portmap_port = int(info.get("portmap_port") or 0)
        if self.port:
            self._wait_tcp(deadline)
        return self

    def _wait_tcp(self, deadline: float) -> None:
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"iSCSI port {self.port} never accepted a connection:\n"
                                       f"{self.log_tail()}") from None
                time.sleep(0.05)

    def stop(self) -> int:
        """SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL; return the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
                raise RuntimeError(f"vtl serve ignored SIGTERM for {STOP_TIMEOUT} s; "
                                   f"killed:\n{self.log_tail()}") from None
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL the process (cleanup after a failure)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def pid(self) -> int | None:
        """The PID of the running ``vtl serve`` process (None when not started)."""
        return self.proc.pid if self.proc is not None else None

    def kill9(self) -> int:
        """Crash the appliance: SIGKILL its process (by PID), reap it; return the old PID.

        The data dir is left exactly as the dead process left it; ``restart()`` serves it again.
        """
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError("vtl serve is not running")
        pid = self.proc.pid
        os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None
        return pid

    def restart(self) -> "ApplianceProcess":
        """Start again on the same data dir (after ``stop()`` or ``kill9()``); a new port."""
        if self.running:
            raise RuntimeError("vtl serve is still running; stop() or kill9() it first")
        self.proc = None
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # --- talking to it -------------------------------------------------------------------------
    @property
    def portal(self) -> str:
        """``host:port`` of the iSCSI portal."""
        return f"{self.host}:{self.port}"

    def cli(self, *args: str, input: str | None = None) -> Result:
        """Run ``vtl ARGS`` (in-process, click's CliRunner) against this appliance's data dir."""
        from cli.main import cli  # lazily: conftest imports this module for every test

        return self._runner.invoke(cli, list(args), input=input,
                                   env={"VTL_DATA_DIR": str(self.data_dir)},
                                   catch_exceptions=False)

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one raw control request; return the whole reply."""
        return control_request(self.data_dir, op, args)

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the appliance's log (for failure messages)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> "ApplianceProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.running:
            code = self.stop()
            if exc == (None, None, None):
                assert code == 0, f"vtl serve exited {code}:\n{self.log_tail()}"
        else:
            self.kill()


class ControlThread:
    """A :class:`~vtl.engine.control.ControlServer` served from a background event loop.

    For tests of the control API and the CLI without a whole appliance: register fake handlers,
    ``start()``, point the client at ``data_dir``, ``stop()``.
    """

    def __init__(self, data_dir: Path) -> None:
        import asyncio
        import threading

        from vtl.engine.control import ControlServer

        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.server = ControlServer(self.data_dir / "control.sock")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def register(self, name: str, fn: Any) -> None:
        self.server.register(name, fn)

    def start(self) -> "ControlThread":
        import asyncio

        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def stop(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
