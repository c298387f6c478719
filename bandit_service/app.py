"""``create_app(settings)``: the FastAPI application, built from settings passed in."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy import Engine
from starlette.types import Receive, Scope, Send

from bandit_service import __version__
from bandit_service.api import hot_routes
from bandit_service.api.auth import install_auth
from bandit_service.api.catalog_routes import router as catalog_router
from bandit_service.api.errors import install_error_handlers, payload_too_large
from bandit_service.api.personalizer import document as document_personalizer
from bandit_service.api.personalizer import router as personalizer_router
from bandit_service.api.privacy_routes import router as privacy_router
from bandit_service.api.routes import router
from bandit_service.apikeys import load_keyring
from bandit_service.config import Settings
from bandit_service.ops import metrics
from bandit_service.ops.http import RequestContext
from bandit_service.ops.lifecycle import DrainOnSigterm
from bandit_service.ops.routes import router as ops_router
from bandit_service.policy import load_policies
from bandit_service.privacy import install_log_redaction
from bandit_service.service import DecisionService

# Python's defaults (700, 10, 10) ran a full collection every few dozen requests once the
# start-up objects were frozen (few long-lived objects left to throttle them), each
# scanning every request in flight: 23% of a 500-candidate decision's CPU at 64 in flight,
# 17% at 16. Young collections every 20,000 allocations and full ones far more rarely
# brought that to 7-9% (docs/performance.md). Request objects die by reference counting;
# only rare cycles wait longer for the collector.
SERVING_GC_THRESHOLDS = (20_000, 50, 100)


class BanditApp(FastAPI):
    """FastAPI, with the hot routes' pre-router in front (``api/hot_routes.py``): the
    decision and reward requests go straight to their route's fast path, the rest (and
    every request before the app has started) through FastAPI as usual."""

    hot_routes: hot_routes.HotRoutes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hot = self.hot_routes
        if hot is not None and scope["type"] == "http":
            stack = hot.match(scope)
            if stack is not None:
                await stack(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings | None = None, engine: Engine | None = None, *, under_server: bool = False
) -> BanditApp:
    """Build the app. Policies are loaded (and validated) now, so bad config fails at start.

    ``under_server``: running under uvicorn (``serve``), so SIGTERM drains the service
    first (see :mod:`bandit_service.ops.lifecycle`); never set inside a test process.
    """
    settings = settings or Settings()
    policies = load_policies(settings.policies_dir)
    keyring = load_keyring(settings, policies)  # bad key config fails at start, too
    service = DecisionService(settings, policies, engine=engine)
    drain = DrainOnSigterm(service.begin_draining, settings.drain_seconds)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        app.hot_routes = hot_routes.arm(app, [router])  # once started: see BanditApp
        if under_server:
            drain.install()
        # Everything allocated so far (libraries, schemas, models) lives for the whole
        # process; moving it out of the collector's reach keeps full collections short
        # (they paused 500-candidate requests for ~100 ms every ~20 requests).
        gc.freeze()
        thresholds = gc.get_threshold()
        gc.set_threshold(*SERVING_GC_THRESHOLDS)
        try:
            yield
        finally:
            app.hot_routes = None
            drain.uninstall()
            await service.close()
            metrics.process_stopped()
            # Give the app's objects back to the collector: a process that builds apps
            # one after another (tests, embedding) would otherwise keep every one of them.
            gc.unfreeze()
            gc.set_threshold(*thresholds)

    app = BanditApp(
        title="bandit-service",
        version=__version__,
        description=(
            "Contextual-bandit decisions with exact logged propensities. Decide which "
            "candidates fill which ranked slots, report rewards, read decisions back."
        ),
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.store_metrics = metrics.StoreMetrics(
        service.db, policies, settings.metrics_window_seconds
    )
    service.policy_listeners.append(app.state.store_metrics.set_policies)
    app.include_router(router)
    app.include_router(personalizer_router)  # Azure Personalizer-compatible facade
    app.include_router(privacy_router)  # issue 10: delete-user, opt-out, explanations
    app.include_router(catalog_router)  # candidate catalogs per policy
    install_log_redaction()  # raw user ids in /v1/users/... paths never reach access logs
    app.include_router(ops_router)
    _document_personalizer_errors(app)
    install_error_handlers(app)
    install_auth(app, keyring)
    app.add_middleware(
        RequestContext,  # the only middleware: ids, latency, body limit (ops/http.py)
        access_log=settings.access_log,
        max_body_bytes=settings.max_body_bytes,
        too_large=payload_too_large(settings.max_body_bytes),
    )
    return app


def app_from_env() -> BanditApp:
    """Factory for ``uvicorn --factory`` (each worker process builds its own app)."""
    return create_app(Settings(), under_server=True)


def _document_personalizer_errors(app: FastAPI) -> None:
    """The OpenAPI document shows the facade's own error answers (400, not 422)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_personalizer(build())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
