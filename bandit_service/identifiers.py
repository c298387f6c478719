"""Refuse features that look like direct identifiers (e-mail addresses, phone numbers).

A feature such as ``{"email": "ana@example.com"}`` would put a person's identity in the
decision log and, through VW's feature hashing, in the model, where neither the keyed hash
of ``user_id`` nor deletion can reach it. Unless the policy sets
``allow_identifier_features = true``, such a request is refused with a 422 naming the
feature.

Speed: a 500-candidate request carries thousands of strings, and a Python loop over them
(or a regular expression tried at every position) costs milliseconds. The features are
serialised to JSON bytes once and scanned with C substring searches for the rare spots that
could start an identifier; only when one really is are the features walked in Python to
name the offending one.

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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import orjson

from bandit_service.domain import Candidate, DecisionRequest

_EMAIL = r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"
_INTERNATIONAL = r"\+[ (]*\d(?:[ ().\-]*\d){6,14}[ )]*"
_NATIONAL = r"\(?\d{2,5}\)?(?:[ .\-]+\(?\d{2,8}\)?){1,4}"
_PHONE_VALUE = re.compile(rf"(?:{_INTERNATIONAL}|{_NATIONAL})")
_EMAIL_RE = re.compile(_EMAIL)
# The fast scan works on the request's features serialised as JSON bytes (orjson, in C):
# bytes.translate maps digits and phone separators to "0" and quotes to "q", so a string
# value that starts with 7+ such characters shows as b"q0000000", found by a C substring
# search; "@" is found the same way. Only such rare spots are then decoded and checked.
_PHONE_CHARS = b"0123456789 ().-+"
_TRANSLATE = bytes(
    ord("0") if b in _PHONE_CHARS else ord("q") if b == ord('"') else ord("x") for b in range(256)
)
_PHONE_START = b"q0000000"


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


def _json_default(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(type(value).__name__)


def _string_at(data: bytes, inside: int) -> str:
    """The JSON string (name or value) around byte offset ``inside``."""
    start = data.rfind(b'"', 0, inside) + 1
    end = data.find(b'"', inside)
    return data[start : len(data) if end < 0 else end].decode("utf-8", "replace")


def _may_hold_identifier(data: bytes) -> bool:
    """False when no string in ``data`` (JSON) can be an e-mail address or phone number."""
    at = data.find(b"@")
    while at >= 0:
        if _EMAIL_RE.search(_string_at(data, at)):
            return True
        at = data.find(b"@", at + 1)
    mapped = data.translate(_TRANSLATE)
    hit = mapped.find(_PHONE_START)
    while hit >= 0:
        if identifier_kind(_string_at(data, hit + 1)) == "phone number":
            return True
        hit = mapped.find(_PHONE_START, hit + 1)
    return False


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
    a keyed hash).

    Candidates given as a kept set (``bandit_service/candidate_sets.py``) bring their own
    :class:`CandidatesScan`, made once per set: only the context and slots are scanned
    here, and the answer is the one the whole scan gives."""
    identifier_scan = getattr(request.candidates, "identifier_scan", None)
    if identifier_scan is not None:
        return _find_with_scan(request, identifier_scan())
    data = orjson.dumps(
        [request.context, [c.features for c in request.candidates],
         [s.features for s in request.slots]],
        default=_json_default,
    )  # fmt: skip
    user_id = request.user_id
    if user_id is not None and orjson.dumps(user_id) in data:
        found = _find_user_id(_maps(request), user_id)
        if found is not None:
            return found
    if not _may_hold_identifier(data):
        return None
    return _find_kind(_maps(request))


class CandidatesScan:
    """What :func:`find_identifier` learns from a candidate set alone, kept with the set.

    ``find_identifier`` pre-checks the request's JSON with substring searches and, only if
    one hits, walks every feature in order (context, candidates, slots) for the first
    identifier. The pre-check's answer on the whole request is the OR of its answers on
    the parts (a hit never spans two feature maps: it is one JSON string), so the
    candidates' part (``may_hold``) and their walk (:meth:`first`, which splits values on
    newlines as the walk does, so it may find what the pre-check did not) are kept, and
    the request's answer is unchanged, to the field it names."""

    def __init__(self, candidates: Sequence[Candidate], json_text: str) -> None:
        self._candidates = candidates
        self.json_text = json_text  # any JSON text holding the features as orjson writes them
        data = orjson.dumps([c.features for c in candidates], default=_json_default)
        self.may_hold = _may_hold_identifier(data)
        self._first: tuple[str, str] | bool | None = False  # False: not walked yet

    def first(self) -> tuple[str, str] | None:
        """The walk's first identifier in the candidates (request paths), or None."""
        if self._first is False:
            self._first = _find_kind(
                (f"candidates[{i}].features", c.features) for i, c in enumerate(self._candidates)
            )
        assert self._first is not True
        return self._first

    def found(self) -> tuple[str, str] | None:
        """:func:`find_identifier`'s answer for these candidates alone (no user id)."""
        return self.first() if self.may_hold else None


def _find_with_scan(request: DecisionRequest, scan: CandidatesScan) -> tuple[str, str] | None:
    """:func:`find_identifier` with the candidates' part taken from ``scan``."""
    data = orjson.dumps(
        [request.context, [s.features for s in request.slots]], default=_json_default
    )
    user_id = request.user_id
    if user_id is not None:
        needle = orjson.dumps(user_id)
        if needle in data or needle.decode() in scan.json_text:
            found = _find_user_id(_maps(request), user_id)
            if found is not None:
                return found
    if not scan.may_hold and not _may_hold_identifier(data):
        return None
    found = _find_kind([("context", request.context)])
    if found is None:
        found = scan.first()
    if found is None:
        found = _find_kind(
            (f"slots[{i}].features", slot.features) for i, slot in enumerate(request.slots)
        )
    return found


def _find_user_id(
    maps: Iterable[tuple[str, Mapping[str, Any]]], user_id: str
) -> tuple[str, str] | None:
    for path, features in maps:
        for field, text in _walk(path, features):
            if text == user_id:
                return field, "the raw user_id"
    return None


def _find_kind(maps: Iterable[tuple[str, Mapping[str, Any]]]) -> tuple[str, str] | None:
    for path, features in maps:
        for field, text in _walk(path, features):
            # A value with a newline was split in the joined scan: check its lines.
            for part in text.splitlines() if "\n" in text else [text]:
                kind = identifier_kind(part)
                if kind is not None:
                    return field, kind
    return None
