"""Per-request context: request id (echoed in ``X-Request-ID``), latency metrics, request log,
and the request-body size limit.

An incoming ``X-Request-ID`` is kept when it is sane (1-128 characters of letters, digits
and ``._:-``), so a caller's or a proxy's id follows the request through our logs;
anything else is replaced by a fresh one (never echoed: it could be a header-injection or
log-forging attempt). Latency is recorded per method and *route template*
(``/v1/decisions/{event_id}/rewards``), never the raw path, so a label cannot explode.

Bodies over ``max_bytes`` are refused with 413 before they are buffered whole: at once when
``Content-Length`` says so (no route is known yet: the request is labelled ``unmatched``),
else as soon as the bytes received pass the limit (whatever the app then answers, a
framework turning the failed read into a 400, is replaced by the 413).

Both used to be separate middlewares; one layer scans the headers once and wraps
``send``/``receive`` once, which is per-request work every decision paid twice
(``benchmarks/framework_overhead.py``). The same layer serves the hot routes' pre-router
(``bandit_service/api/hot_routes.py``), so both paths answer alike.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bandit_service.ops import metrics
from bandit_service.ops.ids import random_hex
from bandit_service.ops.logs import REQUEST_ID
from bandit_service.ops.protocol import STARTED

log = logging.getLogger("bandit_service.http")

SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
HEADER = b"x-request-id"
_CONTENT_LENGTH = b"content-length"
_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}

# ``too_large(scope)``: the 413 answer for a body over the limit (its shape depends on the
# API the path belongs to; see ``bandit_service.api.errors.payload_too_large``).
TooLarge = Callable[[Scope], Response]


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == HEADER:
            text = value.decode("latin-1")
            if SANE_REQUEST_ID.match(text):
                return text
            break
    return random_hex()


class RequestContext:
    """Outermost app middleware (inside Starlette's own error middleware)."""

    def __init__(
        self,
        app: ASGIApp,
        access_log: bool = False,
        max_body_bytes: int | None = None,
        too_large: TooLarge | None = None,
    ) -> None:
        if max_body_bytes is not None and too_large is None:
            raise ValueError("a body limit needs its 413 answer (too_large)")
        self.app = app
        self.access_log = access_log
        self.level = logging.INFO if access_log else logging.DEBUG
        self.max_body_bytes = max_body_bytes
        self.too_large = too_large
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def around(self, app: ASGIApp) -> RequestContext:
        """The same context (settings and metric children) around another app: the hot
        routes' pre-router answers exactly as the full app's stack does."""
        twin = RequestContext(app, self.access_log, self.max_body_bytes, self.too_large)
        twin._children = self._children
        return twin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id: str | None = None
        over = False
        limit = self.max_body_bytes
        for name, value in scope.get("headers", ()):  # one scan for both headers
            if name == HEADER:
                if request_id is None:  # the first one counts
                    text = value.decode("latin-1")
                    request_id = text if SANE_REQUEST_ID.match(text) else ""
            elif name == _CONTENT_LENGTH and limit is not None:
                over = over or (value.isdigit() and int(value) > limit)
        request_id = request_id or random_hex()  # uuid4().hex's format (ops/ids.py)
        token = REQUEST_ID.set(request_id)
        # A request the server's protocol held while its body arrived (ops/protocol.py)
        # is timed from when it began waiting, as it would have been here.
        start = scope.get(STARTED) or time.perf_counter()
        status = 500
        echoed = (HEADER, request_id.encode())
        # Set once the body passes the limit: whatever the app then answers (frameworks
        # turn a failed body read into a 400) is dropped, and our 413 is sent instead.
        # One ``send`` wrapper does both jobs (it used to be two, one per concern: an
        # extra coroutine call on each of a request's two messages).
        blocked = False
        received = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if blocked:
                return
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), echoed]}
            await send(message)

        async def limited_receive() -> Message:
            nonlocal received, blocked
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # type: ignore[operator]  # only used with a limit
                    blocked = True
                    raise _TooLarge
            return message

        try:
            if limit is None:
                await self.app(scope, receive, send_with_id)
            elif over:  # a Content-Length over the limit: refused before anything is read
                await self._refuse(scope, receive, send_with_id)
            else:
                with contextlib.suppress(_TooLarge):
                    await self.app(scope, limited_receive, send_with_id)
                if blocked:
                    blocked = False
                    await self._refuse(scope, receive, send_with_id)
        except BaseException:
            # Starlette's outer error middleware answers 500 and logs through our handler,
            # which echoes the id: keep it set (the task ends with the request anyway).
            self.record(scope, 500, start)
            raise
        self.record(scope, status, start)
        REQUEST_ID.reset(token)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.too_large is not None
        await self.too_large(scope)(scope, receive, send)

    def record(self, scope: Scope, status: int, start: float) -> None:
        """Count and time a request that ended with ``status``, and log it."""
        elapsed = time.perf_counter() - start
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        method = scope["method"] if scope["method"] in _METHODS else "OTHER"
        children = self._children.get((method, route, status))
        if children is None:  # label look-ups cost more than the updates: once per triple
            children = (
                metrics.REQUEST_SECONDS.labels(method, route),
                metrics.REQUESTS.labels(method, route, str(status)),
            )
            self._children[(method, route, status)] = children
        children[0].observe(elapsed)
        children[1].inc()
        if log.isEnabledFor(self.level):
            log.log(
                self.level,
                "request",
                extra={"event": "request", "method": method, "route": route,
                       "status": status, "duration_ms": round(elapsed * 1000, 3)},
            )  # fmt: skip


class _TooLarge(Exception):
    pass
