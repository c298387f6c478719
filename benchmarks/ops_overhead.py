"""What metrics and JSON logs add to one decision, as a ratio to the decision itself.

    .venv/bin/python benchmarks/ops_overhead.py [--repeat 3000]

HTTP timings on a shared machine swing by 2x between runs, far more than the microseconds
this adds, so the added work is timed directly and in the same process as a reference: the
engine's own decision (50 candidates/1 slot and 500 candidates/5 slots with every rule,
as in engine_latency.py). Added per decision request: the request-context middleware (id,
latency histogram, request counter), the decision event (counters and one JSON log line,
to a null stream) and the writer's queue gauge, batch-size and commit histograms. Run in
single-process mode and, re-executed, in prometheus multiprocess mode (memory-mapped
files, as with several workers).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _median_us(func: Any, repeat: int) -> float:
    timings = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        timings.append((time.perf_counter() - start) * 1e6)
    return statistics.median(timings)


def measure(repeat: int) -> None:
    from _synthetic import candidates, context
    from engine_latency import RULES

    from bandit_service.domain import Candidate, DecisionRequest, slot_list
    from bandit_service.engine import DecisionEngine
    from bandit_service.learners.vw import VWLearner
    from bandit_service.ops import events, metrics
    from bandit_service.ops.http import RequestContext
    from bandit_service.ops.logs import JsonFormatter
    from bandit_service.policy import parse_policy

    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]

    async def bare(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def sink(_message: Any) -> None:
        return None

    async def nothing() -> Any:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "POST", "path": "/v1/decisions", "headers": []}
    wrapped = RequestContext(bare)
    loop = asyncio.new_event_loop()

    def middleware_added() -> float:
        with_mw = _median_us(lambda: loop.run_until_complete(wrapped(scope, nothing, sink)), repeat)
        without = _median_us(lambda: loop.run_until_complete(bare(scope, nothing, sink)), repeat)
        return with_mw - without

    def writer_added() -> None:
        metrics.WRITER_QUEUE.inc()
        metrics.WRITER_QUEUE.dec(1)
        metrics.WRITER_COMMIT_SECONDS.observe(0.002)
        metrics.WRITER_BATCH_ROWS.observe(1)

    mode = "multiprocess" if metrics.MULTIPROCESS else "single-process"
    print(f"\n{mode} metrics")
    print(f"{'shape':<34}{'decide µs':>11}{'added µs (info)':>17}{'ratio info':>12}"
          f"{'ratio warning':>15}")  # fmt: skip
    for count, slots, rules in [(50, 1, False), (500, 5, True)]:
        rng = random.Random(count)
        raw = {"vw_args": "--cb_explore_adf --epsilon 0.1 -q ua -q sa", "holdout_share": 0}
        policy = parse_policy("bench", {**raw, "rules": RULES} if rules else raw)
        learner = VWLearner(policy.vw_args)
        engine = DecisionEngine({"bench": policy}, lambda _name, learner=learner: learner)
        pool = candidates(rng, count)
        if rules:
            pool[0] = Candidate(pool[0].id, {**pool[0].features, "f1": "x"})
        request = DecisionRequest("e", "bench", tuple(pool), slot_list(slots), context(rng))
        decision = engine.decide(request)
        row = {
            "event_id": "e", "policy": "bench", "policy_version": "v", "arm": "bandit",
            "model_version": 3, "deferred": False,
            "slots": [{"id": c.id, "explored": c.explored} for c in decision.slots],
        }  # fmt: skip
        decide_reps = repeat if count <= 50 else max(100, repeat // 10)
        results: dict[str, list[float]] = {"decide": [], "info": [], "warning": []}
        for _ in range(5):  # interleaved rounds: machine noise hits both sides alike
            results["decide"].append(
                _median_us(lambda e=engine, r=request: e.decide(r), decide_reps)
            )
            common = middleware_added() + _median_us(writer_added, repeat)
            for level in ("info", "warning"):
                root.setLevel(level.upper())
                results[level].append(common + _median_us(lambda r=row: events.decision_stored(r),
                                                          repeat))  # fmt: skip
        d = statistics.median(results["decide"])
        info, warning = statistics.median(results["info"]), statistics.median(results["warning"])
        shape = f"{count} candidates, {slots} slot(s)" + (", rules" if rules else "")
        print(f"{shape:<34}{d:>11.1f}{info:>17.1f}{(d + info) / d:>12.3f}"
              f"{(d + warning) / d:>15.3f}")  # fmt: skip
    loop.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3000)
    parser.add_argument("--mode", choices=["both", "here"], default="both")
    args = parser.parse_args()
    measure(args.repeat)
    if args.mode == "both" and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        with tempfile.TemporaryDirectory() as folder:
            env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": folder}
            subprocess.run(
                [sys.executable, __file__, "--repeat", str(args.repeat), "--mode", "here"],
                env=env,
                check=True,
            )


if __name__ == "__main__":
    main()
