"""CPU per request that the framework costs (middlewares, routing, the route's wrapper),
against the bare FastAPI floor app, in one process, no sockets.

    .venv/bin/python benchmarks/framework_overhead.py [--concurrency 64] [--requests 5000]
        [--rounds 5] [--compare-src DIR]

Each variant serves ``POST /v1/decisions`` (and ``POST /v1/decisions/{event_id}/rewards``)
with a handler that only reads the body and answers a small JSON document:

* ``floor``: ``benchmarks/_floor_app.py`` (FastAPI with nothing added);
* ``service``: the service's own app (``create_app``: every middleware, router and route
  wrapper it has), with the two routes' fast paths replaced by that trivial handler, so
  what remains is exactly what the service adds around a request;
* ``base`` (``--compare-src DIR``): the same for the package found in DIR.

The difference between ``service`` and ``floor`` is the service's framework overhead per
request; issue 8 compares the service against the floor. Process CPU time per request,
medians over rounds (each round a fresh subprocess, variants alternating).
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

from decide_cpu import _drive as drive  # the same in-process ASGI driver

_OK = b'{"ok":true}'
_BODY = b'{"policy":"default","candidates":[{"id":"a","features":{"x":1}}]}'
_REWARD = b'{"value":1.0}'


async def _drive(app: Any, requests: int, concurrency: int, reward: bool) -> list[int]:
    path = "/v1/decisions/0123456789abcdef0123456789abcdef/rewards" if reward else "/v1/decisions"
    return await drive(app, [_REWARD if reward else _BODY], requests, concurrency, path)


def _service_app(folder: Path) -> Any:
    """The service's app with trivial fast paths on the two hot routes."""
    from _servers import write_policies
    from fastapi import Request, Response

    from bandit_service.api import routes
    from bandit_service.app import create_app
    from bandit_service.config import Settings
    from bandit_service.store.database import upgrade

    async def trivial(request: Request) -> Response:
        await request.body()
        return Response(_OK, media_type="application/json")

    routes.decide.fast_path = trivial  # type: ignore[attr-defined]
    routes.reward.fast_path = trivial  # type: ignore[attr-defined]
    url = f"sqlite:///{folder}/overhead.db"
    upgrade(url)
    return create_app(
        Settings(database_url=url, policies_dir=write_policies(folder), trainer="off")
    )


async def _measure(variant: str, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(
        prefix="bandit-overhead-", ignore_cleanup_errors=True
    ) as folder:
        if variant == "floor":
            from _floor_app import app
        else:
            app = _service_app(Path(folder))
        async with app.router.lifespan_context(app):
            out: dict[str, float] = {}
            for reward in (False, True):
                await _drive(app, args.warmup, args.concurrency, reward)
                cpu = time.process_time()
                statuses = await _drive(app, args.requests, args.concurrency, reward)
                cpu = time.process_time() - cpu
                if any(s not in (200, 201) for s in statuses):
                    raise SystemExit(f"{variant}: non-200 answers: {set(statuses)}")
                out["reward_us" if reward else "decide_us"] = cpu / len(statuses) * 1e6
            return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compare-src", type=Path, help="an older package, run alternately")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_measure(args.child, args))))
        return
    variants: dict[str, Path | None] = {"floor": None, "service": None}
    if args.compare_src:
        variants["base"] = args.compare_src.resolve()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for round_number in range(args.rounds):
        for name, source in variants.items():
            env = dict(os.environ)
            if source is not None:
                env["PYTHONPATH"] = str(source)
            child = "floor" if name == "floor" else "service"
            command = [sys.executable, __file__, "--child", child, *sys.argv[1:]]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            results[name].append(figures)
            print(f"round {round_number + 1} {name:8s} decide {figures['decide_us']:6.0f} µs "
                  f"reward {figures['reward_us']:6.0f} µs CPU/request", flush=True)  # fmt: skip
    print(f"\n{args.concurrency} in flight, {args.requests} requests a route and round, "
          f"medians of {args.rounds} rounds (CPU µs per request):")  # fmt: skip
    floor = {k: statistics.median(r[k] for r in results["floor"]) for k in results["floor"][0]}
    for name, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        extra = {k: med[k] - floor[k] for k in med}
        print(f"  {name:8s} decide {med['decide_us']:6.0f} ({extra['decide_us']:+4.0f} over "
              f"floor)  reward {med['reward_us']:6.0f} ({extra['reward_us']:+4.0f})")  # fmt: skip


if __name__ == "__main__":
    main()
