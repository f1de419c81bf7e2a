"""What the alert channel says, and how often: texts and a per-kind rate limit, without I/O.

Every value that comes from outside (error texts, target scopes, field names) is escaped for
Slack (`&`, `<`, `>` only, as Slack's formatting reference asks), so an error body cannot
mention `<!channel>` or forge a link.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta

MAX_VALUE_CHARS = 300
MAX_LISTED = 5


class AlertKind(str, enum.Enum):
    PAUSED = "cxrelay.target.paused"
    RESUMED = "cxrelay.target.resumed"
    DEAD_LETTER = "cxrelay.dead_letter"
    DRIFT = "cxrelay.drift"
    GAP_FAILED = "cxrelay.notifications.gap_failed"
    ALLOCATION = "cxrelay.salesforce.allocation"


def slack_escape(value: object) -> str:
    """Slack's control characters as entities (the ampersand first), cut to a bounded size."""
    text = str(value)
    if len(text) > MAX_VALUE_CHARS:
        text = text[:MAX_VALUE_CHARS - 1] + "…"
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def resource_id(target: str) -> str:
    """The Prefect event resource of a target: `cxrelay.target.<name>`."""
    return f"cxrelay.target.{target}"


def gap_resource(gap_id: int) -> str:
    """The Prefect event resource of a notification gap (filled, or given up)."""
    return f"cxrelay.notification-gap.{gap_id}"


def paused_text(target: str, scope: str, error: str | None, waiting: int,
                probe_seconds: float) -> str:
    where = f" ({slack_escape(scope)})" if scope else ""
    return (f":warning: *{slack_escape(target)}*{where} is paused after repeated failures: "
            f"`{slack_escape(error or 'unknown error')}`. {waiting} event(s) wait; they spend "
            f"no retries and are sent when a probe (every ≤ {probe_seconds:g} s) succeeds.")


def resumed_text(target: str, scope: str, paused_seconds: float | None, waiting: int) -> str:
    where = f" ({slack_escape(scope)})" if scope else ""
    down = f" after {_duration(paused_seconds)}" if paused_seconds is not None else ""
    return (f":white_check_mark: *{slack_escape(target)}*{where} resumed{down}; "
            f"{waiting} waiting event(s) are being sent.")


def allocation_text(target: str, used: int, allocation: int, share: float,
                    waiting: bool) -> str:
    percent = 100 * used / allocation if allocation else 0.0
    if waiting:
        return (f":hourglass: *{slack_escape(target)}*: the org has used {used:,} of its "
                f"{allocation:,} daily API requests ({percent:.0f} %, above the "
                f"{100 * share:.0f} % cxrelay may use). New Salesforce work waits; one delivery "
                "a minute looks whether the allocation has room again. Other targets go on.")
    return (f":white_check_mark: *{slack_escape(target)}*: the org's API usage is below "
            f"{100 * share:.0f} % again ({used:,} of {allocation:,}); Salesforce work goes on.")


def gap_failed_text(gap_id: int, channel: str, interval: str, attempts: int,
                    error: str) -> str:
    return (f":x: notification gap {gap_id} ({slack_escape(channel)}, {slack_escape(interval)}) "
            f"could not be filled after {attempts} attempts: `{slack_escape(error)}`. "
            "Conversations that ended then may be missing; `cxrelay reconcile --since …` "
            "backfills them.")


def dead_letter_text(items: list[str], total: int, suppressed: int, interval: float) -> str:
    return _summary(":x:", "new dead letter(s)", items, total, suppressed, interval,
                    "`cxrelay dead-letters list` shows them; `cxrelay dead-letters replay "
                    "--target … --error …` replays them")


def drift_text(items: list[str], total: int, suppressed: int, interval: float) -> str:
    return _summary(":mag:", "event(s) with schema drift", items, total, suppressed, interval,
                    "`cxrelay drift` lists the fields")


def _summary(icon: str, what: str, items: list[str], total: int, suppressed: int,
             interval: float, hint: str) -> str:
    lines = [f"{icon} {total} {what}"
             + (f" ({suppressed} since the last message, sent at most every "
                f"{_duration(interval)})" if suppressed else "") + ":"]
    lines += [f"• {slack_escape(item)}" for item in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
        lines.append(f"• … and {len(items) - MAX_LISTED} more")
    lines.append(hint)
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class Summary:
    """One message's worth of occurrences of a kind: `suppressed` of them came in while the
    previous message was too recent to send another."""

    kind: AlertKind
    items: list[str]
    total: int
    suppressed: int


@dataclass
class _Pending:
    items: list[str] = field(default_factory=list)
    total: int = 0
    last_sent: datetime | None = None


@dataclass
class SummaryLimiter:
    """At most one message per kind per `interval_seconds`. The first occurrence after a quiet
    interval goes out at once; what comes in before the interval ends is counted and goes out
    in one summary when `due` is asked after it ends."""

    interval_seconds: float = 300.0
    max_items: int = 20  # kept per summary for the text; the count is exact
    _pending: dict[AlertKind, _Pending] = field(default_factory=dict)

    def offer(self, kind: AlertKind, item: str, now: datetime) -> Summary | None:
        """Count one occurrence; the summary to send now, if any."""
        pending = self._pending.setdefault(kind, _Pending())
        pending.total += 1
        if len(pending.items) < self.max_items:
            pending.items.append(item)
        return self._take(kind, pending, now, suppressed=False)

    def due(self, now: datetime) -> list[Summary]:
        """Summaries of what was held back, whose interval has ended."""
        found = []
        for kind, pending in self._pending.items():
            summary = self._take(kind, pending, now, suppressed=True)
            if summary is not None:
                found.append(summary)
        return found

    def _take(self, kind: AlertKind, pending: _Pending, now: datetime,
              suppressed: bool) -> Summary | None:
        if pending.total == 0:
            return None
        if pending.last_sent is not None and \
                now < pending.last_sent + timedelta(seconds=self.interval_seconds):
            return None
        summary = Summary(kind, list(pending.items), pending.total,
                          pending.total if suppressed else pending.total - 1)
        pending.items, pending.total, pending.last_sent = [], 0, now
        return summary
