"""Tape statuses and the one transition table (AWS Tape Gateway, FACTS.md).

CREATING -> AVAILABLE -> (exported to an I/E slot) IN TRANSIT TO VTS -> ARCHIVING -> ARCHIVED;
ARCHIVED -> RETRIEVING -> RETRIEVED (read-only); any tape may end DELETING -> DELETED; data lost on
the gateway is IRRECOVERABLE. Archival can be cancelled only while IN TRANSIT TO VTS (back to
AVAILABLE); a retrieval can be cancelled (back to ARCHIVED).

Invariant: :data:`TRANSITIONS` is the only place that says which change is legal.
"""

from __future__ import annotations

import enum

from vtl.errors import Conflict


class TapeStatus(str, enum.Enum):
    """The status strings, exactly as AWS spells them (they appear in JSON and the catalog)."""

    CREATING = "CREATING"
    AVAILABLE = "AVAILABLE"
    IN_TRANSIT_TO_VTS = "IN TRANSIT TO VTS"
    ARCHIVING = "ARCHIVING"
    ARCHIVED = "ARCHIVED"
    RETRIEVING = "RETRIEVING"
    RETRIEVED = "RETRIEVED"
    DELETING = "DELETING"
    DELETED = "DELETED"
    IRRECOVERABLE = "IRRECOVERABLE"

    def __str__(self) -> str:
        return self.value


S = TapeStatus

TRANSITIONS: dict[TapeStatus, frozenset[TapeStatus]] = {
    S.CREATING: frozenset({S.AVAILABLE, S.DELETING, S.IRRECOVERABLE}),
    S.AVAILABLE: frozenset({S.IN_TRANSIT_TO_VTS, S.DELETING, S.IRRECOVERABLE}),
    S.IN_TRANSIT_TO_VTS: frozenset({S.ARCHIVING, S.AVAILABLE, S.IRRECOVERABLE}),
    S.ARCHIVING: frozenset({S.ARCHIVED, S.IRRECOVERABLE}),
    S.ARCHIVED: frozenset({S.RETRIEVING, S.DELETING}),
    S.RETRIEVING: frozenset({S.RETRIEVED, S.ARCHIVED}),
    S.RETRIEVED: frozenset({S.ARCHIVED, S.IRRECOVERABLE}),
    S.DELETING: frozenset({S.DELETED}),
    S.DELETED: frozenset(),
    S.IRRECOVERABLE: frozenset({S.DELETING}),
}
assert set(TRANSITIONS) == set(TapeStatus)

#: Statuses a drive may load (RETRIEVED read-only).
LOADABLE = frozenset({S.AVAILABLE, S.RETRIEVED})
READ_ONLY = frozenset({S.RETRIEVED})
#: Statuses of tapes that occupy an element of the library (slot, I/E slot or drive).
IN_LIBRARY = frozenset({S.CREATING, S.AVAILABLE, S.IN_TRANSIT_TO_VTS, S.RETRIEVED,
                        S.IRRECOVERABLE})


class IllegalTransition(Conflict):
    """A status change the table forbids."""


def can_transition(old: TapeStatus | str, new: TapeStatus | str) -> bool:
    return TapeStatus(new) in TRANSITIONS[TapeStatus(old)]


def check_transition(old: TapeStatus | str, new: TapeStatus | str) -> TapeStatus:
    """Return ``new`` as a TapeStatus, or raise IllegalTransition naming both statuses."""
    o, n = TapeStatus(old), TapeStatus(new)
    if n not in TRANSITIONS[o]:
        raise IllegalTransition(f"a tape in status {o.value} cannot become {n.value}")
    return n
