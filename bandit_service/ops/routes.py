"""``GET /metrics``: scope ``read``; it covers every policy, so a key restricted to some
policies is refused (operators' keys are unrestricted)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from bandit_service.api.auth import require
from bandit_service.ops.metrics import CONTENT_TYPE_LATEST, StoreMetrics, exposition

router = APIRouter()


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    description=(
        "Decisions, slots (explored or not), rewards (on time, late) per policy and arm; "
        "request latency per route; batch-writer queue, batch size and commit latency; "
        "model reloads and serving version per process; and, read from the store, trainer "
        "lag, learned events, model version and age, and the sliding-window reward view "
        "(`BANDIT_METRICS_WINDOW_SECONDS`). With several workers set "
        "`PROMETHEUS_MULTIPROC_DIR` so any worker answers with the sum over all of them. "
        "Scope: read (a key restricted to some policies is refused)."
    ),
    response_class=Response,
    dependencies=[Depends(require("read", all_policies=True))],
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def get_metrics(request: Request) -> Response:
    store: StoreMetrics = request.app.state.store_metrics
    body = await asyncio.to_thread(exposition, store)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
