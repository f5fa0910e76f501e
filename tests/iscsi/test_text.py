"""key=value text (RFC 7143 6.1)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtl.iscsi.errors import TextError
from vtl.iscsi.text import decode_binary, decode_text, encode_hex, encode_text, parse_number


def test_fixture() -> None:
    raw = b"InitiatorName=iqn.x:y\0HeaderDigest=None,CRC32C\0X-com.vendor=1\0"
    pairs = decode_text(raw)
    assert pairs == [("InitiatorName", "iqn.x:y"), ("HeaderDigest", "None,CRC32C"),
                     ("X-com.vendor", "1")]
    assert encode_text(pairs) == raw


def test_padding_nuls_and_missing_final_nul() -> None:
    assert decode_text(b"A=1\0\0\0\0") == [("A", "1")]
    assert decode_text(b"A=1\0B=") == [("A", "1"), ("B", "")]


@pytest.mark.parametrize("bad", [b"noequals\0", b"=value\0", b"K" * 64 + b"=1\0",
                                 b"MaxBurstLength=" + b"9" * 256 + b"\0", b"Bad Key=1\0",
                                 b"A=\xff\xfe\0"])
def test_rejects(bad: bytes) -> None:
    with pytest.raises(TextError):
        decode_text(bad)


def test_too_many_keys() -> None:
    with pytest.raises(TextError):
        decode_text(b"".join(b"K%d=1\0" % i for i in range(300)))


def test_binary_values() -> None:
    assert decode_binary("0x0102ff") == b"\x01\x02\xff"
    assert decode_binary("0bAQL/") == b"\x01\x02\xff"
    assert encode_hex(b"\x01\xab") == "0x01ab"
    for bad in ("12", "0x", "0xzz", "0b!!", "0x" + "00" * 2000):
        with pytest.raises(TextError):
            decode_binary(bad)


def test_numbers() -> None:
    assert parse_number("512", 512, 1 << 24) == 512
    for bad in ("511", "x", "", "99999999999"):
        with pytest.raises(TextError):
            parse_number(bad, 512, 1 << 24)


keys = st.from_regex(r"[A-Za-z0-9.\-+@_]{1,63}", fullmatch=True)
values = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]),
                 max_size=60)


@given(st.lists(st.tuples(keys, values), max_size=20))
def test_round_trip(pairs: list[tuple[str, str]]) -> None:
    assert decode_text(encode_text(pairs)) == pairs


@given(st.binary(max_size=300))
def test_fuzz(data: bytes) -> None:
    try:
        decode_text(data)
    except TextError:
        pass
