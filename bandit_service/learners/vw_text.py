"""Render feature maps as Vowpal Wabbit text lines without letting data become syntax.

In VW's text format ``|`` starts a namespace, ``:`` separates a weight, and whitespace
separates features. Every feature name and string value therefore goes through
:func:`escape`, which percent-encodes anything outside a small safe alphabet (including
``%`` and ``=`` themselves, so the encoding is injective: two different features never
render to the same token). Unicode is encoded as UTF-8 bytes, so it reaches VW as data.

Namespace layout (the first letter is what ``-q``/``--interactions`` refer to):

* flat context features        -> namespace ``context``  (``c``)
* flat candidate features      -> namespace ``action``   (``a``)
* flat slot features and index -> namespace ``slot``     (``s``)
* a nested object ``{"user": {...}}`` -> a namespace named by its key (``u``)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import orjson

from bandit_service.domain import Candidate

CONTEXT_NAMESPACE = "context"
ACTION_NAMESPACE = "action"
SLOT_NAMESPACE = "slot"
NAMESPACE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-/+]")


def _encode_match(match: re.Match[str]) -> str:
    return "".join(f"%{byte:02X}" for byte in match.group().encode("utf-8"))


def escape(text: str) -> str:
    """Percent-encode every character that is not in ``[A-Za-z0-9_.-/+]``."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_encode_match, text)


def _format_number(value: float | int) -> str:
    return format(float(value), ".9g")


def _render_feature(name: str, value: Any, out: list[str]) -> None:
    key = escape(name)
    if isinstance(value, int | float):  # booleans too: true -> 1, false -> 0
        out.append(f"{key}:{_format_number(value)}")
    elif isinstance(value, str):
        out.append(f"{key}={escape(value)}")
    elif isinstance(value, list | tuple):
        out.extend(f"{key}={escape(item)}" for item in value)
    else:  # validated earlier; a programming error if reached
        raise TypeError(f"feature {name!r} has unsupported type {type(value).__name__}")


# Rendering caches for the shared line, which is rendered for every prediction and every
# learned event (escaping and formatting cost ~1 µs a feature, a sixth of the trainer's
# time per event). Both are exact and bounded like the line cache:
# * ``_STRING_TOKENS``: ``name=value`` by (name, value) for string values, which are
#   usually categories that repeat from event to event;
# * ``_NUMBER_PREFIXES``: ``escaped-name:`` by name, for numbers (often high-cardinality
#   values, so the value part is formatted each time: ~0.2 µs).
_STRING_TOKENS: dict[tuple[str, str], str] = {}
_NUMBER_PREFIXES: dict[str, str] = {}
_NAMESPACES_OK: set[str] = set()  # namespace names already checked against NAMESPACE_NAME
_CACHE_MAX = 200_000


def _tokens(features: Mapping[str, Any], out: list[str]) -> list[tuple[str, Any]]:
    """Append the tokens of ``features``' scalar values to ``out`` (same text as
    :func:`_render_feature`); return the nested ``(namespace, map)`` items, in order."""
    strings, prefixes = _STRING_TOKENS, _NUMBER_PREFIXES
    nested: list[tuple[str, Any]] = []
    for item in features.items():
        value = item[1]
        kind = type(value)
        if kind is str:
            token = strings.get(item)
            if token is None:
                token = f"{escape(item[0])}={escape(value)}"
                if len(strings) >= _CACHE_MAX:
                    strings.clear()
                strings[item] = token
            out.append(token)
        elif kind is float or kind is int or kind is bool:
            prefix = prefixes.get(item[0])
            if prefix is None:
                prefix = escape(item[0]) + ":"
                if len(prefixes) >= _CACHE_MAX:
                    prefixes.clear()
                prefixes[item[0]] = prefix
            # An f-string's format spec is ``format(value, ".9g")`` without the look-up
            # and call of the builtin: ~0.4 µs a number instead of ~1.1 µs (a 20-feature
            # context has 10), the same text (:func:`_format_number`).
            if kind is float:
                out.append(f"{prefix}{value:.9g}")
            else:
                out.append(f"{prefix}{float(value):.9g}")
        elif isinstance(value, Mapping):
            nested.append(item)
        else:
            _render_feature(item[0], value, out)
    return nested


def render_namespaces(features: Mapping[str, Any], default_namespace: str) -> str:
    """Render a (possibly one-level nested) feature map as `` |ns f … |ns2 g …``.

    Flat features come first (in the default namespace), then each nested namespace in
    order; within a namespace, features keep their order.
    """
    flat: list[str] = []
    nested = _tokens(features, flat)
    parts = [f" |{default_namespace} {' '.join(flat)}"] if flat else []
    for name, value in nested:
        if name not in _NAMESPACES_OK:
            if not NAMESPACE_NAME.match(name):
                raise ValueError(f"namespace name {name!r} must match {NAMESPACE_NAME.pattern}")
            if len(_NAMESPACES_OK) < _CACHE_MAX:
                _NAMESPACES_OK.add(name)
        tokens: list[str] = []
        deeper = _tokens(value, tokens)
        if deeper:  # one level of nesting only (validated earlier; a programming error)
            raise TypeError(f"feature {deeper[0][0]!r} has unsupported type dict")
        parts.append(f" |{name} {' '.join(tokens)}")
    return "".join(parts)


def render_context(context: Mapping[str, Any]) -> str:
    """The context's part of every shared line of a decision (`` |context … |user …``, or
    ``""`` for an empty context). It depends on the features only, not on the policy's VW
    arguments, so the engine's rendering is stored with the decision (``context_line``)
    and the trainer learns from it instead of decoding and rendering the context again."""
    if type(context) is RenderedContext:
        return context.line
    return render_namespaces(context, CONTEXT_NAMESPACE)


def shared_line(
    context: Mapping[str, Any], slot_index: int, slot_features: Mapping[str, Any]
) -> str:
    """The shared (context) line for one slot's decision: context plus the slot's features."""
    return shared_line_from(render_context(context), slot_index, slot_features)


def shared_line_from(context_line: str, slot_index: int, slot_features: Mapping[str, Any]) -> str:
    """:func:`shared_line` given the context's rendering (:func:`render_context`)."""
    slot_part = render_namespaces(slot_features, SLOT_NAMESPACE) if slot_features else ""
    return f"shared{context_line} |{SLOT_NAMESPACE} slot_index={slot_index}{slot_part}"


class RenderedContext(Mapping[str, Any]):
    """A logged context as the trainer reads it: its stored rendering (``line``, what
    :func:`render_context` returns for it) and its JSON text, decoded only if someone
    reads the features (learners other than VW, error messages).

    The rendering was made by the serving engine from the very features stored beside it
    (JSON keeps every value that renders: numbers exactly, key order, strings), so using
    it learns the same text, hence the same model, as rendering the decoded context.
    """

    __slots__ = ("_data", "_json", "line")

    def __init__(self, line: str, json_text: str | bytes) -> None:
        self.line = line
        self._json = json_text
        self._data: dict[str, Any] | None = None

    def _features(self) -> dict[str, Any]:
        if self._data is None:
            self._data = orjson.loads(self._json)
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._features()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._features())

    def __len__(self) -> int:
        return len(self._features())

    def __repr__(self) -> str:
        return f"RenderedContext({self.line!r})"


class ActionLineCache:
    """Rendered candidate lines, reused across requests and training events.

    Rendering a 10-feature candidate costs ~15 µs in Python and a page holds 50-500 of
    them, while a catalogue's candidates recur from request to request. One entry per
    candidate id holds the features it was rendered from; a hit needs them to be *equal*
    to the current ones. That is exact because values that compare equal render equally
    (``True``, ``1`` and ``1.0`` all render as ``:1``). Bounded: the cache is emptied when
    it reaches ``max_entries``.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._lines: dict[str, tuple[dict[str, Any], str]] = {}

    def line(self, candidate_id: str, features: Mapping[str, Any]) -> str:
        entry = self._lines.get(candidate_id)
        if entry is not None and entry[0] == features:
            return entry[1]
        if len(self._lines) >= self.max_entries:
            self._lines.clear()
        line = action_line(candidate_id, features)
        self._lines[candidate_id] = (dict(features), line)
        return line


def action_line(candidate_id: str, features: Mapping[str, Any], label: str = "") -> str:
    """One candidate's line; ``label`` is ``0:cost:probability`` on the chosen candidate.

    The candidate id is always a feature (``id=…`` in the ``action`` namespace), so that
    candidates described by their id alone can still be told apart and learned.
    """
    body = render_namespaces(features, ACTION_NAMESPACE)
    id_token = f"id={escape(candidate_id)}"
    prefix = f" |{ACTION_NAMESPACE} "
    if body.startswith(prefix):
        return f"{label}{prefix}{id_token} {body[len(prefix) :]}"
    return f"{label}{prefix}{id_token}{body}"


class EligibleCandidates(tuple[Candidate, ...]):
    """The candidates that were eligible for a logged slot, in their logged order.

    The trainer builds one per distinct (candidate set, eligibility) and reuses it for every
    event that had it, so the learner renders their action lines once and only splices the
    label into the chosen line per event (:meth:`labelled`), instead of ~50 cache look-ups
    and a 50-line join per event. Behaves as a plain tuple everywhere else.
    """

    position: dict[str, int]
    _lines: tuple[str, ...] | None
    _block: tuple[str, list[int]] | None

    def __new__(cls, candidates: Iterable[Candidate]) -> EligibleCandidates:
        self = super().__new__(cls, candidates)
        self.position = {c.id: i for i, c in enumerate(self)}
        self._lines = None
        self._block = None
        return self

    def lines(self) -> tuple[str, ...]:
        """The candidates' action lines (:func:`action_line`), rendered once; the tuple
        is also the key under which the learner keeps their parsed examples."""
        if self._lines is None:
            self._lines = tuple(action_line(c.id, c.features) for c in self)
        return self._lines

    def labelled(self, chosen: int, label: str) -> str:
        """The action lines joined by newlines, ``label`` in front of line ``chosen``: the
        same text as labelling :func:`action_line` output and joining it."""
        if self._block is None:
            lines = self.lines()
            starts, at = [], 0
            for line in lines:
                starts.append(at)
                at += len(line) + 1
            self._block = ("\n".join(lines), starts)
        block, starts = self._block
        at = starts[chosen]
        return f"{block[:at]}{label}{block[at:]}"
