"""Instructions a serving process spends per decision over HTTP, counted by callgrind.

    .venv/bin/python benchmarks/proto_http_instructions.py --compare-src DIR
        [--requests 400 1400] [--concurrency 64]

CPU time per request (``request_uvicorn_cpu.py``) moves by ±15% from round to round on
this shared 2-core machine (base against itself: per-round ratios 0.86-1.14), more than
most changes to the server layer. Instruction counts do not move with the machine's
load. This serves the package in DIR (``base``, the whole repository as ``git archive``
makes it) and the current one, each as ``bandit-service serve --workers 1`` on a fresh
SQLite file with metrics in multiprocess mode (as with ``--workers 2``) under
``valgrind --tool=callgrind``, sends each server ``--requests`` 50 x 1 decisions (two
counts; a fresh server for each) over keep-alive connections, ``--concurrency`` in
flight, stops it and reads its instruction count. The difference between the two counts
divided by the difference in requests is the server's user-space instructions per
decision; start-up, warm-up and shutdown cancel out. System calls are not counted (the
kernel's share, ``sys`` time, is the same for both sides while the writes are). All
four servers run at once: under valgrind a run takes minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _servers import free_port, wait_http, write_policies
from http_load import decision_lines

ROOT = Path(__file__).resolve().parent.parent


async def _drive(port: int, bodies: list[bytes], count: int, concurrency: int) -> int:
    """``count`` decisions, ``concurrency`` connections each sending its next request when
    its previous answer has been read; returns how many were answered 200."""
    left = count
    ok = 0

    async def connection(offset: int) -> None:
        nonlocal left, ok
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        n = offset
        while left > 0:
            left -= 1
            body = bodies[n % len(bodies)]
            n += 1
            writer.write(
                b"POST /v1/decisions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json"
                b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"content-length: (\d+)", head, re.I)
            await reader.readexactly(int(length.group(1)) if length else 0)
            ok += head.startswith(b"HTTP/1.1 200 ")
        writer.close()

    await asyncio.gather(*(connection(i * 7) for i in range(concurrency)))
    return ok


def _one(name: str, source: Path, requests: int, concurrency: int) -> tuple[str, int, int, int]:
    """(name, requests, answered 200, instructions) of one server under callgrind."""
    folder = Path(tempfile.mkdtemp(prefix=f"bandit-instr-{name}-"))
    policies = write_policies(folder)
    (folder / "metrics").mkdir()
    env = {
        **os.environ,
        "BANDIT_DATABASE_URL": f"sqlite:///{folder}/s.db",
        "BANDIT_POLICIES_DIR": str(policies),
        "BANDIT_TRAINER": "off",
        "PYTHONPATH": str(source),
        "PROMETHEUS_MULTIPROC_DIR": str(folder / "metrics"),
    }
    cli = [sys.executable, "-m", "bandit_service.cli"]
    subprocess.run([*cli, "migrate"], env=env, cwd=source, check=True, capture_output=True)
    port = free_port()
    log = folder / "valgrind.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={folder}/callgrind.out",
             *cli, "serve", "--port", str(port), "--workers", "1", "--log-level", "warning"],
            env=env, cwd=source, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}", "/healthz", timeout=900, proc=proc)
        bodies = [line.split("\t", 1)[1].encode() for line in decision_lines("d50x1", 64)]
        asyncio.run(_drive(port, bodies, 200, concurrency))  # warm-up
        ok = asyncio.run(_drive(port, bodies, requests, concurrency))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=900)
    found = re.search(r"Collected : (\d+)", log.read_text())
    if found is None:
        raise RuntimeError(f"no instruction count in {log}")
    return name, requests, ok, int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare-src", type=Path, required=True)
    parser.add_argument("--requests", type=int, nargs=2, default=[400, 1400])
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    sources = {"base": args.compare_src.resolve(), "current": ROOT}
    jobs = [(name, src, n) for name, src in sources.items() for n in args.requests]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        done = list(pool.map(lambda job: _one(*job, args.concurrency), jobs))
    counts: dict[str, dict[int, int]] = {}
    for name, requests, ok, instructions in done:
        print(f"{name:8s} {requests:5d} decisions ({ok} answered 200): "
              f"{instructions:,} instructions", flush=True)  # fmt: skip
        if ok != requests:
            raise SystemExit(f"{name}: {requests - ok} answers were not 200")
        counts.setdefault(name, {})[requests] = instructions
    low, high = args.requests
    per = {name: (c[high] - c[low]) / (high - low) for name, c in counts.items()}
    for name, value in per.items():
        print(f"  {name:8s} {value:,.0f} instructions a decision")
    print(f"  current / base: {per['current'] / per['base']:.3f}")


if __name__ == "__main__":
    main()
