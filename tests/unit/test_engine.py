"""The engine's promises: exact propensities, reproducible draws, eligibility respected."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
from scipy import stats

from bandit_service.domain import Candidate, DecisionRequest, Slot, slot_list
from bandit_service.engine import DecisionEngine
from bandit_service.errors import InvalidRequest, UnknownPolicy
from bandit_service.learners.vw import VWLearner
from bandit_service.policy import PolicyConfig

CONTEXT = {"device": "mobile", "user": {"segment": "sports"}}
CANDIDATES = tuple(Candidate(id=f"c{i}", features={"topic": t}) for i, t in enumerate("abcde"))


def trained_engine(epsilon: float = 0.3) -> tuple[DecisionEngine, VWLearner]:
    """An engine whose model prefers c2 (so distributions are far from uniform)."""
    policy = PolicyConfig(
        name="p", vw_args=f"--cb_explore_adf --epsilon {epsilon} -q ca -q sa", holdout_share=0
    )
    learner = VWLearner(policy.vw_args)
    for _ in range(30):
        for slot in range(3):
            for chosen in range(len(CANDIDATES)):
                reward = 1.0 if CANDIDATES[chosen].id == "c2" else 0.0
                learner.learn_slot(CONTEXT, slot, {}, CANDIDATES, chosen, 0.2, reward)
    return DecisionEngine({"p": policy}, lambda _name: learner), learner


def request(event_id: str, slots: int = 3, **kwargs: object) -> DecisionRequest:
    return DecisionRequest(
        event_id=event_id,
        policy="p",
        candidates=CANDIDATES,
        slots=slot_list(slots),
        context=CONTEXT,
        **kwargs,  # type: ignore[arg-type]
    )


def test_per_slot_frequencies_match_logged_probabilities() -> None:
    """Chi-square goodness of fit, slot by slot, conditioned on the earlier slots.

    Given the same context and model, slot k's distribution depends only on which candidates
    filled slots 0..k-1. Grouping decisions by that prefix, each group's draws are i.i.d.
    from the logged pmf, so sum over groups of Pearson's statistic is chi-square with
    sum(categories - 1) degrees of freedom. With a fixed seed set the test is deterministic;
    alpha = 0.001 is the false-alarm rate it would have over random seeds.
    """
    engine, _ = trained_engine()
    n = 6000
    groups: dict[tuple[int, tuple[str, ...]], Counter[str]] = defaultdict(Counter)
    logged: dict[tuple[int, tuple[str, ...]], dict[str, float]] = {}
    for i in range(n):
        decision = engine.decide(request(f"calibration-{i}"))
        prefix: tuple[str, ...] = ()
        for choice in decision.slots:
            key = (choice.slot, prefix)
            pmf = dict(choice.pmf)
            assert choice.probability == pmf[choice.id]
            assert sum(pmf.values()) == pytest.approx(1.0, abs=1e-12)
            assert logged.setdefault(key, pmf) == pmf  # same prefix -> same distribution
            groups[key][choice.id] += 1
            prefix = (*prefix, choice.id)

    top = logged[(0, ())]
    assert max(top.values()) > 2 / len(CANDIDATES), "model should be far from uniform"

    statistic, dof = 0.0, 0
    for key, counts in groups.items():
        total = sum(counts.values())
        if total < 50:  # the chi-square approximation needs expected counts >= ~5
            continue
        pmf = logged[key]
        statistic += sum((counts[c] - total * p) ** 2 / (total * p) for c, p in pmf.items())
        dof += len(pmf) - 1
    assert dof >= 30
    p_value = stats.chi2.sf(statistic, dof)
    assert p_value > 0.001, (statistic, dof)


def test_same_event_id_reproduces_the_draw() -> None:
    engine, _ = trained_engine(epsilon=0.9)
    first = engine.decide(request("replay-me"))
    assert engine.decide(request("replay-me")) == first
    others = {tuple(c.id for c in engine.decide(request(f"e{i}")).slots) for i in range(50)}
    assert len(others) > 5  # and different event ids do draw differently


def test_slots_never_repeat_and_exclusions_are_respected() -> None:
    engine, _ = trained_engine()
    for i in range(200):
        decision = engine.decide(request(f"x{i}", slots=3, excluded=frozenset({"c2", "c4"})))
        shown = [c.id for c in decision.slots]
        assert len(set(shown)) == 3
        assert not {"c2", "c4"} & set(shown)
        for choice in decision.slots:
            assert "c2" not in dict(choice.pmf)


def test_explored_flag_marks_non_greedy_draws() -> None:
    engine, _ = trained_engine(epsilon=0.3)
    for i in range(300):
        choice = engine.decide(request(f"g{i}", slots=1)).slots[0]
        assert choice.explored == (choice.id != "c2")


def test_slot_features_reach_the_model() -> None:
    engine, learner = trained_engine()
    req = DecisionRequest(
        event_id="slots", policy="p", candidates=CANDIDATES, context=CONTEXT,
        slots=(Slot("hero", {"size": "big"}), Slot("side", {"size": "small"})),
    )  # fmt: skip
    decision = engine.decide(req)
    assert [c.slot_id for c in decision.slots] == ["hero", "side"]
    assert decision.model_version == learner.model_version


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"slots": 6}, "slots"),
        ({"slots": 4, "excluded": frozenset({"c0", "c1"})}, "slots"),
        ({"slots": 0}, "slots"),
    ],
)
def test_impossible_requests_name_the_field(kwargs: dict, field: str) -> None:
    engine, _ = trained_engine()
    with pytest.raises(InvalidRequest) as info:
        engine.decide(request("bad", **kwargs))
    assert info.value.field == field


def test_duplicate_and_missing_candidates() -> None:
    engine, _ = trained_engine()
    dup = DecisionRequest(
        event_id="d", policy="p", candidates=(*CANDIDATES, Candidate("c1")), slots=slot_list(1)
    )
    with pytest.raises(InvalidRequest) as info:
        engine.decide(dup)
    assert info.value.field == "candidates[5].id"
    empty = DecisionRequest(event_id="d", policy="p", candidates=(), slots=slot_list(1))
    with pytest.raises(InvalidRequest, match="empty"):
        engine.decide(empty)


def test_unknown_policy() -> None:
    engine, _ = trained_engine()
    with pytest.raises(UnknownPolicy):
        engine.decide(DecisionRequest("e", "nope", CANDIDATES, slot_list(1)))


def test_per_slot_exclusions_apply_to_their_slot_only() -> None:
    """Multi-slot Personalizer requests exclude actions per slot: c2 (the model's favourite)
    may not fill slot 0 but may fill slot 1; the logged pmf of slot 0 never holds it."""
    engine, _ = trained_engine()
    slots = (Slot("top", excluded=frozenset({"c2"})), Slot("side"))
    second = Counter()
    for i in range(100):
        decision = engine.decide(DecisionRequest(f"s{i}", "p", CANDIDATES, slots, context=CONTEXT))
        assert decision.slots[0].id != "c2" and "c2" not in dict(decision.slots[0].pmf)
        second[decision.slots[1].id] += 1
    assert second["c2"] > 50  # the greedy choice for the second slot (epsilon 0.3)
    with pytest.raises(InvalidRequest) as error:
        only = (Slot("0", excluded=frozenset(c.id for c in CANDIDATES)),)
        engine.decide(DecisionRequest("none", "p", CANDIDATES, only, context=CONTEXT))
    assert error.value.field == "slots[0]"
