"""The engine alone, old against new: CPU per decision, and how much of it is VW's.

    .venv/bin/python benchmarks/engine2_ab.py --compare-src DIR [--shape 500x5]
        [--blocks 40] [--per-block 10] [--fake]

Like ``engine_latency.py --compare-src``, two child processes (the package in DIR,
"base", and this one, "current") decide alternating blocks of requests, so both see the
same machine load. Differences: the candidates arrive as the API hands over a repeated
set (``candidate_sets.KeptCandidates``, with its ids and action lines), contexts vary
(256 of them), and each child also times ``VWLearner._predict_reusing`` (or
``_predict_batch``: VW's predict, its example list and finish, the part no engine
change can remove) so the rest, the engine's own Python, is printed apart. ``--fake``
replaces the learner by one returning an epsilon-greedy pmf at once: the engine's Python
alone, with far less noise.
Figures: min, first quartile and median of the blocks (the first three dropped).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import random, sys, time
sys.path.insert(1, {bench!r})
import bandit_service
print(bandit_service.__file__, file=sys.stderr)
from _synthetic import candidates, context
from bandit_service.candidate_sets import KeptCandidates
from bandit_service.domain import DecisionRequest, slot_list
from bandit_service.engine import DecisionEngine
import bandit_service.learners.vw as vw
from bandit_service.policy import parse_policy

count, slots, fake = {count}, {slots}, {fake}
policy = parse_policy(
    "bench", {{"vw_args": "--cb_explore_adf --epsilon 0.1 -q ua -q sa", "holdout_share": 0}}
)
spent = [0.0]


def timing(original):
    def timed(self, shared, actions):
        start = time.process_time()
        try:
            return original(self, shared, actions)
        finally:
            spent[0] += time.process_time() - start

    return timed


for method in ("_predict_reusing", "_predict_batch"):  # the latter: newer trees
    if hasattr(vw.VWLearner, method):
        setattr(vw.VWLearner, method, timing(getattr(vw.VWLearner, method)))
learner = vw.VWLearner(policy.vw_args)


class FakeScorer:
    context_line = ""

    def pmf(self, k, features, eligible):
        n = len(eligible)
        p = [0.1 / n] * n
        p[(k * 7919) % n] += 0.9
        return p


class FakeLearner:
    model_version = 0

    def scorer(self, context, candidates):
        return FakeScorer()


chosen = FakeLearner() if fake else learner
engine = DecisionEngine({{"bench": policy}}, lambda _name: chosen)
rng = random.Random(1)
kept = KeptCandidates(candidates(rng, count))
contexts = [context(rng) for _ in range(256)]
done = 0
for block in sys.stdin:
    requests = []
    for _ in range(int(block)):
        requests.append(
            DecisionRequest(f"e{{done}}", "bench", kept, slot_list(slots), contexts[done % 256])
        )
        done += 1
    spent[0] = 0.0
    start = time.process_time()
    for request in requests:
        engine.decide(request)
    total = (time.process_time() - start) / len(requests) * 1e6
    print(total, spent[0] / len(requests) * 1e6, flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare-src", type=Path, required=True)
    parser.add_argument("--shape", default="500x5", help="candidates x slots")
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--per-block", type=int, default=0, help="default: ~20 ms a block")
    parser.add_argument("--fake", action="store_true", help="no VW: the engine's Python")
    args = parser.parse_args()
    count, slots = (int(x) for x in args.shape.split("x"))
    per = args.per_block or max(5, 20_000 // (count * slots * (1 if args.fake else 4)))
    code = CHILD.format(
        bench=str(Path(__file__).resolve().parent), count=count, slots=slots, fake=args.fake
    )
    children = {}
    sources = {"base": args.compare_src.resolve(), "current": Path(__file__).resolve().parents[1]}
    for name, source in sources.items():
        # ``python -c`` puts the working directory first on sys.path: run each child in
        # its own source tree, which is also its PYTHONPATH, so neither imports the other.
        env = dict(os.environ, PYTHONPATH=str(source))
        children[name] = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=env, cwd=source,
        )  # fmt: skip
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in children}
    for block in range(args.blocks):
        for name in ("base", "current") if block % 2 else ("current", "base"):
            process = children[name]
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(f"{per}\n")
            process.stdin.flush()
            total, vw_part = map(float, process.stdout.readline().split())
            figures[name].append((total, vw_part))
    for process in children.values():
        assert process.stdin is not None
        process.stdin.close()
        process.wait()
    kind = "fake learner (engine Python only)" if args.fake else "VW"
    print(f"{args.shape}, {kind}, {args.blocks} blocks of {per}, µs CPU per decision:")
    print(f"  {'':8s}{'min':>8}{'p25':>8}{'median':>8}{'VW part':>9}{'rest':>8}")
    for name, rows in figures.items():
        rows = rows[3:]
        totals = [t for t, _ in rows]
        vw_part = statistics.median(v for _, v in rows)
        median = statistics.median(totals)
        p25 = statistics.quantiles(totals, n=4)[0]
        print(f"  {name:8s}{min(totals):8.0f}{p25:8.0f}{median:8.0f}{vw_part:9.0f}"
              f"{median - vw_part:8.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
