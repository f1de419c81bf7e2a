"""The baseline: a bare Starlette endpoint on uvicorn that only answers 202."""

from __future__ import annotations

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
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    uvicorn.run("bench.bare:app", host="127.0.0.1", port=int(sys.argv[1]), workers=workers,
                log_level="warning", access_log=False)
