"""The full-feature-phase state machine, driven byte for byte (RFC 7143)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtl.iscsi import pdu as P
from vtl.iscsi.connection import ConnectionClosed, IscsiConnection, LoginCompleted, decode_lun, \
    encode_lun
from vtl.iscsi.errors import IscsiError, LoginStatus, RejectReason
from vtl.iscsi.login import SessionType
from vtl.iscsi.target import ChapCredentials, TargetAuth
from vtl.iscsi.text import decode_text, encode_text

from tests.iscsi.fakedisk import BLOCK, FakeDisk
from tests.iscsi.helpers import INITIATOR, ISID, TARGET, Initiator, counting_bytes, make_registry

LOCAL = ("192.0.2.10", 3260)


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def session(keys: list[tuple[str, str]] | None = None, *, disk: FakeDisk | None = None,
            nop_interval: float | None = None, auth: TargetAuth | None = None
            ) -> tuple[Initiator, FakeDisk]:
    disk = disk or FakeDisk()
    conn = IscsiConnection(make_registry(auth, disk), local_address=LOCAL, tsih=5, now=0.0,
                           nop_interval=nop_interval, nop_timeout=10.0,
                           random_bytes=counting_bytes)
    ini = Initiator(conn)
    base = [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal")]
    rsp = ini.login(base + (keys or []))
    assert rsp.status == 0 and rsp.transit
    return ini, disk


def test_login_event_and_nexus() -> None:
    disk = FakeDisk()
    conn = IscsiConnection(make_registry(None, disk), local_address=LOCAL, tsih=5, now=0.0)
    raw = P.LoginRequest(transit=True, csg=1, nsg=3, isid=ISID, itt=1, cmdsn=1,
                         data=encode_text([("InitiatorName", INITIATOR),
                                           ("TargetName", TARGET)])).encode()
    events = conn.receive_data(raw, 0.0)
    assert events == [LoginCompleted(INITIATOR, TARGET, SessionType.NORMAL, ISID, 5)]
    assert conn.nexus == f"{INITIATOR},i,0x{ISID:012x}"
    conn.connection_lost()
    assert disk.lost == [conn.nexus]


def test_read_is_split_to_initiator_mrdsl_with_status_in_last_data_in() -> None:
    ini, disk = session([("MaxRecvDataSegmentLength", "1024")])
    disk.data[0:4096] = bytes(range(256)) * 16
    itt = ini.command(read10(0, 8), read=4096)
    data_ins = [p for p in ini.received if isinstance(p, P.DataIn) and p.itt == itt]
    assert [len(p.data) for p in data_ins] == [1024] * 4
    assert [p.datasn for p in data_ins] == [0, 1, 2, 3]
    assert [p.offset for p in data_ins] == [0, 1024, 2048, 3072]
    assert [p.has_status for p in data_ins] == [False, False, False, True]
    assert data_ins[-1].final and data_ins[-1].status == 0
    assert b"".join(p.data for p in data_ins) == bytes(disk.data[:4096])
    assert not any(isinstance(p, P.ScsiResponsePdu) for p in ini.received)


def test_read_underflow_and_overflow_residuals() -> None:
    ini, _ = session()
    ini.command(read10(0, 1), read=1000)  # EDTL > transfer: underflow
    last = ini.received[-1]
    assert isinstance(last, P.DataIn) and last.has_status and last.underflow
    assert last.residual == 1000 - BLOCK and len(last.data) == BLOCK
    ini.command(read10(0, 2), read=BLOCK)  # EDTL < transfer: overflow, truncated
    last = ini.received[-1]
    assert isinstance(last, P.DataIn) and last.overflow and last.residual == BLOCK
    assert len(last.data) == BLOCK


def test_check_condition_goes_in_scsi_response_with_sense() -> None:
    ini, _ = session()
    ini.command(read10(10**6, 1), read=BLOCK)
    rsp = ini.received[-1]
    assert isinstance(rsp, P.ScsiResponsePdu) and rsp.status == 0x02
    sense_len = struct.unpack(">H", rsp.data[:2])[0]
    assert sense_len == 18 and rsp.data[2 + 2] & 0x0F == 0x05 and rsp.data[2 + 12] == 0x21


def test_write_immediate_unsolicited_and_r2t() -> None:
    ini, disk = session([("InitialR2T", "No"), ("ImmediateData", "Yes"),
                         ("FirstBurstLength", "2048"), ("MaxBurstLength", "4096"),
                         ("MaxOutstandingR2T", "2")])
    payload = bytes((i * 7) & 0xFF for i in range(16 * BLOCK))
    itt = ini.command(write10(4, 16), write=payload, immediate_len=1024, final=False)
    assert not any(isinstance(p, P.R2T) for p in ini.received)  # unsolicited phase first
    ini.send(P.DataOut(final=True, itt=itt, ttt=P.RESERVED_TAG, datasn=0, offset=1024,
                       data=payload[1024:2048]))
    r2ts = [p for p in ini.received if isinstance(p, P.R2T)]
    assert [(r.offset, r.length, r.r2tsn) for r in r2ts] == [(2048, 4096, 0), (6144, 2048, 1)]
    for r in r2ts:
        for sn, off in enumerate(range(r.offset, r.offset + r.length, 1024)):
            ini.send(P.DataOut(final=off + 1024 >= r.offset + r.length, itt=itt, ttt=r.ttt,
                               datasn=sn, offset=off, data=payload[off:off + 1024]))
    rsp = ini.received[-1]
    assert isinstance(rsp, P.ScsiResponsePdu) and rsp.status == 0 and rsp.itt == itt
    assert bytes(disk.data[4 * BLOCK:20 * BLOCK]) == payload
    assert rsp.expdatasn == 2


def test_write_whole_in_immediate_data_and_residual() -> None:
    ini, disk = session()
    ini.command(write10(0, 1), write=b"a" * BLOCK, immediate_len=BLOCK)
    rsp = ini.received[-1]
    assert isinstance(rsp, P.ScsiResponsePdu) and rsp.status == 0 and not rsp.underflow
    assert bytes(disk.data[:BLOCK]) == b"a" * BLOCK
    # CDB asks for 2 blocks, EDTL is 1 block: overflow of one block
    ini.command(write10(0, 2), write=b"b" * BLOCK, immediate_len=BLOCK)
    rsp = ini.received[-1]
    assert isinstance(rsp, P.ScsiResponsePdu) and rsp.overflow and rsp.residual == BLOCK


def test_bad_datasn_ends_only_that_task() -> None:
    ini, disk = session([("InitialR2T", "Yes"), ("ImmediateData", "No")])
    itt = ini.command(write10(0, 2), write=bytes(2 * BLOCK))
    r2t = ini.received[-1]
    assert isinstance(r2t, P.R2T) and r2t.length == 2 * BLOCK
    ini.send(P.DataOut(final=False, itt=itt, ttt=r2t.ttt, datasn=5, offset=0, data=bytes(BLOCK)))
    rsp = ini.received[-1]
    assert isinstance(rsp, P.ScsiResponsePdu) and rsp.status == 0x02
    assert rsp.data[2 + 2] & 0x0F == 0x0B  # ABORTED COMMAND
    ini.send(P.DataOut(final=True, itt=itt, ttt=r2t.ttt, datasn=1, offset=BLOCK,
                       data=bytes(BLOCK)))  # late data for the ended task: ignored
    ini.command(b"\0" * 6)  # TEST UNIT READY still works
    assert isinstance(ini.received[-1], P.ScsiResponsePdu) and ini.received[-1].status == 0
    assert not ini.conn.closed


def test_cmdsn_window_ordering_and_out_of_window() -> None:
    ini, disk = session()
    base = ini.cmdsn
    ini.cmdsn = base + 1
    ini.command(b"\0" * 6)  # arrives early: held
    assert ini.received[-1:] and isinstance(ini.received[-1], P.LoginResponse)
    ini.cmdsn = base
    ini.command(b"\0" * 6)
    rsps = [p for p in ini.received if isinstance(p, P.ScsiResponsePdu)]
    assert [r.itt for r in rsps] == [ini.itt, ini.itt - 1]
    assert rsps[-1].expcmdsn == base + 2 and rsps[-1].maxcmdsn - rsps[-1].expcmdsn + 1 >= 32
    n = len(ini.received)
    ini.cmdsn = base + 1000  # beyond MaxCmdSN: silently ignored
    ini.command(b"\0" * 6)
    ini.cmdsn = base - 5  # already seen: ignored
    ini.command(b"\0" * 6)
    assert len(ini.received) == n and not ini.conn.closed


def test_statsn_increments_per_response() -> None:
    ini, _ = session()
    for _ in range(3):
        ini.command(b"\0" * 6)
    sns = [p.statsn for p in ini.received if isinstance(p, (P.ScsiResponsePdu, P.LoginResponse))]
    assert sns == list(range(sns[0], sns[0] + len(sns)))


def test_nop_out_ping_is_echoed() -> None:
    ini, _ = session()
    ini.send(P.NopOut(immediate=True, itt=0x99, cmdsn=ini.cmdsn, data=b"ping data"))
    nop = ini.received[-1]
    assert isinstance(nop, P.NopIn) and nop.itt == 0x99 and nop.data == b"ping data"
    assert nop.ttt == P.RESERVED_TAG
    n = len(ini.received)
    ini.send(P.NopOut(immediate=True, itt=P.RESERVED_TAG, cmdsn=ini.cmdsn))  # no answer wanted
    assert len(ini.received) == n


def test_target_ping_and_timeout_use_passed_in_time() -> None:
    ini, _ = session(nop_interval=5.0)
    conn = ini.conn
    assert conn.next_deadline() == 5.0
    assert conn.handle_timer(4.0) == [] and not conn.data_to_send()
    conn.handle_timer(5.0)
    ping = ini.collect()[-1]
    assert isinstance(ping, P.NopIn) and ping.itt == P.RESERVED_TAG and ping.ttt != P.RESERVED_TAG
    ini.now = 6.0
    ini.send(P.NopOut(immediate=True, itt=P.RESERVED_TAG, ttt=ping.ttt, lun=ping.lun))
    assert conn.next_deadline() == 11.0
    conn.handle_timer(11.0)
    ping2 = ini.collect()[-1]
    assert isinstance(ping2, P.NopIn)
    events = conn.handle_timer(100.0)  # no answer at all
    assert events and isinstance(events[0], ConnectionClosed) and conn.closed


def test_login_timeout_closes() -> None:
    conn = IscsiConnection(make_registry(), local_address=LOCAL, tsih=1, now=0.0,
                           login_timeout=30.0)
    assert conn.next_deadline() == 30.0
    assert conn.handle_timer(30.0) and conn.closed


def test_sendtargets_in_discovery_session() -> None:
    conn = IscsiConnection(make_registry(), local_address=LOCAL, tsih=1, now=0.0)
    ini = Initiator(conn)
    rsp = ini.login([("InitiatorName", INITIATOR), ("SessionType", "Discovery")])
    assert rsp.status == 0
    ini.send(P.TextRequest(final=True, itt=9, cmdsn=ini.cmdsn,
                           data=encode_text([("SendTargets", "All")])))
    txt = ini.received[-1]
    assert isinstance(txt, P.TextResponse) and txt.final
    assert decode_text(txt.data) == [("TargetName", TARGET),
                                     ("TargetAddress", "192.0.2.10:3260,1")]
    ini.send(P.ScsiCommandPdu(itt=10, cmdsn=ini.cmdsn + 1, cdb=bytes(16)))
    rej = ini.received[-1]
    assert isinstance(rej, P.Reject) and rej.reason == RejectReason.PROTOCOL_ERROR


def test_sendtargets_hides_targets_the_initiator_may_not_use() -> None:
    auth = TargetAuth(allowed_initiators=frozenset({"iqn.someone:else"}))
    conn = IscsiConnection(make_registry(auth), local_address=LOCAL, tsih=1, now=0.0)
    ini = Initiator(conn)
    ini.login([("InitiatorName", INITIATOR), ("SessionType", "Discovery")])
    ini.send(P.TextRequest(final=True, itt=9, cmdsn=ini.cmdsn,
                           data=encode_text([("SendTargets", "All")])))
    assert ini.received[-1].data == b""


def test_task_management() -> None:
    ini, disk = session([("InitialR2T", "Yes")])
    itt = ini.command(write10(0, 1), write=bytes(BLOCK))  # waits for data
    assert isinstance(ini.received[-1], P.R2T)
    ini.send(P.TaskMgmtRequest(function=P.TmfFunction.ABORT_TASK, itt=0x500, rtt=itt,
                               cmdsn=ini.cmdsn, refcmdsn=ini.cmdsn - 1))
    tmf = ini.received[-1]
    assert isinstance(tmf, P.TaskMgmtResponse) and tmf.itt == 0x500 and tmf.response == 0
    ini.send(P.TaskMgmtRequest(function=P.TmfFunction.ABORT_TASK, itt=0x501, rtt=itt,
                               cmdsn=ini.cmdsn, refcmdsn=ini.cmdsn - 1))
    assert ini.received[-1].response == P.TmfResponse.TASK_DOES_NOT_EXIST
    ini.send(P.TaskMgmtRequest(function=P.TmfFunction.LOGICAL_UNIT_RESET, itt=0x502,
                               cmdsn=ini.cmdsn))
    assert ini.received[-1].response == 0 and disk.resets == ["lun0"]
    ini.send(P.TaskMgmtRequest(function=P.TmfFunction.ABORT_TASK_SET, itt=0x503,
                               lun=encode_lun(7), cmdsn=ini.cmdsn))
    assert ini.received[-1].response == P.TmfResponse.LUN_DOES_NOT_EXIST
    ini.send(P.TaskMgmtRequest(function=P.TmfFunction.TASK_REASSIGN, itt=0x504, cmdsn=ini.cmdsn))
    assert ini.received[-1].response == P.TmfResponse.NOT_SUPPORTED
    ini.send(P.TaskMgmtRequest(function=P.TmfFunction.TARGET_WARM_RESET, itt=0x505,
                               cmdsn=ini.cmdsn))
    assert ini.received[-1].response == 0 and disk.resets[-1] == "warm" and not ini.conn.closed
    ini.send(P.TaskMgmtRequest(function=P.TmfFunction.TARGET_COLD_RESET, itt=0x506,
                               cmdsn=ini.cmdsn))
    assert ini.received[-1].response == 0 and disk.resets[-1] == "cold" and ini.conn.closed


def test_logout_closes_and_forgets_nexus() -> None:
    ini, disk = session()
    ini.send(P.LogoutRequest(immediate=True, reason=0, itt=77, cmdsn=ini.cmdsn))
    rsp = ini.received[-1]
    assert isinstance(rsp, P.LogoutResponse) and rsp.response == 0 and rsp.itt == 77
    assert ini.conn.closed and disk.lost == [ini.conn.nexus]


def test_logout_for_recovery_is_refused() -> None:
    ini, _ = session()
    ini.send(P.LogoutRequest(immediate=True, reason=2, itt=78, cmdsn=ini.cmdsn))
    assert ini.received[-1].response == 2 and not ini.conn.closed


def test_unknown_opcode_and_snack_are_rejected_without_closing() -> None:
    ini, _ = session()
    raw = bytearray(P.NopOut(itt=1).encode())
    raw[0] = 0x1D
    ini.send_raw(bytes(raw))
    rej = ini.received[-1]
    assert isinstance(rej, P.Reject) and rej.reason == RejectReason.COMMAND_NOT_SUPPORTED
    assert rej.data == bytes(raw[:48])
    ini.send(P.SnackRequest(itt=3))
    assert ini.received[-1].reason == RejectReason.SNACK_REJECT
    ini.command(b"\0" * 6)
    assert isinstance(ini.received[-1], P.ScsiResponsePdu) and not ini.conn.closed


def test_oversized_pdu_closes_connection_with_reject() -> None:
    ini, _ = session()
    head = bytearray(P.NopOut(itt=1).encode())
    head[5:8] = (262145).to_bytes(3, "big")
    events = ini.conn.receive_data(bytes(head), 0.0)
    ini.collect()
    assert isinstance(ini.received[-1], P.Reject) and ini.conn.closed
    assert any(isinstance(e, ConnectionClosed) for e in events)


def test_command_before_login_fails_login() -> None:
    conn = IscsiConnection(make_registry(), local_address=LOCAL, tsih=1, now=0.0)
    ini = Initiator(conn)
    ini.send(P.ScsiCommandPdu(itt=1, cdb=bytes(16)))
    rsp = ini.received[-1]
    assert isinstance(rsp, P.LoginResponse) and rsp.status == LoginStatus.INVALID_DURING_LOGIN
    assert conn.closed


def test_wrong_chap_secret_closes_after_login_reject() -> None:
    auth = TargetAuth(chap=ChapCredentials("u", b"secretsecret"))
    conn = IscsiConnection(make_registry(auth), local_address=LOCAL, tsih=1, now=0.0)
    ini = Initiator(conn)
    rsp = ini.login([("InitiatorName", INITIATOR), ("TargetName", TARGET),
                     ("AuthMethod", "None")], csg=0, nsg=1)
    assert rsp.status == LoginStatus.AUTHENTICATION_FAILURE and conn.closed


def test_digests_apply_after_login() -> None:
    ini, disk = session([("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")])
    assert ini.header_digest and ini.data_digest
    disk.data[:BLOCK] = b"z" * BLOCK
    ini._reader.header_digest = ini._reader.data_digest = True
    ini.command(read10(0, 1), read=BLOCK)
    assert ini.received[-1].data == b"z" * BLOCK
    # a corrupted data digest: Reject, connection stays
    raw = bytearray(b"".join(bytes(b) for b in P.encode_pdu(
        P.NopOut(itt=5, cmdsn=ini.cmdsn, data=b"hello"), header_digest=True, data_digest=True)))
    raw[-1] ^= 0xFF
    ini.send_raw(bytes(raw))
    assert ini.received[-1].reason == RejectReason.DATA_DIGEST_ERROR and not ini.conn.closed


def test_lun_addressing() -> None:
    assert decode_lun(bytes(8)) == 0
    assert decode_lun(bytes([0, 5]) + bytes(6)) == 5
    assert decode_lun(bytes([0x41, 0x02]) + bytes(6)) == 0x102
    assert decode_lun(encode_lun(300)) == 300
    assert decode_lun(bytes([0x80, 0]) + bytes(6)) > 0xFFFF


@given(st.binary(max_size=600))
@settings(max_examples=300, deadline=None)
def test_fuzz_before_login(data: bytes) -> None:
    conn = IscsiConnection(make_registry(), local_address=LOCAL, tsih=1, now=0.0)
    try:
        conn.receive_data(data, 0.0)
        conn.data_to_send()
    except IscsiError:
        pass


@given(st.lists(st.binary(max_size=200), max_size=6), st.lists(st.integers(0, 255), max_size=4))
@settings(max_examples=300, deadline=None)
def test_fuzz_after_login(chunks: list[bytes], opcodes: list[int]) -> None:
    ini, _ = session()
    for i, chunk in enumerate(chunks):
        # give some chunks a plausible header so the fuzzer gets past the length checks
        if i < len(opcodes) and len(chunk) >= 48:
            c = bytearray(chunk)
            c[0] = opcodes[i] & 0x7F
            c[4] = 0
            c[5:8] = (len(chunk) - 48).to_bytes(3, "big")
            chunk = bytes(c)
        try:
            ini.conn.receive_data(chunk, 0.0)
            ini.conn.data_to_send()
        except IscsiError:
            pass


def test_many_queued_commands() -> None:
    ini, disk = session()
    for i in range(40):
        ini.command(read10(i, 1), read=BLOCK)
    done = [p for p in ini.received if isinstance(p, P.DataIn) and p.has_status]
    assert len(done) == 40


@pytest.mark.parametrize("edtl", [0, 100])
def test_non_data_command_with_data_flags(edtl: int) -> None:
    ini, _ = session()
    ini.command(b"\0" * 6, edtl=edtl)
    assert isinstance(ini.received[-1], P.ScsiResponsePdu)


def test_oversized_write_is_refused_in_order_without_soliciting_data() -> None:
    ini, disk = session([("InitialR2T", "Yes")])
    itt = ini.command(write10(0, 1), write=b"", edtl=64 * 1024 * 1024)
    rsp = ini.received[-1]
    assert isinstance(rsp, P.ScsiResponsePdu) and rsp.itt == itt and rsp.status == 0x02
    assert not any(isinstance(p, P.R2T) for p in ini.received)
    ini.command(b"\0" * 6)  # CmdSN advanced past the refused command
    assert ini.received[-1].status == 0


@pytest.mark.parametrize("chunk", [1, 997, 65536])
def test_large_data_out_fed_in_pieces(chunk: int) -> None:
    ini, disk = session([("InitialR2T", "Yes"), ("ImmediateData", "No"),
                         ("DataDigest", "CRC32C")])
    payload = bytes((i * 13) & 0xFF for i in range(32 * BLOCK))
    itt = ini.command(write10(8, 32), write=payload)
    r2t = ini.received[-1]
    assert isinstance(r2t, P.R2T) and r2t.length == len(payload)
    raw = b"".join(bytes(b) for off in range(0, len(payload), 8192) for b in P.encode_pdu(
        P.DataOut(final=off + 8192 >= len(payload), itt=itt, ttt=r2t.ttt, datasn=off // 8192,
                  offset=off, data=payload[off:off + 8192]), data_digest=True))
    for i in range(0, len(raw), chunk):
        ini.conn.receive_data(raw[i:i + chunk], 0.0)
    ini.collect()
    rsp = ini.received[-1]
    assert isinstance(rsp, P.ScsiResponsePdu) and rsp.status == 0
    assert bytes(disk.data[8 * BLOCK:40 * BLOCK]) == payload


def test_rejected_command_does_not_stall_the_cmdsn_window() -> None:
    ini, _ = session([("ImmediateData", "No")])
    ini.command(write10(0, 1), write=bytes(BLOCK), immediate_len=BLOCK)  # not negotiated
    assert isinstance(ini.received[-1], P.Reject)
    ini.command(b"\0" * 6)
    assert isinstance(ini.received[-1], P.ScsiResponsePdu) and ini.received[-1].status == 0


def test_session_write_buffer_budget_answers_task_set_full() -> None:
    ini, _ = session([("InitialR2T", "Yes")])
    for _ in range(16):  # 16 x 16 MiB outstanding writes fill the 256 MiB budget
        ini.command(write10(0, 1), write=b"", edtl=16 * 1024 * 1024)
    assert not any(isinstance(p, P.ScsiResponsePdu) for p in ini.received)
    ini.command(write10(0, 1), write=b"", edtl=BLOCK)
    rsp = ini.received[-1]
    assert isinstance(rsp, P.ScsiResponsePdu) and rsp.status == 0x28  # TASK SET FULL
