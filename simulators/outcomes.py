"""What the simulated user does with a page: clicks, satisfaction, and when rewards arrive.

Shared by the in-process and the HTTP runner, so both see the same users. The randomness
of a visit's outcome comes from a generator seeded by (seed, step) alone: two settings run
with the same seed face the same users and the same coin flips (common random numbers),
so their difference is the policies', not the luck's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bandit_service.rewards import PRIMARY
from simulators.metrics import VisitRecord
from simulators.scenarios import Item, Objective, Visit, World

SATISFACTION = "satisfaction"
CLICK = "click"


@dataclass(frozen=True)
class RewardEvent:
    """A reward the user's behaviour produces ``delay`` seconds after the decision."""

    slot: int
    value: float
    kind: str
    delay: float


@dataclass(frozen=True)
class ShownSlot:
    id: str
    explored: bool


def outcome(
    world: World,
    visit: Visit,
    shown: Sequence[ShownSlot],
    arm: str,
    objective: Objective,
    seed: int,
    window: float,
    model_version: int,
) -> tuple[VisitRecord, list[RewardEvent]]:
    """Draw the user's response to ``shown`` and the rewards it sends (only non-zero ones:
    a slot without a reward gets the policy's default reward, 0 here)."""
    rng = np.random.default_rng([seed, visit.step, 99])
    by_id = {item.id: item for item in visit.items}
    _, oracle = world.oracle(visit, objective)
    expected = 0.0
    reward = 0.0
    clicks = satisfied = explored = late = sent = 0
    consumed: list[str] = []
    events: list[RewardEvent] = []
    for k, slot in enumerate(shown):
        item: Item = by_id[slot.id]
        u_click, u_sat = rng.random(2)
        click_delay = world.delay(rng)
        sat_delay = click_delay + (
            float(rng.exponential(world.satisfaction_delay)) if world.satisfaction_delay else 0.0
        )
        expected += world.expected_reward(visit, item, k, objective)
        explored += int(slot.explored)
        if u_click >= world.click_probability(visit, item, k):
            continue
        clicks += 1
        consumed.append(item.category)
        happy = world.has_satisfaction and u_sat < item.satisfaction
        satisfied += int(happy)
        if objective == "click":
            events.append(RewardEvent(k, 1.0, PRIMARY, click_delay))
            if happy:
                events.append(RewardEvent(k, 1.0, SATISFACTION, sat_delay))
        else:
            events.append(RewardEvent(k, 1.0, CLICK, click_delay))
            if happy or not world.has_satisfaction:
                events.append(RewardEvent(k, 1.0, PRIMARY, sat_delay))
        primary = [e for e in events if e.kind == PRIMARY and e.slot == k]
        reward += sum(e.value for e in primary)
        sent += len(primary)
        late += sum(1 for e in primary if e.delay > window)
    record = VisitRecord(
        step=visit.step,
        arm=arm,
        reward=reward,
        expected=expected,
        oracle=oracle,
        clicks=clicks,
        satisfied=satisfied,
        explored=explored,
        slots=len(shown),
        shown=tuple(s.id for s in shown),
        offered=tuple(item.id for item in visit.items),
        consumed=tuple(consumed),
        rewards_sent=sent,
        rewards_late=late,
        model_version=model_version,
    )
    return record, events
