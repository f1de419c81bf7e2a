"""The drainers' pure decisions: when a batch goes, what a digest says, batched lookups."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cxrelay.core.batching import (
    DIGEST_MAX_CHARS,
    DIGEST_MAX_LINES,
    LINE_MAX_CHARS,
    BatchPolicy,
    batch_wait,
    digest_fits,
    digest_line,
    render_digest,
)
from cxrelay.core.customers import batch_lookup, lookup_field

POLICY = BatchPolicy(max_size=200, linger_seconds=1.0, short_linger_seconds=0.2,
                     look_seconds=0.05)


def test_a_lone_delivery_goes_at_once_when_nothing_else_is_on_its_way() -> None:
    assert batch_wait(POLICY, 1, 0.0, upstream=0) == 0.0


def test_a_batch_fills_while_events_are_on_their_way_until_the_linger_or_the_size() -> None:
    # a burst: many on their way, the long linger
    assert 0 < batch_wait(POLICY, 50, 0.5, upstream=300) <= POLICY.look_seconds
    assert 0 < batch_wait(POLICY, 50, 0.97, upstream=300) <= 0.03 + 1e-9
    assert batch_wait(POLICY, 50, 1.0, upstream=300) == 0.0  # the oldest waited the linger
    assert batch_wait(POLICY, 200, 0.0, upstream=500) == 0.0  # full
    # a steady few: the short linger
    assert 0 < batch_wait(POLICY, 1, 0.1, upstream=2) <= POLICY.look_seconds
    assert batch_wait(POLICY, 1, 0.2, upstream=2) == 0.0


@given(st.integers(0, 500), st.floats(0, 5), st.integers(0, 1000))
def test_the_oldest_never_waits_past_the_linger(count: int, oldest: float,
                                                upstream: int) -> None:
    wait = batch_wait(POLICY, count, oldest, upstream)
    if count == 0:
        assert wait == POLICY.linger_seconds
        return
    assert wait >= 0
    assert wait == 0.0 or oldest + wait <= POLICY.linger_seconds + 1e-9


def test_a_digest_line_is_one_line_cut_to_fit() -> None:
    line = digest_line("*Call ended* 12:01\n\n  Queue: Support \n" + "x" * 500)
    assert "\n" not in line and line.startswith("*Call ended* 12:01 · Queue: Support")
    assert len(line) == LINE_MAX_CHARS and line.endswith("…")


def test_a_digest_has_a_header_and_a_line_per_conversation_in_order() -> None:
    text = render_digest({"c2": "second", "c1": "first"})
    assert text.splitlines() == ["*2 conversations*", "• second", "• first"]
    assert render_digest({"c": "only"}).startswith("*1 conversation*")


def test_a_full_digest_of_the_longest_lines_still_fits_a_message() -> None:
    lines = {f"c{i}": "x" * LINE_MAX_CHARS for i in range(DIGEST_MAX_LINES)}
    assert len(render_digest(lines)) > DIGEST_MAX_CHARS  # so the check is needed
    assert not digest_fits(lines)
    assert digest_fits({k: v for k, v in list(lines.items())[:20]})


def test_batched_lookups_ask_once_for_every_caller() -> None:
    api, text = batch_lookup("customer_key", ["+15550001", "+15550002", "+15550001"],
                             "Genesys_External_Contact_Id__c", "Genesys_Customer_Key__c")
    assert api == "soql"
    assert "Genesys_Customer_Key__c IN ('+15550001', '+15550002')" in text
    assert "FROM Lead" in text and "IsConverted = false" in text
    assert lookup_field("customer_key", "A__c", "B__c") == "B__c"
    api, text = batch_lookup("phone", ["+15550000001", "+442079460018"], "A__c", "B__c")
    assert api == "sosl" and text.startswith("FIND {5550000001 OR 2079460018} IN PHONE FIELDS")
    assert lookup_field("phone", "A__c", "B__c") is None
    api, text = batch_lookup("external_contact", ["it's"], "A__c", "B__c")
    assert "FROM Contact WHERE A__c IN ('it\\'s')" in text


def test_a_burst_lasts_until_nothing_is_on_its_way_so_its_tail_still_fills_batches() -> None:
    from cxrelay.core.batching import in_burst

    upstream = [0, 3, 20, 15, 4, 1, 0, 3]
    state, seen = False, []
    for count in upstream:
        state = in_burst(POLICY, count, state)
        seen.append(state)
    assert seen == [False, False, True, True, True, True, False, False]
    # In the tail (4 on their way) a batch still waits the long linger, not the short one.
    assert 0 < batch_wait(POLICY, 5, 0.5, upstream=4, burst=True) <= POLICY.look_seconds
    assert batch_wait(POLICY, 5, 0.5, upstream=4, burst=False) == 0.0
