"""How a connection has its SCSI device called when the device may block.

A target with ``blocking`` set (``vtl.iscsi.target.IscsiTarget``) is never called by the
sans-I/O connection itself: each call (execute, a reset, the loss of the nexus) leaves it as a
:class:`DeviceCall` event. Whoever owns the connection runs ``call()`` elsewhere, one call at a
time per device and in the order asked, and hands the return value back with
``IscsiConnection.complete(ref, result)`` on the connection's own thread. The calls built here
never raise: a device bug is logged and becomes HARDWARE ERROR (or nothing, for a reset).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from vtl.iscsi.target import IscsiTarget, ScsiDevice
from vtl.scsi.command import ScsiCommand, ScsiResult, ScsiStatus
from vtl.scsi.sense import Asc, SenseKey, encode_fixed_sense

log = logging.getLogger("vtl.iscsi")


@dataclass(frozen=True, slots=True)
class DeviceCall:
    """Call ``call()`` (it may block; it never raises) away from the protocol's thread, then
    hand its return value to :meth:`IscsiConnection.complete` with ``ref`` (``None`` when it
    could not run). Calls for one device must run one at a time, in the order asked (the
    device is not thread-safe and SAM ordering depends on it). Only for ``target.blocking``."""

    ref: int
    target: IscsiTarget
    call: Callable[[], object]


def hardware_error() -> ScsiResult:
    return ScsiResult(ScsiStatus.CHECK_CONDITION, sense=encode_fixed_sense(
        SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE))


def run_command(device: ScsiDevice, cmd: ScsiCommand) -> ScsiResult:
    try:
        return device.execute(cmd)
    except Exception:  # a device bug: answer HARDWARE ERROR and keep serving
        log.exception("device raised on CDB %s", cmd.cdb[:1].hex())
        return hardware_error()


def run_quietly(call: Callable[[], object] | None) -> None:
    """A reset or nexus loss run as a DeviceCall: a device bug is logged, never raised."""
    if call is None:
        return
    try:
        call()
    except Exception:
        log.exception("device call %r failed", call)


def ignore(_result: object) -> None:
    pass


__all__ = ["DeviceCall", "hardware_error", "ignore", "run_command", "run_quietly"]
