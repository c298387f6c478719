"""Cost of the group-commit writer's PostgreSQL append, per decision and per commit.

    PYTHONPATH=. .venv/bin/python benchmarks/pgwrite_append.py \\
        --pg-url postgresql+psycopg://postgres@127.0.0.1/<empty db> \\
        [--workloads d50x1,d500x5] [--sizes 1,8,32,64] [--variants current,nomemo] \\
        [--compare-src DIR] [--rounds 3] [--writers 1]

Decision rows of the benchmark shapes are made by the real service (the ASGI app on a
throwaway SQLite file, the rows captured on their way to the writer), then committed again
and again with new event ids through ``BatchWriter._commit_once`` -- what the writer thread
does per batch, session and all -- in batches of each size. Per variant and size it prints
the writer thread's CPU per decision (``thread_time``), the PostgreSQL backend's CPU per
decision (``/proc/<pid>/schedstat``, ns resolution) and the commit latency (median and
90th percentile), which is about how long the log-append lock is held.

Variants: ``current`` (this package), ``nomemo`` (the same, sending every batch's
candidate sets again as before, see ``repository.StoredSets``) and ``base`` (the
``--compare-src`` package). Each (variant, round) runs in its own subprocess, in turn, so
all see the same machine load; medians of the rounds are printed. (The alternatives to
the append statement that were measured are listed in ``repository._append_postgresql``.)

``--writers 2`` runs two such processes at once against the same database (two serving
processes' writers): their commits contend for the log-append lock, and the figure that
matters is then the decisions per second of both together.
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
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def capture_rows(workload: str, count: int) -> list[dict[str, Any]]:
    """``count`` decision rows of ``workload`` as the service hands them to its writer."""
    from _servers import write_policies
    from decide_cpu import _bodies, _drive

    from bandit_service.app import create_app
    from bandit_service.config import Settings
    from bandit_service.store import writer as writer_module
    from bandit_service.store.database import upgrade

    rows: list[dict[str, Any]] = []
    real = writer_module.BatchWriter.write_decision

    async def capture(self: Any, row: dict[str, Any], fresh: bool = False) -> Any:
        rows.append(row)
        return await real(self, row, fresh)

    writer_module.BatchWriter.write_decision = capture  # type: ignore[method-assign]

    async def run(url: str, policies: Path) -> None:
        upgrade(url)
        app = create_app(Settings(database_url=url, policies_dir=policies, trainer="off"))
        async with app.router.lifespan_context(app):
            await _drive(app, _bodies(workload, 32), count, 8)

    with tempfile.TemporaryDirectory(prefix="pgwrite-rows-") as folder:
        asyncio.run(run(f"sqlite:///{folder}/rows.db", write_policies(Path(folder))))
    writer_module.BatchWriter.write_decision = real  # type: ignore[method-assign]
    return rows


def backend_cpu_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def configure(variant: str) -> None:
    """``nomemo``: the current package, sending every batch's candidate sets again."""
    from bandit_service.store import repository

    if variant == "nomemo":
        repository.StoredSets.__contains__ = lambda self, key: False  # type: ignore[method-assign]


def measure(url: str, workload: str, sizes: list[int], decisions: int) -> dict[str, Any]:
    from bandit_service.store.database import make_engine
    from bandit_service.store.writer import BatchWriter, _Write

    rows = capture_rows(workload, 64)
    engine = make_engine(url)
    figures: dict[str, Any] = {}
    try:
        writer = BatchWriter(engine)
        for size in sizes:
            batches = max(8, decisions // size)
            latencies = []
            cpu = backend = 0
            for n in range(batches + 3):  # the first three warm up
                batch = [
                    _Write("decision", {**rows[(n * size + i) % len(rows)],
                                        "event_id": str(uuid.uuid4())}, None, True)  # type: ignore[arg-type]
                    for i in range(size)
                ]  # fmt: skip
                if n == 3:
                    assert writer._connection is not None
                    pid = writer._connection.connection.driver_connection.info.backend_pid
                    cpu, backend = time.thread_time_ns(), backend_cpu_ns(pid)
                started = time.perf_counter()
                writer._commit_once(batch)
                if n >= 3:
                    latencies.append(time.perf_counter() - started)
            cpu, backend = time.thread_time_ns() - cpu, backend_cpu_ns(pid) - backend
            count = batches * size
            latencies.sort()
            figures[str(size)] = {
                "client_us": cpu / count / 1e3,
                "server_us": backend / count / 1e3,
                "p50_ms": latencies[len(latencies) // 2] * 1e3,
                "p90_ms": latencies[int(len(latencies) * 0.9)] * 1e3,
                "rate": count / sum(latencies),
            }
        writer._release_connection()
    finally:
        engine.dispose()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg-url", required=True, help="an empty PostgreSQL database")
    parser.add_argument("--workloads", default="d50x1,d500x5")
    parser.add_argument("--sizes", default="1,8,32,64")
    parser.add_argument("--variants", default="current,nomemo")
    parser.add_argument("--decisions", type=int, default=0, help="per size (default: by shape)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--writers", type=int, default=1, help="processes at once")
    parser.add_argument("--compare-src", type=Path, help="the older package: variant 'base'")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.child:
        variant, workload = args.child.split(":")
        configure(variant)
        decisions = args.decisions or (2000 if workload == "d50x1" else 600)
        print(json.dumps(measure(args.pg_url, workload, sizes, decisions)))
        return
    from sqlalchemy import text

    from bandit_service.store.database import make_engine, upgrade

    upgrade(args.pg_url)
    engine = make_engine(args.pg_url)
    variants = args.variants.split(",")
    if args.compare_src:
        variants = ["base", *variants]
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for workload in args.workloads.split(","):
        for round_number in range(args.rounds):
            for variant in variants:
                env = dict(os.environ)
                if variant == "base":
                    env["PYTHONPATH"] = str(args.compare_src.resolve())
                command = [sys.executable, __file__, "--child", f"{variant}:{workload}",
                           *sys.argv[1:]]  # fmt: skip
                pipe = subprocess.PIPE
                procs = [
                    subprocess.Popen(command, env=env, stdout=pipe, stderr=pipe, text=True)
                    for _ in range(args.writers)
                ]
                outs = [p.communicate() for p in procs]
                for p, (_out, err) in zip(procs, outs, strict=True):
                    if p.returncode != 0:
                        raise SystemExit(f"{variant} failed:\n{err[-3000:]}")
                figures = [json.loads(out.strip().splitlines()[-1]) for out, _err in outs]
                merged = figures[0]
                for size in merged:  # several writers at once: their rates add up
                    merged[size]["rate"] = sum(f[size]["rate"] for f in figures)
                results.setdefault((workload, variant), []).append(merged)
                with engine.begin() as connection:  # the next run starts from empty tables
                    connection.execute(text("TRUNCATE decisions, rewards, candidate_sets"))
                print(f"{workload} round {round_number + 1} {variant} done", file=sys.stderr)
    for workload in args.workloads.split(","):
        print(f"\n{workload}, {args.writers} writer process(es), medians of {args.rounds} "
              "rounds (client/server: CPU µs per decision; commit latency ms; "
              "decisions/s of all writers)")  # fmt: skip
        print(f"  {'variant':18s} {'batch':>5s} {'client':>8s} {'server':>8s} {'p50':>7s} "
              f"{'p90':>7s} {'rate':>8s}")  # fmt: skip
        for size in sizes:
            for variant in variants:
                rows = [r[str(size)] for r in results[(workload, variant)]]

                def med(key: str, rows: list[dict[str, Any]] = rows) -> float:
                    return statistics.median(r[key] for r in rows)

                print(f"  {variant:18s} {size:5d} {med('client_us'):8.1f} {med('server_us'):8.1f} "
                      f"{med('p50_ms'):7.2f} {med('p90_ms'):7.2f} {med('rate'):8.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
