"""The baseline: a bare Starlette endpoint on uvicorn that only answers 202."""

from __future__ import annotations

import signal
import subprocess
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def accept(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"status": "accepted"}, status_code=202)


app = Starlette(routes=[Route("/webhooks/{source}", accept, methods=["POST"])])

if __name__ == "__main__":
    # The same listening arrangement as `cxrelay serve`: one process per worker on an
    # SO_REUSEPORT socket, so both sides of the comparison differ only in the app.
    from cxrelay.app.supervise import listen

    port, workers = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1
    if workers > 1:
        children = [subprocess.Popen([sys.executable, "-m", "bench.bare", str(port), "1",
                                      "--reuse-port"]) for _ in range(workers)]
        signal.signal(signal.SIGTERM, lambda *_: [child.terminate() for child in children])
        try:
            for child in children:
                child.wait()
        finally:
            for child in children:
                child.terminate()
    else:
        sock = listen("127.0.0.1", port, "--reuse-port" in sys.argv)
        config = uvicorn.Config(app, log_level="warning", access_log=False)
        uvicorn.Server(config).run(sockets=[sock])
