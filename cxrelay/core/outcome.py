"""What became of an event: a typed outcome, decided from what became of each target."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum


class Outcome(str, Enum):
    """The outcome of one event, as the inbox, the artifact and the metrics record it."""

    DELIVERED = "delivered"          # every target got it (or already had it)
    STALE = "stale"                  # every target holds newer data of the conversation
    PARTIAL = "partial"              # some targets dead-lettered, the others delivered
    DEAD_LETTERED = "dead_lettered"  # nothing delivered: every target (or the event) failed
    FILTERED = "filtered"            # a filter rule dropped it
    FAILED = "failed"                # its runs crashed too often (dead-lettered as a whole)
    WAITING = "waiting"              # a target is paused: the event waits for it, unfinished

    def __str__(self) -> str:
        return self.value


DEAD_LETTERED = "dead_lettered"  # a target's status when it went to the dead letters
STALE = "stale"  # a target's status when it already holds newer data (cxrelay.core.ordering)
WAITING = "waiting"  # a target's status while it is paused (cxrelay.core.health)


def event_outcome(target_statuses: Iterable[str]) -> Outcome:
    """waiting while any target is paused; else delivered when no target dead-lettered (stale
    when every target held newer data), dead_lettered when all did, partial between."""
    statuses = list(target_statuses)
    if WAITING in statuses:
        return Outcome.WAITING
    failed = sum(1 for status in statuses if status == DEAD_LETTERED)
    if not failed:
        stale = bool(statuses) and all(status == STALE for status in statuses)
        return Outcome.STALE if stale else Outcome.DELIVERED
    return Outcome.DEAD_LETTERED if failed == len(statuses) else Outcome.PARTIAL
