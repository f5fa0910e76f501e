"""`vtl archive pool` and retention locks through the CLI against a running appliance (embedded
store, model clock 20,000 times faster: one model day is about 4.3 s)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.appliance import ApplianceProcess
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

GiB = 1 << 30


def test_pools_and_retention_locks_through_the_cli(tmp_path: Path) -> None:
    with ApplianceProcess(tmp_path / "data", extra_args=["--clock-speed", "20000"]) as app:
        r = app.cli("archive", "pool", "create", "Legal", "--storage-class", "deep-archive",
                    "--retention-lock", "compliance", "--retention-days", "1")
        assert r.exit_code == 0 and "compliance retention lock of 1 days" in r.output, r.output
        r = app.cli("archive", "pool", "create", "Ops", "--storage-class", "glacier",
                    "--retention-lock", "governance", "--retention-days", "3650")
        assert r.exit_code == 0, r.output
        r = app.cli("archive", "pool", "create", "Bad", "--storage-class", "glacier",
                    "--retention-lock", "governance")
        assert r.exit_code != 0 and "together" in r.output
        r = app.cli("archive", "pool", "create", "Long", "--storage-class", "glacier",
                    "--retention-lock", "governance", "--retention-days", "36501")
        assert r.exit_code != 0
        listed = json.loads(app.cli("archive", "pool", "list", "--json").output)
        assert [(p["name"], p["retention_lock"], p["retention_days"]) for p in listed] == [
            ("glacier", None, 0), ("deep-archive", None, 0), ("Legal", "compliance", 1),
            ("Ops", "governance", 3650)]
        table = app.cli("archive", "pool", "list").output
        assert "Legal" in table and "deep-archive" in table

        r = app.cli("tape", "create", "--prefix", "LG", "--size", "100GiB", "--pool", "Legal")
        assert r.exit_code == 0 and "Legal" in r.output, r.output
        legal = app.call("ListTapes")["result"]["tapes"][0]["barcode"]
        r = app.cli("tape", "create", "--prefix", "OP", "--size", "100GiB", "--pool", "ops")
        assert r.exit_code == 0, r.output
        ops = [t["barcode"] for t in app.call("ListTapes")["result"]["tapes"]
               if t["barcode"].startswith("OP")][0]
        r = app.cli("tape", "create", "--prefix", "NO", "--size", "100GiB", "--pool", "nope")
        assert r.exit_code != 0 and "unknown pool" in r.output

        for code in (legal, ops):
            assert app.cli("archive", "tape", code).exit_code == 0
        for code in (legal, ops):
            wait_for(f"{code} ARCHIVED", lambda c=code: app.call("DescribeTape", barcode=c)
                     ["result"]["status"] == "ARCHIVED")

        shelf = {t["barcode"]: t for t in json.loads(app.cli("archive", "list", "--json").output)}
        assert shelf[legal]["pool"] == "Legal" and shelf[legal]["retention_lock"] == "compliance"
        assert shelf[ops]["retention_lock"] == "governance" and shelf[ops]["retention_until"]

        r = app.cli("archive", "delete", legal, "--bypass-governance")
        assert r.exit_code != 0
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and "compliance retention lock" in lines[0], r.output
        r = app.cli("archive", "delete", ops)
        assert r.exit_code != 0 and "--bypass-governance" in r.output
        r = app.cli("archive", "pool", "delete", "Ops")
        assert r.exit_code != 0 and "still holds 1 tape" in r.output
        assert app.cli("archive", "delete", ops, "--bypass-governance").exit_code == 0
        wait_for("the governance tape DELETED",  # a DELETED tape is not found any more
                 lambda: not app.call("DescribeTape", barcode=ops)["ok"])
        assert app.cli("archive", "pool", "delete", "Ops").exit_code == 0

        # one model day later (about 4.3 s) the compliance lock has ended
        def deletable() -> bool:
            return app.cli("archive", "delete", legal).exit_code == 0
        wait_for("the compliance lock to end", deletable, timeout=30)
        names = [p["name"] for p in json.loads(app.cli("archive", "pool", "list",
                                                       "--json").output)]
        assert names == ["glacier", "deep-archive", "Legal"]
