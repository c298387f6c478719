"""Validation of feature maps: the types VW can take, with messages naming the feature."""

from __future__ import annotations

import math
from typing import Any

from pydantic_core import PydanticCustomError

from bandit_service.learners.vw_text import NAMESPACE_NAME

MAX_ABS_NUMBER = 1e15  # beyond this a feature value is almost surely a bug (or an id)
MAX_NAME_LENGTH = 256
MAX_STRING_LENGTH = 1024
MAX_FEATURES = 200
MAX_LIST_ITEMS = 100


def printable(text: str) -> str:
    """``text`` safe to put in an error message: a lone surrogate (which cannot be encoded
    as UTF-8, so a response naming it would fail) is shown escaped, e.g. ``\\ud800``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _bad(path: str, message: str) -> PydanticCustomError:
    path = printable(path)
    return PydanticCustomError(
        "feature_invalid", "{path}: {message}", {"path": path, "message": message}
    )


def text_problem(text: str) -> str | None:
    """Why a string cannot be stored or sent to VW, or None: NUL characters (PostgreSQL
    refuses them) and lone UTF-16 surrogates (not encodable as UTF-8)."""
    if "\x00" in text:
        return "must not contain NUL characters"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (no lone surrogates)"
    return None


def check_text(text: str) -> str:
    """Pydantic validator for identifiers and other free strings."""
    if (problem := text_problem(text)) is not None:
        raise PydanticCustomError("text_invalid", problem)
    return text


def _check_string(path: str, text: str) -> None:
    if len(text) > MAX_STRING_LENGTH:
        raise _bad(path, f"string longer than {MAX_STRING_LENGTH} characters")
    if (problem := text_problem(text)) is not None:
        raise _bad(path, problem)


def _check_value(path: str, value: Any) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, str):
        _check_string(path, value)
        return
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise _bad(path, "must be a finite number (NaN and infinity are refused)")
        if abs(value) > MAX_ABS_NUMBER:
            raise _bad(path, f"number out of range (|x| <= {MAX_ABS_NUMBER:g})")
        return
    if isinstance(value, list):
        if len(value) > MAX_LIST_ITEMS:
            raise _bad(path, f"list longer than {MAX_LIST_ITEMS} items")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise _bad(f"{path}[{i}]", "list features must hold strings only")
            _check_string(f"{path}[{i}]", item)
        return
    kind = "null" if value is None else type(value).__name__
    raise _bad(path, f"must be a string, number, boolean or list of strings, not {kind}")


def _check_name(path: str, name: str) -> None:
    if not name:
        raise _bad(path, "feature names must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise _bad(path, f"feature name longer than {MAX_NAME_LENGTH} characters")
    if (problem := text_problem(name)) is not None:
        raise _bad(path, f"feature name {problem}")


def _plain(text: str) -> bool:
    """The common case, checked fast: short ASCII without NUL cannot be wrong."""
    return text.isascii() and len(text) <= MAX_NAME_LENGTH and "\x00" not in text


def _fast_ok(features: dict[str, Any]) -> bool:
    """True when a flat map of short ASCII names to plain values needs no detailed check
    (a 500-candidate request spends most of its validation here)."""
    if len(features) > MAX_FEATURES:
        return False
    for name, value in features.items():
        if not name or not _plain(name):
            return False
        kind = type(value)
        if kind is str:
            if not _plain(value):
                return False
        elif kind is float:
            if not -MAX_ABS_NUMBER <= value <= MAX_ABS_NUMBER:  # NaN fails this too
                return False
        elif kind is int:
            if not -MAX_ABS_NUMBER <= value <= MAX_ABS_NUMBER:
                return False
        elif kind is not bool:
            return False
    return True


def check_features(features: dict[str, Any]) -> dict[str, Any]:
    """Accept ``name -> value`` or one level ``namespace -> {name -> value}``."""
    if _fast_ok(features):
        return features
    count = 0
    for name, value in features.items():
        _check_name(name, name)
        if isinstance(value, dict):
            if not NAMESPACE_NAME.match(name):
                raise _bad(name, f"namespace names must match {NAMESPACE_NAME.pattern}")
            for inner, inner_value in value.items():
                path = f"{name}.{inner}"
                _check_name(path, inner)
                if isinstance(inner_value, dict):
                    raise _bad(path, "only one level of namespace nesting is allowed")
                _check_value(path, inner_value)
                count += 1
        else:
            _check_value(name, value)
            count += 1
    if count > MAX_FEATURES:
        raise _bad("features", f"{count} features exceed the limit of {MAX_FEATURES}")
    return features
