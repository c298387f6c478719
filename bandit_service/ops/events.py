"""The decision and reward events: one metrics update and one JSON log line each.

Called by the service after the write committed (so a logged event is a stored event).
Lines carry the event id, policy, arm and model version; never the user id.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from bandit_service.ops import metrics

log = logging.getLogger("bandit_service.events")


def decision_stored(row: Mapping[str, Any]) -> None:
    """Count and log a stored decision. Never raises: the decision is already stored."""
    try:
        _decision(row)
    except Exception:
        log.exception("could not record decision metrics")


def reward_stored(
    decision: Mapping[str, Any], slot: int, value: float, kind: str, late: bool, primary: bool
) -> None:
    """Count and log a stored reward. Never raises: the reward is already stored."""
    try:
        _reward(decision, slot, value, kind, late, primary)
    except Exception:
        log.exception("could not record reward metrics")


def _decision(row: Mapping[str, Any]) -> None:
    slots = row["slots"]
    explored = sum(1 for s in slots if s["explored"])
    metrics.observe_decision(row["policy"], row["arm"], explored, len(slots))
    if log.isEnabledFor(logging.INFO):
        log.info(
            "decision",
            extra={
                "event": "decision",
                "event_id": row["event_id"],
                "policy": row["policy"],
                "policy_version": row["policy_version"],
                "arm": row["arm"],
                "model_version": row["model_version"],
                "shown": [s["id"] for s in slots],
                "explored": explored,
                "deferred": row["deferred"],
            },
        )


def _reward(
    decision: Mapping[str, Any], slot: int, value: float, kind: str, late: bool, primary: bool
) -> None:
    if primary:
        metrics.observe_reward(decision["policy"], decision["arm"], value, late)
    if log.isEnabledFor(logging.INFO):
        log.info(
            "reward",
            extra={
                "event": "reward",
                "event_id": decision["event_id"],
                "policy": decision["policy"],
                "arm": decision["arm"],
                "model_version": decision["model_version"],
                "slot": slot,
                "value": value,
                "kind": kind,
                "late": late,
            },
        )
