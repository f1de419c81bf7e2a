"""`IngestYield`: when the dispatcher steps aside for a flooded receiver, and for how long."""

from __future__ import annotations

from cxrelay.flows.dispatcher import IngestYield


def feed(gate: IngestYield, rate: float, start: float, seconds: float,
         last: int) -> tuple[list[bool], int]:
    """The gate's answers to an inbox growing at `rate` events/s, sampled every 0.5 s."""
    answers = []
    now = start
    while now < start + seconds:
        now += 0.5
        last += int(rate * 0.5)
        answers.append(gate.update(now, last))
    return answers, last


def test_yields_only_above_the_rate() -> None:
    gate = IngestYield(above=1000, max_seconds=30)
    assert gate.update(0.0, 0) is False  # a first reading has no rate yet
    answers, last = feed(gate, 800, 0.0, 5, 0)
    assert not any(answers)
    answers, last = feed(gate, 3000, 5.0, 2, last)
    assert all(answers) and gate.rate == 3000
    answers, _ = feed(gate, 10, 7.0, 1, last)
    assert answers == [False, False]


def test_a_flood_longer_than_the_limit_alternates_waiting_and_working() -> None:
    gate = IngestYield(above=100, max_seconds=2)
    gate.update(0.0, 0)
    answers, _ = feed(gate, 500, 0.0, 8, 0)
    # From 0.5 s it waits; past 2 s of waiting it works 2 s, then waits again, and so on.
    assert answers == [True] * 5 + [False] * 4 + [True] * 5 + [False] * 2
    assert gate.episodes == 2


def test_zero_never_yields() -> None:
    gate = IngestYield(above=0, max_seconds=30)
    gate.update(0.0, 0)
    assert not any(feed(gate, 1_000_000, 0.0, 3, 0)[0])


def test_readings_are_due_every_interval() -> None:
    gate = IngestYield(above=10, max_seconds=5, every=0.5)
    assert gate.due(0.0)
    gate.update(0.0, 0)
    assert not gate.due(0.4) and gate.due(0.5)
