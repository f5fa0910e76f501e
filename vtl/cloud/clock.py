"""Clocks for the cloud tier: real, fast-forwarded, and manual (tests).

Archive retrievals take hours; the appliance models them against a :class:`Clock` so that a demo
can run at ``speed`` N and tests can step time instead of sleeping.

Invariants:

- ``now()`` is always timezone-aware UTC; ``monotonic()`` never goes backwards (seconds, in
  model time, from an arbitrary origin).
- :class:`FastClock` model time is a pure function of the base clock's wall time and a stored
  :class:`ClockEpoch`: ``model = epoch.model + (wall - epoch.wall) * speed``. We chose this over a
  clock that pauses while the appliance is down because every process of the engine (supervisor,
  drive workers, job pool) must agree on model time without talking to each other, and a
  restart must not move time backwards: persist the epoch once (catalog), rebuild the clock from
  it in every process, and they all read the same model time. Downtime is fast-forwarded like
  any other wall time, as a real archive keeps working while the gateway is off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Where the cloud tier gets the time from."""

    def now(self) -> datetime:
        """The current (model) time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds of (model) time from an arbitrary origin; never decreases."""
        ...


def require_aware(when: datetime, what: str = "time") -> datetime:
    """Return ``when`` in UTC; naive datetimes are a bug in the caller."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (UTC), got naive {when!r}")
    return when.astimezone(UTC)


class SystemClock:
    """The real clock: wall time from the OS, monotonic from ``time.monotonic``."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    def __repr__(self) -> str:
        return "SystemClock()"


@dataclass(frozen=True)
class ClockEpoch:
    """The anchor of a :class:`FastClock`: at wall time ``wall`` model time was ``model``.

    Stored as ISO 8601 text (``to_json``/``from_json``) so the catalog can keep it.
    """

    wall: datetime
    model: datetime
    speed: float

    def __post_init__(self) -> None:
        require_aware(self.wall, "epoch wall time")
        require_aware(self.model, "epoch model time")
        if not self.speed > 0:
            raise ValueError(f"clock speed must be > 0, got {self.speed}")

    def model_time(self, wall: datetime) -> datetime:
        """Model time at wall time ``wall`` (pure)."""
        return self.model + (require_aware(wall) - self.wall) * self.speed

    def to_json(self) -> dict[str, str | float]:
        return {"wall": self.wall.isoformat(), "model": self.model.isoformat(), "speed": self.speed}

    @classmethod
    def from_json(cls, data: dict[str, str | float]) -> ClockEpoch:
        return cls(
            wall=datetime.fromisoformat(str(data["wall"])),
            model=datetime.fromisoformat(str(data["model"])),
            speed=float(data["speed"]),
        )


class FastClock:
    """Model time running ``speed`` times faster than the base clock.

    Without an ``epoch`` it anchors at construction (model time starts at the base clock's
    now); pass the stored ``epoch`` to continue a persisted model timeline (see module doc).
    """

    def __init__(self, speed: float, *, base: Clock | None = None, epoch: ClockEpoch | None = None) -> None:
        self._base: Clock = base if base is not None else SystemClock()
        if epoch is None:
            wall = self._base.now()
            epoch = ClockEpoch(wall=wall, model=wall, speed=speed)
        elif epoch.speed != speed:
            raise ValueError(f"stored clock epoch runs at speed {epoch.speed}, not {speed}")
        self.epoch = epoch
        self._mono_origin = self._base.monotonic()

    @property
    def speed(self) -> float:
        return self.epoch.speed

    def now(self) -> datetime:
        return self.epoch.model_time(self._base.now())

    def monotonic(self) -> float:
        return (self._base.monotonic() - self._mono_origin) * self.epoch.speed

    def __repr__(self) -> str:
        return f"FastClock(speed={self.speed}, epoch={self.epoch!r})"


DEFAULT_MANUAL_START = datetime(2026, 1, 1, tzinfo=UTC)


class ManualClock:
    """A clock that moves only when told: ``advance(seconds)``. For tests and simulations."""

    def __init__(self, start: datetime = DEFAULT_MANUAL_START) -> None:
        self._now = require_aware(start, "start")
        self._mono = 0.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float | timedelta) -> datetime:
        """Move time forward and return the new now. Time never goes backwards."""
        delta = seconds if isinstance(seconds, timedelta) else timedelta(seconds=seconds)
        if delta < timedelta(0):
            raise ValueError(f"a clock cannot go backwards ({delta})")
        self._now += delta
        self._mono += delta.total_seconds()
        return self._now

    def __repr__(self) -> str:
        return f"ManualClock(now={self._now.isoformat()})"
