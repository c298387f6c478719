"""CPU per request through the service's HTTP protocol, in one process, without sockets.

    .venv/bin/python benchmarks/proto_protocol_cpu.py [--workload d50x1|reward]
        [--concurrency 64] [--requests 4000] [--rounds 7] [--compare-src DIR]

``request_uvicorn_cpu.py`` measures a serving process under ``wrk``; on this shared
2-core machine its rounds move by ±15% with the other work on the box, more than the
server layer's share of a decision. This script keeps what that layer does and drops
what it cannot change: uvicorn's protocol class the service serves with
(``ops/protocol.CoalescingHttpToolsProtocol``, its cycle, uvicorn's parser callbacks,
the direct route, the app) is fed raw HTTP/1.1 requests by ``--concurrency`` keep-alive
"connections" whose transports are plain objects: a connection sends its next request
(``data_received``, from the event loop) when the answer to the previous one has been
written. No sockets, so no system calls for them and none of the client's CPU. The
store is a fresh SQLite file, metrics in multiprocess mode (as ``serve --workers 2``).
Process CPU time (every thread: loop, engine, group-commit writer) per request.

``--compare-src DIR`` runs the package in DIR in alternate rounds (each round a fresh
subprocess), as ``decide_cpu.py`` does. CPU time still moves with the machine's load
(rounds within ±15% while other work ran); instruction counts do not. For a figure that
other work cannot move, count one round's instructions with callgrind at two request
counts and divide the difference (start-up cancels out), e.g. for the package in DIR:

    PYTHONPATH=DIR valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        .venv/bin/python benchmarks/proto_protocol_cpu.py --child --requests 300 --warmup 200
    (the same with --requests 1100; (Ir(1100) - Ir(300)) / 800 instructions a request;
    for rewards add --workload reward --decisions 1300 to both)

DIR must hold the whole repository (the migrations too), as ``git archive`` makes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decide_cpu import _bodies, alternate_rounds


def _request(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: bench\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class _Transport:
    """What the protocol writes to: each answer (one write starting with the status line:
    both versions write head and body together) makes the connection send its next
    request, from the loop."""

    def __init__(self, connection: _Connection, port: int) -> None:
        self.connection = connection
        self.port = port
        self.closing = False

    def write(self, data: bytes) -> None:
        if data[:9] == b"HTTP/1.1 ":
            self.connection.answered(data)

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return ("127.0.0.1", 8000)
        if name == "peername":
            return ("127.0.0.1", self.port)
        return default


class _Connection:
    def __init__(self, driver: _Driver, protocol: Any, port: int) -> None:
        self.driver = driver
        self.protocol = protocol
        protocol.connection_made(_Transport(self, port))

    def send_next(self) -> None:
        raw = self.driver.next_request()
        if raw is not None:
            self.protocol.data_received(raw)

    def answered(self, data: bytes) -> None:
        self.driver.statuses.append(int(data[9:12]))
        self.driver.loop.call_soon(self.send_next)


class _Driver:
    def __init__(self, loop: asyncio.AbstractEventLoop, requests: list[bytes], count: int):
        self.loop = loop
        self.requests = requests
        self.left = count
        self.sent = 0
        self.statuses: list[int] = []
        self.done = loop.create_future()
        self.count = count

    def next_request(self) -> bytes | None:
        if len(self.statuses) >= self.count and not self.done.done():
            self.done.set_result(None)
        if self.left <= 0:
            return None
        self.left -= 1
        raw = self.requests[self.sent % len(self.requests)]
        self.sent += 1
        return raw


async def _run(protocol_class: Any, config: Any, state: Any, requests: list[bytes], count: int,
               concurrency: int) -> list[int]:  # fmt: skip
    loop = asyncio.get_running_loop()
    driver = _Driver(loop, requests, count)
    connections = [
        _Connection(driver, protocol_class(config, state, {}, _loop=loop), 40000 + n)
        for n in range(concurrency)
    ]
    for connection in connections:
        connection.send_next()
    await driver.done
    for connection in connections:
        connection.protocol.connection_lost(None)
    return driver.statuses


async def _measure(url: str, policies: Path, args: argparse.Namespace) -> dict[str, float]:
    import uvicorn
    from uvicorn.server import ServerState

    from bandit_service.app import create_app
    from bandit_service.config import Settings
    from bandit_service.ops import protocol
    from bandit_service.store.database import upgrade

    upgrade(url)
    app = create_app(Settings(database_url=url, policies_dir=policies, trainer="off"))
    config = uvicorn.Config(app, http=protocol.PROTOCOL, access_log=False, log_level="warning",
                            lifespan="off")  # fmt: skip
    config.load()
    state = ServerState()
    state.default_headers = [(b"date", b"Mon, 23 Nov 2026 14:00:00 GMT")]
    state.default_headers += config.encoded_headers
    decisions = _bodies("d50x1", 32)
    async with app.router.lifespan_context(app):
        if args.workload == "reward":
            total = max(args.warmup + args.requests, args.decisions)
            made = [
                _request("/v1/decisions", decisions[n % 32][:-1] + b',"event_id":"ev-%d"}' % n)
                for n in range(total)
            ]
            await _run(protocol.CoalescingHttpToolsProtocol, config, state, made, total,
                       args.concurrency)  # fmt: skip
            requests = [
                _request(f"/v1/decisions/ev-{n}/rewards", b'{"value": 1.0}') for n in range(total)
            ]
        else:
            requests = [_request("/v1/decisions", body) for body in decisions]
        run = protocol.CoalescingHttpToolsProtocol
        await _run(run, config, state, requests[: args.warmup] if args.workload == "reward"
                   else requests, args.warmup, args.concurrency)  # fmt: skip
        measured = requests[args.warmup :] if args.workload == "reward" else requests
        cpu, wall = time.process_time(), time.perf_counter()
        statuses = await _run(run, config, state, measured, args.requests, args.concurrency)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    bad = [s for s in statuses if s not in (200, 201)]
    if bad:
        raise SystemExit(f"{len(bad)} non-2xx answers, e.g. {bad[0]}")
    n = len(statuses)
    return {"cpu_us": cpu / n * 1e6, "rate": n / wall}


def _one_round(args: argparse.Namespace) -> dict[str, float]:
    from _servers import write_policies

    with tempfile.TemporaryDirectory(prefix="bandit-proto-") as folder:
        metrics_dir = Path(folder) / "metrics"
        metrics_dir.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # before the app's import
        policies = write_policies(Path(folder))
        import uvloop

        return uvloop.run(_measure(f"sqlite:///{folder}/cpu.db", policies, args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["d50x1", "reward"], default="d50x1")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--warmup", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--decisions", type=int, default=0,
                        help="reward: decisions made first (at least warmup + requests); "
                        "the same for two request counts, to subtract their cost")  # fmt: skip
    parser.add_argument("--compare-src", type=Path, help="the older package, run alternately")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.pg_url = None
    if args.child:
        print(json.dumps(_one_round(args)))
        return
    unit = "reward" if args.workload == "reward" else "decision"
    heading = (f"{args.workload} through the protocol, {args.concurrency} connections, "
               f"{args.requests} requests a round")  # fmt: skip
    alternate_rounds(args, __file__, unit, heading, show_load=True)


if __name__ == "__main__":
    main()
