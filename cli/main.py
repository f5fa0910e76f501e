"""The ``vtl`` command: a thin client of the appliance's control API (parse, call, print)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import click

import vtl
from cli.client import call, data_dir_option
from cli.output import emit_record
from cli.serve import serve
from cli.selftest import selftest
from cli.volume import volume


@click.group("vtl", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(vtl.__version__, prog_name="vtl")
def cli() -> None:
    """vtl: a storage gateway appliance (virtual tape library and block volumes over iSCSI)."""


@cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@data_dir_option
def status(as_json: bool, data_dir: Path) -> None:
    """Show the running appliance: gateway id, version, portal, targets."""
    info = call(data_dir, "DescribeGatewayInformation")
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    emit_record(info, [("gateway_id", "gateway"), ("version", "version"),
                       ("listen", "listen"), ("target_count", "targets"),
                       ("data_dir", "data dir")], False)


cli.add_command(serve)
cli.add_command(volume)
cli.add_command(selftest)

def _add_optional_group(module_name: str, group_name: str) -> None:
    """Add the click group ``group_name`` from ``module_name`` if that module exists yet."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return
    group = getattr(module, group_name, None)
    if not isinstance(group, click.Group):
        group = next((g for g in vars(module).values()
                      if isinstance(g, click.Group) and g.name == group_name), None)
    if group is not None:
        cli.add_command(group, group_name)


# Groups written alongside this one; absent until they land.
_add_optional_group("cli.tape", "tape")
_add_optional_group("cli.library", "library")
_add_optional_group("cli.archive", "archive")
_add_optional_group("cli.snapshot", "snapshot")
_add_optional_group("cli.share", "share")


def main() -> None:
    """Console-script entry point (``vtl``)."""
    cli(prog_name="vtl")


if __name__ == "__main__":
    main()
