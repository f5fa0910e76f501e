"""Printing results (aligned tables or JSON) and reading/writing byte sizes.

Tables are for people and may change; ``--json`` output uses the stable field names the
columns are keyed by, so scripts can rely on it.
"""

from __future__ import annotations

import json
import re
from typing import IO, Any, Sequence

import click

_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
    "p": 1 << 50, "pb": 1 << 50, "pib": 1 << 50,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Parse "1GiB", "512MiB", "2TiB", "1G", "1.5GiB" or plain bytes into a byte count.

    Units are binary (a storage gateway's sizes are GiB); "GB" is read as GiB too, as AWS does.
    Raises ValueError with a one-line message.
    """
    match = _SIZE_RE.match(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size; use e.g. 1GiB, 512MiB, 2TiB or a byte count")
    number, unit = match.group(1), _UNITS[match.group(2).lower()]
    if "." in number:
        value = float(number) * unit
        if value != int(value):
            raise ValueError(f"{text!r} is not a whole number of bytes")
        size = int(value)
    else:
        size = int(number) * unit
    if size <= 0:
        raise ValueError(f"{text!r}: a size must be more than 0 bytes")
    return size


def human_bytes(n: int | None) -> str:
    """``1073741824 -> "1 GiB"``, ``1610612736 -> "1.5 GiB"``, ``512 -> "512 B"``."""
    if n is None:
        return "-"
    for suffix, unit in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30),
                         ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= unit:
            value = n / unit
            return f"{value:.0f} {suffix}" if value == int(value) else f"{value:.1f} {suffix}"
    return f"{n} B"


class _OneLineBadParameter(click.BadParameter):
    """A bad parameter reported as one ``Error: ...`` line (exit code 2, no usage block)."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"Error: {self.format_message()}", err=True, file=file)


class SizeType(click.ParamType):
    """A click parameter type for byte sizes (see :func:`parse_size`)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as exc:
            raise _OneLineBadParameter(str(exc), ctx=ctx, param=param) from None


SIZE = SizeType()


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def emit(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]], as_json: bool) -> None:
    """Print ``rows`` as an aligned table with ``columns`` (key, header), or as a JSON list.

    The JSON form carries exactly the column keys, in column order.
    """
    if as_json:
        click.echo(json.dumps([{key: row.get(key) for key, _ in columns} for row in rows],
                              indent=2))
        return
    table = [[header for _, header in columns]]
    table += [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def emit_record(record: dict[str, Any], fields: Sequence[tuple[str, str]] | None,
                as_json: bool) -> None:
    """Print one object as ``label: value`` lines (``fields`` first, in order), or as JSON."""
    if as_json:
        click.echo(json.dumps(record, indent=2, sort_keys=fields is None))
        return
    pairs = [(label, record.get(key)) for key, label in (fields or [])]
    shown = {key for key, _ in (fields or [])}
    pairs += [(key, value) for key, value in record.items() if key not in shown]
    width = max((len(label) for label, _ in pairs), default=0)
    for label, value in pairs:
        if isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        click.echo(f"{label + ':':<{width + 1}} {_cell(value)}")
