"""The decision route's fast decoder (msgspec) must accept only what ``DecisionIn`` accepts,
and mean the same by it; everything else it leaves to pydantic, which words the error."""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from bandit_service.api import fast_body
from bandit_service.api.fast_body import FastDecision, decode_decision
from bandit_service.api.schemas import DecisionIn
from bandit_service.candidate_sets import KeptCandidates, KeptSetCache


def _plain(value: Any) -> Any:
    """A request as nested plain values with their types, dict order kept (it reaches VW
    and the log): a msgspec struct and a pydantic model with equal fields compare equal."""
    fields = getattr(value, "__struct_fields__", None) or getattr(type(value), "model_fields", None)
    if dataclasses.is_dataclass(value):  # a kept set's Candidate
        fields = [f.name for f in dataclasses.fields(value)]
    if fields is not None:
        return {name: _plain(getattr(value, name)) for name in sorted(fields)}
    if isinstance(value, dict):
        return [(k, _plain(v)) for k, v in value.items()]
    if isinstance(value, list | tuple):  # a kept set is a tuple
        return [_plain(v) for v in value]
    return value, type(value).__name__


def _authority(body: bytes) -> DecisionIn | None:
    """What FastAPI's path makes of ``body``: the validated request, or None (an error)."""
    try:
        return DecisionIn.model_validate_json(body)
    except ValidationError:
        try:
            return DecisionIn.model_validate(json.loads(body))
        except (ValidationError, ValueError):
            return None


def _check(body: bytes) -> FastDecision | None:
    """The fast decoder's answer, asked twice: the second time its candidates (if any)
    come from the kept sets, and must mean the same."""
    fast = decode_decision(body)
    again = decode_decision(body)
    assert (fast is None) == (again is None), body[:300]
    if fast is not None:
        assert again is not None
        slow = _authority(body)
        assert slow is not None, f"fast path accepted what DecisionIn refuses: {body[:300]!r}"
        assert _plain(fast) == _plain(slow) == _plain(again), body[:300]
        assert again.candidates is fast.candidates  # kept: the same set, not a copy
    return fast


COMMON = [
    b'{"candidates": [{"id": "a", "features": {"x": 1, "y": 2.5, "z": "s", "b": true}}]}',
    b'{"candidates": [{"id": "a", "features": {"l": ["u", "v"], "n": -0, "f": -0.0}}],'
    b' "context": {"device": "mobile", "user": {"age": 33}}, "slots": 1, "event_id": "e-1"}',
    '{"candidates": [{"id": "é😀", "features": {"t": "ünïcode ✓"}}]}'.encode(),
    b'{"candidates": [{"id": "a"}], "slots": [{"id": "top", "features": {"w": 1},'
    b' "baseline": "a"}], "defer": true, "personalize": false}',
    b'{"candidates": [{"id": "a", "features": {"n": 1000000000000000, "m": -1e15}}],'
    b' "excluded": ["b"], "pins": [{"id": "a", "slot": 0}], "user_id": "u-1",'
    b' "policy": "default", "event_id": null, "slots": null}',
    b'{"candidates": [{"id": "a", "features": {"x": 1, "y": 2, "x": 3}}], "slots": 2,'
    b' "slots": 1}',  # repeated keys: the last wins, in the first one's place, both ways
    b'{"candidates": [{"id": "a", "features": {"t": "tab\\tnew\\nline \\"q\\" \\\\ /"}}]}',
    b' {"candidates":[{"id":"a","features":{"e":1E2,"g":2.5e-3}}]}\n',
    b'{"context": {}}',  # no candidates: the policy's catalog
    b'{"candidate_ids": ["a", "b"], "slots": 1}',
]


@pytest.mark.parametrize("body", COMMON)
def test_common_bodies_take_the_fast_path_and_mean_the_same(body: bytes) -> None:
    assert _check(body) is not None


LEFT_TO_PYDANTIC = [  # valid, but outside the fast subset
    b'{"candidates": [{"id": "a", "features": {"ns": {"p": 1}}}]}',  # namespace in a candidate
    b'{"candidates": [{"id": "a", "features": {"t": "\\u00e9"}}]}',  # a \\u escape
]
INVALID = [
    b"",
    b"[]",
    b"{",
    b'{"candidates": []} trailing',
    b'{"candidates": [{"id": "a", "features": {"x": NaN}}]}',
    b'{"candidates": [{"id": "a", "features": {"x": Infinity}}]}',
    b'{"candidates": [{"id": "a", "features": {"x": 1e400}}]}',
    b'{"candidates": [{"id": "a", "features": {"x": 1e16}}]}',
    b'{"candidates": [{"id": "a", "features": {"x": 10000000000000001}}]}',
    b'{"candidates": [{"id": "a", "features": {"x": 123456789012345678901234567890}}]}',
    b'{"candidates": [{"id": "a", "features": {"x": null}}]}',
    b'{"candidates": [{"id": "a", "features": {"x": [1]}}]}',
    b'{"candidates": [{"id": "a", "features": {"x": [["a"]]}}]}',
    b'{"candidates": [{"id": "a", "features": {"": 1}}]}',
    b'{"candidates": [{"id": "a", "features": {"t": "\\u0000"}}]}',
    b'{"candidates": [{"id": "a", "features": {"t": "\\ud800"}}]}',
    b'{"candidates": [{"id": "\\u0000"}]}',
    b'{"candidates": [{"id": 1, "features": {}}]}',
    b'{"candidates": [{"id": ""}]}',
    b'{"candidates": [{"id": "a", "extra": 1}]}',
    b'{"candidates": [{"id": "a"}], "unknown": 1}',
    b'{"candidates": [{"id": "a"}], "slots": 0}',
    b'{"candidates": [{"id": "a"}], "slots": 10001}',
    b'{"candidates": [{"id": "a"}], "slots": true}',
    b'{"candidates": [{"id": "a"}], "slots": 1.0}',
    b'{"candidates": [{"id": "a"}], "slots": [{"id": "s", "features": {"x": null}}]}',
    b'{"candidates": [{"id": "a"}], "defer": 1}',
    b'{"candidates": [{"id": "a"}], "personalize": null}',
    b'{"candidates": [{"id": "a"}], "event_id": "e 1"}',
    b'{"candidates": [{"id": "a"}], "event_id": "e1\\n"}',  # `$` would allow this newline
    b'{"candidates": [{"id": "a"}], "event_id": ""}',
    b'{"candidates": [{"id": "a"}], "pins": [{"id": "a", "slot": -1}]}',
    b'{"candidates": [{"id": "a"}], "pins": [{"id": "a", "slot": false}]}',
    b'{"candidates": [{"id": "a"}], "excluded": [1]}',
    b'{"candidates": [{"id": "a"}], "policy": null}',
    b'{"candidates": [{"id": "a"}], "context": {"bad-ns": {"x": 1}}}',
    b'{"candidates": [{"id": "a"}], "context": {"ns": {"deep": {"x": 1}}}}',
]


@pytest.mark.parametrize("body", LEFT_TO_PYDANTIC + INVALID)
def test_everything_else_is_left_to_pydantic(body: bytes) -> None:
    assert decode_decision(body) is None


def test_limits_are_the_schemas_to_the_unit() -> None:
    def body(features: dict[str, Any], **extra: Any) -> bytes:
        return orjson.dumps({"candidates": [{"id": "a", "features": features}], **extra})

    at_limit = {
        "names": {"n" * 256: 1},
        "strings": {"s": "v" * 1024},
        "lists": {"l": ["v"] * 100},
        "count": {f"f{i}": i for i in range(200)},
    }
    over = {
        "names": {"n" * 257: 1},
        "strings": {"s": "v" * 1025},
        "lists": {"l": ["v"] * 101},
        "count": {f"f{i}": i for i in range(201)},
    }
    for what in at_limit:
        assert _check(body(at_limit[what])) is not None, what
        assert decode_decision(body(over[what])) is None, what
        assert _authority(body(over[what])) is None, what
    nested = {"c": 1, "ns": {f"f{i}": i for i in range(199)}}
    assert _check(body({}, context=nested)) is not None
    nested["ns"]["one_more"] = 1  # type: ignore[index]
    assert decode_decision(body({}, context=nested)) is None
    assert _authority(body({}, context=nested)) is None


def _random_value(rng: random.Random) -> Any:
    return rng.choice(
        [
            lambda: rng.random() * 10 ** rng.randint(-5, 17) * rng.choice([1, -1]),
            lambda: rng.randint(-(10**16), 10**16),
            lambda: rng.choice([True, False, None, "", "x" * rng.choice([3, 1024, 1025])]),
            lambda: [rng.choice(["a", "b", 1, "é"]) for _ in range(rng.choice([0, 2, 100, 101]))],
            lambda: {"k": rng.choice([1, "v", {"deep": 1}])},
            lambda: "".join(rng.choice('aé ✓\t\n"\\/{}') for _ in range(rng.randint(0, 8))),
        ]
    )()


def _features(rng: random.Random) -> dict[str, Any]:
    names = ["x", "y", "ns", "", "é"]
    return {rng.choice(names): _random_value(rng) for _ in range(rng.randint(0, 4))}


def test_random_bodies_never_mean_something_else_on_the_fast_path() -> None:
    """Seeded fuzzing: whatever the fast decoder accepts, DecisionIn accepts identically."""
    rng = random.Random(20261122)
    accepted = 0
    for _ in range(1500):
        body: dict[str, Any] = {
            "candidates": [
                {"id": rng.choice(["a", "b", "é", ""]) + str(i), "features": _features(rng)}
                for i in range(rng.randint(0, 3))
            ]
        }
        if rng.random() < 0.5:
            body["context"] = {rng.choice(["c", "ns", "b-d"]): _random_value(rng)}
        if rng.random() < 0.3:
            body["slots"] = rng.choice([1, 0, 3, True, [{"id": "s"}], None, 2.0])
        if rng.random() < 0.2:
            body["event_id"] = rng.choice(["e-1", "e 1", "", "e\n"])
        data = orjson.dumps(body)
        if rng.random() < 0.1:
            data = data.replace(b"}", b"", 1)
        accepted += _check(data) is not None
    assert accepted > 100  # the generator does reach the fast path


def test_the_fast_decoder_knows_every_field_of_the_schema() -> None:
    """A field added to DecisionIn but not to FastDecision still works (such bodies take
    pydantic's path) but loses the fast path: add it to api/fast_body.py too."""
    assert set(FastDecision.__struct_fields__) == set(DecisionIn.model_fields)


# -- kept candidate sets (bandit_service/candidate_sets.py) ------------------------------------
@pytest.fixture
def kept_sets(monkeypatch: pytest.MonkeyPatch) -> KeptSetCache:
    cache = KeptSetCache()
    monkeypatch.setattr(fast_body, "KEPT_SETS", cache)
    return cache


def _body(candidates: Any, **fields: Any) -> bytes:
    return orjson.dumps({"candidates": candidates, **fields})


def test_repeated_candidates_are_decoded_once(kept_sets: KeptSetCache) -> None:
    pool = [{"id": f"c{i}", "features": {"x": i, "t": "s"}} for i in range(5)]
    first = decode_decision(_body(pool, context={"u": 1}))
    second = decode_decision(_body(pool, context={"u": 2}, policy="other", slots=2))
    assert first is not None and second is not None
    assert isinstance(first.candidates, KeptCandidates)
    assert second.candidates is first.candidates  # the same set, however the rest differs
    assert (second.context, second.policy, second.slots) == ({"u": 2}, "other", 2)
    assert (kept_sets.hits, kept_sets.misses, len(kept_sets)) == (1, 1, 1)


@pytest.mark.parametrize(
    "other, same_log",
    [
        ([{"id": "a", "features": {"x": 1.0}}], False),  # a float: another type, another log
        ([{"id": "a", "features": {"x": True}}], False),
        ([{"id": "a", "features": {"x": "1"}}], False),
        ([{"id": "b", "features": {"x": 1}}], False),
        ([{"id": "a", "features": {"x": 1, "y": 1}}], False),
        ([{"id": "a", "features": {"x": 1}}] * 2, False),  # a duplicate (refused per request)
        ([{"features": {"x": 1}, "id": "a"}], True),  # the same candidates in other bytes
    ],
)
def test_candidates_that_differ_are_not_confused(
    kept_sets: KeptSetCache, other: Any, same_log: bool
) -> None:
    one = decode_decision(_body([{"id": "a", "features": {"x": 1}}], context={"c": 1}))
    two = decode_decision(_body(other, context={"c": 1}))
    assert one is not None and two is not None
    assert one.candidates is not None and two.candidates is not None
    assert one.candidates is not two.candidates and len(kept_sets) == 2
    assert _plain(two) == _plain(_authority(_body(other, context={"c": 1})))
    same = one.candidates.logged.content_key == two.candidates.logged.content_key
    assert same == same_log


def test_whitespace_makes_another_entry_with_the_same_log(kept_sets: KeptSetCache) -> None:
    compact = decode_decision(b'{"candidates":[{"id":"a","features":{"x":1}}]}')
    spaced = decode_decision(b'{"candidates": [ {"id": "a", "features": {"x": 1}} ] }')
    assert compact is not None and spaced is not None
    assert compact.candidates is not spaced.candidates and len(kept_sets) == 2
    assert compact.candidates is not None and spaced.candidates is not None
    assert compact.candidates.logged.content_key == spaced.candidates.logged.content_key


def test_candidates_outside_the_subset_are_never_kept(kept_sets: KeptSetCache) -> None:
    for body in (
        b'{"candidates": [{"id": "a", "features": {"ns": {"p": 1}}}]}',
        b'{"candidates": [{"id": "a", "features": {"x": null}}]}',
        b'{"candidates": [{"id": ""}]}',
        b'{"candidates": {"id": "a"}}',
        b'{"candidates": "a"}',
    ):
        assert decode_decision(body) is None and decode_decision(body) is None
    assert len(kept_sets) == 0
    # Refused elsewhere in the body: its (valid) candidates may be kept, nothing else.
    assert decode_decision(b'{"candidates": [{"id": "a"}], "slots": 0}') is None
    assert decode_decision(b'{"candidates": null}') == FastDecision()


def test_the_kept_sets_stay_within_their_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = KeptSetCache(max_bytes=10**9, max_entries=3)
    monkeypatch.setattr(fast_body, "KEPT_SETS", cache)
    sets = []
    for i in range(5):
        decision = decode_decision(_body([{"id": f"c{i}"}]))
        assert decision is not None
        sets.append(decision.candidates)
    assert len(cache) == 3
    again = decode_decision(_body([{"id": "c0"}]))  # evicted: decoded anew, equal
    assert again is not None and again.candidates == sets[0]
    assert again.candidates is not sets[0]
    kept = decode_decision(_body([{"id": "c4"}]))
    assert kept is not None and kept.candidates is sets[4]
