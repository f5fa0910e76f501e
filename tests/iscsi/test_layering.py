"""The pure iSCSI modules stay pure (STYLE.md: no I/O, no clock) and print nothing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vtl.iscsi

PURE = ["pdu.py", "text.py", "login.py", "connection.py", "tasks.py", "errors.py", "device.py"]
FORBIDDEN = {"asyncio", "socket", "threading", "time", "boto3", "sqlite_utils", "apscheduler",
             "click", "selectors", "subprocess"}
PKG = Path(vtl.iscsi.__file__).parent


def _imports(tree: ast.AST) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_do_no_io(name: str) -> None:
    tree = ast.parse((PKG / name).read_text())
    roots = {m.split(".")[0] for m in _imports(tree)}
    assert not roots & FORBIDDEN


@pytest.mark.parametrize("path", sorted(PKG.glob("*.py")), ids=lambda p: p.name)
def test_no_print_and_only_allowed_project_imports(path: Path) -> None:
    tree = ast.parse(path.read_text())
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Name)}
    assert "print" not in calls
    project = {m for m in _imports(tree) if m.split(".")[0] in {"vtl", "volumes", "catalog", "cli",
                                                                "fileshare"}}
    assert all(m.startswith(("vtl.iscsi", "vtl.scsi")) for m in project), project
