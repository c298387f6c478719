"""CPU per decision inside one process: the ASGI app driven directly, no sockets, no uvicorn.

    .venv/bin/python benchmarks/decide_cpu.py [--workload d50x1] [--concurrency 16]
        [--requests 3000] [--rounds 5] [--compare-src DIR] [--store sqlite|postgres]

What ``http_load.py`` measures end to end is dominated, on this shared machine, by how
much CPU the scheduler grants; this script isolates the part the code controls: process
CPU time (every thread: event loop, engine, group-commit writer) per decision, with
``--concurrency`` requests in flight against a fresh SQLite file (WAL, synchronous=FULL)
or PostgreSQL (``--pg-url``, a throwaway schema is *not* made: give an empty database).
HTTP parsing and the socket (uvicorn's share, which the floor pays too) are left out.

With ``--pg-url`` the CPU of the PostgreSQL backends connected to that database while the
measured requests run is reported too (``pg_stat_activity``, ``/proc/<pid>/schedstat``;
the WAL writer, checkpointer and other shared processes are not counted), and the
database's log is emptied before each round.

``--compare-src DIR`` runs the ``bandit_service`` package found in DIR (e.g. a
``git worktree`` of an older commit) in alternate rounds, each round a fresh subprocess,
so both see the same machine load; the medians are printed side by side.
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

WORKLOADS = {"d50x1": (50, 1), "d50x3": (50, 3), "d500x5": (500, 5)}


def _bodies(workload: str, variants: int) -> list[bytes]:
    from http_load import decision_lines

    return [line.split("\t", 1)[1].encode() for line in decision_lines(workload, variants)]


async def _drive(
    app: Any, bodies: list[bytes], requests: int, concurrency: int, path: str = "/v1/decisions"
) -> list[int]:
    """POST ``requests`` of ``bodies`` (in turn) to ``path`` with ``concurrency`` in flight,
    calling the ASGI app directly; returns the response statuses."""
    statuses: list[int] = []
    counter = iter(range(requests))

    async def one_request(body: bytes) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"127.0.0.1"),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8080),
            "state": {},
        }
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(scope, receive, send)

    async def worker(offset: int) -> None:
        for n in counter:
            await one_request(bodies[(n + offset) % len(bodies)])

    await asyncio.gather(*(worker(i * 7) for i in range(concurrency)))
    return statuses


def _backend_cpu_ns(engine: Any) -> dict[int, int]:
    """CPU nanoseconds so far of each other PostgreSQL backend connected to the database."""
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
    from bandit_service.app import create_app
    from bandit_service.config import Settings
    from bandit_service.store.database import make_engine, upgrade

    upgrade(url)
    settings = Settings(database_url=url, policies_dir=policies, trainer="off")
    app = create_app(settings)
    bodies = _bodies(args.workload, 32)
    probe = make_engine(url) if args.pg_url else None
    before: dict[int, int] = {}
    after: dict[int, int] = {}
    async with app.router.lifespan_context(app):
        await _drive(app, bodies, args.warmup, args.concurrency)
        if probe is not None:
            before = _backend_cpu_ns(probe)
        cpu, wall = time.process_time(), time.perf_counter()
        statuses = await _drive(app, bodies, args.requests, args.concurrency)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if probe is not None:
            after = _backend_cpu_ns(probe)
    if probe is not None:
        probe.dispose()
    bad = [s for s in statuses if s != 200]
    if bad:
        raise SystemExit(f"{len(bad)} non-200 answers, e.g. {bad[0]}")
    n = len(statuses)
    figures = {"cpu_us": cpu / n * 1e6, "rate": n / wall}
    if probe is not None:
        server_ns = sum(ns - before.get(pid, 0) for pid, ns in after.items())
        figures["server_us"] = server_ns / n / 1e3
    return figures


def _empty_log(url: str) -> None:
    """A fresh log for the next round (the database is a throwaway one, see --pg-url)."""
    from sqlalchemy import text

    from bandit_service.store.database import make_engine, upgrade

    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text("TRUNCATE decisions, rewards, candidate_sets"))
    finally:
        engine.dispose()


def _one_round(args: argparse.Namespace) -> dict[str, float]:
    from _servers import write_policies

    with tempfile.TemporaryDirectory(prefix="bandit-cpu-") as folder:
        policies = write_policies(Path(folder))
        url = args.pg_url or f"sqlite:///{folder}/cpu.db"
        return asyncio.run(_measure(url, policies, args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="d50x1")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pg-url", help="an empty PostgreSQL database (default: SQLite)")
    parser.add_argument("--compare-src", type=Path, help="the older package, run alternately")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_one_round(args)))
        return
    heading = f"{args.workload}, {args.concurrency} in flight, {args.requests} requests a round"
    alternate_rounds(args, __file__, "decision", heading)


def alternate_rounds(
    args: argparse.Namespace, script: str, unit: str, heading: str, show_load: bool = False
) -> None:
    """Run ``script --child`` (one measured round, figures as JSON on its last line) for
    ``args.rounds`` rounds, the ``--compare-src`` package and this one alternating, each
    round a fresh subprocess; print every round, the medians and the per-round ratios.
    ``unit``: what one request is (decision, reward)."""
    variants: dict[str, Path | None] = {"current": None}
    if args.compare_src:
        variants = {"base": args.compare_src.resolve(), "current": None}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for round_number in range(args.rounds):
        for name, source in variants.items():
            if args.pg_url:
                _empty_log(args.pg_url)
            env = dict(os.environ)
            if source is not None:
                env["PYTHONPATH"] = str(source)
            command = [sys.executable, script, "--child", *sys.argv[1:]]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            results[name].append(figures)
            server = f", PostgreSQL {figures['server_us']:6.0f} µs" if args.pg_url else ""
            load = f"  (load {os.getloadavg()[0]:.2f})" if show_load else ""
            print(f"round {round_number + 1} {name:8s} {figures['cpu_us']:8.0f} µs CPU/{unit}"
                  f"{server} {figures['rate']:7.0f}/s{load}", flush=True)  # fmt: skip
    print(f"\n{heading}, medians of {args.rounds} rounds:")
    for name, rows in results.items():
        cpu = statistics.median(r["cpu_us"] for r in rows)
        rate = statistics.median(r["rate"] for r in rows)
        server = ""
        if args.pg_url:
            median_server = statistics.median(r["server_us"] for r in rows)
            server = f" + {median_server:6.0f} µs in PostgreSQL backends"
        print(f"  {name:8s} {cpu:8.0f} µs CPU/{unit}{server}  {rate:7.0f} {unit}s/s "
              "(one process)")  # fmt: skip
    if args.compare_src:
        ratios = [
            c["cpu_us"] / b["cpu_us"]
            for b, c in zip(results["base"], results["current"], strict=True)
        ]
        listed = ", ".join(f"{r:.2f}" for r in ratios)
        median = statistics.median(ratios)
        print(f"  current / base CPU per {unit}, per round: {listed}; median {median:.2f}")


if __name__ == "__main__":
    main()
