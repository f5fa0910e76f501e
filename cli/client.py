"""Talking to a running appliance: one control API request per call, errors as one line.

Every failure (no appliance, a refused request, a broken reply) surfaces as a
:class:`click.ClickException` whose message is a single line saying what to do.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from vtl.engine.control import socket_path

F = TypeVar("F", bound=Callable[..., Any])

#: Seconds to wait for an answer; volume creation allocates files, so be generous.
TIMEOUT = 300.0


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/vtl``, i.e. ``~/.local/share/vtl`` by default."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "vtl"


def data_dir_option(fn: F) -> F:
    """The ``--data-dir`` option every command takes (envvar ``VTL_DATA_DIR``)."""
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="VTL_DATA_DIR",
        default=default_data_dir,
        show_default="$XDG_DATA_HOME/vtl",
        help="The appliance's data directory.",
    )(fn)


def _not_running(data_dir: Path, why: str) -> click.ClickException:
    return click.ClickException(
        f"no appliance answers at {data_dir / 'control.sock'} ({why}): is the appliance "
        f"running? start it with `vtl serve --data-dir {data_dir}`"
    )


def call(data_dir: Path, op: str, **args: Any) -> Any:
    """Run control operation ``op`` with ``args`` on the appliance at ``data_dir``; return its result."""
    path = Path(data_dir) / "control.sock"
    request = json.dumps({"op": op, "args": args}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        try:
            with socket_path(path) as sun_path:
                sock.connect(sun_path)
        except FileNotFoundError:
            raise _not_running(data_dir, "no control socket") from None
        except ConnectionRefusedError:
            raise _not_running(data_dir, "connection refused") from None
        except OSError as exc:
            raise _not_running(data_dir, exc.strerror or str(exc)) from None
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            chunks: list[bytes] = []
            while not chunks or not chunks[-1].endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            raise click.ClickException(
                f"{op}: the appliance did not answer within {TIMEOUT:.0f} s; check its log"
            ) from None
        except OSError as exc:
            raise click.ClickException(
                f"{op}: connection to the appliance failed: {exc.strerror or exc}"
            ) from None
    raw = b"".join(chunks)
    if not raw:
        raise click.ClickException(f"{op}: the appliance closed the connection without answering")
    try:
        reply = json.loads(raw)
    except json.JSONDecodeError:
        raise click.ClickException(f"{op}: the appliance sent a malformed reply") from None
    if not isinstance(reply, dict):
        raise click.ClickException(f"{op}: the appliance sent a malformed reply")
    if reply.get("ok"):
        return reply.get("result")
    error = reply.get("error") or {}
    message = " ".join(str(error.get("message", "request failed")).split())
    code = error.get("code", "Error")
    raise click.ClickException(f"{message} [{code}]")
