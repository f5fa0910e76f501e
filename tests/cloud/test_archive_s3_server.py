"""The appliance archiving to a real S3-compatible server (moto_server over HTTP on 127.0.0.1),
with an outage in the middle of the upload: the server is stopped, the job keeps the data in the
upload buffer and retries, the server comes back, and nothing is lost (read back bit-exact)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.cloud.conftest import MotoServer
from tests.support.appliance import ApplianceProcess
from tests.support.libiscsi import Session, library_available
from vtl.library.elements import ElementLayout
from tests.support.waiting import wait_for as _wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not library_available(), reason="the system libiscsi is not installed"),
]

GiB = 1 << 30
BUCKET = "vtl-archive"


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 90.0) -> Any:
    return _wait_for(what, fn, timeout)


def test_archive_survives_an_outage_mid_upload(tmp_path: Path, boto_session: Any) -> None:
    server = MotoServer()
    server.start()
    try:
        args = ["--store", f"s3://{BUCKET}/gw1", "--s3-endpoint", server.url,
                "--clock-speed", "20000"]
        with ApplianceProcess(tmp_path / "data", extra_args=args) as app:
            created = app.call("CreateTapes", prefix="OUT", count=1, size_bytes=100 * GiB)
            barcode = created["result"]["tapes"][0]["barcode"]
            ie = created["result"]["tapes"][0]["location"]["address"]
            info = app.call("LibraryStatus")["result"]
            changer_iqn = info["changer"]["target_iqn"]
            drive_iqn = info["drives"][0]["target_iqn"]
            drive0 = ElementLayout().drive_address(0)
            blocks = [os.urandom(256 * 1024) for _ in range(40)]  # 10 MiB
            with Session((app.portal, changer_iqn, 0)) as changer:
                assert changer.move_medium(ie, drive0).good
                with Session((app.portal, drive_iqn, 0)) as drive:
                    for block in blocks:
                        assert drive.write6(block).good
                    assert drive.write_filemarks(1).good
                assert changer.move_medium(drive0, 0x1000).good

                server.stop()  # the endpoint goes down before the upload
                assert app.cli("archive", "tape", barcode).exit_code == 0

                def failed_once() -> bool:
                    jobs = app.call("ListJobs")["result"]["jobs"]
                    return any(j["kind"] == "archive" and j["attempts"] >= 1 and j["error"]
                               for j in jobs)
                wait_for("a failed upload attempt", failed_once)
                t = app.call("DescribeTape", barcode=barcode)["result"]
                assert t["status"] == "IN TRANSIT TO VTS"  # waiting in the upload buffer
                shown = app.cli("tape", "show", barcode).output
                assert "not yet in the cloud" in shown, shown

                server.start()  # same port; moto keeps no state, so the bucket is made again
                boto_session.client("s3", endpoint_url=server.url).create_bucket(Bucket=BUCKET)
                wait_for("ARCHIVED", lambda: app.call("DescribeTape", barcode=barcode)
                         ["result"]["status"] == "ARCHIVED")

                s3 = boto_session.client("s3", endpoint_url=server.url)
                head = s3.head_object(Bucket=BUCKET, Key=f"gw1/tapes/{barcode}/seg-000000.dat")
                assert head.get("StorageClass") == "GLACIER"
                listed = s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
                assert listed == []  # nothing left half-uploaded

                r = app.cli("archive", "retrieve", barcode, "--wait")
                assert r.exit_code == 0, r.output
                back = app.call("DescribeTape", barcode=barcode)["result"]
                assert back["status"] == "RETRIEVED"
                for _ in range(5):  # past the UNIT ATTENTIONs of the I/E changes
                    res = changer.move_medium(back["location"]["address"], drive0)
                    if not (res.check_condition and res.sense_key == 0x06):
                        break
                assert res.good
                with Session((app.portal, drive_iqn, 0)) as drive:
                    for block in blocks:
                        res = drive.read6(len(block), sili=True)
                        assert res.good and res.data == block
    finally:
        server.stop()


def test_unfinished_upload_resumes_after_a_restart(tmp_path: Path, boto_session: Any) -> None:
    server = MotoServer()
    server.start()
    data = tmp_path / "data"
    args = ["--store", f"s3://{BUCKET}/gw1", "--s3-endpoint", server.url, "--clock-speed", "20000"]
    try:
        with ApplianceProcess(data, extra_args=args) as app:
            barcode = app.call("CreateTapes", prefix="RST", count=2,
                               size_bytes=100 * GiB)["result"]["tapes"][0]["barcode"]
            server.stop()
            assert app.call("ArchiveTape", barcode=barcode)["ok"]
            wait_for("a failed attempt", lambda: any(
                j["attempts"] >= 1 for j in app.call("ListJobs")["result"]["jobs"]))
        server.start()
        boto_session.client("s3", endpoint_url=server.url).create_bucket(Bucket=BUCKET)
        with ApplianceProcess(data, extra_args=args) as app:
            wait_for("ARCHIVED", lambda: app.call("DescribeTape", barcode=barcode)
                     ["result"]["status"] == "ARCHIVED")
            # move is one way; delete removes the tape and its objects
            assert not app.call("AssignTapePool", barcode=barcode, pool="glacier")["ok"]
            moved = app.cli("archive", "move", barcode, "--pool", "deep-archive")
            assert moved.exit_code == 0 and "deep-archive" in moved.output
            back = app.cli("archive", "move", barcode, "--pool", "glacier")
            assert back.exit_code != 0 and "one-way" in back.output
            s3 = boto_session.client("s3", endpoint_url=server.url)
            key = f"gw1/tapes/{barcode}/seg-000000.dat"
            wait_for("DEEP_ARCHIVE", lambda: s3.head_object(Bucket=BUCKET, Key=key)
                     .get("StorageClass") == "DEEP_ARCHIVE")
            assert app.cli("archive", "delete", barcode).exit_code == 0
            wait_for("DELETED", lambda: app.call("ListTapes", status="DELETED")
                     ["result"]["tapes"])
            left = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"gw1/tapes/{barcode}/")
            assert left.get("KeyCount", 0) == 0
    finally:
        server.stop()
