"""ONC RPC codec (fileshare/rpc.py): record marking and call/reply byte fixtures (RFC 5531)."""

from __future__ import annotations

import struct

import pytest

from fileshare.rpc import (
    MAX_FRAGMENTS, MAX_RECORD, AcceptStat, AuthFlavor, AuthStat, AuthSys, CallRejected,
    CallUnreadable, RecordError, RecordReassembler, RejectStat, ReplyStat, RpcError,
    decode_call, decode_reply, encode_accept_error, encode_auth_error, encode_call,
    encode_rpc_error, encode_rpc_mismatch, encode_success, frame, record_mark, success_header,
)

CLIENT = ("127.0.0.1", 801)

# A NULL call to NFS v3 with AUTH_SYS (stamp 0x11, machine "host", uid 1000, gid 100,
# gids [100, 4]), written out by hand from RFC 5531 9 and appendix A.
NULL_CALL_AUTH_SYS = bytes.fromhex(
    "00000007"  # xid
    "00000000"  # CALL
    "00000002"  # rpcvers
    "000186a3"  # prog 100003
    "00000003"  # vers
    "00000000"  # proc NULL
    "00000001"  # AUTH_SYS
    "00000020"  # cred length 32
    "00000011"  # stamp
    "00000004" "686f7374"  # "host"
    "000003e8"  # uid 1000
    "00000064"  # gid 100
    "00000002" "00000064" "00000004"  # gids
    "00000000" "00000000"  # verifier AUTH_NONE, empty
)
NULL_CALL_AUTH_NONE = bytes.fromhex(
    "0000002a" "00000000" "00000002" "000186a5" "00000003" "00000001"
    "00000000" "00000000" "00000000" "00000000" "0000000b"  # one argument word
)


def _records(stream: bytes, chunks: list[int] | None = None) -> list[bytes]:
    r = RecordReassembler()
    out = []
    if chunks is None:
        r.receive_data(stream)
    pos = 0
    for n in chunks or []:
        r.receive_data(stream[pos:pos + n])
        pos += n
        while (rec := r.next_record()) is not None:
            out.append(rec)
    while (rec := r.next_record()) is not None:
        out.append(rec)
    return out


# --- record marking ------------------------------------------------------------------------------

def test_record_single_fragment_whole_and_byte_by_byte() -> None:
    stream = frame(NULL_CALL_AUTH_SYS) + frame(NULL_CALL_AUTH_NONE)
    assert stream[:4] == bytes.fromhex("80000048")
    assert _records(stream) == [NULL_CALL_AUTH_SYS, NULL_CALL_AUTH_NONE]
    assert _records(stream, [1] * len(stream)) == [NULL_CALL_AUTH_SYS, NULL_CALL_AUTH_NONE]


def test_record_fragments_are_joined() -> None:
    msg = NULL_CALL_AUTH_SYS
    stream = (record_mark(10, last=False) + msg[:10] + record_mark(0, last=False)
              + record_mark(len(msg) - 10) + msg[10:])
    assert _records(stream) == [msg]
    assert _records(stream, [3] * (len(stream) // 3 + 1)) == [msg]


def test_record_trailing_partial_bytes_wait() -> None:
    stream = frame(NULL_CALL_AUTH_NONE) + frame(NULL_CALL_AUTH_SYS)[:7]
    r = RecordReassembler()
    r.receive_data(stream)
    assert r.next_record() == NULL_CALL_AUTH_NONE
    assert r.next_record() is None
    r.receive_data(frame(NULL_CALL_AUTH_SYS)[7:])
    assert r.next_record() == NULL_CALL_AUTH_SYS


def test_oversized_record_fails_at_the_mark() -> None:
    r = RecordReassembler()
    with pytest.raises(RecordError):  # no payload sent yet: refused from the mark alone
        r.receive_data(record_mark(MAX_RECORD + 1))
    assert r.buffered() == 0
    with pytest.raises(RecordError):  # stays broken
        r.receive_data(b"\0" * 4)


def test_oversized_record_across_fragments() -> None:
    r = RecordReassembler(max_record=100)
    r.receive_data(record_mark(60, last=False) + b"\0" * 60)
    assert r.next_record() is None
    with pytest.raises(RecordError):
        r.receive_data(record_mark(41))


def test_empty_fragment_storm_drops() -> None:
    r = RecordReassembler()
    with pytest.raises(RecordError):
        r.receive_data(record_mark(0, last=False) * (MAX_FRAGMENTS + 1))
        r.next_record()


def test_record_mark_range() -> None:
    assert record_mark(5, last=False) == b"\0\0\0\5"
    with pytest.raises(ValueError):
        record_mark(1 << 31)


# --- calls ---------------------------------------------------------------------------------------

def test_decode_call_auth_sys() -> None:
    call = decode_call(NULL_CALL_AUTH_SYS, CLIENT)
    assert (call.xid, call.prog, call.vers, call.proc) == (7, 100003, 3, 0)
    assert call.flavor == AuthFlavor.AUTH_SYS
    assert call.cred == AuthSys(0x11, "host", 1000, 100, (100, 4))
    assert bytes(call.body) == b""
    assert (call.client_host, call.client_port) == CLIENT


def test_decode_call_auth_none_body_and_trailing_bytes() -> None:
    call = decode_call(NULL_CALL_AUTH_NONE, CLIENT)
    assert call.cred is None and call.flavor == AuthFlavor.AUTH_NONE
    assert bytes(call.body) == bytes.fromhex("0000000b")
    # Bytes after the arguments belong to the body: the program's decoder rejects them.
    call = decode_call(NULL_CALL_AUTH_NONE + b"xyzw", CLIENT)
    assert bytes(call.body) == bytes.fromhex("0000000b") + b"xyzw"


def test_encode_call_round_trip() -> None:
    cred = AuthSys(0x11, "host", 1000, 100, (100, 4))
    assert encode_call(7, 100003, 3, 0, cred=cred) == NULL_CALL_AUTH_SYS
    assert encode_call(42, 100005, 3, 1, bytes.fromhex("0000000b")) == NULL_CALL_AUTH_NONE


@pytest.mark.parametrize("cut", range(0, 8))
def test_decode_call_without_xid_or_type_is_unreadable(cut: int) -> None:
    with pytest.raises(CallUnreadable):
        decode_call(NULL_CALL_AUTH_SYS[:cut], CLIENT)


def test_a_reply_sent_to_the_server_is_unreadable() -> None:
    with pytest.raises(CallUnreadable):
        decode_call(encode_success(9, b""), CLIENT)


@pytest.mark.parametrize("cut", range(8, 40, 4))
def test_decode_call_cut_short_is_garbage_args(cut: int) -> None:
    with pytest.raises(CallRejected) as info:
        decode_call(NULL_CALL_AUTH_NONE[:cut], CLIENT)
    reply = decode_reply(info.value.reply)
    assert reply.xid == 42 and info.value.xid == 42
    assert reply.accept_stat == AcceptStat.GARBAGE_ARGS


def test_decode_call_rpc_version_3_is_rpc_mismatch() -> None:
    bad = NULL_CALL_AUTH_NONE[:8] + struct.pack(">I", 3) + NULL_CALL_AUTH_NONE[12:]
    with pytest.raises(CallRejected) as info:
        decode_call(bad, CLIENT)
    assert info.value.reply == bytes.fromhex(
        "0000002a" "00000001" "00000001" "00000000" "00000002" "00000002")


def _with_cred(cred_body: bytes, flavor: int = 1) -> bytes:
    head = NULL_CALL_AUTH_SYS[:24]
    pad = b"\0" * (-len(cred_body) % 4)
    return (head + struct.pack(">II", flavor, len(cred_body)) + cred_body + pad
            + bytes(8))


def _auth_sys_body(machine: bytes, ngids: int) -> bytes:
    pad = b"\0" * (-len(machine) % 4)
    return (struct.pack(">II", 1, len(machine)) + machine + pad + struct.pack(">II", 0, 0)
            + struct.pack(">I", ngids) + b"\0\0\0\1" * ngids)


def test_auth_sys_limits() -> None:
    ok = decode_call(_with_cred(_auth_sys_body(b"m" * 255, 16)), CLIENT)
    assert ok.cred is not None and len(ok.cred.machine) == 255 and len(ok.cred.gids) == 16
    for body in (_auth_sys_body(b"m" * 256, 0), _auth_sys_body(b"m", 17),
                 _auth_sys_body(b"m", 2)[:-4], _auth_sys_body(b"m", 1) + b"\0\0\0\0"):
        with pytest.raises(CallRejected) as info:
            decode_call(_with_cred(body), CLIENT)
        reply = decode_reply(info.value.reply)
        assert reply.reply_stat == ReplyStat.MSG_DENIED
        assert (reply.reject_stat, reply.auth_stat) == (RejectStat.AUTH_ERROR,
                                                        AuthStat.AUTH_BADCRED)


def test_cred_over_400_bytes_is_garbage() -> None:
    with pytest.raises(CallRejected) as info:
        decode_call(_with_cred(b"\0" * 404), CLIENT)
    assert decode_reply(info.value.reply).accept_stat == AcceptStat.GARBAGE_ARGS


def test_unsupported_flavors() -> None:
    with pytest.raises(CallRejected) as info:
        decode_call(_with_cred(b"\0" * 8, flavor=AuthFlavor.RPCSEC_GSS), CLIENT)
    assert decode_reply(info.value.reply).auth_stat == AuthStat.AUTH_BADCRED
    bad_verf = NULL_CALL_AUTH_SYS[:-8] + struct.pack(">II", 1, 0)
    with pytest.raises(CallRejected) as info:
        decode_call(bad_verf, CLIENT)
    assert decode_reply(info.value.reply).auth_stat == AuthStat.AUTH_BADVERF


# --- replies -------------------------------------------------------------------------------------

def test_reply_fixtures() -> None:
    assert success_header(5) == bytes.fromhex(
        "00000005" "00000001" "00000000" "00000000" "00000000" "00000000")
    assert encode_success(5, b"\0\0\0\1") == success_header(5) + b"\0\0\0\1"
    assert encode_accept_error(5, AcceptStat.PROG_UNAVAIL)[-4:] == b"\0\0\0\1"
    assert encode_accept_error(5, AcceptStat.PROG_MISMATCH, 2, 4)[-12:] == bytes.fromhex(
        "00000002" "00000002" "00000004")
    assert encode_rpc_error(5, RpcError(AcceptStat.PROC_UNAVAIL)) == \
        encode_accept_error(5, AcceptStat.PROC_UNAVAIL)
    assert encode_auth_error(5, AuthStat.AUTH_TOOWEAK) == bytes.fromhex(
        "00000005" "00000001" "00000001" "00000001" "00000005")
    assert encode_rpc_mismatch(5)[-8:] == bytes.fromhex("00000002" "00000002")
    with pytest.raises(ValueError):
        encode_accept_error(5, AcceptStat.SUCCESS)


@pytest.mark.parametrize("stat", list(AcceptStat)[1:])
def test_reply_round_trip(stat: AcceptStat) -> None:
    reply = decode_reply(encode_accept_error(9, stat, 3, 4))
    assert (reply.xid, reply.reply_stat, reply.accept_stat) == (9, ReplyStat.MSG_ACCEPTED, stat)
    if stat == AcceptStat.PROG_MISMATCH:
        assert (reply.low, reply.high) == (3, 4)
    assert decode_reply(encode_success(9, b"abcd")).body == b"abcd"
    denied = decode_reply(encode_rpc_mismatch(9, 2, 2))
    assert (denied.reject_stat, denied.low, denied.high) == (RejectStat.RPC_MISMATCH, 2, 2)


def test_codecs_stay_pure() -> None:
    """xdr.py and rpc.py import no I/O, clock or thread library (STYLE.md layering)."""
    from tests.test_layering import PURE_FORBIDDEN, ROOT, imports, offending

    for module in ("fileshare/xdr.py", "fileshare/rpc.py"):
        assert offending(imports(ROOT / module), PURE_FORBIDDEN) == [], module


def _feed_in_place(r: RecordReassembler, stream: bytes, sizes: list[int]) -> list[bytes]:
    """Feed like a BufferedProtocol: recv_into(get_buffer()) of at most ``sizes[i]`` bytes."""
    out, pos, i = [], 0, 0
    while pos < len(stream):
        buf = r.get_buffer()
        assert len(buf) > 0
        n = min(len(buf), sizes[i % len(sizes)], len(stream) - pos)
        buf[:n] = stream[pos:pos + n]
        buf.release()
        r.buffer_updated(n)
        pos += n
        i += 1
        while (rec := r.next_record()) is not None:
            out.append(bytes(rec))
    return out


@pytest.mark.parametrize("sizes", [[1 << 30], [7, 65536, 3], [4096], [1, 2, 3, 100000]])
def test_in_place_receive_of_big_and_small_records(sizes: list[int]) -> None:
    big = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4: larger than the scratch buffer
    mid = b"m" * (RecordReassembler.SCRATCH - 4)  # exactly fills the scratch buffer
    small = NULL_CALL_AUTH_SYS
    stream = (frame(small) + frame(big) + frame(small) + frame(mid) + frame(small)
              + record_mark(100, last=False) + big[:100] + frame(big[100:]))
    r = RecordReassembler()
    assert _feed_in_place(r, stream, sizes) == [small, big, small, mid, small, big]
    assert r.buffered() == 0 and r.pending() == 0


def test_big_record_is_received_in_its_own_buffer() -> None:
    big = b"x" * (1 << 20)
    r = RecordReassembler()
    r.receive_data(frame(big)[:1000])
    buf = r.get_buffer()
    assert len(buf) == len(big) - 996  # the rest of the record, received in place
    buf.release()
    r.receive_data(frame(big)[1000:])
    record = r.next_record()
    assert isinstance(record, bytearray) and record == big
