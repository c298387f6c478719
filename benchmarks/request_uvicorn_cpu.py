"""CPU per request under uvicorn, old vs new, both on PostgreSQL, in the same run.

    .venv/bin/python benchmarks/request_uvicorn_cpu.py --compare-src DIR
        [--pg-url postgresql+psycopg://postgres@127.0.0.1/] [--workload d50x1]
        [--concurrency 64] [--duration 5] [--rounds 5] [--workers 2] [--profile DIR]

``http_load.py`` serves its ``base`` on SQLite and measures throughput against the floor;
this script answers a narrower question: how much CPU does a serving process spend per
decision, split into user and system time, with how many context switches, for the
package in ``DIR`` (``base``) and for the current one, both on PostgreSQL (each its own
fresh database under ``--pg-url``'s server), driven by the same ``wrk`` requests in
alternating rounds so both see the same machine load. PostgreSQL's own CPU is not counted
(it is the same work for both). ``--profile DIR`` also samples one round of each with
py-spy (GIL holder, raw collapsed stacks into DIR), for ``request_stacks.py``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _servers import BENCH_DIR, Server, descendants, start_service, write_policies
from http_load import decision_lines, make_decisions, reward_lines, run_wrk


def _proc_figures(pids: list[int]) -> dict[str, float]:
    """Summed user/system CPU seconds and context switches of ``pids`` (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"user": 0.0, "system": 0.0, "voluntary": 0.0, "involuntary": 0.0}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out["user"] += int(fields[11]) / tick
            out["system"] += int(fields[12]) / tick
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches"):
                    out["voluntary"] += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    out["involuntary"] += int(line.split()[1])
    return out


def _create_db(server_url: str, name: str) -> str:
    """A fresh database ``name`` on the PostgreSQL server of ``server_url``."""
    import psycopg

    admin = server_url.replace("postgresql+psycopg://", "postgresql://").rstrip("/") + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return server_url.rstrip("/") + "/" + name


def _drop_db(server_url: str, name: str) -> None:
    import psycopg

    admin = server_url.replace("postgresql+psycopg://", "postgresql://").rstrip("/") + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _round(
    server: Server, requests: Path, args: argparse.Namespace, out: Path, profile: Path | None
) -> dict[str, float]:
    pids = descendants(server.pid)
    before = _proc_figures(pids)
    spy = None
    if profile is not None:
        worker = server.worker_pids() or [server.pid]
        spy = subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(worker[0]),
             "-d", str(args.duration), "-r", "250", "-f", "raw", "-o", str(profile),
             "--nonblocking", *(["--gil"] if not args.all_threads else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    result = _run_wrk(server.url, requests, args.concurrency, args.duration, out)
    after = _proc_figures(pids)
    if spy is not None:
        spy.wait()
    done = max(1, result["requests"])
    figures = {key: (after[key] - before[key]) / done for key in before}
    return {
        "user_us": figures["user"] * 1e6,
        "system_us": figures["system"] * 1e6,
        "cpu_us": (figures["user"] + figures["system"]) * 1e6,
        "voluntary": figures["voluntary"],
        "involuntary": figures["involuntary"],
        "rate": result["rate"],
        "p99_ms": result["latency_us"]["p99"] / 1000,
        "failed": result["failed"],
        "wrk_us": result["wrk_cpu"] / done * 1e6,
    }


def _run_wrk(
    url: str, request_file: Path, concurrency: int, duration: float, out: Path
) -> dict[str, Any]:
    """``http_load.run_wrk``, also returning the CPU seconds wrk itself spent (the client
    shares the machine: what it saves is CPU the servers get)."""
    threads = min(2, concurrency)
    env = {**os.environ, "LOAD_REQUESTS": str(request_file), "LOAD_MAX": "0",
           "LOAD_OUT": str(out)}  # fmt: skip
    command = [
        "wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(duration))}s",
        "--timeout", "10s", "-s", str(BENCH_DIR / "http_load.lua"), url,
    ]  # fmt: skip
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}")
    result: dict[str, Any] = json.loads(out.read_text())
    seconds = result["duration_us"] / 1e6
    result["rate"] = result["requests"] / seconds if seconds else 0.0
    result["failed"] = sum(result["errors"].values())
    result["wrk_cpu"] = usage.ru_utime + usage.ru_stime
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare-src", type=Path, required=True)
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1")
    parser.add_argument("--workload", default="d50x1", choices=["d50x1", "d50x3", "reward"])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--profile", type=Path, help="py-spy raw stacks of one round each")
    parser.add_argument("--all-threads", action="store_true", help="py-spy: not only the GIL")
    parser.add_argument(
        "--together", action="store_true",
        help="load both servers at the same time (each its own wrk): both see the same "
        "machine, so the CPU figures compare even when other work comes and goes",
    )  # fmt: skip
    parser.add_argument("--only", choices=["base", "current"], help="serve just one of them")
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:8]
    names = [n for n in ("base", "current") if args.only in (None, n)]
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="request-cpu-")))
        policies = write_policies(folder)
        servers: dict[str, Server] = {}
        files: dict[str, Path] = {}
        for name in names:
            db = f"request_bench_{name}_{tag}"
            url = _create_db(args.pg_url, db)
            stack.callback(_drop_db, args.pg_url, db)
            source = args.compare_src.resolve() if name == "base" else None
            servers[name] = start_service(name, url, policies, args.workers, source=source)
            stack.callback(servers[name].stop)
            files[name] = folder / f"{name}.txt"
            if args.workload == "reward":
                import asyncio

                line = decision_lines("d50x1", 1)[0]
                ids = asyncio.run(make_decisions(servers[name].url, line, 4000))
                files[name].write_text("\n".join(reward_lines(ids)) + "\n")
            else:
                files[name].write_text("\n".join(decision_lines(args.workload, 64)) + "\n")
        for name, server in servers.items():  # warm up
            run_wrk(server.url, files[name], 16, 1, 10**7, folder / "warm.json")
        results: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
        for number in range(args.rounds):
            measured: dict[str, dict[str, float]] = {}
            if args.together:  # both under load at once: the same machine for both
                with concurrent.futures.ThreadPoolExecutor(len(servers)) as pool:
                    running = {
                        name: pool.submit(
                            _round, server, files[name], args, folder / f"wrk-{name}.json", None
                        )
                        for name, server in servers.items()
                    }
                    measured = {name: future.result() for name, future in running.items()}
            else:
                for name, server in servers.items():
                    profile = None
                    if args.profile and number == 0:
                        args.profile.mkdir(parents=True, exist_ok=True)
                        profile = args.profile / f"{name}.txt"
                    measured[name] = _round(
                        server, files[name], args, folder / f"wrk-{name}.json", profile
                    )
            for name, r in measured.items():
                results[name].append(r)
                print(f"round {number + 1} {name:8s} {r['cpu_us']:6.0f} µs CPU "
                      f"(user {r['user_us']:4.0f}, sys {r['system_us']:3.0f}) "
                      f"ctx vol {r['voluntary']:.2f} invol {r['involuntary']:.2f} "
                      f"wrk {r['wrk_us']:.0f} µs "
                      f"{r['rate']:6.0f}/s p99 {r['p99_ms']:.1f} ms"
                      + (f" FAILED {r['failed']}" if r["failed"] else ""), flush=True)  # fmt: skip
    print(f"\n{args.workload}, {args.concurrency} in flight, {args.workers} workers, "
          f"PostgreSQL, medians (min-max) of {args.rounds} rounds, per request:")  # fmt: skip
    for name, rows in results.items():
        line = f"  {name:8s}"
        columns = (("cpu_us", "µs CPU"), ("user_us", "user"), ("system_us", "sys"),
                   ("wrk_us", "wrk µs"),
                   ("involuntary", "invol"), ("rate", "/s"), ("p99_ms", "ms p99"))  # fmt: skip
        for key, unit in columns:
            values = [r[key] for r in rows]
            fmt = ".2f" if key == "involuntary" else ".1f" if key == "p99_ms" else ".0f"
            line += (f"  {statistics.median(values):{fmt}} ({min(values):{fmt}}-"
                     f"{max(values):{fmt}}) {unit}")  # fmt: skip
        print(line)
    if len(results) == 2:
        ratios = [
            c["cpu_us"] / b["cpu_us"]
            for b, c in zip(results["base"], results["current"], strict=True)
        ]
        print(
            f"  current / base CPU per request, per round: "
            f"{', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}"
        )


if __name__ == "__main__":
    main()
