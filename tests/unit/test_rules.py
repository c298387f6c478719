"""Rules reshape the distribution before the draw, so logged probabilities stay exact."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import pytest
from scipy import stats

from bandit_service.domain import Candidate, DecisionRequest, slot_list
from bandit_service.engine import DecisionEngine
from bandit_service.errors import InvalidRequest
from bandit_service.holdout import PopularityScores
from bandit_service.learners.vw import VWLearner
from bandit_service.policy import PolicyError, parse_policy

CANDIDATES = tuple(
    Candidate(
        f"c{i}",
        {
            "category": "ABC"[i % 3],
            "in_stock": i != 5,
            "age_hours": [2, 50, 10, 100, 30, 1, 70, 5][i],
            "sponsored": i in (1, 6),
        },
    )
    for i in range(8)
)
CONTEXT = {"user": {"segment": "s1"}}
POPULARITY = PopularityScores(prior=0.1, shown={"c0": 40.0, "c1": 30.0, "c2": 5.0, "c3": 2.0})

RULES: dict[str, dict[str, Any]] = {
    "exclude_if": {"exclude_if": [{"feature": "in_stock", "equals": False}]},
    "pin": {"pins": [{"id": "c3", "slot": 1}]},
    "diversity": {"max_per_value": [{"feature": "category", "max": 1}]},
    "freshness": {"freshness": {"feature": "age_hours", "max_age": 24, "boost": 3.0}},
    "boosts": {"boosts": [{"feature": "sponsored", "equals": True, "factor": 2.0},
                          {"feature": "category", "equals": "C", "factor": 0.5}]},
    "exploration_share": {"exploration_share": 0.3},
    "exploration_position": {"exploration_positions": [2],
                             "exploration_distribution": "least_shown"},
}  # fmt: skip
RULES["all_together"] = {k: v for rules in RULES.values() for k, v in rules.items()}


def engine_with(rules: dict[str, Any], epsilon: float = 0.2) -> DecisionEngine:
    policy = parse_policy(
        "p",
        {"vw_args": f"--cb_explore_adf --epsilon {epsilon} -q ua", "holdout_share": 0,
         "rules": rules},
    )  # fmt: skip
    learner = VWLearner(policy.vw_args)
    for _ in range(20):  # make the model prefer c2 and c4, far from uniform
        for chosen in range(len(CANDIDATES)):
            reward = 1.0 if CANDIDATES[chosen].id in ("c2", "c4") else 0.0
            learner.learn_slot(CONTEXT, 0, {}, CANDIDATES, chosen, 0.2, reward)
    return DecisionEngine({"p": policy}, lambda _n: learner, lambda _n: POPULARITY)


def request(event_id: str, slots: int = 3, **kwargs: Any) -> DecisionRequest:
    return DecisionRequest(
        event_id=event_id, policy="p", candidates=CANDIDATES, slots=slot_list(slots),
        context=CONTEXT, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("name", list(RULES))
def test_frequencies_match_logged_probabilities_under_each_rule(name: str) -> None:
    """Chi-square per slot, conditioned on the earlier slots (as in test_engine.py): with
    the same context and model, slot k's logged pmf depends only on slots 0..k-1, so within
    each group the draws are i.i.d. from it. alpha = 0.001 at a fixed seed set."""
    engine = engine_with(RULES[name])
    groups: dict[tuple[int, tuple[str, ...]], Counter[str]] = defaultdict(Counter)
    logged: dict[tuple[int, tuple[str, ...]], dict[str, float]] = {}
    for i in range(3000):
        prefix: tuple[str, ...] = ()
        for choice in engine.decide(request(f"{name}-{i}")).slots:
            key = (choice.slot, prefix)
            pmf = dict(choice.pmf)
            assert choice.probability == pmf[choice.id]
            assert sum(pmf.values()) == pytest.approx(1.0, abs=1e-12)
            assert logged.setdefault(key, pmf) == pmf
            groups[key][choice.id] += 1
            prefix = (*prefix, choice.id)
    statistic, dof = 0.0, 0
    for key, counts in groups.items():
        total = sum(counts.values())
        support = {c: p for c, p in logged[key].items() if p > 0}
        if total < 50 or len(support) < 2:
            continue
        statistic += sum((counts[c] - total * p) ** 2 / (total * p) for c, p in support.items())
        dof += len(support) - 1
    assert dof >= 5, dof
    assert stats.chi2.sf(statistic, dof) > 0.001, (statistic, dof)


def test_invariants_hold_over_10000_decisions() -> None:
    engine = engine_with(RULES["all_together"])
    for i in range(10_000):
        decision = engine.decide(request(f"inv-{i}"))
        shown = [s.id for s in decision.slots]
        categories = Counter(CANDIDATES[int(cid[1:])].features["category"] for cid in shown)
        assert max(categories.values()) <= 1  # the diversity cap
        assert shown[1] == "c3"  # the pin
        assert decision.slots[1].probability == 1.0 and not decision.slots[1].explored
        assert "c5" not in shown  # out of stock
        assert decision.slots[2].explored  # the exploration position
        for slot in decision.slots:
            assert "c5" not in dict(slot.pmf)


def test_share_of_exploration_slots_matches_the_config() -> None:
    """With epsilon 0 the policy's own draw is greedy, so ``explored`` is exactly the
    exploration coin: over 3 x 4000 slots its share must fall within the two-sided 99.9%
    binomial acceptance region of the configured 0.3."""
    engine = engine_with({"exploration_share": 0.3}, epsilon=0.0)
    n = explored = 0
    for i in range(4000):
        for slot in engine.decide(request(f"share-{i}")).slots:
            n += 1
            explored += slot.explored
    low, high = stats.binom.ppf(0.0005, n, 0.3), stats.binom.ppf(0.9995, n, 0.3)
    assert low <= explored <= high, (explored, n)


def test_cold_start_candidates_are_favoured_by_least_shown_exploration() -> None:
    engine = engine_with({"exploration_positions": [0], "exploration_distribution": "least_shown"})
    pmf = dict(engine.decide(request("cold", slots=1)).slots[0].pmf)
    never_seen = [c for c in pmf if c not in POPULARITY.shown]
    assert min(pmf[c] for c in never_seen) > max(pmf[c] for c in POPULARITY.shown)
    assert pmf["c4"] == pytest.approx(pmf["c7"])  # equally unseen, equally likely


def test_high_cardinality_caps_stay_linear() -> None:
    """The cap look-ahead costs O(candidates) per slot, whatever the number of values."""
    policy = parse_policy(
        "p", {"holdout_share": 0, "rules": {"max_per_value": [{"feature": "k", "max": 1}]}}
    )
    learner = VWLearner(policy.vw_args)
    engine = DecisionEngine({"p": policy}, lambda _n: learner)
    many = tuple(Candidate(f"c{i}", {"k": f"v{i}"}) for i in range(500))
    decision = engine.decide(DecisionRequest("hc", "p", many, slot_list(5)))
    assert len({s.id for s in decision.slots}) == 5


def test_request_pins_win_over_policy_pins_and_are_checked() -> None:
    engine = engine_with(RULES["pin"])
    decision = engine.decide(request("rp", pins=(("c0", 1), ("c6", 0))))
    assert [decision.slots[0].id, decision.slots[1].id] == ["c6", "c0"]
    for pins, message in [
        ((("zz", 0),), "not a candidate"),
        ((("c0", 7),), "slot"),
        ((("c0", 0), ("c0", 2)), "two slots"),
    ]:
        with pytest.raises(InvalidRequest, match=message) as info:
            engine.decide(request("bad", pins=pins))
        assert info.value.field == "pins"
    with pytest.raises(InvalidRequest, match="excluded"):
        engine.decide(request("bad", pins=(("c1", 0),), excluded=frozenset({"c1"})))


def test_pins_cannot_break_caps_and_policy_pins_yield_to_the_request() -> None:
    capped = engine_with({"max_per_value": [{"feature": "category", "max": 1}]})
    with pytest.raises(InvalidRequest, match="diversity cap") as info:
        capped.decide(request("pc", pins=(("c0", 0), ("c3", 1))))  # both in category A
    assert info.value.field == "pins"
    with pytest.raises(InvalidRequest, match="two request pins"):
        capped.decide(request("dup", pins=(("c0", 0), ("c1", 0))))

    pinned = engine_with(RULES["pin"])  # the policy pins c3 to slot 1
    # Excluding the policy-pinned candidate (e.g. already seen) just drops the pin.
    decision = pinned.decide(request("ex", excluded=frozenset({"c3"})))
    assert "c3" not in [s.id for s in decision.slots] and decision.slots[1].probability < 1
    # A request may move the policy-pinned candidate elsewhere.
    moved = pinned.decide(request("mv", pins=(("c3", 0),)))
    assert moved.slots[0].id == "c3" and moved.slots[1].id != "c3"


def test_request_exclusions_and_pins_hold_with_every_rule() -> None:
    engine = engine_with(RULES["all_together"])
    for i in range(2000):
        decision = engine.decide(request(f"rq-{i}", pins=(("c7", 0),), excluded=frozenset({"c4"})))
        shown = [s.id for s in decision.slots]
        assert shown[0] == "c7" and shown[1] == "c3"  # request pin, policy pin
        assert "c4" not in shown and "c5" not in shown
        categories = [CANDIDATES[int(cid[1:])].features["category"] for cid in shown]
        assert len(set(categories)) == 3


def test_rules_that_leave_a_slot_empty_are_a_clear_4xx() -> None:
    engine = engine_with({"max_per_value": [{"feature": "category", "max": 1}]})
    with pytest.raises(InvalidRequest, match="no eligible candidate") as info:
        engine.decide(request("x", slots=4))  # only 3 categories, at most one each
    assert info.value.field == "slots[0]"  # refused before any draw, whatever the seed
    with pytest.raises(InvalidRequest, match="eligible"):
        engine_with(RULES["exclude_if"]).decide(request("y", slots=8))


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"bogus": 1}, "unknown rule"),
        ({"pins": [{"id": "a"}]}, "pin"),
        ({"pins": [{"id": "a", "slot": 0}, {"id": "b", "slot": 0}]}, "same slot"),
        ({"max_per_value": [{"feature": "c", "max": 0}]}, "max"),
        ({"boosts": [{"feature": "c", "equals": 1, "factor": -1}]}, "between"),
        ({"boosts": [{"feature": "c", "equals": 1, "factor": 1e200}]}, "between"),
        ({"freshness": {"feature": "age"}}, "freshness"),
        ({"exploration_share": 1.0}, "exploration_share"),
        ({"exploration_distribution": "random"}, "exploration_distribution"),
        ({"exploration_positions": [0], "pins": [{"id": "a", "slot": 0}]}, "pinned and"),
        ({"exclude_if": [{"feature": "x", "equals": [1]}]}, "equals"),
    ],
)
def test_invalid_rules_are_refused_at_start_up(rules: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy("p", {"rules": rules})
