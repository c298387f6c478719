"""Structured logs: one JSON object per line, with the request id of the request it is about.

Every record becomes ``{"ts", "level", "logger", "message", ...}`` plus whatever the call
passed in ``extra=`` (``event``, ``event_id``, ``policy``, ``arm``, ``model_version``...)
and ``request_id`` when it was logged while handling a request. Exceptions go in one
``exc`` field, so a traceback never breaks the one-line-per-event rule.

No personal data: the service logs event ids, policies, arms, versions and counts. A user
id is never passed to a log call (only its keyed hash is stored, and that is not logged
either); client addresses and query strings are not logged (uvicorn's access log is off;
the service's own request lines carry the route template, status and duration).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import logging.config
from typing import Any

import orjson

LEVELS = ("debug", "info", "warning", "error", "critical")
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's coloured duplicate of the message
    "taskName",
}


def _install_request_id_factory() -> None:
    """Stamp each record with the current request id when it is *created* (in the request's
    context), not when a handler formats it, which may happen elsewhere."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_adds_request_id", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        request_id = REQUEST_ID.get()
        if request_id is not None:
            record.request_id = request_id
        return record

    factory._adds_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


_install_request_id_factory()


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        return orjson.dumps(entry, default=str).decode()


def dict_config(level: str) -> dict[str, Any]:
    """``logging.config.dictConfig`` for every process: the root logger and uvicorn's
    loggers write JSON lines to stderr at ``level`` (BANDIT_LOG_LEVEL)."""
    upper = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": upper},
        "loggers": {
            "uvicorn": {"handlers": [], "level": upper, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": upper, "propagate": True},
            # Client addresses and raw paths: the service logs its own request lines.
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "alembic": {"level": "WARNING"},
        },
    }


def configure(level: str) -> None:
    """Apply :func:`dict_config` in this process, but add to the root logger's handlers
    rather than replace them: handlers someone else attached (a test's log capture, an
    embedding application's) keep working; a previous JSON handler of ours is replaced."""
    root = logging.getLogger()
    others = [h for h in root.handlers if not getattr(h, "_bandit_json", False)]
    logging.config.dictConfig(dict_config(level))
    for handler in root.handlers:
        handler._bandit_json = True  # type: ignore[attr-defined]
    for handler in others:
        root.addHandler(handler)
