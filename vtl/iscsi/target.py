"""What the iSCSI layer needs to know about targets: names, auth, and the SCSI device behind.

The registry is consulted at every login and discovery, so targets added or removed while the
appliance runs (a new volume) take effect at once. ``ScsiDevice`` is satisfied by
``vtl.scsi.target.ScsiTarget``; iSCSI never parses a CDB.

A target whose device may block (an S3 GET, waiting for upload-buffer space) sets
``IscsiTarget.blocking``: the server then calls that device on a worker thread, never on the
event loop (see ``vtl.iscsi.connection.DeviceCall``). Its calls are still serialised: one at a
time per device, so the device needs no locking of its own against the iSCSI layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol

from vtl.scsi.command import ScsiCommand, ScsiResult


@dataclass(frozen=True, slots=True)
class ChapCredentials:
    user: str
    secret: bytes  # RFC 7143 12.1.3 / 11.1.4; we require 12-16 bytes when configured from the CLI


@dataclass(frozen=True, slots=True)
class TargetAuth:
    """Per-target access control.

    ``chap``: the initiator must prove this secret (one-way CHAP). ``mutual``: the target answers
    the initiator's challenge with this (mutual CHAP; only with ``chap``). ``allowed_initiators``:
    initiator names allowed to log in (None = any).
    """

    chap: ChapCredentials | None = None
    mutual: ChapCredentials | None = None
    allowed_initiators: frozenset[str] | None = None

    def allows(self, initiator_name: str) -> bool:
        return self.allowed_initiators is None or initiator_name in self.allowed_initiators


class ScsiDevice(Protocol):
    """The SCSI target device behind one iSCSI target (SAM-5 4.6)."""

    def execute(self, cmd: ScsiCommand) -> ScsiResult: ...

    def has_lun(self, lun: int) -> bool: ...

    def reset_lun(self, lun: int) -> None: ...

    def reset_target(self, cold: bool) -> None: ...

    def nexus_lost(self, nexus: str) -> None: ...


@dataclass(slots=True)
class IscsiTarget:
    """One iSCSI target. ``blocking``: the device's calls may block (for seconds), so they run
    on the server's worker threads, one at a time per device, instead of inline on the event
    loop. Read at login: set it before the target is added to the registry."""

    name: str
    device: ScsiDevice
    auth: TargetAuth = field(default_factory=TargetAuth)
    alias: str = ""
    blocking: bool = False


class TargetRegistry(Protocol):
    discovery_auth: TargetAuth

    def lookup(self, name: str) -> IscsiTarget | None: ...

    def targets(self) -> Iterable[IscsiTarget]: ...


class Targets:
    """A plain mutable registry (the supervisor adds and removes targets live)."""

    def __init__(self, discovery_auth: TargetAuth | None = None) -> None:
        self.discovery_auth = discovery_auth or TargetAuth()
        self._targets: dict[str, IscsiTarget] = {}

    def add(self, target: IscsiTarget) -> None:
        self._targets[target.name] = target

    def remove(self, name: str) -> IscsiTarget | None:
        return self._targets.pop(name, None)

    def lookup(self, name: str) -> IscsiTarget | None:
        return self._targets.get(name)

    def targets(self) -> list[IscsiTarget]:
        return sorted(self._targets.values(), key=lambda t: t.name)
