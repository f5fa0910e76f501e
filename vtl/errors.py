"""Errors of the control plane, carrying an AWS Storage Gateway style code as data.

Services raise :class:`ApplianceError`; the control API turns it into
``{"ok": false, "error": {"code": ..., "message": ...}}`` and the CLI prints the message on one
line with a non-zero exit. Messages say what is wrong and what to do.
"""

from __future__ import annotations

from typing import Any


class ApplianceError(Exception):
    """A request the appliance refuses, with a stable machine-readable code."""

    code = "InvalidGatewayRequestException"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidRequest(ApplianceError):
    """Bad arguments: sizes, names, barcodes out of the allowed range."""

    code = "InvalidParameterValue"


class NotFound(ApplianceError):
    code = "ResourceNotFound"


class Conflict(ApplianceError):
    """The resource exists already, or is in a state that forbids the request."""

    code = "ResourceConflict"


class LimitExceeded(ApplianceError):
    code = "LimitExceeded"


def check_args(args: dict[str, Any], required: tuple[str, ...],
               optional: tuple[str, ...] = ()) -> None:
    """Check a control operation's arguments: every ``required`` one present (not None), none
    outside ``required + optional``; raise :class:`InvalidRequest` naming the first offender."""
    missing = [k for k in required if args.get(k) is None]
    if missing:
        raise InvalidRequest(f"missing argument {missing[0]!r}: pass {', '.join(required)}")
    unknown = sorted(set(args) - set(required) - set(optional))
    if unknown:
        raise InvalidRequest(f"unknown argument {unknown[0]!r}: accepted are "
                             f"{', '.join(required + optional)}")
