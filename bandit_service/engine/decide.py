"""Fill ranked slots, one contextual-bandit draw per slot, logging exact propensities.

For slot ``k`` the eligible set is the request's candidates minus exclusions minus those
already placed in slots ``0..k-1``. The learner gives a distribution over that set, the
engine draws from it with a generator seeded by the event id, and the logged probability
is that distribution's value for the drawn candidate: P(candidate | context, earlier slots).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from bandit_service.domain import Candidate, Decision, DecisionRequest, Slot, SlotChoice
from bandit_service.engine import sampling
from bandit_service.errors import InvalidRequest, UnknownPolicy
from bandit_service.holdout import PopularityScores, in_holdout, ranking
from bandit_service.learners.base import Learner, SlotScorer
from bandit_service.policy import PolicyConfig


class DecisionEngine:
    """Decides for any configured policy. Holds no I/O: callers log what it returns.

    ``learner_for`` is looked up on every call so a newer model can be swapped in
    atomically between decisions.
    """

    def __init__(
        self,
        policies: Mapping[str, PolicyConfig],
        learner_for: Callable[[str], Learner],
        popularity_for: Callable[[str], PopularityScores] | None = None,
    ) -> None:
        self.policies = dict(policies)
        self._learner_for = learner_for
        self._popularity_for = popularity_for

    def policy(self, name: str) -> PolicyConfig:
        try:
            return self.policies[name]
        except KeyError:
            known = ", ".join(sorted(self.policies)) or "none"
            raise UnknownPolicy(f"unknown policy {name!r} (known: {known})", "policy") from None

    def decide(self, request: DecisionRequest) -> Decision:
        policy = self.policy(request.policy)
        candidates = request.candidates
        _check_candidates(candidates)
        eligible = [i for i, c in enumerate(candidates) if c.id not in request.excluded]
        if not request.slots:
            raise InvalidRequest("at least one slot is required", "slots")
        slot_ids = [slot.id for slot in request.slots]
        if len(set(slot_ids)) != len(slot_ids):
            raise InvalidRequest(f"slot ids must be unique, got {slot_ids}", "slots")
        if len(request.slots) > len(eligible):
            raise InvalidRequest(
                f"{len(request.slots)} slot(s) requested but only {len(eligible)} candidate(s) "
                "are eligible after exclusions",
                "slots",
            )

        learner = self._learner_for(policy.name)
        if in_holdout(policy, request.user_id, request.event_id):
            return self._holdout(policy, request, eligible, learner.model_version)
        scorer = learner.scorer(request.context, candidates)
        rng = sampling.event_rng(request.event_id)
        choices: list[SlotChoice] = []
        for slot_index, slot in enumerate(request.slots):
            if policy.serves_baseline:
                chosen, pmf, model_id = self._baseline(
                    policy, scorer, slot_index, slot, candidates, eligible
                )
            else:
                pmf = sampling.normalise(scorer.pmf(slot_index, slot.features, eligible))
                chosen, model_id = sampling.draw(pmf, rng.random()), None
            choices.append(
                SlotChoice(
                    slot=slot_index,
                    slot_id=slot.id,
                    id=candidates[eligible[chosen]].id,
                    probability=pmf[chosen],
                    explored=chosen != sampling.greedy(pmf),
                    pmf=tuple((candidates[i].id, p) for i, p in zip(eligible, pmf, strict=True)),
                    model_id=model_id,
                )
            )
            del eligible[chosen]
        return Decision(
            event_id=request.event_id,
            policy=policy.name,
            policy_version=policy.version,
            model_version=learner.model_version,
            arm="bandit",
            slots=tuple(choices),
            deferred=request.defer,
        )

    def _holdout(
        self, policy: PolicyConfig, request: DecisionRequest, eligible: list[int], version: int
    ) -> Decision:
        """The popularity arm: slots filled in popularity order, each with probability 1."""
        popularity = (
            self._popularity_for(policy.name)
            if self._popularity_for is not None
            else PopularityScores(prior=0.0)
        )
        ids = [request.candidates[i].id for i in eligible]
        order = ranking(ids, popularity)
        choices = []
        for slot_index, slot in enumerate(request.slots):
            chosen_id = ids[order[slot_index]]
            remaining = [ids[i] for i in sorted(order[slot_index:])]  # still eligible
            choices.append(
                SlotChoice(
                    slot=slot_index,
                    slot_id=slot.id,
                    id=chosen_id,
                    probability=1.0,
                    explored=False,
                    pmf=tuple((cid, 1.0 if cid == chosen_id else 0.0) for cid in remaining),
                )
            )
        return Decision(
            event_id=request.event_id,
            policy=policy.name,
            policy_version=policy.version,
            model_version=version,
            arm="holdout",
            slots=tuple(choices),
            deferred=request.defer,
        )

    @staticmethod
    def _baseline(
        policy: PolicyConfig,
        scorer: SlotScorer,
        slot_index: int,
        slot: Slot,
        candidates: tuple[Candidate, ...],
        eligible: list[int],
    ) -> tuple[int, list[float], str | None]:
        """Apprentice / logging-only: show the baseline with probability 1.

        The baseline is the slot's explicit ``baseline`` id, else the first eligible
        candidate. Apprentice mode also asks the model what it would have shown, so the
        match rate can be reported without ever showing the model's choice.
        """
        ids = [candidates[i].id for i in eligible]
        if slot.baseline is None:
            chosen = 0
        elif slot.baseline in ids:
            chosen = ids.index(slot.baseline)
        else:
            raise InvalidRequest(
                f"baseline {slot.baseline!r} is not an eligible candidate for this slot "
                "(unknown, excluded or already placed in an earlier slot)",
                f"slots[{slot_index}].baseline",
            )
        pmf = [1.0 if i == chosen else 0.0 for i in range(len(ids))]
        model_id = None
        if policy.learning_mode == "apprentice":
            model_pmf = scorer.pmf(slot_index, slot.features, eligible)
            model_id = ids[sampling.greedy(model_pmf)]
        return chosen, pmf, model_id


def _check_candidates(candidates: tuple[Candidate, ...]) -> None:
    if not candidates:
        raise InvalidRequest("candidates must not be empty", "candidates")
    seen: dict[str, int] = {}
    for index, candidate in enumerate(candidates):
        if candidate.id in seen:
            first = seen[candidate.id]
            raise InvalidRequest(
                f"duplicate candidate id {candidate.id!r} (also at candidates[{first}])",
                f"candidates[{index}].id",
            )
        seen[candidate.id] = index
