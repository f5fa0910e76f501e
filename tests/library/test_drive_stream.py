"""The tape drive's streaming path (TapeDrive.execute for plain READ(6)/WRITE(6)) answers exactly
as the LogicalUnit dispatcher and the SSC handlers do.

Two drives with identical cartridges get the same random command sequences: one through
``TapeDrive.execute`` (streaming where it may), one through ``SpcDevice.execute`` (the general
path only). Status, sense, data and the cartridge's position and contents must agree after every
command, including unit attentions, reservations of another nexus, the early-warning zone and
the end of a small tape, filemarks, short and long reads, fixed-block and SILI reads, compression
switched on, write protection and an unloaded medium.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings, strategies as st

from tests.library.test_drive import N1, N2, read6, wfm, write6
from vtl.library.cartridge import Cartridge
from vtl.library.drive import TapeDrive
from vtl.library.ssc import CompressionPage
from vtl.scsi.command import ScsiCommand, ScsiResult
from vtl.scsi.sense import Asc
from vtl.scsi.spc import SpcDevice

KiB = 1024
CAPACITY = 512 * KiB  # early warning at 384 KiB, the end at 512 KiB: a few blocks reach them
SEGMENT = 150 * KiB  # and a few segment changes on the way

REWIND = bytes(6)[:0] + bytes([0x01, 0, 0, 0, 0, 0])
TUR = bytes(6)
RESERVE, RELEASE = bytes([0x16, 0, 0, 0, 0, 0]), bytes([0x17, 0, 0, 0, 0, 0])
SPACE_BACK_1 = bytes([0x11, 0, 0xFF, 0xFF, 0xFF, 0])  # one block back
LOAD, UNLOAD = bytes([0x1B, 0, 0, 0, 1, 0]), bytes([0x1B, 0, 0, 0, 0, 0])
# MODE SELECT(6) with the Data Compression page as it is, but DCE (the one changeable bit) on
_PAGE = bytearray(CompressionPage().encode())
_PAGE[2] |= 0x80
COMPRESS_ON = (bytes([0x15, 0x10, 0, 0, 4 + len(_PAGE), 0]), bytes([0, 0, 0x10, 0]) + _PAGE)


def _drives(tmp: Path, read_only: bool) -> tuple[TapeDrive, TapeDrive]:
    pair = []
    for name in ("stream", "general"):
        Cartridge.create(tmp / name, "STR001L8", CAPACITY).close()
        drive = TapeDrive(index=0, serial="42", device_name=name)
        drive.load(Cartridge.open(tmp / name, segment_size=SEGMENT), read_only=read_only)
        pair.append(drive)
    return pair[0], pair[1]


@st.composite
def _sequence(draw: st.DrawFn) -> list[tuple[bytes, bytes, str]]:
    steps: list[tuple[bytes, bytes, str]] = []
    for _ in range(draw(st.integers(1, 60))):
        nexus = draw(st.sampled_from([N1, N1, N1, N1, N2]))
        kind = draw(st.sampled_from(["w", "w", "w", "r", "r", "r", "fm", "rew", "back", "tur",
                                     "res", "rel", "sili", "fixed", "comp", "unload", "load",
                                     "bad", "ua"]))
        n = draw(st.sampled_from([1, 7, 512, 8 * KiB, 64 * KiB, 256 * KiB]))
        if kind == "w":
            data = bytes([draw(st.integers(0, 255))]) * n
            steps.append((write6(n), data, nexus))
        elif kind == "r":
            steps.append((read6(draw(st.sampled_from([n, n, n - 1, n + 1]))), b"", nexus))
        elif kind == "sili":
            steps.append((read6(n, sili=True), b"", nexus))
        elif kind == "fixed":
            steps.append((read6(1, fixed=True), b"", nexus))
        elif kind == "fm":
            steps.append((wfm(1), b"", nexus))
        elif kind == "rew":
            steps.append((REWIND, b"", nexus))
        elif kind == "back":
            steps.append((SPACE_BACK_1, b"", nexus))
        elif kind == "tur":
            steps.append((TUR, b"", nexus))
        elif kind == "res":
            steps.append((RESERVE, b"", nexus))
        elif kind == "rel":
            steps.append((RELEASE, b"", nexus))
        elif kind == "comp":
            steps.append((COMPRESS_ON[0], COMPRESS_ON[1], nexus))
        elif kind == "unload":
            steps.append((UNLOAD, b"", nexus))
        elif kind == "load":
            steps.append((LOAD, b"", nexus))
        elif kind == "ua":  # a unit attention for every nexus (as a medium change gives)
            steps.append((b"", b"", ""))
        else:  # a CONTROL byte with LINK set: ILLEGAL REQUEST from the dispatcher
            steps.append((write6(n)[:5] + b"\x01", bytes(n), nexus))
    return steps


def _same(a: ScsiResult, b: ScsiResult) -> None:
    assert (a.status, bytes(a.data_in), a.sense, a.data_out_expected) == \
        (b.status, bytes(b.data_in), b.sense, b.data_out_expected)


@settings(max_examples=150, deadline=None)
@given(steps=_sequence(), read_only=st.booleans())
def test_streaming_path_answers_as_the_dispatcher(tmp_path_factory, steps, read_only) -> None:  # type: ignore[no-untyped-def]
    stream, general = _drives(tmp_path_factory.mktemp("drives"), read_only)
    try:
        for cdb, data, nexus in steps:
            if not cdb:
                for drive in (stream, general):
                    drive.unit_attention(Asc.NOT_READY_TO_READY_CHANGE)
                continue
            cmd = ScsiCommand(lun=0, cdb=cdb, data_out=data, expected_in=1 << 24, nexus=nexus)
            _same(stream.execute(cmd), SpcDevice.execute(general, cmd))
            a, b = stream.cartridge, general.cartridge
            assert (a is None) == (b is None)
            if a is not None and b is not None:
                assert (a.position, a.eod, a.used_bytes, len(a.segment_paths())) == \
                    (b.position, b.eod, b.used_bytes, len(b.segment_paths()))
        assert (stream.bytes_written, stream.bytes_read) == \
            (general.bytes_written, general.bytes_read)
    finally:
        stream.close()
        general.close()


def test_a_plain_block_stream_takes_the_streaming_path(tmp_path: Path) -> None:
    """Written and read back without the dispatcher (the handlers are never reached)."""
    drive, _ = _drives(tmp_path, False)
    drive.execute(ScsiCommand(0, TUR, nexus=N1))  # the POWER ON unit attention
    drive.execute(ScsiCommand(0, TUR, nexus=N1))  # (and the medium change)
    handled: list[bytes] = []
    for op in (0x08, 0x0A):
        real = TapeDrive._handlers[op]
        drive._handlers = {**drive._handlers,
                           op: lambda self, req, real=real: (handled.append(req.cdb), real(self, req))[1]}
    blocks = [bytes([i]) * (8 * KiB) for i in range(12)]  # (within one segment)
    for block in blocks:
        assert drive.execute(ScsiCommand(0, write6(len(block)), block, nexus=N1)).ok
    assert drive.execute(ScsiCommand(0, REWIND, nexus=N1)).ok
    for i, block in enumerate(blocks):  # with and without SILI (as Bacula and the bench read)
        res = drive.execute(ScsiCommand(0, read6(len(block), sili=bool(i % 2)),
                                        expected_in=len(block), nexus=N1))
        assert res.ok and bytes(res.data_in) == block
    assert handled == []
    assert drive.bytes_written == drive.bytes_read == 12 * 8 * KiB
    drive.close()


def test_the_compression_step_turns_compression_on(tmp_path: Path) -> None:
    drive, _ = _drives(tmp_path, False)
    for _ in range(2):
        drive.execute(ScsiCommand(0, TUR, nexus=N1))
    assert drive.execute(ScsiCommand(0, COMPRESS_ON[0], COMPRESS_ON[1], nexus=N1)).ok
    assert drive._compression.dce
    drive.close()


def test_a_corrupt_block_is_a_medium_error_on_the_streaming_path_too(tmp_path: Path) -> None:
    drive, _ = _drives(tmp_path, False)
    for _ in range(2):
        drive.execute(ScsiCommand(0, TUR, nexus=N1))
    block = bytes(range(256)) * 32
    for _ in range(3):
        assert drive.execute(ScsiCommand(0, write6(len(block)), block, nexus=N1)).ok
    assert drive.execute(ScsiCommand(0, wfm(1), nexus=N1)).ok  # on disk
    seg = tmp_path / "stream" / "seg-000000.dat"
    raw = bytearray(seg.read_bytes())
    raw[-2 * (32 + len(block)) + 100] ^= 0xFF  # a payload byte of the second block
    seg.write_bytes(bytes(raw))
    assert drive.execute(ScsiCommand(0, REWIND, nexus=N1)).ok
    first = drive.execute(ScsiCommand(0, read6(len(block)), nexus=N1))
    assert first.ok and bytes(first.data_in) == block
    second = drive.execute(ScsiCommand(0, read6(len(block)), nexus=N1))
    assert second.status == 2 and (second.sense[2] & 0x0F, second.sense[12]) == (0x03, 0x11)
    drive.close()
