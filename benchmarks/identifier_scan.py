"""Cost of refusing identifier-looking features (issue 10) next to parsing the request.

The scan runs on every decision whose policy does not set ``allow_identifier_features``.
The reference, measured in the same run, is pydantic parsing the same JSON body
(``DecisionIn.model_validate_json``), which every request pays anyway: compare the ratio.

    .venv/bin/python benchmarks/identifier_scan.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson

from bandit_service.api.schemas import DecisionIn
from bandit_service.domain import Candidate, DecisionRequest, slot_list
from bandit_service.identifiers import find_identifier


def best_microseconds(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - started) / repeat)
    return best * 1e6


def main() -> None:
    print(f"{'candidates':>10}{'parse us':>10}{'scan us':>10}{'scan/parse':>12}")
    for n in (50, 500):
        body = {
            "user_id": "user-42",
            "context": {f"c{j}": f"val{j}" for j in range(20)},
            "candidates": [
                {"id": f"cand-{i}", "features": {
                    **{f"f{j}": f"v{i}-{j}" for j in range(5)},
                    **{f"n{j}": i * 0.5 + j for j in range(5)},
                }}
                for i in range(n)
            ],
        }  # fmt: skip
        raw = orjson.dumps(body)
        parsed = DecisionIn.model_validate_json(raw)
        request = DecisionRequest(
            event_id="e", policy="default", slots=slot_list(1), context=parsed.context,
            candidates=tuple(Candidate(c.id, c.features) for c in parsed.candidates),
            user_id=parsed.user_id,
        )  # fmt: skip
        repeat = 2000 // n * 10
        parse = best_microseconds(lambda raw=raw: DecisionIn.model_validate_json(raw), repeat)
        scan = best_microseconds(lambda request=request: find_identifier(request), repeat)
        print(f"{n:>10}{parse:>10.0f}{scan:>10.0f}{scan / parse:>12.2f}")


if __name__ == "__main__":
    main()
