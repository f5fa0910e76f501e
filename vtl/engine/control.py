"""The local control API: newline-delimited JSON over a Unix socket (``<data-dir>/control.sock``).

One request per line, ``{"op": "CreateStorediSCSIVolume", "args": {...}}``, one answer per line,
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"code": ..., "message": ...}}``.
A connection may carry any number of requests; they are answered in order.

Invariants:

- Handlers are plain synchronous functions ``fn(args: dict) -> JSON-able`` registered by name.
  They run one at a time on the event loop thread, so a handler never races the iSCSI server
  (which runs on the same loop) nor another handler. A handler with long work (a share refresh
  listing a bucket) validates on the loop and returns an awaitable (e.g. ``asyncio.to_thread``);
  its connection's reply waits for it while the loop, and other control clients, go on.
- :class:`vtl.errors.ApplianceError` becomes its code and message; any other exception is a bug:
  it is logged with its traceback and answered as ``InternalError``. Malformed requests (bad JSON,
  no op, unknown op, args not an object, oversized lines) are answered, never fatal.
- The socket is created with mode 0600: whoever can talk to it administers the appliance.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from vtl.errors import ApplianceError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Any]

#: Longest request line accepted (bytes, newline included).
MAX_REQUEST = 1 << 20

#: sun_path is 108 bytes on Linux, including the terminating NUL.
_SUN_PATH_MAX = 107


def error_reply(code: str, message: str) -> dict[str, Any]:
    """The JSON object answering a failed request."""
    return {"ok": False, "error": {"code": code, "message": message}}


@contextmanager
def socket_path(path: Path) -> Iterator[str]:
    """Yield a path for bind/connect that fits in sun_path.

    Deep data directories (pytest's tmp_path, long home directories) overflow the 107 usable
    bytes of sun_path. On Linux the directory can then be reached through ``/proc/self/fd/<fd>``
    of an ``O_PATH`` handle on it, which is short and resolves to the same inode.
    """
    text = str(path)
    if len(os.fsencode(text)) <= _SUN_PATH_MAX or not Path("/proc/self/fd").is_dir():
        yield text
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class ControlServer:
    """The control API server. ``register`` handlers, then ``await start()``; ``await stop()``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._handlers: dict[str, Handler] = {}
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    # --- registry ------------------------------------------------------------------------------
    def register(self, name: str, fn: Handler) -> None:
        """Serve operation ``name`` with ``fn``; a name is registered once."""
        if name in self._handlers:
            raise ValueError(f"control operation {name!r} registered twice")
        self._handlers[name] = fn

    def register_all(self, ops: dict[str, Handler]) -> None:
        """Register every ``name -> fn`` of a service's ``ops()``."""
        for name, fn in ops.items():
            self.register(name, fn)

    @property
    def operations(self) -> list[str]:
        """Names of the registered operations, sorted."""
        return sorted(self._handlers)

    # --- dispatch (no I/O) ---------------------------------------------------------------------
    def handle_line(self, line: bytes) -> dict[str, Any]:
        """Answer one request line. Never raises."""
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return error_reply("MalformedRequest", f"request is not valid JSON: {exc}")
        if not isinstance(request, dict):
            return error_reply("MalformedRequest", "request must be a JSON object")
        op = request.get("op")
        if not isinstance(op, str) or not op:
            return error_reply("MalformedRequest", 'request needs an "op" string')
        args = request.get("args", {})
        if args is None:
            args = {}
        if not isinstance(args, dict):
            return error_reply("MalformedRequest", '"args" must be a JSON object')
        fn = self._handlers.get(op)
        if fn is None:
            return error_reply("UnknownOperation", f"unknown operation {op!r}")
        try:
            result = fn(args)
        except ApplianceError as exc:
            return {"ok": False, "error": exc.to_json()}
        except Exception as exc:  # a bug in a handler: log it, keep serving
            log.exception("control operation %s failed", op)
            return error_reply("InternalError", f"{op} failed: {type(exc).__name__}: {exc}")
        if inspect.isawaitable(result):
            # long work (e.g. a share refresh) runs off the event loop; the reply waits for it
            return {"ok": True, "result": result, "op": op}
        return {"ok": True, "result": result}

    async def settle(self, reply: dict[str, Any]) -> dict[str, Any]:
        """Await the result of a handler that returned an awaitable; map its errors alike."""
        result = reply.get("result")
        if not inspect.isawaitable(result):
            return reply
        op = reply.get("op", "?")
        try:
            return {"ok": True, "result": await result}
        except ApplianceError as exc:
            return {"ok": False, "error": exc.to_json()}
        except Exception as exc:
            log.exception("control operation %s failed", op)
            return error_reply("InternalError", f"{op} failed: {type(exc).__name__}: {exc}")

    def encode_reply(self, reply: dict[str, Any]) -> bytes:
        """Serialize a reply; a result that is not JSON-able becomes an InternalError."""
        try:
            text = json.dumps(reply, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            log.error("control reply is not JSON-serializable: %s", exc)
            text = json.dumps(error_reply("InternalError", f"reply not serializable: {exc}"))
        return text.encode() + b"\n"

    # --- asyncio edge --------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind the socket (replacing a stale one) with mode 0600 and start serving."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()  # stale: the caller holds the data-dir lock
        except FileNotFoundError:
            pass
        old_umask = os.umask(0o177)
        try:
            with socket_path(self.path) as sun_path:
                self._server = await asyncio.start_unix_server(
                    self._serve_client, path=sun_path, limit=MAX_REQUEST
                )
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        log.info("control API listening on %s", self.path)

    async def stop(self) -> None:
        """Stop accepting, drop open connections and remove the socket file."""
        if self._server is None:
            return  # never bound: the socket file, if any, is not ours
        self._server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    if not exc.partial.strip():
                        break  # clean end of stream
                    line = exc.partial  # a last request without its newline
                except asyncio.LimitOverrunError:
                    writer.write(self.encode_reply(error_reply(
                        "MalformedRequest", f"request longer than {MAX_REQUEST} bytes")))
                    await writer.drain()
                    break  # the rest of the line cannot be resynchronised
                if not line.strip():
                    continue
                writer.write(self.encode_reply(await self.settle(self.handle_line(line))))
                await writer.drain()
                if reader.at_eof():
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass
