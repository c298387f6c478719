"""Domain errors. Each names the request field at fault; the API maps them to 4xx codes."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: ``code`` is machine-readable, ``field`` points into the request."""

    code = "error"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidRequest(ServiceError):
    code = "invalid_request"


class UnknownPolicy(ServiceError):
    code = "unknown_policy"


class NotFound(ServiceError):
    code = "not_found"


class Conflict(ServiceError):
    code = "conflict"


class Unavailable(ServiceError):
    code = "unavailable"
