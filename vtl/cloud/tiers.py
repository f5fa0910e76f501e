"""Archive pools and the retrieval model (pure: every time is a parameter).

Facts modelled (AWS Tape Gateway and S3, see /work/shared/FACTS.md):

- Two pools. GLACIER (S3 Glacier Flexible Retrieval): a retrieval completes in 3-5 h.
  DEEP_ARCHIVE: "typically within 12 hours"; we model 9-12 h. Rationale: AWS gives only the
  upper bound; a lower bound above Glacier's upper bound keeps "deeper is slower" true for every
  draw, so no test or demo ever sees a Deep Archive tape come back before a Glacier one
  requested at the same time.
- A ready time is drawn uniformly in the pool's window from ``random.Random(seed)``; the seed
  (e.g. ``"<barcode>:<request id>"``) makes the draw deterministic, so a restarted appliance
  recomputes the same ready time instead of storing or re-rolling it.
- Moving a tape between pools is one-way: GLACIER -> DEEP_ARCHIVE only.
- Minimum archive storage charge: 90 days for GLACIER (FACTS.md), 180 days for DEEP_ARCHIVE
  (S3's minimum storage duration for that class). Deleting or moving a tape earlier is billed
  as if it had stayed the minimum.
- Retention lock (custom pools): governance or compliance, 0-36,500 days from archiving.
  Governance can be bypassed by a caller holding the bypass permission; compliance cannot.
- S3 restore tiers (for the real-S3 side and the LocalStore's restore delays): GLACIER
  Expedited 1-5 min, Standard 3-5 h, Bulk 5-12 h; DEEP_ARCHIVE Standard within 12 h, Bulk
  within 48 h, no Expedited.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from vtl.cloud.clock import require_aware
from vtl.cloud.store import RestoreTier, StorageClass
from vtl.errors import InvalidRequest

H = timedelta(hours=1)


@dataclass(frozen=True)
class Window:
    """A duration range ``[low, high]`` in which something completes."""

    low: timedelta
    high: timedelta

    def __post_init__(self) -> None:
        if self.low < timedelta(0) or self.high < self.low:
            raise ValueError(f"bad window {self.low}..{self.high}")

    def draw(self, rng: random.Random) -> timedelta:
        """A duration uniformly in the window, whole seconds."""
        span = (self.high - self.low).total_seconds()
        return self.low + timedelta(seconds=round(rng.random() * span))


class Pool(enum.Enum):
    """An archive pool: where ejected tapes go. Values are the CLI/catalog names."""

    GLACIER = "glacier"
    DEEP_ARCHIVE = "deep-archive"

    @property
    def storage_class(self) -> StorageClass:
        return _POOL_CLASS[self]

    @property
    def retrieval_window(self) -> Window:
        """How long a tape retrieval from this pool takes."""
        return _RETRIEVAL[self]

    @property
    def minimum_storage(self) -> timedelta:
        """The minimum archive storage duration billed."""
        return _MINIMUM_STORAGE[self]

    @property
    def depth(self) -> int:
        """Ordering of pools: a tape may only move to a deeper pool."""
        return _DEPTH[self]

    @classmethod
    def parse(cls, name: str) -> Pool:
        """Accept the pool value or the AWS pool id (``GLACIER``, ``DEEP_ARCHIVE``)."""
        norm = name.strip().lower().replace("_", "-")
        for pool in cls:
            if pool.value == norm:
                return pool
        raise InvalidRequest(f"unknown pool {name!r}: use 'glacier' or 'deep-archive'")


_POOL_CLASS = {Pool.GLACIER: StorageClass.GLACIER, Pool.DEEP_ARCHIVE: StorageClass.DEEP_ARCHIVE}
_RETRIEVAL = {Pool.GLACIER: Window(3 * H, 5 * H), Pool.DEEP_ARCHIVE: Window(9 * H, 12 * H)}
_MINIMUM_STORAGE = {Pool.GLACIER: timedelta(days=90), Pool.DEEP_ARCHIVE: timedelta(days=180)}
_DEPTH = {Pool.GLACIER: 1, Pool.DEEP_ARCHIVE: 2}

MINIMUM_ARCHIVE_DAYS = 90
"""The minimum archive storage charge of a Glacier pool, in days (FACTS.md)."""


def draw_ready_time(pool: Pool, requested_at: datetime, seed: str) -> datetime:
    """When a retrieval from ``pool`` requested at ``requested_at`` completes.

    Deterministic for a given ``(pool, requested_at, seed)``: ``random.Random(str)`` hashes the
    string with SHA-512, independent of ``PYTHONHASHSEED`` and the process.
    """
    when = require_aware(requested_at, "requested_at")
    rng = random.Random(f"vtl-retrieval:{seed}")
    return when + pool.retrieval_window.draw(rng)


# S3 restore tiers: how long ``restore_object`` takes per storage class and tier.
_RESTORE = {
    (StorageClass.GLACIER, RestoreTier.EXPEDITED): Window(timedelta(minutes=1), timedelta(minutes=5)),
    (StorageClass.GLACIER, RestoreTier.STANDARD): Window(3 * H, 5 * H),
    (StorageClass.GLACIER, RestoreTier.BULK): Window(5 * H, 12 * H),
    (StorageClass.DEEP_ARCHIVE, RestoreTier.STANDARD): Window(9 * H, 12 * H),
    (StorageClass.DEEP_ARCHIVE, RestoreTier.BULK): Window(36 * H, 48 * H),
}


def restore_window(storage_class: StorageClass, tier: RestoreTier) -> Window:
    """The S3 restore time window; raises InvalidRequest where S3 refuses the tier."""
    try:
        return _RESTORE[(storage_class, tier)]
    except KeyError:
        raise InvalidRequest(
            f"restore tier {tier.value} is not available for {storage_class.value} objects"
        ) from None


def restore_ready_time(
    storage_class: StorageClass, tier: RestoreTier, requested_at: datetime, seed: str
) -> datetime:
    """Deterministic completion time of an S3-style restore (same scheme as draw_ready_time)."""
    when = require_aware(requested_at, "requested_at")
    rng = random.Random(f"vtl-restore:{seed}")
    return when + restore_window(storage_class, tier).draw(rng)


@dataclass(frozen=True)
class Verdict:
    """A yes/no answer with the reason a user would be shown."""

    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


def can_move(src: Pool, dst: Pool) -> Verdict:
    """Pool moves are one-way, to a deeper pool (GLACIER -> DEEP_ARCHIVE)."""
    if src is dst:
        return Verdict(False, f"the tape is already in the {src.value} pool")
    if dst.depth < src.depth:
        return Verdict(False, f"tapes cannot move from {src.value} back to {dst.value}: moves are one-way")
    return Verdict(True, f"move from {src.value} to {dst.value} allowed")


def early_deletion_remaining(pool: Pool, archived_at: datetime, now: datetime) -> timedelta:
    """How much of the minimum storage duration is still unbilled-but-owed (zero if none)."""
    age = require_aware(now, "now") - require_aware(archived_at, "archived_at")
    return max(pool.minimum_storage - age, timedelta(0))


def incurs_early_deletion_charge(pool: Pool, archived_at: datetime, now: datetime) -> bool:
    """True if deleting (or moving) an archived tape now is billed the minimum storage charge."""
    return early_deletion_remaining(pool, archived_at, now) > timedelta(0)


class LockMode(enum.Enum):
    """Retention lock types of a custom pool (AWS: GOVERNANCE / COMPLIANCE)."""

    GOVERNANCE = "governance"
    COMPLIANCE = "compliance"


MAX_RETENTION_DAYS = 36_500


@dataclass(frozen=True)
class RetentionLock:
    """A pool's retention lock: tapes cannot be deleted for ``days`` after archiving."""

    mode: LockMode
    days: int

    def __post_init__(self) -> None:
        if isinstance(self.days, bool) or not isinstance(self.days, int):
            raise InvalidRequest("retention lock days must be a whole number")
        if not 0 <= self.days <= MAX_RETENTION_DAYS:
            raise InvalidRequest(f"retention lock is {self.days} days: use 0 to {MAX_RETENTION_DAYS}")

    def locked_until(self, archived_at: datetime) -> datetime:
        return require_aware(archived_at, "archived_at") + timedelta(days=self.days)


def can_delete(
    archived_at: datetime,
    lock: RetentionLock | None,
    now: datetime,
    *,
    bypass_governance: bool = False,
) -> Verdict:
    """Whether an archived tape may be deleted now under its pool's retention lock."""
    now = require_aware(now, "now")
    if lock is None or lock.days == 0:
        return Verdict(True, "no retention lock")
    until = lock.locked_until(archived_at)
    if now >= until:
        return Verdict(True, f"retention lock expired at {until.isoformat()}")
    if lock.mode is LockMode.GOVERNANCE and bypass_governance:
        return Verdict(True, f"governance lock until {until.isoformat()} bypassed")
    hint = (
        "; a user allowed to bypass governance retention can delete it"
        if lock.mode is LockMode.GOVERNANCE
        else "; compliance locks cannot be bypassed"
    )
    return Verdict(False, f"{lock.mode.value} retention lock until {until.isoformat()}{hint}")
