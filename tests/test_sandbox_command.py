"""`cxrelay sandbox` as a first try uses it: the conversations it prints are known to its
Genesys emulator, any other is a 404 as in the real API."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx

from cxrelay.app.supervise import free_port, stop, wait_until
from cxrelay.sandbox.genesys import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET


def test_the_sandbox_knows_the_conversations_it_tells_cxrelay_send_to_name(tmp_path: Path) -> None:
    ports = [free_port() for _ in range(3)]
    log = tmp_path / "sandbox.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "cxrelay", "sandbox", "--genesys-port", str(ports[0]),
         "--salesforce-port", str(ports[1]), "--slack-port", str(ports[2])],
        stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: "cxrelay send --conversation-id" in log.read_text(), 30)
        named = re.findall(r"cxrelay send --conversation-id (\S+)", log.read_text())
        assert len(named) == 3
        base = f"http://127.0.0.1:{ports[0]}"
        token = httpx.post(f"{base}/oauth/token", data={"grant_type": "client_credentials"},
                           auth=(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET)).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        for conversation_id in named:
            answer = httpx.get(f"{base}/api/v2/conversations/{conversation_id}", headers=headers)
            assert answer.status_code == 200 and answer.json()["id"] == conversation_id
        unknown = httpx.get(f"{base}/api/v2/conversations/00000000-0000-4000-8000-0000000000ff",
                            headers=headers)
        assert unknown.status_code == 404
    finally:
        stop(process)
