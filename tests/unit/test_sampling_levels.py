"""The two-valued (epsilon-greedy) fast path of the sampler gives exactly the general answers.

``sampling.normalise_and_draw`` and ``sampling.normalise`` are compared with the general
path they replace for such pmfs: the previous ``normalise`` (copied below as it was),
``draw_normalised`` and ``is_greedy_normalised``, bit for bit (every probability's IEEE
bytes, NaN included) and index for index, on seeded adversarial inputs: float32-rounded
epsilon-greedy pmfs with the greedy entry anywhere and ties, uniform ones, zeros, -0.0,
negatives, NaN, infinities, subnormals, overflowing sums, one entry, and ``u`` on and
either side of every running sum it can meet.
"""

from __future__ import annotations

import math
import random
import struct
import sys
from collections.abc import Sequence
from itertools import accumulate

import pytest

from bandit_service.engine import sampling

# _draw_levels and _first_above stand for accumulate's sums only where builtin sum adds
# plainly (sampling._SUM_IS_SEQUENTIAL): elsewhere the engine does not use them.
sequential_sum = pytest.mark.skipif(
    sys.version_info >= (3, 12), reason="builtin sum compensates rounding from 3.12"
)


def _previous_normalise(weights: Sequence[float]) -> list[float]:
    """``sampling.normalise`` before the fast path (6ae22ff), verbatim."""
    total = sum(weights)
    if total > 0.0 and min(weights) > 0.0:
        return [w / total for w in weights]
    clipped = [w if w > 0.0 else 0.0 for w in weights]
    total = sum(clipped)
    if not total > 0.0:
        return [1.0 / len(clipped)] * len(clipped)
    return [w / total for w in clipped]


def _bits(values: Sequence[float]) -> tuple[list[type], bytes]:
    return [type(v) for v in values], struct.pack(f"<{len(values)}d", *values)


def _f32(x: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def _fresh(values: list[float]) -> list[float]:
    """Distinct float objects, as VW's list has (equal values, not the same object)."""
    return [float(repr(v)) if math.isfinite(v) else v * 1.0 for v in values]


def _epsilon_greedy(rng: random.Random, n: int) -> list[float]:
    epsilon = rng.choice([0.1, 0.05, 0.2, 0.01, 1.0, 0.999, 1e-7])
    low = _f32(epsilon / n)
    weights = [low] * n
    ties = rng.choice([0, 1, 1, 1, 1, 2, 3, 5, n // 2, n])
    spots = rng.sample(range(n), min(ties, n))
    if rng.random() < 0.2 and n >= 3:  # ties side by side, or at both ends
        spots = rng.choice([[0, 1], [n - 2, n - 1], [0, n - 1], [n // 2, n // 2 + 1]])
    for at in spots:
        weights[at] = _f32(low + (1 - epsilon) / max(1, len(spots)))
    return _fresh(weights)


def _odd(rng: random.Random, n: int) -> list[float]:
    """Near-two-valued lists broken in every way the fast path must notice."""
    low, high = _f32(0.1 / n), _f32(0.9 + 0.1 / n)
    weights = [low] * n
    weights[rng.randrange(n)] = high
    at = rng.randrange(n)
    weights[at] = rng.choice(
        [0.0, -0.0, -low, math.nan, math.inf, -math.inf, math.nextafter(low, 1.0),
         math.nextafter(low, 0.0), (low + high) / 2, 2 * high, low / 2, 5e-324]
    )  # fmt: skip
    return _fresh(weights)


def _cases(rng: random.Random) -> list[list[float]]:
    cases: list[list[float]] = [
        [1.0],
        [0.5],
        [0.0],
        [-0.0],
        [math.nan],
        [math.inf],
        [-1.0],
        [0.5, 0.5],
        [0.25, 0.75],
        [0.75, 0.25],
        [0.0, 1.0],
        [-0.0, -0.0],
        [math.inf, math.inf],
        [math.inf, 1.0, 1.0],
        [1.0, 1.0, math.inf],
        [math.nan, math.nan, math.nan],
        [1e308] * 4,  # the sum overflows: quotients 0.0
        [1e308, 1.0, 1.0],
        [5e-324] * 50,  # subnormal weights
        [5e-324, 5e-324, 1e-300],
        [1e-300] * 70,
        [2.0, 1.0, 2.0, 1.0],
        [1.0, 2.0, 3.0],
        [3.0, 1.0, 1.0, 1.0, 2.0],
        [1, 1, 2],  # ints
        [True, True, 1.0],
    ]
    for _ in range(1500):
        n = rng.choice([1, 2, 3, 4, 5, 17, 50, 64, 499, 500, 501, 1000])
        kind = rng.random()
        if kind < 0.55:
            cases.append(_epsilon_greedy(rng, n))
        elif kind < 0.75:
            cases.append(_odd(rng, n))
        elif kind < 0.85:  # softmax-like: distinct values
            cases.append([_f32(rng.random()) for _ in range(n)])
        else:  # a few distinct values, zeros and negatives too
            values = [rng.choice([0.0, -0.0, 1e-3, 0.25, -0.5, 7.0]) for _ in range(3)]
            cases.append([rng.choice(values) for _ in range(n)])
    return cases


def _us(rng: random.Random, p: list[float]) -> list[float]:
    """Random draws, the ends of [0, 1), and each running sum the draw can compare with
    (at chosen places, all of them for short lists), on it and one ulp either side."""
    us = [rng.random() for _ in range(4)]
    us += [0.0, -0.0, math.nextafter(1.0, 0.0), 1.0, 2.0, -1e-300, math.nan, math.inf]
    sums = list(accumulate(p)) if p else []
    places = range(len(sums)) if len(sums) <= 8 else rng.sample(range(len(sums)), 8)
    for at in (*places, len(sums) - 1):
        if 0 <= at < len(sums) and math.isfinite(sums[at]):
            s = sums[at]
            us += [s, math.nextafter(s, -1.0), math.nextafter(s, 2.0)]
    return us


def _general(weights: Sequence[float], u: float) -> tuple[list[float], int, bool]:
    p = _previous_normalise(weights)
    chosen = sampling.draw_normalised(p, u)
    return p, chosen, sampling.is_greedy_normalised(p, chosen)


def test_normalise_and_draw_answers_as_the_general_path() -> None:
    rng = random.Random(2024)
    fast = 0
    for weights in _cases(rng):
        total = sum(weights)
        if total > 0.0 and sampling._levels(weights, len(weights)) is not None:
            fast += 1
        expected_p = _previous_normalise(weights)
        assert _bits(sampling.normalise(weights)) == _bits(expected_p), weights
        for u in _us(rng, expected_p):
            calls: list[float] = []

            def uniform(u: float = u, calls: list[float] = calls) -> float:
                calls.append(u)
                return u

            p, chosen, greedy = sampling.normalise_and_draw(weights, uniform)
            expected = _general(weights, u)
            assert _bits(p) == _bits(expected[0]), (weights, u)
            assert (chosen, greedy) == expected[1:], (weights, u)
            assert chosen == sampling._draw_by_scan(expected[0], u), (weights, u)
            assert len(calls) == 1
    assert fast > 800  # the fast path was the one compared, most of the time


def test_levels_of_epsilon_greedy_pmfs() -> None:
    low, high = _f32(0.1 / 500), _f32(0.9 + 0.1 / 500)
    weights = _fresh([low] * 500)
    assert sampling._levels(weights, 500) == (low, low, [])
    weights[0] = weights[499] = high
    assert sampling._levels(weights, 500) == (low, high, [0, 499])
    weights[0] = low
    assert sampling._levels(weights, 500) == (low, high, [499])
    weights[7] = math.nextafter(low, 1.0)  # a third value
    assert sampling._levels(weights, 500) is None
    weights[7] = -0.0
    assert sampling._levels(weights, 500) is None
    assert sampling._levels([0.5], 1) is None


@sequential_sum
def test_draw_levels_with_entries_below_an_ulp_of_the_sums() -> None:
    """Entries a fraction of an ulp of the running sum round away from the estimate (up to
    a third off, or never adding anything): the listed sums decide, as accumulate's did."""
    rng = random.Random(7)
    ulp = math.ulp(0.5)
    for low in (0.25 * ulp, 0.5 * ulp, 0.75 * ulp, 1.5 * ulp, 2.5 * ulp, 1e-300):
        for n, positions in ((300, [0]), (300, [0, 150]), (40, [0, 1, 39]), (300, [5])):
            p = [low] * n
            for at in positions:
                p[at] = 0.5
            sums = list(accumulate(p))
            us = [math.nextafter(s, d) for s in sums[:60] for d in (-1.0, 2.0)] + sums
            us += [rng.uniform(0.5, sums[-1]) for _ in range(50)]
            for u in us:
                expected = sampling.draw_normalised(p, u)
                assert sampling._draw_levels(low, 0.5, positions, n, u) == expected, (low, u)
                assert expected == sampling._draw_by_scan(p, u)


@sequential_sum
def test_first_above_finds_the_first_sum_over_u() -> None:
    rng = random.Random(8)
    for _ in range(3000):
        value = _f32(rng.choice([1 / 500, 1 / 3, 0.1 / 499, rng.random() / 100]))
        length = rng.randint(1, 600)
        before = rng.choice([0.0, 0.5, _f32(0.9), rng.random()])
        sums = list(accumulate([value] * length, initial=before))
        u = rng.choice([before, *sums, rng.uniform(before, sums[-1] + value)])
        u = rng.choice([u, math.nextafter(u, -1.0), math.nextafter(u, 2.0)])
        if u < before:
            continue
        index, reached = sampling._first_above(before, value, length, u)
        first = next((m for m in range(length) if sums[m + 1] > u), -1)
        assert index == first, (before, value, length, u)
        assert reached == (sums[first + 1] if first >= 0 else sums[-1])
