"""What became of an event: a typed outcome, decided from what became of each target."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any


class Outcome(str, Enum):
    """The outcome of one event, as the inbox, the artifact and the metrics record it."""

    DELIVERED = "delivered"          # a target got it; none failed
    UNCHANGED = "unchanged"          # every target already had this data, from another event
    STALE = "stale"                  # every target holds newer data of the conversation
    PARTIAL = "partial"              # some targets dead-lettered, the others delivered
    DEAD_LETTERED = "dead_lettered"  # nothing delivered: every target (or the event) failed
    FILTERED = "filtered"            # a filter rule dropped it
    FAILED = "failed"                # its runs crashed too often (dead-lettered as a whole)
    RETRY_LATER = "retry_later"      # a target is paused: the event waits for it, unfinished
    DELIVERING = "delivering"        # mapped; a target's delivery is still on its way
    # the platform does not have its data yet (CXone): back to the inbox until `again_in`
    AWAITING_DATA = "awaiting_data"

    def __str__(self) -> str:
        return self.value


DEAD_LETTERED = "dead_lettered"  # a target's status when it went to the dead letters
STALE = "stale"  # a target's status when it already holds newer data (cxrelay.core.ordering)
WAITING = "waiting"  # a target's status while it is paused (cxrelay.core.health)
# A target's status when another event already delivered the same payload (the ledger's digest
# matched). What this event's own earlier attempt delivered before it crashed is `delivered`.
UNCHANGED = "unchanged"
DELIVERED = "delivered"
FILTERED = "filtered"  # a target's status when its own filters rejected the event
# a target's status when it left the pipeline (removed, or `enabled: false`) before its
# delivery went: like FILTERED, it does not count toward the event's outcome
REMOVED = "removed"
# A target's status from mapping until its drainer settles the delivery (its own pace).
QUEUED = "queued"


def event_outcome(target_statuses: Iterable[str]) -> Outcome:
    """Targets whose own filters rejected the event do not count (filtered when that is all of
    them). Then: retry_later while any target is paused; delivering while a target's delivery is
    on its way; else, when no target dead-lettered:
    stale when every target held newer data, unchanged when no target changed (each had this
    data, or newer), delivered when one did. dead_lettered when every target failed, partial
    between."""
    everything = list(target_statuses)
    statuses = [status for status in everything if status not in (FILTERED, REMOVED)]
    if everything and not statuses:
        return Outcome.FILTERED  # every target's own filters rejected it
    if WAITING in statuses:
        return Outcome.RETRY_LATER
    if QUEUED in statuses:
        return Outcome.DELIVERING
    failed = sum(1 for status in statuses if status == DEAD_LETTERED)
    if failed:
        return Outcome.DEAD_LETTERED if failed == len(statuses) else Outcome.PARTIAL
    if statuses and all(status == STALE for status in statuses):
        return Outcome.STALE
    if statuses and all(status in (STALE, UNCHANGED) for status in statuses):
        return Outcome.UNCHANGED
    return Outcome.DELIVERED


@dataclass
class EventSummary:
    """What became of one event (or of a conversation's events merged after its settle
    window): its outcome and each target's result. The inbox row keeps it as its detail and
    the artifact renders it (`as_dict`, the stored shape)."""

    inbox_id: int | None
    conversation_id: str
    event_id: str
    event_type: str
    source: str
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    outcome: Outcome | None = None
    reason: str | None = None           # why it dead-lettered
    filtered_by: str | None = None      # the filter rule that dropped it
    drift: list[str] | None = None      # how it departed from its envelope's contract
    plan: dict[str, str] | None = None  # what each target already had (a run of its own)
    merged: list[str] | None = None     # events merged into this one (settle window)
    merged_into: str | None = None      # the event this one was merged into
    again_in: float | None = None       # awaiting data: seconds until it is looked for again

    def decided(self, targets: dict[str, dict[str, Any]]) -> Outcome:
        """Record each target's result; the event's outcome follows from them."""
        self.targets = targets
        self.outcome = event_outcome(result["status"] for result in targets.values())
        return self.outcome

    def as_dict(self) -> dict[str, Any]:
        """The stored form: every field that was set."""
        return {each.name: value for each in fields(self)
                if (value := getattr(self, each.name)) is not None}


class Stage(str, Enum):
    """Where an event's failure happened."""

    LANE = "lane"  # its steps, run as a task run of a lane (no retries there)
    STEP = "step"  # a step of its own `process-event` run, after that step's task retries
    RUN = "run"    # its `process-event` run as a whole (crashed, or never started)
    DELIVERY = "delivery"  # one target's delivery of it, retried by that target's drainer


class Next(str, Enum):
    """What becomes of an event after a failure."""

    RUN_OF_ITS_OWN = "run_of_its_own"        # now, a `process-event` run with step retries
    RETRY = "retry"                          # back to the inbox after a backoff; counted
    RETRY_NOT_COUNTED = "retry_not_counted"  # the run never got going (Prefect unavailable)
    DEAD_LETTER = "dead_letter"              # retries spent: the dead letters, to replay


@dataclass(frozen=True)
class AfterFailure:
    next: Next
    delay_seconds: float = 0.0


MAX_BACKOFF_SECONDS = 60.0


def run_backoff(attempts: int) -> float:
    """Seconds before an event whose run failed is tried again: doubling, capped."""
    return min(MAX_BACKOFF_SECONDS, 2.0 ** min(max(attempts, 0), 6))


def outage_backoff(outage_seconds: float) -> float:
    """Seconds before trying again while the Prefect API has been unavailable this long: half
    the outage so far, 2 s at first, at most a minute. Infrastructure failures count no
    attempt, so the event's attempts cannot space the retries: a dispatcher whose Prefect server
    was gone retried every event every 4 s, for as long as it was gone (30 % of a core)."""
    return min(MAX_BACKOFF_SECONDS, max(2.0, outage_seconds / 2))


def after_failure(stage: Stage, *, permanent: bool = False, infrastructure: bool = False,
                  attempts: int = 1, max_attempts: int = 1,
                  outage_seconds: float = 0.0, probing: bool = False) -> AfterFailure:
    """The one place that decides whether a failure dead-letters. A permanent error (a 4xx
    that no retry can fix, an event that cannot be mapped) dead-letters at once, wherever it
    happened; a step's own retries are spent when it fails in a run of its own, so that target
    (or the event) dead-letters; a lane has no retries, so the event gets a run of its own at
    once; a run that failed as a whole is tried again with backoff until `max_attempts`.
    Infrastructure failures (the Prefect API unreachable: nothing of the event ran) never
    count and never dead-letter; they wait longer the longer the outage (`outage_seconds`).
    A target's delivery is retried by its drainer (with the target's backoff) until the
    target's `retries` are spent; the probe of a paused target is not the delivery's fault and
    spends no attempt (`probing`)."""
    if infrastructure:
        return AfterFailure(Next.RETRY_NOT_COUNTED, outage_backoff(outage_seconds))
    if permanent:
        return AfterFailure(Next.DEAD_LETTER)
    if stage is Stage.DELIVERY:
        if probing:
            return AfterFailure(Next.RETRY_NOT_COUNTED)
        return AfterFailure(Next.DEAD_LETTER if attempts >= max_attempts else Next.RETRY)
    if stage is Stage.LANE:
        return AfterFailure(Next.RUN_OF_ITS_OWN)
    if stage is Stage.STEP or attempts >= max_attempts:
        return AfterFailure(Next.DEAD_LETTER)
    return AfterFailure(Next.RETRY, run_backoff(attempts))
