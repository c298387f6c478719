"""Map every failure to a JSON error naming the field: never a traceback, never HTML."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from bandit_service.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    ServiceError,
    Unavailable,
    UnknownPolicy,
)
from bandit_service.ops.logs import REQUEST_ID
from bandit_service.privacy import redact_user_path

log = logging.getLogger(__name__)

STATUS = {
    InvalidRequest: 422,
    UnknownPolicy: 422,
    NotFound: 404,
    Conflict: 409,
    Unavailable: 503,
}

# Tags pydantic puts in a location for union members and validators; not request fields.
_TAG = re.compile(r"^(int|str|float|bool|none|list\[.*\]|dict\[.*\]|function-.*|constrained-.*)$")


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body: dict[str, Any] = {"code": code, "message": message, "field": field}
    if details:
        body["details"] = details
    return Response(
        orjson.dumps({"error": body}), status, media_type="application/json", headers=headers
    )


def field_path(loc: Sequence[Any]) -> str:
    """``('body', 'candidates', 1, 'id')`` -> ``candidates[1].id``."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path"):
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and _TAG.match(part):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def _validation_response(exc: RequestValidationError) -> Response:
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        first = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        return error_response(400, "malformed_json", f"request body is not valid JSON: {reason}",
                              "body")  # fmt: skip
    details = []
    for e in errors:
        path = field_path(e.get("loc", ()))
        message = str(e.get("msg", "invalid value"))
        if e.get("type") == "feature_invalid":  # our feature check knows the exact feature
            ctx = e.get("ctx") or {}
            path = f"{path}.{ctx['path']}" if ctx.get("path") != "features" else path
            message = str(ctx.get("message", message))
        if e.get("type") == "missing" and path == "body":
            message = "a JSON request body is required"
        details.append({"field": path, "message": message})
    # Unions report one error per member; keep the clearest (the most specific path).
    first = max(details, key=lambda d: len(d["field"]))
    return error_response(
        422, "invalid_request", f"{first['field']}: {first['message']}", first["field"], details
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _on_validation(_request: Request, exc: RequestValidationError) -> Response:
        return _validation_response(exc)

    @app.exception_handler(ServiceError)
    async def _on_service_error(_request: Request, exc: ServiceError) -> Response:
        status = next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 400)
        retry = {"Retry-After": "1"} if status == 503 else None  # nothing was stored
        return error_response(status, exc.code, exc.message, exc.field, headers=retry)

    @app.exception_handler(sa_exc.OperationalError)
    @app.exception_handler(sa_exc.InterfaceError)
    @app.exception_handler(sa_exc.TimeoutError)
    async def _on_store_down(request: Request, exc: Exception) -> Response:
        # The store is unreachable (restarting, failing over, pool exhausted): the request
        # did nothing durable, so it is a 503 the client may retry, not a 500 -- and handled
        # here rather than by the catch-all, which would also close the connection.
        log.warning("store unavailable on %s %s: %s", request.method, request.url.path,
                    str(exc).splitlines()[0])  # fmt: skip
        return error_response(
            503, "store_unavailable", "the store is unreachable right now; retry the request",
            headers={"Retry-After": "1"},
        )  # fmt: skip

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> Response:
        if request.url.path.startswith("/personalizer/"):
            # Routing failures (e.g. 405 for an unknown method on a facade path) happen
            # before the facade's routes: answer them in Personalizer's shape too.
            from bandit_service.api.personalizer.errors import translate

            return translate(exc, "BadRequest")
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception) -> Response:
        incident = uuid.uuid4().hex[:12]
        path = redact_user_path(request.url.path)  # user ids never reach logs (issue 10)
        log.exception("unhandled error %s on %s %s", incident, request.method, path)
        request_id = REQUEST_ID.get()  # the request-context middleware is inside this one
        return error_response(
            500, "internal", f"internal error (incident {incident})",
            headers={"x-request-id": request_id} if request_id else None,
        )  # fmt: skip


def payload_too_large(max_bytes: int) -> Callable[[Scope], Response]:
    """The 413 answer for a body over ``max_bytes``, in the shape of the API the path
    belongs to; the request-context middleware (``ops/http.py``) sends it before the
    body is buffered whole."""
    message = f"request body exceeds {max_bytes} bytes (BANDIT_MAX_BODY_BYTES)"

    def answer(scope: Scope) -> Response:
        if str(scope.get("path", "")).startswith("/personalizer/"):
            from bandit_service.api.personalizer.errors import error_body

            return error_body(413, "PayloadSizeExceeded", message, "body")
        return error_response(413, "payload_too_large", message, "body")

    return answer
