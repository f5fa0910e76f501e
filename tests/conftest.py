"""Shared fixtures: a running appliance per test (``appliance``) or per module (``appliance_session``)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.support.appliance import ApplianceProcess


def _serve(data_dir: Path) -> Iterator[ApplianceProcess]:
    app = ApplianceProcess(data_dir)
    app.start()
    try:
        yield app
    finally:
        if app.running:
            code = app.stop()
            assert code == 0, f"vtl serve exited {code} on SIGTERM:\n{app.log_tail()}"
        else:
            app.kill()


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[ApplianceProcess]:
    """A fresh ``vtl serve`` on 127.0.0.1 (free port) with its own data dir, for one test."""
    yield from _serve(tmp_path / "data")


@pytest.fixture(scope="module")
def appliance_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApplianceProcess]:
    """One ``vtl serve`` shared by all tests of a module."""
    yield from _serve(tmp_path_factory.mktemp("appliance") / "data")
