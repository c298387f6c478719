"""How fast retention removes expired decisions (and their rewards) with batched deletes.

For each store and batch size: insert ``--decisions`` decisions of realistic size (10
candidates x 5 features) with one reward each, half of them older than the policy's
retention, then run the retention job and time it. The reference in the same run is the
time to insert the same rows in batches of 1,000 (the machine is shared and noisy: compare
the ratio, not the seconds). Prints a table and writes a PNG.

    .venv/bin/python benchmarks/retention.py --decisions 50000
    .venv/bin/python benchmarks/retention.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test
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
from bandit_service.store import repository
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
    args = parser.parse_args()
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
