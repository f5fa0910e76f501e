"""A blocking target over 127.0.0.1: while its device holds a command, everything else is served.

The IscsiServer runs in its own event-loop thread; the held LU waits on a threading.Event the
test releases. If the server ran the command on the event loop, the NOP-Out and the other
target below would get no answer and the initiator's bounded waits would fail the test.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time

import pytest

from vtl.iscsi import pdu as P
from vtl.iscsi.initiator import Initiator, InitiatorError
from vtl.iscsi.target import IscsiTarget, Targets
from vtl.scsi.command import ScsiCommand, ScsiResult

from tests.iscsi.fakedisk import BLOCK, FakeDisk
from tests.iscsi.helpers import HANG_GUARD, ServerThread

SLOW = "iqn.2026-11.org.vtl.test:slow"
FAST = "iqn.2026-11.org.vtl.test:fast"
WAIT = 10.0  # the initiator's bound on every answer; never reached when the server is right


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


class GatedDisk(FakeDisk):
    """READ(10) of LBA 7 waits until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.held = threading.Event()
        self.gate = threading.Event()
        self.threads: set[str] = set()
        self.lost_after: list[str] = []
        self.data[7 * BLOCK:8 * BLOCK] = b"held" * (BLOCK // 4)

    def execute(self, cmd: ScsiCommand) -> ScsiResult:
        self.threads.add(threading.current_thread().name)
        if bytes(cmd.cdb[:1]) == b"\x28" and struct.unpack_from(">I", cmd.cdb, 2)[0] == 7:
            self.held.set()
            assert self.gate.wait(HANG_GUARD)
        return super().execute(cmd)

    def nexus_lost(self, nexus: str) -> None:
        self.lost_after.append("gate open" if self.gate.is_set() else "gate closed")
        super().nexus_lost(nexus)


@pytest.fixture()
def portal() -> tuple[ServerThread, GatedDisk, FakeDisk]:
    slow, fast = GatedDisk(), FakeDisk()
    reg = Targets()
    reg.add(IscsiTarget(SLOW, slow, blocking=True))
    reg.add(IscsiTarget(FAST, fast))
    with ServerThread(reg) as srv:
        yield srv, slow, fast
        slow.gate.set()  # never leave a worker waiting


def login(srv: ServerThread, target: str) -> Initiator:
    ini = Initiator.connect("127.0.0.1", srv.server.port, timeout=WAIT)
    ini.login(target, initiator_name="iqn.2026-11.org.vtl.test:ini")
    return ini


def send_read(ini: Initiator, lba: int) -> tuple[int, bytes]:
    """Send READ(10) of one block without waiting for its answer (our initiator's execute()
    waits; this is its first half)."""
    itt = ini._next_itt()
    lun_raw = bytes(8)
    ini._send(P.ScsiCommandPdu(final=True, read=True, attr=1, lun=lun_raw, itt=itt, edtl=BLOCK,
                               cmdsn=ini.cmdsn, expstatsn=ini.expstatsn,
                               cdb=read10(lba, 1).ljust(16, b"\0")))
    ini.cmdsn = (ini.cmdsn + 1) & 0xFFFFFFFF
    return itt, lun_raw


def test_a_held_command_blocks_neither_pings_nor_other_targets(portal) -> None:
    srv, slow, fast = portal
    fast.data[0:BLOCK] = b"fast" * (BLOCK // 4)
    with login(srv, SLOW) as ini:
        itt, lun_raw = send_read(ini, 7)
        assert slow.held.wait(HANG_GUARD)
        # the same connection: a NOP-Out ping is answered while the READ is held
        assert ini.ping(b"still there?") == b"still there?"
        # another target, another connection: served
        with login(srv, FAST) as other:
            reply = other.execute(0, read10(0, 1), expect_in=BLOCK)
            assert reply.status == 0 and reply.data_in == b"fast" * (BLOCK // 4)
        # and another connection to the slow target logs in (its commands wait their turn)
        with login(srv, SLOW) as third:
            assert third.ping() == b""
        slow.gate.set()
        reply = ini._await_status(itt, lun_raw, memoryview(b""), BLOCK)
        assert reply.status == 0 and reply.data_in == b"held" * (BLOCK // 4)
        # the session goes on normally afterwards
        assert ini.execute(0, read10(7, 1), expect_in=BLOCK).data_in == b"held" * (BLOCK // 4)
    assert slow.threads and all(name.startswith("vtl-iscsi-device") for name in slow.threads)
    assert fast.commands  # served inline, as before


def test_connection_dropped_while_a_command_is_held(portal) -> None:
    srv, slow, _ = portal
    ini = login(srv, SLOW)
    send_read(ini, 7)
    assert slow.held.wait(HANG_GUARD)
    ini.close(logout=False)  # the initiator goes away mid-command
    with login(srv, FAST) as other:  # the server is fine meanwhile
        assert other.ping() == b""
    slow.gate.set()
    # the late result is dropped; the device forgets the nexus only after the command returned
    with login(srv, SLOW) as again:
        assert again.execute(0, read10(7, 1), expect_in=BLOCK).status == 0
    assert slow.lost_after[:1] == ["gate open"]


def test_abort_task_of_a_held_command_over_tcp(portal) -> None:
    srv, slow, _ = portal
    with login(srv, SLOW) as ini:
        itt, _ = send_read(ini, 7)
        assert slow.held.wait(HANG_GUARD)
        tmf_itt = ini._next_itt()
        ini._send(P.TaskMgmtRequest(immediate=True, function=P.TmfFunction.ABORT_TASK,
                                    lun=bytes(8), itt=tmf_itt, rtt=itt, cmdsn=ini.cmdsn,
                                    expstatsn=ini.expstatsn, refcmdsn=ini.cmdsn - 1))
        assert ini.ping() == b""  # the TMF waits for the device, the connection does not
        slow.gate.set()
        pdu = ini._recv(time.monotonic() + WAIT)
        # no status for the aborted READ: the next PDU is the TMF Response
        assert isinstance(pdu, P.TaskMgmtResponse) and pdu.itt == tmf_itt
        assert pdu.response == P.TmfResponse.FUNCTION_COMPLETE
        ini._track(pdu)
        assert ini.execute(0, read10(0, 1), expect_in=BLOCK).status == 0


def test_stop_waits_for_the_held_command_and_ends_the_pool() -> None:
    slow = GatedDisk()
    reg = Targets()
    reg.add(IscsiTarget(SLOW, slow, blocking=True))
    srv = ServerThread(reg).__enter__()
    try:
        ini = login(srv, SLOW)
        send_read(ini, 7)
        assert slow.held.wait(HANG_GUARD)
        threading.Timer(0.2, slow.gate.set).start()
    finally:
        srv.__exit__(None, None, None)  # returns once the held call finished
    assert slow.gate.is_set() and slow.lost_after == ["gate open"]
    assert srv.server._pool is None and not srv.server._strands
    with pytest.raises(InitiatorError):
        ini.ping()
    ini.close(logout=False)


def test_call_device_runs_after_the_held_command(portal) -> None:
    """The owner of a blocking target (closing it, a snapshot) queues behind its commands."""
    srv, slow, _ = portal
    order: list[str] = []
    with login(srv, SLOW) as ini:
        itt, lun_raw = send_read(ini, 7)
        assert slow.held.wait(HANG_GUARD)

        def owner_call() -> str:
            order.append("owner" if slow.gate.is_set() else "owner before the command returned")
            return "done"

        fut = asyncio.run_coroutine_threadsafe(srv.server.call_device(slow, owner_call),
                                               srv.loop)
        assert ini.ping() == b""  # the loop is free while both wait
        assert not fut.done() and order == []
        slow.gate.set()
        assert ini._await_status(itt, lun_raw, memoryview(b""), BLOCK).status == 0
        assert fut.result(HANG_GUARD) == "done" and order == ["owner"]

        def broken() -> None:
            raise OSError("disk gone")

        with pytest.raises(OSError, match="disk gone"):
            asyncio.run_coroutine_threadsafe(srv.server.call_device(slow, broken),
                                             srv.loop).result(HANG_GUARD)
        assert ini.execute(0, read10(0, 1), expect_in=BLOCK).status == 0
