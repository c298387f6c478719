"""Seeded sampling from a probability mass function.

The draw is seeded from the event id (as VW's own client libraries do), so replaying an
event reproduces its choice, and the engine, not VW, owns the randomness: the probability
it logs is exactly the one the draw used.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence


def event_rng(event_id: str) -> random.Random:
    """A generator determined by the event id alone."""
    digest = hashlib.sha256(event_id.encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


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
    """Inverse-CDF draw with ``u`` in [0, 1): index ``i`` is chosen with probability ``p[i]``."""
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
