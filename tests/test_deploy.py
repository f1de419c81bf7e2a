"""`prefect deploy --all` from prefect.yaml against a Prefect server (the session's test server)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prefect(*args: str, api_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_API_URL": api_url}
    return subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_prefect_deploy_all(prefect_api: str) -> None:
    created = prefect("work-pool", "create", "cxrelay", "--type", "process", "--overwrite",
                      api_url=prefect_api)
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = prefect("--no-prompt", "deploy", "--all", api_url=prefect_api)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    async def deployments() -> dict[str, tuple[str, list[str]]]:
        from prefect import get_client

        async with get_client() as client:
            found = {}
            for deployment in await client.read_deployments():
                flow = await client.read_flow(deployment.flow_id)
                crons = [getattr(s.schedule, "cron", "") for s in deployment.schedules]
                found[f"{flow.name}/{deployment.name}"] = (deployment.work_pool_name, crons)
            return found

    found = asyncio.run(deployments())
    assert found["process-event/process-event"] == ("cxrelay", [])
    assert found["reconcile/reconcile"] == ("cxrelay", ["*/15 * * * *"])
    assert found["replay/replay"] == ("cxrelay", [])
