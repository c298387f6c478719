"""Decision-engine latency without HTTP or storage: the cost of scoring and sampling.

    .venv/bin/python benchmarks/engine_latency.py [--repeat 2000] [--text-only]
        [--action-lines] [--compare | --compare-src DIR]

Shapes: 50 candidates x 10 features with a 20-feature context, 1 and 3 slots; 500
candidates x 10 features, 5 slots, without and with every rule (filter, pin, diversity cap,
freshness, boost, 15% exploration slots). Each request carries fresh feature dicts (as parsed
from JSON), so the rendered-line cache is exercised the way the API exercises it.
``--text-only`` parses every action line for every prediction (``VWLearner(reuse_examples=
False)``), as before kept action examples. ``--compare`` runs both learners in this one
process, alternating blocks of requests, and prints the median CPU µs per decision of each
(steadier than wall-clock percentiles on a shared machine).
``--action-lines`` gives each request's candidates their action lines (``action_lines``,
computed once for the fixed catalogue, as the API does for a repeated candidate set); an
engine that does not know the attribute ignores it. ``--compare-src DIR`` runs the
``bandit_service`` package found in DIR (e.g. ``git archive`` of an older commit) and this
one in two child processes, alternating blocks of requests, and prints the median CPU µs
per decision of each and their ratio: before/after of an engine change in one run.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synthetic import candidates, context

from bandit_service.domain import Candidate, DecisionRequest, slot_list
from bandit_service.engine import DecisionEngine
from bandit_service.learners import vw_text
from bandit_service.learners.vw import VWLearner
from bandit_service.policy import parse_policy

SHAPES = [(50, 1, False), (50, 3, False), (500, 5, False), (500, 5, True)]

RULES = {
    "exclude_if": [{"feature": "f1", "equals": "z"}],
    "pins": [{"id": "item-0", "slot": 0}],
    "max_per_value": [{"feature": "f3", "max": 2}],
    "freshness": {"feature": "f0", "max_age": 0.2, "boost": 2.0},
    "boosts": [{"feature": "f5", "equals": "x", "factor": 1.5}],
    "exploration_share": 0.15,
}


class _LinedCandidates(tuple[Candidate, ...]):
    """Candidates carrying their action lines, as the API hands over a repeated set."""

    action_lines: tuple[str, ...]


def _fresh(pool: list[Candidate], lines: tuple[str, ...] | None) -> tuple[Candidate, ...]:
    """The pool as if parsed anew from JSON (fresh feature dicts), with ``lines``
    attached when given."""
    fresh = tuple(Candidate(c.id, dict(c.features)) for c in pool)
    if lines is None:
        return fresh
    lined = _LinedCandidates(fresh)
    lined.action_lines = lines
    return lined


def _pool(rng: random.Random, count: int, rules: bool) -> list[Candidate]:
    pool = candidates(rng, count)
    if rules:  # the pinned candidate must not also be filtered out
        pool[0] = Candidate(pool[0].id, {**pool[0].features, "f1": "x"})
    return pool


def _lines(pool: list[Candidate], action_lines: bool) -> tuple[str, ...] | None:
    return tuple(vw_text.action_line(c.id, c.features) for c in pool) if action_lines else None


def run(
    count: int,
    slots: int,
    repeat: int,
    rules: bool = False,
    text_only: bool = False,
    action_lines: bool = False,
) -> tuple[float, float, float]:
    rng = random.Random(count * 100 + slots)
    raw = {"vw_args": "--cb_explore_adf --epsilon 0.1 -q ua -q sa", "holdout_share": 0}
    policy = parse_policy("bench", {**raw, "rules": RULES} if rules else raw)
    learner = VWLearner(policy.vw_args, reuse_examples=not text_only)
    engine = DecisionEngine({"bench": policy}, lambda _name: learner)
    pool = _pool(rng, count, rules)
    lines = _lines(pool, action_lines)
    timings = []
    for i in range(repeat):
        fresh = _fresh(pool, lines)
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
    engines: dict[str, DecisionEngine] = {}
    cpu: dict[str, list[float]] = {}
    for key in ("text", "kept"):
        learner = VWLearner(policy.vw_args, reuse_examples=key == "kept")

        def learner_for(_name: str, chosen: VWLearner = learner) -> VWLearner:
            return chosen

        engines[key] = DecisionEngine({"bench": policy}, learner_for)
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


def child(count: int, slots: int, rules: bool, action_lines: bool) -> None:
    """Serve ``--compare-src``: for each block size read on stdin, decide that many
    requests and print the CPU µs per decision."""
    rng = random.Random(count * 100 + slots)
    raw = {"vw_args": "--cb_explore_adf --epsilon 0.1 -q ua -q sa", "holdout_share": 0}
    policy = parse_policy("bench", {**raw, "rules": RULES} if rules else raw)
    learner = VWLearner(policy.vw_args)
    engine = DecisionEngine({"bench": policy}, lambda _name: learner)
    pool = _pool(rng, count, rules)
    lines = _lines(pool, action_lines)
    contexts = [context(rng) for _ in range(64)]
    done = 0
    for block in sys.stdin:
        requests = []
        for _ in range(int(block)):
            requests.append(
                DecisionRequest(
                    f"e{done}", "bench", _fresh(pool, lines), slot_list(slots), contexts[done % 64]
                )
            )
            done += 1
        start = time.process_time()
        for request in requests:
            engine.decide(request)
        print((time.process_time() - start) / len(requests) * 1e6, flush=True)


def compare_src(source: Path, blocks: int, action_lines: bool) -> None:
    """The package in ``source`` ("base") against this one ("current"), one child process
    each per shape, alternating blocks (the first two of each dropped as warm-up)."""
    print(f"{'shape':<40}{'base µs CPU':>12}{'current µs':>12}{'ratio':>8}")
    for count, slots, rules in SHAPES:
        per = 40 if count <= 50 else 8
        children = {}
        for name in ("base", "current"):
            env = dict(os.environ)
            if name == "base":
                env["PYTHONPATH"] = str(source.resolve())
            flags = [str(count), str(slots), str(int(rules)), str(int(action_lines))]
            children[name] = subprocess.Popen(
                [sys.executable, __file__, "--child", *flags],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
        cpu: dict[str, list[float]] = {name: [] for name in children}
        for block in range(blocks):
            for name in ("base", "current") if block % 2 else ("current", "base"):
                process = children[name]
                assert process.stdin is not None and process.stdout is not None
                process.stdin.write(f"{per}\n")
                process.stdin.flush()
                cpu[name].append(float(process.stdout.readline()))
        for process in children.values():
            assert process.stdin is not None
            process.stdin.close()
            process.wait()
        base, current = (statistics.median(cpu[name][2:]) for name in ("base", "current"))
        shape = f"{count} candidates, {slots} slot(s)" + (", all rules" if rules else "")
        print(f"{shape:<40}{base:>12,.0f}{current:>12,.0f}{current / base:>8.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--text-only", action="store_true")
    parser.add_argument("--action-lines", action="store_true")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--compare-src", type=Path, help="the older package, run alternately")
    parser.add_argument("--blocks", type=int, default=30, help="--compare-src blocks a side")
    parser.add_argument("--child", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        count, slots, rules, action_lines = args.child
        child(count, slots, bool(rules), bool(action_lines))
        return
    if args.compare_src:
        compare_src(args.compare_src, args.blocks, args.action_lines)
        return
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
    for count, slots, rules in SHAPES:
        repeat = args.repeat if count <= 50 else max(200, args.repeat // 10)
        p50, p99, rate = run(count, slots, repeat, rules, args.text_only, args.action_lines)
        shape = f"{count} candidates, {slots} slot(s)" + (", all rules" if rules else "")
        print(f"{shape:<40}{p50:>10.3f}{p99:>10.3f}{rate:>14.0f}")


if __name__ == "__main__":
    main()
