"""How often the learning-loop scenario of ``tests/e2e/test_learning_loop.py`` learns every
segment's best article: the same seeded users, run many times (which model serves which
request depends on the trainer's timing, so runs differ).

    .venv/bin/python benchmarks/learning_loop_runs.py [--runs 10] [--events 2000]
        [--vw-args "--cb_explore_adf --epsilon 0.1 -q ua --cb_type dr"]  (default: the test's)

Each run serves the app in process on a fresh SQLite file with the inline trainer, sends
the test's decisions and rewards, waits until every event is learned and the newest
model serves, then asks each segment's distribution. A run passes when every segment's
best article has probability > 0.8 (learned: 0.925; uniform: 0.25). Prints one line a
run (the distributions of a failed one) and the count of passes. Each line also gives the
rewards stored, how many of them are late (received after their window, so never
learned) and the slowest decision-to-reward time: a run that fails with no late reward
and rewards well inside the 1 s window lost no click; its model just learned slower.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import sqlite3
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bandit_service.app import create_app
from bandit_service.config import Settings
from bandit_service.store.database import upgrade
from tests.conftest import TEST_POLICIES
from tests.e2e import test_learning_loop as scenario
from tests.e2e.asgi import asgi_client


def one_run(vw_args: str | None) -> dict[str, dict[str, float]]:
    """Each segment's learned distribution over the articles (by topic)."""
    with tempfile.TemporaryDirectory(prefix="learning-loop-") as folder:
        policies = Path(folder) / "policies"
        policies.mkdir()
        for name, body in TEST_POLICIES.items():
            (policies / f"{name}.toml").write_text(body)
        policy = scenario.POLICY
        if vw_args is not None:
            policy = re.sub(r"(?m)^vw_args = .*$", f"vw_args = {vw_args}", policy)
        (policies / "learn.toml").write_text(policy)
        url = f"sqlite:///{folder}/loop.db"
        upgrade(url)
        settings = Settings(
            database_url=url, policies_dir=policies, trainer="inline",
            train_interval_seconds=0.2, model_reload_seconds=0.2,
            trainer_commit_grace_seconds=0.2,
        )  # fmt: skip
        app = create_app(settings)
        learned: dict[str, dict[str, float]] = {}

        async def run() -> None:
            async with asgi_client(app) as client:
                await scenario.simulate(client, random.Random(20261122))
                await scenario.wait_until_caught_up(client, timeout=60)
                for segment in scenario.TOPICS:
                    response = await client.post(
                        "/v1/decisions?include=pmf",
                        json={"policy": "learn", "context": {"user": {"segment": segment}},
                              "candidates": scenario.CANDIDATES},
                    )  # fmt: skip
                    pmf = response.json()["slots"][0]["pmf"]
                    learned[segment] = {
                        p["id"].removeprefix("article-"): round(p["probability"], 3) for p in pmf
                    }

        asyncio.run(run())
        with contextlib.closing(sqlite3.connect(f"{folder}/loop.db")) as db:
            rewards, late, slowest = db.execute(
                "SELECT count(*), sum(r.late), max(r.received_at - d.created_at) "
                "FROM rewards r JOIN decisions d ON d.event_id = r.event_id"
            ).fetchone()
        learned["rewards"] = {"stored": rewards, "late": late or 0, "slowest_s": slowest}
        return learned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--events", type=int, default=scenario.EVENTS)
    parser.add_argument("--vw-args", help="the policy's vw_args (default: the test's own)")
    args = parser.parse_args()
    scenario.EVENTS = args.events
    passed = 0
    for n in range(args.runs):
        learned = one_run(f'"{args.vw_args}"' if args.vw_args else None)
        counts = learned.pop("rewards")
        ok = all(learned[segment][segment] > 0.8 for segment in scenario.TOPICS)
        passed += ok
        print(f"run {n + 1}/{args.runs}: {'learned' if ok else 'NOT learned'}"
              f"{'' if ok else f' {learned}'}; rewards {counts}", flush=True)  # fmt: skip
    print(f"{passed} of {args.runs} runs learned every segment's best article "
          f"({args.events} events, vw_args {args.vw_args or 'of the test'!r})")  # fmt: skip


if __name__ == "__main__":
    main()
