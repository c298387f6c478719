"""Rewards and their windows: how several rewards for one slot become the one that is learned,
whether a decision counts as shown, and when its window has closed."""

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


def counts_as_shown(decision: Mapping[str, Any], policy: PolicyConfig) -> bool:
    """Was the decision really shown? Deferred decisions count only when activated within
    their reward window from creation; the trainer, popularity and reports all use this."""
    if not decision["deferred"]:
        return True
    activated = decision["activated_at"]
    return (
        activated is not None and activated <= decision["created_at"] + policy.reward_window_seconds
    )


def readiness(decision: Mapping[str, Any], policy: PolicyConfig, now: float, grace: float) -> str:
    """``"learn"``, ``"skip"`` (deferred, never activated in time) or ``"wait"``."""
    window = policy.reward_window_seconds
    created = decision["created_at"]
    if not counts_as_shown(decision, policy):
        # Not activated (yet): it may still be, until its window from creation closes.
        return "skip" if now >= created + window + grace else "wait"
    start = decision["activated_at"] if decision["deferred"] else created
    return "learn" if now >= start + window + grace else "wait"
