"""Reward aggregation: how several rewards for one slot become the one that is learned."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bandit_service.policy import PolicyConfig

PRIMARY = "primary"  # the reward kind that is learned; others (e.g. satisfaction) are reported


def aggregate(values: list[float], how: str) -> float | None:
    """Combine several rewards for one slot as the policy says."""
    if not values:
        return None
    if how == "sum":
        return float(sum(values))
    if how == "first":
        return values[0]
    return values[-1]


def slot_rewards(decision: Mapping[str, Any], policy: PolicyConfig) -> list[float]:
    """Per slot: on-time rewards aggregated, or the policy's default reward if none came."""
    rewards: list[float] = []
    for slot in decision["slots"]:
        values = [
            r["value"]
            for r in decision["rewards"]
            if r["slot"] == slot["slot"] and not r["late"] and r.get("kind", PRIMARY) == PRIMARY
        ]
        value = aggregate(values, policy.reward_aggregation)
        rewards.append(policy.default_reward if value is None else value)
    return rewards
