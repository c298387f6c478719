"""A scorer's batch kept from slot to slot lists exactly the eligible kept examples."""

from __future__ import annotations

import random
from typing import Any

import pytest

from bandit_service.domain import Candidate
from bandit_service.learners.vw import VWLearner, _VWScorer

VW_ARGS = "--cb_explore_adf --epsilon 0.1 -q ua -q sa"


def test_batch_follows_any_eligible_sequence() -> None:
    learner = VWLearner(VW_ARGS)
    candidates = [Candidate(f"c{i}", {"f": i}) for i in range(40)]
    scorer = _VWScorer(learner, {}, candidates)
    kept: list[Any] = [object() for _ in candidates]
    rng = random.Random(3)
    eligible = list(range(40))
    for _ in range(3000):
        kind = rng.random()
        if kind < 0.4 and len(eligible) > 1:  # one placed: the engine's next slot
            eligible = [*eligible]
            del eligible[rng.randrange(len(eligible))]
        elif kind < 0.5:  # the same again
            eligible = [*eligible]
        elif kind < 0.7:  # any subset, any order, repeats
            eligible = [rng.randrange(40) for _ in range(rng.randrange(1, 40))]
        elif kind < 0.8:  # one less, but not by deletion
            eligible = sorted(rng.sample(range(40), max(1, len(eligible) - 1)))
        elif kind < 0.9:
            eligible = list(range(40))
        else:  # not a list
            eligible = tuple(eligible)  # type: ignore[assignment]
        batch = scorer._batch_for(kept, eligible)
        assert batch[0] is None
        assert batch[1:] == [kept[i] for i in eligible]
    learner.close()


def test_batch_is_right_after_a_failed_rebuild() -> None:
    """A mismatch found after the previous positions were shortened, then a failure while
    listing anew (a bad position): the next call must not reuse the old batch."""
    learner = VWLearner(VW_ARGS)
    scorer = _VWScorer(learner, {}, [Candidate(f"c{i}", {"f": i}) for i in range(4)])
    kept: list[Any] = [object() for _ in range(4)]
    assert scorer._batch_for(kept, [0, 1, 2, 3])[1:] == kept
    with pytest.raises(IndexError):
        scorer._batch_for(kept, [0, 1, 99])
    assert scorer._batch_for(kept, [0, 1, 3])[1:] == [kept[0], kept[1], kept[3]]
    learner.close()


def test_scores_as_listed_afresh() -> None:
    """Slot after slot, one scorer's pmfs equal a fresh scorer's for the same subset."""
    learner = VWLearner(VW_ARGS)
    learner.action_examples.build_after = 1  # type: ignore[union-attr]
    candidates = tuple(Candidate(f"c{i}", {"f": i % 5, "g": "xy"[i % 2]}) for i in range(30))
    rng = random.Random(4)
    for i in range(40):  # some learning, so that scores differ
        learner.learn_slot({"u": {"a": i / 40}}, 0, {}, candidates, i % 30, 0.5, rng.random())
    context = {"u": {"a": 0.3}}
    kept_scorer = learner.scorer(context, candidates)
    eligible = list(range(30))
    for k in range(8):
        got = kept_scorer.pmf(k, {}, eligible)
        fresh = learner.scorer(context, candidates).pmf(k, {}, eligible)
        assert got == fresh
        del eligible[rng.randrange(len(eligible))]
    assert kept_scorer._batch is not None  # the kept examples served every slot
    learner.close()
