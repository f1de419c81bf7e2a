"""A read deadline for each request, at the HTTP protocol level.

uvicorn bounds the idle time between requests (`timeout_keep_alive`) but not the time a
client takes to send one: half-sent headers, a body short of its Content-Length or a chunked
body never ended each held a connection open indefinitely. Here every request, from its
connection or its first byte, has `read_timeout` seconds to arrive whole (headers and body);
then the connection is answered 408 and closed. The ASGI app never sees a request whose
headers did not arrive; one whose body did not sees `http.disconnect` and logs one line.

It wraps the HTTP/1.1 protocol class uvicorn would pick itself (httptools when installed,
else h11) through what both share: `data_received`, `transport`, and the request's `cycle`
with its `more_body` flag.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

logger = logging.getLogger("cxrelay.receiver")

# Set in the ASGI scope of a request whose body the deadline cut, so the app's one log line
# says why the body stopped.
DEADLINE_SCOPE_KEY = "cxrelay.read_deadline_expired"

_TIMEOUT_BODY = b'{"error":"request_timeout","detail":"the request did not arrive in time"}'
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                     b"connection: close\r\ncontent-length: " + str(len(_TIMEOUT_BODY)).encode()
                     + b"\r\n\r\n" + _TIMEOUT_BODY)


class _ReadDeadline:
    """Mixed in before the HTTP protocol class; `read_timeout` is set by `deadline_protocol`."""

    read_timeout: float
    transport: asyncio.Transport
    cycle: Any
    client: tuple[str, int] | None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._deadline: asyncio.TimerHandle | None = None
        self._previous_cycle: Any = None
        self._arm()  # a connection that sends nothing is a request that never arrives

    def data_received(self, data: bytes) -> None:
        if self._deadline is None:
            self._arm()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)  # type: ignore[misc]
        if self._deadline is not None and self._request_read():
            self._deadline.cancel()
            self._deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        self._previous_cycle = self.cycle
        self._deadline = asyncio.get_running_loop().call_later(self.read_timeout, self._expire)

    def _request_read(self) -> bool:
        cycle = self.cycle
        return cycle is not None and cycle is not self._previous_cycle and not cycle.more_body

    def _expire(self) -> None:
        self._deadline = None
        if self._request_read() or self.transport.is_closing():
            return
        cycle = self.cycle if self.cycle is not self._previous_cycle else None
        if cycle is None:
            # The app never heard of this request: this is its only log line.
            logger.warning("closed a connection from %s: no complete request headers within "
                           "%g s", _peer(self.client), self.read_timeout)
        else:
            cycle.scope[DEADLINE_SCOPE_KEY] = True
        if cycle is None or not cycle.response_started:
            self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "an unknown peer"


def deadline_protocol(read_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's `http=` protocol class with a read deadline of `read_timeout` seconds."""
    return type("ReadDeadlineHTTPProtocol", (_ReadDeadline, AutoHTTPProtocol),
                {"read_timeout": read_timeout})
