"""Retention: cxrelay's store (`prune`) and Prefect's history of cxrelay's runs
(`trim-prefect-history`), each a flow that `prefect.yaml` schedules and the dispatcher also
runs on schedules of its own (see `cxrelay.flows.duties`).

What Prefect keeps per event, and who removes it:
- The embedded server (`cxrelay serve` without PREFECT_API_URL) gets Prefect's own retention
  from CXRELAY_PREFECT_RETENTION (`cxrelay.core.history`): the `db_vacuum` service deletes
  finished flow runs (their task runs and states by cascade, their logs and artifacts by
  flow run), orphaned logs and artifacts, and events past the window.
- Prefect refuses a vacuum window under an hour, and a server the user runs may have no vacuum
  at all: `trim-prefect-history` deletes cxrelay's finished flow runs older than the window,
  with their artifacts, through the API. Deleting a flow run deletes its task runs, their
  states and its logs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterEndTime,
    FlowRunFilterName,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

from cxrelay.core.durations import format_duration, parse_duration
from cxrelay.settings import Settings
from cxrelay.store.database import Store
from cxrelay.store.retention import Pruned

log = logging.getLogger("cxrelay.retention")
# The runs cxrelay makes in volume, and so trims: (flow name, the start of its runs' names).
# Prefect keys flows by name, so on a server shared with other projects a flow of theirs may
# bear one of these names: the run names, which cxrelay sets, tell cxrelay's runs apart.
# reconcile and replay runs (a few a day, started by people or schedules) are left to
# Prefect's own vacuum.
TRIMMED = [("lane", "lane-"), ("process-event", "conversation-"),
           ("fill-notification-gap", "gap-"), ("trim-prefect-history", "trim-prefect-history"),
           ("prune", "prune-store")]
MAX_ARTIFACT_PAGES = 100  # per run and pass: the next pass takes the rest
FINISHED = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED]
PAGE = 50  # the 3.9 server answers at most this many artifacts or runs per filter page


def prune_store(store: Store, settings: Settings, now: datetime | None = None) -> Pruned:
    """cxrelay's own retention (CXRELAY_RETENTION, CXRELAY_LEDGER_RETENTION): only what is
    finished, never what an open dead letter needs."""
    moment = now or datetime.now(timezone.utc)
    return store.prune(before=moment - settings.retention_window,
                       ledger_before=moment - settings.ledger_retention_window)


@flow(name="prune", flow_run_name="prune-store", persist_result=False, log_prints=False)
async def prune() -> dict[str, int]:
    """Delete what cxrelay's store holds past its retention: finished inbox events, replayed
    dead letters and quarantined bodies, drift fields, old ledger entries."""
    from cxrelay.flows.runtime import get_runtime

    runtime = get_runtime()
    pruned = prune_store(runtime.store, runtime.settings)
    get_run_logger().info("pruned %s", ", ".join(f"{count} {name}" for name, count
                                                  in pruned.rows().items()) or "nothing")
    return pruned.rows()


@dataclass
class Trimmed:
    flow_runs: int = 0
    artifacts: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"flow_runs": self.flow_runs, "artifacts": self.artifacts,
                "errors": self.errors[:10]}


async def trim_history(window: timedelta, now: datetime | None = None,
                       max_runs: int = 500, artifacts: bool = True) -> Trimmed:
    """Delete cxrelay's flow runs that finished more than `window` ago (at most `max_runs` a
    pass: the next pass takes the rest), and with `artifacts` their artifacts one by one
    through the API — unless the server's orphan vacuum deletes those in bulk."""
    cutoff = (now or datetime.now(timezone.utc)) - window
    trimmed = Trimmed()
    async with get_client() as client:
        for flow_name, run_prefix in TRIMMED:
            while trimmed.flow_runs < max_runs:
                runs = await client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                    flow_run_filter=FlowRunFilter(
                        name=FlowRunFilterName(like_=run_prefix),
                        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=FINISHED)),
                        end_time=FlowRunFilterEndTime(before_=cutoff)),  # type: ignore[arg-type]
                    limit=PAGE)
                runs = [run for run in runs if run.name.startswith(run_prefix)]
                if not runs or not await _delete_runs(client, runs, artifacts, trimmed):
                    break  # nothing more, or the server refused: the next pass goes on
    return trimmed


async def _delete_runs(client: Any, runs: list[Any], artifacts: bool, trimmed: Trimmed) -> bool:
    """Delete the runs (first their artifacts, with `artifacts`); False on a refusal."""
    for run in runs:
        if artifacts and not await _delete_artifacts(client, run.id, trimmed):
            return False  # the run stays, so its artifacts are found by it next time
        try:
            await client.delete_flow_run(run.id)
        except ObjectNotFound:
            pass  # the vacuum was first
        except PrefectHTTPStatusError as exc:
            trimmed.errors.append(f"flow run {run.id}: HTTP {exc.response.status_code}")
            return False
        trimmed.flow_runs += 1
    return True


async def _delete_artifacts(client: Any, flow_run_id: Any, trimmed: Trimmed) -> bool:
    """Delete a run's artifacts; whether they are all gone."""
    for _ in range(MAX_ARTIFACT_PAGES):
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
                any_=[flow_run_id])), limit=PAGE)
        if not artifacts:
            return True
        for artifact in artifacts:
            try:
                await client.delete_artifact(artifact.id)
                trimmed.artifacts += 1
            except ObjectNotFound:
                pass
            except PrefectHTTPStatusError as exc:  # tried again at the next pass
                trimmed.errors.append(f"artifact {artifact.id}: HTTP "
                                      f"{exc.response.status_code}")
                return False
    return False


@flow(name="trim-prefect-history", flow_run_name="trim-prefect-history", persist_result=False,
      log_prints=False)
async def trim_prefect_history(retention: str | None = None) -> dict[str, Any]:
    """Delete cxrelay's finished flow runs (lanes, process-event and gap-fill runs, with
    their task runs and logs) and their artifacts older than CXRELAY_PREFECT_RETENTION
    (or `retention`: 90s, 30m, 12h, 7d). The inbox keeps every event's outcome longer
    (`cxrelay events show <conversation id>`)."""
    from cxrelay.flows.runtime import get_runtime

    settings = get_runtime().settings
    window = parse_duration(retention) if retention else settings.prefect_retention
    trimmed = await trim_history(window, artifacts=not settings.prefect_vacuums_orphans)
    get_run_logger().info("deleted %d flow run(s) and %d artifact(s) older than %s",
                          trimmed.flow_runs, trimmed.artifacts, format_duration(window))
    return trimmed.as_dict()
