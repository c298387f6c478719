"""How fast retention removes expired decisions (and their rewards).

Batched deletes: for each store and batch size, insert ``--decisions`` decisions of
realistic size (10 candidates x 5 features) with one reward each, half of them older than
the policy's retention, then run the retention job and time it. The reference in the same
run is the time to insert the same rows in batches of 1,000 (the machine is shared and
noisy: compare the ratio, not the seconds). Prints a table and writes a PNG.

    .venv/bin/python benchmarks/retention.py --decisions 50000
    .venv/bin/python benchmarks/retention.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test

Partition drop vs batched delete (PostgreSQL, ``--compare-partitions``): ``--expired``
expired decisions (one reward each, created 35-44 days ago, retention 30 days) and a tenth
as many recent ones, in alternating rounds: with the daily partitions the serving processes
would have created (retention drops them), and without (every row in the policy's default
partition: retention deletes them in batches of 5,000, as before partitioning). Times the
retention run, wall clock and this process's CPU; the database server's work shows in the
wall clock.

    .venv/bin/python benchmarks/retention.py --compare-partitions --expired 200000 \
        --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from bandit_service.policy import parse_policy
from bandit_service.privacy import RetentionJob
from bandit_service.store import partitions, repository
from bandit_service.store.database import make_engine, upgrade

DAY = 86400.0


def rows(n: int, now: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    candidates = [
        {"id": f"c{i}", "features": {f"f{j}": f"v{i}-{j}" for j in range(5)}} for i in range(10)
    ]
    decisions, rewards = [], []
    for i in range(n):
        created = now - (40 if i % 2 else 1) * DAY  # odd rows expired (retention 30 days)
        event_id = uuid.uuid4().hex
        decisions.append({
            "event_id": event_id, "policy": "bench", "policy_version": "v", "model_version": 0,
            "arm": "bandit", "user_key": uuid.uuid4().hex, "context": {"device": "tv", "n": i},
            "candidates": candidates,
            "slots": [{"slot": 0, "id": "c0", "probability": 0.1, "pmf": [["c0", 0.1]]}],
            "excluded": [], "created_at": created, "deferred": False, "activated_at": None,
        })  # fmt: skip
        rewards.append({
            "event_id": event_id, "slot": 0, "value": 1.0, "received_at": created + 5,
            "late": False, "kind": "primary", "reward_id": str(uuid.uuid4()),
        })  # fmt: skip
    return decisions, rewards


def run(url: str, n: int, batch: int) -> dict[str, float]:
    upgrade(url)
    engine = make_engine(url)
    now = time.time()
    decisions, rewards = rows(n, now)
    started = time.perf_counter()
    for start in range(0, n, 1000):
        with Session(engine) as session, session.begin():
            repository.insert_decisions(session, decisions[start : start + 1000])
            repository.insert_rewards(session, rewards[start : start + 1000])
    insert_seconds = time.perf_counter() - started
    job = RetentionJob(engine, {"bench": parse_policy("bench", {"retention_days": 30})}, batch)
    (result,) = job.run_once(now)
    engine.dispose()
    assert result.decisions == n // 2, result
    return {"insert_s": insert_seconds, "delete_s": result.seconds, "removed": result.decisions}


def compare_partitions(base: str, expired: int, rounds: int) -> None:
    """Alternating rounds of retention by partition drop and by batched delete."""
    policy = parse_policy("bench", {"retention_days": 30})
    now = time.time()
    table: list[tuple[str, dict[str, float]]] = []
    for round_ in range(rounds):
        for mode in ("drop", "delete") if round_ % 2 == 0 else ("delete", "drop"):
            url, drop = postgres_schema_url(base)
            try:
                upgrade(url)
                engine = make_engine(url)
                if mode == "drop":  # the daily partitions, made ahead day after day
                    for back in range(45, -1, -1):
                        partitions.ensure(engine, [("bench", 30.0)], now - back * DAY)
                else:
                    partitions.ensure(engine, [("bench", 0.0)], now)  # default partition only
                decisions, rewards = rows(expired + expired // 10, now)
                for i, d in enumerate(decisions):  # expired: 35-44 days old; recent: 1 day
                    age = 35 + (i % 10) + 0.5 if i < expired else 1.0
                    d["created_at"] = rewards[i]["received_at"] = now - age * DAY
                for start in range(0, len(decisions), 1000):
                    with Session(engine) as session, session.begin():
                        repository.insert_decisions(session, decisions[start : start + 1000])
                        repository.insert_rewards(session, rewards[start : start + 1000])
                with engine.connect() as connection:
                    connection.execute(text("ANALYZE decisions"))
                    connection.execute(text("ANALYZE rewards"))
                job = RetentionJob(engine, {"bench": policy})
                cpu, wall = time.process_time(), time.perf_counter()
                (result,) = job.run_once(now)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                assert (result.decisions, result.rewards) == (expired, expired), result
                engine.dispose()
            finally:
                drop()
            out = {"wall_s": wall, "cpu_s": cpu, "dropped": result.partitions_dropped,
                   "batches": result.batches,
                   "lock_ms": result.longest_drop_lock_seconds * 1000}  # fmt: skip
            print(f"round {round_ + 1} {mode}: {out}", flush=True)
            table.append((mode, out))
    print(f"\n{expired} expired decisions + {expired} rewards, {rounds} rounds each")
    print(f"{'mode':8}{'median wall s':>15}{'median cpu s':>14}{'partitions':>12}{'batches':>9}"
          f"{'longest drop lock ms':>22}")  # fmt: skip
    for mode in ("drop", "delete"):
        runs = [o for m, o in table if m == mode]
        walls = sorted(o["wall_s"] for o in runs)
        cpus = sorted(o["cpu_s"] for o in runs)
        print(f"{mode:8}{walls[len(walls) // 2]:>15.3f}{cpus[len(cpus) // 2]:>14.3f}"
              f"{runs[0]['dropped']:>12.0f}{runs[0]['batches']:>9.0f}"
              f"{max(o['lock_ms'] for o in runs):>22.1f}")  # fmt: skip


def postgres_schema_url(base: str) -> tuple[str, Any]:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})

    def drop() -> None:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    return url.render_as_string(hide_password=False), drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=50_000)
    parser.add_argument("--batches", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--postgres", default=None, help="also measure this PostgreSQL URL")
    parser.add_argument("--png", type=Path, default=Path("benchmarks/retention.png"))
    parser.add_argument(
        "--compare-partitions",
        action="store_true",
        help="PostgreSQL: partition drop vs batched delete (needs --postgres)",
    )
    parser.add_argument("--expired", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.compare_partitions:
        if not args.postgres:
            parser.error("--compare-partitions needs --postgres URL")
        compare_partitions(args.postgres, args.expired, args.rounds)
        return
    results: list[tuple[str, int, dict[str, float]]] = []
    stores = ["sqlite"] + (["postgres"] if args.postgres else [])
    for store in stores:
        for batch in args.batches:
            print(f"{store}: {args.decisions} decisions, batch {batch} ...", flush=True)
            if store == "sqlite":
                with tempfile.TemporaryDirectory() as folder:
                    out = run(f"sqlite:///{folder}/bench.db", args.decisions, batch)
            else:
                url, drop = postgres_schema_url(args.postgres)
                try:
                    out = run(url, args.decisions, batch)
                finally:
                    drop()
            results.append((store, batch, out))
    print(f"\n{'store':10}{'batch':>8}{'removed':>10}{'delete s':>10}{'rows/s':>10}"
          f"{'insert s':>10}{'delete/insert':>15}")  # fmt: skip
    for store, batch, out in results:
        rate = out["removed"] / out["delete_s"]
        print(f"{store:10}{batch:>8}{out['removed']:>10.0f}{out['delete_s']:>10.2f}{rate:>10.0f}"
              f"{out['insert_s']:>10.2f}{out['delete_s'] / out['insert_s']:>15.2f}")  # fmt: skip
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{s}\nbatch {b}" for s, b, _ in results]
    ax.bar(labels, [o["delete_s"] / o["insert_s"] for _, _, o in results])
    ax.set_ylabel("retention time / insert time of the same rows")
    ax.set_title(
        f"Retention by batched deletes ({args.decisions // 2} decisions + rewards removed)"
    )
    fig.tight_layout()
    fig.savefig(args.png, dpi=100)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
