"""A pre-router for the hot routes: the decision and reward requests skip FastAPI's routing.

Every request used to cross FastAPI's whole stack before a route's fast path
(``api/json_route.py``) saw it: the application's telemetry check, three internal
middlewares, the exception middleware, an exit-stack middleware, a match against every
route of every included router (a decision's path is matched against the docs routes,
then router by router), and the route's own wrappers. For the bare floor app that is
~40 µs of CPU a request; for ours, with more routes and two middlewares, ~60
(``benchmarks/framework_overhead.py``). A decision's own work is far larger, but this is
the part that every request pays and no decision needs.

``arm(app, routers)`` finds the routes of ``routers`` that declare a fast path and builds,
for each, the stack it really needs, from the very objects the app's own stack uses:

    Starlette's ServerErrorMiddleware (same 500 handler: incident id, x-request-id)
      -> the app's RequestContext (request id, body limit, metrics by route template, log)
      -> HotRoute: the route's fast path, its errors answered by the app's exception
         handlers, exactly as FastAPI's exception middleware would find them.

When the fast path declines (returns None: an unusual or invalid request), the request
goes on into the app's own stack below the request context (exception middleware,
routing, the route's dependency solving and validation) with the body it already read,
marked so the route does not try its fast path again. A client cannot tell which path
answered (``tests/e2e/test_hot_routes.py`` compares both on a table of requests).

``arm`` refuses (returns None, and everything goes through FastAPI) when the app is not
the one it knows how to short-cut: FastAPI's OpenTelemetry support is configured (its
spans come from the skipped layers), a ``root_path`` or an app-wide body limit is set,
another middleware is installed, or FastAPI would not route a sample request for a hot
route to that same route.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute, APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor
from starlette.exceptions import HTTPException
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bandit_service.api.json_route import FAST_PATH_DECLINED, FastPath
from bandit_service.ops.http import RequestContext

log = logging.getLogger(__name__)

# Layers FastAPI puts outside the user's middlewares that do nothing for these requests
# when telemetry is off and no app-wide body limit is set (checked in ``arm``).
_PASSIVE_LAYERS = frozenset(
    {
        "fastapi.telemetry._asgi.ExceptionTelemetryMiddleware",
        "fastapi._body_limit.AppBodyLimitMiddleware",
    }
)


class HotRoute:
    """One route's fast path as an ASGI app, below the request context."""

    def __init__(
        self,
        route: APIRoute,
        fast: FastPath,
        exception_handlers: dict[Any, Any],
        status_handlers: dict[int, Any],
        fallback: ASGIApp,
        request_class: type[Request] = Request,
    ) -> None:
        self.request_class = request_class
        self.route = route
        self.fast = fast
        self.exception_handlers = exception_handlers
        self.status_handlers = status_handlers
        self.fallback = fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self.route  # the metrics' and access log's label: the template
        request = self.request_class(scope, receive, send)
        try:
            response = await self.fast(request)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise  # to the request context (413) or the 500 handler, as in FastAPI
            if _is_async(handler):
                response = await handler(request, exc)
            else:
                response = await run_in_threadpool(handler, request, exc)
            if response is not None:
                await response(scope, receive, send)
            exc.__traceback__ = None  # as Starlette does: reused exceptions keep no frames
            return
        if response is None:
            scope[FAST_PATH_DECLINED] = True
            await self.fallback(scope, _replay(request, receive), send)
            return
        await response(scope, receive, send)

    def _handler_for(self, exc: Exception) -> Any:
        """The handler Starlette's exception middleware would pick for ``exc``."""
        if isinstance(exc, HTTPException):
            handler = self.status_handlers.get(exc.status_code)
            if handler is not None:
                return handler
        for cls in type(exc).__mro__:
            if cls in self.exception_handlers:
                return self.exception_handlers[cls]
        return None


class _BodyRequest(Request):
    """A request whose ``body()`` reads the messages in a plain loop.

    Starlette's ``body()`` drives its ``stream()`` async generator under ``aclosing``,
    ~4 µs a request here (generator set-up, the event loop's async-generator hooks), for
    the one thing every fast path does first. Same messages, same answers: the chunks
    joined, ``ClientDisconnect`` on a disconnect, and a body read once."""

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            if self._stream_consumed:
                raise RuntimeError("Stream consumed")
            chunks: list[bytes] = []
            while not self._stream_consumed:
                message = await self._receive()
                if message["type"] == "http.request":
                    if not message.get("more_body", False):
                        self._stream_consumed = True
                    if chunk := message.get("body", b""):
                        chunks.append(chunk)
                elif message["type"] == "http.disconnect":
                    self._is_disconnected = True
                    raise ClientDisconnect()
            self._body = b"".join(chunks)
        return self._body


def _body_request_fits() -> bool:
    """Whether Starlette's request keeps its body state where ``_BodyRequest`` expects it
    (else the plain request is used: a few µs slower, never wrong)."""

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    probe = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
    return (
        getattr(probe, "_stream_consumed", None) is False
        and getattr(probe, "_receive", None) is receive
        and hasattr(probe, "_is_disconnected")
    )


def _is_async(handler: Any) -> bool:
    """Starlette's test: a coroutine function (or a partial of one, or an object whose
    ``__call__`` is one) is awaited; anything else runs in the thread pool."""
    while hasattr(handler, "func"):  # functools.partial
        handler = handler.func
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 (an object with async __call__)
    )


def _replay(request: Request, receive: Receive) -> Receive:
    """``receive`` for the rest of the app: the body the fast path read, then the rest
    (a disconnect) from the server."""
    body: bytes | None = getattr(request, "_body", None)
    if body is None:
        return receive  # the fast path declined before reading the body
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _Target:
    """A hot route's path pattern and the stack that serves it."""

    def __init__(self, route: APIRoute, stack: ASGIApp) -> None:
        self.route = route
        self.methods = frozenset(route.methods or ())
        self.regex: re.Pattern[str] = route.path_regex
        self.convertors: dict[str, Convertor[Any]] = route.param_convertors
        self.endpoint = route.endpoint
        self.stack = stack


class HotRoutes:
    """Matches a request against the hot routes; ``match`` prepares the scope as routing
    would (app, router, endpoint, path parameters) and returns the stack to call."""

    def __init__(self, app: FastAPI, targets: Sequence[_Target]) -> None:
        self.app = app
        self.router = app.router
        self._exact = {
            (method, t.route.path): t for t in targets if not t.convertors for method in t.methods
        }
        self._patterns = [t for t in targets if t.convertors]
        self.routes = tuple(t.route for t in targets)

    def match(self, scope: Scope) -> ASGIApp | None:
        if scope.get("root_path"):
            return None
        path: str = scope["path"]
        target = self._exact.get((scope["method"], path))
        params: dict[str, Any] = {}
        if target is None:
            for candidate in self._patterns:
                if scope["method"] in candidate.methods and (found := candidate.regex.match(path)):
                    target = candidate
                    params = {
                        key: candidate.convertors[key].convert(value)
                        for key, value in found.groupdict().items()
                    }
                    break
            else:
                return None
        scope["app"] = self.app
        if "router" not in scope:
            scope["router"] = self.router
        scope["endpoint"] = target.endpoint
        existing = scope.get("path_params")
        scope["path_params"] = {**existing, **params} if existing else params
        return target.stack


def arm(app: FastAPI, routers: Iterable[APIRouter]) -> HotRoutes | None:
    """The pre-router for the fast-path routes of ``routers`` on ``app``, or None when
    ``app`` is not one it can short-cut without a visible difference (module docstring)."""
    telemetry = getattr(app, "_native_telemetry", None)
    if telemetry is not None and telemetry.enabled():
        return _refuse("FastAPI's OpenTelemetry support is configured")
    if app.root_path or getattr(app, "max_body_size", None) is not None:
        return _refuse("a root_path or an app-wide body limit is set")
    if app.middleware_stack is None:  # as Starlette builds it on the first call
        app.middleware_stack = app.build_middleware_stack()
    errors = app.middleware_stack
    if not isinstance(errors, ServerErrorMiddleware):
        return _refuse("the outermost layer is not Starlette's error middleware")
    layer = errors.app
    while not isinstance(layer, RequestContext):
        kind = f"{type(layer).__module__}.{type(layer).__qualname__}"
        if kind not in _PASSIVE_LAYERS:
            return _refuse(f"{kind} sits outside the request context")
        layer = layer.app  # type: ignore[attr-defined]
    context = layer
    inner = context.app
    if not isinstance(inner, ExceptionMiddleware):
        return _refuse("another middleware sits inside the request context")
    handlers = getattr(inner, "_exception_handlers", None)
    status_handlers = getattr(inner, "_status_handlers", None)
    if not isinstance(handlers, dict) or not isinstance(status_handlers, dict):
        return _refuse("Starlette's exception middleware keeps its handlers elsewhere")
    request_class: type[Request] = _BodyRequest if _body_request_fits() else Request
    targets = []
    for router in routers:
        for route in router.routes:
            fast: FastPath | None = getattr(getattr(route, "endpoint", None), "fast_path", None)
            if not isinstance(route, APIRoute) or fast is None:
                continue
            if not _routed_to(app, route):
                return _refuse(f"FastAPI does not route {route.path} to its fast path")
            hot = HotRoute(route, fast, handlers, status_handlers, inner, request_class)
            stack = ServerErrorMiddleware(context.around(hot), errors.handler, errors.debug)
            targets.append(_Target(route, stack))
    return HotRoutes(app, targets)


def _routed_to(app: FastAPI, route: APIRoute) -> bool:
    """Whether the app's own router picks ``route`` for sample requests to its path."""
    for sample in ("x", "0123456789abcdef0123456789abcdef", "a.b-c_d:e"):
        path = route.path_format
        for name in route.param_convertors:
            path = path.replace("{" + name + "}", sample)
        for method in route.methods or ():
            scope: Scope = {
                "type": "http", "method": method, "path": path, "root_path": "",
                "path_params": {}, "headers": [], "query_string": b"",
            }  # fmt: skip
            if _chosen(app.router.routes, scope) is not route:
                return False
    return True


def _chosen(routes: Sequence[Any], scope: Scope) -> Any:
    """The route FastAPI's router would hand ``scope`` to: the first full match, looked
    into when it is an included router (FastAPI keeps those whole, not flattened).
    None when that cannot be told (an unknown kind of route): then nothing is armed."""
    for candidate in routes:
        match, _ = candidate.matches(dict(scope))
        if match != Match.FULL:
            continue
        if isinstance(candidate, APIRoute):
            return candidate
        select = getattr(candidate, "_match", None)  # fastapi.routing._IncludedRouter
        if select is None:
            return None
        found = select(dict(scope))
        chosen = found[2] if isinstance(found, tuple) and len(found) == 4 else None
        if chosen is not None and hasattr(chosen, "_match"):
            return _chosen([chosen], scope)
        return chosen if found[0] == Match.FULL else None
    return None


def _refuse(reason: str) -> HotRoutes | None:
    """Log why nothing is pre-routed; the answer for ``arm`` (None)."""
    log.info("hot routes go through FastAPI's routing: %s", reason)
    return None
