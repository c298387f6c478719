"""Durability under faults: nothing the service acknowledged may be lost.

    .venv/bin/python benchmarks/durability.py kill9 [--store sqlite|postgres] [--seconds 5]
    .venv/bin/python benchmarks/durability.py pg-restart [--down 3] [--mode fast|immediate]

Both experiments run ``bandit-service serve`` (2 workers) and a load of ``--concurrency``
clients from this process, each looping: decide (50 candidates, 1 slot), then report a
reward with a value no other request uses. A decision counts as acknowledged when it got
a 200; a reward when it got a 201. After the fault, the store is read directly and every
acknowledged event id and every acknowledged reward (event id, slot, value) must be there.

* ``kill9``: SIGKILL the supervisor and every worker in the middle of the load (no
  shutdown hook runs), then check the store, then start the service again on the same store
  and check that it serves.
* ``pg-restart``: the service runs on a private, throwaway PostgreSQL cluster (never the
  shared server); the cluster is stopped (``pg_ctl -m fast``, or ``immediate``: a crash
  that recovers from WAL) for ``--down`` seconds and started again while the load goes on.
  Prints a per-second timeline of answers; requires: no 5xx other than 503, no hang, 2xx
  again within ``--recover-within`` seconds of PostgreSQL being back, nothing lost.

Exit status 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _servers import PrivatePostgres, Server, start_service, write_policies
from http_load import decision_lines

from bandit_service.store.database import make_engine
from bandit_service.store.models import DecisionRow, RewardRow

JSON = {"content-type": "application/json"}


@dataclass
class Tally:
    """What the clients saw: acknowledged writes and answers per second since ``t0``."""

    t0: float = field(default_factory=time.monotonic)
    decisions: set[str] = field(default_factory=set)
    rewards: list[tuple[str, int, float]] = field(default_factory=list)
    timeline: dict[int, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    bodies: dict[str, str] = field(default_factory=dict)  # one example body per answer kind

    def note(self, what: str, body: str = "") -> None:
        self.timeline[int(time.monotonic() - self.t0)][what] += 1
        self.bodies.setdefault(what, body[:300])


async def client_loop(
    url: str, body: bytes, stop: asyncio.Event, tally: Tally, values: itertools.count[int]
) -> None:
    """Decide, then reward what was decided, until told to stop. Never raises."""
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(15.0)) as client:
        while not stop.is_set():
            try:
                response = await client.post("/v1/decisions", content=body, headers=JSON)
            except httpx.HTTPError as exc:
                tally.note(f"decide:{type(exc).__name__}")
                await asyncio.sleep(0.05)  # the server is gone: do not spin
                continue
            tally.note(f"decide:{response.status_code}", response.text)
            if response.status_code != 200:
                await asyncio.sleep(0.01)
                continue
            event_id = response.json()["event_id"]
            tally.decisions.add(event_id)
            value = next(values) / 1e7  # unique per request, inside the policy's [-1, 1]
            try:
                response = await client.post(
                    f"/v1/decisions/{event_id}/rewards",
                    content=orjson.dumps({"value": value}),
                    headers=JSON,
                )
            except httpx.HTTPError as exc:
                tally.note(f"reward:{type(exc).__name__}")
                continue
            tally.note(f"reward:{response.status_code}", response.text)
            if response.status_code == 201:
                tally.rewards.append((event_id, response.json()["slot"], value))


def check_store(database_url: str, tally: Tally) -> list[str]:
    """Every acknowledged decision and reward must be in the store; returns the problems."""
    engine = make_engine(database_url)
    problems = []
    try:
        with engine.connect() as connection:
            stored: set[str] = set()
            acked = sorted(tally.decisions)
            for i in range(0, len(acked), 1000):
                chunk = acked[i : i + 1000]
                rows = connection.execute(
                    select(DecisionRow.event_id).where(DecisionRow.event_id.in_(chunk))
                )
                stored.update(r[0] for r in rows)
            stored_rewards: set[tuple[str, int, float]] = set()
            event_ids = sorted({r[0] for r in tally.rewards})
            for i in range(0, len(event_ids), 1000):
                rows = connection.execute(
                    select(RewardRow.event_id, RewardRow.slot, RewardRow.value).where(
                        RewardRow.event_id.in_(event_ids[i : i + 1000])
                    )
                )
                stored_rewards.update((r[0], r[1], r[2]) for r in rows)
    finally:
        engine.dispose()
    lost = tally.decisions - stored
    if lost:
        problems.append(f"{len(lost)} acknowledged decisions missing, e.g. {sorted(lost)[:3]}")
    lost_rewards = [r for r in tally.rewards if r not in stored_rewards]
    if lost_rewards:
        problems.append(f"{len(lost_rewards)} acknowledged rewards missing: {lost_rewards[:3]}")
    print(
        f"store check: {len(tally.decisions)} acknowledged decisions, {len(stored)} found; "
        f"{len(tally.rewards)} acknowledged rewards, "
        f"{len(tally.rewards) - len(lost_rewards)} found"
    )
    return problems


def print_timeline(tally: Tally, marks: dict[int, str]) -> None:
    kinds = sorted({k for counts in tally.timeline.values() for k in counts})
    print("second  " + "  ".join(f"{k:>16}" for k in kinds))
    for second in sorted(tally.timeline):
        counts = tally.timeline[second]
        note = marks.get(second, "")
        print(f"{second:>6}  " + "  ".join(f"{counts.get(k, 0):>16}" for k in kinds) + f"  {note}")
    for kind, body in tally.bodies.items():
        if body and not kind.endswith((":200", ":201")):
            print(f"  example {kind}: {body}")


async def run_load(url: str, concurrency: int, tally: Tally) -> tuple[asyncio.Event, Any]:
    body = decision_lines("d50x1", 1)[0].split("\t", 1)[1].encode()
    stop = asyncio.Event()
    values = itertools.count(1)
    tasks = asyncio.gather(
        *(client_loop(url, body, stop, tally, values) for _ in range(concurrency))
    )
    return stop, tasks


async def kill9(args: argparse.Namespace, folder: Path) -> list[str]:
    policies = write_policies(folder)
    pg: PrivatePostgres | None = None
    if args.store == "postgres":
        pg = PrivatePostgres()
        pg.start()
    try:
        url = pg.url if pg else f"sqlite:///{folder}/kill9.db"
        server = start_service("kill9", url, policies, args.workers)
        tally = Tally()
        stop, tasks = await run_load(server.url, args.concurrency, tally)
        await asyncio.sleep(args.seconds)
        killed_at = int(time.monotonic() - tally.t0)
        server.kill9()
        print(f"kill -9 of pids {server.pid} and its workers at {killed_at} s", flush=True)
        await asyncio.sleep(1.0)  # clients keep trying against the dead port
        stop.set()
        await tasks
        print_timeline(tally, {killed_at: "<- kill -9"})
        problems = check_store(url, tally)
        if not tally.decisions:
            problems.append("no decision was acknowledged before the kill: no evidence")
        restarted = start_service("kill9-again", url, policies, args.workers)
        try:
            async with httpx.AsyncClient(base_url=restarted.url) as client:
                body = decision_lines("d50x1", 1)[0].split("\t", 1)[1]
                response = await client.post("/v1/decisions", content=body, headers=JSON)
                print(f"after restart: decide -> {response.status_code}")
                if response.status_code != 200:
                    problems.append(f"restarted service answered {response.status_code}")
        finally:
            restarted.stop()
        return problems
    finally:
        if pg is not None:
            pg.cleanup()


async def pg_restart(args: argparse.Namespace, folder: Path) -> list[str]:
    policies = write_policies(folder)
    pg = PrivatePostgres()
    pg.start()
    server: Server | None = None
    try:
        server = start_service("pg-restart", pg.url, policies, args.workers)
        tally = Tally()
        stop, tasks = await run_load(server.url, args.concurrency, tally)
        readiness: list[tuple[int, int]] = []

        async def probe_ready() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
                while not stop.is_set():
                    with contextlib.suppress(httpx.HTTPError):
                        response = await client.get("/readyz")
                        readiness.append((int(time.monotonic() - tally.t0), response.status_code))
                    await asyncio.sleep(0.5)

        prober = asyncio.create_task(probe_ready())
        await asyncio.sleep(args.seconds)
        down_at = time.monotonic()
        await asyncio.to_thread(pg.stop, args.mode)
        print(f"PostgreSQL stopped ({args.mode}) after {down_at - tally.t0:.1f} s", flush=True)
        await asyncio.sleep(args.down)
        await asyncio.to_thread(pg.start)
        up_at = time.monotonic()
        print(f"PostgreSQL started again after {up_at - tally.t0:.1f} s", flush=True)
        await asyncio.sleep(args.after)
        stop.set()
        await tasks
        await prober
        marks = {
            int(down_at - tally.t0): "<- PostgreSQL stopped",
            int(up_at - tally.t0): "<- PostgreSQL started",
        }
        print_timeline(tally, marks)
        not_ready = sorted({s for s, code in readiness if code != 200})
        print(f"/readyz answered 503 during seconds {not_ready}")
        problems = check_store(pg.url, tally)
        bad = {
            k: n
            for counts in tally.timeline.values()
            for k, n in counts.items()
            if k.split(":")[1] not in ("200", "201", "503", "404")
        }
        if bad:
            problems.append(f"answers other than 2xx/503 during the outage: {bad}")
        recovered = [
            s
            for s, counts in tally.timeline.items()
            if s > up_at - tally.t0 and counts.get("decide:200", 0) > 0
        ]
        recovery = min(recovered) - (up_at - tally.t0) if recovered else None
        if recovery is None or recovery > args.recover_within:
            problems.append(f"no successful decision within {args.recover_within} s of restart")
        else:
            print(f"decisions succeed again {max(recovery, 0):.1f} s after PostgreSQL is back")
        return problems
    finally:
        if server is not None:
            server.stop()
        pg.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="experiment", required=True)
    k = sub.add_parser("kill9", help="SIGKILL the service under load")
    k.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    k.add_argument("--seconds", type=float, default=5.0, help="load before the kill")
    r = sub.add_parser("pg-restart", help="restart a private PostgreSQL under load")
    r.add_argument("--seconds", type=float, default=4.0, help="load before the stop")
    r.add_argument("--down", type=float, default=3.0, help="seconds PostgreSQL stays down")
    r.add_argument("--after", type=float, default=6.0, help="load after the restart")
    r.add_argument("--mode", choices=["fast", "immediate"], default="fast")
    r.add_argument("--recover-within", type=float, default=5.0)
    for p in (k, r):
        p.add_argument("--concurrency", type=int, default=16)
        p.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bandit-durability-") as folder:
        experiment = kill9 if args.experiment == "kill9" else pg_restart
        problems = asyncio.run(experiment(args, Path(folder)))
    for problem in problems:
        print(f"FAILED: {problem}")
    print("OK: nothing acknowledged was lost" if not problems else "FAILED")
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
