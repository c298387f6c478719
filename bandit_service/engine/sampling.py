"""Seeded sampling from a probability mass function.

The draw is seeded from the event id (as VW's own client libraries do), so replaying an
event reproduces its choice, and the engine, not VW, owns the randomness: the probability
it logs is exactly the one the draw used.
"""

from __future__ import annotations

import hashlib

# The C generator under ``random.Random``: ``random.Random(n)`` seeds it through two
# Python-level calls (``__init__`` and ``seed``, which for an int only passes it on), then
# ``random()`` is this very C method; built directly, its state and draws are the same
# (tests/unit/test_engine2_sampling.py compares them over many event ids).
from _random import Random as _MersenneTwister
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate


def event_rng(event_id: str) -> _MersenneTwister:
    """A generator determined by the event id alone: the Mersenne Twister seeded with the
    first 16 bytes of the id's SHA-256, what ``random.Random`` gives for that seed."""
    digest = hashlib.sha256(event_id.encode("utf-8")).digest()
    return _MersenneTwister(int.from_bytes(digest[:16], "big"))


def normalise(weights: Sequence[float]) -> list[float]:
    """Turn non-negative weights into probabilities summing to 1 (in float64).

    VW returns float32 probabilities whose sum may differ from 1 by rounding; normalising
    once, here, makes the logged numbers the exact ones used by :func:`draw`.
    """
    total = sum(weights)
    if total > 0.0 and min(weights) > 0.0:
        # Every weight positive (a NaN makes ``total`` NaN): nothing to clip, and the
        # same numbers as below. The usual case: exploration keeps every action's
        # probability above zero.
        return [w / total for w in weights]
    clipped = [w if w > 0.0 else 0.0 for w in weights]
    total = sum(clipped)
    if not total > 0.0:
        return [1.0 / len(clipped)] * len(clipped)
    return [w / total for w in clipped]


def draw(probabilities: Sequence[float], u: float) -> int:
    """Inverse-CDF draw with ``u`` in [0, 1): index ``i`` is chosen with probability ``p[i]``.

    The running sums are taken in C (``accumulate``) and searched by bisection. Over 500
    candidates that costs ~10 µs wherever the mass sits, as much as the scan below costs
    on average (measured with the mass at a random position), but the scan's cost grows
    with the position (~20 µs near the end). (An untrained model's epsilon-greedy pmf is
    uniform, all scores tied, so the scan's average is what the benchmarks see.) The first
    entry is tried before either, one comparison. The same index as the scan whenever
    every probability is non-negative, none is NaN and ``u >= 0``: the sums are then the
    scan's (adding a zero changes no float), non-decreasing, and the first sum above
    ``u`` never belongs to a zero (the sum before it would already be above ``u``).
    Otherwise, or when ``u`` falls in the rounding gap above the last sum, the scan
    decides (tests/unit/test_engine2_sampling.py compares both on many inputs).
    """
    if probabilities and u >= 0.0:
        if u < probabilities[0]:
            # The scan's first step (a zero, a negative or a NaN first entry is never
            # above u >= 0): no list of sums when the first entry takes the draw.
            return 0
        sums = list(accumulate(probabilities))
        # A NaN anywhere makes the last sum NaN (no negative weight can cancel an infinity).
        if sums[-1] == sums[-1] and min(probabilities) >= 0.0:
            index = bisect_right(sums, u)
            if index < len(sums):
                return index
    return _draw_by_scan(probabilities, u)


def draw_normalised(probabilities: Sequence[float], u: float) -> int:
    """:func:`draw` from what :func:`normalise` returned (or a uniform distribution): such
    a list has no negative entry (a positive weight over a positive total, a clipped one,
    or ``1 / n``; at worst NaN, for infinite weights), so the check for one, a pass over
    the list (~7 µs for 500 candidates), is left out. The same index as :func:`draw`."""
    if probabilities and u >= 0.0:
        if u < probabilities[0]:
            return 0  # see draw
        sums = list(accumulate(probabilities))
        if sums[-1] == sums[-1]:
            index = bisect_right(sums, u)
            if index < len(sums):
                return index
    return _draw_by_scan(probabilities, u)


def _draw_by_scan(probabilities: Sequence[float], u: float) -> int:
    """:func:`draw` as a scan: skips non-positive entries, returns the first index whose
    running sum exceeds ``u``, else the last positive index."""
    cumulative = 0.0
    last_positive = 0
    for index, p in enumerate(probabilities):
        if p <= 0.0:
            continue
        last_positive = index
        cumulative += p
        if u < cumulative:
            return index
    return last_positive  # u fell in the rounding gap at the top of the CDF


def greedy(probabilities: Sequence[float]) -> int:
    """The policy's own choice: the highest probability, ties broken by request order."""
    best = 0
    for index, p in enumerate(probabilities):
        if p > probabilities[best]:
            best = index
    return best


def is_greedy(probabilities: Sequence[float], index: int) -> bool:
    """Is ``index`` among the policy's top choices (tied for the highest probability)?"""
    return probabilities[index] >= max(probabilities)


# Above this, a probability of a normalised list is necessarily its largest (see below).
_SURE_GREEDY = 0.5 + 1e-6


def is_greedy_normalised(probabilities: Sequence[float], index: int) -> bool:
    """:func:`is_greedy` for what :func:`normalise` returned, without the pass over the
    list (``max``, ~5 µs for 500 candidates) when the entry is above one half, as the
    exploiting draws of epsilon-greedy are (~90% of them).

    Why that is the same answer: such a list has no negative entry and no NaN beside an
    entry above one half (a NaN needs an infinite total, which leaves every entry 0 or
    NaN), and its entries sum to 1 up to rounding: each is ``w / total`` rounded, and
    ``total`` is the rounded running sum of the ``w``, so the sum is at most
    ``1 + n * 2**-52`` (1 + 3e-12 for 10,000 entries). An entry above ``0.5 + 1e-6``
    therefore leaves less than 0.5 to all the others together: it is the largest.
    """
    if probabilities[index] > _SURE_GREEDY:
        return True
    return probabilities[index] >= max(probabilities)
