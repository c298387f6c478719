"""uvicorn's httptools protocol, writing a response's head and body in one system call.

uvicorn's ``RequestResponseCycle.send`` writes the status line and headers to the socket
when the app sends ``http.response.start``, and the body when it sends
``http.response.body``: uvloop writes each at once, so every answer costs two ``write``
calls and goes out as two TCP segments (``strace`` of a serving worker: 174 bytes, then
234), which the client's kernel and event loop then handle twice as well. Here the head
is held back until the body comes (the app sends both in the same step: Starlette's
``Response`` awaits nothing in between) and the two are written together; every byte
on the wire is the same, in the same order, only one ``write`` and one segment fewer.

The head never waits longer than that step: if no body follows at once (a streaming
answer), a callback queued when it was held writes it before anything else happens on
the loop; and whatever writes to or closes the connection first (the body, a close after
an error, a ``HEAD`` answer that has no body) writes the held head before it. While
uvicorn's flow control has paused writing, nothing is held.

The protocol also serves the app's hot routes (the decision and reward requests,
``api/hot_routes.py``) directly: once a request's whole body has arrived, its cycle calls
the route's
:class:`~bandit_service.api.hot_routes.DirectRoute` instead of the app, skipping the
proxy-headers middleware, the app's dispatch and the ASGI layers of the route's stack,
whose objects it calls itself in the same order (~28 µs of CPU a decision at 64 in
flight). uvicorn's ``run_asgi`` still runs it, so a failure is logged and answered as
for any app. The route's answer, a plain Starlette response, is not sent as two ASGI
messages: ``_CoalescingCycle.answer`` formats the status line, uvicorn's default headers
(formatted once a second, when uvicorn renews the date), the response's headers and the
body into one bytes object, writes it, and ends the response as ``send`` would
(keep-alive or close, the next pipelined request): every byte and every state change
the same (``tests/e2e/test_request_protocol.py`` compares both on a table of answers),
without the held head's stand-in transport, capture and queued flush, and uvicorn's
per-answer checks of its own default headers. Measured: ~13 -> ~6.5 µs of CPU an
answer (cycle creation included); a 50 x 1 decision served through this protocol in
one process (``benchmarks/proto_protocol_cpu.py`` under ``valgrind --tool=callgrind``)
1.287 -> 1.247 million instructions (-3.1%).

Anything else goes to the app as before: a request whose body passes the body limit or
whose connection is lost before it has all arrived, one that expects ``100-continue``,
one that carries ``X-Forwarded-For`` or ``X-Forwarded-Proto`` (the proxy-headers
middleware would rewrite its client or scheme), while uvicorn's concurrency limit
answers 503, and before the app has started.

Everything else is uvicorn's own code: :class:`CoalescingHttpToolsProtocol` only gives
each request's cycle the ``send`` below and, for the hot routes, the direct call and
its whole answer (:data:`AVAILABLE` is False, and ``serve`` keeps uvicorn's default
protocol, when the uvicorn installed does not have the pieces this relies on).
``tests/e2e/test_request_protocol.py`` compares raw answers byte for byte with uvicorn's
own protocol, and ``tests/e2e/test_direct_routes.py`` the service's answers, metrics and
logs over real sockets with the app served through ASGI.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import TYPE_CHECKING, Any, cast

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

if TYPE_CHECKING:
    from bandit_service.api.hot_routes import DirectRoute

try:  # uvicorn's httptools protocol needs httptools (an optional dependency of uvicorn)
    from uvicorn.protocols.http.httptools_impl import (
        HEADER_RE,
        HEADER_VALUE_RE,
        STATUS_LINE,
        HttpToolsProtocol,
        RequestResponseCycle,
    )
    from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string
except ImportError:  # pragma: no cover - serve then keeps uvicorn's choice
    AVAILABLE = False
else:
    AVAILABLE = all(
        hasattr(RequestResponseCycle, name) for name in ("send", "run_asgi", "receive")
    ) and hasattr(HttpToolsProtocol, "_start_asgi_task")

PROTOCOL = "bandit_service.ops.protocol:CoalescingHttpToolsProtocol"
# Scope key: ``time.perf_counter()`` when a request's handling began, set when the
# protocol waited for its body before handing it to the app (the request context,
# ``ops/http.py``, times it from then, as it would have).
STARTED = "bandit.started"
# Bodies above this are written after the head instead of being copied behind it.
_JOIN_LIMIT = 64 * 1024


def http_protocol() -> str:
    """What ``serve`` passes to uvicorn as ``http``."""
    return PROTOCOL if AVAILABLE else "auto"


class _Capture:
    """Stands in for the transport while uvicorn formats a response head: keeps it."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data: bytes | None = None

    def write(self, data: bytes) -> None:
        self.data = data if self.data is None else self.data + data


class _HeldHead:
    """The cycle's transport while its response head is held: the first write or close
    sends the head first (with the data, in one write), then the real transport is back."""

    __slots__ = ("_cycle", "_flush", "_transport")

    def __init__(self, cycle: Any, transport: asyncio.Transport, flush: asyncio.Handle) -> None:
        self._cycle = cycle
        self._transport = transport
        self._flush = flush

    def take(self) -> bytes:
        """The held head (once), the real transport back in place."""
        cycle = self._cycle
        head: bytes = cycle._held
        cycle._held = None
        cycle.transport = self._transport
        self._flush.cancel()
        return head

    def write(self, data: bytes) -> None:
        head = self.take()
        if len(data) <= _JOIN_LIMIT:
            self._transport.write(head + data)
        else:
            self._transport.write(head)
            self._transport.write(data)

    def flush(self) -> None:
        head = self.take()
        if not self._transport.is_closing():  # the peer is gone: nothing to send to
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


if AVAILABLE:

    class _CoalescingCycle(RequestResponseCycle):
        """uvicorn's cycle; ``send`` holds the response head for the body (see above)."""

        _held: bytes | None = None
        _loop: asyncio.AbstractEventLoop

        async def send(self, message: Any) -> None:
            if (
                message["type"] == "http.response.start"
                and not self.response_started
                and not self.flow.write_paused  # so uvicorn's send awaits nothing
                and not self.disconnected
            ):
                transport = self.transport
                capture = _Capture()
                self.transport = capture  # type: ignore[assignment]
                try:
                    await super().send(message)
                finally:
                    self.transport = transport
                if capture.data is not None:
                    self._held = capture.data
                    flush = self._loop.call_soon(self._flush_head)
                    self.transport = _HeldHead(self, transport, flush)  # type: ignore[assignment]
                return
            await super().send(message)
            if self._held is not None and self.response_complete:
                self._flush_head()  # an answer without body bytes (HEAD, 204, empty)

        def _flush_head(self) -> None:
            held = self.transport
            if isinstance(held, _HeldHead):
                held.flush()

        def answer(
            self, status: int, headers: list[tuple[bytes, bytes]], body: bytes | memoryview
        ) -> bool:
            """Send a whole answer with a ``Content-Length`` (the hot routes' plain
            responses) in one write, as ``send`` would send its two messages (same bytes,
            same state after), or return False having done nothing: then the caller sends
            the messages, and ``send`` handles (or refuses) whatever this does not.

            uvicorn's ``send`` re-validates and re-formats its default headers (date,
            server) on every answer, and our ``send`` captures the head, holds it behind a
            stand-in transport and a queued flush, then joins it with the body. Here the
            default headers are formatted once a second (when uvicorn replaces them), the
            response's own headers checked with one search of each pattern, and the
            answer joined and written once."""
            if (
                self.response_started
                or self.disconnected
                or self.flow.write_paused  # ``send`` would wait for the drain
                or self.scope["method"] == "HEAD"
            ):
                return False
            status_line = STATUS_LINE.get(status)
            default = _default_head(self.default_headers)
            if status_line is None or default is None:
                return False
            out: list[bytes | memoryview] = [status_line, default]
            names = []
            values = []
            length: bytes | None = None
            for name, value in headers:
                names.append(name)
                values.append(value)
                name = name.lower()
                if name == b"content-length":
                    if length is None:  # the first one counts, as in ``send``
                        length = value
                elif name == b"transfer-encoding" or name == b"connection":
                    return False
                out += (name, b": ", value, b"\r\n")
            if (
                length is None
                or HEADER_RE.search(b"".join(names))  # both match single characters:
                or HEADER_VALUE_RE.search(b"".join(values))  # one search finds any
            ):
                return False
            try:
                if int(length) != len(body):  # ``send``: int(value.decode())
                    return False
            except ValueError:
                return False
            if not self.keep_alive:
                out.append(b"connection: close\r\n")
            out.append(b"\r\n")
            if self.access_log:  # uvicorn's line, as ``send`` logs it (off in ``serve``)
                scope = self.scope
                self.access_logger.info(
                    '%s - "%s %s HTTP/%s" %d',
                    get_client_addr(scope),
                    scope["method"],
                    get_path_with_query_string(scope),
                    scope["http_version"],
                    status,
                )
            self.response_started = True
            self.waiting_for_100_continue = False
            self.chunked_encoding = False
            self.expected_content_length = 0
            transport = self.transport
            if len(body) <= _JOIN_LIMIT:
                out.append(body)
                transport.write(b"".join(out))
            else:
                transport.write(b"".join(out))
                transport.write(body)
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                transport.close()
            self.on_response()
            return True

    # The default headers' lines, for the last list of them seen: uvicorn's server
    # replaces the list (a new date) once a second; None when they hold a header that
    # changes how ``send`` frames the answer (``answer`` then leaves it to ``send``).
    _default_cache: tuple[list[tuple[bytes, bytes]], bytes | None] = ([], b"")

    def _default_head(headers: list[tuple[bytes, bytes]]) -> bytes | None:
        global _default_cache
        cached = _default_cache
        if cached[0] is headers:
            return cached[1]
        lines: list[bytes] = []
        for name, value in headers:
            lower = name.lower()
            if (
                HEADER_RE.search(name)
                or HEADER_VALUE_RE.search(value)
                or lower in (b"content-length", b"transfer-encoding", b"connection")
            ):
                _default_cache = (headers, None)
                return None
            lines += (lower, b": ", value, b"\r\n")
        head = b"".join(lines)
        _default_cache = (headers, head)
        return head

    class _Direct:
        """The app, for one request to a hot route: served by its :class:`DirectRoute`
        when the body is all there, by the app otherwise (and when the route declines).
        uvicorn's ``run_asgi`` calls it as the app (its failure handling unchanged)."""

        __slots__ = ("_app", "_cycle", "_route")

        def __init__(self, app: Any, cycle: _CoalescingCycle, route: DirectRoute) -> None:
            self._app = app
            self._cycle = cycle
            self._route = route

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            cycle = self._cycle
            route = self._route
            limit = route.limit
            start = time.perf_counter()  # the request context's clock starts here
            # The body, as ``receive`` would gather it (the app's first step on these
            # routes is to read it whole), up to the request context's limit.
            try:
                while cycle.more_body and not cycle.disconnected:
                    if limit is not None and len(cycle.body) > limit:
                        break
                    cycle.flow.resume_reading()
                    await cycle.message_event.wait()
                    cycle.message_event.clear()
            except BaseException:  # cancelled (a shutdown's deadline): counted as the app
                route.abandoned(scope, start)
                raise
            if cycle.more_body or cycle.disconnected or cycle.response_complete:
                cycle.message_event.set()  # the app's ``receive`` takes it from here
                scope[STARTED] = start
                await self._app(scope, receive, send)
                return
            cycle.flow.resume_reading()
            cycle.message_event.clear()
            raw = cycle.body
            cycle.body = b""  # type: ignore[assignment]
            if not await route.serve(scope, bytes(raw), receive, send, start, cycle.answer):
                cycle.body = raw  # as it was: the app reads it
                cycle.message_event.set()
                scope[STARTED] = start
                await self._app(scope, receive, send)

    _FORWARDED = (b"x-forwarded-for", b"x-forwarded-proto")

    def _direct_route(app: Any, scope: Any) -> DirectRoute | None:
        """The hot route to serve ``scope`` directly, if ``app`` (the protocol's) is the
        service's app, with nothing between it and the server but the proxy-headers
        middleware, whose work no forwarded header asks for."""
        if type(app) is ProxyHeadersMiddleware:
            for name, _value in scope["headers"]:
                if name in _FORWARDED:
                    return None
            app = app.app
        # The service's app as it is (a subclass might do more in ``__call__``), once
        # started (its pre-router is armed then).
        if type(app).__call__ is not _bandit_call() or app.hot_routes is None:
            return None
        hot = app.hot_routes
        route: DirectRoute | None = hot.direct(scope)
        return route if route is not None and route.takes(scope) else None

    @functools.cache
    def _bandit_call() -> Any:
        """``BanditApp.__call__``, imported when the first request comes: importing the
        app (and its metrics) with this module would create the metrics before ``serve``
        has prepared their multiprocess mode."""
        from bandit_service.app import BanditApp

        return BanditApp.__call__

    class CoalescingHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol whose requests answer through
        :class:`_CoalescingCycle`, and the app's hot routes directly."""

        def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
            # The cycle was made by uvicorn's own ``on_headers_complete``; its class is a
            # plain one, and the subclass adds only methods and class attributes.
            cycle.__class__ = _CoalescingCycle
            cycle._loop = self.loop  # type: ignore[attr-defined]
            if app is self.app and not cycle.waiting_for_100_continue:  # not a 503 stand-in
                route = _direct_route(app, cycle.scope)
                if route is not None:
                    app = _Direct(app, cast(_CoalescingCycle, cycle), route)
            super()._start_asgi_task(cycle, app)
