"""Personalizer's error body, ``{"error": {"code", "message"}}``, for the facade's routes only.

The facade's routes use :class:`PersonalizerRoute`, which turns every failure raised while
handling the request (body parsing, dependencies such as authentication, the service) into
Personalizer's shape and codes. Bad input is always a 4xx: the official clients retry 5xx.
Native ``/v1`` routes keep the service's own error handlers.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from bandit_service.api.auth import AuthError
from bandit_service.api.errors import STATUS, field_path
from bandit_service.errors import NotFound, ServiceError, Unavailable
from bandit_service.personalizer.configuration import ConfigurationError
from bandit_service.personalizer.features import FeatureError

log = logging.getLogger(__name__)

_HTTP_CODES = {401: "Unauthorized", 403: "Forbidden", 404: "ResourceNotFound",
               405: "BadRequest", 413: "PayloadSizeExceeded", 429: "TooManyRequests"}  # fmt: skip


class PersonalizerError(Exception):
    """A Personalizer error with an explicit status and code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_body(status: int, code: str, message: str, target: str | None = None) -> Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if target:
        error["target"] = target
    return Response(
        orjson.dumps({"error": error}),
        status,
        media_type="application/json",
        headers={"x-ms-error-code": code},
    )


def _validation(exc: RequestValidationError, invalid_code: str) -> Response:
    errors = list(exc.errors())
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        reason = (bad_json.get("ctx") or {}).get("error", "invalid JSON")
        return error_body(400, "BadRequest", f"the request body is not valid JSON: {reason}")
    first = max(errors, key=lambda e: len(field_path(e.get("loc", ()))))
    path = field_path(first.get("loc", ()))
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "missing" and path == "body":
        message = "a JSON request body is required"
    return error_body(400, invalid_code, f"{path}: {message}", path)


def translate(exc: Exception, invalid_code: str) -> Response:
    """The Personalizer response for ``exc``; unexpected errors are logged and a 500."""
    if isinstance(exc, PersonalizerError):
        return error_body(exc.status, exc.code, exc.message)
    if isinstance(exc, RequestValidationError):
        return _validation(exc, invalid_code)
    if isinstance(exc, AuthError):  # keys, scopes, per-key limits (headers: Retry-After...)
        code, status = (invalid_code, 400) if exc.status == 422 else (
            _HTTP_CODES.get(exc.status, "BadRequest"), exc.status)  # fmt: skip
        response = error_body(status, code, exc.message, exc.field)
        response.headers.update(exc.headers or {})
        return response
    if isinstance(exc, FeatureError | ConfigurationError):
        return error_body(400, invalid_code, str(exc), exc.path if isinstance(
            exc, FeatureError) else exc.field)  # fmt: skip
    if isinstance(exc, ServiceError):
        status = next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 400)
        if isinstance(exc, NotFound):
            code = "ResourceNotFound"
        elif isinstance(exc, Unavailable):
            code = "ServiceUnavailable"
        elif status in _HTTP_CODES:
            code = _HTTP_CODES[status]
        else:
            code, status = (invalid_code, 400) if status in (409, 422) else (exc.code, status)
        message = f"{exc.field}: {exc.message}" if exc.field and status == 400 else exc.message
        return error_body(status, code, message, exc.field)
    if isinstance(exc, StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "BadRequest")
        return error_body(exc.status_code, code, str(exc.detail))
    incident = uuid.uuid4().hex[:12]
    log.error("personalizer facade: unhandled error %s", incident, exc_info=exc)
    return error_body(500, "InternalServerError", f"internal error (incident {incident})")


class PersonalizerRoute(APIRoute):
    """An APIRoute whose failures come out in Personalizer's error shape. The route's
    ``openapi_extra["x-invalid-code"]`` names the code for invalid input (e.g.
    ``InvalidRankRequest``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        invalid_code = (self.openapi_extra or {}).get("x-invalid-code", "BadRequest")

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return translate(exc, invalid_code)

        return guarded
