"""A scorer's first batch over every candidate is the kept examples copied whole: the same
list as listing them by position, and the shared list of positions is never changed."""

from __future__ import annotations

from typing import Any

from bandit_service.domain import Candidate
from bandit_service.learners.vw import VWLearner, _every_position, _VWScorer

VW_ARGS = "--cb_explore_adf --epsilon 0.1 -q ua -q sa"


def test_every_candidate_batch_then_slot_after_slot() -> None:
    learner = VWLearner(VW_ARGS)
    candidates = [Candidate(f"c{i}", {"f": i}) for i in range(12)]
    kept: list[Any] = [object() for _ in candidates]
    for count in (1, 2, 12):
        scorer = _VWScorer(learner, {}, candidates[:count])
        eligible = list(range(count))
        batch = scorer._batch_for(kept[:count], eligible)
        assert batch == [None, *kept[:count]] and batch is not kept
        while len(eligible) > 1:  # the engine's next slots: one placed each time
            del eligible[len(eligible) // 2]
            batch = scorer._batch_for(kept[:count], eligible)
            assert batch[1:] == [kept[i] for i in eligible]
        assert _every_position(count) == list(range(count))  # never mutated
    # Not every candidate, or not in order: listed by position.
    scorer = _VWScorer(learner, {}, candidates)
    assert scorer._batch_for(kept, [1, 0, *range(2, 12)])[1:] == [kept[1], kept[0], *kept[2:]]
    scorer = _VWScorer(learner, {}, candidates)
    assert scorer._batch_for(kept, tuple(range(12)))[1:] == kept  # a tuple: copied too
    assert scorer._batch_for(kept, list(range(11)))[1:] == kept[:11]
    learner.close()
