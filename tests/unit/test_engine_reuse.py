"""The engine's shortcuts must not change a decision: kept VW examples picked by position
for every slot's eligible subset, action lines handed over by the caller, compiled rule
tests and the normalisation fast path all give exactly what the plain paths give."""

from __future__ import annotations

import math
import random
from dataclasses import asdict
from typing import Any

import pytest

from bandit_service.domain import Candidate, DecisionRequest, Slot, slot_list
from bandit_service.engine import DecisionEngine, sampling
from bandit_service.learners import vw_text
from bandit_service.learners.vw import VWLearner
from bandit_service.policy import parse_policy
from bandit_service.rules import FeatureTest, RuleSet, _same, feature_value

VW_ARGS = "--cb_explore_adf --epsilon 0.1 -q ua -q sa"
RULES = {
    "exclude_if": [{"feature": "kind", "equals": "z"}],
    "pins": [{"id": "i0", "slot": 1}],
    "max_per_value": [{"feature": "kind", "max": 2}],
    "boosts": [{"feature": "hot", "equals": True, "factor": 1.5}],
    "exploration_share": 0.2,
}


def _catalogue(size: int) -> list[Candidate]:
    rng = random.Random(size)
    return [
        Candidate(
            f"i{i}",
            {
                "kind": "x" if i == 0 else rng.choice(["x", "y", "z", "w"]),
                "hot": rng.random() < 0.3,
                "score": round(rng.random(), 3),
                "meta": {"n": i % 7},
            },
        )
        for i in range(size)
    ]


def _trained_model(catalogue: list[Candidate]) -> bytes:
    rng = random.Random(3)
    learner = VWLearner(VW_ARGS)
    for j in range(80):
        eligible = catalogue[j % 5 : j % 5 + 15]
        context = {"device": rng.choice(["ios", "web"]), "user": {"age": rng.random()}}
        learner.learn_slot(
            context, j % 4, {}, eligible, rng.randrange(len(eligible)), 0.25, rng.random()
        )
    model = learner.to_bytes()
    learner.close()
    return model


class _WithLines(tuple[Candidate, ...]):
    """A request's candidates carrying their action lines, as the API's repeated
    candidate sets do."""

    action_lines: tuple[str, ...]


def _with_lines(candidates: tuple[Candidate, ...]) -> _WithLines:
    out = _WithLines(candidates)
    out.action_lines = tuple(vw_text.action_line(c.id, c.features) for c in candidates)
    return out


def _requests(catalogue: list[Candidate], count: int, seed: int) -> list[DecisionRequest]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        context: dict[str, Any] = {"device": rng.choice(["ios", "web"]), "user": {"age": i}}
        if i % 9 == 4:  # a shared namespace indexed like "action": that slot parses text
            context["apple"] = {"w": rng.random()}
        slots = tuple(Slot(f"s{k}", {"pos": k} if k % 2 else {}) for k in range(5))
        fresh = tuple(Candidate(c.id, dict(c.features)) for c in catalogue)
        out.append(DecisionRequest(f"ev-{seed}-{i}", "p", fresh, slots, context))
    return out


@pytest.mark.parametrize("rules", [False, True])
def test_every_slot_subset_from_kept_examples_decides_as_text_does(rules: bool) -> None:
    catalogue = _catalogue(60)
    raw: dict[str, Any] = {"vw_args": VW_ARGS, "holdout_share": 0}
    if rules:
        raw["rules"] = RULES
    policy = parse_policy("p", raw)
    model = _trained_model(catalogue)
    kept = VWLearner(VW_ARGS, model)
    text = VWLearner(VW_ARGS, model, reuse_examples=False)
    kept_engine = DecisionEngine({"p": policy}, lambda _n: kept, clock=lambda: 0.0)
    text_engine = DecisionEngine({"p": policy}, lambda _n: text, clock=lambda: 0.0)
    for request in _requests(catalogue, 30, seed=1):
        assert kept_engine.decide(request) == text_engine.decide(request)
    examples = kept.action_examples
    assert examples is not None
    # Every slot after the first few requests came from kept examples (subsets included),
    # and only the whole candidate set is listed, not one list per slot's subset.
    assert examples.reused > 80
    assert len(examples) == len(catalogue) and len(examples._lists) == 1
    kept.close()
    text.close()


def test_action_lines_on_the_candidates_are_used_and_give_the_same_decision() -> None:
    catalogue = _catalogue(40)
    policy = parse_policy("p", {"vw_args": VW_ARGS, "holdout_share": 0})
    model = _trained_model(catalogue)
    given, rendered = VWLearner(VW_ARGS, model), VWLearner(VW_ARGS, model)
    given_engine = DecisionEngine({"p": policy}, lambda _n: given)
    rendered_engine = DecisionEngine({"p": policy}, lambda _n: rendered)
    for request in _requests(catalogue, 12, seed=2):
        with_lines = DecisionRequest(
            request.event_id, "p", _with_lines(request.candidates), request.slots,
            request.context,
        )  # fmt: skip
        assert given_engine.decide(with_lines) == rendered_engine.decide(request)
    assert len(given.lines._lines) == 0  # never rendered nor looked up a line itself
    assert len(rendered.lines._lines) == len(catalogue)
    assert given.action_examples is not None and given.action_examples.reused > 0
    given.close()
    rendered.close()


def test_a_scorer_stops_using_kept_examples_once_they_are_cleared() -> None:
    """After a VW error the kept examples are dropped (they may not be as parsed any
    more): a request already holding them parses text for its remaining slots."""
    catalogue = tuple(_catalogue(20))
    model = _trained_model(list(catalogue))
    kept, text = VWLearner(VW_ARGS, model), VWLearner(VW_ARGS, model, reuse_examples=False)
    context = {"device": "ios"}
    everyone = list(range(len(catalogue)))
    for _ in range(6):  # seen often enough to be kept
        kept.scorer(context, catalogue).pmf(0, {}, everyone)
    examples = kept.action_examples
    assert examples is not None
    scorer = kept.scorer(context, catalogue)
    reference = text.scorer(context, catalogue)
    before = examples.reused
    assert scorer.pmf(0, {}, everyone) == reference.pmf(0, {}, everyone)
    assert examples.reused == before + 1
    examples.clear()
    subset = everyone[1::2]
    assert scorer.pmf(1, {}, subset) == reference.pmf(1, {}, subset)
    assert examples.reused == before + 1  # the text way
    kept.close()
    text.close()


def test_action_lines_as_a_list_still_work() -> None:
    catalogue = tuple(_catalogue(8))
    learner = VWLearner(VW_ARGS)
    candidates = _WithLines(catalogue)
    candidates.action_lines = [vw_text.action_line(c.id, c.features) for c in catalogue]  # type: ignore[assignment]
    for _ in range(5):
        pmf = learner.scorer({}, candidates).pmf(0, {}, [0, 2, 4])
    assert pmf == learner.scorer({}, catalogue).pmf(0, {}, [0, 2, 4])
    learner.close()


def _reference_matches(test: FeatureTest, features: dict[str, Any]) -> bool:
    """FeatureTest.matches as it was before compiling: the generic comparison."""
    value = feature_value(features, test.feature)
    if isinstance(value, list):
        return any(_same(item, test.equals) for item in value)
    return _same(value, test.equals)


def test_compiled_feature_tests_answer_as_the_generic_comparison() -> None:
    values: list[Any] = [
        None, True, False, 0, 1, 2, 1.0, 0.0, -0.0, 2.5, math.nan, "x", "1", "True", "",
        [], ["x", "y"], [1, 2], [True], [1.0], [False, 0], ["1"], {"x": 1}, {"n": "x"},
    ]  # fmt: skip
    targets: list[Any] = [True, False, 0, 1, 1.0, 0.0, 2.5, math.nan, "x", "1", "", (1,)]
    for target in targets:
        for name in ("f", "ns.n", "ns.missing", "g.h"):
            test = FeatureTest(name, target)
            for value in values:
                for features in (
                    {"f": value},
                    {"ns": {"n": value}},
                    {"ns.n": value, "ns": {"n": "other"}},
                    {"ns": value},
                    {},
                ):
                    assert test.matches(features) == _reference_matches(test, features), (
                        name, target, features,
                    )  # fmt: skip


def test_compiled_tests_leave_the_policy_version_and_equality_alone() -> None:
    raw = {"vw_args": VW_ARGS, "rules": RULES}
    policy = parse_policy("p", raw)
    before = (policy.version, asdict(policy))
    rules = policy.rules
    assert isinstance(rules, RuleSet)
    rules.excluded_by_filters({"kind": "z"})
    rules.weight({"hot": True}, 0.0)
    fresh = parse_policy("p", raw)
    assert rules == fresh.rules and hash(rules) == hash(fresh.rules)
    assert (policy.version, asdict(policy)) == before
    assert policy.version == fresh.version


def _reference_normalise(weights: list[float]) -> list[float]:
    clipped = [w if w > 0.0 else 0.0 for w in weights]
    total = sum(clipped)
    if not total > 0.0:
        return [1.0 / len(clipped)] * len(clipped)
    return [w / total for w in clipped]


@pytest.mark.parametrize(
    "weights",
    [
        [0.1, 0.2, 0.7],
        [1 / 3, 1 / 3, 1 / 3],
        [0.0, 0.5, 0.5],
        [-0.0, 0.5],
        [-1.0, 2.0, 3.0],
        [math.nan, 1.0],
        [math.inf, 1.0],
        [0.0, 0.0],
        [1e-300, 1e-300],
        [float(x) for x in range(1, 60)],
    ],
)
def test_normalise_fast_path_gives_the_same_numbers(weights: list[float]) -> None:
    got, expected = sampling.normalise(weights), _reference_normalise(weights)
    assert [repr(x) for x in got] == [repr(x) for x in expected]


def test_holdout_requests_decide_without_a_generator_as_before() -> None:
    catalogue = _catalogue(10)
    policy = parse_policy("p", {"vw_args": VW_ARGS, "holdout_share": 0})
    learner = VWLearner(VW_ARGS)
    engine = DecisionEngine({"p": policy}, lambda _n: learner)
    fresh = tuple(catalogue)
    opted_out = engine.decide(DecisionRequest("e", "p", fresh, slot_list(3), {}, personalize=False))
    assert opted_out.arm == "opted_out" and opted_out.context_line is None
    assert all(not s.explored and s.probability == 1.0 for s in opted_out.slots)
    learner.close()
