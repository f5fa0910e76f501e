"""Archive pools: the two built-in ones and custom pools with retention locks (AWS
CreateTapePool, ListTapePools, DeleteTapePool).

A tape's ``pool`` column names a pool: ``glacier``, ``deep-archive`` or a custom pool's name.
A custom pool archives to one of the two storage classes (its retrieval window follows that
class) and may carry a retention lock, governance or compliance, 0 to 36,500 days, counted from
the moment a tape is ARCHIVED: ``vtl archive delete`` refuses the tape until the lock ends
(governance: unless the caller bypasses it). The lock is stamped on the tape at archiving
(``retention_until``, ``retention_lock``), so it holds whatever happens to the pool afterwards,
and a pool is deleted only when no tape names it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from catalog import pools as pq
from catalog.db import Catalog
from vtl.cloud.tiers import MAX_RETENTION_DAYS, LockMode, Pool, RetentionLock
from vtl.errors import Conflict, InvalidRequest, NotFound

#: AWS pool names: 1-100 characters; ours start with a letter or digit (they appear in tables).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds")


class PoolRegistry:
    """Resolves pool names and serves the pool control operations."""

    def __init__(self, catalog: Catalog, now: Callable[[], datetime]) -> None:
        self.db = catalog.db
        self._now = now

    # --- resolution ------------------------------------------------------------------------
    def storage_pool(self, name: str | None) -> Pool:
        """The built-in pool (storage class and retrieval window) a pool name archives to."""
        name = name or Pool.GLACIER.value
        try:
            return Pool.parse(name)
        except InvalidRequest:
            row = pq.get_pool(self.db, name)
            if row is None:
                raise
            return Pool.parse(row["storage_class"])

    def lock_of(self, name: str | None) -> RetentionLock | None:
        """The retention lock of a custom pool (None for built-in pools and unlocked ones)."""
        if not name:
            return None
        row = pq.get_pool(self.db, name)
        if row is None or not row["retention_lock"]:
            return None
        return RetentionLock(LockMode(row["retention_lock"]), int(row["retention_days"] or 0))

    def canonical(self, name: Any) -> str:
        """The stored name of an existing pool (built-in names normalised); else InvalidRequest."""
        text = str(name or Pool.GLACIER.value).strip()
        try:
            return Pool.parse(text).value
        except InvalidRequest:
            row = pq.get_pool(self.db, text)
            if row is None:
                raise InvalidRequest(f"unknown pool {text!r}: use glacier, deep-archive or a "
                                     "pool from `vtl archive pool list`") from None
            return str(row["name"])

    # --- control operations ----------------------------------------------------------------
    def ops(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {"CreateTapePool": self.create_pool, "ListTapePools": self.list_pools,
                "DeleteTapePool": self.delete_pool}

    def create_pool(self, args: dict[str, Any]) -> dict[str, Any]:
        """CreateTapePool: ``name``, ``storage_class`` (glacier | deep-archive), optional
        ``retention_lock`` (governance | compliance) with ``retention_days`` (0-36,500)."""
        name = args.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequest("pool name must be 1-100 letters, digits, spaces, '.', '_' or "
                                 "'-', starting with a letter or digit")
        try:
            Pool.parse(name)
        except InvalidRequest:
            pass
        else:
            raise Conflict(f"{name!r} is a built-in pool; choose another name")
        if pq.get_pool(self.db, name) is not None:
            raise Conflict(f"pool {name!r} exists already")
        storage = Pool.parse(str(args.get("storage_class") or ""))
        mode = args.get("retention_lock")
        days = args.get("retention_days")
        if mode in (None, "", "none"):
            if days not in (None, 0):
                raise InvalidRequest("retention_days needs a retention lock (governance or "
                                     "compliance)")
            mode, days = None, 0
        else:
            try:
                mode = LockMode(str(mode).lower()).value
            except ValueError:
                raise InvalidRequest(f"unknown retention lock {mode!r}: use governance or "
                                     "compliance") from None
            if days is None:
                raise InvalidRequest(f"a retention lock needs retention_days (0 to "
                                     f"{MAX_RETENTION_DAYS})")
            RetentionLock(LockMode(mode), days)  # validates the days
        row = {"name": name, "storage_class": storage.value, "retention_lock": mode,
               "retention_days": days, "created_at": _iso(self._now())}
        pq.add_pool(self.db, row)
        return self._json(row)

    def list_pools(self, args: dict[str, Any]) -> dict[str, Any]:
        """ListTapePools: built-in and custom pools, with the tapes that name each."""
        rows: list[dict[str, Any]] = [
            {"name": p.value, "storage_class": p.value, "retention_lock": None,
             "retention_days": 0, "created_at": None, "custom": False} for p in Pool]
        rows += [dict(r, custom=True) for r in pq.list_pools(self.db)]
        return {"pools": [self._json(r) for r in rows]}

    def delete_pool(self, args: dict[str, Any]) -> dict[str, Any]:
        """DeleteTapePool: a custom pool no tape names (archived tapes included)."""
        name = args.get("name")
        row = pq.get_pool(self.db, name) if isinstance(name, str) else None
        if row is None:
            raise NotFound(f"no custom pool {name!r}; list pools with `vtl archive pool list`")
        count = pq.delete_pool_if_empty(self.db, row["name"])
        if count:
            raise Conflict(f"pool {row['name']!r} still holds {count} tape(s); delete or "
                           "move them first")
        return self._json(dict(row, custom=True))

    def _json(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"name": row["name"], "storage_class": row["storage_class"],
                "retention_lock": row.get("retention_lock"),
                "retention_days": int(row.get("retention_days") or 0),
                "custom": bool(row.get("custom", True)),
                "tapes": pq.tapes_in_pool(self.db, row["name"]),
                "created_at": row.get("created_at")}
