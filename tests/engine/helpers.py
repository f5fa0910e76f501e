"""Shared steps of the engine tests: an appliance with drive workers, tapes loaded into drives."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.support.appliance import ApplianceProcess
from tests.support.libiscsi import Session, parse_element_status

ELEMENT_IE = 3
ELEMENT_DRIVE = 4


def start(data_dir: Path, workers: int) -> ApplianceProcess:
    # small element map: READ ELEMENT STATUS stays short
    return ApplianceProcess(data_dir, extra_args=("--workers", str(workers), "--slots", "20",
                                                  "--ie-slots", "16")).start()


def status(app: ApplianceProcess) -> dict[str, Any]:
    reply = app.call("LibraryStatus")
    assert reply["ok"], reply
    return reply["result"]


def load_tapes(app: ApplianceProcess, count: int) -> list[str]:
    """Create ``count`` tapes and move them into drives 1..count; return the drive IQNs."""
    made = 0
    while made < count:
        n = min(10, count - made)
        r = app.cli("tape", "create", "--prefix", "EN", "--count", str(n), "--size", "100GiB")
        assert r.exit_code == 0, r.output
        made += n
    st = status(app)
    with Session((app.portal, st["changer"]["target_iqn"], 0)) as changer:
        ie = [e for e in parse_element_status(
            changer.read_element_status(element_type=ELEMENT_IE).check().data) if e.full]
        drives = parse_element_status(
            changer.read_element_status(element_type=ELEMENT_DRIVE).check().data)
        for src, dst in zip(ie[:count], drives[:count]):
            changer.move_medium(src.address, dst.address).check()
    return [d["target_iqn"] for d in status(app)["drives"][:count]]


def wait_for(predicate: Any, timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def block(drive: int, n: int, size: int) -> bytes:
    """Block ``n`` of a drive's stream: distinct per drive and block, cheap to build."""
    head = f"drive {drive:02d} block {n:08d} ".encode()
    return (head * (size // len(head) + 1))[:size]
