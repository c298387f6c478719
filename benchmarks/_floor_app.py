"""The floor: a bare FastAPI app on the service's routes that reads the body and answers a
small JSON document. Nothing a real service could skip is skipped by the service instead;
this is only what HTTP + FastAPI + uvicorn cost for the same requests on the same machine.

    .venv/bin/uvicorn _floor_app:app --workers 2   (run from benchmarks/)
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response

app = FastAPI()
_OK = b'{"ok":true}'


@app.post("/v1/decisions")
async def decide(request: Request) -> Response:
    await request.body()
    return Response(_OK, media_type="application/json")


@app.post("/v1/decisions/{event_id}/rewards")
async def reward(event_id: str, request: Request) -> Response:
    await request.body()
    return Response(_OK, 201, media_type="application/json")


@app.get("/healthz")
async def healthz() -> Response:
    return Response(_OK, media_type="application/json")
