"""The pieces of the worker data path that need no processes: connection handover
(detach/resume), the zero-copy receive buffers, buffer reuse, per-record compression."""

from __future__ import annotations

import os
from pathlib import Path

from tests.iscsi.fakedisk import FakeDisk
from tests.iscsi.helpers import INITIATOR, TARGET, Initiator, make_registry
from vtl.iscsi import pdu as P
from vtl.iscsi.connection import IscsiConnection, SessionState, State
from vtl.library.cartridge import Cartridge, Compression, RecordHeader, REC_HDR_LEN, SEG_HDR_LEN

BLOCK = 512
KiB = 1024


def _logged_in(disk: FakeDisk) -> tuple[IscsiConnection, Initiator]:
    conn = IscsiConnection(make_registry(disk=disk), local_address=("127.0.0.1", 3260), tsih=7,
                           now=0.0)
    ini = Initiator(conn)
    rsp = ini.login([("InitiatorName", INITIATOR), ("TargetName", TARGET),
                     ("SessionType", "Normal"), ("ImmediateData", "Yes"),
                     ("InitialR2T", "No"), ("MaxRecvDataSegmentLength", "262144")])
    assert rsp.status == 0 and rsp.transit
    return conn, ini


def _write10(lba: int, blocks: int) -> bytes:
    return bytes([0x2A, 0]) + lba.to_bytes(4, "big") + bytes([0]) + blocks.to_bytes(2, "big") \
        + bytes([0])


def test_detached_session_resumes_in_full_feature_phase_with_its_sequence_numbers() -> None:
    disk = FakeDisk()
    conn, ini = _logged_in(disk)
    statsn = conn._statsn
    state, pending = conn.detach()
    assert pending == b"" and conn.state is State.CLOSED and disk.lost == []
    # the state crosses a process boundary as JSON
    state = SessionState.from_json(__import__("json").loads(__import__("json").dumps(
        state.to_json())))
    assert state.target_name == TARGET and state.initiator_name == INITIATOR
    assert state.statsn == statsn and state.tsih == 7
    moved = IscsiConnection.resume(make_registry(disk=disk), state, now=1.0)
    assert moved.state is State.FULL_FEATURE and moved.params.immediate_data
    ini.conn = moved
    data = bytes(range(256)) * 16  # 8 blocks, all immediate
    itt = ini.command(_write10(3, 8), write=data, immediate_len=len(data))
    [rsp] = ini.collect() or [p for p in ini.received if getattr(p, "itt", None) == itt]
    assert isinstance(rsp, P.ScsiResponsePdu) and rsp.status == 0
    assert rsp.statsn == statsn  # StatSN continues where the login left it
    assert bytes(disk.data[3 * BLOCK:11 * BLOCK]) == data
    moved.connection_lost()
    assert disk.lost  # the nexus ends when the resumed connection ends


def test_unparsed_bytes_travel_with_the_session() -> None:
    disk = FakeDisk()
    conn, ini = _logged_in(disk)
    nop = b"".join(bytes(b) for b in P.encode_pdu(P.NopOut(
        immediate=True, itt=0x55, ttt=P.RESERVED_TAG, cmdsn=ini.cmdsn, expstatsn=0)))
    conn._reader.feed(nop[:20])
    state, pending = conn.detach()
    assert pending == nop[:20]
    moved = IscsiConnection.resume(make_registry(disk=disk), state, now=1.0)
    moved.receive_data(pending + nop[20:], 1.0)
    ini.conn = moved
    [answer] = ini.collect()
    assert isinstance(answer, P.NopIn) and answer.itt == 0x55


def test_received_data_lands_in_reused_command_buffers() -> None:
    """Bytes read with receive_buffer/receive_into reach the device intact, in small and odd
    chunks, and a second command of the same size reuses the first one's buffer."""
    disk = FakeDisk()
    conn, ini = _logged_in(disk)
    conn.recycle_buffers = True
    seen: list[object] = []
    original = disk.execute

    def execute(cmd):  # type: ignore[no-untyped-def]
        seen.append(cmd.data_out)  # holding it: no id reuse can fake a match
        return original(cmd)

    disk.execute = execute  # type: ignore[method-assign]
    for round_ in range(3):
        data = os.urandom(64 * KiB)
        raw = b"".join(bytes(b) for b in P.encode_pdu(P.ScsiCommandPdu(
            final=True, write=True, attr=1, lun=bytes(8), itt=100 + round_, edtl=len(data),
            cmdsn=ini.cmdsn, expstatsn=0, cdb=_write10(0, 128).ljust(16, b"\0"), data=data)))
        ini.cmdsn += 1
        pos = 0
        step = 1000 + round_ * 777
        while pos < len(raw):
            buf = conn.receive_buffer()
            n = min(len(buf), step, len(raw) - pos)
            buf[:n] = raw[pos:pos + n]
            conn.receive_into(n, 0.0)
            pos += n
        [rsp] = ini.collect()
        assert isinstance(rsp, P.ScsiResponsePdu) and rsp.status == 0
        assert bytes(disk.data[:len(data)]) == data
    assert seen[0] is seen[1] is seen[2]  # one buffer served every command


def test_compressible_blocks_are_stored_small_and_read_back(tmp_path: Path) -> None:
    cart = Cartridge.create(tmp_path / "t", "CMP001", 1 << 40)
    text = (b"the same backup stream again and again " * 7000)[:256 * KiB]
    noise = os.urandom(256 * KiB)
    for _ in range(4):
        cart.write_block(text, compress=True)
    for _ in range(4):
        cart.write_block(noise, compress=True)
    cart.write_block(text)  # compression off: stored as is
    seg = tmp_path / "t" / "seg-000000.dat"
    cart.sync()
    raw = seg.read_bytes()
    kinds = []
    off = SEG_HDR_LEN
    while off < len(raw):
        hdr = RecordHeader.decode(raw[off:off + REC_HDR_LEN])
        kinds.append((hdr.compression, hdr.stored_length < hdr.logical_length))
        off += hdr.size
    assert kinds[:4] == [(Compression.ZSTD, True)] * 4
    assert all(k == (Compression.NONE, False) for k in kinds[4:])
    assert cart._squeezer is not None and cart._squeezer.tried < 8  # noise was skipped
    assert cart.used_bytes < 6 * 256 * KiB
    cart.rewind()
    got = [cart.read_next().data for _ in range(9)]  # type: ignore[union-attr]
    assert got == [text] * 4 + [noise] * 4 + [text]
    cart.close()
    again = Cartridge.open(tmp_path / "t")  # recovery scan accepts compressed records
    assert again.eod == 9
    again.close()
