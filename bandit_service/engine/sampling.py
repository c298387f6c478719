"""Seeded sampling from a probability mass function.

The draw is seeded from the event id (as VW's own client libraries do), so replaying an
event reproduces its choice, and the engine, not VW, owns the randomness: the probability
it logs is exactly the one the draw used.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate, repeat

# The event's uniforms: block ``j`` is BLAKE2b-512 of the id's UTF-8 bytes, personalised
# with ``_PERSON`` and salted with ``j`` (16 bytes, little-endian); each of its eight
# big-endian 64-bit words gives one uniform, its top 53 bits times 2**-53 (the resolution
# of ``random.random()``). A hash in counter mode, as counter-based generators are built.
_PERSON = b"bandit-draws"
_WORDS = struct.Struct(">8Q").unpack
_SCALE = 2.0**-53


def event_uniforms(event_id: str) -> Callable[[], float]:
    """Uniforms in [0, 1) determined by the event id alone: replaying an event draws the
    same numbers, so it makes the same choices; each call gives the next one.

    Why not a seeded ``random.Random``, as before: the engine draws one or two uniforms a
    slot, and seeding a Mersenne Twister (624 words of state, filled again at the first
    draw) cost ~6.5 µs a decision of the ~7 that the generator took (timeit: ~1.3 µs
    this way, for the first two uniforms). The numbers are as uniform and independent as
    BLAKE2b's output words (tests/unit/test_engine2_sampling.py checks uniformity,
    independence across draws and ids, and pins the construction); an event id now draws
    other numbers than it did under the Mersenne Twister (its distribution, hence every
    logged probability, is the same).
    """
    return _uniforms(event_id.encode("utf-8")).__next__


def _uniforms(data: bytes) -> Iterator[float]:
    """:func:`event_uniforms`' stream for the id's bytes ``data``, computed as it is read."""
    block = 0
    while True:
        digest = hashlib.blake2b(data, person=_PERSON, salt=block.to_bytes(16, "little"))
        for word in _WORDS(digest.digest()):
            yield (word >> 11) * _SCALE
        block += 1


def normalise(weights: Sequence[float]) -> list[float]:
    """Turn non-negative weights into probabilities summing to 1 (in float64).

    VW returns float32 probabilities whose sum may differ from 1 by rounding; normalising
    once, here, makes the logged numbers the exact ones used by :func:`draw`.
    """
    total = sum(weights)
    n = len(weights)
    levels = _levels(weights, n) if total > 0.0 else None
    if levels is None:
        return _normalise(weights, total)
    return _levelled(levels, total, n)[0]


def _normalise(weights: Sequence[float], total: float) -> list[float]:
    """:func:`normalise`, given ``sum(weights)``."""
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


# Builtin ``sum`` of floats adds left to right in plain doubles up to Python 3.11 (3.12
# compensates the rounding), so ``sum(repeat(x, m), start)`` is then the running sum that
# ``accumulate`` reaches: :func:`_draw_levels` relies on it, and is not used otherwise.
_SUM_IS_SEQUENTIAL = sys.version_info < (3, 12)

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


def normalise_and_draw(
    weights: Sequence[float], uniform: Callable[[], float]
) -> tuple[list[float], int, bool]:
    """``p = normalise(weights)``, ``chosen = draw_normalised(p, uniform())`` and
    ``is_greedy_normalised(p, chosen)``: the same three answers, cheaper when every weight
    is one of two positive values (:func:`_levels`), as VW's epsilon-greedy pmf is: every
    candidate ``epsilon / n``, the model's top choice (or each of a few tied ones) more;
    all equal, ``1 / n``, when an untrained model ties every score.

    Then each distinct weight is divided by the total once (the same float as dividing
    each entry: equal positive floats are the same double), the list is that quotient
    repeated, and the draw needs no list of running sums: it adds the entries with
    builtin ``sum`` from a start (:func:`_draw_levels`), the same additions in the same
    order as ``accumulate``. Measured per slot over 500 candidates (timeit, medians, this
    machine, against the three calls of 6ae22ff): the uniform pmf ~7 µs instead of ~37,
    one greedy entry ~9 µs instead of ~32 (``benchmarks/sampling_micro.py``). Per 500 x 5
    decision the engine's Python spends ~115 µs less (``benchmarks/engine2_ab.py --fake``:
    217 -> 99 µs; with VW, the part outside VW's predict 413 -> 233 µs), and the service
    0.81 to 0.95 x the CPU per decision (``benchmarks/decide_cpu.py --workload d500x5``,
    five runs of 4 or 8 rounds on this shared machine, e.g. 2,828 -> 2,509 µs; d50x1
    unchanged, 0.93 to 1.01). Anything else (softmax, zeros, NaN, one candidate) goes
    the general way after three comparisons (softmax-like, -1.5 to +1.9 µs of ~38 in four
    timeit runs: noise). ``uniform`` is called once, after normalising, as before.
    """
    n = len(weights)
    total = sum(weights)
    levels = _levels(weights, n) if total > 0.0 else None
    if levels is None:
        p = _normalise(weights, total)
        chosen = draw_normalised(p, uniform())
        return p, chosen, is_greedy_normalised(p, chosen)
    p, low, high = _levelled(levels, total, n)
    positions = levels[2]
    u = uniform()
    if not (low > 0.0 and high <= 1.0):
        # An infinite weight or total (quotients 0.0 and NaN): the general draw and test.
        chosen = draw_normalised(p, u)
        return p, chosen, is_greedy_normalised(p, chosen)
    # Finite positive entries, as the draw below needs.
    drawn = _draw_levels(low, high, positions, n, u) if _SUM_IS_SEQUENTIAL else None
    chosen = draw_normalised(p, u) if drawn is None else drawn
    # is_greedy: p[chosen] >= max(p), and max(p) is ``high`` (``high_weight`` is the
    # larger weight and division by a positive total keeps the order, or ties it).
    return p, chosen, p[chosen] >= high


def _levelled(
    levels: tuple[float, float, list[int]], total: float, n: int
) -> tuple[list[float], float, float]:
    """:func:`normalise`'s list for weights with these :func:`_levels` and sum ``total``
    (above zero): every weight is positive, so normalise divides each one by the total;
    each distinct weight is divided once. Also the two quotients (both ``low``'s when
    there is no ``high``)."""
    low_weight, high_weight, positions = levels
    low = low_weight / total
    p = [low] * n
    if not positions:
        return p, low, low
    high = high_weight / total
    for at in positions:
        p[at] = high
    return p, low, high


def _levels(weights: Sequence[float], n: int) -> tuple[float, float, list[int]] | None:
    """``(low, high, positions)`` when each weight equals either ``low > 0`` or ``high >
    low`` (``high`` at ``positions``, increasing; none when all are ``low``), else None.
    For weights whose sum is above zero (so none is NaN, which would make the sum NaN).

    Equal positive floats are the same double (only ``0.0 == -0.0`` and NaN break that,
    and neither passes ``> 0.0``), so dividing ``low`` or ``high`` gives each entry's
    quotient. A sorted copy finds both values and their counts: ~2 µs for 500 entries
    (timsort sees one or two runs and compares floats directly), where ``list.count``
    and ``max`` took ~4 and ~5.5 µs each; without NaN its order is a total order. A pmf
    with many distinct values (softmax) is turned away by three comparisons first: in a
    two-valued list with at most two ``high`` entries, two of any three entries are equal.
    """
    if n < 2 or type(weights) not in (list, tuple):  # .index below; VW gives lists
        return None
    a, b, c = weights[0], weights[n >> 1], weights[-1]
    if not (a in (b, c) or b == c):  # (a pre-filter only)
        return None
    ordered = sorted(weights)
    low, high = ordered[0], ordered[-1]
    if not low > 0.0:
        return None
    if not high > low:  # the least is the largest: all equal
        return low, low, []
    lows = bisect_right(ordered, low)
    highs = bisect_left(ordered, high, lows)
    if lows != highs:  # a third value in between
        return None
    positions = []
    at = -1
    for _ in range(n - highs):
        at = weights.index(high, at + 1)
        positions.append(at)
    return low, high, positions


def _draw_levels(low: float, high: float, positions: list[int], n: int, u: float) -> int | None:
    """:func:`draw_normalised` of ``[low] * n`` with ``high`` at ``positions`` (increasing),
    both positive and finite: the first index whose running sum exceeds ``u``, else the
    last index (the scan's answer for a ``u`` in the rounding gap at the top; all entries
    are positive). None for a ``u`` below zero or NaN: the caller draws the general way.

    The running sums are the ones ``accumulate`` makes: ``sum(repeat(low, m), before)``
    adds ``low`` to ``before`` ``m`` times, left to right in doubles (Python 3.11's builtin
    ``sum``; the first entry is ``0.0 + p[0]``, which is ``p[0]``), and a ``high`` entry is
    one addition. Within a run of ``low`` the index is estimated from ``u`` and the
    estimate checked against those sums (off by at most one or two for rounding), so no
    list of 500 sums is built (~10 µs a slot).
    """
    if not u >= 0.0:
        return None
    before = 0.0  # the running sum up to the run's start (exclusive)
    start = 0
    for at in (*positions, n):
        if at > start:
            index, before = _first_above(before, low, at - start, u)
            if index >= 0:
                return start + index
        if at == n:
            break
        before += high
        if u < before:
            return at
        start = at + 1
    return n - 1


def _first_above(before: float, value: float, length: int, u: float) -> tuple[int, float]:
    """In a run of ``length`` entries ``value`` after running sum ``before <= u``: the first
    entry whose running sum exceeds ``u`` and that sum, or ``-1`` and the run's last sum.

    ``T(m) = sum(repeat(value, m), before)`` is the running sum after ``m`` of the entries
    (non-decreasing: each addition rounds monotonically); the entry sought is ``m`` with
    ``T(m) <= u < T(m + 1)``. ``(u - before) / value`` estimates ``m``; rounding moves the
    sums by at most a few ulps of ``u`` each addition, so for entries of a normalised pmf
    the estimate is right or one off. Entries tiny beside the sums (a fraction of an ulp)
    can put it further off: after three steps the run's sums are listed and searched.
    """
    guess = (u - before) / value
    if guess >= length:  # (or infinite)
        end = sum(repeat(value, length), before)
        if end <= u:
            return -1, end
        m = length - 1
    else:
        m = int(guess)
    below = sum(repeat(value, m), before)  # T(m)
    for _ in range(3):
        if below > u:  # m is past the entry (never at m == 0: T(0) = before <= u)
            m -= 1
            below = sum(repeat(value, m), before)
            continue
        above = below + value  # T(m + 1), the very addition accumulate makes
        if u < above:
            return m, above
        m += 1
        if m == length:
            return -1, above
        below = above
    sums = list(accumulate(repeat(value, length), initial=before))  # T(0) ... T(length)
    found = bisect_right(sums, u)  # >= 1, as T(0) <= u
    if found <= length:
        return found - 1, sums[found]
    return -1, sums[-1]
