"""When a target's batch goes, and what a Slack digest says: pure decisions of the drainers.

A batch goes when it is full, when its oldest delivery has waited `linger_seconds`, or when
no event that could add to it is on its way (none in the inbox being worked on or due): a lone
conversation at a quiet moment goes at once, and a burst fills its batches. Sending "whatever
is waiting" after each request instead makes batches of one or two when deliveries arrive at
the enrichment's pace (measured: 105 Salesforce requests for 30 new callers, 3.5 each, with a
50 ms quiet gap as the rule); waiting only for a full batch makes a quiet center's
conversations wait the whole linger.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPolicy:
    max_size: int = 200
    # A burst: many events on their way. The enrichment before a batch goes at Genesys's pace
    # (~5 conversations/s for one OAuth client), so a one-second linger made batches of ~5:
    # 0.85 Salesforce requests a conversation for a burst of 1,000 new callers (bench/pace.py).
    # Ten seconds make batches of ~50 and ~0.1, for a Task that lands up to 10 s later in a
    # burst that takes minutes anyway; a burst that arrives faster fills its 200 sooner.
    linger_seconds: float = 10.0
    # A few on their way: latency first. At a steady 5/s, 0.2 s still made batches of one
    # (3.8 requests a conversation) and cost 0.2 s of the 0.37 s to Salesforce (bench/pace.py).
    short_linger_seconds: float = 0.05
    burst_upstream: int = 16  # events on their way (a lane's worth) from which a batch waits long
    look_seconds: float = 0.05  # while waiting to fill: how often to look again


def in_burst(policy: BatchPolicy, upstream: int, was: bool) -> bool:
    """A burst starts when a lane's worth of events is on its way and lasts until none is: its
    tail then still fills batches. Ending it below the threshold sent the last ~15 of a burst
    one by one at the enrichment's pace, 5 requests each: 40 % of a 1,000-caller burst's
    Salesforce requests (bench/pace.py)."""
    return upstream >= policy.burst_upstream or (was and upstream > 0)


def batch_wait(policy: BatchPolicy, count: int, oldest_age: float, upstream: int,
               burst: bool | None = None) -> float:
    """0 when a batch of `count` due deliveries goes now, else the seconds to look again (never
    past the linger).
    `oldest_age`: seconds since the oldest was recorded; `upstream`: events on their way
    through the steps that could add to the batch; `burst`: whether a burst is on
    (`in_burst`), by default whether a lane's worth is on its way."""
    if count <= 0:
        return policy.linger_seconds
    # A steady few conversations a second always have one or two on their way: waiting the
    # burst's linger for them cost ~0.9 s a delivery at 5/s (bench/pace.py).
    if burst is None:
        burst = upstream >= policy.burst_upstream
    linger = policy.linger_seconds if burst else policy.short_linger_seconds
    if count >= policy.max_size or oldest_age >= linger or upstream <= 0:
        return 0.0
    return min(linger - oldest_age, policy.look_seconds)  # > 0: the oldest is younger


# A digest is one Slack message: Slack shows about 4,000 characters of a message's text before
# it folds it; a line per conversation, each cut to fit.
DIGEST_MAX_LINES = 40
DIGEST_MAX_CHARS = 3800
LINE_MAX_CHARS = 160


def digest_line(text: str) -> str:
    """A conversation's message as one line of a digest: its lines joined, cut to fit."""
    line = " · ".join(part.strip() for part in text.splitlines() if part.strip())
    line = re.sub(r"\s+", " ", line)
    return line if len(line) <= LINE_MAX_CHARS else line[:LINE_MAX_CHARS - 1] + "…"


def digest_fits(lines: Mapping[str, str]) -> bool:
    return len(lines) <= DIGEST_MAX_LINES and len(render_digest(lines)) <= DIGEST_MAX_CHARS


def render_digest(lines: Mapping[str, str]) -> str:
    """The digest's text: a header, then a line per conversation in the order they joined."""
    count = len(lines)
    header = f"*{count} conversation{'s' if count != 1 else ''}*"
    return "\n".join([header, *(f"• {line}" for line in lines.values())])
