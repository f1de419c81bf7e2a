"""One import name: only `cxrelay` is importable from outside the checkout, and every
prefect.yaml entrypoint loads as a Prefect flow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
GENERIC = ["events", "store", "receiver", "flows", "blocks", "connectors", "sandbox"]


def test_only_cxrelay_is_importable_outside_the_checkout(tmp_path: Path) -> None:
    script = (
        "import importlib.util, json\n"
        f"names = {GENERIC!r}\n"
        "found = [n for n in names if importlib.util.find_spec(n) is not None]\n"
        "import cxrelay.flows.process_event, cxrelay.blocks, cxrelay.connectors.salesforce\n"
        "import cxrelay.core.envelope, cxrelay.store.database, cxrelay.receiver.app\n"
        "import cxrelay.sandbox.server, cxrelay.app.cli\n"
        "print(json.dumps(found))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_every_prefect_yaml_entrypoint_loads_as_a_flow() -> None:
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    entrypoints = [d["entrypoint"] for d in deployments]
    assert entrypoints
    script = (
        "import sys\n"
        "from prefect.flows import Flow, load_flow_from_entrypoint\n"
        "for entrypoint in sys.argv[1:]:\n"
        "    flow = load_flow_from_entrypoint(entrypoint)\n"
        "    assert isinstance(flow, Flow), entrypoint\n"
        "    print(entrypoint, flow.name)\n")
    result = subprocess.run([sys.executable, "-c", script, *entrypoints], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    names = [line.split()[-1] for line in result.stdout.strip().splitlines()]
    assert names == [d["name"] for d in deployments]
