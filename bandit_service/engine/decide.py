"""Fill ranked slots, one contextual-bandit draw per slot, logging exact propensities.

For slot ``k`` the candidates that may appear are the request's, minus exclusions (the
request's ``excluded`` and the policy's ``exclude_if`` filters), minus pinned candidates
(they have their own slot), minus those placed in slots ``0..k-1``, minus those a
diversity cap forbids now or that would leave the remaining slots unfillable. The learner
gives a distribution over them, rules reweight or mix it (see ``bandit_service/rules.py``),
the engine draws with a generator seeded by the event id, and the logged probability is
that final distribution's value for the drawn candidate: P(candidate | context, earlier
slots, pins, rules). Pinned slots are logged with probability 1 and ``explored: false``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from bandit_service.domain import Candidate, Decision, DecisionRequest, Slot, SlotChoice
from bandit_service.engine import sampling
from bandit_service.errors import InvalidRequest, UnknownPolicy
from bandit_service.holdout import PopularityScores, in_holdout, ranking
from bandit_service.learners.base import Learner, SlotScorer
from bandit_service.policy import PolicyConfig
from bandit_service.rules import group_key, page_capacity


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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policies = dict(policies)
        self._learner_for = learner_for
        self._popularity_for = popularity_for
        self._clock = clock

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
        if not request.slots:
            raise InvalidRequest("at least one slot is required", "slots")
        slot_ids = [slot.id for slot in request.slots]
        if len(set(slot_ids)) != len(slot_ids):
            raise InvalidRequest(f"slot ids must be unique, got {slot_ids}", "slots")
        page = _Page.plan(policy, request)
        learner = self._learner_for(policy.name)
        # The holdout measures the *learned* policy; apprentice and logging-only policies
        # serve their baseline to everyone.
        holdout = policy.learning_mode == "online" and in_holdout(
            policy, request.user_id, request.event_id
        )
        popularity = (
            self._popularity_for(policy.name)
            if self._popularity_for is not None
            else PopularityScores(prior=0.0)
        )
        scorer = None if holdout else learner.scorer(request.context, candidates)
        weights = (
            [policy.rules.weight(c.features, self._clock()) for c in candidates]
            if policy.rules.reweights and not holdout
            else None
        )
        rng = sampling.event_rng(request.event_id)
        choices: list[SlotChoice] = []
        for k, slot in enumerate(request.slots):
            if k in page.pins:
                index = page.pins[k]
                choices.append(
                    SlotChoice(
                        k, slot.id, candidates[index].id, 1.0, False, ((candidates[index].id, 1.0),)
                    )
                )
                continue
            allowed = page.allowed(k)
            ids = [candidates[i].id for i in allowed]
            model_id = None
            if holdout:
                chosen = ranking(ids, popularity)[0]
                pmf = [1.0 if i == chosen else 0.0 for i in range(len(ids))]
                explored = False
            elif policy.serves_baseline:
                assert scorer is not None
                chosen, pmf, model_id = self._baseline(policy, scorer, k, slot, ids, allowed)
                explored = False
            else:
                assert scorer is not None
                chosen, pmf, explored = self._draw(
                    policy, scorer, k, slot, allowed, ids, weights, popularity, rng.random
                )
            choices.append(
                SlotChoice(
                    slot=k,
                    slot_id=slot.id,
                    id=ids[chosen],
                    probability=pmf[chosen],
                    explored=explored,
                    pmf=tuple(zip(ids, pmf, strict=True)),
                    model_id=model_id,
                )
            )
            page.place(allowed[chosen])
        return Decision(
            event_id=request.event_id,
            policy=policy.name,
            policy_version=policy.version,
            model_version=learner.model_version,
            arm="holdout" if holdout else "bandit",
            slots=tuple(choices),
            deferred=request.defer,
        )

    @staticmethod
    def _draw(
        policy: PolicyConfig,
        scorer: SlotScorer,
        k: int,
        slot: Slot,
        allowed: list[int],
        ids: list[str],
        weights: list[float] | None,
        popularity: PopularityScores,
        uniform: Callable[[], float],
    ) -> tuple[int, list[float], bool]:
        """One online slot: the model's pmf, reweighted by rules, mixed with exploration.

        ``explored`` is true when the slot drew from the exploration distribution (an
        exploration position, or the ``exploration_share`` coin came up), and otherwise when
        the drawn candidate is not among the policy's greedy choices for the slot (those
        tied for its highest probability).
        """
        rules = policy.rules
        p = sampling.normalise(scorer.pmf(k, slot.features, allowed))
        if weights is not None:
            p = sampling.normalise([pi * weights[i] for pi, i in zip(p, allowed, strict=True)])
        if k in rules.exploration_positions:
            q = _exploration_distribution(rules.exploration_distribution, ids, popularity)
            return sampling.draw(q, uniform()), q, True
        share = rules.exploration_share
        if share > 0:
            q = _exploration_distribution(rules.exploration_distribution, ids, popularity)
            mixture = [share * qi + (1 - share) * pi for qi, pi in zip(q, p, strict=True)]
            explore = uniform() < share
            chosen = sampling.draw(q if explore else p, uniform())
            return chosen, mixture, explore or not sampling.is_greedy(p, chosen)
        chosen = sampling.draw(p, uniform())
        return chosen, p, not sampling.is_greedy(p, chosen)

    @staticmethod
    def _baseline(
        policy: PolicyConfig,
        scorer: SlotScorer,
        k: int,
        slot: Slot,
        ids: list[str],
        allowed: list[int],
    ) -> tuple[int, list[float], str | None]:
        """Apprentice / logging-only: show the baseline with probability 1.

        The baseline is the slot's explicit ``baseline`` id, else the first eligible
        candidate. Apprentice mode also asks the model what it would have shown, so the
        match rate can be reported without ever showing the model's choice.
        """
        if slot.baseline is None:
            chosen = 0
        elif slot.baseline in ids:
            chosen = ids.index(slot.baseline)
        else:
            raise InvalidRequest(
                f"baseline {slot.baseline!r} is not an eligible candidate for this slot "
                "(unknown, excluded, pinned, capped or already placed in an earlier slot)",
                f"slots[{k}].baseline",
            )
        pmf = [1.0 if i == chosen else 0.0 for i in range(len(ids))]
        model_id = None
        if policy.learning_mode == "apprentice":
            model_pmf = scorer.pmf(k, slot.features, allowed)
            model_id = ids[sampling.greedy(model_pmf)]
        return chosen, pmf, model_id


def _exploration_distribution(
    kind: str, ids: list[str], popularity: PopularityScores
) -> list[float]:
    """Uniform over the allowed candidates, or ``least_shown``: weight 1 / (1 + n_i) with
    n_i the candidate's recent (decayed) impressions, so never-seen candidates are favoured
    most: this is how cold-start candidates get exposure."""
    if kind == "least_shown":
        return sampling.normalise([1.0 / (1.0 + popularity.shown.get(cid, 0.0)) for cid in ids])
    return [1.0 / len(ids)] * len(ids)


@dataclass
class _Page:
    """The state of one request's page while its slots are filled: what is still free,
    what is pinned where, and how many of each capped value are already on the page."""

    policy: PolicyConfig
    candidates: tuple[Candidate, ...]
    slot_count: int
    free: list[int]
    pins: dict[int, int]
    counts: list[Counter[str]] = field(default_factory=list)

    @classmethod
    def plan(cls, policy: PolicyConfig, request: DecisionRequest) -> _Page:
        candidates = request.candidates
        index = {c.id: i for i, c in enumerate(candidates)}
        rules = policy.rules
        excluded = {
            i for i, c in enumerate(candidates)
            if c.id in request.excluded or rules.excluded_by_filters(c.features)
        }  # fmt: skip
        # Pins: the policy's, then the request's (which win for the same slot).
        wanted = {pin.slot: pin.id for pin in rules.pins}
        wanted.update({slot: cid for cid, slot in request.pins})
        pins: dict[int, int] = {}
        for slot, cid in sorted(wanted.items()):
            if slot >= len(request.slots):
                if slot in {s for _c, s in request.pins}:
                    raise InvalidRequest(
                        f"pin of {cid!r} to slot {slot}, but the page has "
                        f"{len(request.slots)} slot(s)", "pins",
                    )  # fmt: skip
                continue  # a policy pin beyond a short page does not apply
            if cid not in index:
                if slot in {s for _c, s in request.pins}:
                    raise InvalidRequest(f"pinned candidate {cid!r} is not a candidate", "pins")
                continue  # a policy pin for a candidate not offered today does not apply
            if index[cid] in excluded:
                raise InvalidRequest(
                    f"candidate {cid!r} is both pinned (slot {slot}) and excluded", "pins"
                )
            if index[cid] in pins.values():
                raise InvalidRequest(f"candidate {cid!r} is pinned to two slots", "pins")
            pins[slot] = index[cid]
        pinned = set(pins.values())
        free = [i for i in range(len(candidates)) if i not in excluded and i not in pinned]
        open_slots = len(request.slots) - len(pins)
        if open_slots > len(free):
            raise InvalidRequest(
                f"{len(request.slots)} slot(s) requested but only {len(free) + len(pins)} "
                "candidate(s) are eligible after exclusions and pins",
                "slots",
            )
        page = cls(policy, candidates, len(request.slots), free, pins)
        page.counts = [Counter() for _ in rules.max_per_value]
        for i in pinned:  # pins count towards the caps of the whole page
            page._count(i)
        return page

    def _key(self, i: int, cap_index: int) -> str | None:
        return group_key(
            self.candidates[i].features, self.policy.rules.max_per_value[cap_index].feature
        )

    def _count(self, i: int) -> None:
        for c in range(len(self.counts)):
            key = self._key(i, c)
            if key is not None:
                self.counts[c][key] += 1

    def place(self, i: int) -> None:
        self.free.remove(i)
        self._count(i)

    def allowed(self, k: int) -> list[int]:
        """Free candidates that may fill slot ``k`` without breaking a cap, now or later
        (each cap on its own: the remaining open slots must stay fillable)."""
        later = sum(1 for s in range(k + 1, self.slot_count) if s not in self.pins)
        allowed = list(self.free)
        for c, cap in enumerate(self.policy.rules.max_per_value):
            counts = self.counts[c]
            keys = {i: self._key(i, c) for i in self.free}
            allowed = [
                i for i in allowed
                if keys[i] is None or counts[keys[i]] < cap.max  # type: ignore[index]
            ]  # fmt: skip
            if later:
                feasible_after: dict[str | None, bool] = {}
                for i in allowed:
                    key = keys[i]
                    if key not in feasible_after:
                        after = Counter(counts)
                        if key is not None:
                            after[key] += 1
                        rest = [keys[j] for j in self.free if j != i]
                        feasible_after[key] = page_capacity(rest, after, cap.max) >= later
                allowed = [i for i in allowed if feasible_after[keys[i]]]
        if not allowed:
            raise InvalidRequest(
                f"the rules leave slot {k} with no eligible candidate (diversity caps "
                f"{[(c.feature, c.max) for c in self.policy.rules.max_per_value]}, after "
                "exclusions and pins); offer more varied candidates or fewer slots",
                f"slots[{k}]",
            )
        return allowed


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
