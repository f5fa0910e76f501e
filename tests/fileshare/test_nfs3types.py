"""NFS v3 XDR types (fileshare/nfs3types.py): byte fixtures and round trips."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fileshare.fs import Attr, CreateMode, FileType
from fileshare.nfs3types import (
    AccessArgs, CreateArgs, DirOpArgs, FhArgs, LinkArgs, MkdirArgs, ReadArgs, ReaddirArgs,
    RenameArgs, Sattr3, SetattrArgs, StableHow, SymlinkArgs, TimeHow, WriteArgs, pack_fattr3,
    pack_wcc_data, split_ns, unpack_fattr3, unpack_wcc_data,
)
from fileshare.xdr import Packer, Unpacker, XdrError

fh = st.binary(min_size=0, max_size=64)
name = st.binary(max_size=300)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
settime = st.one_of(st.just((TimeHow.DONT_CHANGE, 0, 0)),
                    st.just((TimeHow.SET_TO_SERVER_TIME, 0, 0)),
                    st.tuples(st.just(TimeHow.SET_TO_CLIENT_TIME), u32, u32))
sattr = st.builds(Sattr3, st.none() | u32, st.none() | u32, st.none() | u32, st.none() | u64,
                  settime, settime)
data = st.binary(max_size=100)

ARGS = st.one_of(
    st.builds(FhArgs, fh),
    st.builds(DirOpArgs, fh, name),
    st.builds(SetattrArgs, fh, sattr, st.none() | st.tuples(u32, u32)),
    st.builds(AccessArgs, fh, u32),
    st.builds(ReadArgs, fh, u64, u32),
    data.flatmap(lambda d: st.builds(WriteArgs, fh, u64, st.just(len(d)),
                                     st.sampled_from(list(StableHow)), st.just(d))),
    st.builds(CreateArgs, fh, name, st.sampled_from([CreateMode.UNCHECKED, CreateMode.GUARDED]),
              sattr),
    st.builds(CreateArgs, fh, name, st.just(CreateMode.EXCLUSIVE), st.none(),
              st.binary(min_size=8, max_size=8)),
    st.builds(MkdirArgs, fh, name, sattr),
    st.builds(SymlinkArgs, fh, name, sattr, st.binary(max_size=100)),
    st.builds(RenameArgs, fh, name, fh, name),
    st.builds(LinkArgs, fh, fh, name),
    st.builds(ReaddirArgs, fh, u64, st.binary(min_size=8, max_size=8), u32),
    st.builds(ReaddirArgs, fh, u64, st.binary(min_size=8, max_size=8), u32, u32),
)


def _decoder(args: Any) -> Any:
    if isinstance(args, ReaddirArgs) and args.dircount is not None:
        return ReaddirArgs.decode_plus
    return type(args).decode


@given(ARGS)
def test_arguments_round_trip(args: Any) -> None:
    p = Packer()
    args.encode(p)
    raw = p.getvalue()
    assert len(raw) % 4 == 0
    if isinstance(args, WriteArgs):
        assert WriteArgs.decode_body(raw) == args
    u = Unpacker(raw)
    assert _decoder(args)(u) == args
    u.done()
    # every proper prefix is cut short: an XdrError, never another exception
    for cut in range(0, len(raw), max(1, len(raw) // 16)):
        with pytest.raises(XdrError):
            v = Unpacker(raw[:cut])
            _decoder(args)(v)
            v.done()


def test_write_args_byte_fixture() -> None:
    raw = (struct.pack(">I", 4) + b"\x01\x02\x03\x04" + struct.pack(">QII", 1 << 33, 3, 2)
           + struct.pack(">I", 3) + b"abc\0")
    assert WriteArgs.decode(Unpacker(raw)) == WriteArgs(b"\x01\x02\x03\x04", 1 << 33, 3,
                                                        StableHow.FILE_SYNC, b"abc")
    assert WriteArgs.decode_body(raw) == WriteArgs.decode(Unpacker(raw))
    assert isinstance(WriteArgs.decode_body(raw).data, memoryview)  # no copy of the data
    bad = raw[:-8] + struct.pack(">I", 2) + b"ab\0\0"  # count 3, data 2
    for case in (bad, raw + b"\0\0\0\0", raw[:-1]):
        with pytest.raises(XdrError):
            WriteArgs.decode_body(case)
    with pytest.raises(XdrError):
        WriteArgs.decode(Unpacker(bad))


def test_fattr3_byte_fixture_and_wcc() -> None:
    attr = Attr(FileType.REG, 0o100644, 1, 1000, 100, 5, 4096, 7, 42,
                1_000_000_001 * 10**9 + 5, 2 * 10**9, 3 * 10**9 + 999_999_999, 9)
    p = Packer()
    pack_fattr3(p, attr)
    raw = p.getvalue()
    assert len(raw) == 84
    assert raw == struct.pack(">IIIIIQQIIQQIIIIII", 1, 0o644, 1, 1000, 100, 5, 4096, 0, 0, 7, 42,
                              1_000_000_001, 5, 2, 0, 3, 999_999_999)
    back = unpack_fattr3(Unpacker(raw))
    assert (back.mode, back.atime_ns, back.ctime_ns) == (0o644, attr.atime_ns, attr.ctime_ns)
    p = Packer()
    pack_wcc_data(p, attr, None)
    u = Unpacker(p.getvalue())
    before, after = unpack_wcc_data(u)
    u.done()
    assert before is not None and (before.size, before.mtime_ns) == (5, 2 * 10**9)
    assert after is None


def test_split_ns_clamps() -> None:
    assert split_ns(-1) == (0, 0)
    assert split_ns(1_500_000_000) == (1, 500_000_000)
    assert split_ns(1 << 90) == (2**32 - 1, 999_999_999)


def test_sattr3_to_setattr() -> None:
    s = Sattr3(mode=0o104755, size=0, atime=(TimeHow.SET_TO_SERVER_TIME, 0, 0),
               mtime=(TimeHow.SET_TO_CLIENT_TIME, 10, 20))
    c = s.to_setattr()
    assert (c.mode, c.size, c.atime_server, c.atime_ns, c.mtime_ns) == (0o4755, 0, True, None,
                                                                       10 * 10**9 + 20)
    assert not Sattr3(atime=(TimeHow.SET_TO_CLIENT_TIME, 1, 10**9)).valid()
