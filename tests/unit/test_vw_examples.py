"""Kept action examples (``ActionExamples``) must learn exactly what parsing every line's
text learns: the same model bytes and the same predictions, for every reduction a policy
may name, and the kept examples must come out of each learn as they went in."""

from __future__ import annotations

import random
from typing import Any

import pytest

from bandit_service.domain import Candidate
from bandit_service.learners import vw_text
from bandit_service.learners.vw import ActionExamples, VWLearner

VW_ARGS = [
    "--cb_explore_adf --epsilon 0.1 -q ua",
    "--cb_explore_adf",
    "--cb_explore_adf --squarecb",
    "--cb_explore_adf --epsilon 0.2 -q ::",
    "--cb_explore_adf --epsilon 0.1 --power_t 0 -l 0.001 --cb_type mtr -q ::",
    "--cb_explore_adf --interactions ua cs",
    "--cb_explore_adf --cb_type dr -q ca -q sa",
    "--cb_explore_adf --cb_type ips --bag 3",
    "--cb_explore_adf --cover 3 -q ua",
    "--cb_explore_adf --softmax --lambda 2 -q ua",
    "--cb_explore_adf --regcb -q ua",
    "--cb_explore_adf --first 5",
    "--cb_explore_adf --synthcover -q ua",
]


def _catalogue(rng: random.Random, size: int) -> list[Candidate]:
    """Features of every kind, a nested namespace, and numbers whose squares do not add
    and subtract back exactly in floats."""
    return [
        Candidate(
            f"c{i}",
            {
                "topic": rng.choice(["x", "y z", "w:1"]),
                "score": rng.choice([0.0, -0.0, 0.1, 1 / 3, 2.5e-7, 1e6]),
                "fresh": i % 2 == 0,
                "tags": ["a", "b"] if i % 3 == 0 else [],
                "meta": {"len": i * 0.7},
            },
        )
        for i in range(size)
    ]


def _events(rng: random.Random, catalogue: list[Candidate], count: int) -> list[tuple[Any, ...]]:
    """learn_slot arguments: a few eligible sets (so they repeat and are kept), some of
    them in plain lists, one with a candidate listed twice (never kept), and contexts with
    namespaces that share a first letter with ``action`` and ``slot`` (VW merges the shared
    line's features into the kept examples' namespaces of that letter during a learn)."""
    sets: list[Any] = [
        vw_text.EligibleCandidates(catalogue),
        vw_text.EligibleCandidates(catalogue[2:9]),
        list(catalogue[::2]),
        [*catalogue[:4], catalogue[1]],
    ]
    events = []
    for _ in range(count):
        eligible = rng.choice(sets)
        context: dict[str, Any] = {"device": rng.choice(["ios", "web"]), "hour": rng.random()}
        if rng.random() < 0.5:
            context["apple"] = {"w": rng.random() * 3.7, "k": rng.choice(["p", "q"])}
        context["seen"] = {"n": rng.random()}
        slot_features = {"pos": rng.choice(["top", "side"]), "w": rng.random()}
        events.append(
            (
                context, rng.randrange(3), slot_features, eligible, rng.randrange(len(eligible)),
                rng.choice([0.05, 0.5, 0.9]), rng.choice([0.0, 1.0, -0.5, 0.3]),
            )
        )  # fmt: skip
    return events


@pytest.mark.parametrize("vw_args", VW_ARGS)
def test_kept_examples_learn_the_same_model_as_text(vw_args: str) -> None:
    rng = random.Random(13)
    catalogue = _catalogue(rng, 12)
    events = _events(rng, catalogue, 250)
    kept, text = VWLearner(vw_args), VWLearner(vw_args, reuse_examples=False)
    shared = vw_text.shared_line({"device": "ios", "seen": {"n": 1.0}}, 0, {})
    actions = tuple(vw_text.action_line(c.id, c.features) for c in catalogue[1:])
    for i, event in enumerate(events):
        kept.learn_slot(*event)
        text.learn_slot(*event)
        if i % 10 == 0:  # serving's path: kept examples from the third call on
            assert kept.predict_actions(shared, actions) == text.predict_lines([shared, *actions])
    assert kept.action_examples is not None
    assert 50 < kept.action_examples.reused < 220  # some events reused, others could not
    assert kept.to_bytes() == text.to_bytes()
    reused = kept.action_examples.reused
    assert kept.predict_actions(shared, actions) == text.predict_lines([shared, *actions])
    assert kept.action_examples.reused == reused + 1
    kept.close()
    text.close()


def _snapshot(example: Any) -> list[tuple[Any, ...]]:
    """Everything of a parsed example that learning reads: namespaces, their feature
    indices and values, and their sums of squares."""
    out = []
    for n in range(example.num_namespaces()):
        ns = example.namespace(n)
        count = example.num_features_in(ns)
        out.append(
            (
                ns,
                [example.feature(ns, i) for i in range(count)],
                [example.feature_weight(ns, i) for i in range(count)],
                example.sum_feat_sq(ns),
            )
        )
    return out


def test_learning_leaves_kept_examples_as_parsed() -> None:
    rng = random.Random(2)
    catalogue = _catalogue(rng, 12)
    learner = VWLearner("--cb_explore_adf --epsilon 0.1 -q ua -q sa -q ca")
    events = _events(rng, catalogue, 120)
    for event in events[:20]:
        learner.learn_slot(*event)
    assert learner.action_examples is not None
    kept = list(learner.action_examples._by_line.values())
    assert kept
    before = [_snapshot(e) for e in kept]
    for event in events[20:]:
        learner.learn_slot(*event)
    assert [_snapshot(e) for e in kept] == before
    assert learner.action_examples.reused > 20
    learner.close()


def test_bounds_fall_back_to_text_and_a_changed_catalogue_gets_its_turn() -> None:
    learner = VWLearner("--cb_explore_adf", reuse_examples=False)
    cache = ActionExamples(learner._ws, max_examples=6, build_after=2, review_every=10)
    shared = "shared |context x=1 |slot slot_index=0"
    first = tuple(f" |action id=a{i}" for i in range(4))
    second = tuple(f" |action id=b{i}" for i in range(4))
    assert cache.examples(first, shared) is None  # seen once: not worth building yet
    kept = cache.examples(first, shared)
    assert kept is not None and len(kept) == 4 and len(cache) == 4
    assert cache.examples(first, shared) is kept
    # A shared namespace indexed like ``action`` (by "a"): parse the text this time.
    assert cache.examples(first, "shared |apple w:1.5 |slot slot_index=0") is None
    assert (
        cache.examples(second, shared) is None and cache.examples(second, shared) is None
    )  # no room
    assert cache.examples(first[:2], shared) == kept[:2]  # a subset: the same examples at once
    assert len(cache) == 4
    twice = (first[0], first[0])
    assert (
        cache.examples(twice, shared) is None and cache.examples(twice, shared) is None
    )  # never kept
    # The catalogue changed: only the second set is asked for now. The first review (at the
    # 10th call) saw more uses than refusals; the next one (10 calls later) drops
    # everything, and the new set is built once asked for again.
    results = [cache.examples(second, shared) for _ in range(12)]
    assert results[:9] == [None] * 9 and results[-1] is not None
    assert len(cache) == 4 and cache.examples(first, shared) is None
    cache.clear()
    learner.close()


def test_a_long_new_set_is_built_a_few_examples_per_call() -> None:
    learner = VWLearner("--cb_explore_adf", reuse_examples=False)
    cache = ActionExamples(learner._ws, build_after=1, build_step=2)
    lines = tuple(f" |action id=x{i}" for i in range(5))
    shared = "shared |context x=1"
    assert [cache.examples(lines, shared) is None for _ in range(3)] == [True, True, False]
    assert len(cache) == 5
    cache.clear()
    learner.close()
