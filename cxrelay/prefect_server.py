"""Settings for a Prefect server on SQLite that keeps up with one flow run per event.

Measured here (Prefect 3.9, 2 cores): with the defaults the server's task-run recorder inserts
each task run in its own transaction; under cxrelay's load the API's own writes then collide
with it, SQLite answers "database is locked", the server returns 503 and the client backs off
~2 s per collision — a flow run of 0.2 s took 2–5 s, and 60 events took 62 s. Recording task
runs in batches removes the collisions: the same 60 events took 17.5 s, no run over 0.7 s.
"""

from __future__ import annotations

SQLITE_SERVER_SETTINGS = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "500",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "500",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "1000",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_READ_BATCH_SIZE": "1000",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def server_environment(environ: dict[str, str]) -> dict[str, str]:
    """`environ` with the recommended server settings, where the user has not set them."""
    return {**SQLITE_SERVER_SETTINGS, **environ}
