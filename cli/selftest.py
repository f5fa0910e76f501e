"""``vtl selftest``: the administrator's one-command health check of the running library.

Prints one progress line per step and a verdict; exit 0 when it passed, 1 when it failed.
``--json`` prints the whole outcome (verdict, checks, speeds, step list) instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cli import client
from cli.client import data_dir_option
from cli.output import parse_size
from vtl.selftest import Selftest, Step


def _size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if size > 0xFFFFFF:
        raise click.BadParameter("a WRITE(6) block is at most 16 MiB - 1 bytes")
    return size


def _progress(step: Step) -> None:
    mark = {"ok": "ok", "skipped": "skipped", "failed": "FAILED"}[step.status]
    detail = step.detail
    if step.status == "skipped" and detail.startswith("skipped: "):
        detail = detail[len("skipped: "):]
    click.echo(f"[{step.index:>2}/{step.total}] {step.name:<22} {mark:<7} "
               f"{step.elapsed:7.2f} s  {detail}")


@click.command("selftest")
@click.option("--host", default=None, help="iSCSI portal address [default: the appliance's].")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="iSCSI portal port [default: the appliance's].")
@click.option("--blocks", type=click.IntRange(1, 1_000_000), default=64, show_default=True,
              help="Blocks to write and read back.")
@click.option("--block-size", "block_size", default="64KiB", show_default=True,
              callback=_size, help="Variable block size of each WRITE(6).")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=30.0, show_default=True,
              help="Seconds to wait for any one iSCSI answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome and steps as JSON.")
@data_dir_option
def selftest(host: str | None, port: int | None, blocks: int, block_size: int, timeout: float,
             as_json: bool, data_dir: Path) -> None:
    """Load a blank tape, write, read back and verify it, then put it back blank."""

    def control(op: str, **args: Any) -> Any:
        return client.call(data_dir, op, **args)

    test = Selftest(control, host=host, port=port, blocks=blocks, block_size=block_size,
                    timeout=timeout, progress=None if as_json else _progress)
    outcome = test.run()
    if as_json:
        click.echo(json.dumps(outcome.to_json(), indent=2))
    else:
        click.echo(outcome.verdict)
    if not outcome.passed:
        raise SystemExit(1)
