"""Durations in settings and on the command line, and the Prefect history they set: pure."""

from __future__ import annotations

from datetime import timedelta

import pytest

from cxrelay.core.durations import DurationError, format_duration, parse_duration
from cxrelay.core.history import prefect_server_settings, trim_interval
from cxrelay.settings import Settings


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("2w", 1209600),
    ("1.5h", 5400), (" 45 ", 45), (60, 60), ("7D", 604800),
])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "7 days", "-5m", "0s", "h", "1y", "1h30m"])
def test_not_durations(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


def test_a_bare_number_counts_the_default_unit() -> None:
    assert parse_duration("90", default_unit="m") == timedelta(minutes=90)


def test_format_is_the_shortest_exact_form() -> None:
    assert [format_duration(timedelta(seconds=s)) for s in (90, 3600, 604800, 129600, 1.5)] == [
        "90s", "1h", "1w", "36h", "1.5s"]


def test_retention_settings_read_the_duration_and_the_older_day_forms(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CXRELAY_RETENTION", "CXRELAY_RETENTION_DAYS", "CXRELAY_LEDGER_RETENTION",
                 "CXRELAY_LEDGER_RETENTION_DAYS", "CXRELAY_PREFECT_RETENTION"):
        monkeypatch.delenv(name, raising=False)
    default = Settings()
    assert (default.retention_window, default.ledger_retention_window,
            default.prefect_retention) == (timedelta(days=30), timedelta(days=90),
                                           timedelta(days=7))
    monkeypatch.setenv("CXRELAY_RETENTION_DAYS", "2")
    monkeypatch.setenv("CXRELAY_LEDGER_RETENTION_DAYS", "1")  # never below the inbox's
    assert (Settings().retention_window, Settings().ledger_retention_window) == (
        timedelta(days=2), timedelta(days=2))
    monkeypatch.setenv("CXRELAY_RETENTION", "12h")  # the duration wins over the day form
    monkeypatch.setenv("CXRELAY_LEDGER_RETENTION", "3d")
    monkeypatch.setenv("CXRELAY_PREFECT_RETENTION", "90s")
    settings = Settings()
    assert (settings.retention_window, settings.ledger_retention_window,
            settings.prefect_retention) == (timedelta(hours=12), timedelta(days=3),
                                            timedelta(seconds=90))
    monkeypatch.setenv("CXRELAY_PREFECT_RETENTION", "a week")
    with pytest.raises(ValueError, match="not a duration"):
        Settings()


def test_the_prefect_window_becomes_the_servers_vacuum_and_event_retention() -> None:
    week = prefect_server_settings(timedelta(days=7))
    assert week["PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED"] == "events,flow_runs,orphans"
    assert week["PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD"] == "604800"
    assert week["PREFECT_SERVER_EVENTS_RETENTION_PERIOD"] == "PT604800S"
    assert week["PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS"] == "3600"
    minute = prefect_server_settings(timedelta(seconds=60))
    # Prefect refuses a flow-run window of an hour or less: cxrelay trims below that itself.
    assert minute["PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD"] == "3601"
    assert minute["PREFECT_SERVER_EVENTS_RETENTION_PERIOD"] == "PT60S"
    assert minute["PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS"] == "30"
    assert trim_interval(timedelta(seconds=60)) == timedelta(seconds=30)
    assert trim_interval(timedelta(days=7)) == timedelta(hours=1)


def test_prefect_accepts_the_settings_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import Settings as PrefectSettings

    for window in (timedelta(seconds=60), timedelta(hours=12), timedelta(days=30)):
        for name, value in prefect_server_settings(window).items():
            monkeypatch.setenv(name, value)
        server = PrefectSettings().server
        assert server.services.db_vacuum.enabled_vacuum_types == {
            "events", "flow_runs", "orphans"}
        assert server.events.retention_period == window
        assert server.services.db_vacuum.retention_period > timedelta(hours=1)
