"""Evaluate target policies on logged slot decisions: the store's log or an OBD file.

Each logged *slot* is one row: the candidates eligible for it, the one shown, its logged
probability and its reward (aggregated as the policy says; the default reward if none
came). Multi-slot pages are evaluated per slot, under the assumption the slot rows share:
a slot's reward depends on what is shown in it (not on the other slots), and the target
policy sees the same eligible set the logging policy saw (earlier slots as logged). Rows
logged with probability 1 (pins, holdout, baseline) cannot be reweighted: they are skipped
and counted.

Targets give, for every row, a distribution over its eligible candidates:
``uniform``; ``logging`` (the logged distribution itself: the on-policy average);
``popularity`` (the most rewarded candidate so far, progressively, in time order);
``vw:ARGS`` (a VW ``cb_explore_adf`` configuration evaluated progressively: predict each
row before learning from it, as Personalizer's offline evaluation did); and explicit
per-row probabilities supplied from elsewhere.

DM and DR use a reward model: the per-candidate mean reward, shrunk towards the overall
mean (10 pseudo-rows), cross-fitted over two halves of the log so no row's own reward
predicts it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bandit_service.domain import Candidate
from bandit_service.ope.estimators import ESTIMATORS, Estimate, LoggedData
from bandit_service.policy import PolicyConfig
from bandit_service.rewards import counts_as_shown, slot_rewards

SHRINKAGE_ROWS = 10.0
# Set by the command line to report progress of long (progressive VW) evaluations.
PROGRESS: Callable[[str, int, int], None] | None = None


@dataclass(frozen=True)
class SlotRow:
    key: str  # event id and slot
    created_at: float
    context: Mapping[str, Any]
    slot: int
    slot_features: Mapping[str, Any]
    eligible: tuple[Candidate, ...]
    chosen: int
    propensity: float
    reward: float
    logged_pmf: tuple[float, ...] | None = None


@dataclass
class LogStats:
    decisions: int = 0
    rows: int = 0
    skipped_deterministic: int = 0
    skipped_not_shown: int = 0


def rows_from_decisions(
    decisions: Iterable[Mapping[str, Any]], policy: PolicyConfig, stats: LogStats
) -> Iterable[SlotRow]:
    """Slot rows from the service's decision log (decisions with their rewards)."""
    for decision in decisions:
        stats.decisions += 1
        if not counts_as_shown(decision, policy):
            stats.skipped_not_shown += 1
            continue
        features = {c["id"]: c.get("features") or {} for c in decision["candidates"]}
        rewards = slot_rewards(decision, policy)
        for slot, reward in zip(decision["slots"], rewards, strict=True):
            if slot["probability"] >= 1.0:
                stats.skipped_deterministic += 1
                continue
            ids = [cid for cid, _p in slot["pmf"]]
            stats.rows += 1
            yield SlotRow(
                key=f"{decision['event_id']}/{slot['slot']}",
                created_at=decision["created_at"],
                context=decision["context"],
                slot=slot["slot"],
                slot_features=slot.get("slot_features") or {},
                eligible=tuple(Candidate(cid, features.get(cid, {})) for cid in ids),
                chosen=ids.index(slot["id"]),
                propensity=slot["probability"],
                reward=reward,
                logged_pmf=tuple(p for _cid, p in slot["pmf"]),
            )


# -- targets: each maps the rows (in time order) to one distribution per row ----------------
Target = Callable[[Sequence[SlotRow]], list[np.ndarray]]


def uniform_target(rows: Sequence[SlotRow]) -> list[np.ndarray]:
    return [np.full(len(r.eligible), 1.0 / len(r.eligible)) for r in rows]


def logging_target(rows: Sequence[SlotRow]) -> list[np.ndarray]:
    if any(r.logged_pmf is None for r in rows):
        raise ValueError("the logging target needs each row's logged distribution")
    return [np.asarray(r.logged_pmf, dtype=float) for r in rows]


def popularity_target(rows: Sequence[SlotRow]) -> list[np.ndarray]:
    """Deterministic: the eligible candidate with the best smoothed reward rate among the
    rows *before* this one (ties: request order)."""
    shown: dict[str, float] = defaultdict(float)
    rewarded: dict[str, float] = defaultdict(float)
    out = []
    for row in rows:
        scores = [(rewarded[c.id] + 1.0) / (shown[c.id] + 2.0) for c in row.eligible]
        pmf = np.zeros(len(row.eligible))
        pmf[int(np.argmax(scores))] = 1.0
        out.append(pmf)
        chosen = row.eligible[row.chosen].id
        shown[chosen] += 1
        rewarded[chosen] += row.reward
    return out


DRIVER_ROWS = 3000
"""From this many rows on, VW's own driver runs the progressive validation (see
:mod:`bandit_service.ope.vwfile`: ~30x faster, but ~0.5 s to start a child process)."""


def vw_target(vw_args: str) -> Target:
    """Progressive validation of a VW configuration: predict each row, then learn it."""
    from bandit_service.learners.vw import VWLearner

    def target(rows: Sequence[SlotRow]) -> list[np.ndarray]:
        if len(rows) >= DRIVER_ROWS:
            return _vw_driver(vw_args, rows)
        learner = VWLearner(vw_args)
        out = []
        for done, row in enumerate(rows, start=1):
            if PROGRESS is not None and (done % 5000 == 0 or done == len(rows)):
                PROGRESS(f"vw:{vw_args}", done, len(rows))
            pmf = learner.scorer(row.context, row.eligible).pmf(
                row.slot, row.slot_features, list(range(len(row.eligible)))
            )
            pmf_array = np.asarray(pmf, dtype=float)
            out.append(pmf_array / pmf_array.sum())
            learner.learn_slot(
                row.context, row.slot, row.slot_features, list(row.eligible), row.chosen,
                row.propensity, row.reward,
            )  # fmt: skip
        learner.close()
        return out

    return target


def _vw_driver(vw_args: str, rows: Sequence[SlotRow]) -> list[np.ndarray]:
    """The same distributions as the row-by-row loop, from VW's C++ driver."""
    from bandit_service.ope.stream import chunks_from_rows
    from bandit_service.ope.vwfile import ProgressiveVWTarget

    source = chunks_from_rows(rows)

    def progress(what: str, done: int) -> None:
        if PROGRESS is not None and done:
            PROGRESS(what, done, len(rows))

    target = ProgressiveVWTarget(vw_args)
    out: list[np.ndarray] = []
    try:
        target.prepare(source, progress)
        for chunk in source("full"):
            assert chunk.offsets is not None
            out.extend(np.split(target.pmf(chunk), chunk.offsets[1:-1]))
    finally:
        target.close()
    return out


def explicit_target(probabilities: Mapping[str, Mapping[str, float]]) -> Target:
    """Probabilities supplied from elsewhere: row key -> {candidate id: probability}."""

    def target(rows: Sequence[SlotRow]) -> list[np.ndarray]:
        out = []
        for row in rows:
            given = probabilities.get(row.key)
            if given is None:
                raise ValueError(f"no target probabilities for row {row.key}")
            out.append(np.asarray([given.get(c.id, 0.0) for c in row.eligible], dtype=float))
        return out

    return target


def parse_target(spec: str) -> Target:
    if spec == "uniform":
        return uniform_target
    if spec == "logging":
        return logging_target
    if spec == "popularity":
        return popularity_target
    if spec.startswith("vw:"):
        from bandit_service.policy import PolicyError, check_vw_args

        try:
            check_vw_args(spec[3:], "target")
        except PolicyError as exc:
            raise ValueError(str(exc)) from None
        from bandit_service.learners.vw import VWLearner

        try:  # refuse arguments VW itself rejects now, not halfway through an evaluation
            VWLearner(spec[3:]).close()
        except Exception as exc:
            raise ValueError(f"VW refused {spec[3:]!r}: {exc}") from None
        return vw_target(spec[3:])
    raise ValueError(f"unknown target {spec!r}: uniform, logging, popularity or vw:ARGS")


# -- the reward model for DM / DR -----------------------------------------------------------
def cross_fitted_model(rows: Sequence[SlotRow]) -> list[np.ndarray]:
    """Per row, the predicted reward of each eligible candidate, from the *other* half."""
    halves: list[tuple[dict[str, float], dict[str, float], float]] = []
    for half in (0, 1):
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, float] = defaultdict(float)
        train = [r for i, r in enumerate(rows) if i % 2 != half]
        mean = float(np.mean([r.reward for r in train])) if train else 0.0
        for r in train:
            cid = r.eligible[r.chosen].id
            sums[cid] += r.reward
            counts[cid] += 1
        halves.append((sums, counts, mean))
    out = []
    for i, row in enumerate(rows):
        sums, counts, mean = halves[i % 2]
        out.append(
            np.asarray(
                [(sums[c.id] + SHRINKAGE_ROWS * mean) / (counts[c.id] + SHRINKAGE_ROWS)
                 for c in row.eligible],
                dtype=float,
            )
        )  # fmt: skip
    return out


@dataclass
class Evaluation:
    target: str
    estimates: list[Estimate] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "estimates": [e.as_dict() for e in self.estimates]}


class Prepared:
    """Rows in time order with their cross-fitted reward model: computed once, shared by
    every target evaluated on them (so their estimates are paired row by row)."""

    def __init__(self, rows: Sequence[SlotRow]) -> None:
        if not rows:
            raise ValueError("no rows to evaluate (nothing logged with probability < 1?)")
        self.rows = sorted(rows, key=lambda r: r.created_at)
        self.model = cross_fitted_model(self.rows)

    def data(self, target: Target) -> LoggedData:
        return self.data_for(target(self.rows))

    def data_for(self, dists: list[np.ndarray]) -> LoggedData:
        """The estimators' input for a target's distributions over these rows."""
        return LoggedData.of(
            [r.reward for r in self.rows],
            [r.propensity for r in self.rows],
            [d[r.chosen] for d, r in zip(dists, self.rows, strict=True)],
            [m[r.chosen] for m, r in zip(self.model, self.rows, strict=True)],
            [float(d @ m) for d, m in zip(dists, self.model, strict=True)],
        )


def evaluate(
    rows: Sequence[SlotRow],
    targets: Mapping[str, Target],
    estimators: Sequence[str] = ("IPS", "SNIPS", "DM", "DR", "SwitchDR"),
    replicates: int = 1000,
    seed: int = 0,
    pages: bool = False,
) -> list[Evaluation]:
    """Every target by every estimator, on the same rows (sorted by time); with ``pages``,
    also whole-page IPS/SNIPS (:func:`page_estimates`) from the same target run."""
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown estimator(s) {unknown}; known: {sorted(ESTIMATORS)}")
    prepared = Prepared(rows)
    results = []
    page_results = []
    for name, target in targets.items():
        dists = target(prepared.rows)
        data = prepared.data_for(dists)
        evaluation = Evaluation(name)
        for estimator in estimators:
            evaluation.estimates.append(
                ESTIMATORS[estimator]().estimate(data, replicates=replicates, seed=seed)
            )
        results.append(evaluation)
        if pages:
            page_results.append(_page_evaluation(prepared, name, dists, replicates, seed))
    return results + page_results


def page_estimates(
    rows: Sequence[SlotRow],
    targets: Mapping[str, Target],
    replicates: int = 1000,
    seed: int = 0,
) -> list[Evaluation]:
    """Whole-page IPS and SNIPS for each target (see :func:`_page_evaluation`)."""
    prepared = Prepared(rows)
    return [
        _page_evaluation(prepared, name, target(prepared.rows), replicates, seed)
        for name, target in targets.items()
    ]


def _page_evaluation(
    prepared: Prepared, name: str, dists: list[np.ndarray], replicates: int, seed: int
) -> Evaluation:
    """A page's reward is the sum of its slots' rewards; its logged probability is the
    product of the slots' logged probabilities (each conditioned on the earlier slots, so
    the product is exactly the page's probability), and its target probability the product
    of the target's probabilities of the same slots given the same earlier slots. Pinned
    (probability 1) slots are left out of both the page's reward and its probabilities:
    they are the same under any target that keeps the pins. Model-based page estimates are
    not offered: a page-level reward model would need the interactions between slots.
    """
    from bandit_service.ope.estimators import IPS, SNIPS

    pages: dict[str, list[int]] = {}
    for index, row in enumerate(prepared.rows):
        pages.setdefault(row.key.rsplit("/", 1)[0], []).append(index)
    rewards, logged, wanted = [], [], []
    for members in pages.values():
        rewards.append(sum(prepared.rows[i].reward for i in members))
        logged.append(float(np.prod([prepared.rows[i].propensity for i in members])))
        wanted.append(float(np.prod([dists[i][prepared.rows[i].chosen] for i in members])))
    data = LoggedData.of(rewards, logged, wanted)
    evaluation = Evaluation(f"{name} (page)")
    for estimator in (IPS(), SNIPS()):
        evaluation.estimates.append(estimator.estimate(data, replicates=replicates, seed=seed))
    return evaluation


def format_table(results: Sequence[Evaluation], stats: LogStats | None = None) -> str:
    lines = []
    if stats is not None:
        lines.append(
            f"{stats.rows} slot rows from {stats.decisions} decisions; skipped "
            f"{stats.skipped_deterministic} logged with probability 1 and "
            f"{stats.skipped_not_shown} never shown"
        )
    width = max([len(r.target) for r in results] + [6]) + 2
    header = f"{'target':<{width}}{'estimator':<10}{'value':>10}  {'95% interval (bootstrap)':<26}"
    lines += [header + f"{'ESS':>9}{'max w':>9}"]
    for result in results:
        for e in result.estimates:
            low, high = e.bootstrap_interval
            interval = f"[{low:.5f}, {high:.5f}]"
            lines.append(
                f"{result.target:<{width}}{e.estimator:<10}{e.value:>10.5f}  {interval:<26}"
                f"{e.effective_sample_size:>9.0f}{e.max_weight:>9.3g}"
            )
            for warning in e.warnings:
                lines.append(f"{'':<{width + 10}}! {warning}")
    return "\n".join(lines)


def plot(results: Sequence[Evaluation], path: str, title: str) -> None:
    """A PNG of every estimate with its bootstrap interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, lows, highs = [], [], [], []
    for result in results:
        for e in result.estimates:
            labels.append(f"{result.target}\n{e.estimator}")
            values.append(e.value)
            lows.append(e.value - e.bootstrap_interval[0])
            highs.append(e.bootstrap_interval[1] - e.value)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(labels)), 4.5))
    ax.errorbar(range(len(values)), values, yerr=[lows, highs], fmt="o", capsize=4)
    ax.set_xticks(range(len(values)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("value per slot")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- Open Bandit Dataset files -------------------------------------------------------------
def rows_from_obd(
    path: str, n_items: int, stats: LogStats, chunk_rows: int = 10_000
) -> list[SlotRow]:
    """Slot rows from an OBD CSV: every item is eligible at every position, the user
    features become the ``user`` namespace, and the slot is the position (0-based)."""
    rows = list(iter_obd(path, n_items, stats, chunk_rows))
    stats.rows += len(rows)
    return rows


def iter_obd(
    path: str, n_items: int, stats: LogStats, chunk_rows: int = 10_000
) -> Iterator[SlotRow]:
    """:func:`rows_from_obd`, streamed (the CSV is read ``chunk_rows`` at a time)."""
    from bandit_service.ope.obd import ReadStats, read_obd

    items = tuple(Candidate(str(i)) for i in range(n_items))
    read = ReadStats()
    made = 0
    for chunk in read_obd(path, chunk_rows, read):
        for r in chunk:
            if not 0 <= r.item_id < n_items:
                raise ValueError(f"{path}: item_id {r.item_id} outside 0..{n_items - 1}")
            yield SlotRow(
                key=f"{made}/{r.position}",
                created_at=float(made),
                context={"user": {f"f{j}": v for j, v in enumerate(r.user_features)}},
                slot=r.position - 1,
                slot_features={},
                eligible=items,
                chosen=r.item_id,
                propensity=r.propensity,
                reward=r.click,
            )
            made += 1
    stats.decisions += read.rows
    stats.skipped_deterministic += read.skipped_deterministic


def position_target(distribution: Mapping[tuple[int, int], float], n_items: int) -> Target:
    """A target given as item x position probabilities (e.g. OBD's derived BTS policy)."""

    def target(rows: Sequence[SlotRow]) -> list[np.ndarray]:
        by_position: dict[int, np.ndarray] = {}
        out = []
        for row in rows:
            position = row.slot + 1
            if position not in by_position:
                by_position[position] = np.asarray(
                    [distribution.get((i, position), 0.0) for i in range(n_items)]
                )
            out.append(by_position[position])
        return out

    return target
