"""CPU per reward inside one process: the ASGI app driven directly, no sockets, no uvicorn.

    .venv/bin/python benchmarks/reward_cpu.py [--concurrency 64] [--requests 4000]
        [--rounds 5] [--compare-src DIR] [--pg-url URL]

``decide_cpu.py``'s method for the reward workload of ``http_load.py``: each round logs
``--warmup + --requests`` decisions (d50x1) through the app, then posts one reward to each
(``POST /v1/decisions/{event_id}/rewards``, ``http_load.reward_lines``' values) with
``--concurrency`` requests in flight, and reports the process's CPU time (every thread:
event loop, reward look-ups, group-commit writer) per measured reward, and the rate.
The store is a fresh SQLite file (WAL, synchronous=FULL) or PostgreSQL (``--pg-url``: an
empty throwaway database; its log is emptied before each round), where the CPU of the
backends connected to that database during the measured rewards is reported too.

``--compare-src DIR`` runs the ``bandit_service`` package found in DIR in alternate
rounds, each round a fresh subprocess; the medians are printed side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))


async def _drive(
    app: Any, requests: list[tuple[str, bytes]], concurrency: int
) -> list[tuple[int, bytes]]:
    """POST each ``(path, body)`` once, ``concurrency`` in flight, calling the ASGI app
    directly; returns ``(status, body)`` in request order."""
    answers: list[tuple[int, bytes]] = [(0, b"")] * len(requests)
    counter = iter(range(len(requests)))

    async def one_request(n: int) -> None:
        path, body = requests[n]
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
        status = 0
        chunks: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await app(scope, receive, send)
        answers[n] = (status, b"".join(chunks))

    async def worker() -> None:
        for n in counter:
            await one_request(n)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers


async def _measure(url: str, policies: Path, args: argparse.Namespace) -> dict[str, float]:
    from decide_cpu import _backend_cpu_ns
    from http_load import decision_lines, reward_lines

    from bandit_service.app import create_app
    from bandit_service.config import Settings
    from bandit_service.store.database import make_engine, upgrade

    upgrade(url)
    settings = Settings(database_url=url, policies_dir=policies, trainer="off")
    app = create_app(settings)
    bodies = [line.split("\t", 1)[1].encode() for line in decision_lines("d50x1", 32)]
    total = args.warmup + args.requests
    probe = make_engine(url) if args.pg_url else None
    before: dict[int, int] = {}
    after: dict[int, int] = {}
    async with app.router.lifespan_context(app):
        decided = await _drive(
            app, [("/v1/decisions", bodies[n % len(bodies)]) for n in range(total)], 16
        )
        if any(status != 200 for status, _ in decided):
            raise SystemExit("a decision failed")
        ids = [orjson.loads(body)["event_id"] for _, body in decided]
        rewards = []
        for line in reward_lines(ids):
            path, body = line.split("\t", 1)
            rewards.append((path, body.encode()))
        await _drive(app, rewards[: args.warmup], args.concurrency)
        if probe is not None:
            before = _backend_cpu_ns(probe)
        cpu, wall = time.process_time(), time.perf_counter()
        answers = await _drive(app, rewards[args.warmup :], args.concurrency)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if probe is not None:
            after = _backend_cpu_ns(probe)
    bad = [status for status, _ in answers if status != 201]
    if bad:
        raise SystemExit(f"{len(bad)} non-201 answers, e.g. {bad[0]}")
    check = probe or make_engine(url)
    with check.connect() as connection:  # every acknowledged reward is stored, once
        stored = connection.exec_driver_sql("SELECT count(*) FROM rewards").scalar()
    check.dispose()
    if stored != total:
        raise SystemExit(f"{stored} rewards stored, {total} acknowledged")
    n = len(answers)
    figures = {"cpu_us": cpu / n * 1e6, "rate": n / wall}
    if probe is not None:
        server_ns = sum(ns - before.get(pid, 0) for pid, ns in after.items())
        figures["server_us"] = server_ns / n / 1e3
    return figures


def _one_round(args: argparse.Namespace) -> dict[str, float]:
    from _servers import write_policies

    with tempfile.TemporaryDirectory(prefix="bandit-reward-cpu-") as folder:
        policies = write_policies(Path(folder))
        url = args.pg_url or f"sqlite:///{folder}/cpu.db"
        return asyncio.run(_measure(url, policies, args))


def main() -> None:
    from decide_cpu import alternate_rounds

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--warmup", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pg-url", help="an empty PostgreSQL database (default: SQLite)")
    parser.add_argument("--compare-src", type=Path, help="the older package, run alternately")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_one_round(args)))
        return
    heading = f"reward, {args.concurrency} in flight, {args.requests} rewards a round"
    alternate_rounds(args, __file__, "reward", heading, show_load=True)


if __name__ == "__main__":
    main()
