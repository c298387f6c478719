"""Lift of the learned policy over the popularity holdout, with user-level uncertainty.

Users are the unit of randomisation (a user's whole history is in one arm), so they are the
unit of resampling. Decisions of one user are correlated (a heavy clicker clicks in every
session); treating decisions as independent understates the variance and gives intervals
that are too narrow. ``tests/unit/test_lift.py`` shows both effects on simulated logs.

Per arm, with Y_u the total reward and N_u the decisions of unit u, the mean reward per
decision is the ratio estimator m = sum Y_u / sum N_u and lift = m_bandit / m_holdout - 1.

* Interval: Poisson bootstrap over units (each unit weighted by an independent Poisson(1)
  draw per replicate; Hanley & MacGibbon 2006; Chamandy et al., "Estimating uncertainty for
  massive data streams", Google 2012), percentile 95% interval, seeded.
* p-value (H0: no lift): cluster-robust delta method. For each arm
  Var(m) = n / (n - 1) * sum_u (Y_u - m N_u)^2 / (sum_u N_u)^2, and
  Var(lift) ~ Var(m_b) / m_h^2 + m_b^2 Var(m_h) / m_h^4 (a normal interval is given too).

Anonymous decisions (no ``user_id``) were assigned to an arm per event, so each is its own
unit.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bandit_service.policy import PolicyConfig
from bandit_service.rewards import PRIMARY, counts_as_shown, slot_rewards

MIN_UNITS_PER_ARM = 100  # below this the report says "not enough data"
SRM_ALPHA = 0.001  # sample-ratio mismatch is flagged below this p-value
TIERS = [(0.15, "strong"), (0.08, "healthy"), (0.03, "marginal")]


@dataclass(frozen=True)
class Outcome:
    """One decision, reduced to what the report needs."""

    arm: str
    unit: str
    created_at: float
    reward: float  # page reward: sum over slots (the default reward where none came)
    shown: tuple[str, ...]
    offered: tuple[str, ...]
    consumed: tuple[str, ...]  # shown and rewarded above the default reward
    consumed_categories: tuple[str, ...]
    secondary: Mapping[str, float] = field(default_factory=dict)  # kind -> summed value


def outcome(decision: Mapping[str, Any], policy: PolicyConfig) -> Outcome | None:
    """Reduce a logged decision (with rewards); None for a deferred decision that was not
    activated within its window (not shown, as far as the trainer is concerned too)."""
    if not counts_as_shown(decision, policy):
        return None
    rewards = slot_rewards(decision, policy)
    shown = tuple(s["id"] for s in decision["slots"])
    consumed = tuple(
        cid for cid, r in zip(shown, rewards, strict=True) if r > policy.default_reward
    )
    categories: tuple[str, ...] = ()
    if policy.category_feature and consumed:
        features = {c["id"]: c.get("features", {}) for c in decision["candidates"]}
        categories = tuple(
            str(features[cid][policy.category_feature])
            for cid in consumed
            if policy.category_feature in features.get(cid, {})
        )
    secondary: dict[str, float] = defaultdict(float)
    for r in decision["rewards"]:
        if r.get("kind", PRIMARY) != PRIMARY and not r["late"]:
            secondary[r["kind"]] += r["value"]
    return Outcome(
        arm=decision["arm"],
        unit=decision["user_key"] or f"event:{decision['event_id']}",
        created_at=decision["created_at"],
        reward=float(sum(rewards)),
        shown=shown,
        offered=tuple(c["id"] for c in decision["candidates"]),
        consumed=consumed,
        consumed_categories=categories,
        secondary=dict(secondary),
    )


def collect_outcomes(
    db: Any,
    policy: PolicyConfig,
    since: float | None,
    until: float | None,
    progress: Callable[[int], None] | None = None,
) -> list[Outcome]:
    """Read the policy's decisions created in [since, until) from the store, in chunks."""
    from bandit_service.store.repository import iter_decisions

    outcomes: list[Outcome] = []
    read = 0
    for batch in iter_decisions(db, policy.name, since, until):
        read += len(batch)
        outcomes.extend(o for d in batch if (o := outcome(d, policy)) is not None)
        if progress is not None:
            progress(read)
    return outcomes


# -- statistics ---------------------------------------------------------------------------
def unit_totals(outcomes: Iterable[Outcome]) -> tuple[np.ndarray, np.ndarray]:
    """Per unit: (total reward, number of decisions)."""
    totals: dict[str, list[float]] = {}
    for o in outcomes:
        entry = totals.setdefault(o.unit, [0.0, 0.0])
        entry[0] += o.reward
        entry[1] += 1.0
    array = np.array(list(totals.values()), dtype=float).reshape(-1, 2)
    return array[:, 0], array[:, 1]


def ratio_variance(y: np.ndarray, n: np.ndarray) -> float:
    """Cluster-robust (delta-method) variance of sum(y) / sum(n)."""
    k = len(y)
    if k < 2:
        return math.inf
    m = y.sum() / n.sum()
    return float(k / (k - 1) * np.sum((y - m * n) ** 2) / n.sum() ** 2)


def normal_two_sided_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


@dataclass(frozen=True)
class LiftEstimate:
    lift: float | None
    interval: tuple[float, float] | None  # bootstrap percentile, 95%
    normal_interval: tuple[float, float] | None
    p_value: float | None
    reason: str | None = None  # why lift or interval is undefined


def estimate_lift(
    bandit: tuple[np.ndarray, np.ndarray],
    holdout: tuple[np.ndarray, np.ndarray],
    replicates: int = 2000,
    seed: int = 0,
) -> LiftEstimate:
    """Lift of ``bandit`` over ``holdout``, each given as per-unit (reward totals, counts)."""
    (yb, nb), (yh, nh) = bandit, holdout
    if len(yb) < 2 or len(yh) < 2:
        return LiftEstimate(None, None, None, None, "fewer than 2 users in an arm")
    if yh.sum() <= 0 or yb.sum() < 0:
        # A relative lift needs a positive baseline; signed rewards that sum to <= 0 make
        # (bandit - holdout) / holdout meaningless. Compare the arms' means instead.
        return LiftEstimate(None, None, None, None, "holdout mean reward <= 0: lift undefined")
    mb, mh = yb.sum() / nb.sum(), yh.sum() / nh.sum()
    lift = float(mb / mh - 1)
    var = ratio_variance(yb, nb) / mh**2 + mb**2 * ratio_variance(yh, nh) / mh**4
    se = math.sqrt(var)
    normal = (float(lift - 1.959964 * se), float(lift + 1.959964 * se))
    p_value = normal_two_sided_p(lift / se) if se > 0 else (0.0 if lift else 1.0)

    rng = np.random.default_rng(seed)
    lifts: list[np.ndarray] = []
    chunk = max(1, min(replicates, 2_000_000 // max(len(yb), len(yh))))
    for start in range(0, replicates, chunk):
        size = min(chunk, replicates - start)
        wb = rng.poisson(1.0, (size, len(yb)))
        wh = rng.poisson(1.0, (size, len(yh)))
        with np.errstate(divide="ignore", invalid="ignore"):
            rb = (wb @ yb) / (wb @ nb)
            rh = (wh @ yh) / (wh @ nh)
            lifts.append(rb / rh - 1)
    draws = np.concatenate(lifts)
    finite = draws[np.isfinite(draws)]
    if len(finite) < 0.99 * len(draws):
        # Too many replicates had a zero holdout total: the percentile interval of the rest
        # would be biased. Say so rather than print a number.
        reason = "holdout too sparse for a bootstrap interval (zero totals in resamples)"
        return LiftEstimate(lift, None, normal, p_value, reason)
    low, high = np.percentile(finite, [2.5, 97.5])
    return LiftEstimate(lift, (float(low), float(high)), normal, p_value)


def tier(lift: float | None, enough: bool) -> str:
    """The seeds' labels: strong > 15%, healthy 8-15%, marginal 3-8%, not working < 3%."""
    if not enough or lift is None:
        return "not enough data"
    for threshold, label in TIERS:
        if lift > threshold:
            return label
    return "not working"


def gini(counts: Sequence[float]) -> float:
    """Gini coefficient of exposure (0: every candidate equally shown; -> 1: one takes all)."""
    values = np.sort(np.asarray(counts, dtype=float))
    n = len(values)
    if n == 0 or values.sum() == 0:
        return 0.0
    index = np.arange(1, n + 1)
    return float(np.sum((2 * index - n - 1) * values) / (n * values.sum()))


def sample_ratio_check(holdout_units: int, total_units: int, share: float) -> dict[str, Any]:
    """Chi-square (1 d.f.) test of the observed holdout share against the configured one."""
    result: dict[str, Any] = {
        "expected_share": share,
        "observed_share": holdout_units / total_units if total_units else None,
        "units": total_units,
    }
    if total_units == 0 or share <= 0 or share >= 1:
        result.update(chi_square=None, p_value=None, mismatch=False)
        return result
    expected = np.array([share, 1 - share]) * total_units
    observed = np.array([holdout_units, total_units - holdout_units])
    chi2 = float(np.sum((observed - expected) ** 2 / expected))
    p_value = math.erfc(math.sqrt(chi2 / 2))  # chi-square survival function, 1 d.f.
    result.update(chi_square=chi2, p_value=p_value, mismatch=p_value < SRM_ALPHA)
    return result


# -- the report ---------------------------------------------------------------------------
def arm_summary(outcomes: list[Outcome], period_seconds: float) -> dict[str, Any]:
    y, n = unit_totals(outcomes)
    decisions = len(outcomes)
    impressions: Counter[str] = Counter(cid for o in outcomes for cid in o.shown)
    offered = {cid for o in outcomes for cid in o.offered}
    # Breadth: per user and period, distinct consumed candidates and categories.
    per_period: dict[tuple[str, int], tuple[set[str], set[str]]] = {}
    for o in outcomes:
        key = (o.unit, int(o.created_at // period_seconds))
        items, categories = per_period.setdefault(key, (set(), set()))
        items.update(o.consumed)
        categories.update(o.consumed_categories)
    secondary: dict[str, list[float]] = defaultdict(list)
    for o in outcomes:
        for kind, value in o.secondary.items():
            secondary[kind].append(value)
    return {
        "decisions": decisions,
        "users": len(y),
        "mean_reward_per_decision": float(y.sum() / n.sum()) if decisions else None,
        "mean_reward_per_user": float(np.mean(y / n)) if decisions else None,
        "guardrails": {
            "breadth_items_per_user_period": (
                float(np.mean([len(i) for i, _ in per_period.values()])) if per_period else None
            ),
            "breadth_categories_per_user_period": (
                float(np.mean([len(c) for _, c in per_period.values()])) if per_period else None
            ),
            "catalog_coverage": len(impressions) / len(offered) if offered else None,
            "exposure_gini": gini([impressions.get(cid, 0) for cid in sorted(offered)]),
            "secondary_rewards": {
                kind: {"mean": float(np.mean(values)), "decisions": len(values)}
                for kind, values in sorted(secondary.items())
            },
        },
    }


def lift_report(
    outcomes: Iterable[Outcome],
    policy: PolicyConfig,
    *,
    replicates: int = 2000,
    seed: int = 0,
    period_seconds: float = 86400.0,
    min_units: int = MIN_UNITS_PER_ARM,
) -> dict[str, Any]:
    by_arm: dict[str, list[Outcome]] = {"bandit": [], "holdout": []}
    for o in outcomes:
        by_arm.setdefault(o.arm, []).append(o)
    bandit, holdout = by_arm["bandit"], by_arm["holdout"]
    estimate = estimate_lift(unit_totals(bandit), unit_totals(holdout), replicates, seed)
    units_b = len({o.unit for o in bandit})
    units_h = len({o.unit for o in holdout})
    enough = min(units_b, units_h) >= min_units
    return {
        "policy": policy.name,
        "arms": {arm: arm_summary(items, period_seconds) for arm, items in by_arm.items()},
        "lift": estimate.lift,
        "interval_95": list(estimate.interval) if estimate.interval else None,
        "normal_interval_95": list(estimate.normal_interval) if estimate.normal_interval else None,
        "p_value": estimate.p_value,
        "tier": tier(estimate.lift, enough),
        # The tier reads the point estimate; this says whether the interval excludes zero.
        "significant": bool(
            enough and estimate.interval and (estimate.interval[0] > 0 or estimate.interval[1] < 0)
        ),
        "reason": estimate.reason
        or (None if enough else f"fewer than {min_units} users in an arm"),
        "learning_mode": policy.learning_mode,
        "period_seconds": period_seconds,
        "minimum_users_per_arm": min_units,
        "interval_method": "user-level Poisson bootstrap, percentile",
        "sample_ratio": sample_ratio_check(units_h, units_b + units_h, policy.holdout_share),
    }


def lift_over_time(
    outcomes: list[Outcome], buckets: int = 12, replicates: int = 500, seed: int = 0
) -> list[dict[str, Any]]:
    """Cumulative lift with its interval at ``buckets`` evenly spaced cut-offs."""
    if not outcomes:
        return []
    start = min(o.created_at for o in outcomes)
    end = max(o.created_at for o in outcomes)
    points = []
    for k in range(1, buckets + 1):
        cutoff = start + (end - start) * k / buckets
        seen = [o for o in outcomes if o.created_at <= cutoff]
        est = estimate_lift(
            unit_totals([o for o in seen if o.arm == "bandit"]),
            unit_totals([o for o in seen if o.arm == "holdout"]),
            replicates,
            seed,
        )
        points.append({"until": cutoff, "lift": est.lift, "interval_95": est.interval})
    return points


def format_table(report: dict[str, Any]) -> str:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:+.1%}"

    def num(value: float | None, digits: int = 4) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [f"Lift report for policy {report['policy']!r}", ""]
    header = f"{'':34}" + "".join(f"{arm:>14}" for arm in report["arms"])
    lines.append(header)
    rows = [
        ("decisions", lambda a: str(a["decisions"])),
        ("users", lambda a: str(a["users"])),
        ("mean reward / decision", lambda a: num(a["mean_reward_per_decision"])),
        ("mean reward / user", lambda a: num(a["mean_reward_per_user"])),
        (
            "breadth: items / user-period",
            lambda a: num(a["guardrails"]["breadth_items_per_user_period"], 2),
        ),
        (
            "breadth: categories / user-period",
            lambda a: num(a["guardrails"]["breadth_categories_per_user_period"], 2),
        ),
        ("catalog coverage", lambda a: num(a["guardrails"]["catalog_coverage"], 3)),
        ("exposure Gini", lambda a: num(a["guardrails"]["exposure_gini"], 3)),
    ]
    for label, cell in rows:
        lines.append(f"{label:34}" + "".join(f"{cell(a):>14}" for a in report["arms"].values()))
    kinds = sorted(
        {k for a in report["arms"].values() for k in a["guardrails"]["secondary_rewards"]}
    )
    for kind in kinds:
        cells = []
        for a in report["arms"].values():
            entry = a["guardrails"]["secondary_rewards"].get(kind)
            cells.append(num(entry["mean"]) if entry else "n/a")
        lines.append(f"{'mean ' + kind:34}" + "".join(f"{c:>14}" for c in cells))
    interval = report["interval_95"]
    lines += [
        "",
        f"lift: {pct(report['lift'])}"
        + (f"  95% interval [{pct(interval[0])}, {pct(interval[1])}]" if interval else "")
        + (f"  p = {report['p_value']:.3g}" if report["p_value"] is not None else ""),
        *([f"note: {report['reason']}"] if report["reason"] else []),
        f"tier: {report['tier']} (from the point estimate; needs >= "
        f"{report['minimum_users_per_arm']} users per arm); interval "
        + ("excludes 0" if report["significant"] else "includes 0: not significant"),
    ]
    srm = report["sample_ratio"]
    if srm["p_value"] is not None:
        flag = "MISMATCH: check assignment and logging" if srm["mismatch"] else "ok"
        lines.append(
            f"sample ratio: holdout {srm['observed_share']:.4f} of {srm['units']} users, "
            f"expected {srm['expected_share']:.4f} (p = {srm['p_value']:.3g}): {flag}"
        )
    return "\n".join(lines)


def plot_lift(points: list[dict[str, Any]], path: str, title: str) -> None:
    """A PNG of cumulative lift with its 95% interval over time."""
    import datetime as dt

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    usable = [p for p in points if p["lift"] is not None and p["interval_95"] is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if usable:
        times = mdates.date2num([dt.datetime.fromtimestamp(p["until"], dt.UTC) for p in usable])
        lifts = [100 * p["lift"] for p in usable]
        low = [100 * p["interval_95"][0] for p in usable]
        high = [100 * p["interval_95"][1] for p in usable]
        ax.fill_between(times, low, high, alpha=0.25, label="95% interval (user bootstrap)")
        ax.plot(times, lifts, marker="o", label="cumulative lift")
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d %H:%M"))
        fig.autofmt_xdate()
    else:
        ax.text(0.5, 0.5, "not enough data", ha="center", va="center", transform=ax.transAxes)
    ax.axhline(0, color="black", linewidth=0.8)
    for threshold, label in TIERS:
        ax.axhline(100 * threshold, color="grey", linestyle=":", linewidth=0.8)
        ax.annotate(label, (1.0, 100 * threshold), xycoords=("axes fraction", "data"),
                    fontsize=8, color="grey", ha="right", va="bottom")  # fmt: skip
    ax.set_ylabel("lift over popularity holdout (%)")
    ax.set_title(title)
    if usable:
        ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
