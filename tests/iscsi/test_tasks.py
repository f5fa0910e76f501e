"""The streaming path of SCSI commands (vtl/iscsi/tasks.py) answers exactly as the general path.

Two connections, one with ``stream_commands`` off, get the same bytes: random sequences of
commands that stream (in order, all data immediate) and commands that must not (out of CmdSN
order, immediate bit, solicited data, AHS-free but unsolicited Data-Out, residuals, sense,
Data-In longer than one PDU), with and without digests. Every byte they send back and every
byte their disks hold must be equal, after every PDU.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings, strategies as st

from tests.iscsi.fakedisk import BLOCK, FakeDisk
from tests.iscsi.helpers import INITIATOR, TARGET, Initiator, make_registry
from vtl.iscsi import pdu as P
from vtl.iscsi.connection import IscsiConnection

BLOCKS = 64


def _session(streaming: bool, digests: bool, max_recv: int,
             ) -> tuple[IscsiConnection, FakeDisk, int]:
    """A logged-in connection, its disk, and the next CmdSN."""
    disk = FakeDisk(blocks=BLOCKS)
    conn = IscsiConnection(make_registry(disk=disk), local_address=("127.0.0.1", 3260), tsih=3,
                           now=0.0)
    conn.stream_commands = streaming
    conn.recycle_buffers = True
    ini = Initiator(conn)
    keys = [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal"),
            ("ImmediateData", "Yes"), ("InitialR2T", "No"),
            ("MaxRecvDataSegmentLength", str(max_recv)), ("FirstBurstLength", "16384")]
    if digests:
        keys += [("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")]
    rsp = ini.login(keys)
    assert rsp.status == 0 and rsp.transit
    conn.data_to_send()
    return conn, disk, ini.cmdsn


def _rw10(op: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", op, 0, lba, 0, blocks, 0)


@st.composite
def _commands(draw: st.DrawFn) -> list[tuple[str, bytes, int, int, bytes, int]]:
    """(kind, cdb, edtl, flags, immediate data, data-out length) per command."""
    out = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["tur", "inquiry", "read", "write", "bad", "write_r2t",
                                     "immediate_tur"]))
        lba = draw(st.integers(0, BLOCKS + 2))  # past the end: CHECK CONDITION with sense
        blocks = draw(st.integers(0, 24))
        skew = draw(st.sampled_from([0, 0, 0, -BLOCK, BLOCK]))  # EDTL != CDB: residuals
        if kind in ("tur", "immediate_tur"):
            out.append((kind, bytes(6), 0, 0x80, b"", 0))
        elif kind == "inquiry":
            alloc = draw(st.integers(0, 96))
            out.append((kind, struct.pack(">BBBHB", 0x12, 0, 0, alloc, 0),
                        draw(st.integers(0, 96)), 0xC0, b"", 0))
        elif kind == "read":
            out.append((kind, _rw10(0x28, lba, blocks), max(0, blocks * BLOCK + skew), 0xC0,
                        b"", 0))
        elif kind == "bad":
            out.append((kind, bytes([0xEE]) + bytes(9), 0, 0x80, b"", 0))
        else:
            edtl = max(0, blocks * BLOCK + skew)
            data = bytes(draw(st.binary(min_size=edtl, max_size=edtl))) if edtl < 512 else \
                bytes([draw(st.integers(0, 255))]) * edtl
            imm = len(data) if kind == "write" else draw(st.integers(0, len(data)))
            imm = min(imm, 16384)
            out.append((kind, _rw10(0x2A, lba, blocks), edtl, 0xA0, data[:imm], edtl))
    return out


def _pdus(cmds: list[tuple[str, bytes, int, int, bytes, int]], swap: int | None, cmdsn: int,
          ) -> list[tuple[P.Pdu, bytes, int, int]]:
    """Command PDUs (CmdSN from ``cmdsn``) and what each write still owes as Data-Out."""
    out = []
    for i, (kind, cdb, edtl, flags, imm, total) in enumerate(cmds):
        immediate = kind == "immediate_tur"
        final = not (kind == "write_r2t" and len(imm) < total)  # unsolicited Data-Out follows
        pdu = P.ScsiCommandPdu(immediate=immediate, final=final, read=bool(flags & 0x40),
                               write=bool(flags & 0x20), attr=1, lun=bytes(8), itt=0x100 + i,
                               edtl=edtl, cmdsn=cmdsn, expstatsn=0, cdb=cdb.ljust(16, b"\0"),
                               data=imm)
        out.append((pdu, bytes(total), len(imm), total))
        if not immediate:
            cmdsn += 1
    if swap is not None and swap + 1 < len(out):  # one pair arrives out of CmdSN order
        out[swap], out[swap + 1] = out[swap + 1], out[swap]
    return out


def _feed(conn: IscsiConnection, raw: bytes, chunk: int = 0) -> bytes:
    """Give ``raw`` to the connection as a socket would: ``chunk`` 0 with receive_data, else
    read into its receive buffer in reads of at most ``chunk`` bytes (a huge chunk: one PDU
    per read, the shape the streaming path takes without buffering)."""
    if not chunk:
        conn.receive_data(raw, 1.0)
    else:
        pos = 0
        while pos < len(raw):
            buf = conn.receive_buffer()
            n = min(len(buf), chunk, len(raw) - pos)
            buf[:n] = raw[pos:pos + n]
            conn.receive_into(n, 1.0)
            pos += n
    return b"".join(bytes(b) for b in conn.data_to_send())


def _frame(pdu: P.Pdu, digests: bool) -> bytes:
    return b"".join(bytes(b) for b in P.encode_pdu(pdu, header_digest=digests,
                                                   data_digest=digests))


@settings(max_examples=150, deadline=None)
@given(cmds=_commands(), digests=st.booleans(), swap=st.one_of(st.none(), st.integers(0, 10)),
       max_recv=st.sampled_from([512, 4096, 262144]),
       chunk=st.sampled_from([0, 1 << 30, 1 << 30, 1000, 48]))
def test_streaming_and_general_paths_answer_the_same_bytes(
        cmds: list[tuple[str, bytes, int, int, bytes, int]], digests: bool, swap: int | None,
        max_recv: int, chunk: int) -> None:
    fast, fast_disk, cmdsn = _session(True, digests, max_recv)
    slow, slow_disk, _ = _session(False, digests, max_recv)
    answered = 0
    for pdu, _data, sent, total in _pdus(cmds, swap, cmdsn):
        raw = _frame(pdu, digests)
        got = _feed(fast, raw, chunk)
        assert got == _feed(slow, raw, chunk), pdu
        answered += len(got)
        if isinstance(pdu, P.ScsiCommandPdu) and pdu.write and not pdu.final:
            # the rest as unsolicited Data-Out (within FirstBurstLength), then what R2Ts ask
            rest = P.DataOut(final=True, lun=bytes(8), itt=pdu.itt, ttt=P.RESERVED_TAG,
                             expstatsn=0, datasn=0, offset=sent,
                             data=bytes(min(total, 16384) - sent))
            raw = _frame(rest, digests)
            got = _feed(fast, raw, chunk)
            assert got == _feed(slow, raw, chunk)
            answered += len(got)
        assert fast_disk.data == slow_disk.data
    assert fast._statsn == slow._statsn and fast._expcmdsn == slow._expcmdsn
    assert answered  # (a command outside the CmdSN window would be ignored by both)
    assert fast._expcmdsn == (cmdsn + sum(c[0] != "immediate_tur" for c in cmds)) & 0xFFFFFFFF


def test_a_streamed_write_reuses_the_pooled_buffer_and_answers_good() -> None:
    """The common case really takes the streaming path (no task is created for it)."""
    conn, disk, cmdsn = _session(True, False, 262144)
    created = []
    original = conn._finish

    def finish(task, result):  # type: ignore[no-untyped-def]
        created.append(task)
        original(task, result)

    conn._finish = finish  # type: ignore[method-assign]
    payload = bytes(range(256)) * 32
    for i in range(3):
        pdu = P.ScsiCommandPdu(final=True, write=True, attr=1, lun=bytes(8), itt=7 + i,
                               edtl=len(payload), cmdsn=cmdsn + i, expstatsn=0,
                               cdb=_rw10(0x2A, 16 * i, 16).ljust(16, b"\0"), data=payload)
        out = _feed(conn, _frame(pdu, False))
        rsp = P.decode_pdu(out)
        assert isinstance(rsp, P.ScsiResponsePdu) and rsp.status == 0 and rsp.itt == 7 + i
        assert rsp.expcmdsn == cmdsn + i + 1 and rsp.statsn == conn._statsn - 1
    assert created == []  # no task bookkeeping: every command streamed
    assert bytes(disk.data[:3 * 16 * BLOCK]) == payload * 3
