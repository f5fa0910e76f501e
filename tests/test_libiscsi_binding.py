"""The ctypes libiscsi binding (tests/support/libiscsi.py) proven against an independent target.

tgt is started by ``bench.tgt.TgtPeer`` on 127.0.0.1 (installed with apt-get when missing); the
tests skip, saying why, only when tgt or libiscsi cannot be had. Expected values come from the
standards (SPC-4, SBC-3, SSC-4, SMC-3); where tgt is known to deviate (see FACTS.md) the test
does not assert the deviation.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator

import pytest

from bench.tgt import TgtPeer, TgtUnavailable, ensure_tgt
from tests.support.libiscsi import (
    Command,
    LibiscsiError,
    Result,
    ScsiStatusError,
    Session,
    _parse_target,
    library_available,
    parse_element_status,
    run_queue_depth,
)

DISK_MB = 64
NO_SENSE, NOT_READY, BLANK_CHECK, ILLEGAL_REQUEST = 0x0, 0x2, 0x8, 0x5


def _tgt_or_skip() -> None:
    if not library_available():
        pytest.skip("libiscsi.so.7 cannot be loaded (apt-get install libiscsi7)")
    if os.geteuid() != 0:
        pytest.skip("tgtd needs root")
    try:
        ensure_tgt()
    except TgtUnavailable as exc:
        pytest.skip(f"tgt unavailable: {exc}")


@pytest.fixture(scope="module")
def tgt() -> Iterator[TgtPeer]:
    """tgt with a 64 MiB disk LUN and a VTL of 2 drives and 3 tapes."""
    _tgt_or_skip()
    with TgtPeer(0, disk_mb=DISK_MB, vtl=True, drives=2, tapes=3, tape_mb=256) as peer:
        yield peer


@pytest.fixture
def disk(tgt: TgtPeer) -> Iterator[Session]:
    with Session(tgt.url(tgt.disk)) as session:
        yield session


@pytest.fixture
def changer(tgt: TgtPeer) -> Iterator[Session]:
    with Session(tgt.url(tgt.changer)) as session:
        yield session


# -- SPC / SBC on the disk LUN ---------------------------------------------------------------------


def test_inquiry_standard_data(disk: Session) -> None:
    result = disk.inquiry().check()
    assert result.data[0] & 0x1F == 0x00  # direct access block device
    assert result.data[8:16].decode().strip() == "IET"
    assert result.data[16:32].decode().strip() == "VIRTUAL-DISK"
    assert len(result.data) == result.data[4] + 5


def test_inquiry_vpd_serial(disk: Session) -> None:
    result = disk.inquiry(evpd=True, page=0x80).check()
    assert result.data[1] == 0x80
    assert result.data[4 : 4 + result.data[3]].decode().strip() == "DSK0000001"


def test_read_capacity16(disk: Session) -> None:
    blocks, block_size = disk.capacity()
    assert block_size == 512
    assert blocks * block_size == DISK_MB << 20


def test_write_read_round_trip(disk: Session) -> None:
    payload = random.Random(1).randbytes(64 * 1024)
    disk.write10(100, payload).check()
    assert disk.read10(100, len(payload) // 512).check().data == payload
    tail = random.Random(2).randbytes(8192)
    last = (DISK_MB << 20) // 512 - 16
    disk.write16(last, tail).check()
    assert disk.read16(last, 16).check().data == tail


def test_synchronous_command_status_writes_and_reports_status(disk: Session) -> None:
    """``command_status`` (the latency benchmark's path) writes the data and returns the
    status: GOOD for a good WRITE(10), CHECK CONDITION past the end; the async path agrees."""
    payload = random.Random(3).randbytes(4096)
    cdb = struct.pack(">BBIBHB", 0x2A, 0, 200, 0, 8, 0)
    assert disk.command_status(cdb, payload) == 0
    assert disk.read10(200, 8).check().data == payload
    past = struct.pack(">BBIBHB", 0x2A, 0, (DISK_MB << 20) // 512, 0, 8, 0)
    assert disk.command_status(past, payload) == 2
    assert disk.test_unit_ready().good  # the session goes on


def test_invalid_opcode_gives_illegal_request(disk: Session) -> None:
    result = disk.execute(bytes([0xFF, 0, 0, 0, 0, 0]))
    assert result.check_condition
    assert (result.sense_key, result.asc, result.ascq) == (ILLEGAL_REQUEST, 0x20, 0x00)
    assert result.sense[0] & 0x7F == 0x70  # raw fixed-format sense is exposed
    assert result.sense[2] & 0x0F == ILLEGAL_REQUEST
    with pytest.raises(ScsiStatusError) as raised:
        result.check()
    assert raised.value.result is result


def test_read_past_end_gives_lba_out_of_range(disk: Session) -> None:
    result = disk.read10((DISK_MB << 20) // 512, 1)
    assert (result.sense_key, result.asc, result.ascq) == (ILLEGAL_REQUEST, 0x21, 0x00)


def test_short_reply_reports_underflow_residual(disk: Session) -> None:
    result = disk.inquiry(alloc=255).check()
    assert result.residual_kind == "underflow"
    assert result.residual == 255 - len(result.data)
    assert 36 <= len(result.data) < 255


def test_allocation_length_truncates_without_residual(disk: Session) -> None:
    result = disk.inquiry(alloc=5).check()
    assert len(result.data) == 5
    assert result.residual_kind == "none"


def test_residual_is_reported_with_check_condition(disk: Session) -> None:
    # Expected data transfer length (16) below the CDB's allocation length (255): tgt refuses the
    # command with INVALID FIELD IN CDB and reports the whole EDTL as untransferred; the binding
    # must surface the residual of a CHECK CONDITION as well as its sense.
    cdb = struct.pack(">BBBHB", 0x12, 0, 0, 255, 0)
    result = disk.execute(cdb, expect_in=16)
    assert (result.sense_key, result.asc, result.ascq) == (ILLEGAL_REQUEST, 0x24, 0x00)
    assert (result.residual_kind, result.residual, result.data) == ("underflow", 16, b"")


def test_header_digest_crc32c(tgt: TgtPeer) -> None:
    with Session(tgt.url(tgt.disk), header_digest="crc32c") as session:
        assert session.inquiry().check().data[8:11] == b"IET"


def test_queue_depth_reads_return_the_right_blocks(disk: Session) -> None:
    pattern = b"".join(struct.pack(">I", lba) * 128 for lba in range(2000, 2064))
    disk.write10(2000, pattern).check()
    order = [2000 + (i * 37) % 64 for i in range(256)]
    seen: dict[int, bytes] = {}

    def factory(i: int) -> Command:
        return Command(struct.pack(">BBIBHB", 0x28, 0, order[i], 0, 1, 0), expect_in=512)

    def on_result(i: int, result: Result) -> None:
        seen[i] = result.data

    report = run_queue_depth(disk, factory, 256, 16, on_result)
    assert (report.completed, report.good, report.first_failure) == (256, 256, None)
    for i, lba in enumerate(order):
        assert seen[i] == struct.pack(">I", lba) * 128


def test_login_without_tur_sees_the_power_on_unit_attention(tgt: TgtPeer) -> None:
    with Session(tgt.url(tgt.disk), consume_unit_attention=False) as session:
        first = session.test_unit_ready()
        assert (first.sense_key, first.asc) == (0x6, 0x29)  # UNIT ATTENTION, POWER ON OR RESET
        assert session.test_unit_ready().good


def test_url_forms() -> None:
    assert _parse_target("iscsi://u%s3cret@127.0.0.1:3261/iqn.2025-01.org.x:y/3") == (
        "127.0.0.1:3261", "iqn.2025-01.org.x:y", 3, "u", "s3cret")
    assert _parse_target("iscsi://127.0.0.1/iqn.2025-01.org.x:y/0")[0] == "127.0.0.1:3260"
    with pytest.raises(ValueError):
        _parse_target("iscsi://127.0.0.1:3260/iqn.2025-01.org.x:y")


def test_login_to_unknown_target_fails(tgt: TgtPeer) -> None:
    with pytest.raises(LibiscsiError, match="login"):
        Session((tgt.portal, "iqn.2025-01.org.vtl.test:nonexistent", 1), timeout=5)


def test_chap_and_mutual_chap() -> None:
    _tgt_or_skip()
    user, secret = ("bench-user", "secret-123456")
    tuser, tsecret = ("bench-target", "tsecret-654321")
    with TgtPeer(0, disk_mb=8, vtl=False, chap=(user, secret),
                 mutual_chap=(tuser, tsecret)) as peer:
        url = peer.url(peer.disk)
        with Session(url, chap_user=user, chap_password=secret) as one_way:
            assert one_way.test_unit_ready().good
        with Session(url, chap_user=user, chap_password=secret, target_chap_user=tuser,
                     target_chap_password=tsecret) as mutual:
            assert mutual.test_unit_ready().good
        with pytest.raises(LibiscsiError):
            Session(url, chap_user=user, chap_password="wrong-secret-1", timeout=5)
        with pytest.raises(LibiscsiError):
            Session(url, timeout=5)


# -- SMC / SSC on the VTL --------------------------------------------------------------------------


def test_changer_inquiry_and_element_status(changer: Session) -> None:
    inquiry = changer.inquiry().check()
    assert inquiry.data[0] & 0x1F == 0x08  # medium changer
    assert inquiry.data[8:16].decode().strip() == "STK"
    # One element type at a time: type 0 (all) can crash tgt (FACTS.md).
    slots = parse_element_status(changer.read_element_status(element_type=2, alloc=4096).check().data)
    by_address = {e.address: e for e in slots}
    assert by_address[TgtPeer.slot_address(0)].element_type == 2
    assert by_address[TgtPeer.slot_address(0)].barcode == TgtPeer.barcode(0)
    drives = parse_element_status(changer.read_element_status(element_type=4, alloc=4096).check().data)
    assert [e.address for e in drives][:1] == [TgtPeer.drive_address(0)]


def test_empty_drive_is_not_ready(tgt: TgtPeer) -> None:
    with Session(tgt.url(tgt.drive(1))) as drive:
        result = drive.test_unit_ready()
        assert (result.sense_key, result.asc, result.ascq) == (NOT_READY, 0x3A, 0x00)


def test_tape_write_filemark_rewind_read(tgt: TgtPeer, changer: Session) -> None:
    changer.move_medium(TgtPeer.slot_address(1), TgtPeer.drive_address(0)).check()
    try:
        drives = changer.read_element_status(element_type=4, alloc=4096).check().data
        loaded = {e.address: e for e in parse_element_status(drives)}[TgtPeer.drive_address(0)]
        assert loaded.full
        with Session(tgt.url(tgt.drive(0))) as drive:
            assert drive.test_unit_ready().good
            drive.rewind().check()
            first = random.Random(3).randbytes(65536)
            second = random.Random(4).randbytes(1000)
            drive.write6(first).check()
            drive.write_filemarks(1).check()
            drive.write6(second).check()
            drive.write_filemarks(1).check()
            drive.rewind().check()

            assert drive.read6(65536).check().data == first
            # Reading the filemark: CHECK CONDITION, NO SENSE, FILEMARK, 00/01, INFORMATION =
            # requested length (nothing transferred).
            mark = drive.read6(65536)
            assert mark.check_condition
            assert (mark.sense_key, mark.asc, mark.ascq) == (NO_SENSE, 0x00, 0x01)
            assert mark.filemark
            assert mark.information == 65536
            # A variable read longer than the block: ILI, INFORMATION = 2000 - 1000, data intact.
            short = drive.read6(2000)
            assert short.check_condition and short.ili
            assert short.information == 1000
            assert short.data[:1000] == second
            assert drive.read6(65536).filemark
            # End of data: BLANK CHECK (tgt gets the ASC/ASCQ wrong, so only the key is checked).
            assert drive.read6(65536).sense_key == BLANK_CHECK
            # SPACE forward over the first filemark lands on the second block.
            drive.rewind().check()
            assert drive.space(1, code=1).good
            assert drive.read6(2000, sili=True).data[:1000] == second
    finally:
        changer.move_medium(TgtPeer.drive_address(0), TgtPeer.slot_address(1))
