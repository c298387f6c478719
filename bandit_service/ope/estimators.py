"""Off-policy value estimators, each with intervals and overlap diagnostics.

Notation for n logged rows i: reward r_i, the logging policy's probability p_i of the
logged action a_i, the target policy's probability pi_i of that same action, and the
importance weight w_i = pi_i / p_i. Model-based estimators also take a reward model q:
``q_logged[i]`` = q(x_i, a_i) and ``q_target[i]`` = sum_a pi(a | x_i) q(x_i, a), the model's
value of the target policy in context x_i.

Every estimator returns an :class:`Estimate`: the value, a 95% Gaussian interval (from the
per-row terms' standard error; delta method for SNIPS), a 95% seeded bootstrap percentile
interval (rows resampled with replacement, see :func:`bucket_sums`), the effective sample size
ESS = (sum w)^2 / sum w^2 (Kong 1992), the largest weight, and a warning when overlap is
poor (ESS below 1% of the rows or 30, or a weight above 1,000): then the target policy
puts mass where the logging policy rarely went, and the estimate rests on a few rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

Z95 = 1.959963984540054
MAX_WEIGHT_WARNING = 1000.0


@dataclass(frozen=True)
class LoggedData:
    """Validated arrays for the estimators (see the module docstring for the notation)."""

    rewards: np.ndarray
    propensities: np.ndarray
    target_probabilities: np.ndarray
    q_logged: np.ndarray | None = None
    q_target: np.ndarray | None = None

    @classmethod
    def of(
        cls,
        rewards: Sequence[float] | np.ndarray,
        propensities: Sequence[float] | np.ndarray,
        target_probabilities: Sequence[float] | np.ndarray,
        q_logged: Sequence[float] | np.ndarray | None = None,
        q_target: Sequence[float] | np.ndarray | None = None,
    ) -> LoggedData:
        """Check the inputs; every error names the argument and the first bad row."""
        r = _array("rewards", rewards)
        n = len(r)
        if n == 0:
            raise ValueError("rewards: at least one logged row is needed")
        p = _array("propensities", propensities, n)
        pi = _array("target_probabilities", target_probabilities, n)
        _check_range("propensities", p, low_open=True)
        _check_range("target_probabilities", pi, low_open=False)
        ql = _array("q_logged", q_logged, n) if q_logged is not None else None
        qt = _array("q_target", q_target, n) if q_target is not None else None
        if (ql is None) != (qt is None):
            raise ValueError("q_logged and q_target come together (both or neither)")
        return cls(r, p, pi, ql, qt)

    @property
    def weights(self) -> np.ndarray:
        return self.target_probabilities / self.propensities

    def take(self, rows: np.ndarray) -> LoggedData:
        return LoggedData(
            self.rewards[rows],
            self.propensities[rows],
            self.target_probabilities[rows],
            None if self.q_logged is None else self.q_logged[rows],
            None if self.q_target is None else self.q_target[rows],
        )


def _array(name: str, values: object, length: int | None = None) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be numbers") from None
    if array.ndim != 1:
        raise ValueError(f"{name}: must be one-dimensional, got shape {array.shape}")
    if length is not None and len(array) != length:
        raise ValueError(f"{name}: has {len(array)} rows but rewards has {length}")
    bad = np.flatnonzero(~np.isfinite(array))
    if len(bad):
        raise ValueError(f"{name}: row {bad[0]} is not a finite number ({array[bad[0]]})")
    return array


def _check_range(name: str, values: np.ndarray, low_open: bool) -> None:
    bad = np.flatnonzero((values <= 0) if low_open else (values < 0))
    if len(bad):
        bound = "> 0" if low_open else ">= 0"
        raise ValueError(f"{name}: row {bad[0]} is {values[bad[0]]}; probabilities must be {bound}")
    bad = np.flatnonzero(values > 1)
    if len(bad):
        raise ValueError(f"{name}: row {bad[0]} is {values[bad[0]]}; probabilities must be <= 1")


@dataclass(frozen=True)
class Estimate:
    estimator: str
    value: float
    normal_interval: tuple[float, float]
    bootstrap_interval: tuple[float, float]
    effective_sample_size: float
    max_weight: float
    rows: int
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, object]:
        return {
            "estimator": self.estimator,
            "value": self.value,
            "normal_interval_95": list(self.normal_interval),
            "bootstrap_interval_95": list(self.bootstrap_interval),
            "effective_sample_size": self.effective_sample_size,
            "max_weight": self.max_weight,
            "rows": self.rows,
            "warnings": list(self.warnings),
        }


def overlap_warnings(ess: float, rows: int, max_weight: float) -> tuple[str, ...]:
    """Warnings when the estimate rests on a few rows (see the module docstring)."""
    warnings = []
    if ess < max(30.0, 0.01 * rows):
        warnings.append(
            f"poor overlap: effective sample size {ess:.1f} of {rows} rows; the estimate "
            "rests on a few rows"
        )
    if max_weight > MAX_WEIGHT_WARNING:
        warnings.append(f"poor overlap: an importance weight of {max_weight:.4g}")
    return tuple(warnings)


class Estimator:
    """Base: subclasses give the per-row terms whose mean is the estimate."""

    name = "estimator"
    needs_model = False

    def terms(self, data: LoggedData) -> np.ndarray:
        raise NotImplementedError

    def value(self, data: LoggedData) -> float:
        return float(np.mean(self.terms(data)))

    def standard_error(self, data: LoggedData) -> float:
        terms = self.terms(data)
        return float(np.std(terms, ddof=1) / math.sqrt(len(terms))) if len(terms) > 1 else math.inf

    def columns(self, data: LoggedData) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-row numerator and denominator (``None``: 1 per row): the estimate is
        sum(numerator) / sum(denominator). Every estimator here is such a ratio of sums,
        which is what lets the bootstrap and the streaming evaluation work on sums alone."""
        return self.terms(data), None

    def bootstrap_interval(
        self, data: LoggedData, replicates: int = 1000, seed: int = 0
    ) -> tuple[float, float]:
        """Percentile 95% interval over ``replicates`` resamples of the rows, seeded."""
        numerator, denominator = self.columns(data)
        if denominator is None:
            denominator = np.ones_like(numerator)
        sums = bucket_sums(np.column_stack([numerator, denominator]), 0, DEFAULT_BUCKETS)
        used = min(len(numerator), DEFAULT_BUCKETS)
        totals = bootstrap_totals(sums[:used], replicates, seed)
        return ratio_percentiles(totals[:, 0], totals[:, 1])

    def estimate(self, data: LoggedData, *, replicates: int = 1000, seed: int = 0) -> Estimate:
        if self.needs_model and data.q_logged is None:
            raise ValueError(f"{self.name} needs a reward model (q_logged and q_target)")
        value = self.value(data)
        se = self.standard_error(data)
        weights = data.weights
        ess = float(weights.sum() ** 2 / np.sum(weights**2)) if np.any(weights) else 0.0
        max_weight = float(weights.max())
        n = len(weights)
        warnings = overlap_warnings(ess, n, max_weight)
        return Estimate(
            estimator=self.name,
            value=value,
            normal_interval=(value - Z95 * se, value + Z95 * se),
            bootstrap_interval=self.bootstrap_interval(data, replicates, seed),
            effective_sample_size=ess,
            max_weight=max_weight,
            rows=n,
            warnings=warnings,
        )


class IPS(Estimator):
    """Inverse propensity scoring: V = (1/n) sum_i w_i r_i.

    Horvitz & Thompson (1952); for contextual bandits e.g. Dudík, Langford & Li, "Doubly
    Robust Policy Evaluation and Learning", ICML 2011. Unbiased when p_i > 0 wherever
    pi_i > 0; high variance when weights are large.
    """

    name = "IPS"

    def terms(self, data: LoggedData) -> np.ndarray:
        return data.weights * data.rewards


class SNIPS(Estimator):
    """Self-normalised IPS: V = sum_i w_i r_i / sum_i w_i.

    Swaminathan & Joachims, "The Self-Normalized Estimator for Counterfactual Learning",
    NeurIPS 2015. Slightly biased, much lower variance; the standard error is the delta
    method's, sqrt(sum w_i^2 (r_i - V)^2) / sum w_i.
    """

    name = "SNIPS"

    def value(self, data: LoggedData) -> float:
        w = data.weights
        total = w.sum()
        return float(np.dot(w, data.rewards) / total) if total > 0 else 0.0

    def terms(self, data: LoggedData) -> np.ndarray:  # only used for diagnostics
        w = data.weights
        return w * data.rewards / max(float(np.mean(w)), 1e-300)

    def columns(self, data: LoggedData) -> tuple[np.ndarray, np.ndarray | None]:
        w = data.weights
        return w * data.rewards, w

    def standard_error(self, data: LoggedData) -> float:
        w = data.weights
        total = w.sum()
        if total <= 0:
            return math.inf
        v = self.value(data)
        return float(math.sqrt(np.sum(w**2 * (data.rewards - v) ** 2)) / total)


class DM(Estimator):
    """Direct method: V = (1/n) sum_i q_target[i], the reward model's value of the target.

    Beygelzimer & Langford, "The Offset Tree for Learning with Partial Labels", KDD 2009.
    Low variance; biased exactly as much as the reward model is wrong.
    """

    name = "DM"
    needs_model = True

    def terms(self, data: LoggedData) -> np.ndarray:
        assert data.q_target is not None
        return data.q_target


class DR(Estimator):
    """Doubly robust: V = (1/n) sum_i [q_target[i] + w_i (r_i - q_logged[i])].

    Dudík, Langford & Li, ICML 2011. Unbiased if either the propensities or the reward model
    are right; equals DM when the model is exact (the correction term vanishes).
    """

    name = "DR"
    needs_model = True

    def terms(self, data: LoggedData) -> np.ndarray:
        assert data.q_target is not None and data.q_logged is not None
        return data.q_target + data.weights * (data.rewards - data.q_logged)


@dataclass
class SwitchDR(Estimator):
    """Switch-DR: the DR correction only where w_i <= tau, the model alone elsewhere:
    V = (1/n) sum_i [q_target[i] + 1{w_i <= tau} w_i (r_i - q_logged[i])].

    Wang, Agarwal & Dudík, "Optimal and Adaptive Off-policy Evaluation in Contextual
    Bandits", ICML 2017 (this per-logged-row form is the one used by Open Bandit Pipeline).
    Caps the variance that huge weights bring, at the price of some model bias.
    """

    tau: float = 100.0
    name = "SwitchDR"
    needs_model = True

    def terms(self, data: LoggedData) -> np.ndarray:
        assert data.q_target is not None and data.q_logged is not None
        w = data.weights
        keep = w <= self.tau
        return data.q_target + keep * w * (data.rewards - data.q_logged)


DEFAULT_BUCKETS = 20_000
"""Rows are resampled individually up to this many; beyond, in this many fixed buckets."""


def bucket_sums(columns: np.ndarray, first_row: int, buckets: int) -> np.ndarray:
    """Sum the rows of ``columns`` (n x k) into ``buckets`` bins. Row i of the log
    (``first_row`` being this block's first) goes to bin i while i < ``buckets``, and past
    that to a pseudo-random bin (a hash of i, so the result does not depend on how the log
    was chunked).

    Why: the bootstrap of a ratio of sums, sum(c_i num_i) / sum(c_i den_i) with multinomial
    counts c, only needs the rows' sums. Up to ``buckets`` rows every row is its own bin and
    resampling the bins *is* the classic row bootstrap (Efron 1979). Past that, each bin
    holds a random group of about n / buckets rows, and the bins are resampled: for
    independent rows the bin sums are independent too, so this is the bootstrap of the same
    estimator with the bin as the unit, with the same variance; the groups being random
    (not, say, every 20,000th row) keeps slow drifts in the log inside that variance, as
    they are in the row bootstrap's. With 20,000 bins the percentiles are as stable. Memory
    stays ``buckets x k`` however long the log, which is what lets logs stream in chunks.
    """
    n = len(columns)
    out = np.zeros((buckets, columns.shape[1]))
    if n == 0:
        return out
    rows = np.arange(first_row, first_row + n, dtype=np.uint64)
    bins = np.where(rows < buckets, rows, _mix(rows) % np.uint64(buckets)).astype(np.intp)
    for k in range(columns.shape[1]):
        out[:, k] = np.bincount(bins, weights=columns[:, k], minlength=buckets)
    return out


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele, Lea & Flood, OOPSLA 2014): a well-mixed 64-bit hash
    of each row number, vectorised (uint64 arithmetic wraps, as the algorithm intends)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def bootstrap_totals(
    sums: np.ndarray, replicates: int, seed: int, block_entries: int = 4_000_000
) -> np.ndarray:
    """``replicates`` x k resampled column totals: each replicate draws len(sums) bins with
    replacement (multinomial counts, seeded), vectorised in blocks of replicates so memory
    stays ~``block_entries`` counts."""
    if replicates < 1:
        raise ValueError("replicates must be at least 1")
    rng = np.random.default_rng(seed)
    g = len(sums)
    out = np.empty((replicates, sums.shape[1]))
    per_block = max(1, block_entries // max(g, 1))
    for start in range(0, replicates, per_block):
        b = min(per_block, replicates - start)
        draws = rng.integers(0, g, size=(b, g))
        draws += (np.arange(b) * g)[:, None]
        counts = np.bincount(draws.ravel(), minlength=b * g).reshape(b, g)
        out[start : start + b] = counts @ sums
    return out


def ratio_percentiles(numerators: np.ndarray, denominators: np.ndarray) -> tuple[float, float]:
    """2.5% and 97.5% percentiles of numerator / denominator (0 where the denominator is 0,
    as SNIPS reports when no weight is positive)."""
    safe = np.where(denominators > 0, denominators, 1.0)
    values = np.where(denominators > 0, numerators / safe, 0.0)
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def bootstrap_interval(
    estimator: Estimator, data: LoggedData, replicates: int, seed: int
) -> tuple[float, float]:
    """Percentile 95% bootstrap interval of ``estimator`` on ``data`` (seeded)."""
    return estimator.bootstrap_interval(data, replicates, seed)


ESTIMATORS: dict[str, Callable[[], Estimator]] = {
    "IPS": IPS,
    "SNIPS": SNIPS,
    "DM": DM,
    "DR": DR,
    "SwitchDR": SwitchDR,
}
