"""Evaluation that streams a log in chunks of columns, with memory bounded by the chunk
size, the number of distinct candidates and the bootstrap's buckets (not by the log).

The log is read twice: once (scalar columns only) to fit the cross-fitted reward model of
:mod:`bandit_service.ope.evaluate` (per-candidate mean reward shrunk towards the overall
mean, each half of the rows predicted by the other half), then again to evaluate every
target on every chunk. Rows must come in time order (``created_at`` never decreasing): the
progressive targets and the halves depend on it, and a sort would need the whole log.

Each chunk holds its rows' candidates flattened (``offsets`` delimit a row's eligible set),
so targets are vectorised: a target returns one probability per flattened candidate. Per
estimator the engine keeps sums (value, normal interval, ESS, largest weight) and per-bucket
sums for the bootstrap (:func:`~bandit_service.ope.estimators.bucket_sums`); all targets
and estimators are resampled with the same counts, so their intervals are paired as in
:func:`bandit_service.ope.evaluate.evaluate`, which gives the same values on the same rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from bandit_service.ope.estimators import (
    DEFAULT_BUCKETS,
    ESTIMATORS,
    Z95,
    Estimate,
    Estimator,
    LoggedData,
    bootstrap_totals,
    bucket_sums,
    overlap_warnings,
    ratio_percentiles,
)
from bandit_service.ope.evaluate import SHRINKAGE_ROWS, Evaluation, LogStats, SlotRow


class Vocabulary:
    """Candidate ids as dense integer codes (so per-candidate state is an array)."""

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}

    def code(self, candidate_id: str) -> int:
        code = self.codes.get(candidate_id)
        if code is None:
            code = self.codes[candidate_id] = len(self.codes)
        return code

    def __len__(self) -> int:
        return len(self.codes)


@dataclass
class RowFeatures:
    """What a VW target renders, straight from a file's parsed JSON (no per-row objects):
    per row its context, slot index, slot features and candidates, each candidate a
    ``{"id": ..., "features": {...}}`` object or a bare id."""

    contexts: list[Any]
    slots: list[int]
    slot_features: list[Any]
    candidates: list[Any]
    # or, flattened (see Chunk.offsets): each candidate's id and features as JSON text
    candidate_keys: list[tuple[str, str]] | None = None


@dataclass
class Chunk:
    """Consecutive rows of a log, as columns.

        ``candidates`` (codes) and the per-candidate columns (``logged_pmf``, ``explicit[...]``)
        are flattened; row i's candidates are ``offsets[i]:offsets[i + 1]``. ``rows`` holds
        the rows as objects (in-memory sources) and ``features`` what a VW target renders (files,
    in the "rows" mode).
    """

    first_row: int
    created_at: np.ndarray
    chosen_code: np.ndarray
    propensity: np.ndarray
    reward: np.ndarray
    offsets: np.ndarray | None = None
    candidates: np.ndarray | None = None
    chosen: np.ndarray | None = None
    logged_pmf: np.ndarray | None = None
    explicit: dict[str, np.ndarray] = field(default_factory=dict)
    rows: Sequence[SlotRow] | None = None
    features: RowFeatures | None = None

    def __len__(self) -> int:
        return len(self.reward)

    @property
    def starts(self) -> np.ndarray:
        assert self.offsets is not None
        return self.offsets[:-1]

    @property
    def sizes(self) -> np.ndarray:
        assert self.offsets is not None
        return np.diff(self.offsets)

    def chosen_flat(self) -> np.ndarray:
        """Index of each row's logged candidate in the flattened arrays."""
        assert self.chosen is not None
        return self.starts + self.chosen

    def row_of_flat(self) -> np.ndarray:
        return np.repeat(np.arange(len(self)), self.sizes)


# A source is called with a mode: "light" may leave out all but the scalar columns (created_at,
# chosen_code, propensity, reward), "full" has the candidates, "rows" also the SlotRows.
Source = Callable[[str], Iterator[Chunk]]


def chunk_from_rows(rows: Sequence[SlotRow], first_row: int, vocab: Vocabulary) -> Chunk:
    """One chunk of in-memory rows (they keep their order)."""
    sizes = [len(r.eligible) for r in rows]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total = int(offsets[-1])
    codes = np.fromiter((vocab.code(c.id) for r in rows for c in r.eligible), np.int64, total)
    chosen = np.asarray([r.chosen for r in rows], dtype=np.int64)
    pmf = None
    if all(r.logged_pmf is not None for r in rows):
        pmf = np.fromiter((p for r in rows for p in r.logged_pmf or ()), float, total)
    return Chunk(
        first_row=first_row,
        created_at=np.asarray([r.created_at for r in rows], dtype=float),
        chosen_code=codes[offsets[:-1] + chosen],
        propensity=np.asarray([r.propensity for r in rows], dtype=float),
        reward=np.asarray([r.reward for r in rows], dtype=float),
        offsets=offsets,
        candidates=codes,
        chosen=chosen,
        logged_pmf=pmf,
        rows=rows,
    )


def chunks_from_rows(
    rows: Sequence[SlotRow], chunk_rows: int = 50_000, vocabulary: Vocabulary | None = None
) -> Source:
    """A source over in-memory rows (sorted by time, as :class:`Prepared` sorts them)."""
    ordered = sorted(rows, key=lambda r: r.created_at)
    vocab = vocabulary or Vocabulary()

    def source(_mode: str) -> Iterator[Chunk]:
        for start in range(0, len(ordered), chunk_rows):
            yield chunk_from_rows(ordered[start : start + chunk_rows], start, vocab)

    return source


def rows_source(
    read_rows: Callable[[LogStats], Iterable[SlotRow]],
    stats: LogStats,
    chunk_rows: int = 50_000,
) -> Source:
    """A source over a streamed file reader (JSON lines, DSJSON, OBD): ``read_rows`` is
    called once per pass with the counters to update (``stats`` on the "full" pass only)
    and yields rows in file order, which are chunked as they come (bounded memory)."""
    vocab = Vocabulary()

    def source(mode: str) -> Iterator[Chunk]:
        first = 0
        buffer: list[SlotRow] = []
        counts = stats if mode == "full" else LogStats()
        for row in read_rows(counts):
            counts.rows += 1
            buffer.append(row)
            if len(buffer) == chunk_rows:
                yield chunk_from_rows(buffer, first, vocab)
                first += len(buffer)
                buffer = []
        if buffer:
            yield chunk_from_rows(buffer, first, vocab)

    return source


def store_source(
    db: Any, policy: Any, since: float | None, until: float | None, stats: LogStats
) -> Source:
    """A policy's logged decisions, read from the store a batch at a time (bounded memory)
    in log order: the order the service committed, and its trainer learned, them. That is
    time order up to requests that overlapped, so :func:`evaluate_stream` is called with
    ``time_ordered=False`` for it (the in-memory path sorts by ``created_at`` instead)."""
    from bandit_service.ope.evaluate import rows_from_decisions
    from bandit_service.store.repository import iter_decisions

    vocab = Vocabulary()

    def source(mode: str) -> Iterator[Chunk]:
        first = 0
        counts = stats if mode == "full" else LogStats()
        for batch in iter_decisions(db, policy.name, since, until):
            rows = list(rows_from_decisions(batch, policy, counts))
            if rows:
                yield chunk_from_rows(rows, first, vocab)
                first += len(rows)

    return source


# -- the reward model ------------------------------------------------------------------------
class CrossFittedModel:
    """Per-candidate sums of the two halves (even and odd rows in time order)."""

    def __init__(self, time_ordered: bool = True) -> None:
        self.time_ordered = time_ordered
        self.sums = [np.zeros(0), np.zeros(0)]
        self.counts = [np.zeros(0), np.zeros(0)]
        self.total = [0.0, 0.0]
        self.rows = [0, 0]
        self.last_time = -math.inf

    def add(self, chunk: Chunk) -> None:
        times = chunk.created_at
        decreasing = len(times) and (times[0] < self.last_time or np.any(np.diff(times) < 0))
        if self.time_ordered and decreasing:
            raise ValueError(
                "rows must be in time order (created_at never decreasing) to stream; sort "
                "the file by created_at"
            )
        if len(times):
            self.last_time = float(times[-1])
        parity = (np.arange(len(chunk)) + chunk.first_row) % 2
        size = int(chunk.chosen_code.max()) + 1 if len(chunk) else 0
        for half in (0, 1):
            mask = parity == half
            codes, rewards = chunk.chosen_code[mask], chunk.reward[mask]
            if size > len(self.sums[half]):
                self.sums[half] = np.pad(self.sums[half], (0, size - len(self.sums[half])))
                self.counts[half] = np.pad(self.counts[half], (0, size - len(self.counts[half])))
            np.add.at(self.sums[half], codes, rewards)
            np.add.at(self.counts[half], codes, 1.0)
            self.total[half] += float(rewards.sum())
            self.rows[half] += int(mask.sum())

    def predict(self, chunk: Chunk) -> np.ndarray:
        """Predicted reward of every flattened candidate, from the row's *other* half."""
        assert chunk.candidates is not None
        parity = ((np.arange(len(chunk)) + chunk.first_row) % 2)[chunk.row_of_flat()]
        out = np.empty(len(chunk.candidates))
        for row_half in (0, 1):
            train = 1 - row_half  # rows of one parity are predicted by the other's model
            mask = parity == row_half
            codes = chunk.candidates[mask]
            known = codes < len(self.sums[train])
            sums = np.where(known, self.sums[train][np.where(known, codes, 0)], 0.0)
            counts = np.where(known, self.counts[train][np.where(known, codes, 0)], 0.0)
            mean = self.total[train] / self.rows[train] if self.rows[train] else 0.0
            out[mask] = (sums + SHRINKAGE_ROWS * mean) / (counts + SHRINKAGE_ROWS)
        return out


# -- targets ---------------------------------------------------------------------------------
class StreamTarget(Protocol):
    """Called once per chunk, in order: a probability per flattened candidate."""

    def pmf(self, chunk: Chunk) -> np.ndarray: ...


class UniformTarget:
    def pmf(self, chunk: Chunk) -> np.ndarray:
        return np.repeat(1.0 / chunk.sizes, chunk.sizes)


class LoggingTarget:
    def pmf(self, chunk: Chunk) -> np.ndarray:
        if chunk.logged_pmf is None:
            raise ValueError("the logging target needs each row's logged distribution (pmf)")
        return chunk.logged_pmf


class ExplicitTarget:
    """Probabilities supplied per logged row, e.g. a file's ``target_NAME`` column."""

    def __init__(self, name: str) -> None:
        self.name = name

    def pmf(self, chunk: Chunk) -> np.ndarray:
        if self.name not in chunk.explicit:
            raise ValueError(f"no target probabilities {self.name!r} in the log")
        return chunk.explicit[self.name]


class PopularityTarget:
    """As :func:`bandit_service.ope.evaluate.popularity_target`, vectorised: each row shows
    the eligible candidate with the best (rewarded + 1) / (shown + 2) among the rows before
    it (ties: the first eligible). Within a chunk, the counts before row i are the counts
    at the chunk's start plus those of the chunk's earlier rows, found by binary search in
    the chunk's (candidate, row)-sorted choices."""

    def __init__(self) -> None:
        self.shown = np.zeros(0)
        self.rewarded = np.zeros(0)

    def pmf(self, chunk: Chunk) -> np.ndarray:
        assert chunk.candidates is not None
        n = len(chunk)
        size = int(max(chunk.candidates.max(initial=-1), chunk.chosen_code.max(initial=-1))) + 1
        if size > len(self.shown):
            self.shown = np.pad(self.shown, (0, size - len(self.shown)))
            self.rewarded = np.pad(self.rewarded, (0, size - len(self.rewarded)))
        rows = chunk.row_of_flat()
        codes = chunk.candidates
        keys = chunk.chosen_code * (n + 1) + np.arange(n)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        cum_reward = np.concatenate([[0.0], np.cumsum(chunk.reward[order])])
        before = np.searchsorted(sorted_keys, codes * (n + 1) + rows)  # choices of c before i
        first = np.searchsorted(sorted_keys, codes * (n + 1))
        shown = self.shown[codes] + (before - first)
        rewarded = self.rewarded[codes] + (cum_reward[before] - cum_reward[first])
        scores = (rewarded + 1.0) / (shown + 2.0)
        best = np.maximum.reduceat(scores, chunk.starts)
        position = np.arange(len(codes))
        candidates_at_best = np.where(scores == best[rows], position, len(codes))
        winner = np.minimum.reduceat(candidates_at_best, chunk.starts)
        out = np.zeros(len(codes))
        out[winner] = 1.0
        np.add.at(self.shown, chunk.chosen_code, 1.0)
        np.add.at(self.rewarded, chunk.chosen_code, chunk.reward)
        return out


def parse_stream_target(spec: str) -> StreamTarget | None:
    """The streaming form of a target spec, or None if it has none (see :mod:`.vwfile`)."""
    if spec == "uniform":
        return UniformTarget()
    if spec == "logging":
        return LoggingTarget()
    if spec == "popularity":
        return PopularityTarget()
    if spec.startswith("explicit:"):
        return ExplicitTarget(spec.removeprefix("explicit:"))
    return None


# -- accumulation ----------------------------------------------------------------------------
@dataclass
class _Sums:
    """Running sums of one estimator's numerator (n) and denominator (d)."""

    n: float = 0.0
    d: float = 0.0
    nn: float = 0.0
    nd: float = 0.0
    dd: float = 0.0
    ratio: bool = False

    def add(self, num: np.ndarray, den: np.ndarray | None) -> None:
        self.n += float(num.sum())
        self.nn += float(num @ num)
        if den is None:
            self.d += len(num)
            self.nd += float(num.sum())
            self.dd += len(num)
        else:
            self.ratio = True
            self.d += float(den.sum())
            self.nd += float(num @ den)
            self.dd += float(den @ den)

    def value(self) -> float:
        return self.n / self.d if self.d > 0 else 0.0

    def standard_error(self, rows: int) -> float:
        """Delta method for ratios (as SNIPS); the sample standard error for means."""
        v = self.value()
        squares = max(self.nn - 2 * v * self.nd + v * v * self.dd, 0.0)
        if self.ratio:
            return math.sqrt(squares) / self.d if self.d > 0 else math.inf
        return math.sqrt(squares / (rows - 1) / rows) if rows > 1 else math.inf


@dataclass
class _TargetSums:
    estimators: dict[str, _Sums]
    rows: int = 0
    w: float = 0.0
    ww: float = 0.0
    max_w: float = 0.0


def evaluate_stream(
    source: Source,
    targets: Mapping[str, StreamTarget],
    estimators: Sequence[str] = ("IPS", "SNIPS", "DM", "DR", "SwitchDR"),
    replicates: int = 1000,
    seed: int = 0,
    buckets: int = DEFAULT_BUCKETS,
    progress: Callable[[str, int], None] | None = None,
    time_ordered: bool = True,
) -> list[Evaluation]:
    """Every target by every estimator, streaming ``source`` twice (see the module doc).
    ``time_ordered``: refuse rows whose ``created_at`` goes back (files); the store's log
    order is used as it is."""
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown estimator(s) {unknown}; known: {sorted(ESTIMATORS)}")
    model = CrossFittedModel(time_ordered)
    rows = 0
    if progress is not None:
        progress("reward model", 0)
    for chunk in source("light"):
        model.add(chunk)
        rows += len(chunk)
        if progress is not None:
            progress("reward model", rows)
    if rows == 0:
        raise ValueError("no rows to evaluate (nothing logged with probability < 1?)")
    for target in targets.values():  # e.g. a VW configuration learns the whole log first
        prepare = getattr(target, "prepare", None)
        if prepare is not None:
            prepare(source, progress)
    instances: list[Estimator] = [ESTIMATORS[e]() for e in estimators]
    state = {name: _TargetSums({e.name: _Sums() for e in instances}) for name in targets}
    boot: np.ndarray | None = None
    denominators: dict[tuple[str, str], int] = {}  # column of each ratio's denominator
    done = 0
    if progress is not None:
        progress("evaluation", 0)
    for chunk in source("full"):
        q = model.predict(chunk)
        at_chosen = chunk.chosen_flat()
        columns: list[np.ndarray] = [np.ones(len(chunk))]
        den_index: dict[tuple[str, str], int] = {}
        for name, target in targets.items():
            pi = np.asarray(target.pmf(chunk), dtype=float)
            if pi.shape != q.shape:
                raise ValueError(f"target {name}: {len(pi)} probabilities for {len(q)} candidates")
            try:
                data = LoggedData.of(
                    chunk.reward,
                    chunk.propensity,
                    pi[at_chosen],
                    q[at_chosen],
                    np.add.reduceat(pi * q, chunk.starts),
                )
            except ValueError as exc:  # rows are numbered from the chunk's start: say where
                raise ValueError(
                    f"target {name}, in the chunk from row {chunk.first_row + 1}: {exc}"
                ) from None
            sums = state[name]
            w = data.weights
            sums.rows += len(w)
            sums.w += float(w.sum())
            sums.ww += float(w @ w)
            sums.max_w = max(sums.max_w, float(w.max()))
            for estimator in instances:
                num, den = estimator.columns(data)
                sums.estimators[estimator.name].add(num, den)
                columns.append(num)
                if den is not None:
                    den_index[(name, estimator.name)] = len(columns)
                    columns.append(den)
        denominators = den_index
        block = bucket_sums(np.column_stack(columns), chunk.first_row, buckets)
        boot = block if boot is None else boot + block
        done += len(chunk)
        if progress is not None:
            progress("evaluation", done)
    assert boot is not None
    totals = bootstrap_totals(boot[: min(rows, buckets)], replicates, seed)
    results = []
    column = 1
    for name in targets:
        sums = state[name]
        evaluation = Evaluation(name)
        ess = sums.w**2 / sums.ww if sums.ww > 0 else 0.0
        for estimator in instances:
            s = sums.estimators[estimator.name]
            num_col = column
            den_col = denominators.get((name, estimator.name), 0)
            column += 1 if den_col == 0 else 2
            value = s.value()
            se = s.standard_error(sums.rows)
            evaluation.estimates.append(
                Estimate(
                    estimator=estimator.name,
                    value=value,
                    normal_interval=(value - Z95 * se, value + Z95 * se),
                    bootstrap_interval=ratio_percentiles(totals[:, num_col], totals[:, den_col]),
                    effective_sample_size=ess,
                    max_weight=sums.max_w,
                    rows=sums.rows,
                    warnings=overlap_warnings(ess, sums.rows, sums.max_w),
                )
            )
        results.append(evaluation)
    return results
