"""The tape status transition table (AWS Tape Gateway)."""

from __future__ import annotations

import pytest

from vtl.library.lifecycle import (
    LOADABLE,
    TRANSITIONS,
    IllegalTransition,
    TapeStatus as S,
    can_transition,
    check_transition,
)


def test_status_strings_are_the_aws_ones() -> None:
    assert S.IN_TRANSIT_TO_VTS.value == "IN TRANSIT TO VTS"
    assert {s.value for s in S} == {"CREATING", "AVAILABLE", "IN TRANSIT TO VTS", "ARCHIVING",
                                   "ARCHIVED", "RETRIEVING", "RETRIEVED", "DELETING", "DELETED",
                                   "IRRECOVERABLE"}


@pytest.mark.parametrize("old, new", [
    (S.CREATING, S.AVAILABLE), (S.AVAILABLE, S.IN_TRANSIT_TO_VTS),
    (S.IN_TRANSIT_TO_VTS, S.ARCHIVING), (S.ARCHIVING, S.ARCHIVED),
    (S.ARCHIVED, S.RETRIEVING), (S.RETRIEVING, S.RETRIEVED),
    (S.IN_TRANSIT_TO_VTS, S.AVAILABLE),  # archival cancelled
    (S.AVAILABLE, S.DELETING), (S.DELETING, S.DELETED), (S.IRRECOVERABLE, S.DELETING),
])
def test_allowed(old: S, new: S) -> None:
    assert can_transition(old, new)
    assert check_transition(old.value, new.value) is new


@pytest.mark.parametrize("old, new", [
    (S.ARCHIVING, S.AVAILABLE),  # archival cannot be cancelled once ARCHIVING
    (S.ARCHIVED, S.AVAILABLE), (S.DELETED, S.AVAILABLE), (S.CREATING, S.ARCHIVED),
    (S.RETRIEVED, S.AVAILABLE), (S.DELETING, S.AVAILABLE),
])
def test_forbidden(old: S, new: S) -> None:
    assert not can_transition(old, new)
    with pytest.raises(IllegalTransition, match=old.value):
        check_transition(old, new)


def test_deleted_is_final_and_every_status_has_a_row() -> None:
    assert TRANSITIONS[S.DELETED] == frozenset()
    assert set(TRANSITIONS) == set(S)
    assert LOADABLE == {S.AVAILABLE, S.RETRIEVED}
