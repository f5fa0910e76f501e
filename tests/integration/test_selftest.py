"""``vtl selftest`` end to end: a real ``vtl serve``, the CLI run as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.appliance import REPO_ROOT, ApplianceProcess

pytestmark = pytest.mark.integration

GiB = 1 << 30


def selftest(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.pop("VTL_DATA_DIR", None)
    return subprocess.run([sys.executable, "-m", "cli.main", "selftest", "--data-dir",
                           str(data_dir), *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=env, timeout=240)


def tapes(app: ApplianceProcess) -> dict[str, dict]:
    return {t["barcode"]: t for t in app.call("ListTapes")["result"]["tapes"]}


def test_selftest_passes_and_puts_the_tape_back_blank(appliance: ApplianceProcess) -> None:
    created = appliance.call("CreateTapes", prefix="ST", count=2, size_bytes=100 * GiB)
    assert created["ok"], created
    before = tapes(appliance)

    run = selftest(appliance.data_dir, "--blocks", "24", "--block-size", "256KiB")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[-1].startswith("selftest PASSED (") and "MB/s write" in lines[-1], run.stdout
    assert [ln[:7] for ln in lines[:-1]] == [f"[{k:>2}/16]" for k in range(1, 17)]
    assert "FILEMARK DETECTED" in run.stdout and run.stderr == ""

    # the first blank tape went from its I/E slot into storage slot 1 and is blank again
    after = tapes(appliance)
    first = min(before)
    assert before[first]["location"]["type"] == "ie"
    assert after[first]["location"] == {"type": "slot", "address": 0x1000, "mtx": 1}
    assert after[first]["status"] == "AVAILABLE" and after[first]["used_bytes"] == 0
    assert after[first]["target_iqn"] is None
    others = {code: t for code, t in after.items() if code != first}
    assert others == {code: t for code, t in before.items() if code != first}
    status = appliance.call("LibraryStatus")["result"]
    assert all(d["barcode"] is None for d in status["drives"])
    assert status["drives"][0]["bytes_written"] == 24 * 256 * 1024
    assert status["drives"][0]["bytes_read"] >= 24 * 256 * 1024

    # a second run takes the same tape from its storage slot and returns it to exactly there
    again = selftest(appliance.data_dir, "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    report = json.loads(again.stdout)
    assert report["passed"] and report["tape"] == first and report["checks"] > 64
    assert [s["status"] for s in report["steps"]].count("skipped") == 1
    assert next(s for s in report["steps"] if s["name"] == "import to storage")["status"] \
        == "skipped"
    assert tapes(appliance)[first] == after[first]


def test_selftest_without_a_blank_tape_fails_with_one_line(appliance: ApplianceProcess) -> None:
    run = selftest(appliance.data_dir)
    assert run.returncode == 1
    verdict = run.stdout.strip().splitlines()[-1]
    assert verdict.startswith("selftest FAILED at choose tape and drive: no blank AVAILABLE tape")
    assert "vtl tape create" in verdict
    assert "Traceback" not in run.stdout + run.stderr

    report = json.loads(selftest(appliance.data_dir, "--json").stdout)
    assert not report["passed"] and report["failed_step"] == "choose tape and drive"
    assert report["steps"][-1]["status"] == "failed"


def test_selftest_block_too_large_puts_the_tape_back(appliance: ApplianceProcess) -> None:
    assert appliance.call("CreateTapes", prefix="BG", count=1, size_bytes=100 * GiB)["ok"]
    run = selftest(appliance.data_dir, "--block-size", "2MiB")
    assert run.returncode == 1
    verdict = run.stdout.strip().splitlines()[-1]
    assert verdict.startswith("selftest FAILED at drive ready: block size 2097152 exceeds")
    assert "back in slot 1" in verdict
    (tape,) = tapes(appliance).values()
    assert tape["location"]["type"] == "slot" and tape["used_bytes"] == 0
    assert all(d["barcode"] is None
               for d in appliance.call("LibraryStatus")["result"]["drives"])


def test_selftest_without_an_appliance(tmp_path: Path) -> None:
    run = selftest(tmp_path / "nothing-here")
    assert run.returncode == 1
    assert run.stdout.strip().splitlines()[-1].startswith(
        "selftest FAILED at control API: no appliance answers at")
