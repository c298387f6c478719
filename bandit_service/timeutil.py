"""Instants given by people: ISO 8601 (``2026-11-22``, ``2026-11-22T10:00:00Z``) or UNIX
seconds. Naive times are UTC."""

from __future__ import annotations

import datetime as dt
import math


def parse_instant(text: str) -> float:
    """UNIX seconds for ``text``; ``ValueError`` with a readable message otherwise."""
    value = text.strip()
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(number):
            raise ValueError(f"{text!r} is not a finite time")
        return number
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an ISO 8601 time (e.g. 2026-11-22T10:00:00Z) nor UNIX seconds"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()
