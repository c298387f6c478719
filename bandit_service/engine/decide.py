"""Fill ranked slots, one contextual-bandit draw per slot, logging exact propensities.

For slot ``k`` the candidates that may appear are the request's, minus exclusions (the
request's ``excluded`` and the policy's ``exclude_if`` filters), minus pinned candidates
(they have their own slot), minus those placed in slots ``0..k-1``, minus those a
diversity cap forbids now or that would leave the remaining slots unfillable. The learner
gives a distribution over them, rules reweight or mix it (see ``bandit_service/rules.py``),
the engine draws with uniforms determined by the event id, and the logged probability is
that final distribution's value for the drawn candidate: P(candidate | context, earlier
slots, pins, rules). Pinned slots are logged with probability 1 and ``explored: false``.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from bandit_service.domain import (
    Candidate,
    Decision,
    DecisionRequest,
    Distribution,
    Slot,
    SlotChoice,
)
from bandit_service.engine import sampling
from bandit_service.errors import InvalidRequest, UnknownPolicy
from bandit_service.holdout import PopularityScores, in_holdout, ranking
from bandit_service.learners.base import Learner, SlotScorer
from bandit_service.policy import PolicyConfig
from bandit_service.rules import group_key


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
        all_ids = _candidate_ids(candidates)
        if not request.slots:
            raise InvalidRequest("at least one slot is required", "slots")
        if len(request.slots) > 1:  # (one slot's id is unique: no list and set built)
            slot_ids = [slot.id for slot in request.slots]
            if len(set(slot_ids)) != len(slot_ids):
                raise InvalidRequest(f"slot ids must be unique, got {slot_ids}", "slots")
        page = _Page.plan(policy, request)
        learner = self._learner_for(policy.name)
        # The holdout measures the *learned* policy; apprentice and logging-only policies
        # serve their baseline to everyone.
        # An opted-out user (issue 10) gets the non-personalized ranking under its own arm,
        # which the trainer never learns from: the holdout's popularity ranking (online
        # policies) or the baseline (apprentice and logging-only, without asking the model).
        opted_out = not request.personalize
        holdout = (opted_out and not policy.serves_baseline) or (
            not opted_out
            and policy.learning_mode == "online"
            and in_holdout(policy, request.user_id, request.event_id)
        )
        popularity = (
            self._popularity_for(policy.name)
            if self._popularity_for is not None
            else PopularityScores(prior=0.0)
        )
        scorer = None if holdout or opted_out else learner.scorer(request.context, candidates)
        weights = None
        if policy.rules.reweights and not holdout:  # the clock serves reweighting only
            now = self._clock()
            weights = [policy.rules.weight(c.features, now) for c in candidates]
        # Only online draws use the event's uniforms (determined by the event id):
        # holdout and baseline slots are deterministic.
        uniform = (
            sampling.event_uniforms(request.event_id)
            if not holdout and not policy.serves_baseline
            else None
        )
        # Each slot's distribution goes out as the engine holds it, positions in the
        # request's candidate order and probabilities (domain.Distribution), which is what
        # the log stores: no (id, p) pairs are built per decision (store/compact.py).
        choices: list[SlotChoice] = []
        for k, slot in enumerate(request.slots):
            if k in page.pins:
                index = page.pins[k]
                pinned = Distribution(all_ids, [index], [1.0])
                choices.append(SlotChoice(k, slot.id, all_ids[index], 1.0, False, pinned))
                continue
            allowed = page.allowed(k)
            model_id = None
            if holdout:
                ids = [all_ids[i] for i in allowed]
                chosen = ranking(ids, popularity)[0]
                pmf = [1.0 if i == chosen else 0.0 for i in range(len(ids))]
                explored = False
            elif policy.serves_baseline:
                ids = [all_ids[i] for i in allowed]
                chosen, pmf, model_id = self._baseline(policy, scorer, k, slot, ids, allowed)
                explored = False
            else:
                assert scorer is not None and uniform is not None
                chosen, pmf, explored = self._draw(
                    policy, scorer, k, slot, allowed, all_ids, weights, popularity, uniform
                )
            # Positional (slot, slot_id, id, probability, explored, distribution,
            # model_id): keywords cost ~0.3 µs more a slot.
            choices.append(
                SlotChoice(
                    k, slot.id, all_ids[allowed[chosen]], pmf[chosen], explored,
                    Distribution(all_ids, allowed, pmf), model_id,
                )
            )  # fmt: skip
            page.place(allowed[chosen])
        return Decision(
            event_id=request.event_id,
            policy=policy.name,
            policy_version=policy.version,
            model_version=learner.model_version,
            arm="opted_out" if opted_out else "holdout" if holdout else "bandit",
            slots=tuple(choices),
            deferred=request.defer,
            # Learners that render text expose it (see SlotScorer); others do not.
            context_line=getattr(scorer, "context_line", None),
        )

    @staticmethod
    def _draw(
        policy: PolicyConfig,
        scorer: SlotScorer,
        k: int,
        slot: Slot,
        allowed: list[int],
        all_ids: Sequence[str],
        weights: list[float] | None,
        popularity: PopularityScores,
        uniform: Callable[[], float],
    ) -> tuple[int, list[float], bool]:
        """One online slot: the model's pmf, reweighted by rules, mixed with exploration.

        ``explored`` is true when the slot drew from the exploration distribution (an
        exploration position, or the ``exploration_share`` coin came up), and otherwise when
        the drawn candidate is not among the policy's greedy choices for the slot (those
        tied for its highest probability). ``all_ids`` are the request's candidate ids: the
        allowed ones' are only listed for an exploration distribution.
        """
        rules = policy.rules
        if weights is None and k not in rules.exploration_positions:
            share = rules.exploration_share
            if not share > 0:
                # No reweighting, no exploration mixed in (the default policy): the
                # model's pmf normalised, one draw, greedy or not, in one call that is
                # cheaper for an epsilon-greedy pmf (sampling.normalise_and_draw: ~23 to
                # 30 µs less a 500-candidate slot). The same numbers as the general way.
                p, chosen, greedy = sampling.normalise_and_draw(
                    scorer.pmf(k, slot.features, allowed), uniform
                )
                return chosen, p, not greedy
        p = sampling.normalise(scorer.pmf(k, slot.features, allowed))
        if weights is not None:
            p = sampling.normalise([pi * weights[i] for pi, i in zip(p, allowed, strict=True)])
        if k in rules.exploration_positions:
            ids = [all_ids[i] for i in allowed]
            q = _exploration_distribution(rules.exploration_distribution, ids, popularity)
            return sampling.draw_normalised(q, uniform()), q, True
        share = rules.exploration_share
        if share > 0:
            ids = [all_ids[i] for i in allowed]
            q = _exploration_distribution(rules.exploration_distribution, ids, popularity)
            mixture = [share * qi + (1 - share) * pi for qi, pi in zip(q, p, strict=True)]
            explore = uniform() < share
            chosen = sampling.draw_normalised(q if explore else p, uniform())
            return chosen, mixture, explore or not sampling.is_greedy_normalised(p, chosen)
        chosen = sampling.draw_normalised(p, uniform())
        return chosen, p, not sampling.is_greedy_normalised(p, chosen)

    @staticmethod
    def _baseline(
        policy: PolicyConfig,
        scorer: SlotScorer | None,
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
        if policy.learning_mode == "apprentice" and scorer is not None:
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
    slot_excluded: list[frozenset[str]] = field(default_factory=list)
    # keys[c][i]: candidate i's group key under cap c (None: not capped), computed once
    # per request rather than for every free candidate at every slot.
    keys: list[list[str | None]] = field(default_factory=list)

    @classmethod
    def plan(cls, policy: PolicyConfig, request: DecisionRequest) -> _Page:
        candidates = request.candidates
        rules = policy.rules
        if not (
            request.excluded or rules.exclude_if or request.pins or rules.pins
            or rules.max_per_value
        ):  # fmt: skip
            # Nothing excluded, pinned or capped (the usual page): every candidate is free
            # and there are no counts to keep. The same page as below, without building
            # the empty sets, maps and counters one by one (~3 µs of a 50 x 1 decision).
            if len(request.slots) > len(candidates):
                raise InvalidRequest(
                    f"{len(request.slots)} slot(s) requested but only {len(candidates)} "
                    "candidate(s) are eligible after exclusions and pins",
                    "slots",
                )
            return cls(
                policy, candidates, len(request.slots), list(range(len(candidates))), {}, [],
                [slot.excluded for slot in request.slots], [],
            )  # fmt: skip
        excluded = (
            {
                i for i, c in enumerate(candidates)
                if c.id in request.excluded or rules.excluded_by_filters(c.features)
            }
            if request.excluded or rules.exclude_if
            else set()
        )  # fmt: skip
        pins = _plan_pins(policy, request, excluded) if request.pins or rules.pins else {}
        pinned = set(pins.values())
        free = (
            [i for i in range(len(candidates)) if i not in excluded and i not in pinned]
            if excluded or pinned
            else list(range(len(candidates)))
        )
        open_slots = len(request.slots) - len(pins)
        if open_slots > len(free):
            raise InvalidRequest(
                f"{len(request.slots)} slot(s) requested but only {len(free) + len(pins)} "
                "candidate(s) are eligible after exclusions and pins",
                "slots",
            )
        page = cls(policy, candidates, len(request.slots), free, pins)
        page.slot_excluded = [slot.excluded for slot in request.slots]
        page.counts = [Counter() for _ in rules.max_per_value]
        page.keys = [
            [group_key(c.features, cap.feature) for c in candidates] for cap in rules.max_per_value
        ]
        for i in pinned:  # pins count towards the caps of the whole page
            page._count(i)
        for cap, counts in zip(rules.max_per_value, page.counts, strict=True):
            over = [key for key, count in counts.items() if count > cap.max]
            if over:
                raise InvalidRequest(
                    f"the pins put more than {cap.max} candidate(s) with the same "
                    f"{cap.feature!r} on the page ({over[0]}), beyond its diversity cap",
                    "pins",
                )
        return page

    def _count(self, i: int) -> None:
        for counts, keys in zip(self.counts, self.keys, strict=True):
            key = keys[i]
            if key is not None:
                counts[key] += 1

    def place(self, i: int) -> None:
        # ``free`` stays in increasing order (built so, only ever deleted from): bisection
        # finds ``i`` where ``list.remove`` compared it with every earlier entry (0.2 µs
        # instead of ~2 µs a slot for 500 candidates, measured at random positions).
        free = self.free
        at = bisect_left(free, i)
        if at < len(free) and free[at] == i:
            del free[at]
        else:
            free.remove(i)  # not there: ValueError, as before
        if self.counts:
            self._count(i)

    def allowed(self, k: int) -> list[int]:
        """Free candidates that may fill slot ``k`` without breaking a cap, now or later.

        Each cap is checked on its own: a candidate is masked when placing it would leave
        fewer fillable places under that cap than open slots remain. With one cap this is
        exact (a page is refused before any draw if and only if no valid page exists); with
        several caps it is a necessary condition, and an unlucky combination can still
        leave a later slot empty (a 422 naming that slot).
        """
        allowed = list(self.free)
        if self.slot_excluded and self.slot_excluded[k]:
            banned = self.slot_excluded[k]
            allowed = [i for i in allowed if self.candidates[i].id not in banned]
        caps = self.policy.rules.max_per_value
        later = sum(1 for s in range(k + 1, self.slot_count) if s not in self.pins) if caps else 0
        for c, cap in enumerate(caps):
            counts = self.counts[c]
            keys = self.keys[c]
            allowed = [
                i for i in allowed
                if keys[i] is None or counts[keys[i]] < cap.max  # type: ignore[index]
            ]  # fmt: skip
            if later:
                available = Counter([keys[i] for i in self.free])

                def room(key: str | None, n: int, placed: int, cap_max: int = cap.max) -> int:
                    return n if key is None else min(n, max(0, cap_max - placed))

                # Places the free candidates can still fill under this cap, and how that
                # total changes when one candidate of a key is placed: O(1) per key.
                total = sum(
                    room(g, n, counts.get(g, 0) if g is not None else 0)
                    for g, n in available.items()
                )
                feasible: dict[str | None, bool] = {}
                for g, n in available.items():
                    placed = counts.get(g, 0) if g is not None else 0
                    after = total - room(g, n, placed) + room(g, n - 1, placed + 1)
                    feasible[g] = after >= later
                allowed = [i for i in allowed if feasible[keys[i]]]
        if not allowed:
            raise InvalidRequest(
                f"the rules leave slot {k} with no eligible candidate (diversity caps "
                f"{[(c.feature, c.max) for c in self.policy.rules.max_per_value]}, after "
                "exclusions and pins); offer more varied candidates or fewer slots",
                f"slots[{k}]",
            )
        return allowed


def _plan_pins(
    policy: PolicyConfig, request: DecisionRequest, excluded: set[int]
) -> dict[int, int]:
    """Slot -> candidate position. A request pin is the caller's explicit wish: an unknown,
    excluded, doubly pinned or out-of-page one is a 422 naming ``pins``. A policy pin is a
    standing rule: it does not apply to a page without its candidate (not offered, or
    excluded), beyond a shorter page, or where a request pin claims its slot or moves its
    candidate."""
    index = {c.id: i for i, c in enumerate(request.candidates)}
    slots = len(request.slots)
    pins: dict[int, int] = {}
    requested_ids: set[str] = set()
    for cid, slot in request.pins:
        if slot in pins:
            raise InvalidRequest(f"two request pins for slot {slot}", "pins")
        if slot >= slots:
            raise InvalidRequest(
                f"pin of {cid!r} to slot {slot}, but the page has {slots} slot(s)", "pins"
            )
        if cid not in index:
            raise InvalidRequest(f"pinned candidate {cid!r} is not a candidate", "pins")
        if index[cid] in excluded:
            raise InvalidRequest(f"candidate {cid!r} is both pinned and excluded", "pins")
        if cid in requested_ids:
            raise InvalidRequest(f"candidate {cid!r} is pinned to two slots", "pins")
        requested_ids.add(cid)
        pins[slot] = index[cid]
    for pin in policy.rules.pins:
        if (
            pin.slot >= slots
            or pin.slot in pins
            or pin.id in requested_ids
            or pin.id not in index
            or index[pin.id] in excluded
        ):
            continue
        pins[pin.slot] = index[pin.id]
    return pins


def _candidate_ids(candidates: tuple[Candidate, ...]) -> Sequence[str]:
    """The candidates' ids in request order, once checked: at least one, none twice.

    A kept candidate set (``candidate_sets.KeptCandidates``, a repeated inline set or a
    catalog selection) carries its ids and their positions, built once for the set
    (``logged.ids``, a ``store.compact.CandidateIds``): as many positions as ids means no
    id twice, so neither the list of ids nor the set that checks them is built per
    decision (together ~25 µs of a 500-candidate decision). Only read, like the set.
    """
    if not candidates:
        raise InvalidRequest("candidates must not be empty", "candidates")
    kept = getattr(getattr(candidates, "logged", None), "ids", None)
    if (
        kept is not None
        and len(kept) == len(candidates)
        and len(getattr(kept, "position", ())) == len(kept)
    ):
        return kept
    ids = [c.id for c in candidates]
    if len(set(ids)) == len(ids):
        return ids  # the usual case, one set built; the loop below names a duplicate
    seen: dict[str, int] = {}
    for index, candidate in enumerate(candidates):
        if candidate.id in seen:
            first = seen[candidate.id]
            raise InvalidRequest(
                f"duplicate candidate id {candidate.id!r} (also at candidates[{first}])",
                f"candidates[{index}].id",
            )
        seen[candidate.id] = index
    raise AssertionError("unreachable: a duplicate id was counted")  # pragma: no cover
