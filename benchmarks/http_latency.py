"""End-to-end decision latency over HTTP, one request at a time, on loopback.

    .venv/bin/python benchmarks/http_latency.py [--requests 300] [--candidates 500 --slots 5]

Starts ``bandit-service serve`` (SQLite in a temporary folder, a rules policy with a
filter, a pin, a diversity cap, freshness, a boost and 15% exploration slots) on a free
loopback port, sends decisions with ``--candidates`` candidates x 10 features and a
20-feature context, and prints p50/p99 latency. Every response is durable (committed)
before it is sent, so each includes a commit.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synthetic import candidates, context

POLICY = """
holdout_share = 0
vw_args = "--cb_explore_adf --epsilon 0.1 -q ua -q sa"

[rules]
exclude_if = [{feature = "f1", equals = "z"}]
pins = [{id = "item-0", slot = 0}]
max_per_value = [{feature = "f3", max = 2}]
freshness = {feature = "f0", max_age = 0.2, boost = 2.0}
boosts = [{feature = "f5", equals = "x", factor = 1.5}]
exploration_share = 0.15
"""


JSON = {"content-type": "application/json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--slots", type=int, default=5)
    parser.add_argument(
        "--log-level", default="warning", help="server log level (info: one line per decision)"
    )
    args = parser.parse_args()
    rng = random.Random(3)
    pool = candidates(rng, args.candidates)
    body_candidates = [{"id": c.id, "features": dict(c.features)} for c in pool]
    body_candidates[0]["features"]["f1"] = "x"  # the pinned candidate is not filtered out

    with tempfile.TemporaryDirectory() as folder:
        policies = Path(folder) / "policies"
        policies.mkdir()
        (policies / "default.toml").write_text(POLICY)
        env = {
            **os.environ,
            "BANDIT_DATABASE_URL": f"sqlite:///{folder}/bench.db",
            "BANDIT_POLICIES_DIR": str(policies),
            "BANDIT_TRAINER": "off",
        }
        port = free_port()
        cli = Path(sys.executable).parent / "bandit-service"
        server = subprocess.Popen(
            [str(cli), "serve", "--migrate", "--port", str(port), "--log-level", args.log_level],
            env=env,
            stderr=subprocess.DEVNULL if args.log_level != "warning" else None,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=url, timeout=10) as client:
                for _ in range(100):
                    try:
                        if client.get("/readyz").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(0.1)
                timings = []
                for i in range(args.requests):
                    body = orjson.dumps(
                        {
                            "candidates": body_candidates,
                            "context": context(rng),
                            "slots": args.slots,
                        }
                    )  # encoded before the clock starts: the figure is the server's
                    start = time.perf_counter()
                    response = client.post("/v1/decisions", content=body, headers=JSON)
                    timings.append((time.perf_counter() - start) * 1000)
                    if response.status_code != 200:
                        raise SystemExit(f"request {i} failed: {response.text}")
                    if i % 50 == 0:
                        print(f"  {i}/{args.requests}", file=sys.stderr, flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    timings.sort()
    print(
        f"{args.candidates} candidates x 10 features, {args.slots} slots, all rules, SQLite: "
        f"p50 {statistics.median(timings):.1f} ms, "
        f"p99 {timings[int(0.99 * len(timings)) - 1]:.1f} ms over {args.requests} requests"
    )


if __name__ == "__main__":
    main()
