"""Refuse features that look like direct identifiers (e-mail addresses, phone numbers).

A feature such as ``{"email": "ana@example.com"}`` would put a person's identity in the
decision log and, through VW's feature hashing, in the model, where neither the keyed hash
of ``user_id`` nor deletion can reach it. Unless the policy sets
``allow_identifier_features = true``, such a request is refused with a 422 naming the
feature.

Speed: a 500-candidate request carries thousands of strings. Every feature name and string
value is joined into one text and scanned by one compiled regular expression (in C); only
when it matches are the features walked again to name the offending one.

What counts (deliberately narrow, to avoid refusing ordinary values):

* the request's own ``user_id`` as a feature name or string value (it would defeat hashing);
* e-mail: ``local@domain.tld`` anywhere in a name or value (RFC 5322's common form);
* phone: a whole value that is an international number (``+`` then 7-15 digits, E.164) or
  a national one with separators (10-15 digits grouped by spaces, dots, dashes or
  parentheses, e.g. ``(555) 123-4567``, ``0151 2345 6789``). Bare digit strings are not
  refused: they are more often product codes than phone numbers, and numbers are features.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from bandit_service.domain import DecisionRequest

_EMAIL = r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"
_INTERNATIONAL = r"\+[ (]*\d(?:[ ().\-]*\d){6,14}[ )]*"
_NATIONAL = r"\(?\d{2,5}\)?(?:[ .\-]+\(?\d{2,8}\)?){1,4}"
_PHONE_VALUE = re.compile(rf"(?:{_INTERNATIONAL}|{_NATIONAL})")
_EMAIL_RE = re.compile(_EMAIL)
# One pass over the joined text; values are joined by newlines, so ^ and $ bound a value.
_ANY = re.compile(rf"{_EMAIL}|^(?:{_INTERNATIONAL}|{_NATIONAL})$", re.MULTILINE)


def identifier_kind(text: str) -> str | None:
    """``"e-mail address"``, ``"phone number"`` or None for one name or value."""
    if _EMAIL_RE.search(text):
        return "e-mail address"
    if _PHONE_VALUE.fullmatch(text.strip()) and _phone_digits_ok(text):
        return "phone number"
    return None


def _phone_digits_ok(text: str) -> bool:
    digits = sum(ch.isdigit() for ch in text)
    if text.lstrip().startswith("+"):
        return 7 <= digits <= 15
    return 10 <= digits <= 15


def _strings(features: Mapping[str, Any], out: list[str]) -> None:
    for name, value in features.items():
        out.append(name)
        kind = type(value)
        if kind is str:
            out.append(value)
        elif kind is list:
            out.extend(value)
        elif isinstance(value, Mapping):
            _strings(value, out)


def _maps(request: DecisionRequest) -> Iterator[tuple[str, Mapping[str, Any]]]:
    yield "context", request.context
    for i, candidate in enumerate(request.candidates):
        yield f"candidates[{i}].features", candidate.features
    for i, slot in enumerate(request.slots):
        yield f"slots[{i}].features", slot.features


def _walk(path: str, features: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(field path, text) for every name and string value of a feature map."""
    for name, value in features.items():
        here = f"{path}.{name}"
        yield here, name
        if isinstance(value, str):
            yield here, value
        elif isinstance(value, list):
            for j, item in enumerate(value):
                yield f"{here}[{j}]", item
        elif isinstance(value, Mapping):
            yield from _walk(here, value)


def find_identifier(request: DecisionRequest) -> tuple[str, str] | None:
    """(field path, kind) of the first feature that looks like a direct identifier, or whose
    name or string value is the request's raw ``user_id`` (which must only ever be stored as
    a keyed hash)."""
    texts: list[str] = []
    for _path, features in _maps(request):
        _strings(features, texts)
    user_id = request.user_id
    if user_id is not None and user_id in texts:
        for path, features in _maps(request):
            for field, text in _walk(path, features):
                if text == user_id:
                    return field, "the raw user_id"
    joined = "\n".join(texts)
    if _ANY.search(joined) is None:
        return None
    for path, features in _maps(request):
        for field, text in _walk(path, features):
            # A value with a newline was split in the joined scan: check its lines.
            for part in text.splitlines() if "\n" in text else [text]:
                kind = identifier_kind(part)
                if kind is not None:
                    return field, kind
    return None
