"""The project's own iSCSI initiator (vtl/iscsi/initiator.py).

Two kinds of target:
- an in-process ``IscsiServer`` with a tiny echo device, to reach the paths the appliance's
  defaults never take (InitialR2T=Yes without immediate data and several R2Ts per write, Data-In
  cut into many PDUs, CHAP, target NOP-In pings, digests);
- the real appliance (``vtl serve``), where every answer is compared byte for byte with the
  answer libiscsi (tests/support/libiscsi.py) gets for the same command, so the codec is never
  only tested against itself.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from typing import Iterator

import pytest
from pyscsi.pyscsi.scsi import SCSI
from pyscsi.pyscsi.scsi_sense import SCSICheckCondition

from tests.support.appliance import ApplianceProcess
from tests.support.libiscsi import Session, library_available, parse_element_status
from vtl.iscsi.errors import LoginStatus
from vtl.iscsi.initiator import (
    CheckCondition,
    Initiator,
    InitiatorError,
    InitiatorLoginError,
    InitiatorTimeout,
    PyscsiDevice,
    discover,
    fixed_sense,
    open_session,
)
from vtl.iscsi.login import TargetSettings
from vtl.iscsi.server import IscsiServer
from vtl.iscsi.target import ChapCredentials, IscsiTarget, TargetAuth, Targets
from vtl.scsi.command import ScsiCommand, ScsiResult, ScsiStatus
from vtl.scsi.sense import Asc, SenseKey, encode_fixed_sense

GiB = 1 << 30
ECHO = "iqn.2026-11.org.vtl-appliance.test:echo"
SECURE = "iqn.2026-11.org.vtl-appliance.test:secure"
CHAP_USER, CHAP_SECRET = "backup-host", "s3cretS3cret"


# --- an in-process target ----------------------------------------------------------------------

class EchoDevice:
    """WRITE(6)-like 0x0A stores the data; READ 0x08 returns it; 0xEE fails with 20/00."""

    def __init__(self) -> None:
        self.stored = b""

    def execute(self, cmd: ScsiCommand) -> ScsiResult:
        op = cmd.cdb[0]
        if op == 0x0A:
            self.stored = bytes(cmd.data_out)
            return ScsiResult()
        if op == 0x08:
            return ScsiResult(data_in=self.stored)
        if op == 0xEE:
            return ScsiResult(ScsiStatus.CHECK_CONDITION, sense=encode_fixed_sense(
                SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE))
        return ScsiResult()

    def has_lun(self, lun: int) -> bool:
        return lun == 0

    def reset_lun(self, lun: int) -> None:
        pass

    def reset_target(self, cold: bool) -> None:
        pass

    def nexus_lost(self, nexus: str) -> None:
        pass


class ServerThread:
    """An IscsiServer on 127.0.0.1 (free port) in a background event loop."""

    def __init__(self, settings: TargetSettings, nop_interval: float | None) -> None:
        self.device = EchoDevice()
        self.targets = Targets()
        self.targets.add(IscsiTarget(ECHO, self.device))
        self.targets.add(IscsiTarget(SECURE, EchoDevice(), TargetAuth(
            chap=ChapCredentials(CHAP_USER, CHAP_SECRET.encode()))))
        self.server = IscsiServer(self.targets, "127.0.0.1", 0, nop_interval=nop_interval,
                                  nop_timeout=10.0, settings=settings)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @property
    def port(self) -> int:
        return self.server.port


#: InitialR2T=Yes, no immediate data, bursts of 8 KiB, Data-In in 4 KiB PDUs.
STRICT = TargetSettings(max_recv_data_segment_length=4096, max_burst_length=8192,
                        first_burst_length=4096, initial_r2t=True, immediate_data=False,
                        max_outstanding_r2t=1)


@pytest.fixture(scope="module")
def strict_server() -> Iterator[ServerThread]:
    with ServerThread(STRICT, nop_interval=0.2) as server:
        yield server


@pytest.fixture(scope="module")
def default_server() -> Iterator[ServerThread]:
    with ServerThread(TargetSettings(), nop_interval=None) as server:
        yield server


def _payload(n: int) -> bytes:
    return bytes((i * 7 + (i >> 8)) & 0xFF for i in range(n))


@pytest.mark.parametrize("size", [1, 4095, 4096, 8193, 65536 + 3, 300_000])
def test_write_read_through_r2t_and_many_data_in_pdus(strict_server: ServerThread,
                                                      size: int) -> None:
    data = _payload(size)
    with open_session("127.0.0.1", strict_server.port, ECHO) as ini:
        assert ini.params.initial_r2t and not ini.params.immediate_data
        assert ini.params.max_burst == 8192 and ini.params.max_send == 4096
        assert ini.execute(0, b"\x0a" + bytes(5), data).status == 0
        assert strict_server.device.stored == data
        reply = ini.execute(0, b"\x08" + bytes(5), expect_in=size + 100)
        assert reply.status == 0 and reply.data_in == data and reply.residual == 100
        short = ini.execute(0, b"\x08" + bytes(5), expect_in=size // 2)
        assert short.data_in == data[:size // 2]
        assert short.residual == -(size - size // 2)  # overflow


def test_immediate_and_unsolicited_data(default_server: ServerThread) -> None:
    data = _payload(700_000)  # immediate 256 KiB, then R2Ts for the rest (MaxBurst 1 MiB)
    with open_session("127.0.0.1", default_server.port, ECHO) as ini:
        assert not ini.params.initial_r2t and ini.params.immediate_data
        assert ini.execute(0, b"\x0a" + bytes(5), data).status == 0
        assert default_server.device.stored == data
        assert ini.execute(0, b"\x08" + bytes(5), expect_in=len(data)).data_in == data


def test_check_condition_carries_sense(default_server: ServerThread) -> None:
    with open_session("127.0.0.1", default_server.port, ECHO) as ini:
        reply = ini.execute(0, b"\xee" + bytes(5))
        assert reply.status == 2
        assert fixed_sense(reply.sense) == (SenseKey.ILLEGAL_REQUEST, 0x20, 0x00)
        dev = PyscsiDevice(ini)
        with pytest.raises(SCSICheckCondition) as info:
            dev.execute(_RawCommand(b"\xee" + bytes(5)))
        assert isinstance(info.value, CheckCondition)
        assert (info.value.sense_key, info.value.asc, info.value.ascq) == (5, 0x20, 0)
        assert "20/00" in str(info.value)


def test_target_pings_are_answered(strict_server: ServerThread) -> None:
    with open_session("127.0.0.1", strict_server.port, ECHO) as ini:
        time.sleep(0.7)  # NOP-In interval is 0.2 s: pings queue up while we sleep
        assert ini.execute(0, bytes(6)).status == 0
        assert ini.pings_answered >= 1
        assert ini.ping(b"still there") == b"still there"


def test_digests(default_server: ServerThread) -> None:
    with open_session("127.0.0.1", default_server.port, ECHO, digests=True) as ini:
        assert ini.params.header_digest and ini.params.data_digest
        data = _payload(100_003)
        assert ini.execute(0, b"\x0a" + bytes(5), data).status == 0
        assert ini.execute(0, b"\x08" + bytes(5), expect_in=len(data)).data_in == data


def test_chap(default_server: ServerThread) -> None:
    with open_session("127.0.0.1", default_server.port, SECURE, chap_user=CHAP_USER,
                      chap_secret=CHAP_SECRET) as ini:
        assert ini.execute(0, bytes(6)).status == 0
    with pytest.raises(InitiatorLoginError) as info:
        open_session("127.0.0.1", default_server.port, SECURE, chap_user=CHAP_USER,
                     chap_secret="wrong-secret")
    assert info.value.status == LoginStatus.AUTHENTICATION_FAILURE
    with pytest.raises(InitiatorLoginError, match="CHAP credentials missing"):
        open_session("127.0.0.1", default_server.port, SECURE)


def test_login_errors_are_clear(default_server: ServerThread) -> None:
    with pytest.raises(InitiatorLoginError) as info:
        open_session("127.0.0.1", default_server.port, "iqn.2026-11.org.example:nope")
    assert info.value.status == LoginStatus.NOT_FOUND
    assert "iqn.2026-11.org.example:nope" in str(info.value) and "no such target" in str(info.value)
    with pytest.raises(InitiatorError, match="cannot connect"):
        Initiator.connect("127.0.0.1", 1, timeout=2)
    with Initiator.connect("127.0.0.1", default_server.port) as ini:
        ini.login(discovery=True)
        with pytest.raises(InitiatorError, match="Discovery session"):
            ini.execute(0, bytes(6))


def test_silent_target_times_out() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        ini = Initiator.connect("127.0.0.1", listener.getsockname()[1], timeout=0.5)
        start = time.monotonic()
        with pytest.raises(InitiatorTimeout, match="within 0.5 s"):
            ini.login(ECHO)
        assert time.monotonic() - start < 5 and not ini.connected


class _RawCommand:
    """The minimum of a pyscsi command object: cdb, datain, dataout, sense."""

    def __init__(self, cdb: bytes, datain: int = 0) -> None:
        self.cdb = bytearray(cdb)
        self.datain = bytearray(datain)
        self.dataout = bytearray()
        self.sense = None


# --- the real appliance, compared with libiscsi ------------------------------------------------

needs_libiscsi = pytest.mark.skipif(not library_available(),
                                    reason="libiscsi.so.7 cannot be loaded (make test installs it)")


@pytest.fixture(scope="module")
def library(appliance_session: ApplianceProcess) -> ApplianceProcess:
    reply = appliance_session.call("CreateTapes", prefix="IN", count=3, size_bytes=100 * GiB)
    assert reply.get("ok"), reply
    return appliance_session


def _names(app: ApplianceProcess) -> tuple[str, list[str]]:
    status = app.call("LibraryStatus")["result"]
    return status["changer"]["target_iqn"], [d["target_iqn"] for d in status["drives"]]


def _ready(ini: Initiator) -> None:
    for _ in range(10):
        if ini.execute(0, bytes(6)).status == 0:
            return
    raise AssertionError("TEST UNIT READY never GOOD")


def test_discovery_lists_every_target(library: ApplianceProcess) -> None:
    changer, drives = _names(library)
    found = discover("127.0.0.1", library.port)
    names = [t.name for t in found]
    assert set(names) >= {changer, *drives}
    listed = {t["target_iqn"] for t in library.call("ListTargets")["result"]}
    assert set(names) == listed
    for target in found:
        assert target.addresses == (f"127.0.0.1:{library.port},1",)


def test_appliance_login_to_unknown_target(library: ApplianceProcess) -> None:
    with pytest.raises(InitiatorLoginError) as info:
        open_session("127.0.0.1", library.port, "iqn.2026-11.org.vtl-appliance:no-such-changer")
    assert info.value.status == LoginStatus.NOT_FOUND
    assert "refused: NOT_FOUND" in str(info.value)


@needs_libiscsi
@pytest.mark.parametrize("digests", [False, True])
def test_changer_answers_match_libiscsi(library: ApplianceProcess, digests: bool) -> None:
    changer, _ = _names(library)
    commands = [
        ("INQUIRY", struct.pack(">BBBHB", 0x12, 0, 0, 255, 0), 255),
        ("INQUIRY VPD 0x83", struct.pack(">BBBHB", 0x12, 1, 0x83, 255, 0), 255),
        ("INQUIRY VPD 0x80", struct.pack(">BBBHB", 0x12, 1, 0x80, 255, 0), 255),
        ("REPORT LUNS", struct.pack(">BxxxxxIxx", 0xA0, 64), 64),
        ("READ ELEMENT STATUS", struct.pack(">BBHHB", 0xB8, 0x10, 0, 0xFFFF, 0x02)
         + (1 << 19).to_bytes(3, "big") + b"\0\0", 1 << 19),
        ("READ ELEMENT STATUS drives", struct.pack(">BBHHB", 0xB8, 0x14, 0, 0xFFFF, 0x03)
         + (4096).to_bytes(3, "big") + b"\0\0", 4096),
        ("MOVE MEDIUM from an empty slot", struct.pack(">BxHHHxxBx", 0xA5, 0, 0x1000 + 1500,
                                                       0x1000 + 1501, 0), 0),
        ("unknown opcode", bytes([0xFF]) + bytes(5), 0),
    ]
    with Session(("127.0.0.1:%d" % library.port, changer, 0)) as lib, \
            open_session("127.0.0.1", library.port, changer, digests=digests) as ours:
        _ready(ours)
        for what, cdb, alloc in commands:
            theirs = lib.execute(cdb, expect_in=alloc)
            mine = ours.execute(0, cdb, expect_in=alloc)
            assert mine.status == theirs.status, what
            assert mine.data_in == theirs.data, what
            assert mine.sense == theirs.sense, what
            expected_residual = {"none": 0, "underflow": theirs.residual,
                                 "overflow": -theirs.residual}[theirs.residual_kind]
            assert mine.residual == expected_residual, what
        # the MOVE MEDIUM from an empty slot really was refused with 3B/0E
        refused = ours.execute(0, commands[6][1])
        assert fixed_sense(refused.sense) == (SenseKey.ILLEGAL_REQUEST, 0x3B, 0x0E)


@needs_libiscsi
def test_pyscsi_over_our_initiator_sees_libiscsi_inventory(library: ApplianceProcess) -> None:
    changer, _ = _names(library)
    with open_session("127.0.0.1", library.port, changer) as ini, \
            Session(("127.0.0.1:%d" % library.port, changer, 0)) as lib:
        _ready(ini)
        dev = PyscsiDevice(ini)
        scsi = SCSI(dev)
        assert dev.devicetype == 0x08
        assert bytes(scsi.inquiry().result["t10_vendor_identification"]).strip()
        res = scsi.readelementstatus(0, 0xFFFF, element_type=3, voltag=1,
                                     alloclen=1 << 18).result
        ours = {d["element_address"]: bytes(d["primary_volume_tag"][:32]).strip(b" \0").decode()
                for page in res["element_status_pages"] for d in page["element_descriptors"]
                if d["full"]}
        raw = lib.read_element_status(element_type=3, alloc=1 << 18).check().data
        theirs = {e.address: e.barcode for e in parse_element_status(raw) if e.full}
        assert ours == theirs and len(ours) >= 3
        with pytest.raises(SCSICheckCondition) as info:
            scsi.movemedium(0, 0x1000 + 1599, 0x0100)
        assert (info.value.sense_key, info.value.asc, info.value.ascq) == (5, 0x3B, 0x0E)


@needs_libiscsi
def test_tape_written_by_us_reads_back_through_libiscsi(library: ApplianceProcess) -> None:
    """A 1 MiB WRITE(6) goes out as immediate data + R2T bursts; libiscsi reads it back,
    then libiscsi writes and we read."""
    changer, drives = _names(library)
    tape = next(t for t in library.call("ListTapes")["result"]["tapes"]
                if t["barcode"].startswith("IN") and t["location"]["type"] == "ie")
    # back into a storage slot: returning it to the I/E slot would export it for archiving
    source, drive_addr, home = tape["location"]["address"], 0x0100 + 9, 0x1000 + 1590
    ours_block, theirs_block = _payload(1 << 20), _payload(200_001)[::-1]
    with open_session("127.0.0.1", library.port, changer) as ch:
        _ready(ch)
        move = struct.pack(">BxHHHxxBx", 0xA5, 0, source, drive_addr, 0)
        assert ch.execute(0, move).status == 0
        try:
            with open_session("127.0.0.1", library.port, drives[9]) as drv:
                _ready(drv)
                w6 = bytes([0x0A, 0]) + len(ours_block).to_bytes(3, "big") + b"\0"
                assert drv.execute(0, w6, ours_block).status == 0
                assert drv.execute(0, bytes([0x01]) + bytes(5)).status == 0
                with Session(("127.0.0.1:%d" % library.port, drives[9], 0)) as lib:
                    got = lib.read6(len(ours_block))
                    assert got.good and got.data == ours_block
                    assert lib.write6(theirs_block).good
                    assert lib.rewind().good
                r6 = lambda n: bytes([0x08, 0]) + n.to_bytes(3, "big") + b"\0"  # noqa: E731
                first = drv.execute(0, r6(1 << 20), expect_in=1 << 20)
                second = drv.execute(0, r6(len(theirs_block)), expect_in=len(theirs_block))
                assert first.data_in == ours_block and second.data_in == theirs_block
                assert drv.execute(0, bytes([0x01]) + bytes(5)).status == 0
                assert drv.execute(0, bytes([0x19]) + bytes(5)).status == 0  # ERASE
                assert drv.execute(0, bytes([0x1B]) + bytes(5)).status == 0  # unload
        finally:
            back = struct.pack(">BxHHHxxBx", 0xA5, 0, drive_addr, home, 0)
            assert ch.execute(0, back).status == 0
