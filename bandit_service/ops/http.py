"""Per-request context: request id (echoed in ``X-Request-ID``), latency metrics, request log.

An incoming ``X-Request-ID`` is kept when it is sane (1-128 characters of letters, digits
and ``._:-``), so a caller's or a proxy's id follows the request through our logs;
anything else is replaced by a fresh one (never echoed: it could be a header-injection or
log-forging attempt). Latency is recorded per method and *route template*
(``/v1/decisions/{event_id}/rewards``), never the raw path, so a label cannot explode.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bandit_service.ops import metrics
from bandit_service.ops.logs import REQUEST_ID

log = logging.getLogger("bandit_service.http")

SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
HEADER = b"x-request-id"
_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == HEADER:
            text = value.decode("latin-1")
            if SANE_REQUEST_ID.match(text):
                return text
            break
    return uuid.uuid4().hex


class RequestContext:
    """Outermost app middleware (inside Starlette's own error middleware)."""

    def __init__(self, app: ASGIApp, access_log: bool = False) -> None:
        self.app = app
        self.level = logging.INFO if access_log else logging.DEBUG
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope.get("headers", []))
        token = REQUEST_ID.set(request_id)
        start = time.perf_counter()
        status = 500
        echoed = (HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), echoed]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            # Starlette's outer error middleware answers 500 and logs through our handler,
            # which echoes the id: keep it set (the task ends with the request anyway).
            self._record(scope, 500, start)
            raise
        self._record(scope, status, start)
        REQUEST_ID.reset(token)

    def _record(self, scope: Scope, status: int, start: float) -> None:
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
