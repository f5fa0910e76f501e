"""Crash tests of the tape library: ``kill -9`` of a real ``vtl serve`` while a tape is loaded and
being written over iSCSI, then a restart on the same data dir.

What must hold after the restart (STYLE.md: nothing acknowledged is lost):
- the catalog and the changer agree on where the tape is; by design (library.py ``start()``)
  a tape that was in a drive is loaded into the same drive again, at BOP;
- everything up to the last acknowledged WRITE FILEMARKS (Immed=0, a durability point) reads
  back bit-exact, filemarks included;
- past it, reading gives the unsynced blocks intact, in order, or END-OF-DATA: never a block
  that was not written, a torn block, a MEDIUM ERROR or a dead appliance;
- the tape stays usable: appending at end of data and unloading work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.support.appliance import REPO_ROOT, ApplianceProcess
from tests.support.libiscsi import LibiscsiError, Result, Session, library_available, \
    parse_element_status

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not library_available(), reason="libiscsi.so.7 is not installed"),
]

DRIVE0, SLOT0 = 0x0100, 0x1000
NO_SENSE, BLANK_CHECK, UNIT_ATTENTION = 0x0, 0x8, 0x6
#: Blocks per file of the streaming writer; a filemark after each such run.
STREAM_FILE_BLOCKS = 8
#: Acknowledged filemarks the streaming writer must report before the kill.
STREAM_FILEMARKS_BEFORE_KILL = 5


def stream_block(i: int) -> bytes:
    """Block ``i`` of a stream: a size between 1 KiB and ~64 KiB and content unique to ``i``."""
    size = 1024 + (i * 7919) % 64512
    seed = i.to_bytes(8, "big") + bytes([i % 251]) * 8
    return (seed * (size // len(seed) + 1))[:size]


def writer_main() -> None:
    """A separate initiator process: ``python -c 'from tests.integration.test_tape_crash import
    writer_main; writer_main()' PORTAL IQN``. Writes stream blocks with a filemark after every
    STREAM_FILE_BLOCKS; prints ``w <blocks>`` after each acknowledged WRITE and ``fm <k>
    <blocks>`` after each acknowledged filemark (the drive made the tape durable up to there),
    until the target goes away."""
    portal, iqn = sys.argv[1], sys.argv[2]
    session = Session((portal, iqn, 0), timeout=20)
    i = marks = 0
    try:
        while True:
            result = session.write6(stream_block(i))
            if not result.good:
                print(f"error {result.describe()}", flush=True)
                return
            i += 1
            print(f"w {i}", flush=True)
            if i % STREAM_FILE_BLOCKS == 0:
                if not session.write_filemarks(1).good:
                    return
                marks += 1
                print(f"fm {marks} {i}", flush=True)
    except LibiscsiError as exc:
        print(f"gone {exc}", flush=True)
    finally:
        session.close()


# --- helpers --------------------------------------------------------------------------------------
def good(result: Result) -> Result:
    assert result.good, result.describe()
    return result


def library_status(app: ApplianceProcess) -> dict:
    out = app.cli("library", "status", "--json")
    assert out.exit_code == 0, out.output
    return json.loads(out.output)


def load_new_tape(app: ApplianceProcess, drive_index: int) -> str:
    out = app.cli("tape", "create", "--prefix", "CRSH", "--size", "100GiB", "--json")
    assert out.exit_code == 0, out.output
    (tape,) = json.loads(out.output)
    with changer(app) as ch:
        good(ch.move_medium(tape["location"]["address"], DRIVE0 + drive_index))
    return str(tape["barcode"])


def changer(app: ApplianceProcess) -> Session:
    return Session((app.portal, library_status(app)["changer"]["target_iqn"], 0))


def drive(app: ApplianceProcess, index: int) -> Session:
    return Session((app.portal, library_status(app)["drives"][index]["target_iqn"], 0))


def assert_catalog_and_changer_agree(app: ApplianceProcess, barcode: str,
                                     address: int) -> None:
    """The tape is at ``address`` in the catalog (tape show), in READ ELEMENT STATUS and in
    LibraryStatus, and nowhere else."""
    shown = json.loads(app.cli("tape", "show", barcode, "--json").output)
    assert shown["location"]["address"] == address, shown
    assert shown["status"] == "AVAILABLE"
    with changer(app) as ch:
        res = good(ch.read_element_status(0, 0, 0xFFFF, alloc=1 << 20))
    where = [e.address for e in parse_element_status(res.data) if e.barcode == barcode]
    assert where == [address]
    index = address - DRIVE0
    assert library_status(app)["drives"][index]["barcode"] == barcode


def read_object(s: Session, max_len: int = 1 << 20) -> bytes | str:
    """The next object: its data, ``"FM"`` for a filemark or ``"EOD"``; anything else fails."""
    res = s.read6(max_len, sili=True)
    if res.good:
        return res.data
    assert res.check_condition, res.describe()
    if (res.sense_key, res.asc, res.ascq) == (NO_SENSE, 0x00, 0x01) and res.filemark:
        return "FM"
    if (res.sense_key, res.asc, res.ascq) == (BLANK_CHECK, 0x00, 0x05):
        return "EOD"
    raise AssertionError(f"unexpected read result after the crash: {res.describe()}")


def read_position(s: Session) -> int:
    return int.from_bytes(good(s.read_position()).data[4:8], "big")


def lose_session(s: Session, timeout: float = 15.0) -> None:
    """The appliance is dead: the session must notice, then be closed.

    A drive's connection lives in its worker process, which leaves when it sees the supervisor's
    channel close; a command already on its way may still be answered in that instant, so the
    session gets a bounded number of tries to see the connection drop.
    """
    deadline = time.monotonic() + timeout
    with pytest.raises(LibiscsiError):
        while time.monotonic() < deadline:
            s.test_unit_ready()
            time.sleep(0.05)
    s.close()


# --- tests ----------------------------------------------------------------------------------------
def test_kill9_after_filemarks_keeps_acknowledged_data(appliance: ApplianceProcess) -> None:
    barcode = load_new_tape(appliance, 0)
    files = [[stream_block(1000 * f + b) for b in range(3 + f)] for f in range(3)]
    unsynced = [stream_block(9000 + b) for b in range(4)]
    s = drive(appliance, 0)
    for blocks in files:
        for data in blocks:
            good(s.write6(data))
        good(s.write_filemarks(1))  # Immed=0: durable when GOOD comes back
    for data in unsynced:
        good(s.write6(data))
    old_pid = appliance.kill9()
    lose_session(s)

    appliance.restart()
    assert appliance.pid != old_pid
    assert_catalog_and_changer_agree(appliance, barcode, DRIVE0)
    with drive(appliance, 0) as s:  # login clears the UA 28/00 of the reload
        assert read_position(s) == 0
        for blocks in files:
            for data in blocks:
                assert read_object(s) == data
            assert read_object(s) == "FM"
        synced_end = read_position(s)
        assert synced_end == sum(len(b) + 1 for b in files)
        tail = []
        while (obj := read_object(s)) != "EOD":
            tail.append(obj)
        # the unsynced blocks survive whole and in order, or not at all; nothing else
        assert tail == unsynced[:len(tail)]
        # and as only the process died (not the host), all of them: drive.py writes each block
        # to the cartridge file before GOOD status
        assert len(tail) == len(unsynced)
        eod = read_position(s)
        assert eod == synced_end + len(tail)
        assert read_object(s) == "EOD"
        # the tape is usable: append a file at end of data and read it back
        good(s.write6(b"after the crash"))
        good(s.write_filemarks(1))
        good(s.locate(eod))
        assert read_object(s) == b"after the crash"
        assert read_object(s) == "FM"
        assert read_object(s) == "EOD"
    with changer(appliance) as ch:
        good(ch.move_medium(DRIVE0, SLOT0))
    shown = json.loads(appliance.cli("tape", "show", barcode, "--json").output)
    assert shown["location"]["address"] == SLOT0
    assert shown["used_bytes"] > 0


def test_kill9_during_write_stream_from_another_process(appliance: ApplianceProcess) -> None:
    barcode = load_new_tape(appliance, 1)
    iqn = library_status(appliance)["drives"][1]["target_iqn"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "from tests.integration.test_tape_crash import writer_main; writer_main()",
         appliance.portal, iqn],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT, env=env, text=True)
    acked_blocks = written = marks_acked = 0
    lines: list[str] = []
    try:
        assert writer.stdout is not None
        for line in writer.stdout:
            lines.append(line.strip())
            if line.startswith("w "):
                written = int(line.split()[1])
            elif line.startswith("fm "):
                _, mark_no, blocks = line.split()
                marks_acked, acked_blocks = int(mark_no), int(blocks)
            else:
                break
            # kill mid-file: a few blocks acknowledged (not yet durable) past the last filemark
            if marks_acked >= STREAM_FILEMARKS_BEFORE_KILL and written - acked_blocks >= 3:
                break
        assert marks_acked >= STREAM_FILEMARKS_BEFORE_KILL, lines[-5:]
        # the writer is still streaming blocks when the appliance dies
        appliance.kill9()
        for line in writer.stdout:  # everything it saw acknowledged before noticing
            lines.append(line.strip())
            if line.startswith("w "):
                written = int(line.split()[1])
            elif line.startswith("fm "):
                acked_blocks = int(line.split()[2])
        writer.wait(60)
    finally:
        if writer.poll() is None:
            writer.kill()  # by its Popen handle: the process this test started
            writer.wait(10)
    assert lines[-1].startswith("gone"), lines[-5:]  # it saw the target go, no SCSI error

    appliance.restart()
    assert_catalog_and_changer_agree(appliance, barcode, DRIVE0 + 1)
    with drive(appliance, 1) as s:
        i = marks = 0
        while True:
            obj = read_object(s)
            if obj == "EOD":
                break
            if obj == "FM":
                assert i % STREAM_FILE_BLOCKS == 0 and i > 0, f"filemark after block {i}"
                assert marks < i // STREAM_FILE_BLOCKS, f"two filemarks after block {i}"
                marks += 1
                continue
            assert marks == i // STREAM_FILE_BLOCKS, f"filemark missing before block {i}"
            assert obj == stream_block(i), f"block {i} differs after the crash"
            i += 1
        # every block before the last acknowledged filemark is there, with its filemarks
        assert i >= acked_blocks, (i, acked_blocks)
        # stronger, for a process crash (the host kept its page cache): drive.py writes every
        # block to the cartridge file before GOOD, so no acknowledged block is lost at all
        assert i >= written, (i, written)
        assert read_position(s) == i + marks  # EOD is right after what was read
        good(s.write_filemarks(1))  # appending works
    with changer(appliance) as ch:
        good(ch.move_medium(DRIVE0 + 1, SLOT0 + 1))
    assert_no_leftover(appliance)


def assert_no_leftover(app: ApplianceProcess) -> None:
    """The restarted appliance serves and answers its control API."""
    assert app.running
    assert app.call("DescribeGatewayInformation")["result"]["iscsi_port"] == app.port


def test_kill9_with_tape_in_slot_and_unsynced_drive(appliance: ApplianceProcess) -> None:
    """A tape moved back to a slot before the crash stays in the slot (the move was persisted
    before MOVE MEDIUM completed); its data, synced by the unload, reads back."""
    barcode = load_new_tape(appliance, 2)
    with drive(appliance, 2) as s:
        good(s.write6(stream_block(1)))
        good(s.write6(stream_block(2)))  # no filemark: the unload is the durability point
    with changer(appliance) as ch:
        good(ch.move_medium(DRIVE0 + 2, SLOT0 + 5))
    appliance.kill9()
    appliance.restart()
    shown = json.loads(appliance.cli("tape", "show", barcode, "--json").output)
    assert shown["location"]["address"] == SLOT0 + 5
    with changer(appliance) as ch:
        res = good(ch.read_element_status(2, SLOT0 + 5, 1, alloc=4096))
        (el,) = parse_element_status(res.data)
        assert el.full and el.barcode == barcode
        good(ch.move_medium(SLOT0 + 5, DRIVE0 + 2))
    with drive(appliance, 2) as s:
        assert [read_object(s) for _ in range(3)] == [stream_block(1), stream_block(2), "EOD"]
    with changer(appliance) as ch:
        good(ch.move_medium(DRIVE0 + 2, SLOT0 + 5))


def test_kill9_then_torn_last_record_reads_to_eod(appliance: ApplianceProcess) -> None:
    """A host crash can leave the last unsynced record half written (and junk after it). We
    cannot crash the host, so after the kill we tear the cartridge's last record by hand: the
    restarted appliance must read everything before it bit-exact and then report END-OF-DATA
    (the torn record is dropped by the CRC-checked recovery), never garbage or MEDIUM ERROR."""
    barcode = load_new_tape(appliance, 3)
    files = [[stream_block(500 + 10 * f + b) for b in range(4)] for f in range(2)]
    unsynced = [stream_block(700 + b) for b in range(3)]
    s = drive(appliance, 3)
    for blocks in files:
        for data in blocks:
            good(s.write6(data))
        good(s.write_filemarks(1))
    for data in unsynced:
        good(s.write6(data))
    appliance.kill9()
    lose_session(s)

    segments = sorted((appliance.data_dir / "cache" / "tapes" / barcode).glob("seg-*.dat"))
    assert segments, "no segment files"
    last = segments[-1]
    size = last.stat().st_size
    torn_at = size - (32 + len(unsynced[-1])) // 2  # inside the last record
    with open(last, "r+b") as f:
        f.truncate(torn_at)
        f.seek(torn_at)
        f.write(b"\xab" * 100)  # junk where the rest of the record would be

    appliance.restart()
    assert_catalog_and_changer_agree(appliance, barcode, DRIVE0 + 3)
    with drive(appliance, 3) as s:
        for blocks in files:
            for data in blocks:
                assert read_object(s) == data
            assert read_object(s) == "FM"
        assert [read_object(s) for _ in range(3)] == [*unsynced[:2], "EOD"]
        eod = read_position(s)
        assert eod == sum(len(b) + 1 for b in files) + 2
        good(s.write6(b"appended"))  # the new record replaces the torn one
        good(s.write_filemarks(1))
        good(s.locate(eod))
        assert [read_object(s) for _ in range(3)] == [b"appended", "FM", "EOD"]
    with changer(appliance) as ch:
        good(ch.move_medium(DRIVE0 + 3, SLOT0 + 3))
