"""The package arrows of ARCHITECTURE.md and the purity rules of STYLE.md, checked on the AST.

- ``vtl.iscsi`` and ``vtl.scsi`` import nothing else from the project but each other's contract
  (``vtl.scsi.command``, ``vtl.errors``): never volumes, fileshare, catalog, cli, vtl.library,
  vtl.engine or vtl.cloud.
- Pure modules (codecs and state machines) import no I/O, clock, thread, database, cloud or CLI
  library, so they stay testable byte for byte.
- ``catalog`` imports no sibling package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TRANSPORT_FORBIDDEN = ("volumes", "fileshare", "catalog", "cli", "vtl.library", "vtl.engine",
                       "vtl.cloud")
PURE_FORBIDDEN = ("asyncio", "socket", "threading", "time", "boto3", "botocore", "sqlite3",
                  "sqlite_utils", "apscheduler", "click", "subprocess", "multiprocessing")
PURE_MODULES = ("vtl/iscsi/pdu.py", "vtl/iscsi/text.py", "vtl/iscsi/login.py",
                "vtl/iscsi/connection.py", "vtl/iscsi/tasks.py", "volumes/sbc.py", "vtl/library/drive.py",
                "vtl/library/changer.py")
PROJECT_PACKAGES = ("vtl", "volumes", "fileshare", "catalog", "cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, package: str | None = None) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from x import y`` yields x and x.y).

    ``package`` is the package relative imports resolve against (default: from the path).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    if package is None:
        package = module_name(path)
        if path.name != "__init__.py":
            package = package.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


def offending(found: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(name for name in found
                  if any(name == f or name.startswith(f + ".") for f in forbidden))


def py_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


TRANSPORT = py_files("vtl/iscsi", "vtl/scsi")
PURE = sorted({*(ROOT / m for m in PURE_MODULES if (ROOT / m).exists()),
               *(p for p in py_files("vtl/scsi") if p.name != "__init__.py")})
CATALOG = py_files("catalog")


def test_the_walker_sees_relative_and_dotted_imports(tmp_path: Path) -> None:
    # guards the checks below against passing vacuously
    found = imports(ROOT / "tests" / "test_layering.py")
    assert {"ast", "pathlib.Path", "pytest"} <= found
    sample = tmp_path / "sample.py"
    sample.write_text("from ..engine import control\nfrom . import pdu\n"
                      "def f():\n    import time\n")
    assert imports(sample, "vtl.iscsi") >= {"vtl.engine.control", "vtl.iscsi.pdu", "time"}
    assert offending({"vtl.engine.control", "vtlx"}, ("vtl.engine",)) == ["vtl.engine.control"]
    assert TRANSPORT and PURE and CATALOG


@pytest.mark.parametrize("path", TRANSPORT, ids=ids(TRANSPORT))
def test_iscsi_and_scsi_import_no_upper_layer(path: Path) -> None:
    assert offending(imports(path), TRANSPORT_FORBIDDEN) == []


@pytest.mark.parametrize("path", PURE, ids=ids(PURE))
def test_pure_modules_do_no_io(path: Path) -> None:
    assert offending(imports(path), PURE_FORBIDDEN) == []


@pytest.mark.parametrize("path", CATALOG, ids=ids(CATALOG))
def test_catalog_imports_no_sibling(path: Path) -> None:
    siblings = tuple(p for p in PROJECT_PACKAGES if p != "catalog")
    assert offending(imports(path), siblings) == []
