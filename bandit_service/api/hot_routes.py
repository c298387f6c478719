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
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute, APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor
from starlette.exceptions import HTTPException
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bandit_service.api.json_route import FAST_PATH_DECLINED, FastPath
from bandit_service.ops.http import HEADER as REQUEST_ID_HEADER
from bandit_service.ops.http import RequestContext, request_id_from
from bandit_service.ops.logs import REQUEST_ID

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
        if scope.get(FAST_PATH_DECLINED):  # declined already (DirectRoute): FastAPI's
            await self.fallback(scope, receive, send)
            return
        request = self.request_class(scope, receive, send)
        try:
            response = await self.fast(request)
        except Exception as exc:
            response = await self.handle(request, exc)
            if response is not None:
                await response(scope, receive, send)
            return
        if response is None:
            scope[FAST_PATH_DECLINED] = True
            await self.fallback(scope, _replay(request, receive), send)
            return
        await response(scope, receive, send)

    async def handle(self, request: Request, exc: Exception) -> Response | None:
        """The app's answer to ``exc`` raised by the fast path (its exception handlers',
        as FastAPI's exception middleware would pick them); ``exc`` itself when none does
        (to the request context (413) or the 500 handler, as in FastAPI)."""
        handler = self._handler_for(exc)
        if handler is None:
            raise exc
        if _is_async(handler):
            response: Response | None = await handler(request, exc)
        else:
            response = await run_in_threadpool(handler, request, exc)
        exc.__traceback__ = None  # as Starlette does: reused exceptions keep no frames
        return response

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


# ``answer(status, headers, body)``: the server sends a whole plain response (the two
# messages Starlette's ``Response`` sends, ``more_body`` false) in one step, as its
# ``send`` would have, and returns True; or returns False having done nothing, and the
# messages are sent (``ops/protocol._CoalescingCycle.answer``).
Answer = Callable[[int, list[tuple[bytes, bytes]], bytes | memoryview], bool]


class DirectRoute:
    """A hot route served without ASGI messages, for the server's own protocol
    (``ops/protocol.py``): a request whose whole body has arrived is answered by the same
    objects, in the same order, as the route's ASGI stack (:func:`arm`) would answer it --
    Starlette's error middleware, the request context, :class:`HotRoute` -- without the
    ``receive``/``send`` wrappers, message dictionaries and middleware frames in between.

    Why: each of those layers costs little in process (``benchmarks/framework_overhead.py``:
    8 µs a request in all), but served over HTTP the request's way through uvicorn's ASGI
    cycle, the proxy-headers middleware, the app and these layers cost ~28 µs of a
    ~330 µs decision at 64 in flight (``benchmarks/http_load.py``, a prototype that
    answered directly from the protocol, alternating rounds).

    :meth:`serve` answers through ``send`` (the protocol's cycle: the same bytes on the
    wire), or returns False, having done nothing, for the requests that only the whole
    stack answers alike: a body over the request context's limit, and a request the fast
    path declines (it declines before any side effect); the caller then runs the app."""

    def __init__(self, hot: HotRoute, context: RequestContext, errors: ServerErrorMiddleware):
        self.hot = hot
        self.context = context
        self.errors = errors
        self.limit = context.max_body_bytes  # the request context's body limit

    def takes(self, scope: Scope) -> bool:
        """False for a request the request context refuses before reading its body (a
        ``Content-Length`` over the limit): only the whole stack answers it alike."""
        limit = self.limit
        if limit is not None:
            for name, value in scope["headers"]:
                if name == b"content-length" and value.isdigit() and int(value) > limit:
                    return False
        return True

    def abandoned(self, scope: Scope, start: float) -> None:
        """The request ended (cancelled: the server shut down) while its body was still
        arriving: counted and logged as the request context does (a 500, the request id
        left set, as for any failure)."""
        REQUEST_ID.set(request_id_from(scope["headers"]))
        scope["route"] = self.hot.route
        self.context.record(scope, 500, start)

    async def serve(
        self,
        scope: Scope,
        body: bytes,
        receive: Receive,
        send: Send,
        start: float,
        answer: Answer | None = None,
    ) -> bool:
        """Answer the request (``start``: ``time.perf_counter()`` when its handling began,
        before its body arrived), or return False having done nothing (see above).
        ``answer``: the server's way to send a plain response whole (:data:`Answer`)."""
        limit = self.limit
        if limit is not None and len(body) > limit:
            return False  # the request context's 413, from the whole stack
        request_id = request_id_from(scope["headers"])
        token = REQUEST_ID.set(request_id)
        hot = self.hot
        scope["route"] = hot.route  # the metrics' and access log's label: the template
        request = hot.request_class(scope, receive, send)
        request._body = body  # read already: ``body()`` returns it
        started = False
        try:
            try:
                response = await hot.fast(request)
            except Exception as exc:
                response = await hot.handle(request, exc)
                if response is None:  # a handler that answers nothing: as the stack does
                    self.context.record(scope, 500, start)
                    REQUEST_ID.reset(token)
                    return True
            else:
                if response is None:
                    # The app answers it: FastAPI's validation, the fast path not run again.
                    del scope["route"]
                    scope[FAST_PATH_DECLINED] = True
                    REQUEST_ID.reset(token)
                    return False
            started = True
            echoed = (REQUEST_ID_HEADER, request_id.encode())
            if (
                answer is None
                or type(response).__call__ is not Response.__call__
                or response.background is not None
                or not answer(response.status_code, [*response.raw_headers, echoed], response.body)
            ):
                await _respond(response, scope, receive, send, echoed)
        except BaseException as exc:
            # What the request context, then Starlette's error middleware, do: count a
            # 500, answer the app's 500 (incident id; the request id stays set for it)
            # unless an answer had started, and raise on (the caller logs it and closes
            # the connection, as uvicorn does).
            self.context.record(scope, 500, start)
            if isinstance(exc, Exception) and not started:
                error = self._error_response(Request(scope), exc)
                await error(scope, receive, send)
            raise
        self.context.record(scope, response.status_code, start)
        REQUEST_ID.reset(token)
        return True

    def _error_response(self, request: Request, exc: Exception) -> Any:
        errors = self.errors
        if errors.debug:
            return errors.debug_response(request, exc)
        if errors.handler is None:
            return errors.error_response(request, exc)
        return _ErrorAnswer(errors.handler, request, exc)


class _ErrorAnswer:
    """The error middleware's handler's answer, made when it is sent (as an ASGI app)."""

    def __init__(self, handler: Any, request: Request, exc: Exception) -> None:
        self.handler, self.request, self.exc = handler, request, exc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _is_async(self.handler):
            response = await self.handler(self.request, self.exc)
        else:
            response = await run_in_threadpool(self.handler, self.request, self.exc)
        await response(scope, receive, send)


async def _respond(
    response: Response, scope: Scope, receive: Receive, send: Send, echoed: tuple[bytes, bytes]
) -> None:
    """``response`` sent as the request context sends it (its id echoed last)."""
    if type(response).__call__ is Response.__call__ and response.background is None:
        # Starlette's own two messages, built here: no wrapper around ``send``.
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": [*response.raw_headers, echoed],
            }
        )
        await send({"type": "http.response.body", "body": response.body})
        return

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), echoed]}
        await send(message)

    await response(scope, receive, send_with_id)


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
    """A hot route's path pattern and the stack that serves it (as an ASGI app, and
    directly: :class:`DirectRoute`)."""

    def __init__(self, route: APIRoute, stack: ASGIApp, direct: DirectRoute) -> None:
        self.route = route
        self.methods = frozenset(route.methods or ())
        self.regex: re.Pattern[str] = route.path_regex
        self.convertors: dict[str, Convertor[Any]] = route.param_convertors
        self.endpoint = route.endpoint
        self.stack = stack
        self.direct = direct


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
        target = self._find(scope)
        return None if target is None else target.stack

    def direct(self, scope: Scope) -> DirectRoute | None:
        """As :meth:`match`, the route to serve directly (:class:`DirectRoute`)."""
        target = self._find(scope)
        return None if target is None else target.direct

    def _find(self, scope: Scope) -> _Target | None:
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
        return target


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
            twin = context.around(hot)
            stack = ServerErrorMiddleware(twin, errors.handler, errors.debug)
            targets.append(_Target(route, stack, DirectRoute(hot, twin, stack)))
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
