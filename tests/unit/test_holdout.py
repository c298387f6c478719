"""The holdout arm: stable assignment, correct share, popularity ranking with decay."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from scipy import stats

from bandit_service.domain import Candidate, DecisionRequest, slot_list
from bandit_service.engine import DecisionEngine
from bandit_service.holdout import PopularityScores, compute_popularity, in_holdout
from bandit_service.learners.vw import VWLearner
from bandit_service.policy import PolicyConfig

POLICY = PolicyConfig(name="p", holdout_share=0.05, vw_args="--cb_explore_adf --epsilon 0.2")


def test_holdout_share_over_10000_users_is_within_binomial_bounds() -> None:
    n, share = 10_000, POLICY.holdout_share
    count = sum(in_holdout(POLICY, f"user-{i}", "irrelevant") for i in range(n))
    # Two-sided 99.9% binomial acceptance region: a correct hash fails 1 time in 1000.
    low, high = stats.binom.ppf(0.0005, n, share), stats.binom.ppf(0.9995, n, share)
    assert low <= count <= high, (count, low, high)


def test_assignment_is_stable_across_processes_and_restarts() -> None:
    users = [f"user-{i}" for i in range(300)]
    here = [in_holdout(POLICY, u, "e") for u in users]
    # A fresh interpreter with a different hash seed stands in for another process/restart.
    code = (
        "import json, sys; from bandit_service.holdout import in_holdout; "
        "from bandit_service.policy import PolicyConfig; "
        "p = PolicyConfig(name='p', holdout_share=0.05); "
        "print(json.dumps([in_holdout(p, u, 'other') for u in json.load(sys.stdin)]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(users), capture_output=True, text=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""}, check=True,
    )  # fmt: skip
    assert json.loads(result.stdout) == here
    assert any(here) and not all(here)
    # The salt reshuffles; the model version or anything else does not enter.
    salted = PolicyConfig(name="p", holdout_share=0.05, holdout_salt="experiment-2")
    assert [in_holdout(salted, u, "e") for u in users] != here


def test_anonymous_requests_are_assigned_per_event() -> None:
    arms = {in_holdout(POLICY, None, f"event-{i}") for i in range(400)}
    assert arms == {True, False}
    assert in_holdout(POLICY, None, "event-7") == in_holdout(POLICY, None, "event-7")


def test_zero_share_means_nobody() -> None:
    policy = PolicyConfig(name="p", holdout_share=0.0)
    assert not any(in_holdout(policy, f"u{i}", "e") for i in range(1000))


def decision(created_at: float, shown: list[str], rewards: dict[int, float], **extra: Any) -> dict:
    return {
        "created_at": created_at,
        "deferred": extra.get("deferred", False),
        "activated_at": extra.get("activated_at"),
        "slots": [{"slot": i, "id": cid} for i, cid in enumerate(shown)],
        "rewards": [
            {"slot": s, "value": v, "late": False, "kind": "primary"} for s, v in rewards.items()
        ],
    }


def test_popularity_on_a_crafted_log() -> None:
    policy = PolicyConfig(
        name="p", reward_min=0, reward_max=1, default_reward=0, reward_window_seconds=1,
        popularity_half_life_seconds=100, popularity_prior_strength=2,
    )  # fmt: skip
    now = 1001.0  # "recent" decisions are 1 s old: their 1 s windows have just closed
    recent, old = 2 ** (-1 / 100), 2 ** (-201 / 100)
    log = [
        # "hit": 4 recent impressions, all rewarded.
        *[decision(now - 1, ["hit"], {0: 1.0}) for _ in range(4)],
        # "dud": 4 recent impressions, never rewarded (default reward 0).
        *[decision(now - 1, ["dud"], {}) for _ in range(4)],
        # "faded": clicked long ago (two half-lives: weight 1/4), ignored recently.
        *[decision(now - 201, ["faded"], {0: 1.0}) for _ in range(4)],
        *[decision(now - 1, ["faded"], {}) for _ in range(4)],
        # "rising": ignored long ago, clicked recently.
        *[decision(now - 201, ["rising"], {}) for _ in range(4)],
        *[decision(now - 1, ["rising"], {0: 1.0}) for _ in range(4)],
        # Not counted: a window still open, and deferred decisions never (or late) activated.
        *[decision(now - 0.5, ["dud"], {0: 1.0}) for _ in range(4)],
        *[decision(now - 201, ["dud"], {0: 1.0}, deferred=True) for _ in range(9)],
        *[decision(now - 201, ["dud"], {0: 1.0}, deferred=True, activated_at=now - 100)],
    ]
    scores = compute_popularity(log, policy, now)
    # score = (a + sum w r) / (a + b + sum w), prior mean 0 so a = 0, a + b = 2.
    assert scores.score("hit") == pytest.approx(4 * recent / (2 + 4 * recent))
    assert scores.score("dud") == 0.0
    assert scores.score("faded") == pytest.approx(4 * old / (2 + 4 * recent + 4 * old))
    assert scores.score("rising") == pytest.approx(4 * recent / (2 + 4 * recent + 4 * old))
    assert scores.score("never-seen") == scores.prior == 0.0
    order = sorted(["dud", "faded", "rising", "hit"], key=lambda c: -scores.score(c))
    assert order == ["hit", "rising", "faded", "dud"]


def test_prior_follows_the_default_reward() -> None:
    policy = PolicyConfig(name="p", reward_min=-1, reward_max=1, default_reward=0)
    scores = compute_popularity([decision(0.0, ["a"], {})], policy, 3600.0)
    assert scores.prior == 0.5  # the default reward 0, rescaled from [-1, 1]
    assert scores.score("a") == pytest.approx(0.5)  # shown, never rewarded: same as unseen


def test_holdout_decisions_follow_popularity_with_probability_one() -> None:
    policy = PolicyConfig(name="h", holdout_share=0.5)
    popularity = PopularityScores(prior=0.1, scores={"c3": 0.9, "c1": 0.5, "c0": 0.05})
    learner = VWLearner(policy.vw_args)
    engine = DecisionEngine({"h": policy}, lambda _n: learner, lambda _n: popularity)
    candidates = tuple(Candidate(f"c{i}") for i in range(5))
    holdout_users = [u for u in (f"u{i}" for i in range(200)) if in_holdout(policy, u, "x")]
    for user in holdout_users[:20]:
        request = DecisionRequest(
            f"e-{user}", "h", candidates, slot_list(4), user_id=user, excluded=frozenset({"c1"})
        )
        result = engine.decide(request)
        assert result.arm == "holdout"
        # c3 (0.9), then the unseen c2 and c4 at the prior 0.1 in request order, then c0.
        assert [s.id for s in result.slots] == ["c3", "c2", "c4", "c0"]
        for slot in result.slots:
            assert slot.probability == 1.0 and slot.explored is False
            assert dict(slot.pmf)[slot.id] == 1.0
    bandit_user = next(u for u in (f"u{i}" for i in range(200)) if not in_holdout(policy, u, "x"))
    request = DecisionRequest("e-b", "h", candidates, slot_list(2), user_id=bandit_user)
    assert engine.decide(request).arm == "bandit"


def test_baseline_policies_have_no_holdout() -> None:
    """Apprentice and logging-only policies show their baseline to everyone: a holdout
    would compare popularity with the baseline, not with a learned policy."""
    policy = PolicyConfig(name="a", holdout_share=0.5, learning_mode="apprentice")
    learner = VWLearner(policy.vw_args)
    engine = DecisionEngine({"a": policy}, lambda _n: learner)
    candidates = tuple(Candidate(f"c{i}") for i in range(3))
    arms = {
        engine.decide(DecisionRequest(f"e{i}", "a", candidates, slot_list(1), user_id=f"u{i}")).arm
        for i in range(100)
    }
    assert arms == {"bandit"}
