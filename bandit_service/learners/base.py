"""The learner interface the engine depends on (VW in production, fakes in tests)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from bandit_service.domain import Candidate


class SlotScorer(Protocol):
    """Scores one request's candidates, slot after slot (rendering is shared across slots).

    A scorer may also have a ``context_line`` attribute: the context as it rendered it for
    the learner (a string once a slot was scored), which the engine passes on to the
    decision log so the trainer can learn from the same text without rendering it again.
    """

    def pmf(
        self, slot_index: int, slot_features: Mapping[str, Any], eligible: Sequence[int]
    ) -> list[float]:
        """Probabilities over ``eligible`` (indices into the request's candidates), in order."""
        ...


class Learner(Protocol):
    model_version: int

    def scorer(self, context: Mapping[str, Any], candidates: Sequence[Candidate]) -> SlotScorer:
        """Prepare scoring for one request."""
        ...
