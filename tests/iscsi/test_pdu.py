"""Byte-level tests of the PDU codec (RFC 7143 11)."""

from __future__ import annotations

import dataclasses
import struct

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtl.iscsi import pdu as P
from vtl.iscsi.errors import DigestError, IscsiError, PduError, RejectReason

# A Login Request assembled by hand from RFC 7143 11.12: I=1 opcode 0x03, T=1 CSG=1 NSG=3,
# versions 0/0, DSL=16, ISID 0x23d000000001, TSIH 0, ITT 7, CID 1, CmdSN 9, ExpStatSN 0.
LOGIN_FIXTURE = (
    bytes([0x43, 0x87, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10])
    + bytes.fromhex("23d000000001") + b"\x00\x00"
    + struct.pack(">IHHII", 7, 1, 0, 9, 0) + bytes(16)
    + b"SessionType=Disc"
)

# SCSI Command READ(10) of 1 block: R bit, ATTR simple, LUN 0, ITT 0x10, EDTL 512, CmdSN 5.
READ_FIXTURE = (
    bytes([0x01, 0xC1, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00]) + bytes(8)
    + struct.pack(">IIII", 0x10, 512, 5, 3)
    + bytes([0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0]) + bytes(6)
)


def test_login_fixture_decodes() -> None:
    pdu = P.decode_pdu(LOGIN_FIXTURE)
    assert pdu == P.LoginRequest(transit=True, cont=False, csg=1, nsg=3, isid=0x23D000000001,
                                 tsih=0, itt=7, cid=1, cmdsn=9, expstatsn=0,
                                 data=b"SessionType=Disc")
    assert pdu.encode() == LOGIN_FIXTURE


def test_read_fixture_decodes() -> None:
    pdu = P.ScsiCommandPdu.decode(READ_FIXTURE)
    assert pdu.read and not pdu.write and pdu.final and pdu.attr == 1
    assert (pdu.itt, pdu.edtl, pdu.cmdsn, pdu.expstatsn) == (0x10, 512, 5, 3)
    assert pdu.full_cdb()[:10] == bytes([0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0])
    assert pdu.encode() == READ_FIXTURE


def test_reader_byte_by_byte_and_trailing() -> None:
    stream = LOGIN_FIXTURE + READ_FIXTURE + READ_FIXTURE[:10]
    reader = P.PduReader(8192)
    got = []
    for i in range(len(stream)):
        reader.feed(stream[i:i + 1])
        while (p := reader.next_pdu()) is not None:
            got.append(p)
    assert [type(p) for p in got] == [P.LoginRequest, P.ScsiCommandPdu]
    assert reader.buffered == 10
    with pytest.raises(PduError):
        P.decode_pdu(LOGIN_FIXTURE + b"\0")  # trailing bytes
    with pytest.raises(PduError):
        P.decode_pdu(LOGIN_FIXTURE[:-1])  # truncated


def test_padding_is_applied_and_skipped() -> None:
    pdu = P.NopIn(itt=1, data=b"abcde")
    raw = pdu.encode()
    assert len(raw) == 48 + 8 and raw[-3:] == b"\0\0\0"
    assert raw[5:8] == b"\x00\x00\x05"
    assert P.decode_pdu(raw) == pdu


def test_digests_round_trip_and_detect_corruption() -> None:
    pdu = P.DataOut(final=True, itt=3, ttt=9, datasn=1, offset=512, data=b"x" * 13)
    raw = b"".join(bytes(b) for b in P.encode_pdu(pdu, header_digest=True, data_digest=True))
    # the header digest is CRC32C of the BHS, least significant byte first
    assert raw[48:52] == struct.pack("<I", crc32c.crc32c(raw[:48]))
    assert P.decode_pdu(raw, header_digest=True, data_digest=True) == pdu
    bad_header = bytearray(raw)
    bad_header[20] ^= 1
    with pytest.raises(DigestError) as err:
        P.decode_pdu(bytes(bad_header), header_digest=True, data_digest=True)
    assert err.value.fatal
    bad_data = bytearray(raw)
    bad_data[55] ^= 1
    with pytest.raises(DigestError) as err:
        P.decode_pdu(bytes(bad_data), header_digest=True, data_digest=True)
    assert err.value.reason == RejectReason.DATA_DIGEST_ERROR and not err.value.fatal


def test_oversized_data_segment_is_an_error_before_buffering() -> None:
    head = bytearray(P.NopOut(itt=1).encode())
    head[5:8] = (8193).to_bytes(3, "big")
    reader = P.PduReader(8192)
    reader.feed(bytes(head))  # only the header: the length alone must be refused
    with pytest.raises(PduError) as err:
        reader.next_pdu()
    assert err.value.fatal


def test_unknown_opcode_and_ahs_on_wrong_pdu() -> None:
    raw = bytearray(P.NopOut(itt=1).encode())
    raw[0] = 0x1C
    with pytest.raises(PduError) as err:
        P.decode_pdu(bytes(raw))
    assert err.value.reason == RejectReason.COMMAND_NOT_SUPPORTED
    raw = bytearray(P.NopOut(itt=1).encode() + bytes(4))
    raw[4] = 1
    with pytest.raises(PduError):
        P.decode_pdu(bytes(raw))


def test_extended_cdb_ahs() -> None:
    ext = bytes(range(16, 32))
    ahs = struct.pack(">HB", len(ext) + 1, 1) + b"\0" + ext
    ahs += b"\0" * (-len(ahs) % 4)
    pdu = P.ScsiCommandPdu(itt=1, cdb=bytes(range(16)), ahs=ahs)
    back = P.ScsiCommandPdu.decode(pdu.encode())
    assert back.full_cdb() == bytes(range(32))


def test_serial_arithmetic() -> None:
    assert P.sn_lt(0xFFFFFFFF, 0) and not P.sn_lt(0, 0xFFFFFFFF)
    assert P.sn_le(5, 5) and P.sn_lt(5, 6)


# --- hypothesis ----------------------------------------------------------------------------

u32 = st.integers(0, 0xFFFFFFFF)
_FIELD_STRATEGIES = {
    bool: st.booleans(),
    "lun": st.binary(min_size=8, max_size=8),
    "cdb": st.binary(min_size=16, max_size=16),
    "data": st.binary(max_size=300),
    "isid": st.integers(0, (1 << 48) - 1),
    "tsih": st.integers(0, 0xFFFF),
    "cid": st.integers(0, 0xFFFF),
    "csg": st.integers(0, 3), "nsg": st.integers(0, 3),
    "attr": st.integers(0, 7),
    "version_max": st.integers(0, 255), "version_min": st.integers(0, 255),
    "version_active": st.integers(0, 255),
    "reason": st.integers(0, 0x7F), "function": st.integers(0, 0x7F),
    "snack_type": st.integers(0, 15), "response": st.integers(0, 255),
    "status": st.integers(0, 255), "event": st.integers(0, 255), "vcode": st.integers(0, 255),
    "param1": st.integers(0, 0xFFFF), "param2": st.integers(0, 0xFFFF),
    "param3": st.integers(0, 0xFFFF), "time2wait": st.integers(0, 0xFFFF),
    "time2retain": st.integers(0, 0xFFFF), "ahs": st.just(b""),
}


def _strategy(cls: type) -> st.SearchStrategy:
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in _FIELD_STRATEGIES:
            kwargs[f.name] = _FIELD_STRATEGIES[f.name]
        elif f.type in ("bool", bool):
            kwargs[f.name] = st.booleans()
        else:
            kwargs[f.name] = u32
    if cls is P.LoginResponse:
        kwargs["status"] = st.integers(0, 0xFFFF)
    return st.builds(cls, **kwargs)


ALL_PDUS = st.one_of([_strategy(c) for c in P.PDU_CLASSES.values()])


@given(ALL_PDUS, st.booleans(), st.booleans())
@settings(max_examples=400)
def test_round_trip(pdu: P.Pdu, hd: bool, dd: bool) -> None:
    assert P.decode_pdu(pdu.encode()) == pdu
    raw = b"".join(bytes(b) for b in P.encode_pdu(pdu, header_digest=hd, data_digest=dd))
    assert P.decode_pdu(raw, header_digest=hd, data_digest=dd) == pdu


@given(st.binary(max_size=400), st.booleans(), st.booleans())
@settings(max_examples=500)
def test_fuzz_decoder_raises_only_our_errors(data: bytes, hd: bool, dd: bool) -> None:
    reader = P.PduReader(256, header_digest=hd, data_digest=dd)
    reader.feed(data)
    for _ in range(20):
        try:
            if reader.next_pdu() is None:
                break
        except PduError as err:
            if err.fatal:
                break
        except IscsiError:
            break


@given(ALL_PDUS, st.integers(0, 60), st.integers(0, 255))
def test_fuzz_mutated_pdus(pdu: P.Pdu, pos: int, value: int) -> None:
    raw = bytearray(pdu.encode())
    raw[pos % len(raw)] = value
    try:
        P.decode_pdu(bytes(raw))
    except IscsiError:
        pass


@given(st.lists(st.integers(1, 3000), min_size=1, max_size=30), st.booleans(), st.booleans(),
       st.integers(P.PLACE_MIN, 9000))
@settings(max_examples=150, deadline=None)
def test_direct_placement_any_chunking(cuts: list[int], hd: bool, dd: bool, size: int) -> None:
    payload = bytes((i * 31) & 0xFF for i in range(size))
    first = P.DataOut(final=True, itt=1, ttt=2, offset=0, data=payload)
    second = P.NopOut(itt=3, data=b"tail")
    stream = b"".join(bytes(b) for p in (first, second)
                      for b in P.encode_pdu(p, header_digest=hd, data_digest=dd))
    target = bytearray(size + 10)
    asked: list[bytes] = []

    def placer(bhs: bytes) -> memoryview | None:
        asked.append(bhs)
        return memoryview(target)[5:5 + size]

    reader = P.PduReader(1 << 16, header_digest=hd, data_digest=dd, placer=placer)
    got: list[P.Pdu] = []
    pos = 0
    for cut in cuts + [len(stream)]:
        reader.feed(stream[pos:pos + cut])
        pos += cut
        while (p := reader.next_pdu()) is not None:
            got.append(p)
        if pos >= len(stream):
            break
    assert got == [first, second]
    if asked:  # placed: the data went straight into the target buffer
        assert bytes(target[5:5 + size]) == payload and got[0].data.obj is target


def test_direct_placement_detects_bad_data_digest() -> None:
    pdu = P.DataOut(final=True, itt=1, ttt=2, data=bytes(5000))
    raw = bytearray(b"".join(bytes(b) for b in P.encode_pdu(pdu, data_digest=True)))
    raw[-1] ^= 0xFF
    target = bytearray(5000)
    reader = P.PduReader(8192, data_digest=True, placer=lambda bhs: memoryview(target))
    reader.feed(raw[:100])
    assert reader.next_pdu() is None
    reader.feed(raw[100:])
    with pytest.raises(DigestError):
        reader.next_pdu()
    reader.feed(P.NopOut(itt=9).encode())
    assert isinstance(reader.next_pdu(), P.NopOut)  # the stream goes on
