"""Kept candidate sets (bandit_service/candidate_sets.py) hold what decisions derive from
their candidates; each kept fact must equal what the per-decision code computes, and the
identifier scan with a kept set must give the same answer, to the field, as without."""

from __future__ import annotations

import copy
import random
import tracemalloc
from typing import Any

import orjson
import pytest

from bandit_service.api import fast_body
from bandit_service.api.auth import count_features
from bandit_service.api.fast_body import kept_candidates
from bandit_service.candidate_sets import KeptCandidates, KeptSetCache, feature_count
from bandit_service.domain import Candidate, DecisionRequest, Slot
from bandit_service.identifiers import find_identifier
from bandit_service.learners.vw_text import ActionLineCache, action_line
from bandit_service.store import compact

CANDIDATES = [
    Candidate("a", {"topic": "sport", "score": 1.5, "fresh": True, "tags": ["x", "y z"]}),
    Candidate("b/é", {"topic": "news", "meta": {"len": 3, "lang": "fr"}}),
    Candidate("c", {}),
]


def test_kept_facts_equal_what_each_decision_computed() -> None:
    kept = KeptCandidates(CANDIDATES)
    assert kept == tuple(CANDIDATES) and isinstance(kept, tuple)
    logged = [{"id": c.id, "features": c.features} for c in CANDIDATES]
    assert kept.logged == logged
    assert kept.logged.content_key == compact.candidate_set(logged)
    assert compact.candidate_ids(kept.logged) == ["a", "b/é", "c"]
    assert compact.candidate_ids(kept.logged).position == {"a": 0, "b/é": 1, "c": 2}  # type: ignore[attr-defined]
    assert compact.candidate_ids(logged) == ["a", "b/é", "c"]  # a plain list: built anew
    assert kept.features == tuple(c.features for c in CANDIDATES)
    assert kept.max_features == max(count_features(c.features) for c in CANDIDATES) == 4
    assert all(feature_count(c.features) == count_features(c.features) for c in CANDIDATES)
    assert KeptCandidates([]).max_features == 0
    cache = ActionLineCache()
    assert kept.action_lines == tuple(cache.line(c.id, c.features) for c in CANDIDATES)
    assert kept.action_lines is kept.action_lines  # rendered once
    assert kept.action_lines[0] == action_line("a", CANDIDATES[0].features)


def test_compact_slots_with_kept_ids_is_the_same() -> None:
    kept = KeptCandidates(CANDIDATES)
    slots = [
        {"slot": 0, "id": "b/é", "pmf": [["a", 0.25], ["b/é", 0.5], ["c", 0.25]]},
        {"slot": 1, "id": "c", "pmf": [["a", 0.5], ["c", 0.5]]},
        {"slot": 2, "id": "zz", "pmf": [["zz", 1.0]]},  # not in the set: kept as written
    ]
    assert compact.compact_slots(slots, compact.candidate_ids(kept.logged)) == (
        compact.compact_slots(slots, [c.id for c in CANDIDATES])
    )
    # Repeated ids (refused by the engine before logging) map as they always did.
    twice = compact.CandidateIds(["a", "b", "a"])
    assert twice.position == {cid: i for i, cid in enumerate(["a", "b", "a"])}


# -- the identifier scan ------------------------------------------------------------------
_TEXTS = [
    "plain",
    "ana@example.com",
    "write to bo@example.org today",
    "+44 20 7946 0958",
    "(555) 123-4567",
    "1234567",  # a product code, not refused
    "line one\n+44 20 7946 0958",  # only the walk (which splits lines) sees it
    "x\n(555) 123-4567",
    "u-7",  # the user id in some requests
    "a@b",
    '"quoted" 0151 2345 6789',
]


def _features(rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _ in range(rng.randint(0, 3)):
        kind = rng.random()
        name = rng.choice(["t", "n", "u-7", "mail@example.com", "l"])
        if kind < 0.5:
            out[name] = rng.choice(_TEXTS)
        elif kind < 0.7:
            out[name] = [rng.choice(_TEXTS), rng.choice(_TEXTS)]
        elif kind < 0.8:
            out[name] = {"k": rng.choice(_TEXTS)}
        else:
            out[name] = rng.choice([1, 2.5, True])
    return out


def test_a_kept_scan_names_the_same_field_as_a_whole_scan() -> None:
    """Seeded: with identifiers (and the user id) in the context, the candidates and the
    slots, in every combination, the kept scan answers exactly as the full scan does."""
    rng = random.Random(8)
    refused = 0
    for _ in range(3000):
        candidates = [Candidate(f"c{i}", _features(rng)) for i in range(rng.randint(0, 4))]
        kept = KeptCandidates(candidates)
        for _again in range(2):  # the scan is kept: ask twice
            request = DecisionRequest(
                event_id="e",
                policy="p",
                candidates=tuple(candidates),
                slots=tuple(Slot(f"s{k}", _features(rng)) for k in range(rng.randint(0, 2))),
                context=_features(rng),
                user_id=rng.choice([None, "u-7", "plain", "ana@example.com"]),
            )
            expected = find_identifier(request)
            refused += expected is not None
            kept_request = DecisionRequest(
                event_id="e",
                policy="p",
                candidates=kept,
                slots=request.slots,
                context=request.context,
                user_id=request.user_id,
            )
            assert find_identifier(kept_request) == expected, request
        alone = find_identifier(DecisionRequest("", "", tuple(candidates), ()))
        assert kept.identifier_scan().found() == alone
    assert refused > 1000  # the generator does reach every branch


# -- the cache ----------------------------------------------------------------------------
def _kept(n: int) -> KeptCandidates:
    return KeptCandidates([Candidate(f"c{n}")])


def test_the_cache_evicts_least_recently_used_by_entries() -> None:
    cache = KeptSetCache(max_bytes=10**9, max_entries=3)
    sets = {bytes([i]): _kept(i) for i in range(4)}
    for raw in list(sets)[:3]:
        cache.put(raw, sets[raw])
    assert cache.get(b"\x00") is sets[b"\x00"]  # now the most recently used
    cache.put(b"\x03", sets[b"\x03"])
    assert len(cache) == 3
    assert cache.get(b"\x01") is None  # the least recently used went
    assert [cache.get(bytes([i])) is sets[bytes([i])] for i in (0, 2, 3)] == [True] * 3
    assert (cache.hits, cache.misses) == (4, 1)


def test_the_cache_is_bounded_by_memory() -> None:
    raw = [b"[%d]" % i + b" " * 1000 for i in range(12)]  # ~1 kB each
    one = KeptSetCache.cost(raw[0], _kept(0))
    cache = KeptSetCache(max_bytes=8 * one + one // 2, max_entries=1000)
    for i, r in enumerate(raw):
        cache.put(r, _kept(i))
        assert cache.bytes_held <= cache.max_bytes
    assert len(cache) == 8
    assert cache.bytes_held == sum(KeptSetCache.cost(r, _kept(0)) for r in raw[-8:])
    assert [cache.get(r) is not None for r in raw] == [False] * 4 + [True] * 8
    # A set bigger than an eighth of the bound is used but never kept.
    huge = b" " * (cache.max_bytes // 8)
    cache.put(huge, _kept(99))
    assert cache.get(huge) is None and len(cache) == 8
    cache.clear()
    assert len(cache) == 0 and cache.bytes_held == 0


def _shapes() -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(5)
    mixed = [
        {
            "id": f"item-{i:05d}",
            "features": {
                f"f{j}": rng.choice([rng.random(), rng.randrange(1000), f"v{rng.randrange(50)}"])
                for j in range(10)
            },
        }
        for i in range(50)
    ]
    return {
        "50 x 10 mixed": mixed,
        "500 x 5 numbers": [
            {"id": f"c{i}", "features": {f"f{j}": rng.random() * j for j in range(5)}}
            for i in range(500)
        ],
        "lists of letters": [
            {"id": f"c{i}", "features": {"t": [chr(97 + j % 26) for j in range(100)]}}
            for i in range(50)
        ],
        "one-letter names": [
            {"id": f"c{i}", "features": {chr(65 + j): j % 2 for j in range(50)}} for i in range(50)
        ],
        "long strings": [{"id": f"c{i}", "features": {"s": "x" * 1000}} for i in range(50)],
        "ids only": [{"id": chr(65 + i % 50)} for i in range(50)],
        "one": [{"id": "a", "features": {"b": 1}}],
    }


@pytest.mark.parametrize("shape", list(_shapes()))
def test_the_memory_estimate_covers_a_kept_set(shape: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cost estimate must not understate what a kept set holds (its raw key, decoded
    features, logged text, identifier scan and VW lines), or the memory bound is a lie."""
    monkeypatch.setattr(fast_body, "KEPT_SETS", KeptSetCache())  # really decoded here
    raw = orjson.dumps(_shapes()[shape])
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        key = bytes(bytearray(raw))  # the cache keeps its own copy of the raw bytes
        kept = kept_candidates(key)
        assert kept is not None
        assert kept.action_lines
        kept.identifier_scan().found()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held <= KeptSetCache.cost(raw, kept), held / len(raw)


def test_a_kept_set_is_not_mutated_by_its_facts() -> None:
    candidates = copy.deepcopy(CANDIDATES)
    kept = KeptCandidates(candidates)
    assert kept.action_lines
    find_identifier(DecisionRequest("e", "p", kept, (), {"x": "ana@example.com"}, user_id="u"))
    assert list(kept) == CANDIDATES
