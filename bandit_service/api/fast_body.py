"""A fast decoder for the common decision request, with pydantic's model as the authority.

A 50-candidate x 10-feature request holds ~500 feature values. Validating them took ~20% of
a decision's CPU: pydantic-core parses the JSON quickly, but every feature map then goes
through ``check_features`` in Python (pydantic's own unions of constrained types were
slower still, ~0.6 µs per value). msgspec decodes *and* type-checks the whole body in C,
~95 µs against pydantic's ~420 µs for that request (docs/performance.md).

This module does not define what a valid request is: ``api/schemas.py`` does, and every
error answer still comes from it. :func:`decode_decision` accepts a strict subset of what
``DecisionIn`` accepts and returns the same values; for anything outside that subset it
returns None and the route takes FastAPI's path, which validates with pydantic and words
the error. The subset leaves out, so that no check is needed here:

* bodies containing ``\\u`` escapes (only an escape can put a NUL or a lone surrogate in
  a JSON string, which ``check_text``/``check_features`` refuse; raw UTF-8 is fine);
* namespaced features (``{"user": {"age": 1}}``) in candidates and slots; the context may
  have them (its namespace names and feature count are checked below, as
  ``check_features`` does);
* fields this decoder does not know (``forbid_unknown_fields``): a field added to
  ``DecisionIn`` and not here simply takes the pydantic path.

``tests/unit/test_fast_body.py`` checks the subset property on valid and invalid bodies.

**Inline candidates are kept.** A page's candidates usually repeat from request to request
(the same 50 items, a different context per user), and decoding their ~500 feature values
was most of this decoder's time. The body is decoded with ``candidates`` left as raw JSON
bytes (``msgspec.Raw``); those bytes are looked up in :data:`KEPT_SETS`, and only a miss
decodes them (``list[FastCandidate]``, the same constraints) and builds a
``candidate_sets.KeptCandidates``, which then also spares the rest of the decision path
its per-candidate work (see that module). Equal bytes decode to equal candidates, so a hit
means exactly what decoding would; what depends on the request or the key (limits,
duplicate ids, identifier rules per policy) is still checked per request downstream. The
same subset holds: a candidates array that does not decode returns None, as before (it
is not kept: errors are always worded by pydantic).

**A kept set is found where it stands.** A body without a backslash whose
``"candidates":`` is followed by a kept set's bytes (``KeptSetCache.find_at``, by the
first 64 bytes, then compared whole) is decoded with ``null`` spliced in the set's place:
msgspec then parses ~0.7 kB instead of ~6.7 and nothing hashes the set, 12 -> 5.4 µs per
50 x 10 body (see :func:`_with_kept_candidates` for why it means the same;
``tests/unit/test_route_cpu_kept_splice.py``).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta
from msgspec.structs import astuple

from bandit_service.api.features import (
    MAX_ABS_NUMBER,
    MAX_FEATURES,
    MAX_LIST_ITEMS,
    MAX_NAME_LENGTH,
    MAX_STRING_LENGTH,
)
from bandit_service.candidate_sets import KeptCandidates, KeptSetCache
from bandit_service.domain import Candidate
from bandit_service.learners.vw_text import NAMESPACE_NAME

# The same bounds as api/schemas.py and api/features.py. Patterns end in \Z: ``$`` would
# also match before a final newline, which pydantic's (Rust) regular expressions refuse.
_Identifier = Annotated[str, Meta(min_length=1, max_length=256)]
_EventId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9._:\-]{1,128}\Z")]
_Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_LENGTH)]
_Text = Annotated[str, Meta(max_length=MAX_STRING_LENGTH)]
_Value = (
    bool
    | Annotated[int, Meta(ge=-int(MAX_ABS_NUMBER), le=int(MAX_ABS_NUMBER))]
    | Annotated[float, Meta(ge=-MAX_ABS_NUMBER, le=MAX_ABS_NUMBER)]
    | _Text
    | Annotated[list[_Text], Meta(max_length=MAX_LIST_ITEMS)]
)
_FlatFeatures = Annotated[dict[_Name, _Value], Meta(max_length=MAX_FEATURES)]
_Context = Annotated[
    dict[_Name, _Value | Annotated[dict[_Name, _Value], Meta(max_length=MAX_FEATURES)]],
    Meta(max_length=MAX_FEATURES),
]


class _Strict(msgspec.Struct, forbid_unknown_fields=True):
    pass


class FastCandidate(_Strict):
    id: _Identifier
    features: _FlatFeatures = msgspec.field(default_factory=dict)


class FastSlot(_Strict):
    id: _Identifier
    features: _FlatFeatures = msgspec.field(default_factory=dict)
    baseline: _Identifier | None = None


class FastPin(_Strict):
    id: _Identifier
    slot: Annotated[int, Meta(ge=0, le=10_000)]


class _Fields(_Strict):
    """``DecisionIn``'s fields but ``candidates``, with the same names."""

    candidate_ids: Annotated[list[_Identifier], Meta(max_length=10_000)] | None = None
    policy: _Identifier = "default"
    user_id: _Identifier | None = None
    context: _Context = msgspec.field(default_factory=dict)
    slots: (
        Annotated[int, Meta(ge=1, le=10_000)]
        | Annotated[list[FastSlot], Meta(max_length=10_000)]
        | None
    ) = None
    excluded: Annotated[list[_Identifier], Meta(max_length=10_000)] = msgspec.field(
        default_factory=list
    )
    event_id: _EventId | None = None
    defer: bool = False
    personalize: bool = True
    pins: Annotated[list[FastPin], Meta(max_length=10_000)] = msgspec.field(default_factory=list)


_NULL = msgspec.Raw(b"null")


class _Body(_Fields):
    """What is decoded: ``candidates`` as its raw JSON (``null`` when absent)."""

    candidates: msgspec.Raw = _NULL


class FastDecision(_Fields):
    """``DecisionIn``'s fields, with the same names, so the route reads either: the
    candidates, when given, as a (possibly shared) kept set. Never decoded directly."""

    candidates: KeptCandidates | None = None


_DECISION = msgspec.json.Decoder(_Body)
_CANDIDATES = msgspec.json.Decoder(list[FastCandidate])
# Inline candidate sets of this process, by their raw JSON. Module-level: each worker
# process has its own, and in the service only the event loop's thread uses it.
KEPT_SETS = KeptSetCache()


def decode_decision(body: bytes) -> FastDecision | None:
    """The request in ``body``, or None when it is not in the fast subset (see the module
    docstring): the caller then validates it with ``DecisionIn``."""
    # A one-byte search runs as memchr (~0.2 µs for a 6.7 kB 50 x 10 body); CPython's
    # search for the two bytes ``\u`` walks the body at ~1 ns a byte (6 µs). Most bodies
    # have no backslash at all; one that has is searched for ``\u`` as before.
    if body.find(b"\\") >= 0:
        if b"\\u" in body:
            return None
    else:
        known = _with_kept_candidates(body)
        if known is not None:
            return known
    try:
        decision = _DECISION.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    if not _namespaces_ok(decision.context):
        return None
    *fields, raw = astuple(decision)  # the same fields, in the same order; candidates last
    if raw == _NULL:
        return FastDecision(*fields)
    candidates = kept_candidates(bytes(raw))
    if candidates is None:
        return None
    fields.append(candidates)
    return FastDecision(*fields)


_KEY = b'"candidates":'
_NAME = b'"candidates"'


def _with_kept_candidates(body: bytes) -> FastDecision | None:
    """The request in ``body`` (which holds no backslash) when its candidates are a kept
    set written right after ``"candidates":``, and that key is in the body once; else
    None, and the caller decodes the body as usual.

    msgspec has to parse the candidates' JSON only to find where it ends (~5 of the ~7.4
    µs a 50 x 10 body's decoding takes), and the cache then hashes those bytes (~1.5 µs):
    here the kept set is found by the bytes at that spot instead, and only the rest of the
    body is decoded, with ``null`` in the candidates' place. That means what decoding the
    whole body means: without a backslash every ``"`` delimits a string, so
    ``"candidates":`` is a key, and the parser reaches the set's first byte expecting that
    key's value; the set is one complete JSON value, so the parser reads exactly those
    bytes as it, and the same bytes follow. If that key is the body's own field, the
    result has the kept set's meaning; if it is nested (a context or slot feature), the
    ``null`` there does not decode, and neither does a repeated key: the usual path then
    decodes the whole body (and the same failures refuse it there, or it is valid). A
    repeated key after the set is looked for by its name alone (whitespace may come before
    its colon), so it always takes the usual path."""
    at = body.find(_KEY)
    if at < 0:
        return None
    start = at + len(_KEY)
    found = KEPT_SETS.find_at(body, start)
    if found is None:
        return None
    raw, kept = found
    end = start + len(raw)
    # The name alone, not ``_KEY``: JSON allows whitespace before the colon, and a later
    # ``"candidates" :null`` would win over the set in a whole-body decode while the
    # spliced ``null`` below could not tell (found in review). A later string value
    # "candidates" only costs the usual path.
    if body.find(_NAME, end) >= 0:
        return None
    try:
        decision = _DECISION.decode(body[:start] + b"null" + body[end:])
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    *fields, spliced = astuple(decision)
    if spliced != _NULL or not _namespaces_ok(decision.context):
        return None
    fields.append(kept)
    return FastDecision(*fields)


def kept_candidates(raw: bytes) -> KeptCandidates | None:
    """The candidates whose JSON is ``raw`` (from a body without ``\\u`` escapes), kept
    from an earlier request or decoded now; None when they are outside the fast subset."""
    found = KEPT_SETS.get(raw)
    if found is not None:
        return found
    try:
        decoded = _CANDIDATES.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    kept = KeptCandidates([Candidate(c.id, c.features) for c in decoded])
    KEPT_SETS.put(raw, kept)
    return kept


def _namespaces_ok(features: dict[str, Any]) -> bool:
    """``check_features``' rules that a type cannot say: a nested map's key must be a
    namespace name, and namespace members count towards the feature limit."""
    count = 0
    for name, value in features.items():
        if type(value) is dict:
            if not NAMESPACE_NAME.match(name):
                return False
            count += len(value)
        else:
            count += 1
    return count <= MAX_FEATURES
