"""The fast decoder's kept-set shortcut (``fast_body._with_kept_candidates``): a body whose
candidates are a kept set, found by the bytes after ``"candidates":``, must decode to
exactly what decoding the whole body gives (and what ``DecisionIn`` gives), whatever else
the body holds: the key nested elsewhere, repeated, spaced, or a body that is invalid."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from bandit_service.api import fast_body
from bandit_service.api.fast_body import decode_decision
from bandit_service.candidate_sets import PER_PREFIX, PREFIX, KeptCandidates, KeptSetCache
from bandit_service.domain import Candidate
from tests.unit.test_fast_body import _authority, _plain

POOL = [
    {"id": f"item-{i:03d}", "features": {"x": i, "t": "word", "l": ["a", "b"]}} for i in range(6)
]
RAW = orjson.dumps(POOL)


@pytest.fixture
def kept_sets(monkeypatch: pytest.MonkeyPatch) -> KeptSetCache:
    cache = KeptSetCache()
    monkeypatch.setattr(fast_body, "KEPT_SETS", cache)
    return cache


def _usual(body: bytes, monkeypatch: pytest.MonkeyPatch) -> Any:
    """What the decoder gives without any kept set (every byte decoded)."""
    with monkeypatch.context() as m:
        m.setattr(fast_body, "KEPT_SETS", KeptSetCache())
        return decode_decision(body)


def test_a_kept_set_is_found_at_its_place_without_hashing(kept_sets: KeptSetCache) -> None:
    assert len(RAW) >= PREFIX
    first = decode_decision(orjson.dumps({"context": {"u": 1}, "candidates": POOL}))
    assert first is not None and isinstance(first.candidates, KeptCandidates)
    calls: list[bytes] = []
    real_get = kept_sets.get

    def spy(raw: bytes) -> KeptCandidates | None:
        calls.append(raw)
        return real_get(raw)

    kept_sets.get = spy  # type: ignore[method-assign]
    body = orjson.dumps({"context": {"u": 2}, "candidates": POOL, "slots": 2, "policy": "p"})
    second = decode_decision(body)
    assert second is not None and second.candidates is first.candidates
    assert calls == []  # found by find_at, not by hashing the raw bytes
    assert (second.context, second.slots, second.policy) == ({"u": 2}, 2, "p")
    assert _plain(second) == _plain(_authority(body))
    assert (kept_sets.hits, kept_sets.misses) == (1, 1)


def test_find_at_matches_whole_sets_only() -> None:
    cache = KeptSetCache()
    kept = KeptCandidates([Candidate("a")])
    cache.put(RAW, kept)
    assert cache.find_at(b"xx" + RAW + b"}", 2) == (RAW, kept)
    assert cache.find_at(b"xx" + RAW[:-1] + b"}", 2) is None  # same prefix, cut short
    assert cache.find_at(b"x" + RAW, 2) is None
    changed = RAW[:-3] + b"0" + RAW[-2:]
    assert cache.find_at(changed, 0) is None
    assert cache.hits == 1 and cache.misses == 0


def test_sets_sharing_a_prefix_are_told_apart_and_bounded() -> None:
    cache = KeptSetCache()
    variants = [orjson.dumps([*POOL, {"id": f"extra-{i}"}]) for i in range(PER_PREFIX + 2)]
    sets = [KeptCandidates([Candidate(str(i))]) for i in range(len(variants))]
    for raw, kept in zip(variants, sets, strict=True):
        cache.put(raw, kept)
    for i, raw in enumerate(variants):
        found = cache.find_at(raw, 0)
        if i < PER_PREFIX:
            assert found is not None and found[1] is sets[i]
        else:
            assert found is None  # not indexed by prefix: found by get
        assert cache.get(raw) is sets[i]


def test_evicted_sets_leave_the_prefix_index() -> None:
    cache = KeptSetCache(max_bytes=10**9, max_entries=2)
    raws = [orjson.dumps([{"id": f"c{i}", "features": {"pad": "p" * 80}}]) for i in range(3)]
    for i, raw in enumerate(raws):
        cache.put(raw, KeptCandidates([Candidate(str(i))]))
    assert cache.find_at(raws[0], 0) is None
    assert cache.find_at(raws[2], 0) is not None
    cache.clear()
    assert cache.find_at(raws[2], 0) is None and len(cache) == 0


TRICKY = [
    # the key nested before the body's own, holding the kept set's bytes: invalid there
    b'{"context": {"ns": {"candidates": %s}}, "candidates": %s}',
    b'{"context": {"candidates": %s}, "candidates": %s}',
    b'{"slots": [{"id": "s", "features": {"candidates": %s}}], "candidates": %s}',
    # the key twice: whichever wins, both ways agree
    b'{"candidates": %s, "candidates": null}',
    b'{"candidates": %s, "candidates": %s}',
    b'{"candidates": null, "candidates": %s}',
    # repeated after the set with whitespace before its colon: the later null wins
    b'{"candidates":%s,"candidates" :null}',
    b'{"candidates":%s,"candidates"\n:null}',
    b'{"candidates":%s,"candidate_ids":["x"],"candidates"\t: null}',
    b'{"candidates":%s,"context":{"candidates":1}}',
    b'{"candidates":%s,"slots":[{"id":"s","features":{"candidates":"x"}}]}',
    # invalid around the set
    b'{"candidates":%s',
    b'{"candidates":%s}}',
    b'{"candidates":%s,}',
    b'{"candidates":%s, "unknown": 1}',
    b'{"candidates":%s, "slots": 0}',
    b'{"candidates":%s, "context": {"bad-ns": {"x": 1}}}',
    b'["candidates":%s]',
    b'{"x":"candidates":%s}',
    b'{"candidates":%s} trailing',
    # valid, other shapes
    b'{"candidates": %s}',
    b'{"candidates" :%s}',
    b'{"policy":"p","candidates":%s,"context":{"a":"b"},"slots":3,"defer":true}',
    b'{"candidates":%s,"context":{"s":"has a \\" quote"}}',
    b'{"candidates":%s,"context":{"s":"\\u00e9"}}',
    b'{"candidates":%s,"candidate_ids":["item-001"]}',
]


@pytest.mark.parametrize("template", TRICKY)
def test_tricky_bodies_mean_what_the_whole_body_means(
    template: bytes, kept_sets: KeptSetCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert decode_decision(orjson.dumps({"candidates": POOL})) is not None  # RAW is kept
    body = template.replace(b"%s", RAW)
    fast = decode_decision(body)
    usual = _usual(body, monkeypatch)
    assert _plain(fast) == _plain(usual), body
    if fast is not None:
        assert _plain(fast) == _plain(_authority(body)), body


def test_random_bodies_with_kept_sets_mean_the_same(
    kept_sets: KeptSetCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seeded fuzzing over bodies that hold kept sets (long enough to be found by prefix)
    in various places, with the key repeated or nested, and bodies cut or spliced."""
    rng = random.Random(20261123)
    sets = [
        [{"id": f"{p}{i}", "features": {"x": i, "w": "w" * rng.randint(0, 40)}} for i in range(n)]
        for p in ("a", "b")
        for n in (2, 3)
    ]
    for candidates in sets:
        assert decode_decision(orjson.dumps({"candidates": candidates})) is not None
    accepted = spliced = 0
    values: list[Any] = [1, "v", None, [1], {"k": 1}]
    for _ in range(1500):
        kept = rng.choice(sets)
        parts: list[tuple[bytes, bytes]] = [(b"candidates", orjson.dumps(kept))]
        if rng.random() < 0.4:
            nested: Any = rng.choice([kept, *values])
            where = rng.choice(["context", "ns", "slot"])
            inner = {"candidates": nested}
            value: Any = (
                {"ns": inner}
                if where == "ns"
                else [{"id": "s", "features": inner}]
                if where == "slot"
                else inner
            )
            parts.append((b"slots" if where == "slot" else b"context", orjson.dumps(value)))
        if rng.random() < 0.2:
            parts.append((b"candidates", orjson.dumps(rng.choice([rng.choice(sets), None]))))
        if rng.random() < 0.3:
            parts.append((b"slots", orjson.dumps(rng.choice([1, 0, 2, True]))))
        if rng.random() < 0.3:
            parts.append((b"context", orjson.dumps({"c": rng.choice(values)})))
        rng.shuffle(parts)
        body = b"{" + b",".join(b'"%s":%s' % (k, v) for k, v in parts) + b"}"
        if rng.random() < 0.1:
            cut = rng.randrange(len(body))
            body = body[:cut] + body[cut + 1 :]
        before = kept_sets.hits
        fast = decode_decision(body)
        usual = _usual(body, monkeypatch)
        assert _plain(fast) == _plain(usual), body
        if fast is not None:
            accepted += 1
            spliced += kept_sets.hits > before
            assert _plain(fast) == _plain(_authority(body)), body
    assert accepted > 300 and spliced > 300  # the generator does reach the shortcut
