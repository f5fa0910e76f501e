"""The ``vtl`` command line: parsing, output formats, one-line errors, ``serve``/``status``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
from click.testing import CliRunner, Result

from cli.main import cli
from cli.output import human_bytes, parse_size
from cli.serve import parse_listen
from tests.support.appliance import ApplianceProcess, ControlThread
from vtl.errors import Conflict, NotFound

GiB = 1 << 30


def run(*args: str, data_dir: Path | None = None, input: str | None = None) -> Result:
    env = {"VTL_DATA_DIR": str(data_dir)} if data_dir else {}
    return CliRunner().invoke(cli, list(args), env=env, input=input)


# --- sizes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, size", [
    ("1GiB", GiB), ("512MiB", 512 << 20), ("2TiB", 2 << 40), ("1G", GiB), ("1g", GiB),
    ("1GB", GiB), ("4096", 4096), ("1.5GiB", 3 << 29), ("100 GiB", 100 * GiB), ("8k", 8192),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "1XB", "-1GiB", "0", "1.5", "1,5G", "1 G B"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (512, "512 B"), (1024, "1 KiB"), (GiB, "1 GiB"), (3 << 29, "1.5 GiB"),
    (2 << 40, "2 TiB"), (None, "-"),
])
def test_human_bytes(n: int | None, text: str) -> None:
    assert human_bytes(n) == text


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:3260") == ("127.0.0.1", 3260)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("3260", "host:", "host:99999", ":3260"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_bad_size_is_a_one_line_usage_error(tmp_path: Path) -> None:
    result = run("volume", "create", "--name", "v1", "--size", "12XB", data_dir=tmp_path)
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0
    assert result.output.startswith("Error:") and "12XB" in result.output


def test_bad_listen_is_a_usage_error(tmp_path: Path) -> None:
    result = run("serve", "--listen", "nowhere", data_dir=tmp_path)
    assert result.exit_code == 2
    assert "HOST:PORT" in result.output


# --- no appliance ------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["status"], ["volume", "list"], ["volume", "show", "v1"], ["volume", "delete", "v1", "--yes"],
    ["volume", "create", "--name", "v1", "--size", "1GiB"],
])
def test_no_appliance_running(tmp_path: Path, args: list[str]) -> None:
    result = run(*args, data_dir=tmp_path)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "is the appliance running?" in lines[0]
    assert f"vtl serve --data-dir {tmp_path}" in lines[0]
    assert "Traceback" not in result.output


def test_data_dir_option_beats_default(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["status", "--data-dir", str(tmp_path / "x")])
    assert str(tmp_path / "x") in result.output


def test_default_data_dir_is_xdg(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["status"], env={"XDG_DATA_HOME": str(tmp_path),
                                                      "VTL_DATA_DIR": None})
    assert str(tmp_path / "vtl" / "control.sock") in result.output


# --- against a fake control API ----------------------------------------------------------------
class FakeVolumes:
    """Just enough of VolumeService's ops to check what the CLI sends and prints."""

    def __init__(self) -> None:
        self.volumes: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def ops(self) -> dict[str, Any]:
        return {"CreateStorediSCSIVolume": self.create, "ListVolumes": self.list,
                "DescribeVolume": self.describe, "DeleteVolume": self.delete,
                "SetVolumeChap": self.chap}

    def create(self, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("create", args))
        if args["name"] in self.volumes:
            raise Conflict(f"volume {args['name']} exists already")
        vol = {"name": args["name"], "type": "stored", "size_bytes": args["size_bytes"],
               "status": "AVAILABLE", "target_iqn": f"iqn.test:{args['name']}", "lun": 0,
               "path": "/x"}
        self.volumes[args["name"]] = vol
        return vol

    def list(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return list(self.volumes.values())

    def describe(self, args: dict[str, Any]) -> dict[str, Any]:
        if args["name"] not in self.volumes:
            raise NotFound(f"volume {args['name']} does not exist")
        return self.volumes[args["name"]]

    def delete(self, args: dict[str, Any]) -> dict[str, Any]:
        self.describe(args)
        del self.volumes[args["name"]]
        return {"name": args["name"]}

    def chap(self, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("chap", args))
        self.describe(args)
        return {}


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[Path, FakeVolumes]]:
    volumes = FakeVolumes()
    server = ControlThread(tmp_path / "data")
    for name, fn in volumes.ops().items():
        server.register(name, fn)
    server.start()
    yield server.data_dir, volumes
    server.stop()


def test_volume_create_sends_bytes(fake: tuple[Path, FakeVolumes]) -> None:
    data_dir, volumes = fake
    result = run("volume", "create", "--name", "v1", "--size", "1GiB", data_dir=data_dir)
    assert result.exit_code == 0, result.output
    assert volumes.calls == [("create", {"name": "v1", "size_bytes": GiB, "type": "stored"})]
    assert "v1" in result.output and "1 GiB" in result.output and "iqn.test:v1" in result.output
    result = run("volume", "create", "--name", "v1", "--size", "1GiB", data_dir=data_dir)
    assert result.exit_code == 1
    assert result.output == "Error: volume v1 exists already [ResourceConflict]\n"


def test_volume_list_table_and_json(fake: tuple[Path, FakeVolumes]) -> None:
    data_dir, _ = fake
    run("volume", "create", "--name", "alpha", "--size", "512MiB", data_dir=data_dir)
    run("volume", "create", "--name", "b", "--size", "2TiB", data_dir=data_dir)
    table = run("volume", "list", data_dir=data_dir)
    assert table.exit_code == 0
    lines = table.output.splitlines()
    assert lines[0].split() == ["NAME", "TYPE", "SIZE", "STATUS", "TARGET", "LUN"]
    assert lines[1].split() == ["alpha", "stored", "512", "MiB", "AVAILABLE", "iqn.test:alpha", "0"]
    assert lines[1].index("stored") == lines[0].index("TYPE")  # aligned
    listed = json.loads(run("volume", "list", "--json", data_dir=data_dir).output)
    assert listed == [
        {"name": "alpha", "type": "stored", "size_bytes": 512 << 20, "status": "AVAILABLE",
         "target_iqn": "iqn.test:alpha", "lun": 0},
        {"name": "b", "type": "stored", "size_bytes": 2 << 40, "status": "AVAILABLE",
         "target_iqn": "iqn.test:b", "lun": 0},
    ]


def test_volume_show(fake: tuple[Path, FakeVolumes]) -> None:
    data_dir, _ = fake
    run("volume", "create", "--name", "v1", "--size", "1GiB", data_dir=data_dir)
    shown = json.loads(run("volume", "show", "v1", "--json", data_dir=data_dir).output)
    assert shown["size_bytes"] == GiB and shown["target_iqn"] == "iqn.test:v1"
    text = run("volume", "show", "v1", data_dir=data_dir).output
    assert re.search(r"^target:\s+iqn.test:v1$", text, re.M), text
    assert re.search(r"^size:\s+1 GiB \(1073741824 bytes\)$", text, re.M), text
    missing = run("volume", "show", "nope", data_dir=data_dir)
    assert missing.exit_code == 1
    assert missing.output == "Error: volume nope does not exist [ResourceNotFound]\n"


def test_volume_delete_asks(fake: tuple[Path, FakeVolumes]) -> None:
    data_dir, volumes = fake
    run("volume", "create", "--name", "v1", "--size", "1GiB", data_dir=data_dir)
    kept = run("volume", "delete", "v1", data_dir=data_dir, input="n\n")
    assert kept.exit_code == 1 and "v1" in volumes.volumes
    gone = run("volume", "delete", "v1", "--yes", data_dir=data_dir)
    assert gone.exit_code == 0 and "v1" not in volumes.volumes


def test_volume_chap_arguments(fake: tuple[Path, FakeVolumes]) -> None:
    data_dir, volumes = fake
    run("volume", "create", "--name", "v1", "--size", "1GiB", data_dir=data_dir)
    result = run("volume", "chap", "v1", "--user", "u", "--secret", "s" * 12,
                 "--mutual-user", "t", "--mutual-secret", "m" * 12,
                 "--initiator", "iqn.a", "--initiator", "iqn.b", data_dir=data_dir)
    assert result.exit_code == 0, result.output
    assert volumes.calls[-1] == ("chap", {"name": "v1", "chap_user": "u", "chap_secret": "s" * 12,
                                          "mutual_user": "t", "mutual_secret": "m" * 12,
                                          "initiators": ["iqn.a", "iqn.b"]})
    half = run("volume", "chap", "v1", "--user", "u", "--secret", "s" * 12,
               "--mutual-user", "t", data_dir=data_dir)
    assert half.exit_code == 2


# --- a real appliance process ------------------------------------------------------------------
def test_serve_status_and_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with ApplianceProcess(data_dir) as app:
        status = json.loads(app.cli("status", "--json").output)
        assert re.fullmatch(r"sgw-[0-9A-F]{8}", status["gateway_id"])
        assert status["data_dir"] == str(data_dir)
        for sub in ("cache", "store", "volumes"):
            assert (data_dir / sub).is_dir()
        assert (data_dir / "catalog.db").is_file()
        text = app.cli("status").output
        assert status["gateway_id"] in text
        targets = app.call("ListTargets")
        assert targets["ok"] and isinstance(targets["result"], list)

        # a second appliance on the same data dir refuses, in one line, and leaves the first alone
        second = run("serve", "--listen", "127.0.0.1:0", data_dir=data_dir)
        assert second.exit_code == 1
        assert second.output.strip().count("\n") == 0
        assert "in use by another appliance" in second.output
        assert app.cli("status").exit_code == 0

        # a second appliance on another data dir but the same portal refuses, in one line
        busy = run("serve", "--listen", app.portal, data_dir=tmp_path / "other")
        assert busy.exit_code == 1, busy.output
        last = busy.output.splitlines()[-1]  # after the start-up log lines
        assert last.startswith(f"Error: cannot listen on {app.portal}"), busy.output
        assert "Traceback" not in busy.output
        assert app.stop() == 0
    assert not (data_dir / "control.sock").exists()
    with ApplianceProcess(data_dir) as again:
        assert json.loads(again.cli("status", "--json").output)["gateway_id"] == \
            status["gateway_id"]
