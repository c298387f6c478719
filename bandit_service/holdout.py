"""The popularity holdout arm: who is in it, and what it shows.

Assignment. A user is in the holdout when ``H(salt, user_id) < holdout_share``, where H
maps SHA-256 of the salted id to [0, 1). It depends on nothing but the salt and the id, so
it is the same in every process, after every restart and under every model version. The
salt is the policy's ``holdout_salt`` (the policy name when empty); changing it reshuffles
users. A request without ``user_id`` is assigned by its event id instead: such events are
independent units, and a repeated event id keeps its arm.

Popularity. Each candidate's score is a smoothed, time-decayed reward rate,

    score = (a + sum_i w_i r_i) / (a + b + sum_i w_i),   w_i = 2 ** (-age_i / half_life),

over the candidate's impressions i in closed reward windows, with r_i its slot's reward
rescaled to [0, 1] from [reward_min, reward_max] (the default reward when none came). The
Beta(a, b) prior has strength a + b = ``popularity_prior_strength`` and mean equal to the
rescaled default reward, so an unseen candidate scores exactly what a candidate that was
shown often but never rewarded would; a few lucky impressions cannot outrank a long record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bandit_service.policy import PolicyConfig
from bandit_service.rewards import readiness, slot_rewards


def assignment_value(salt: str, key: str) -> float:
    """A stable pseudo-uniform number in [0, 1) for ``key`` under ``salt``."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_holdout(policy: PolicyConfig, user_id: str | None, event_id: str) -> bool:
    if policy.holdout_share <= 0:
        return False
    salt = policy.holdout_salt or policy.name
    key = f"user:{user_id}" if user_id is not None else f"event:{event_id}"
    return assignment_value(salt, key) < policy.holdout_share


@dataclass(frozen=True)
class PopularityScores:
    """Scores per candidate id; ``prior`` for candidates never seen."""

    prior: float
    scores: Mapping[str, float] = field(default_factory=dict)
    computed_at: float = 0.0
    impressions: float = 0.0
    shown: Mapping[str, float] = field(default_factory=dict)  # decayed impressions per id

    def score(self, candidate_id: str) -> float:
        return self.scores.get(candidate_id, self.prior)


def prior_mean(policy: PolicyConfig) -> float:
    return (policy.default_reward - policy.reward_min) / (policy.reward_max - policy.reward_min)


def compute_popularity(
    decisions: Iterable[Mapping[str, Any]],
    policy: PolicyConfig,
    now: float,
    grace: float = 0.0,
) -> PopularityScores:
    """Popularity from logged decisions (each with its ``rewards``), all arms together.

    Only decisions really shown (deferred ones activated in time) whose reward window has
    closed count; a slot's reward is clipped to the policy's bounds before rescaling (a
    ``sum`` of several rewards may exceed them)."""
    span = policy.reward_max - policy.reward_min
    mean = prior_mean(policy)
    a = policy.popularity_prior_strength * mean
    weight_sum: dict[str, float] = {}
    reward_sum: dict[str, float] = {}
    total = 0.0
    for decision in decisions:
        # Opted-out users' behaviour is not learned from, popularity included (issue 10).
        if decision.get("arm") == "opted_out" or readiness(decision, policy, now, grace) != "learn":
            continue
        age = max(0.0, now - decision["created_at"])
        w = 2.0 ** (-age / policy.popularity_half_life_seconds)
        for slot, reward in zip(decision["slots"], slot_rewards(decision, policy), strict=True):
            cid = slot["id"]
            weight_sum[cid] = weight_sum.get(cid, 0.0) + w
            scaled = min(1.0, max(0.0, (reward - policy.reward_min) / span))
            reward_sum[cid] = reward_sum.get(cid, 0.0) + w * scaled
            total += w
    strength = policy.popularity_prior_strength
    scores = {cid: (a + reward_sum[cid]) / (strength + n) for cid, n in weight_sum.items()}
    return PopularityScores(
        prior=mean, scores=scores, computed_at=now, impressions=total, shown=weight_sum
    )


def ranking(ids: Sequence[str], popularity: PopularityScores) -> list[int]:
    """Positions of ``ids`` from most to least popular; ties keep request order."""
    return sorted(range(len(ids)), key=lambda i: -popularity.score(ids[i]))


class PopularityBoard:
    """Current popularity scores per policy, recomputed from the log periodically.

    Only decisions whose reward window has closed count (a still-open window would read
    as "no reward yet" and drag fresh candidates down), and only the last six half-lives
    (older impressions weigh under 2%).
    """

    def __init__(
        self, db: Any, policies: Mapping[str, PolicyConfig], grace_seconds: float = 2.0
    ) -> None:
        self._db = db
        self._policies = dict(policies)
        self._grace = grace_seconds
        self._scores = {
            name: PopularityScores(prior=prior_mean(p)) for name, p in self._policies.items()
        }
        self.wanted: set[str] = set()  # policies asked for popularity by an opted-out user
        # Users whose earlier decisions no longer count either (issue 10; set by the service).
        self.opted_out: Container[str] = frozenset()

    def get(self, name: str) -> PopularityScores:
        return self._scores[name]

    def set_policy(self, policy: PolicyConfig) -> None:
        """Use ``policy`` from the next refresh on; a new policy starts at its prior."""
        # Copy-on-write: refresh_due iterates these from another thread.
        if policy.name not in self._scores:
            self._scores = {**self._scores, policy.name: PopularityScores(prior_mean(policy))}
        self._policies = {**self._policies, policy.name: policy}

    def due(self, name: str, now: float) -> bool:
        policy = self._policies[name]
        needed = (
            policy.holdout_share > 0
            or policy.rules.exploration_distribution == "least_shown"
            or name in self.wanted  # opted-out users are served this ranking (issue 10)
        )
        return needed and now - self._scores[name].computed_at >= policy.popularity_refresh_seconds

    def refresh(self, name: str, now: float) -> PopularityScores:
        from bandit_service.store.repository import iter_decisions

        policy = self._policies[name]
        since = now - 6 * policy.popularity_half_life_seconds
        until = now - policy.reward_window_seconds - self._grace  # deferred: checked per row
        opted_out = self.opted_out
        decisions = (
            d
            for batch in iter_decisions(self._db, name, since, until)
            for d in batch
            if d.get("user_key") is None or d["user_key"] not in opted_out
        )
        scores = compute_popularity(decisions, policy, now, self._grace)
        self._scores[name] = scores
        return scores

    def refresh_due(self, now: float) -> list[str]:
        refreshed = [name for name in self._policies if self.due(name, now)]
        for name in refreshed:
            self.refresh(name, now)
        return refreshed
