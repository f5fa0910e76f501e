"""``vtl tape`` / ``vtl library`` with click's CliRunner; the control API is replaced by a fake
``cli.client.call`` that records requests (the library's own tests cover the operations)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from cli import client
from cli.library import library
from cli.tape import tape

GiB = 1 << 30
TAPE = {"barcode": "VT0000001", "status": "AVAILABLE", "size_bytes": 200 * GiB,
        "used_bytes": 0, "pool": "glacier", "worm": False,
        "location": {"type": "ie", "address": 768, "mtx": 1601}, "target_iqn": None,
        "created_at": "2026-11-25T21:00:00+00:00"}


class FakeApi:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.replies: dict[str, Any] = {}
        self.error: str | None = None

    def __call__(self, data_dir: Path, op: str, **args: Any) -> Any:
        self.calls.append((op, args))
        if self.error:
            raise click.ClickException(self.error)
        return self.replies.get(op)


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeApi:
    fake = FakeApi()
    monkeypatch.setattr(client, "call", fake)
    monkeypatch.setenv("VTL_DATA_DIR", str(tmp_path))
    return fake


def run(group: click.Group, *args: str) -> Any:
    return CliRunner().invoke(group, list(args))


def test_create_with_prefix(api: FakeApi) -> None:
    api.replies["CreateTapes"] = {"tapes": [TAPE]}
    r = run(tape, "create", "--prefix", "vt", "--count", "10", "--size", "200GiB")
    assert r.exit_code == 0, r.output
    assert api.calls == [("CreateTapes", {"prefix": "VT", "count": 10, "size_bytes": 200 * GiB,
                                          "pool": "glacier", "worm": False})]
    assert "created tape VT0000001 (200 GiB, glacier) in ie 1601" in r.output


def test_create_with_barcode_json(api: FakeApi) -> None:
    api.replies["CreateTapeWithBarcode"] = {"tape": {**TAPE, "worm": True}}
    r = run(tape, "create", "--barcode", "VT0000001", "--size", "100GiB", "--pool",
            "deep-archive", "--worm", "--json")
    assert r.exit_code == 0, r.output
    assert api.calls[0] == ("CreateTapeWithBarcode", {"barcode": "VT0000001",
                                                      "size_bytes": 100 * GiB,
                                                      "pool": "deep-archive", "worm": True})
    out = json.loads(r.output)
    assert out[0]["barcode"] == "VT0000001" and out[0]["worm"] is True
    assert list(out[0]) == ["barcode", "status", "size_bytes", "used_bytes", "pool", "worm",
                            "location", "target_iqn", "created_at"]


@pytest.mark.parametrize("args, text", [
    (["--barcode", "AB-1", "--size", "100GiB"], "invalid barcode 'AB-1'"),
    (["--prefix", "ABCDE", "--size", "100GiB"], "1-4 letters"),
    (["--prefix", "VT", "--size", "99GiB"], "whole GiB from 100GiB to 15TiB"),
    (["--prefix", "VT", "--size", "16TiB"], "whole GiB from 100GiB to 15TiB"),
    (["--prefix", "VT", "--size", "lots"], "is not a size"),
    (["--size", "100GiB"], "either --prefix"),
    (["--prefix", "VT", "--count", "11", "--size", "100GiB"], "1 to 10 tapes per call"),
    (["--prefix", "VT", "--barcode", "VT00001", "--size", "100GiB"], "either --prefix"),
])
def test_create_errors_are_one_line(api: FakeApi, args: list[str], text: str) -> None:
    r = run(tape, "create", *args)
    assert r.exit_code != 0
    assert text in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert api.calls == []


def test_server_error_is_one_line(api: FakeApi) -> None:
    api.error = "only 0 free import/export slots; move tapes into storage slots first [LimitExceeded]"
    r = run(tape, "create", "--prefix", "VT", "--size", "100GiB")
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [f"Error: {api.error}"]


def test_list_table_and_json(api: FakeApi) -> None:
    in_drive = {**TAPE, "barcode": "VT0000002", "location": {"type": "drive", "address": 256,
                                                             "mtx": 0},
                "target_iqn": "iqn.x:gw-tapedrive-01"}
    api.replies["ListTapes"] = {"tapes": [TAPE, in_drive]}
    r = run(tape, "list")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split()[:3] == ["BARCODE", "STATUS", "SIZE"]
    assert "ie 1601" in lines[1] and "drive 0" in lines[2] and "iqn.x:gw-tapedrive-01" in lines[2]
    r = run(tape, "list", "--status", "AVAILABLE", "--json")
    assert api.calls[-1] == ("ListTapes", {"status": "AVAILABLE"})
    assert json.loads(r.output)[1]["location"] == {"type": "drive", "address": 256, "mtx": 0}


def test_show_and_delete(api: FakeApi) -> None:
    api.replies["DescribeTape"] = TAPE
    r = run(tape, "show", "vt0000001", "--json")
    assert r.exit_code == 0, r.output
    assert ("DescribeTape", {"barcode": "VT0000001"}) in api.calls
    assert "cloud" not in json.loads(r.output)  # no cloud tier answered
    assert json.loads(r.output)["status"] == "AVAILABLE"
    r = run(tape, "show", "VT0000001")
    assert "barcode" in r.output and "ie 1601" in r.output
    api.replies["DescribeTapeCloud"] = {"used_bytes": 4 << 20, "cloud_bytes": 1 << 20,
                                        "safe_in_cloud": False, "upload_percent": 25.0}
    r = run(tape, "show", "VT0000001")
    assert "cloud: 1 MiB of 4 MiB uploaded (25.0%), 3 MiB not yet in the cloud" in r.output
    api.replies["DescribeTapeCloud"] = {"used_bytes": 4 << 20, "cloud_bytes": 4 << 20,
                                        "safe_in_cloud": True, "upload_percent": 100.0}
    assert "cloud: safe in cloud (4 MiB)" in run(tape, "show", "VT0000001").output
    r = run(tape, "delete", "VT0000001")
    assert r.exit_code == 0 and api.calls[-1] == ("DeleteTape", {"barcode": "VT0000001"})
    assert "deleted tape VT0000001" in r.output


def test_library_status_and_set_type(api: FakeApi) -> None:
    api.replies["LibraryStatus"] = {
        "changer_type": "STK-L700",
        "changer": {"target_iqn": "iqn.x:gw-mediachanger", "vendor": "STK", "product": "L700",
                    "revision": "0105", "serial": "1"},
        "drives": [{"index": 0, "target_iqn": "iqn.x:gw-tapedrive-01", "serial": "2",
                    "barcode": "VT0000001", "bytes_written": GiB, "bytes_read": 0}],
        "slots": {"total": 1600, "full": 3}, "ie": {"total": 1600, "full": 7},
        "removal_prevented": False}
    r = run(library, "status")
    assert r.exit_code == 0, r.output
    assert "STK-L700" in r.output and "3/1600" in r.output and "7/1600" in r.output
    assert "VT0000001" in r.output and "1 GiB" in r.output
    r = run(library, "status", "--json")
    assert json.loads(r.output)["slots"]["full"] == 3
    r = run(library, "set-changer-type", "AWS-Gateway-VTL")
    assert r.exit_code == 0 and api.calls[-1] == ("SetChangerType", {"type": "AWS-Gateway-VTL"})
    r = run(library, "set-changer-type", "HP-MSL")
    assert r.exit_code == 2 and len(api.calls) == 3  # refused before any request


def test_groups_are_in_the_main_command() -> None:
    from cli.main import cli
    assert "tape" in cli.commands and "library" in cli.commands
