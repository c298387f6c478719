"""Drive the service's own engine and learner directly, on a simulated clock (fast: sweeps).

Nothing of the bandit is reimplemented here. Each visit goes through
:class:`~bandit_service.engine.DecisionEngine` (holdout routing, rules, the seeded draw);
the decision is turned into the service's stored row by
:func:`bandit_service.service.decision_row`; rewards are attached to that row as they
arrive, flagged ``late`` after the window exactly as the service flags them; and once an
event's window has closed (:func:`bandit_service.rewards.readiness`), the trainer's
:func:`bandit_service.training.learning_examples` turns it into the
:class:`~bandit_service.learners.vw.VWLearner` updates the trainer would make. The
holdout's popularity ranking is recomputed from closed events with the service's
:func:`bandit_service.holdout.compute_popularity`.

One visit arrives per simulated second. What differs from the live service: no store, no
group commit, no checkpoints, and the model is updated as soon as a window closes instead
of on the trainer's interval (the HTTP runner exercises those).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bandit_service.domain import DecisionRequest, slot_list
from bandit_service.engine import DecisionEngine
from bandit_service.holdout import PopularityScores, compute_popularity, prior_mean
from bandit_service.learners.vw import VWLearner
from bandit_service.policy import PolicyConfig
from bandit_service.rewards import readiness
from bandit_service.service import decision_row
from bandit_service.training import eligible_from_pmf, learning_examples
from simulators.metrics import WindowAggregator
from simulators.outcomes import ShownSlot, outcome
from simulators.scenarios import Objective, World

SECONDS_PER_STEP = 1.0
POPULARITY_MEMORY = 5000  # closed events kept for the holdout's popularity ranking


@dataclass
class RunResult:
    windows: list[dict[str, Any]]
    summary: dict[str, Any]


def run_inprocess(
    world: World,
    policy: PolicyConfig,
    steps: int,
    seed: int,
    window: int,
    objective: Objective = "click",
    progress: Callable[[int], None] | None = None,
) -> RunResult:
    """Simulate ``steps`` visits of ``world`` served by ``policy``; metrics per ``window``."""
    learner = VWLearner(policy.vw_args)
    clock = [0.0]
    popularity = PopularityScores(prior=prior_mean(policy))

    def popularity_for(_name: str) -> PopularityScores:
        return popularity

    engine = DecisionEngine(
        {policy.name: policy}, lambda _name: learner, popularity_for, clock=lambda: clock[0]
    )
    visits = np.random.default_rng([seed, 0])
    pending: deque[tuple[dict[str, Any], dict[str, Any]]] = deque()  # (row, candidates by id)
    arrivals: list[tuple[float, int, int, dict[str, Any], dict[str, Any]]] = []
    closed: deque[dict[str, Any]] = deque(maxlen=POPULARITY_MEMORY)
    needs_popularity = (
        policy.holdout_share > 0 or policy.rules.exploration_distribution == "least_shown"
    )
    next_popularity = 0.0
    metrics = WindowAggregator(window, world.has_satisfaction)
    window_seconds = policy.reward_window_seconds
    tiebreak = 0
    for step in range(steps):
        now = clock[0] = step * SECONDS_PER_STEP
        while arrivals and arrivals[0][0] <= now:
            at, _, _, row, reward = heapq.heappop(arrivals)
            reward["late"] = at > row["created_at"] + window_seconds
            row["rewards"].append(reward)
        while pending and readiness(pending[0][0], policy, now, 0.0) == "learn":
            row, by_id = pending.popleft()
            if row["arm"] == "bandit":
                for example in learning_examples(row, policy, eligible_from_pmf(by_id)):
                    learner.learn_slot(*example)
                learner.model_version += 1  # in-process, the "model version" counts events learned
            closed.append(row)
        if needs_popularity and now >= next_popularity:
            popularity = compute_popularity(closed, policy, now)
            next_popularity = now + policy.popularity_refresh_seconds

        visit = world.visit(step, visits)
        request = DecisionRequest(
            event_id=f"sim-{seed}-{step}",
            policy=policy.name,
            candidates=visit.candidates,
            slots=slot_list(visit.slots),
            context=visit.context,
            user_id=visit.user_id,
        )
        decision = engine.decide(request)
        row = decision_row(decision, request, visit.user_id, now)
        row["rewards"] = []
        pending.append((row, {c.id: c for c in request.candidates}))
        shown = [ShownSlot(s.id, s.explored) for s in decision.slots]
        record, events = outcome(
            world, visit, shown, decision.arm, objective, seed, window_seconds,
            learner.model_version,
        )  # fmt: skip
        for event in events:
            tiebreak += 1
            reward = {"slot": event.slot, "value": event.value, "kind": event.kind}
            heapq.heappush(arrivals, (now + event.delay, tiebreak, step, row, reward))
        metrics.add(record)
        if progress is not None:
            progress(1)
    learner.close()
    return RunResult(metrics.rows, metrics.run_summary(world.change_step))
