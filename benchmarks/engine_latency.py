"""Decision-engine latency without HTTP or storage: the cost of scoring and sampling.

    .venv/bin/python benchmarks/engine_latency.py [--repeat 2000] [--text-only]

Shapes: 50 candidates x 10 features with a 20-feature context, 1 and 3 slots; 500
candidates x 10 features, 5 slots, without and with every rule (filter, pin, diversity cap,
freshness, boost, 15% exploration slots). Each request carries fresh feature dicts (as parsed
from JSON), so the rendered-line cache is exercised the way the API exercises it.
``--text-only`` parses every action line for every prediction (``VWLearner(reuse_examples=
False)``), as before kept action examples. ``--compare`` runs both learners in this one
process, alternating blocks of requests, and prints the median CPU µs per decision of each
(steadier than wall-clock percentiles on a shared machine).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synthetic import candidates, context

from bandit_service.domain import Candidate, DecisionRequest, slot_list
from bandit_service.engine import DecisionEngine
from bandit_service.learners.vw import VWLearner
from bandit_service.policy import parse_policy

RULES = {
    "exclude_if": [{"feature": "f1", "equals": "z"}],
    "pins": [{"id": "item-0", "slot": 0}],
    "max_per_value": [{"feature": "f3", "max": 2}],
    "freshness": {"feature": "f0", "max_age": 0.2, "boost": 2.0},
    "boosts": [{"feature": "f5", "equals": "x", "factor": 1.5}],
    "exploration_share": 0.15,
}


def run(
    count: int, slots: int, repeat: int, rules: bool = False, text_only: bool = False
) -> tuple[float, float, float]:
    rng = random.Random(count * 100 + slots)
    raw = {"vw_args": "--cb_explore_adf --epsilon 0.1 -q ua -q sa", "holdout_share": 0}
    policy = parse_policy("bench", {**raw, "rules": RULES} if rules else raw)
    learner = VWLearner(policy.vw_args, reuse_examples=not text_only)
    engine = DecisionEngine({"bench": policy}, lambda _name: learner)
    pool = candidates(rng, count)
    if rules:  # the pinned candidate must not also be filtered out
        pool[0] = Candidate(pool[0].id, {**pool[0].features, "f1": "x"})
    timings = []
    for i in range(repeat):
        fresh = tuple(Candidate(c.id, dict(c.features)) for c in pool)  # as if parsed anew
        request = DecisionRequest(f"e{i}", "bench", fresh, slot_list(slots), context(rng))
        start = time.perf_counter()
        engine.decide(request)
        timings.append((time.perf_counter() - start) * 1000)
    timings.sort()
    return (
        statistics.median(timings),
        timings[int(0.99 * len(timings)) - 1],
        1000 / statistics.mean(timings),
    )


def compare(count: int, slots: int, blocks: int, per_block: int, rules: bool) -> dict[str, int]:
    """Median CPU µs per decision, kept action examples vs every line parsed, alternating
    blocks of ``per_block`` requests (the first two blocks of each, warm-up, dropped)."""
    rng = random.Random(count * 100 + slots)
    raw = {"vw_args": "--cb_explore_adf --epsilon 0.1 -q ua -q sa", "holdout_share": 0}
    policy = parse_policy("bench", {**raw, "rules": RULES} if rules else raw)
    pool = candidates(rng, count)
    if rules:
        pool[0] = Candidate(pool[0].id, {**pool[0].features, "f1": "x"})
    engines, cpu = {}, {}
    for key in ("text", "kept"):
        learner = VWLearner(policy.vw_args, reuse_examples=key == "kept")
        engines[key] = DecisionEngine({"bench": policy}, lambda _n, chosen=learner: chosen)
        cpu[key] = []
    for block in range(blocks):
        for key in ("text", "kept") if block % 2 else ("kept", "text"):
            requests = []
            for i in range(per_block):
                fresh = tuple(Candidate(c.id, dict(c.features)) for c in pool)
                requests.append(
                    DecisionRequest(f"e{block}-{i}", "bench", fresh, slot_list(slots), context(rng))
                )
            start = time.process_time()
            for request in requests:
                engines[key].decide(request)
            cpu[key].append((time.process_time() - start) / per_block * 1e6)
    return {key: round(statistics.median(values[2:])) for key, values in cpu.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--text-only", action="store_true")
    parser.add_argument("--compare", action="store_true")
    args = parser.parse_args()
    if args.compare:
        print(f"{'shape':<40}{'text µs CPU':>12}{'kept µs CPU':>12}")
        for count, slots, rules, blocks, per in [
            (50, 1, False, 40, 50), (50, 3, False, 40, 20),
            (500, 5, False, 14, 5), (500, 5, True, 14, 5),
        ]:  # fmt: skip
            medians = compare(count, slots, blocks, per, rules)
            shape = f"{count} candidates, {slots} slot(s)" + (", all rules" if rules else "")
            print(f"{shape:<40}{medians['text']:>12,}{medians['kept']:>12,}", flush=True)
        return
    print(f"{'shape':<40}{'p50 ms':>10}{'p99 ms':>10}{'decisions/s':>14}")
    for count, slots, rules in [(50, 1, False), (50, 3, False), (500, 5, False), (500, 5, True)]:
        repeat = args.repeat if count <= 50 else max(200, args.repeat // 10)
        p50, p99, rate = run(count, slots, repeat, rules, args.text_only)
        shape = f"{count} candidates, {slots} slot(s)" + (", all rules" if rules else "")
        print(f"{shape:<40}{p50:>10.3f}{p99:>10.3f}{rate:>14.0f}")


if __name__ == "__main__":
    main()
