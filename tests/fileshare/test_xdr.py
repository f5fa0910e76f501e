"""XDR codec (fileshare/xdr.py, RFC 4506): byte fixtures, round trips, arbitrary bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fileshare.xdr import Packer, Unpacker, XdrError


def test_fixtures() -> None:
    p = Packer()
    p.uint(1)
    p.int(-2)
    p.uhyper(1 << 40)
    p.hyper(-1)
    p.bool(True)
    p.enum(7)
    p.opaque(b"abcde")
    p.string("é")
    p.fopaque(b"xy", 2)
    p.array([1, 2], p.uint)
    p.optional(None, p.uint)
    p.optional(9, p.uint)
    assert p.getvalue() == bytes.fromhex(
        "00000001" "fffffffe" "0000010000000000" "ffffffffffffffff" "00000001" "00000007"
        "00000005" "6162636465000000" "00000002" "c3a90000" "78790000"
        "00000002" "00000001" "00000002" "00000000" "00000001" "00000009")
    assert len(p) == 80 and bytes(p) == p.getvalue()
    u = Unpacker(p.getvalue())
    assert (u.uint(), u.int(), u.uhyper(), u.hyper(), u.bool(), u.enum()) == (
        1, -2, 1 << 40, -1, True, 7)
    assert (u.opaque(), u.string(), u.fopaque(2), u.array(u.uint)) == (
        b"abcde", "é", b"xy", [1, 2])
    assert (u.optional(u.uint), u.optional(u.uint)) == (None, 9)
    u.done()


def test_padding_is_written_as_zeros_and_accepted_as_anything() -> None:
    p = Packer()
    p.opaque(b"a")
    assert p.getvalue() == b"\0\0\0\1a\0\0\0"
    assert Unpacker(b"\0\0\0\1a\xff\xff\xff").opaque() == b"a"


@pytest.mark.parametrize("data", [b"", b"\0", b"\0\0\0"])
def test_short_reads(data: bytes) -> None:
    for read in ("uint", "int", "bool", "enum", "opaque", "string"):
        with pytest.raises(XdrError):
            getattr(Unpacker(data), read)()
    with pytest.raises(XdrError):
        Unpacker(data + b"\0" * 4).uhyper()


def test_limits_and_invalid_values() -> None:
    with pytest.raises(XdrError):
        Unpacker(b"\0\0\0\2").bool()
    with pytest.raises(XdrError):
        Unpacker(b"\0\0\0\5abcde\0\0\0").opaque(4)
    with pytest.raises(XdrError):
        Unpacker(b"\0\0\0\3" + b"\0" * 8).array(lambda: 0, max_items=2)
    with pytest.raises(XdrError):
        Unpacker(b"\xff\xff\xff\xff").array(lambda: 0)
    with pytest.raises(XdrError):
        Unpacker(b"\0\0\0\1\0").done()
    with pytest.raises(XdrError):
        Packer().fopaque(b"abc", 4)
    with pytest.raises(XdrError):
        Packer().raw(b"abc")


def test_unpacker_over_memoryview_and_offset() -> None:
    data = bytearray(b"\0\0\0\1\0\0\0\2")
    u = Unpacker(memoryview(data), 4)
    assert u.uint() == 2 and u.remaining() == 0
    u = Unpacker(data)
    assert u.rest() == bytes(data) and u.pos == 8


values = st.one_of(
    st.tuples(st.just("uint"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("int"), st.integers(-(2**31), 2**31 - 1)),
    st.tuples(st.just("uhyper"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("hyper"), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just("bool"), st.booleans()),
    st.tuples(st.just("opaque"), st.binary(max_size=64)),
    st.tuples(st.just("string"), st.text(max_size=32)),
)


@given(st.lists(values, max_size=12))
@settings(max_examples=200, deadline=None)
def test_round_trip(items: list[tuple[str, object]]) -> None:
    p = Packer()
    for kind, value in items:
        getattr(p, kind)(value)
    assert len(p) % 4 == 0
    u = Unpacker(p.getvalue())
    assert [getattr(u, kind)() for kind, _ in items] == [v for _, v in items]
    u.done()


@given(st.binary(max_size=256), st.lists(st.sampled_from(
    ["uint", "int", "uhyper", "hyper", "bool", "opaque", "string", "array", "optional"]),
    max_size=10))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_raise_only_xdr_error(data: bytes, reads: list[str]) -> None:
    u = Unpacker(data)
    try:
        for read in reads:
            if read == "array":
                u.array(u.uint, max_items=64)
            elif read == "optional":
                u.optional(u.string)
            else:
                getattr(u, read)()
        u.done()
    except XdrError:
        pass
