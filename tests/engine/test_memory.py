"""A drive worker's memory does not grow with the bytes written (the bound is stated in
vtl/engine/workers.py): write 4 GiB through one worker and watch its resident set."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.helpers import block, load_tapes, start, status
from tests.support.libiscsi import Session, library_available

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not library_available(), reason="libiscsi not installed")]

MiB = 1 << 20
GiB = 1 << 30
#: python + modules (~40 MiB) + one session's bounded buffers (32 MiB queued write data,
#: 8 MiB transport buffer, 256 KiB scratch, 4 pooled 1 MiB blocks) + margin
BOUND = 128 * MiB


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} missing")


def test_worker_memory_stays_bounded_while_writing_4_gib(tmp_path: Path) -> None:
    app = start(tmp_path / "data", workers=1)
    try:
        [iqn] = load_tapes(app, 1)
        pid = status(app)["drives"][0]["worker_pid"]
        data = block(0, 0, MiB)
        with Session((app.portal, iqn, 0)) as s:
            for n in range(4 * GiB // MiB):
                s.write6(data).check()
                if n == GiB // MiB:
                    after_1g = _kib(pid, "VmRSS")
            s.write_filemarks(1).check()
            after_4g = _kib(pid, "VmRSS")
            peak = _kib(pid, "VmHWM")
        assert status(app)["drives"][0]["bytes_written"] == 4 * GiB
        assert peak < BOUND, f"peak RSS {peak / MiB:.0f} MiB"
        assert after_4g - after_1g < 8 * MiB, (after_1g / MiB, after_4g / MiB)
    finally:
        assert app.stop() == 0, app.log_tail()
