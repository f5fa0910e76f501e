"""A small ctypes binding to the system libiscsi (libiscsi.so.7, version 1.19): a Python initiator
that sees the whole reply of every command.

It exists so tests and the benchmark can drive any iSCSI target (the appliance, tgt) with raw CDBs
and inspect the SCSI status, the raw sense bytes, the data-in and the iSCSI residual, none of which
pyscsi's backends expose completely.

Invariants:
- Every command goes through libiscsi's asynchronous API (``iscsi_scsi_command_async``) and an event
  loop in this module (poll on ``iscsi_get_fd``/``iscsi_which_events``, ``iscsi_service``). The same
  path serves one command (``Session.execute``) and many (``run_queue_depth``), and a ``scsi_task`` is
  freed only after libiscsi has called back for it or the context is destroyed, so a dropped
  connection never leaves libiscsi writing into freed memory.
- Data-in always lands in a buffer owned by Python (``scsi_task_add_data_in_buffer``), so that on
  CHECK CONDITION ``task->datain`` holds the SCSI Response data segment (2-byte SenseLength + sense
  bytes, RFC 7143 11.4.7) and the raw sense survives; the data length is the expected length minus
  the iSCSI underflow residual.
- Auto-reconnect is off: a dropped session is an error the caller sees (``LibiscsiError``).
- The ctypes ``Structure`` layouts below match ``/usr/include/iscsi/scsi-lowlevel.h`` of libiscsi
  1.19 on LP64 (checked with ``offsetof``: ``struct scsi_task`` is 176 bytes, ``sense`` at 48,
  ``datain`` at 64, ``iovector_in`` at 112).
"""

from __future__ import annotations

import ctypes
import select
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

__all__ = [
    "Command",
    "Element",
    "LibiscsiError",
    "QueueDepthReport",
    "Result",
    "ScsiStatusError",
    "Session",
    "Status",
    "library_available",
    "parse_element_status",
    "run_queue_depth",
]

DEFAULT_INITIATOR = "iqn.2025-01.org.vtl.test:libiscsi"


class Status:
    """SCSI status byte values (SAM-5 5.3) plus libiscsi's transport pseudo-statuses (iscsi.h)."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40
    CANCELLED = 0x0F000000
    ERROR = 0x0F000001
    TIMEOUT = 0x0F000002


_XFER_NONE, _XFER_READ, _XFER_WRITE = 0, 1, 2
_SESSION_NORMAL = 2
_HEADER_DIGESTS = {"none": 0, "none,crc32c": 1, "crc32c,none": 2, "crc32c": 3}
_RESIDUAL_KINDS: dict[int, Literal["none", "underflow", "overflow"]] = {
    0: "none",
    1: "underflow",
    2: "overflow",
}


# ---------------------------------------------------------------------------------------------
# struct layouts (scsi-lowlevel.h, libiscsi 1.19)


class _ScsiSense(ctypes.Structure):
    """``struct scsi_sense``; the three 1-bit fields share the byte at offset 12 (GCC packing)."""

    _fields_ = [
        ("error_type", ctypes.c_ubyte),
        ("key", ctypes.c_int),
        ("ascq", ctypes.c_int),  # (ASC << 8) | ASCQ
        ("bits", ctypes.c_ubyte),  # sense_specific:1, ill_param_in_cdb:1, bit_pointer_valid:1
        ("bit_pointer", ctypes.c_ubyte),
        ("field_pointer", ctypes.c_uint16),
    ]


class _ScsiData(ctypes.Structure):
    """``struct scsi_data``."""

    _fields_ = [("size", ctypes.c_int), ("data", ctypes.POINTER(ctypes.c_ubyte))]


class _ScsiIovector(ctypes.Structure):
    """``struct scsi_iovector``."""

    _fields_ = [
        ("iov", ctypes.c_void_p),
        ("niov", ctypes.c_int),
        ("nalloc", ctypes.c_int),
        ("offset", ctypes.c_size_t),
        ("consumed", ctypes.c_int),
    ]


class _ScsiTask(ctypes.Structure):
    """``struct scsi_task``."""

    _fields_ = [
        ("status", ctypes.c_int),
        ("cdb_size", ctypes.c_int),
        ("xfer_dir", ctypes.c_int),
        ("expxferlen", ctypes.c_int),
        ("cdb", ctypes.c_ubyte * 16),
        ("residual_status", ctypes.c_int),
        ("residual", ctypes.c_size_t),
        ("sense", _ScsiSense),
        ("datain", _ScsiData),
        ("mem", ctypes.c_void_p),
        ("ptr", ctypes.c_void_p),
        ("itt", ctypes.c_uint32),
        ("cmdsn", ctypes.c_uint32),
        ("lun", ctypes.c_uint32),
        ("iovector_in", _ScsiIovector),
        ("iovector_out", _ScsiIovector),
    ]


assert ctypes.sizeof(_ScsiSense) == 16 and _ScsiSense.bit_pointer.offset == 13
assert ctypes.sizeof(_ScsiTask) == 176 and _ScsiTask.sense.offset == 48
assert _ScsiTask.datain.offset == 64 and _ScsiTask.iovector_in.offset == 112

_TaskP = ctypes.POINTER(_ScsiTask)
_COMMAND_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


class LibiscsiError(RuntimeError):
    """libiscsi could not do what was asked: load, connect, log in, or keep the session up."""


class _Lib:
    """The loaded ``libiscsi.so.7`` with argument and return types declared once."""

    def __init__(self, name: str = "libiscsi.so.7") -> None:
        lib = ctypes.CDLL(name)
        vp, ci, cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
        sig: dict[str, tuple[object, list[object]]] = {
            "iscsi_create_context": (vp, [cp]),
            "iscsi_destroy_context": (ci, [vp]),
            "iscsi_get_error": (cp, [vp]),
            "iscsi_set_targetname": (ci, [vp, cp]),
            "iscsi_set_session_type": (ci, [vp, ci]),
            "iscsi_set_header_digest": (ci, [vp, ci]),
            "iscsi_set_initiator_username_pwd": (ci, [vp, cp, cp]),
            "iscsi_set_target_username_pwd": (ci, [vp, cp, cp]),
            "iscsi_set_noautoreconnect": (None, [vp, ci]),
            "iscsi_set_timeout": (ci, [vp, ci]),
            "iscsi_full_connect_sync": (ci, [vp, cp, ci]),
            "iscsi_connect_sync": (ci, [vp, cp]),
            "iscsi_login_sync": (ci, [vp]),
            "iscsi_logout_sync": (ci, [vp]),
            "iscsi_is_logged_in": (ci, [vp]),
            "iscsi_get_fd": (ci, [vp]),
            "iscsi_which_events": (ci, [vp]),
            "iscsi_service": (ci, [vp, ci]),
            "iscsi_scsi_command_async": (ci, [vp, ci, _TaskP, _COMMAND_CB, vp, vp]),
            "iscsi_scsi_command_sync": (_TaskP, [vp, ci, _TaskP, vp]),
            "scsi_create_task": (_TaskP, [ci, cp, ci, ci]),
            "scsi_free_scsi_task": (None, [_TaskP]),
            "scsi_task_add_data_in_buffer": (ci, [_TaskP, ci, vp]),
            "scsi_task_add_data_out_buffer": (ci, [_TaskP, ci, vp]),
        }
        for fname, (restype, argtypes) in sig.items():
            fn = getattr(lib, fname)
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, fname, fn)
        self.lib = lib

    def __getattr__(self, name: str) -> Any:  # the foreign functions set above, for type checkers
        raise AttributeError(name)


_lib_cache: list[_Lib] = []


def _libiscsi() -> _Lib:
    """Load libiscsi on first use (no import-time side effect)."""
    if not _lib_cache:
        try:
            _lib_cache.append(_Lib())
        except OSError as exc:
            raise LibiscsiError(f"cannot load libiscsi.so.7 ({exc}); apt-get install libiscsi7") from exc
    return _lib_cache[0]


def library_available() -> bool:
    """True when the system libiscsi can be loaded."""
    try:
        _libiscsi()
    except LibiscsiError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class Result:
    """Everything the target said about one command.

    ``data`` is the data-in actually transferred; ``sense`` the raw sense bytes (fixed or
    descriptor format, as sent) when the status is CHECK CONDITION, else ``b""``.
    """

    status: int
    data: bytes = b""
    sense: bytes = b""
    sense_key: int = 0
    asc: int = 0
    ascq: int = 0
    residual_kind: Literal["none", "underflow", "overflow"] = "none"
    residual: int = 0

    @property
    def good(self) -> bool:
        """Status GOOD."""
        return self.status == Status.GOOD

    @property
    def check_condition(self) -> bool:
        """Status CHECK CONDITION."""
        return self.status == Status.CHECK_CONDITION

    def _fixed(self) -> bytes | None:
        if len(self.sense) >= 8 and self.sense[0] & 0x7F in (0x70, 0x71):
            return self.sense
        return None

    @property
    def filemark(self) -> bool:
        """FILEMARK bit of fixed-format sense (SPC-4 4.5.3)."""
        fixed = self._fixed()
        return bool(fixed and fixed[2] & 0x80)

    @property
    def eom(self) -> bool:
        """EOM bit of fixed-format sense."""
        fixed = self._fixed()
        return bool(fixed and fixed[2] & 0x40)

    @property
    def ili(self) -> bool:
        """ILI bit of fixed-format sense."""
        fixed = self._fixed()
        return bool(fixed and fixed[2] & 0x20)

    @property
    def information(self) -> int | None:
        """INFORMATION field of fixed-format sense when VALID is set, as a signed 32-bit value."""
        fixed = self._fixed()
        if fixed is None or not fixed[0] & 0x80:
            return None
        return int(struct.unpack_from(">i", fixed, 3)[0])

    def check(self) -> Result:
        """Return self if GOOD, else raise ``ScsiStatusError``."""
        if not self.good:
            raise ScsiStatusError(self)
        return self

    def describe(self) -> str:
        """One line for assertion messages: status, sense key and ASC/ASCQ, residual."""
        text = f"status=0x{self.status:02x}"
        if self.check_condition:
            text += f" key=0x{self.sense_key:x} asc/ascq={self.asc:02x}/{self.ascq:02x}"
            text += f" sense={self.sense.hex()}"
        if self.residual_kind != "none":
            text += f" {self.residual_kind}={self.residual}"
        return text


class ScsiStatusError(Exception):
    """A command ended with a status other than GOOD; carries the whole ``Result``."""

    def __init__(self, result: Result) -> None:
        super().__init__(result.describe())
        self.result = result


def _decode_sense(raw: bytes) -> tuple[int, int, int]:
    """(sense key, ASC, ASCQ) from fixed (SPC-4 4.5.3) or descriptor (4.5.2) format sense."""
    if not raw:
        return 0, 0, 0
    code = raw[0] & 0x7F
    if code in (0x72, 0x73) and len(raw) >= 4:
        return raw[1] & 0x0F, raw[2], raw[3]
    if code in (0x70, 0x71) and len(raw) >= 3:
        asc = raw[12] if len(raw) > 12 else 0
        ascq = raw[13] if len(raw) > 13 else 0
        return raw[2] & 0x0F, asc, ascq
    return 0, 0, 0


@dataclass(frozen=True)
class Command:
    """One CDB with its data-out payload or its expected data-in length."""

    cdb: bytes
    data_out: bytes = b""
    expect_in: int = 0


# ---------------------------------------------------------------------------------------------
# in-flight commands and the event loop


class _Pending:
    """A submitted task and the Python buffers libiscsi points into until it calls back."""

    __slots__ = ("task", "inbuf", "outbuf", "expect_in", "done", "status", "cdb")

    def __init__(self, task: ctypes._Pointer[_ScsiTask], inbuf: ctypes.Array[ctypes.c_char] | None,
                 outbuf: bytes, expect_in: int, cdb: bytes) -> None:
        self.task = task
        self.inbuf = inbuf
        self.outbuf = outbuf
        self.expect_in = expect_in
        self.cdb = cdb
        self.done = False
        self.status = Status.ERROR


def _parse_target(target: str | tuple[str, str, int]) -> tuple[str, str, int, str | None, str | None]:
    """(portal, iqn, lun, user, password) from ``iscsi://[user[%pw]@]host[:port]/iqn/lun``."""
    if isinstance(target, tuple):
        portal, iqn, lun = target
        return portal, iqn, int(lun), None, None
    parts = urlsplit(target)
    if parts.scheme != "iscsi" or not parts.hostname:
        raise ValueError(f"not an iscsi:// URL: {target!r}")
    path = parts.path.strip("/").split("/")
    if len(path) != 2 or not path[1].isdigit():
        raise ValueError(f"URL must end in /<target-iqn>/<lun>: {target!r}")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    portal = f"{host}:{parts.port or 3260}"
    user = password = None
    if parts.username:
        # libiscsi's form: user%password@ (a ':' form is accepted too)
        user, _, pw = parts.username.partition("%")
        password = pw or (unquote(parts.password) if parts.password else None)
        user = unquote(user)
    return portal, path[0], int(path[1]), user, password


class Session:
    """One logged-in iSCSI session to one LUN, driven through libiscsi.

    ``target`` is ``iscsi://host:port/iqn/lun`` or ``(portal, target_iqn, lun)``. CHAP is used when
    ``chap_user`` is given; mutual CHAP when ``target_chap_user`` is given too. ``header_digest`` is
    one of "none", "crc32c", "none,crc32c", "crc32c,none" (libiscsi has no data digest).
    ``timeout`` (seconds) bounds each command and the login. With ``consume_unit_attention`` (the
    default) login is ``iscsi_full_connect_sync``, which clears pending UNIT ATTENTIONs with TEST
    UNIT READY; pass False to log in without sending any command and see them.
    """

    def __init__(
        self,
        target: str | tuple[str, str, int],
        *,
        initiator_name: str = DEFAULT_INITIATOR,
        chap_user: str | None = None,
        chap_password: str | None = None,
        target_chap_user: str | None = None,
        target_chap_password: str | None = None,
        header_digest: str = "none",
        timeout: float = 30.0,
        consume_unit_attention: bool = True,
    ) -> None:
        portal, iqn, lun, url_user, url_pw = _parse_target(target)
        self.portal = portal
        self.target_iqn = iqn
        self.lun = lun
        self.timeout = timeout
        self.block_size: int | None = None
        self._lib = _libiscsi()
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._broken: str | None = None
        self._cb = _COMMAND_CB(self._on_complete)  # kept alive as long as the context
        if header_digest not in _HEADER_DIGESTS:
            raise ValueError(f"header_digest must be one of {sorted(_HEADER_DIGESTS)}")
        ctx = self._lib.iscsi_create_context(initiator_name.encode())
        if not ctx:
            raise LibiscsiError("iscsi_create_context failed")
        self._ctx: int | None = ctx
        try:
            self._configure(iqn, header_digest, chap_user or url_user, chap_password or url_pw,
                            target_chap_user, target_chap_password, timeout)
            if consume_unit_attention:
                rc = self._lib.iscsi_full_connect_sync(ctx, portal.encode(), lun)
            else:
                rc = self._lib.iscsi_connect_sync(ctx, portal.encode())
                if rc == 0:
                    rc = self._lib.iscsi_login_sync(ctx)
            if rc != 0:
                raise LibiscsiError(f"login to {portal} {iqn} LUN {lun} failed: {self.error()}")
        except BaseException:
            self._destroy()
            raise

    def _configure(self, iqn: str, digest: str, user: str | None, password: str | None,
                   tuser: str | None, tpassword: str | None, timeout: float) -> None:
        lib, ctx = self._lib, self._ctx
        steps: list[tuple[str, int]] = [
            ("iscsi_set_targetname", lib.iscsi_set_targetname(ctx, iqn.encode())),
            ("iscsi_set_session_type", lib.iscsi_set_session_type(ctx, _SESSION_NORMAL)),
            ("iscsi_set_header_digest", lib.iscsi_set_header_digest(ctx, _HEADER_DIGESTS[digest])),
            ("iscsi_set_timeout", lib.iscsi_set_timeout(ctx, max(1, int(timeout)))),
        ]
        if user is not None:
            steps.append(("iscsi_set_initiator_username_pwd", lib.iscsi_set_initiator_username_pwd(
                ctx, user.encode(), (password or "").encode())))
        if tuser is not None:
            if user is None:
                raise ValueError("mutual CHAP needs the initiator's chap_user too")
            steps.append(("iscsi_set_target_username_pwd", lib.iscsi_set_target_username_pwd(
                ctx, tuser.encode(), (tpassword or "").encode())))
        for name, rc in steps:
            if rc != 0:
                raise LibiscsiError(f"{name} failed: {self.error()}")
        lib.iscsi_set_noautoreconnect(ctx, 1)

    # -- lifetime ------------------------------------------------------------------------------

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Log out (if the session is healthy) and destroy the context. Idempotent."""
        if self._ctx is None:
            return
        try:
            if self._broken is None and not self._pending and self._lib.iscsi_is_logged_in(self._ctx):
                self._lib.iscsi_logout_sync(self._ctx)
        finally:
            self._destroy()

    def _destroy(self) -> None:
        if self._ctx is not None:
            # Cancels the PDUs still queued; their callbacks run now, while the tasks still exist.
            self._lib.iscsi_destroy_context(self._ctx)
            self._ctx = None
        for pending in self._pending.values():
            self._lib.scsi_free_scsi_task(pending.task)
        self._pending.clear()

    def error(self) -> str:
        """libiscsi's last error message for this context."""
        if self._ctx is None:
            return self._broken or "context destroyed"
        msg = self._lib.iscsi_get_error(self._ctx)
        return msg.decode(errors="replace") if msg else ""

    @property
    def broken(self) -> str | None:
        """Why the session is unusable, or None while it is healthy."""
        return self._broken

    # -- commands ------------------------------------------------------------------------------

    def _on_complete(self, _ctx: int, status: int, _task: int, private: int | None) -> None:
        pending = self._pending.get(private or 0)
        if pending is not None:
            pending.status = status
            pending.done = True

    def submit(self, cdb: bytes, *, data_out: bytes = b"", expect_in: int = 0) -> int:
        """Queue one command without waiting; returns a handle for ``collect``."""
        if self._ctx is None or self._broken is not None:
            raise LibiscsiError(f"session unusable: {self._broken or 'closed'}")
        if not 6 <= len(cdb) <= 16:
            raise ValueError(f"CDB length {len(cdb)} not in 6..16")
        if data_out and expect_in:
            raise ValueError("bidirectional commands are not supported")
        lib = self._lib
        if data_out:
            direction, xfer = _XFER_WRITE, len(data_out)
        elif expect_in:
            direction, xfer = _XFER_READ, expect_in
        else:
            direction, xfer = _XFER_NONE, 0
        task = lib.scsi_create_task(len(cdb), cdb, direction, xfer)
        if not task:
            raise LibiscsiError("scsi_create_task failed")
        inbuf = None
        try:
            if data_out:
                if lib.scsi_task_add_data_out_buffer(task, len(data_out), data_out) != 0:
                    raise LibiscsiError("scsi_task_add_data_out_buffer failed")
            elif expect_in:
                inbuf = ctypes.create_string_buffer(expect_in)
                if lib.scsi_task_add_data_in_buffer(task, expect_in, inbuf) != 0:
                    raise LibiscsiError("scsi_task_add_data_in_buffer failed")
            handle = self._next_id
            self._next_id += 1
            pending = _Pending(task, inbuf, data_out, expect_in, cdb)
            self._pending[handle] = pending
            if lib.iscsi_scsi_command_async(self._ctx, self.lun, task, self._cb, None, handle) != 0:
                del self._pending[handle]
                raise LibiscsiError(f"iscsi_scsi_command_async failed: {self.error()}")
        except BaseException:
            lib.scsi_free_scsi_task(task)
            raise
        return handle

    def _service_once(self, timeout_ms: int) -> None:
        """One poll + iscsi_service round; a failure marks the session broken."""
        lib, ctx = self._lib, self._ctx
        fd = lib.iscsi_get_fd(ctx)
        events = lib.iscsi_which_events(ctx)
        poller = select.poll()
        poller.register(fd, events)
        ready = poller.poll(timeout_ms)
        revents = ready[0][1] if ready else 0
        if lib.iscsi_service(ctx, revents) < 0:
            self._broken = f"iscsi_service failed: {self.error()}"
            raise LibiscsiError(self._broken)

    def wait_any(self, handles: set[int] | None = None) -> list[int]:
        """Service the connection until at least one of ``handles`` (default: any) completes."""
        def finished() -> list[int]:
            pool = self._pending if handles is None else {h: self._pending[h] for h in handles}
            return [h for h, p in pool.items() if p.done]

        done = finished()
        deadline = time.monotonic() + self.timeout + 1.0
        while not done:
            if self._ctx is None or self._broken is not None:
                raise LibiscsiError(f"session unusable: {self._broken or 'closed'}")
            if time.monotonic() > deadline:
                self._broken = f"no completion within {self.timeout} s"
                raise LibiscsiError(self._broken)
            self._service_once(100)
            done = finished()
        return done

    def command_status(self, cdb: bytes, data_out: bytes = b"") -> int:
        """Send one CDB (no data-in) with libiscsi's synchronous call, which waits in its own C
        poll loop: the leanest initiator path, for latency figures. Returns the SCSI status;
        transport failures raise ``LibiscsiError``. Not while async commands are in flight."""
        if self._ctx is None or self._broken is not None:
            raise LibiscsiError(f"session unusable: {self._broken or 'closed'}")
        if self._pending:
            raise RuntimeError("asynchronous commands are in flight")
        lib = self._lib
        task = lib.scsi_create_task(len(cdb), cdb, _XFER_WRITE if data_out else _XFER_NONE,
                                    len(data_out))
        if not task:
            raise LibiscsiError("scsi_create_task failed")
        try:
            if data_out and lib.scsi_task_add_data_out_buffer(task, len(data_out), data_out):
                raise LibiscsiError("scsi_task_add_data_out_buffer failed")
            if not lib.iscsi_scsi_command_sync(self._ctx, self.lun, task, None):
                self._broken = f"CDB {cdb.hex()}: {self.error()}"
                raise LibiscsiError(self._broken)
            status = int(task.contents.status)
        finally:
            lib.scsi_free_scsi_task(task)
        if status in (Status.ERROR, Status.CANCELLED, Status.TIMEOUT):
            raise LibiscsiError(f"CDB {cdb.hex()}: {self.error()}")
        return status

    def collect(self, handle: int) -> Result:
        """Wait for one submitted command and return its ``Result`` (frees the task)."""
        self.wait_any({handle})
        pending = self._pending.pop(handle)
        try:
            return self._result(pending)
        finally:
            self._lib.scsi_free_scsi_task(pending.task)

    def _result(self, pending: _Pending) -> Result:
        task = pending.task.contents
        status = pending.status
        if status in (Status.ERROR, Status.CANCELLED, Status.TIMEOUT):
            what = {Status.ERROR: "error", Status.CANCELLED: "cancelled", Status.TIMEOUT: "timeout"}
            raise LibiscsiError(
                f"CDB {pending.cdb.hex()} {what[status]}: {self.error()}")
        kind = _RESIDUAL_KINDS.get(task.residual_status, "none")
        residual = int(task.residual) if kind != "none" else 0
        data = b""
        if pending.inbuf is not None:
            got = pending.expect_in - residual if kind == "underflow" else pending.expect_in
            data = pending.inbuf.raw[: max(0, min(got, pending.expect_in))]
        sense = b""
        key = asc = ascq = 0
        if status == Status.CHECK_CONDITION:
            if task.datain.size >= 2 and task.datain.data:
                seg = ctypes.string_at(task.datain.data, task.datain.size)
                sense_len = int.from_bytes(seg[:2], "big")
                sense = seg[2 : 2 + sense_len]
            key, asc, ascq = _decode_sense(sense)
            if not sense:
                key, asc, ascq = task.sense.key, task.sense.ascq >> 8, task.sense.ascq & 0xFF
        return Result(status, data, sense, key, asc, ascq, kind, residual)

    def execute(self, cdb: bytes, *, data_out: bytes = b"", expect_in: int = 0) -> Result:
        """Send one CDB and wait for its completion.

        Raises ``LibiscsiError`` if the command could not complete at the transport level; any
        SCSI status (including CHECK CONDITION) is returned in the ``Result``.
        """
        return self.collect(self.submit(cdb, data_out=data_out, expect_in=expect_in))

    # -- SPC / SBC helpers ---------------------------------------------------------------------

    def test_unit_ready(self) -> Result:
        """TEST UNIT READY (SPC-4 6.47)."""
        return self.execute(bytes(6))

    def inquiry(self, evpd: bool = False, page: int = 0, alloc: int = 255) -> Result:
        """INQUIRY (SPC-4 6.6)."""
        cdb = struct.pack(">BBBHB", 0x12, int(evpd), page, alloc, 0)
        return self.execute(cdb, expect_in=alloc)

    def read_capacity16(self, alloc: int = 32) -> Result:
        """READ CAPACITY(16) (SBC-3 5.16)."""
        cdb = struct.pack(">BBQIBB", 0x9E, 0x10, 0, alloc, 0, 0)
        return self.execute(cdb, expect_in=alloc)

    def capacity(self) -> tuple[int, int]:
        """(number of blocks, block size) from READ CAPACITY(16); caches the block size."""
        data = self.read_capacity16().check().data
        last_lba, block_size = struct.unpack_from(">QI", data)
        self.block_size = block_size
        return last_lba + 1, block_size

    def _bs(self, block_size: int | None) -> int:
        if block_size is not None:
            return block_size
        if self.block_size is None:
            self.capacity()
        assert self.block_size is not None
        return self.block_size

    def read10(self, lba: int, blocks: int, *, block_size: int | None = None) -> Result:
        """READ(10) (SBC-3 5.11)."""
        cdb = struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)
        return self.execute(cdb, expect_in=blocks * self._bs(block_size))

    def write10(self, lba: int, data: bytes, *, block_size: int | None = None) -> Result:
        """WRITE(10) (SBC-3 5.32); ``data`` must be whole blocks."""
        blocks, rest = divmod(len(data), self._bs(block_size))
        if rest:
            raise ValueError("data is not a whole number of blocks")
        cdb = struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)
        return self.execute(cdb, data_out=data)

    def read16(self, lba: int, blocks: int, *, block_size: int | None = None) -> Result:
        """READ(16) (SBC-3 5.13)."""
        cdb = struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)
        return self.execute(cdb, expect_in=blocks * self._bs(block_size))

    def write16(self, lba: int, data: bytes, *, block_size: int | None = None) -> Result:
        """WRITE(16) (SBC-3 5.34)."""
        blocks, rest = divmod(len(data), self._bs(block_size))
        if rest:
            raise ValueError("data is not a whole number of blocks")
        cdb = struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)
        return self.execute(cdb, data_out=data)

    # -- SSC helpers (tape) --------------------------------------------------------------------

    def read6(self, length: int, fixed: bool = False, sili: bool = False,
              block_size: int = 0) -> Result:
        """READ(6) (SSC-4 6.16): ``length`` bytes (variable) or blocks of ``block_size`` (fixed)."""
        if fixed and block_size <= 0:
            raise ValueError("fixed-block READ(6) needs block_size")
        cdb = struct.pack(">BB", 0x08, (int(sili) << 1) | int(fixed)) + length.to_bytes(3, "big") + b"\0"
        return self.execute(cdb, expect_in=length * block_size if fixed else length)

    def write6(self, data: bytes, fixed: bool = False, block_size: int = 0) -> Result:
        """WRITE(6) (SSC-4 6.30): one variable block, or whole fixed blocks of ``block_size``."""
        if fixed:
            if block_size <= 0 or len(data) % block_size:
                raise ValueError("fixed-block WRITE(6) needs whole blocks of block_size")
            count = len(data) // block_size
        else:
            count = len(data)
        cdb = struct.pack(">BB", 0x0A, int(fixed)) + count.to_bytes(3, "big") + b"\0"
        return self.execute(cdb, data_out=data)

    def write_filemarks(self, n: int = 1, immed: bool = False) -> Result:
        """WRITE FILEMARKS(6) (SSC-4 6.32)."""
        cdb = struct.pack(">BB", 0x10, int(immed)) + n.to_bytes(3, "big") + b"\0"
        return self.execute(cdb)

    def space(self, count: int, code: int = 0) -> Result:
        """SPACE(6) (SSC-4 6.23); code 0 blocks, 1 filemarks, 3 end of data; count is signed."""
        cdb = struct.pack(">BB", 0x11, code & 0x0F) + (count & 0xFFFFFF).to_bytes(3, "big") + b"\0"
        return self.execute(cdb)

    def rewind(self, immed: bool = False) -> Result:
        """REWIND (SSC-4 6.21)."""
        return self.execute(struct.pack(">BB4x", 0x01, int(immed)))

    def read_position(self, form: int = 0) -> Result:
        """READ POSITION (SSC-4 6.17): form 0 short (20 bytes), 6 long (32), 8 extended (28)."""
        alloc = {0: 20, 1: 20, 6: 32, 8: 28}.get(form, 32)
        cdb = struct.pack(">BB5xHB", 0x34, form & 0x1F, alloc if form == 8 else 0, 0)
        return self.execute(cdb, expect_in=alloc)

    def locate(self, obj: int, partition: int | None = None) -> Result:
        """LOCATE(10) (SSC-4 6.6) to logical object ``obj``."""
        cp = 0x02 if partition is not None else 0
        cdb = struct.pack(">BBBIBBB", 0x2B, cp, 0, obj, 0, partition or 0, 0)
        return self.execute(cdb)

    def load_unload(self, load: bool, immed: bool = False) -> Result:
        """LOAD UNLOAD (SSC-4 6.7)."""
        return self.execute(struct.pack(">BBxxBx", 0x1B, int(immed), int(load)))

    # -- SMC helpers (changer) -----------------------------------------------------------------

    def read_element_status(self, element_type: int = 0, start: int = 0, count: int = 0xFFFF,
                            voltag: bool = True, alloc: int = 65536, curdata: bool = True,
                            dvcid: bool = False) -> Result:
        """READ ELEMENT STATUS (SMC-3 6.10). Against tgt use one element type at a time."""
        byte1 = (int(voltag) << 4) | (element_type & 0x0F)
        byte6 = (int(curdata) << 1) | int(dvcid)
        cdb = struct.pack(">BBHHB", 0xB8, byte1, start, count, byte6) + alloc.to_bytes(3, "big") + b"\0\0"
        return self.execute(cdb, expect_in=alloc)

    def move_medium(self, src: int, dst: int, transport: int = 0) -> Result:
        """MOVE MEDIUM (SMC-3 6.7)."""
        cdb = struct.pack(">BxHHHxxBx", 0xA5, transport, src, dst, 0)
        return self.execute(cdb)


# ---------------------------------------------------------------------------------------------
# queue depth


@dataclass(frozen=True)
class QueueDepthReport:
    """Outcome of ``run_queue_depth``: counts and the first non-GOOD result, if any."""

    completed: int
    good: int
    first_failure: Result | None


def run_queue_depth(session: Session, cdb_factory: Callable[[int], Command], count: int,
                    depth: int, on_result: Callable[[int, Result], None] | None = None
                    ) -> QueueDepthReport:
    """Run ``count`` commands keeping up to ``depth`` in flight on one session.

    ``cdb_factory(i)`` builds the i-th command; ``on_result(i, result)``, if given, sees every
    completion. Transport failures raise ``LibiscsiError``; SCSI failures are counted and the
    first one is returned.
    """
    if depth < 1 or count < 0:
        raise ValueError("depth must be >= 1 and count >= 0")
    in_flight: dict[int, int] = {}  # handle -> command index
    issued = completed = good = 0
    first_failure: Result | None = None
    while completed < count:
        while issued < count and len(in_flight) < depth:
            cmd = cdb_factory(issued)
            handle = session.submit(cmd.cdb, data_out=cmd.data_out, expect_in=cmd.expect_in)
            in_flight[handle] = issued
            issued += 1
        for handle in session.wait_any(set(in_flight)):
            index = in_flight.pop(handle)
            result = session.collect(handle)
            completed += 1
            if on_result is not None:
                on_result(index, result)
            if result.good:
                good += 1
            elif first_failure is None:
                first_failure = result
    return QueueDepthReport(completed, good, first_failure)


# ---------------------------------------------------------------------------------------------
# SMC element status (SMC-3 6.10.2 - 6.10.4)


@dataclass(frozen=True)
class Element:
    """One element status descriptor: address, type (1 transport, 2 storage, 3 I/E, 4 drive),
    FULL, the primary volume tag (barcode) if reported, and whether the descriptor was cut short
    (tgt sends READ ELEMENT STATUS replies 8 bytes short)."""

    address: int
    element_type: int
    full: bool
    barcode: str | None
    truncated: bool = False


def parse_element_status(data: bytes) -> list[Element]:
    """Decode READ ELEMENT STATUS data; a descriptor with at least its first 3 bytes is kept
    (marked ``truncated`` when incomplete), anything shorter ends the parse."""
    elements: list[Element] = []
    if len(data) < 8:
        return elements
    report_bytes = int.from_bytes(data[5:8], "big")
    end = min(len(data), 8 + report_bytes)
    pos = 8
    while pos + 8 <= end:
        etype = data[pos] & 0x0F
        pvoltag = bool(data[pos + 1] & 0x80)
        desc_len = int.from_bytes(data[pos + 2 : pos + 4], "big")
        page_bytes = int.from_bytes(data[pos + 5 : pos + 8], "big")
        pos += 8
        if desc_len == 0:
            break
        page_end = min(end, pos + page_bytes)
        while pos + 3 <= page_end:
            desc = data[pos : min(pos + desc_len, page_end)]
            barcode = None
            if pvoltag and len(desc) >= 12 + 32:
                barcode = desc[12 : 12 + 32].decode("ascii", "replace").strip() or None
            elements.append(Element(int.from_bytes(desc[:2], "big"), etype, bool(desc[2] & 0x01),
                                    barcode, truncated=len(desc) < desc_len))
            pos += desc_len
        pos = max(pos, page_end)
    return elements
