"""``create_app(settings)``: the FastAPI application, built from settings passed in."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import Engine

from bandit_service import __version__
from bandit_service.api.errors import BodySizeLimit, install_error_handlers
from bandit_service.api.routes import router
from bandit_service.config import Settings
from bandit_service.policy import load_policies
from bandit_service.service import DecisionService

# Python's defaults (700, 10, 10) ran a full collection every few dozen requests once the
# start-up objects were frozen (few long-lived objects left to throttle them), each
# scanning every request in flight: 23% of a 500-candidate decision's CPU at 64 in flight,
# 17% at 16. Young collections every 20,000 allocations and full ones far more rarely
# brought that to 7-9% (docs/performance.md). Request objects die by reference counting;
# only rare cycles wait longer for the collector.
SERVING_GC_THRESHOLDS = (20_000, 50, 100)


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app. Policies are loaded (and validated) now, so bad config fails at start."""
    settings = settings or Settings()
    policies = load_policies(settings.policies_dir)
    service = DecisionService(settings, policies, engine=engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        # Everything allocated so far (libraries, schemas, models) lives for the whole
        # process; moving it out of the collector's reach keeps full collections short
        # (they paused 500-candidate requests for ~100 ms every ~20 requests).
        gc.freeze()
        gc.set_threshold(*SERVING_GC_THRESHOLDS)
        try:
            yield
        finally:
            await service.close()

    app = FastAPI(
        title="bandit-service",
        version=__version__,
        description=(
            "Contextual-bandit decisions with exact logged propensities. Decide which "
            "candidates fill which ranked slots, report rewards, read decisions back."
        ),
        lifespan=lifespan,
    )
    app.state.service = service
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (each worker process builds its own app)."""
    return create_app(Settings())
