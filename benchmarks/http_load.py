"""HTTP load on loopback: the service (SQLite, PostgreSQL) against a bare FastAPI floor,
measured in the same run, request for request.

    .venv/bin/python benchmarks/http_load.py [--duration 5] [--concurrency 1 16 64]
        [--workloads d50x1 d50x3 d500x5 reward] [--targets floor sqlite postgres]
        [--rounds 1] [--workers 2] [--pg-url URL] [--json runs/http_load.json] [--compare-src DIR]

The load comes from ``wrk`` (a separate C process; ``apt-get install -y wrk``) driven by
``http_load.lua``, bounded by ``--duration`` seconds and ``--max-requests`` responses per
wrk thread, whichever comes first. All servers run at once and each measurement point runs
floor, SQLite, PostgreSQL back to back, so a change in machine load hits all three alike:
compare the ratios, not the absolute numbers, when the machine is shared.

Targets (each ``--workers`` uvicorn workers, 2 by default):

* ``floor``: ``_floor_app.py``, FastAPI routes that read the body and answer ``{"ok":true}``;
* ``sqlite``: ``bandit-service serve`` on a fresh SQLite file (WAL, synchronous=FULL);
* ``postgres``: the same on PostgreSQL: ``--pg-url``, or by default a private throwaway
  cluster (initdb in a temporary folder, default durability settings) so nothing shared is
  touched.

Every decision is durably committed before its response (group commit); the trainer is off
(its throughput is measured by ``trainer_throughput.py``). Workloads: ``d50x1`` 50
candidates x 10 features, 20-feature context, 1 slot; ``d50x3`` the same with 3 slots;
``d500x5`` 500 candidates, 5 slots; ``catalog`` d50x1's candidates stored in the
policy's catalog and named by ``candidate_ids``; ``reward`` one reward per request on decisions made
beforehand. Each request file holds varied contexts (and reward values), cycled through.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _servers import (
    BENCH_DIR,
    PrivatePostgres,
    Server,
    cpu_seconds,
    descendants,
    private_postgres,
    start_floor,
    start_service,
    write_policies,
)
from _synthetic import candidates, context

WORKLOADS: dict[str, tuple[int, int]] = {  # name: (candidates, slots)
    "d50x1": (50, 1),
    "d50x3": (50, 3),
    "d500x5": (500, 5),
    "catalog": (50, 1),  # d50x1's candidates, stored in the policy's catalog, named by id
}
LABELS = {
    "d50x1": "50 cand x 10 feat, 1 slot",
    "d50x3": "50 cand x 10 feat, 3 slots",
    "d500x5": "500 cand, 5 slots",
    "catalog": "50 catalog ids, 1 slot",
    "reward": "reward ingestion",
}


def decision_lines(name: str, variants: int, seed: int = 7) -> list[str]:
    """``variants`` requests of one shape: a fixed catalogue (as in production, candidates
    repeat from request to request) and a different context each time."""
    count, slots = WORKLOADS[name]
    rng = random.Random(seed)
    pool = [{"id": c.id, "features": dict(c.features)} for c in candidates(rng, count)]
    lines = []
    ids = [c["id"] for c in pool]
    for _ in range(variants):
        body: dict[str, Any] = {"context": context(rng), "slots": slots}
        body.update({"candidate_ids": ids} if name == "catalog" else {"candidates": pool})
        lines.append("/v1/decisions\t" + orjson.dumps(body).decode())
    return lines


def catalog_items(name: str, seed: int = 7) -> list[dict[str, Any]]:
    """The candidates of ``decision_lines(name)`` (the same seed), as catalog items."""
    count, _slots = WORKLOADS[name]
    return [{"id": c.id, "features": dict(c.features)} for c in candidates(random.Random(seed),
                                                                          count)]  # fmt: skip


def stock_catalog(url: str, items: list[dict[str, Any]]) -> None:
    """Replace the benchmark policy's catalog with ``items`` (one request)."""
    response = httpx.put(f"{url}/v1/policies/default/catalog/items", json={"items": items})
    response.raise_for_status()


def reward_lines(event_ids: list[str], seed: int = 11) -> list[str]:
    rng = random.Random(seed)
    return [
        f"/v1/decisions/{event_id}/rewards\t"
        + orjson.dumps({"value": round(rng.random(), 3)}).decode()
        for event_id in event_ids
    ]


async def make_decisions(url: str, line: str, count: int, concurrency: int = 16) -> list[str]:
    """Log ``count`` decisions (the reward workload's targets); returns their event ids."""
    path, body = line.split("\t", 1)
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def one(n: int) -> None:
            for _ in range(n):
                response = await client.post(
                    path, content=body, headers={"content-type": "application/json"}
                )
                response.raise_for_status()
                ids.append(response.json().get("event_id", os.urandom(16).hex()))

        per = -(-count // concurrency)
        await asyncio.gather(*(one(per) for _ in range(concurrency)))
    return ids


def run_wrk(
    url: str,
    request_file: Path,
    concurrency: int,
    duration: float,
    max_requests: int,
    out: Path,
) -> dict[str, Any]:
    threads = min(2, concurrency)  # wrk takes whole seconds
    env = {
        **os.environ,
        "LOAD_REQUESTS": str(request_file),
        "LOAD_MAX": str(max(1, max_requests // threads)),
        "LOAD_OUT": str(out),
    }
    seconds = f"{max(1, round(duration))}s"
    command = [
        "wrk", f"-t{threads}", f"-c{concurrency}", f"-d{seconds}", "--timeout", "10s",
        "-s", str(BENCH_DIR / "http_load.lua"), url,
    ]  # fmt: skip
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(out.read_text())
    seconds = result["duration_us"] / 1e6
    result["rate"] = result["requests"] / seconds if seconds else 0.0
    result["non_2xx"] = result["errors"]["status"]
    result["failed"] = sum(result["errors"].values())
    return result


class CpuMeter:
    """CPU time the server (and its private PostgreSQL) spent during one measurement.

    On a shared machine throughput follows whatever CPU share the scheduler grants, but the
    CPU spent per request does not: it is the steadier figure to compare with the floor."""

    def __init__(self, server: Server, db_pid: int | None = None) -> None:
        self.server, self.db_pid = server, db_pid

    def snapshot(self) -> tuple[dict[int, float], dict[int, float]]:
        db = cpu_seconds(descendants(self.db_pid)) if self.db_pid else {}
        return cpu_seconds(descendants(self.server.pid)), db

    @staticmethod
    def spent(before: dict[int, float], after: dict[int, float]) -> float:
        return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def measure(
    meter: CpuMeter, url: str, request_file: Path, concurrency: int, duration: float,
    max_requests: int, out: Path,
) -> dict[str, Any]:  # fmt: skip
    app_before, db_before = meter.snapshot()
    result = run_wrk(url, request_file, concurrency, duration, max_requests, out)
    app_after, db_after = meter.snapshot()
    done = max(1, result["requests"])
    result["app_cpu_us"] = meter.spent(app_before, app_after) / done * 1e6
    result["db_cpu_us"] = meter.spent(db_before, db_after) / done * 1e6
    return result


def median_result(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One point's rounds as one result: the median of each rate, latency percentile and
    CPU figure (each taken on its own), counts (requests, failures, bytes, time) summed,
    every round's own figures kept under ``rounds``. A single round is returned as it is.

    Why rounds: on this shared 2-core machine one 5-second point can catch a stall (an
    fsync of the virtual disk took 75-133 ms at times while the services ran, against
    0.45 ms at the median), which decides that point's p99 on its own."""
    if len(rounds) == 1:
        return rounds[0]
    out = dict(rounds[0])
    for key in ("rate", "app_cpu_us", "db_cpu_us"):
        out[key] = statistics.median(r[key] for r in rounds)
    out["latency_us"] = {
        key: statistics.median(r["latency_us"][key] for r in rounds)
        for key in rounds[0]["latency_us"]
    }
    for key in ("requests", "non_2xx", "failed", "duration_us", "bytes"):
        out[key] = sum(r[key] for r in rounds)
    out["errors"] = {key: sum(r["errors"][key] for r in rounds) for key in rounds[0]["errors"]}
    out["rounds"] = [
        {"rate": r["rate"], **{k: r["latency_us"][k] for k in ("p50", "p99", "p999")}}
        for r in rounds
    ]
    return out


def print_rounds(results: list[dict[str, Any]], targets: list[str]) -> None:
    """Each round's p99 (ms), when there were several: how far one round can stray."""
    if not any("rounds" in r for row in results for r in row["targets"].values()):
        return
    print("\np99 of each round (ms), in the order run:")
    for row in results:
        cells = []
        for target in targets:
            r = row["targets"].get(target)
            if r is not None and "rounds" in r:
                cells.append(f"{target} " + " ".join(f"{x['p99'] / 1000:.1f}" for x in r["rounds"]))
        print(f"  {LABELS[row['workload']]:<28}{row['concurrency']:>4}  " + "; ".join(cells))


def machine_load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def print_table(results: list[dict[str, Any]], targets: list[str]) -> None:
    header = f"{'workload':<28}{'inflight':>9}"
    for target in targets:
        header += f" | {target:>8} req/s  p50   p99  p99.9"
        if target != "floor":
            header += "  xfloor"
    print(header)
    print("-" * len(header))
    for row in results:
        line = f"{LABELS[row['workload']]:<28}{row['concurrency']:>9}"
        floor_rate = row["targets"].get("floor", {}).get("rate")
        for target in targets:
            r = row["targets"].get(target)
            if r is None:
                line += f" | {'-':>33}" + ("        " if target != "floor" else "")
                continue
            lat = r["latency_us"]
            mark = "!" if r["failed"] else " "
            p50, p99, p999 = (lat[k] / 1000 for k in ("p50", "p99", "p999"))
            line += f" | {r['rate']:>8.0f}{mark}     {p50:>5.1f} {p99:>5.1f} {p999:>6.1f}"
            if target != "floor":
                ratio = r["rate"] / floor_rate if floor_rate else float("nan")
                line += f"  {ratio:>6.2f}"
        print(line)
    print("latencies in ms; '!' marks a point with failed or non-2xx responses (see the JSON)")
    print()
    header = f"{'CPU per request (us)':<28}{'inflight':>9}"
    for target in targets:
        header += f" | {target:>8} app    db"
        if target != "floor":
            header += "  floor/this"
    print(header)
    print("-" * len(header))
    for row in results:
        line = f"{LABELS[row['workload']]:<28}{row['concurrency']:>9}"
        floor = row["targets"].get("floor")
        for target in targets:
            r = row["targets"].get(target)
            if r is None:
                continue
            line += f" | {'':>8}{r['app_cpu_us']:>4.0f} {r['db_cpu_us']:>5.0f}"
            if target != "floor" and floor:
                total = r["app_cpu_us"] + r["db_cpu_us"]
                line += f"  {floor['app_cpu_us'] / total:>10.2f}" if total else f"  {'-':>10}"
        print(line)
    print("floor/this: the floor's CPU per request over this target's (app + PostgreSQL): the")
    print("throughput ratio to expect when CPU is the limit and the load generator is elsewhere")


def print_catalog_ratio(results: list[dict[str, Any]]) -> None:
    """CPU per decision by catalog ids over inline candidates, point by point."""
    inline = {row["concurrency"]: row for row in results if row["workload"] == "d50x1"}
    lines = []
    for row in results:
        other = inline.get(row["concurrency"]) if row["workload"] == "catalog" else None
        if other is None:
            continue
        for target, r in row["targets"].items():
            base = other["targets"].get(target)
            if target == "floor" or base is None:
                continue
            this, then = r["app_cpu_us"] + r["db_cpu_us"], base["app_cpu_us"] + base["db_cpu_us"]
            lines.append(f"  {target:<9} x{row['concurrency']:<3} catalog {this:>5.0f} us, "
                         f"inline {then:>5.0f} us: catalog/inline {this / then:.2f}")  # fmt: skip
    if lines:
        print("\nCPU per decision (app + db), 50 candidates x 10 features, 1 slot:")
        print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per point")
    parser.add_argument("--max-requests", type=int, default=200_000, help="per point")
    parser.add_argument("--warmup", type=int, default=1, help="seconds, discarded")
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="measure each point this many times, targets in alternating order, and report "
        "the medians (and each round's p99)",
    )  # fmt: skip
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument(
        "--workloads", nargs="+", default=[*WORKLOADS, "reward"], choices=[*WORKLOADS, "reward"]
    )
    parser.add_argument(
        "--targets", nargs="+", default=["floor", "sqlite", "postgres"],
        choices=["floor", "sqlite", "postgres"],
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--variants", type=int, default=64, help="distinct request bodies")
    parser.add_argument("--pg-url", help="PostgreSQL URL (default: a private throwaway cluster)")
    parser.add_argument(
        "--compare-src", type=Path,
        help="also serve (on SQLite, as target 'base') the bandit_service package in this "
        "folder, e.g. `git archive COMMIT | tar -x -C DIR`: before/after in one run",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=Path("runs/http_load.json"))
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")

    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bandit-load-")))
        policies = write_policies(folder)
        servers: dict[str, Server] = {}
        load_before = machine_load()
        print(f"starting servers ({load_before})", file=sys.stderr, flush=True)
        if "floor" in args.targets:
            servers["floor"] = start_floor(args.workers)
            stack.callback(servers["floor"].stop)
        if "sqlite" in args.targets:
            servers["sqlite"] = start_service(
                "sqlite", f"sqlite:///{folder}/bench.db", policies, args.workers
            )
            stack.callback(servers["sqlite"].stop)
        if args.compare_src:
            servers["base"] = start_service(
                "base", f"sqlite:///{folder}/base.db", policies, args.workers,
                source=args.compare_src.resolve(),
            )  # fmt: skip
            stack.callback(servers["base"].stop)
        pg: PrivatePostgres | None = None
        if "postgres" in args.targets:
            if not args.pg_url:
                pg = stack.enter_context(private_postgres())
            pg_url = args.pg_url or pg.url  # type: ignore[union-attr]
            servers["postgres"] = start_service("postgres", pg_url, policies, args.workers)
            stack.callback(servers["postgres"].stop)  # runs before the cluster is removed
        meters = {
            name: CpuMeter(server, pg.postmaster_pid() if pg and name == "postgres" else None)
            for name, server in servers.items()
        }

        results: list[dict[str, Any]] = []
        out = folder / "wrk.json"
        for workload in args.workloads:
            files: dict[str, Path] = {}
            if workload == "reward":
                line = decision_lines("d50x1", 1)[0]
                for target, server in servers.items():
                    ids = asyncio.run(make_decisions(server.url, line, 2000))
                    files[target] = folder / f"reward-{target}.txt"
                    files[target].write_text("\n".join(reward_lines(ids)) + "\n")
            else:
                variants = args.variants if WORKLOADS[workload][0] <= 100 else 16
                path = folder / f"{workload}.txt"
                path.write_text("\n".join(decision_lines(workload, variants)) + "\n")
                files = dict.fromkeys(servers, path)
                if workload == "catalog":
                    for target, server in servers.items():
                        if target != "floor":
                            stock_catalog(server.url, catalog_items(workload))
                    time.sleep(3)  # the other worker refreshes within its 2 s reload period
            for target, server in servers.items():  # warm caches, connections, JIT-free paths
                run_wrk(server.url, files[target], 16, args.warmup, args.max_requests, out)
            for concurrency in args.concurrency:
                row: dict[str, Any] = {
                    "workload": workload, "concurrency": concurrency, "targets": {}
                }  # fmt: skip
                rounds: dict[str, list[dict[str, Any]]] = {target: [] for target in servers}
                for n in range(args.rounds):
                    order = list(servers.items())
                    for target, server in order if n % 2 == 0 else reversed(order):
                        print(f"  {workload} x{concurrency} on {target}"
                              f"{f' (round {n + 1})' if args.rounds > 1 else ''}...",
                              file=sys.stderr, flush=True)  # fmt: skip
                        rounds[target].append(measure(
                            meters[target], server.url, files[target], concurrency,
                            args.duration, args.max_requests, out,
                        ))  # fmt: skip
                row["targets"] = {target: median_result(rs) for target, rs in rounds.items()}
                results.append(row)
        load_after = machine_load()

    print(f"\nmachine: {load_before} before, {load_after} after; "
          f"{args.workers} uvicorn workers per target, {args.duration:g} s per point")  # fmt: skip
    shown = [t for t in ("floor", "base", "sqlite", "postgres") if t in servers]
    print_table(results, shown)
    print_rounds(results, shown)
    print_catalog_ratio(results)
    report = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"before": load_before, "after": load_after, "cpus": os.cpu_count()},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
