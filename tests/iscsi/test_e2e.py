"""End to end: IscsiServer on 127.0.0.1 (port 0) against the real libiscsi tools and a small
Python initiator speaking over a real socket."""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator

import pytest

from vtl.iscsi import pdu as P
from vtl.iscsi.target import ChapCredentials, IscsiTarget, TargetAuth, Targets
from vtl.iscsi.text import decode_text, encode_text

from tests.iscsi.fakedisk import BLOCK, FakeDisk
from tests.iscsi.helpers import HANG_GUARD, ServerThread

pytestmark = pytest.mark.integration

DISK = "iqn.2026-11.org.vtl.e2e:disk"
CHAP = "iqn.2026-11.org.vtl.e2e:chap"
ACL = "iqn.2026-11.org.vtl.e2e:acl"


@pytest.fixture(scope="module")
def disks() -> dict[str, FakeDisk]:
    return {DISK: FakeDisk(8192), CHAP: FakeDisk(), ACL: FakeDisk()}


@pytest.fixture(scope="module")
def server(disks: dict[str, FakeDisk]) -> Iterator[ServerThread]:
    reg = Targets()
    reg.add(IscsiTarget(DISK, disks[DISK], alias="fake disk"))
    reg.add(IscsiTarget(CHAP, disks[CHAP], auth=TargetAuth(
        chap=ChapCredentials("alice", b"alicesecret12"),
        mutual=ChapCredentials("target", b"targetsecret"))))
    reg.add(IscsiTarget(ACL, disks[ACL], auth=TargetAuth(
        allowed_initiators=frozenset({"iqn.2026-11.org.vtl.e2e:allowed"}))))
    with ServerThread(reg) as st:
        yield st


def tool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(args[0])
    if exe is None:
        pytest.skip(f"{args[0]} not installed")
    full_env = dict(os.environ)
    for k in list(full_env):
        if k.startswith("LIBISCSI_CHAP"):
            del full_env[k]
    full_env.update(env or {})
    return subprocess.run([exe, *args[1:]], capture_output=True, text=True, timeout=HANG_GUARD,
                          env=full_env)


def test_iscsi_ls_discovers_targets_and_luns(server: ServerThread) -> None:
    out = tool("iscsi-ls", "-s", f"iscsi://{server.portal}")
    assert f"Target:{DISK} Portal:{server.portal},1" in out.stdout
    assert f"Target:{CHAP} Portal:{server.portal},1" in out.stdout
    assert re.search(r"Lun:0\s+Type:DIRECT_ACCESS", out.stdout)
    # the ACL target is hidden from an initiator that may not use it
    assert ACL not in out.stdout


def test_iscsi_inq(server: ServerThread) -> None:
    out = tool("iscsi-inq", f"iscsi://{server.portal}/{DISK}/0")
    assert out.returncode == 0, out.stderr
    assert "Vendor:VTLTEST" in out.stdout and "Product:FAKE DISK" in out.stdout


def test_chap_one_way_and_mutual(server: ServerThread) -> None:
    good = f"iscsi://alice%alicesecret12@{server.portal}/{CHAP}/0"
    assert tool("iscsi-inq", good).returncode == 0
    bad = tool("iscsi-inq", f"iscsi://alice%wrongsecret1@{server.portal}/{CHAP}/0")
    assert bad.returncode != 0 and "Authentication failure" in bad.stderr + bad.stdout
    assert tool("iscsi-inq", f"iscsi://{server.portal}/{CHAP}/0").returncode != 0
    mutual = tool("iscsi-inq", good, env={"LIBISCSI_CHAP_TARGET_USERNAME": "target",
                                          "LIBISCSI_CHAP_TARGET_PASSWORD": "targetsecret"})
    assert mutual.returncode == 0, mutual.stderr
    spoofed = tool("iscsi-inq", good, env={"LIBISCSI_CHAP_TARGET_USERNAME": "target",
                                           "LIBISCSI_CHAP_TARGET_PASSWORD": "notthesecret"})
    assert spoofed.returncode != 0


def test_acl(server: ServerThread) -> None:
    url = f"iscsi://{server.portal}/{ACL}/0"
    assert tool("iscsi-inq", "-i", "iqn.2026-11.org.vtl.e2e:allowed", url).returncode == 0
    assert tool("iscsi-inq", "-i", "iqn.2026-11.org.vtl.e2e:other", url).returncode != 0


def _cunit(out: str) -> tuple[int, int, int]:
    m = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out)
    assert m, out[-2000:]
    total, ran, passed, failed = map(int, m.groups())
    return ran, passed, failed


def test_libiscsi_iscsi_suites(server: ServerThread) -> None:
    out = tool("iscsi-test-cu", "--dataloss", "-t", "iSCSI", f"iscsi://{server.portal}/{DISK}/0")
    ran, passed, failed = _cunit(out.stdout)
    assert ran >= 15 and failed == 0, out.stdout[-4000:]


def test_libiscsi_data_round_trip(server: ServerThread) -> None:
    tests = ",".join(f"SCSI.{c}.{t}" for c in ("Write10", "Read10")
                     for t in ("Simple", "BeyondEol", "ZeroBlocks", "Async"))
    out = tool("iscsi-test-cu", "--dataloss", "-t", tests, f"iscsi://{server.portal}/{DISK}/0")
    ran, passed, failed = _cunit(out.stdout)
    assert ran == 8 and failed == 0, out.stdout[-4000:]


# --- a Python initiator over a real socket ---------------------------------------------------

class SocketInitiator:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD)
        self.reader = P.PduReader(1 << 24)
        self.hd = self.dd = False
        self.cmdsn = 1
        self.itt = 0

    def send(self, pdu: P.Pdu) -> None:
        self.sock.sendall(b"".join(bytes(b) for b in P.encode_pdu(
            pdu, header_digest=self.hd, data_digest=self.dd)))

    def recv(self) -> P.Pdu:
        while (p := self.reader.next_pdu()) is None:
            chunk = self.sock.recv(1 << 20)
            assert chunk, "connection closed"
            self.reader.feed(chunk)
        return p

    def login(self, keys: list[tuple[str, str]]) -> dict[str, str]:
        self.send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=0x800000000042, itt=0,
                                 cmdsn=self.cmdsn, data=encode_text(keys)))
        rsp = self.recv()
        assert isinstance(rsp, P.LoginResponse) and rsp.status == 0
        got = dict(decode_text(rsp.data))
        self.hd = self.reader.header_digest = got.get("HeaderDigest") == "CRC32C"
        self.dd = self.reader.data_digest = got.get("DataDigest") == "CRC32C"
        return got

    def command(self, cdb: bytes, *, read: int = 0, write: bytes = b"") -> P.Pdu:
        self.itt += 1
        self.send(P.ScsiCommandPdu(final=True, read=bool(read), write=bool(write), attr=1,
                                   itt=self.itt, edtl=read or len(write), cmdsn=self.cmdsn,
                                   cdb=cdb.ljust(16, b"\0")))
        self.cmdsn += 1
        return self.itt  # type: ignore[return-value]

    def close(self) -> None:
        self.sock.close()


def test_digests_and_r2t_over_a_socket(server: ServerThread, disks: dict[str, FakeDisk]) -> None:
    ini = SocketInitiator(server.server.port)
    got = ini.login([("InitiatorName", "iqn.2026-11.org.vtl.e2e:py"), ("TargetName", DISK),
                     ("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C"),
                     ("InitialR2T", "Yes"), ("ImmediateData", "No"),
                     ("MaxRecvDataSegmentLength", "8192"), ("MaxBurstLength", "65536")])
    assert got["HeaderDigest"] == "CRC32C" and got["DataDigest"] == "CRC32C"
    payload = os.urandom(256 * BLOCK)  # 128 KiB: two R2T bursts
    itt = ini.command(struct.pack(">BBIBHB", 0x2A, 0, 1000, 0, 256, 0), write=payload)
    done = 0
    while done < len(payload):
        r2t = ini.recv()
        assert isinstance(r2t, P.R2T) and r2t.itt == itt and r2t.offset == done
        for sn, off in enumerate(range(r2t.offset, r2t.offset + r2t.length, 8192)):
            end = min(off + 8192, r2t.offset + r2t.length)
            ini.send(P.DataOut(final=end == r2t.offset + r2t.length, itt=itt, ttt=r2t.ttt,
                               datasn=sn, offset=off, data=payload[off:end]))
        done += r2t.length
    rsp = ini.recv()
    assert isinstance(rsp, P.ScsiResponsePdu) and rsp.status == 0
    ini.command(struct.pack(">BBIBHB", 0x28, 0, 1000, 0, 256, 0), read=len(payload))
    data = bytearray()
    while True:
        p = ini.recv()
        assert isinstance(p, P.DataIn) and len(p.data) <= 8192
        data += p.data
        if p.has_status:
            assert p.status == 0
            break
    assert bytes(data) == payload
    ini.close()


def test_garbage_and_idle_connections_do_not_disturb_others(server: ServerThread) -> None:
    idle = socket.create_connection(("127.0.0.1", server.server.port))
    idle.close()  # connect + close without login
    junk = socket.create_connection(("127.0.0.1", server.server.port))
    junk.sendall(b"\xff" * 4096)
    junk.settimeout(HANG_GUARD)
    try:
        while junk.recv(4096):
            pass  # the server answers (login reject) and closes
    except ConnectionResetError:
        pass
    junk.close()
    assert tool("iscsi-inq", f"iscsi://{server.portal}/{DISK}/0").returncode == 0


def test_stop_closes_connections() -> None:
    reg = Targets()
    reg.add(IscsiTarget(DISK, FakeDisk()))
    st = ServerThread(reg).__enter__()
    try:
        ini = SocketInitiator(st.server.port)
        ini.login([("InitiatorName", "iqn.2026-11.org.vtl.e2e:py"), ("TargetName", DISK)])
    finally:
        st.__exit__(None, None, None)
    assert ini.sock.recv(1) == b""
    ini.close()


def test_session_reinstatement_closes_the_old_session(server: ServerThread,
                                                      disks: dict[str, FakeDisk]) -> None:
    keys = [("InitiatorName", "iqn.2026-11.org.vtl.e2e:reinstate"), ("TargetName", DISK)]
    first = SocketInitiator(server.server.port)
    first.login(keys)
    second = SocketInitiator(server.server.port)
    second.login(keys)  # same initiator name and ISID: RFC 7143 6.3.5 reinstatement
    assert first.sock.recv(1) == b""  # the old connection is closed
    assert "iqn.2026-11.org.vtl.e2e:reinstate,i,0x800000000042" in disks[DISK].lost
    itt = second.command(b"\0" * 6)
    rsp = second.recv()
    assert isinstance(rsp, P.ScsiResponsePdu) and rsp.itt == itt and rsp.status == 0
    first.close()
    second.close()


def test_unanswered_nop_in_pings_drop_the_connection(disks: dict[str, FakeDisk]) -> None:
    reg = Targets()
    disk = FakeDisk()
    reg.add(IscsiTarget(DISK, disk))
    st = ServerThread(reg)
    st.server.nop_interval, st.server.nop_timeout = 0.05, 0.1
    with st:
        ini = SocketInitiator(st.server.port)
        ini.login([("InitiatorName", "iqn.2026-11.org.vtl.e2e:silent"), ("TargetName", DISK)])
        ping = ini.recv()  # we never answer it
        assert isinstance(ping, P.NopIn) and ping.ttt != P.RESERVED_TAG
        while ini.sock.recv(4096):
            pass  # further pings, then the server closes the connection
        ini.close()
    assert disk.lost == ["iqn.2026-11.org.vtl.e2e:silent,i,0x800000000042"]
