"""Synthetic requests and logged decisions of a given shape, shared by the benchmarks."""

from __future__ import annotations

import random
from typing import Any

from bandit_service.domain import Candidate


def context(rng: random.Random, features: int = 20) -> dict[str, Any]:
    flat = {f"c{j}": rng.choice(["a", "b", "c", "d"]) for j in range(features // 2)}
    user = {f"u{j}": round(rng.random(), 3) for j in range(features - features // 2)}
    return {**flat, "user": user}


def candidates(rng: random.Random, count: int = 50, features: int = 10) -> list[Candidate]:
    return [
        Candidate(
            f"item-{i}",
            {
                f"f{j}": (rng.choice(["x", "y", "z"]) if j % 2 else round(rng.random(), 3))
                for j in range(features)
            },
        )
        for i in range(count)
    ]
