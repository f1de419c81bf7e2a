"""Slow and vanishing clients against `cxrelay serve`, over raw loopback sockets.

Each stalled request must be cut by the receiver's read deadline (here 1 s) with a 408 and a
closed connection; a client that hangs up mid-body costs one warning line, no traceback; the
connection cap answers 503 beyond it. Before the fix each stalled socket stayed open.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cxrelay.app.sending import encode, generic_event, hmac_headers
from cxrelay.app.supervise import free_port
from cxrelay.store.database import Store

SECRET = "slow-client-secret"
PATIENCE = 15.0  # how long the test waits for the server to act on a 1 s deadline


class Server:
    def __init__(self, tmp: Path, **settings: str) -> None:
        self.port = free_port()
        self.log = tmp / "serve.log"
        self.database = f"sqlite:///{tmp / 'slow.db'}"
        env = {**os.environ, "CXRELAY_WEBHOOK_SECRET": SECRET,
               "CXRELAY_DATABASE_URL": self.database, "CXRELAY_DISPATCHER": "off", **settings}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cxrelay", "serve", "--no-dispatcher", "--port",
             str(self.port)], env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(self.log.read_text()[-2000:])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=PATIENCE)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("slow"), CXRELAY_READ_TIMEOUT_SECONDS="1")
    try:
        yield running
    finally:
        running.stop()


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; socket.timeout if it never does."""
    received = b""
    with sock:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk


def headers_for(body: bytes, extra: str = "") -> bytes:
    signature = "".join(f"{k}: {v}\r\n" for k, v in hmac_headers(body, SECRET).items())
    return (f"POST /webhooks/genesys HTTP/1.1\r\nHost: 127.0.0.1\r\n{signature}"
            f"{extra}\r\n").encode()


def wait_for_log(server: Server, needle: str) -> str:
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        text = server.log_text()
        if needle in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} never logged:\n{server.log_text()[-3000:]}")


def test_an_idle_connection_is_closed(server: Server) -> None:
    answer = read_until_closed(server.connect())
    assert answer.startswith(b"HTTP/1.1 408 "), answer


def test_half_sent_headers_are_cut(server: Server) -> None:
    sock = server.connect()
    sock.sendall(b"POST /webhooks/genesys HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
    assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")


def test_a_body_short_of_its_content_length_is_cut(server: Server) -> None:
    body = encode(generic_event("conv-short"))
    sock = server.connect()
    sock.sendall(headers_for(body, f"Content-Type: application/json\r\n"
                                   f"Content-Length: {len(body)}\r\n") + body[:10])
    assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
    wait_for_log(server, "the read deadline expired")
    assert Store(server.database).events() == []


def test_an_unended_chunked_body_is_cut(server: Server) -> None:
    body = encode(generic_event("conv-chunked"))
    sock = server.connect()
    sock.sendall(headers_for(body, "Content-Type: application/json\r\n"
                                   "Transfer-Encoding: chunked\r\n")
                 + f"{len(body):x}\r\n".encode() + body + b"\r\n")  # no terminating 0-chunk
    assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
    assert Store(server.database).events() == []


def test_a_client_that_hangs_up_mid_body_logs_one_line(server: Server) -> None:
    body = encode(generic_event("conv-hangup"))
    with server.connect() as sock:
        sock.sendall(headers_for(body, f"Content-Type: application/json\r\n"
                                       f"Content-Length: {len(body)}\r\n") + body[:10])
    text = wait_for_log(server, "the client hung up")
    lines = [line for line in text.splitlines() if "the client hung up" in line]
    assert len(lines) == 1, text
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text
    assert Store(server.database).events() == []


def test_a_whole_request_still_goes_through(server: Server) -> None:
    body = encode(generic_event("conv-whole"))
    response = httpx.post(f"{server.url}/webhooks/genesys", content=body,
                          headers=hmac_headers(body, SECRET), timeout=10)
    assert response.status_code == 202, response.text


def test_connections_beyond_the_cap_get_503(tmp_path: Path) -> None:
    capped = Server(tmp_path, CXRELAY_MAX_CONNECTIONS="3", CXRELAY_READ_TIMEOUT_SECONDS="60")
    idle: list[socket.socket] = []
    try:
        idle = [capped.connect() for _ in range(3)]
        deadline = time.monotonic() + PATIENCE
        status = 0
        while time.monotonic() < deadline:  # the server accepts the idle sockets in its time
            status = httpx.get(f"{capped.url}/healthz", timeout=10).status_code
            if status == 503:
                break
        assert status == 503
        for sock in idle:
            sock.close()
        while time.monotonic() < deadline:
            status = httpx.get(f"{capped.url}/healthz", timeout=10).status_code
            if status == 200:
                break
        assert status == 200
    finally:
        for sock in idle:
            sock.close()
        capped.stop()
