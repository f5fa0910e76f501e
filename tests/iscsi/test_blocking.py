"""A blocking target's device calls leave the connection as DeviceCall events (sans-I/O).

The connection is driven byte for byte; a fake executor holds the DeviceCalls and runs them
when the test says, the way the server's worker threads would, so "while a command is at the
device" is a state the test controls exactly.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vtl.iscsi import pdu as P
from vtl.iscsi.connection import ConnectionClosed, DeviceCall, Event, IscsiConnection
from vtl.iscsi.target import IscsiTarget, Targets
from vtl.scsi.command import ScsiCommand, ScsiResult

from tests.iscsi.fakedisk import BLOCK, FakeDisk
from tests.iscsi.helpers import INITIATOR, ISID, TARGET, Initiator, counting_bytes

LOCAL = ("192.0.2.10", 3260)
NEXUS = f"{INITIATOR},i,0x{ISID:012x}"


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


class LoggingDisk(FakeDisk):
    """Records every device call in order, so tests see what ran when."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[str] = []

    def execute(self, cmd: ScsiCommand) -> ScsiResult:
        self.log.append(f"execute 0x{cmd.task_tag:x}")
        return super().execute(cmd)

    def reset_lun(self, lun: int) -> None:
        self.log.append(f"reset_lun {lun}")
        super().reset_lun(lun)

    def reset_target(self, cold: bool) -> None:
        self.log.append("reset_target cold" if cold else "reset_target warm")
        super().reset_target(cold)

    def nexus_lost(self, nexus: str) -> None:
        self.log.append("nexus_lost")
        super().nexus_lost(nexus)


@dataclass
class FakeExecutor:
    """Holds DeviceCalls until :meth:`run_next`; feeds results back like the server does."""

    conn: IscsiConnection
    ini: Initiator | None = None  # collects what each completion sends
    pending: list[DeviceCall] = field(default_factory=list)
    closed_events: list[ConnectionClosed] = field(default_factory=list)

    def take(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, DeviceCall):
                self.pending.append(ev)
            elif isinstance(ev, ConnectionClosed):
                self.closed_events.append(ev)

    def run_next(self) -> object:
        ev = self.pending.pop(0)
        result = ev.call()
        self.take(self.conn.complete(ev.ref, result))
        if self.ini is not None:
            self.ini.collect()
        return result


class EventInitiator(Initiator):
    """The scripted initiator, keeping the events the connection returns."""

    executor: FakeExecutor

    def send_raw(self, data: bytes) -> list[P.Pdu]:
        self.executor.take(self.conn.receive_data(data, self.now))
        return self.collect()


def blocking_session(*, recycle: bool = False) -> tuple[EventInitiator, FakeExecutor, LoggingDisk]:
    disk = LoggingDisk()
    reg = Targets()
    reg.add(IscsiTarget(TARGET, disk, blocking=True))
    conn = IscsiConnection(reg, local_address=LOCAL, tsih=5, now=0.0, nop_interval=None,
                           random_bytes=counting_bytes)
    conn.recycle_buffers = recycle
    ex = FakeExecutor(conn)
    ini = EventInitiator(conn)
    ini.executor = ex
    ex.ini = ini
    rsp = ini.login([("InitiatorName", INITIATOR), ("TargetName", TARGET),
                     ("SessionType", "Normal"), ("ImmediateData", "Yes"),
                     ("InitialR2T", "No")])
    assert rsp.status == 0 and rsp.transit
    ini.collect()
    return ini, ex, disk


def statuses(pdus: list[P.Pdu]) -> list[int]:
    """ITTs of the status-bearing answers to SCSI commands, in the order they came."""
    return [p.itt for p in pdus if isinstance(p, P.ScsiResponsePdu)
            or (isinstance(p, P.DataIn) and p.has_status)]


def tmf(ini: Initiator, function: P.TmfFunction, rtt: int = P.RESERVED_TAG,
        refcmdsn: int = 0) -> int:
    itt = ini.next_itt()
    ini.send(P.TaskMgmtRequest(immediate=True, function=function, lun=bytes(8), itt=itt,
                               rtt=rtt, cmdsn=ini.cmdsn, expstatsn=0, refcmdsn=refcmdsn))
    return itt


def test_commands_run_one_at_a_time_in_cmdsn_order() -> None:
    ini, ex, disk = blocking_session()
    data = bytes(range(256)) * (2 * BLOCK // 256)
    w = ini.command(write10(4, 2), write=data, immediate_len=len(data))
    r1 = ini.command(read10(4, 2), read=2 * BLOCK)
    r2 = ini.command(read10(0, 1), read=BLOCK)
    # nothing ran on the protocol's thread; one call is asked for, the first in CmdSN order
    assert disk.commands == [] and len(ex.pending) == 1
    assert statuses(ini.received) == []
    ex.run_next()
    assert statuses(ini.received) == [w] and disk.log == [f"execute 0x{w:x}"]
    assert len(ex.pending) == 1  # the next one only now
    ex.run_next()
    ex.run_next()
    assert statuses(ini.received) == [w, r1, r2] and not ex.pending
    data_in = b"".join(p.data for p in ini.received if isinstance(p, P.DataIn) and p.itt == r1)
    assert data_in == data


def test_nop_out_and_cmdsn_window_move_while_a_command_is_at_the_device() -> None:
    ini, ex, _ = blocking_session()
    held = ini.command(read10(0, 1), read=BLOCK)
    assert len(ex.pending) == 1
    itt = ini.next_itt()
    out = ini.send(P.NopOut(immediate=True, itt=itt, ttt=P.RESERVED_TAG, cmdsn=ini.cmdsn,
                            data=b"ping"))
    assert [type(p) for p in out] == [P.NopIn] and out[0].itt == itt and out[0].data == b"ping"
    # a non-immediate NOP-Out after the held command: delivered, ExpCmdSN/MaxCmdSN move on
    itt2 = ini.next_itt()
    out = ini.send(P.NopOut(immediate=False, itt=itt2, ttt=P.RESERVED_TAG, cmdsn=ini.cmdsn))
    ini.cmdsn += 1
    assert isinstance(out[0], P.NopIn) and out[0].expcmdsn == ini.cmdsn
    assert out[0].maxcmdsn == ini.cmdsn + 63
    ex.run_next()
    assert statuses(ini.received) == [held]


def test_abort_task_of_the_running_command_waits_and_suppresses_its_status() -> None:
    ini, ex, disk = blocking_session()
    running = ini.command(read10(0, 1), read=BLOCK)
    queued = ini.command(read10(1, 1), read=BLOCK)
    t = tmf(ini, P.TmfFunction.ABORT_TASK, rtt=running, refcmdsn=ini.cmdsn - 2)
    # Response Fence: no TMF Response while the aborted command is still at the device
    assert not any(isinstance(p, P.TaskMgmtResponse) for p in ini.received)
    ex.run_next()  # the aborted command returns: its status is dropped
    ex.run_next()  # the barrier behind it: now the TMF is answered
    rsp = [p for p in ini.received if isinstance(p, P.TaskMgmtResponse)]
    assert [(p.itt, p.response) for p in rsp] == [(t, P.TmfResponse.FUNCTION_COMPLETE)]
    assert running not in statuses(ini.received)
    ex.run_next()  # the queued command was not affected and runs after
    assert statuses(ini.received) == [queued]
    assert disk.log == [f"execute 0x{running:x}", f"execute 0x{queued:x}"]
    # the aborted ITT may be used again
    again = ini.next_itt()
    ini.itt = again - 1
    assert ini.command(read10(0, 1), read=BLOCK) == again
    ex.run_next()
    assert statuses(ini.received)[-1] == again


def test_abort_task_of_a_queued_command_is_answered_at_once() -> None:
    ini, ex, _ = blocking_session()
    running = ini.command(read10(0, 1), read=BLOCK)
    queued = ini.command(read10(1, 1), read=BLOCK)
    t = tmf(ini, P.TmfFunction.ABORT_TASK, rtt=queued, refcmdsn=ini.cmdsn - 1)
    assert [p.itt for p in ini.received if isinstance(p, P.TaskMgmtResponse)] == [t]
    ex.run_next()
    assert statuses(ini.received) == [running] and not ex.pending


def test_lun_reset_runs_after_the_command_at_the_device_and_before_later_ones() -> None:
    ini, ex, disk = blocking_session()
    running = ini.command(read10(0, 1), read=BLOCK)
    ini.command(read10(1, 1), read=BLOCK)  # queued: aborted by the reset
    t = tmf(ini, P.TmfFunction.LOGICAL_UNIT_RESET)
    after = ini.command(read10(2, 1), read=BLOCK)
    assert disk.resets == []  # not on the protocol's thread
    while ex.pending:
        ex.run_next()
    assert disk.log == [f"execute 0x{running:x}", "reset_lun 0", f"execute 0x{after:x}"]
    kinds = [(type(p).__name__, p.itt) for p in ini.received
             if isinstance(p, (P.TaskMgmtResponse, P.DataIn))]
    assert kinds == [("TaskMgmtResponse", t), ("DataIn", after)]


def test_cold_reset_answers_then_closes_after_the_running_command() -> None:
    ini, ex, disk = blocking_session()
    ini.command(read10(0, 1), read=BLOCK)
    t = tmf(ini, P.TmfFunction.TARGET_COLD_RESET)
    assert not ini.conn.closed
    ex.run_next()
    ex.run_next()
    assert [p.itt for p in ini.received if isinstance(p, P.TaskMgmtResponse)] == [t]
    assert ini.conn.closed and ex.closed_events
    ex.run_next()  # the nexus loss, last
    assert disk.log[-2:] == ["reset_target cold", "nexus_lost"] and not ex.pending


def test_connection_lost_while_a_command_runs_drops_the_late_result() -> None:
    ini, ex, disk = blocking_session(recycle=True)
    data = bytes(64 * 1024)
    ini.command(write10(0, 128), write=data, immediate_len=len(data))
    ini.command(read10(0, 1), read=BLOCK)
    ex.take(ini.conn.connection_lost())
    assert len(ex.pending) == 2 and disk.lost == []  # the nexus loss waits its turn
    ex.run_next()  # the write returns after the close: nothing is sent, nothing raises
    assert ini.conn.data_to_send() == [] and ini.collect() == []
    ex.run_next()
    assert disk.log == ["execute 0x2", "nexus_lost"] and disk.lost == [NEXUS]
    assert not ex.pending  # the queued read never reached the device


def test_logout_while_a_command_runs() -> None:
    ini, ex, disk = blocking_session()
    ini.command(read10(0, 1), read=BLOCK)
    out = ini.send(P.LogoutRequest(immediate=True, reason=P.LogoutReason.CLOSE_SESSION,
                                   itt=ini.next_itt(), cmdsn=ini.cmdsn))
    assert [type(p) for p in out] == [P.LogoutResponse] and ini.conn.closed
    while ex.pending:
        ex.run_next()
    assert ini.collect() == [] and disk.log == ["execute 0x2", "nexus_lost"]


def test_a_late_completion_of_an_aborted_write_recycles_its_buffer() -> None:
    ini, ex, _ = blocking_session(recycle=True)
    data = bytes(range(256)) * 256  # 64 KiB: a pooled size
    half = len(data) // 2
    w = ini.command(write10(0, 128), write=data, immediate_len=half, final=False)
    ini.send(P.DataOut(final=True, lun=bytes(8), itt=w, ttt=P.RESERVED_TAG, datasn=0,
                       offset=half, data=data[half:]))
    assert len(ex.pending) == 1
    tmf(ini, P.TmfFunction.ABORT_TASK, rtt=w, refcmdsn=ini.cmdsn - 1)
    ex.run_next()
    ex.run_next()
    assert len(ini.conn._free.get(len(data), [])) == 1  # back in the pool, not lost
    w2 = ini.command(write10(0, 128), write=data, immediate_len=half, final=False)
    assert not ini.conn._free[len(data)]  # taken again
    ini.send(P.DataOut(final=True, lun=bytes(8), itt=w2, ttt=P.RESERVED_TAG, datasn=0,
                       offset=half, data=data[half:]))
    ex.run_next()
    assert statuses(ini.received) == [w2]


def test_unknown_and_repeated_refs_are_ignored() -> None:
    ini, ex, _ = blocking_session()
    ini.command(read10(0, 1), read=BLOCK)
    ev = ex.pending[0]
    assert ini.conn.complete(ev.ref + 1000, None) == []
    ex.run_next()
    assert ini.conn.complete(ev.ref, None) == [] and ini.collect() == []


def test_a_call_that_never_ran_answers_hardware_error() -> None:
    ini, ex, _ = blocking_session()
    itt = ini.command(read10(0, 1), read=BLOCK)
    ev = ex.pending.pop()
    ex.take(ini.conn.complete(ev.ref, None))
    ini.collect()
    rsp = [p for p in ini.received if isinstance(p, P.ScsiResponsePdu)]
    assert [(p.itt, p.status) for p in rsp] == [(itt, 0x02)]
    assert rsp[0].data[2 + 2] & 0x0F == 0x04  # HARDWARE ERROR


def test_detach_refuses_while_device_calls_are_pending() -> None:
    ini, ex, _ = blocking_session()
    ini.command(read10(0, 1), read=BLOCK)
    ex.run_next()
    ini.command(read10(0, 1), read=BLOCK)
    ini.conn._tasks.clear()  # as if the task were gone but its call not answered yet
    try:
        ini.conn.detach()
    except RuntimeError:
        pass
    else:
        raise AssertionError("detach with a device call pending")


def test_inline_targets_never_emit_device_calls() -> None:
    reg = Targets()
    disk = FakeDisk()
    reg.add(IscsiTarget(TARGET, disk))
    conn = IscsiConnection(reg, local_address=LOCAL, tsih=5, now=0.0, nop_interval=None)
    ex = FakeExecutor(conn)
    ini = EventInitiator(conn)
    ini.executor = ex
    ini.login()
    itt = ini.command(read10(0, 1), read=BLOCK)
    assert statuses(ini.received) == [itt] and not ex.pending
    ex.take(conn.connection_lost())
    assert not ex.pending and disk.lost == [NEXUS]
