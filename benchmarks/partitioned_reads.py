"""What partitioning the log costs the hot reads on PostgreSQL (issue 10).

Partitions by policy and day make retention a ``DROP``, but a look-up by event id (an
idempotent decide retry, every reward) cannot be pruned to one partition: it probes each.
This builds the same log twice, in one schema at ``0007_shared_lines`` (plain tables) and
one at head with the partitions a month of serving would leave (``--policies`` policies x
(``--days`` daily ranges + 2 ahead + defaults)), then times, in alternating rounds:

* ``find``: ``find_decisions`` of one event id (the decide path's look-up),
* ``missing``: the same for an id not stored (a new decision's look-up; on PostgreSQL
  also for ids the service generated),
* ``reward``: ``decision_for_reward`` (the reward path's look-up),
* ``train``: ``training_batch`` of 2,000 decisions with their rewards (the trainer's read).

Per call, median of ``--rounds`` rounds; wall clock (the server's work is in it).

    .venv/bin/python benchmarks/partitioned_reads.py \\
        --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from retention import postgres_schema_url
from sqlalchemy import Engine, insert, text
from sqlalchemy.orm import Session

from bandit_service.store import partitions, repository
from bandit_service.store.database import make_engine, upgrade
from bandit_service.store.models import RewardRow

DAY = 86400.0


def log_rows(policies: int, days: int, per_day: int, now: float) -> tuple[list[Any], list[Any]]:
    candidates = [{"id": f"c{i}", "features": {"f": i}} for i in range(10)]
    decisions, rewards = [], []
    for p in range(policies):
        for day in range(days):
            for i in range(per_day):
                event_id = uuid.uuid4().hex
                created = now - (days - day - 1) * DAY - (i + 1) * (DAY / 2) / per_day
                decisions.append({
                    "event_id": event_id, "policy": f"policy{p}", "policy_version": "v",
                    "model_version": 0, "arm": "bandit", "user_key": None,
                    "context": {"n": i}, "candidates": candidates,
                    "slots": [{"slot": 0, "id": "c0", "probability": 0.1, "pmf": [["c0", 0.1]]}],
                    "excluded": [], "created_at": created, "deferred": False,
                    "activated_at": None,
                })  # fmt: skip
                if i % 3 == 0:
                    rewards.append({
                        "event_id": event_id, "slot": 0, "value": 1.0, "received_at": created,
                        "late": False, "kind": "primary", "reward_id": str(uuid.uuid4()),
                    })  # fmt: skip
    return decisions, rewards


def fill(engine: Engine, decisions: list[Any], rewards: list[Any], partitioned: bool) -> None:
    for start in range(0, len(decisions), 2000):
        with Session(engine) as session, session.begin():
            repository.insert_decisions(session, decisions[start : start + 2000])
    for start in range(0, len(rewards), 2000):
        with Session(engine) as session, session.begin():
            chunk = rewards[start : start + 2000]
            if partitioned:
                repository.insert_rewards(session, chunk)
            else:  # the 0007 table has no policy / decision_created_at columns
                session.execute(insert(RewardRow.__table__), chunk)
    with engine.connect() as connection:
        connection.execute(text("ANALYZE decisions"))
        connection.execute(text("ANALYZE rewards"))


def timed(engine: Engine, what: str, ids: list[str], policy: str) -> float:
    """Seconds per call."""
    calls = 0
    started = time.perf_counter()
    with Session(engine) as session:
        if what in ("find", "missing"):  # missing: a generated id, not stored yet
            for event_id in ids:
                repository.find_decisions(session, [event_id if what == "find" else event_id[::-1]])
                calls += 1
        elif what == "reward":
            for event_id in ids:
                repository.decision_for_reward(session, event_id)
                calls += 1
        else:
            position = 0
            while batch := repository.training_batch(session, policy, position, 2000):
                position = batch[-1]["position"]
                calls += 1
    return (time.perf_counter() - started) / max(calls, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", required=True)
    parser.add_argument("--policies", type=int, default=3)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--per-day", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    now = time.time()
    decisions, rewards = log_rows(args.policies, args.days, args.per_day, now)
    stores: dict[str, tuple[Engine, Any]] = {}
    try:
        for layout in ("plain", "partitioned"):
            url, drop = postgres_schema_url(args.postgres)
            upgrade(url, "0007_shared_lines" if layout == "plain" else "head")
            engine = make_engine(url)
            stores[layout] = (engine, drop)
            if layout == "partitioned":
                names = [(f"policy{p}", 30.0) for p in range(args.policies)]
                for back in range(args.days, -1, -1):
                    partitions.ensure(engine, names, now - back * DAY)
            fill(engine, decisions, rewards, layout == "partitioned")
        with stores["partitioned"][0].connect() as connection:
            count = connection.scalar(
                text(
                    "SELECT count(*) FROM pg_class WHERE relkind IN ('r', 'p') "
                    "AND relname LIKE 'decisions%' "
                    "AND relnamespace = CAST(current_schema() AS regnamespace)"
                )
            )
        print(f"{len(decisions)} decisions, {len(rewards)} rewards; "
              f"{count} decision partitions (with defaults)")  # fmt: skip
        rng = random.Random(7)
        results: dict[tuple[str, str], list[float]] = {}
        for round_ in range(args.rounds):
            ids = [d["event_id"] for d in rng.sample(decisions, 300)]
            order = ["plain", "partitioned"] if round_ % 2 == 0 else ["partitioned", "plain"]
            for what in ("find", "missing", "reward", "train"):
                for layout in order:
                    seconds = timed(stores[layout][0], what, ids, "policy0")
                    results.setdefault((what, layout), []).append(seconds)
        print(f"\n{'read':8}{'plain ms':>12}{'partitioned ms':>16}{'ratio':>8}")
        for what in ("find", "missing", "reward", "train"):
            plain = statistics.median(results[(what, "plain")]) * 1000
            parted = statistics.median(results[(what, "partitioned")]) * 1000
            print(f"{what:8}{plain:>12.3f}{parted:>16.3f}{parted / plain:>8.2f}")
    finally:
        for engine, drop in stores.values():
            engine.dispose()
            drop()


if __name__ == "__main__":
    main()
