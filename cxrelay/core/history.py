"""How long Prefect keeps cxrelay's history, as the Prefect server's own settings.

CXRELAY_PREFECT_RETENTION (default 7 days) becomes, on the embedded server, the `db_vacuum`
service's window for finished flow runs (with their task runs, states, logs and artifacts),
its orphan pass, and the events' retention, each looked at often enough for the window.
Prefect refuses a flow-run window of an hour or less: below that, cxrelay's
`trim-prefect-history` flow deletes its runs itself (`cxrelay.flows.retention`).
"""

from __future__ import annotations

from datetime import timedelta

VACUUM_MINIMUM = timedelta(hours=1, seconds=1)  # Prefect: "must be more than one hour"
_MINUTE, _HOUR, _DAY = 60.0, 3600.0, 86400.0


def _between(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def prefect_server_settings(window: timedelta) -> dict[str, str]:
    """The Prefect server settings (environment variables) that keep `window` of history."""
    seconds = window.total_seconds()
    return {
        "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs,orphans",
        "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD":
            f"{round(max(window, VACUUM_MINIMUM).total_seconds())}",
        # A quarter of the window between passes keeps the excess under a quarter.
        "PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS":
            f"{round(trim_interval(window).total_seconds())}",
        "PREFECT_SERVER_SERVICES_DB_VACUUM_ORPHAN_CLEANUP_LOOP_SECONDS":
            f"{round(_between(seconds / 2, _MINUTE, _DAY))}",
        # A plain timedelta setting: ISO 8601 (a bare number is not read as seconds).
        "PREFECT_SERVER_EVENTS_RETENTION_PERIOD": f"PT{round(seconds)}S",
    }


def trim_interval(window: timedelta) -> timedelta:
    """How often `trim-prefect-history` runs (and the vacuum loops): a quarter of the window,
    between 30 s and an hour."""
    return timedelta(seconds=_between(window.total_seconds() / 4, 30, _HOUR))
