"""Polling helpers for tests that wait on an appliance's background work (jobs, uploads)."""

from __future__ import annotations

import time
from typing import Any, Callable


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 60.0,
             interval: float = 0.1) -> Any:
    """Call ``fn`` every ``interval`` seconds until it returns something true; return that value.

    Raises AssertionError naming ``what`` after ``timeout`` seconds, so a test that waits for
    something that never happens fails instead of hanging.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
