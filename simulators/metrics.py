"""What a simulation measures, per visit and per window of steps.

* ``reward_rate``: realised primary reward per visit (clicks, or satisfied clicks when the
  objective is satisfaction), all arms together: what the product gets.
* ``expected_reward`` / ``oracle_reward``: the same in expectation under the true model, for
  the page shown and for the oracle's page; ``regret`` is their difference summed over the
  window, ``cumulative_regret`` over the run so far.
* ``click_rate``, ``satisfaction_rate``: clicks and satisfied clicks per visit (whatever is
  learned); satisfaction only in scenarios that have it.
* ``exploration_share``: share of the bandit arm's slots drawn as exploration
  (``explored`` in the decision).
* ``breadth``: the effective number of categories consumed, exp(Shannon entropy) of the
  clicked items' categories (Hill number of order 1; Hill, Ecology 54(2), 1973): 1 when
  every click is in one category, k when clicks spread evenly over k.
* ``coverage``: distinct items shown / distinct items offered in the window.
* ``lift``: bandit-arm reward rate / holdout-arm reward rate - 1 (when a holdout exists).
* ``late_share``: primary rewards that arrived after the reward window, of all sent.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

WINDOW_COLUMNS = (
    "step", "visits", "reward_rate", "expected_reward", "oracle_reward", "regret",
    "cumulative_regret", "click_rate", "satisfaction_rate", "exploration_share", "breadth",
    "coverage", "bandit_reward_rate", "holdout_reward_rate", "lift", "late_share",
    "model_version",
)  # fmt: skip


@dataclass(frozen=True)
class VisitRecord:
    step: int
    arm: str
    reward: float  # realised primary reward, summed over slots
    expected: float
    oracle: float
    clicks: int
    satisfied: int
    explored: int  # slots drawn as exploration (bandit arm)
    slots: int
    shown: tuple[str, ...]
    offered: tuple[str, ...]
    consumed: tuple[str, ...]  # categories of clicked items
    rewards_sent: int
    rewards_late: int
    model_version: int


def breadth(counts: Counter[str]) -> float:
    """exp(H) of a category distribution (0 when nothing was consumed)."""
    total = sum(counts.values())
    if total == 0:
        return 0.0
    entropy = -sum((n / total) * math.log(n / total) for n in counts.values() if n)
    return math.exp(entropy)


def _rate(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


@dataclass
class WindowAggregator:
    """Folds visit records into one row per ``window`` steps (plus whole-run totals)."""

    window: int
    has_satisfaction: bool
    rows: list[dict[str, Any]] = field(default_factory=list)
    cumulative_regret: float = 0.0
    _records: list[VisitRecord] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    consumed: Counter[str] = field(default_factory=Counter)

    def add(self, record: VisitRecord) -> None:
        self._records.append(record)
        self.consumed.update(record.consumed)
        if len(self._records) >= self.window:
            self.flush()

    def flush(self) -> None:
        records = self._records
        if not records:
            return
        self._records = []
        n = len(records)
        regret = sum(r.oracle - r.expected for r in records)
        self.cumulative_regret += regret
        bandit = [r for r in records if r.arm == "bandit"]
        holdout = [r for r in records if r.arm == "holdout"]
        bandit_rate = _rate(sum(r.reward for r in bandit), len(bandit))
        holdout_rate = _rate(sum(r.reward for r in holdout), len(holdout))
        lift = bandit_rate / holdout_rate - 1 if bandit_rate is not None and holdout_rate else None
        shown = {cid for r in records for cid in r.shown}
        offered = {cid for r in records for cid in r.offered}
        row = {
            "step": records[-1].step + 1,
            "visits": n,
            "reward_rate": sum(r.reward for r in records) / n,
            "expected_reward": sum(r.expected for r in records) / n,
            "oracle_reward": sum(r.oracle for r in records) / n,
            "regret": regret,
            "cumulative_regret": self.cumulative_regret,
            "click_rate": sum(r.clicks for r in records) / n,
            "satisfaction_rate": (
                sum(r.satisfied for r in records) / n if self.has_satisfaction else None
            ),
            "exploration_share": _rate(
                sum(r.explored for r in bandit), sum(r.slots for r in bandit)
            ),
            "breadth": breadth(Counter(c for r in records for c in r.consumed)),
            "coverage": len(shown) / len(offered) if offered else None,
            "bandit_reward_rate": bandit_rate,
            "holdout_reward_rate": holdout_rate,
            "lift": lift,
            "late_share": _rate(
                sum(r.rewards_late for r in records), sum(r.rewards_sent for r in records)
            ),
            "model_version": records[-1].model_version,
        }
        self.rows.append(row)
        for key in ("reward", "expected", "oracle", "clicks", "satisfied", "explored",
                    "rewards_sent", "rewards_late"):  # fmt: skip
            self.totals[key] += sum(getattr(r, key) for r in records)
        self.totals["visits"] += n
        self.totals["bandit_visits"] += len(bandit)
        self.totals["bandit_slots"] += sum(r.slots for r in bandit)
        self.totals["bandit_reward"] += sum(r.reward for r in bandit)
        self.totals["holdout_visits"] += len(holdout)
        self.totals["holdout_reward"] += sum(r.reward for r in holdout)

    def run_summary(self, change_step: int | None) -> dict[str, Any]:
        """Whole-run numbers for one (setting, seed)."""
        self.flush()
        t = self.totals
        visits = t["visits"]
        rows = self.rows
        tail = rows[-max(1, len(rows) // 4) :]
        summary: dict[str, Any] = {
            "visits": visits,
            "reward_rate": _rate(t["reward"], visits),
            "expected_reward": _rate(t["expected"], visits),
            "oracle_reward": _rate(t["oracle"], visits),
            "cumulative_regret": self.cumulative_regret,
            "last_quarter_expected_reward": _weighted(tail, "expected_reward"),
            "click_rate": _rate(t["clicks"], visits),
            "satisfaction_rate": _rate(t["satisfied"], visits) if self.has_satisfaction else None,
            "exploration_share": _rate(t["explored"], t["bandit_slots"]),
            "breadth": breadth(self.consumed),
            "coverage_last_window": rows[-1]["coverage"] if rows else None,
            "late_share": _rate(t["rewards_late"], t["rewards_sent"]),
            "lift": (
                (t["bandit_reward"] / t["bandit_visits"])
                / (t["holdout_reward"] / t["holdout_visits"])
                - 1
                if t["bandit_visits"] and t["holdout_visits"] and t["holdout_reward"]
                else None
            ),
            "final_model_version": rows[-1]["model_version"] if rows else 0,
        }
        if change_step is not None:
            after = [r for r in rows if r["step"] > change_step]
            before = [r for r in rows if r["step"] <= change_step]
            summary["expected_reward_before_change"] = _weighted(before, "expected_reward")
            summary["expected_reward_after_change"] = _weighted(after, "expected_reward")
            summary["regret_after_change"] = sum(r["regret"] for r in after)
        return summary


def _weighted(rows: list[dict[str, Any]], key: str) -> float | None:
    visits = sum(r["visits"] for r in rows)
    return sum(r[key] * r["visits"] for r in rows) / visits if visits else None
