"""Fuzz: arbitrary bytes through record marking, call decoding and the MOUNT and portmapper
programs raise only our own errors (hypothesis)."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fileshare.mount import MountProgram
from fileshare.portmap import PortmapProgram, PortRegistry
from fileshare.rpc import (
    AuthSys, CallRejected, CallUnreadable, RecordError, RecordReassembler, RpcError, AuthError,
    decode_call, decode_reply, encode_call, frame,
)
from fileshare.xdr import XdrError
from tests.fileshare.test_mount import FakeExports
from tests.fileshare.test_rpc import _feed_in_place

CLIENT = ("127.0.0.1", 1000)
PROGRAMS = {100000: PortmapProgram(PortRegistry()), 100005: MountProgram(FakeExports())}  # type: ignore[arg-type]


def _serve(record: bytes) -> None:
    """What the server does with one record, minus the sockets."""
    try:
        call = decode_call(record, CLIENT)
    except CallRejected as exc:
        decode_reply(exc.reply)  # a well-formed reply for the same xid
        assert struct.unpack(">I", exc.reply[:4])[0] == exc.xid
        return
    except CallUnreadable:
        return
    program = PROGRAMS.get(call.prog)
    if program is None or call.vers not in program.versions:
        return
    try:
        program.handle(call)
    except (RpcError, AuthError):
        pass


@given(st.binary(max_size=2048), st.integers(1, 64))
@settings(max_examples=400, deadline=None)
def test_arbitrary_stream(data: bytes, chunk: int) -> None:
    r = RecordReassembler(max_record=1024)
    try:
        for i in range(0, len(data), chunk):
            r.receive_data(data[i:i + chunk])
            while (record := r.next_record()) is not None:
                assert len(record) <= 1024
                _serve(record)
    except RecordError:
        pass


@given(st.binary(max_size=4096), st.lists(st.integers(1, 5000), min_size=1, max_size=8))
@settings(max_examples=300, deadline=None)
def test_arbitrary_stream_received_in_place(data: bytes, sizes: list[int]) -> None:
    # The zero-copy path (get_buffer / buffer_updated), records larger than the scratch buffer
    # included: a 2 KiB scratch buffer and a 3 KiB record limit.
    class Small(RecordReassembler):
        SCRATCH = 2048

    try:
        for record in _feed_in_place(Small(max_record=3072), data, sizes):
            assert len(record) <= 3072
            _serve(record)
    except RecordError:
        pass


@given(st.binary(max_size=512))
@settings(max_examples=400, deadline=None)
def test_arbitrary_record(data: bytes) -> None:
    _serve(data)


headers = st.builds(
    lambda xid, prog, vers, proc, cred, body: encode_call(xid, prog, vers, proc, body, cred),
    st.integers(0, 2**32 - 1), st.sampled_from([100000, 100005, 100003, 7]),
    st.integers(1, 5), st.integers(0, 13),
    st.none() | st.builds(AuthSys, st.integers(0, 2**32 - 1), st.text(max_size=20),
                          st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                          st.lists(st.integers(0, 2**32 - 1), max_size=16).map(tuple)),
    st.binary(max_size=128))


@given(headers, st.integers(0, 400), st.binary(min_size=1, max_size=8))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_calls(call: bytes, at: int, junk: bytes) -> None:
    # Well-formed calls with a few bytes overwritten or cut: decode and run, or our errors.
    at %= len(call)
    mutated = call[:at] + junk + call[at + len(junk):]
    _serve(mutated)
    _serve(call[:at])
    r = RecordReassembler()
    r.receive_data(frame(mutated))
    assert r.next_record() == mutated


@given(st.binary(max_size=128))
@settings(max_examples=200, deadline=None)
def test_arbitrary_reply_bytes(data: bytes) -> None:
    try:
        decode_reply(data)
    except XdrError:
        pass
