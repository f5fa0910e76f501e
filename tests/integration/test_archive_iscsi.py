"""The cloud tier end to end through iSCSI: write a tape with the Python initiator, export it
with MOVE MEDIUM to an I/E slot, see it ARCHIVED (cache released), retrieve it on a fast model
clock, load it, read it back bit-exact and get DATA PROTECT on a write (RETRIEVED is read-only).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.support.appliance import ApplianceProcess
from tests.support.libiscsi import Session, library_available, parse_element_status
from tests.support.waiting import wait_for
from vtl.library.elements import ElementLayout

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not library_available(), reason="the system libiscsi is not installed"),
]

GiB = 1 << 30
DATA_PROTECT = 0x07
#: Model time runs this much faster: a 3-5 h Glacier retrieval takes about a second.
SPEED = "20000"


@pytest.fixture
def fast_appliance(tmp_path: Path) -> Iterator[ApplianceProcess]:
    with ApplianceProcess(tmp_path / "data", extra_args=["--clock-speed", SPEED]) as app:
        yield app


def tape(app: ApplianceProcess, barcode: str) -> dict[str, Any]:
    reply = app.call("DescribeTape", barcode=barcode)
    assert reply["ok"], reply
    return reply["result"]


def status_is(app: ApplianceProcess, barcode: str, status: str) -> Callable[[], bool]:
    return lambda: tape(app, barcode)["status"] == status


def test_write_export_archive_retrieve_read_back(fast_appliance: ApplianceProcess) -> None:
    app = fast_appliance
    created = app.call("CreateTapes", prefix="EE", count=1, size_bytes=100 * GiB)
    assert created["ok"], created
    barcode = created["result"]["tapes"][0]["barcode"]
    ie = created["result"]["tapes"][0]["location"]["address"]
    info = app.call("LibraryStatus")["result"]
    changer_iqn = info["changer"]["target_iqn"]
    drive_iqn = info["drives"][0]["target_iqn"]
    layout = ElementLayout()
    drive0, slot1 = layout.drive_address(0), 0x1000
    blocks = [os.urandom(65536) for _ in range(20)] + [os.urandom(1000)]

    with Session((app.portal, changer_iqn, 0)) as changer:
        assert changer.move_medium(ie, drive0).good
        with Session((app.portal, drive_iqn, 0)) as drive:
            for block in blocks:
                assert drive.write6(block).good
            assert drive.write_filemarks(1).good
            assert drive.rewind().good
        assert changer.move_medium(drive0, slot1).good
        # the backup software exports the tape: MOVE MEDIUM storage slot -> I/E slot
        assert changer.move_medium(slot1, ie).good
        assert tape(app, barcode)["status"] in ("IN TRANSIT TO VTS", "ARCHIVING", "ARCHIVED")
        wait_for("ARCHIVED", status_is(app, barcode, "ARCHIVED"))
        # it left the library (a UNIT ATTENTION 28/01 says the I/E element changed first)
        res = changer.read_element_status()
        assert res.check_condition and (res.sense_key, res.asc, res.ascq) == (0x06, 0x28, 0x01)
        res = changer.read_element_status()
        assert res.good
        assert barcode not in {e.barcode for e in parse_element_status(res.data)}

    archived = tape(app, barcode)
    assert archived["location"]["type"] == "shelf"
    assert not (app.data_dir / "cache" / "tapes" / barcode).exists()  # cache released
    cloud = app.call("DescribeTapeCloud", barcode=barcode)["result"]
    assert cloud["safe_in_cloud"] and cloud["cloud_bytes"] == cloud["used_bytes"] > 65536 * 20
    assert "cloud: safe in cloud" in app.cli("tape", "show", barcode).output
    import json as _json
    shown = _json.loads(app.cli("tape", "show", barcode, "--json").output)
    assert shown["cloud"]["safe_in_cloud"] is True and shown["cloud"]["pending_bytes"] == 0
    listing = app.cli("archive", "list", "--json")
    assert listing.exit_code == 0 and barcode in listing.output

    # a write to a tape that is not in the library is impossible; retrieve it
    retrieved = app.cli("archive", "retrieve", barcode, "--wait")
    assert retrieved.exit_code == 0, retrieved.output
    assert "RETRIEVED" in retrieved.output
    back = tape(app, barcode)
    assert back["status"] == "RETRIEVED" and back["location"]["type"] == "ie"

    with Session((app.portal, changer_iqn, 0)) as changer:
        assert changer.move_medium(back["location"]["address"], drive0).good
        with Session((app.portal, drive_iqn, 0)) as drive:
            for block in blocks:
                res = drive.read6(len(block), sili=True)
                assert res.good and res.data == block
            res = drive.read6(65536, sili=True)
            assert res.check_condition  # the filemark
            assert drive.rewind().good
            res = drive.write6(b"x" * 512)
            assert res.check_condition and res.sense_key == DATA_PROTECT
        # exporting the retrieved tape again returns it to the shelf (its objects never left)
        assert changer.move_medium(drive0, back["location"]["address"]).good
    wait_for("ARCHIVED again", status_is(app, barcode, "ARCHIVED"))
    assert not (app.data_dir / "cache" / "tapes" / barcode).exists()


def test_cancel_only_while_in_transit(fast_appliance: ApplianceProcess) -> None:
    app = fast_appliance
    created = app.call("CreateTapes", prefix="CAN", count=1, size_bytes=100 * GiB)
    barcode = created["result"]["tapes"][0]["barcode"]
    # not exported yet: nothing to cancel
    refused = app.call("CancelArchival", barcode=barcode)
    assert not refused["ok"] and "IN TRANSIT TO VTS" in refused["error"]["message"]
    result = app.cli("archive", "tape", barcode)
    assert result.exit_code == 0, result.output
    wait_for("ARCHIVED", status_is(app, barcode, "ARCHIVED"))
    late = app.cli("archive", "cancel", barcode)
    assert late.exit_code != 0 and "IN TRANSIT TO VTS" in late.output


def test_unfinished_retrieval_resumes_after_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with ApplianceProcess(data, extra_args=["--clock-speed", SPEED]) as app:
        barcode = app.call("CreateTapes", prefix="RS", count=1,
                           size_bytes=100 * GiB)["result"]["tapes"][0]["barcode"]
        assert app.call("ArchiveTape", barcode=barcode)["ok"]
        wait_for("ARCHIVED", status_is(app, barcode, "ARCHIVED"))
    # retrieval asked for at normal speed: hours away; the ready time is kept across restarts
    with ApplianceProcess(data) as app:
        first = app.call("RetrieveTapeArchive", barcode=barcode)["result"]
        assert first["status"] == "RETRIEVING" and first["eta_seconds"] > 3600
    with ApplianceProcess(data, extra_args=["--clock-speed", SPEED]) as app:
        again = app.call("DescribeTapeArchives")["result"]["tapes"][0]
        assert again["ready_at"] == first["ready_at"]
        wait_for("RETRIEVED", status_is(app, barcode, "RETRIEVED"))
        assert tape(app, barcode)["location"]["type"] == "ie"


def test_retention_lock_refuses_delete_and_listing(fast_appliance: ApplianceProcess) -> None:
    app = fast_appliance
    codes = [t["barcode"] for t in app.call("CreateTapes", prefix="RET", count=2,
                                            size_bytes=100 * GiB)["result"]["tapes"]]
    locked, free = codes
    assert app.cli("archive", "tape", locked, "--retention-days", "36500").exit_code == 0
    assert app.cli("archive", "tape", free).exit_code == 0
    for code in codes:
        wait_for("ARCHIVED", status_is(app, code, "ARCHIVED"))
    refused = app.cli("archive", "delete", locked)
    assert refused.exit_code != 0 and "retention lock" in refused.output
    assert app.cli("archive", "delete", free).exit_code == 0
    wait_for("DELETED", status_is_deleted(app, free))
    table = app.cli("archive", "list")
    assert locked in table.output and free not in table.output
    import json as _json
    rows = _json.loads(app.cli("archive", "list", "--json").output)
    assert [r["barcode"] for r in rows] == [locked] and rows[0]["pool"] == "glacier"


def status_is_deleted(app: ApplianceProcess, barcode: str) -> Callable[[], bool]:
    return lambda: any(t["barcode"] == barcode for t in
                       app.call("ListTapes", status="DELETED")["result"]["tapes"])


def test_schedules_persist_and_archive_idle_tapes(tmp_path: Path) -> None:
    import json as _json

    data = tmp_path / "data"
    with ApplianceProcess(data, extra_args=["--clock-speed", SPEED]) as app:
        added = app.cli("archive", "schedule", "add", "--cron", "0 6 * * *", "--older-than",
                        "1h", "--pool", "deep-archive", "--json")
        assert added.exit_code == 0, added.output
        sid = _json.loads(added.output)["id"]
        bad = app.cli("archive", "schedule", "add", "--cron", "61 * * *")
        assert bad.exit_code != 0 and "cron" in bad.output
        policy = app.cli("archive", "schedule", "auto-create", "--prefix", "AUTO", "--minimum",
                         "3", "--size", "100GiB")
        assert policy.exit_code == 0, policy.output
        autos = [t for t in app.call("ListTapes")["result"]["tapes"]
                 if t["barcode"].startswith("AUTO")]
        assert len(autos) == 3 and all(t["location"]["type"] == "ie" for t in autos)
    with ApplianceProcess(data, extra_args=["--clock-speed", SPEED]) as app:
        rows = _json.loads(app.cli("archive", "schedule", "list", "--json").output)
        assert [r["kind"] for r in rows] == ["archive", "auto-create"]
        assert rows[0]["next_run_at"] and rows[0]["next_run_at"].endswith("06:00:00+00:00")
        # wait until the AUTO tapes are idle for more than an hour of model time
        from datetime import datetime, timedelta
        touched = max(datetime.fromisoformat(t["created_at"]) for t in
                      app.call("ListTapes")["result"]["tapes"])
        wait_for("idle tapes", lambda: datetime.fromisoformat(
            app.call("DescribeTapeArchives")["result"]["now"]) > touched + timedelta(hours=1, minutes=1))
        run = app.cli("archive", "schedule", "run", str(sid))
        assert run.exit_code == 0 and "AUTO" in run.output
        autos = [t for t in app.call("ListTapes")["result"]["tapes"] if t["barcode"].startswith("AUTO")]
        assert any(t["status"] != "AVAILABLE" and t["pool"] == "deep-archive" for t in autos)
        assert app.cli("archive", "schedule", "remove", str(sid)).exit_code == 0
        rows = _json.loads(app.cli("archive", "schedule", "list", "--json").output)
        assert [r["kind"] for r in rows] == ["auto-create"]
