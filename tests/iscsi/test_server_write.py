"""The gathered-send path of the asyncio edge: what the kernel did not take is resent exactly."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vtl.iscsi.server import _skip


def test_skip_keeps_order_and_cuts_inside_a_buffer() -> None:
    bufs = [b"abc", memoryview(b"defg"), b"", b"hi"]
    assert b"".join(_skip(bufs, 0)) == b"abcdefghi"
    assert b"".join(_skip(bufs, 4)) == b"efghi"
    assert b"".join(_skip(bufs, 7)) == b"hi"
    assert _skip(bufs, 9) == []


@given(st.lists(st.binary(max_size=40), max_size=8), st.data())
def test_skip_equals_slicing_the_joined_bytes(bufs: list[bytes], data: st.DataObject) -> None:
    joined = b"".join(bufs)
    sent = data.draw(st.integers(0, len(joined)))
    assert b"".join(_skip(list(bufs), sent)) == joined[sent:]
