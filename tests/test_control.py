"""The control API: request/answer framing, error mapping, robustness against bad input."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import click
import pytest

from cli.client import call
from tests.support.appliance import ControlThread
from vtl.engine.control import MAX_REQUEST, socket_path
from vtl.errors import NotFound


@pytest.fixture
def control(tmp_path: Path) -> Iterator[ControlThread]:
    server = ControlThread(tmp_path / "data")

    def echo(args: dict[str, Any]) -> Any:
        return args

    def missing(args: dict[str, Any]) -> Any:
        raise NotFound(f"volume {args.get('name')} does not exist")

    def broken(args: dict[str, Any]) -> Any:
        raise RuntimeError("boom")

    def unserializable(args: dict[str, Any]) -> Any:
        return {"x": object()}

    server.register("Echo", echo)
    server.register("Missing", missing)
    server.register("Broken", broken)
    gate = threading.Event()

    def slow(args: dict[str, Any]) -> Any:
        def work() -> Any:
            assert gate.wait(30)
            if args.get("fail"):
                raise NotFound("nothing to refresh")
            return {"done": args.get("n")}
        return asyncio.to_thread(work)

    server.register("Unserializable", unserializable)
    server.register("Slow", slow)
    server.gate = gate  # type: ignore[attr-defined]
    server.start()
    yield server
    server.stop()


def raw(data_dir: Path, payload: bytes, replies: int = 1) -> list[dict[str, Any]]:
    """Send raw bytes; read ``replies`` answer lines."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        with socket_path(data_dir / "control.sock") as path:
            sock.connect(path)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        buf = b""
        while buf.count(b"\n") < replies:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


def test_ok_roundtrip(control: ControlThread) -> None:
    assert call(control.data_dir, "Echo", a=1, b=["x"]) == {"a": 1, "b": ["x"]}


def test_socket_is_private(control: ControlThread) -> None:
    mode = os.stat(control.data_dir / "control.sock").st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


@pytest.mark.parametrize("payload, code", [
    (b"{not json\n", "MalformedRequest"),
    (b"\xff\xfe\n", "MalformedRequest"),
    (b"[1, 2]\n", "MalformedRequest"),
    (b'{"args": {}}\n', "MalformedRequest"),
    (b'{"op": 5}\n', "MalformedRequest"),
    (b'{"op": "Echo", "args": [1]}\n', "MalformedRequest"),
    (b'{"op": "NoSuchOp"}\n', "UnknownOperation"),
    (b'{"op": "Broken"}\n', "InternalError"),
    (b'{"op": "Unserializable"}\n', "InternalError"),
])
def test_bad_requests_are_answered(control: ControlThread, payload: bytes, code: str) -> None:
    (reply,) = raw(control.data_dir, payload)
    assert reply["ok"] is False
    assert reply["error"]["code"] == code
    assert reply["error"]["message"]
    # ... and the server keeps serving
    assert call(control.data_dir, "Echo", still="alive") == {"still": "alive"}


def test_handler_bug_is_logged(control: ControlThread, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="vtl.engine.control"):
        (reply,) = raw(control.data_dir, b'{"op": "Broken"}\n')
    assert reply["error"] == {"code": "InternalError",
                              "message": "Broken failed: RuntimeError: boom"}
    record = next(r for r in caplog.records if "Broken" in r.getMessage())
    assert record.exc_info is not None  # the traceback is in the log, not in the reply


def test_appliance_error_keeps_its_code(control: ControlThread) -> None:
    (reply,) = raw(control.data_dir, b'{"op": "Missing", "args": {"name": "v1"}}\n')
    assert reply == {"ok": False, "error": {"code": "ResourceNotFound",
                                            "message": "volume v1 does not exist"}}


def test_several_requests_on_one_connection(control: ControlThread) -> None:
    payload = b'{"op": "Echo", "args": {"n": 1}}\n\n{bad\n{"op": "Echo", "args": {"n": 2}}'
    replies = raw(control.data_dir, payload, replies=3)
    assert [r["ok"] for r in replies] == [True, False, True]
    assert replies[2]["result"] == {"n": 2}


def test_long_operation_runs_off_the_loop(control: ControlThread) -> None:
    """A handler returning an awaitable holds only its own client's reply."""
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(raw, control.data_dir, b'{"op": "Slow", "args": {"n": 7}}\n')
        failing = pool.submit(raw, control.data_dir,
                              b'{"op": "Slow", "args": {"fail": true}}\n')
        # while both wait on the gate, another client is answered at once
        assert call(control.data_dir, "Echo", a=1) == {"a": 1}
        assert not slow.done()
        control.gate.set()  # type: ignore[attr-defined]
        assert slow.result(30) == [{"ok": True, "result": {"done": 7}}]
        assert failing.result(30) == [{"ok": False, "error": {
            "code": "ResourceNotFound", "message": "nothing to refresh"}}]


def test_oversized_request(control: ControlThread) -> None:
    (reply,) = raw(control.data_dir, b'{"op": "Echo", "args": {"x": "' + b"a" * MAX_REQUEST)
    assert reply["error"]["code"] == "MalformedRequest"
    assert call(control.data_dir, "Echo") == {}


def test_client_error_is_one_line(control: ControlThread) -> None:
    with pytest.raises(click.ClickException) as info:
        call(control.data_dir, "Missing", name="v9")
    assert info.value.message == "volume v9 does not exist [ResourceNotFound]"
    with pytest.raises(click.ClickException) as info:
        call(control.data_dir, "Broken")
    assert "\n" not in info.value.message and "InternalError" in info.value.message


def test_client_without_server(tmp_path: Path) -> None:
    with pytest.raises(click.ClickException) as info:
        call(tmp_path, "Echo")
    assert "is the appliance running?" in info.value.message
    assert f"vtl serve --data-dir {tmp_path}" in info.value.message


def test_client_with_stale_socket(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "control.sock"))  # bound, never listening: refused
    with pytest.raises(click.ClickException) as info:
        call(tmp_path, "Echo")
    assert "connection refused" in info.value.message
    assert "is the appliance running?" in info.value.message


def test_long_data_dir_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    server = ControlThread(deep)
    server.register("Echo", lambda args: args)
    server.start()
    try:
        assert len(str(deep / "control.sock")) > 108
        assert call(deep, "Echo", ok=True) == {"ok": True}
    finally:
        server.stop()
    assert not (deep / "control.sock").exists()
