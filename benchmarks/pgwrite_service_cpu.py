"""CPU per decision of the service on PostgreSQL, in the process and in the PostgreSQL
backends serving it: ``decide_cpu.py`` (the ASGI app driven in-process) plus the server
side, which ``decide_cpu.py`` does not see.

    PYTHONPATH=. .venv/bin/python benchmarks/pgwrite_service_cpu.py \\
        --pg-url postgresql+psycopg://postgres@127.0.0.1/<empty db> [--workload d50x1] \\
        [--concurrency 64] [--requests 3000] [--rounds 5] [--compare-src DIR]

The backends counted are those connected to the given database while the measured
requests run (``pg_stat_activity``), read from ``/proc/<pid>/schedstat``; WAL writer,
checkpointer and other shared processes are not. Each (version, round) runs in its own
subprocess, in turn, against the same database (emptied before each round).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _backends(engine: Any) -> dict[int, int]:
    from sqlalchemy import text

    with engine.connect() as connection:
        pids = connection.execute(
            text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            )
        ).scalars()
        found = {}
        for pid in pids:
            try:
                found[pid] = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
            except OSError:
                continue
    return found


async def _measure(url: str, policies: Path, args: argparse.Namespace) -> dict[str, float]:
    from decide_cpu import _bodies, _drive

    from bandit_service.app import create_app
    from bandit_service.config import Settings
    from bandit_service.store.database import make_engine, upgrade

    upgrade(url)
    settings = Settings(database_url=url, policies_dir=policies, trainer="off")
    app = create_app(settings)
    bodies = _bodies(args.workload, 32)
    probe = make_engine(url)
    async with app.router.lifespan_context(app):
        await _drive(app, bodies, args.warmup, args.concurrency)
        before = _backends(probe)
        cpu, wall = time.process_time(), time.perf_counter()
        statuses = await _drive(app, bodies, args.requests, args.concurrency)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        after = _backends(probe)
    probe.dispose()
    if any(s != 200 for s in statuses):
        raise SystemExit("non-200 answers")
    server_ns = sum(ns - before.get(pid, 0) for pid, ns in after.items())
    n = len(statuses)
    return {"cpu_us": cpu / n * 1e6, "server_us": server_ns / n / 1e3, "rate": n / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg-url", required=True, help="an empty PostgreSQL database")
    parser.add_argument("--workload", default="d50x1")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compare-src", type=Path, help="the older package, run alternately")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        from _servers import write_policies

        with tempfile.TemporaryDirectory(prefix="pgwrite-cpu-") as folder:
            policies = write_policies(Path(folder))
            print(json.dumps(asyncio.run(_measure(args.pg_url, policies, args))))
        return
    from sqlalchemy import text

    from bandit_service.store.database import make_engine, upgrade

    upgrade(args.pg_url)
    engine = make_engine(args.pg_url)
    variants: dict[str, Path | None] = {"current": None}
    if args.compare_src:
        variants = {"base": args.compare_src.resolve(), "current": None}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for round_number in range(args.rounds):
        for name, source in variants.items():
            with engine.begin() as connection:
                connection.execute(text("TRUNCATE decisions, rewards, candidate_sets"))
            env = dict(os.environ)
            if source is not None:
                env["PYTHONPATH"] = str(source)
            command = [sys.executable, __file__, "--child", *sys.argv[1:]]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            results[name].append(figures)
            print(f"round {round_number + 1} {name:8s} app {figures['cpu_us']:7.0f} µs, "
                  f"PostgreSQL {figures['server_us']:6.0f} µs CPU/decision "
                  f"{figures['rate']:6.0f}/s", flush=True)  # fmt: skip
    engine.dispose()
    print(f"\n{args.workload}, {args.concurrency} in flight, {args.requests} requests a round, "
          f"medians of {args.rounds} rounds (CPU µs per decision):")  # fmt: skip
    for name, rows in results.items():
        app = statistics.median(r["cpu_us"] for r in rows)
        server = statistics.median(r["server_us"] for r in rows)
        rate = statistics.median(r["rate"] for r in rows)
        print(f"  {name:8s} app {app:7.0f}  PostgreSQL backends {server:6.0f}  {rate:6.0f}/s")


if __name__ == "__main__":
    main()
