"""The README's demo command, end to end: real processes, real sockets, a real Prefect server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def port_busy(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.e2e
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PREFECT_", "CXRELAY_"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["COLUMNS"] = "120"
    if port_busy(4200):
        pytest.fail("port 4200 is taken: the demo starts its own Prefect server there")
    result = subprocess.run([sys.executable, "-m", "cxrelay", "demo"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Every expectation held." in output
    assert "Salesforce holds 16 Tasks (one per conversation) on 12 Leads and 1 existing Contact" \
        in output
    assert "rejected: unauthorized" in output and "filtered" in output
    assert "Two orgs in one deployment" in output
    assert "globex's path with acme's secret: HTTP 401 (unauthorized)." in output
    assert not port_busy(4200), "the demo left its Prefect server running"
    # The runs stay in Prefect's database for the UI afterwards.
    assert (tmp_path / "prefect-home" / "prefect.db").exists()
