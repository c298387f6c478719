"""Where a serving process spends its CPU under load: py-spy samples one worker while wrk
drives it, then prints the functions that hold the GIL most (inclusive and self).

    .venv/bin/pip install py-spy        # not a project dependency: a profiling tool
    .venv/bin/python benchmarks/profile_service.py [--store sqlite|postgres]
        [--workload d50x1|d50x3|d500x5|catalog|reward] [--seconds 10] [--concurrency 16]

One uvicorn worker, so every sample is the serving process. ``--gil`` sampling counts only
the thread holding the GIL: Python CPU time, not threads waiting on fsync or a socket.
The raw stacks (collapsed format, for flamegraph.pl or speedscope) are kept with ``--raw``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _servers import private_postgres, start_service, write_policies
from http_load import (
    catalog_items,
    decision_lines,
    make_decisions,
    reward_lines,
    run_wrk,
    stock_catalog,
)

FRAME_LINE = re.compile(r":\d+\)")
FRAMEWORK = ("starlette/", "uvicorn/", "asyncio/", "threading.py", "concurrent/futures")


def summarize(raw: Path, top: int) -> None:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    # Bytes split at "\n" only: a frame name may hold \x1c or \x85 (native symbols), which
    # splitlines() also breaks at, or \r, which reading as text turns into a newline.
    for line in raw.read_bytes().decode(errors="replace").split("\n"):
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        n = int(count)
        total += n
        frames = [FRAME_LINE.sub(")", f) for f in stack.split(";")[1:]]  # drop the process
        for frame in set(frames):
            inclusive[frame] += n
        if frames:
            own[frames[-1]] += n
    print(f"{total} samples holding the GIL")
    print("\ninclusive (framework plumbing left out):")
    shown = 0
    for frame, n in inclusive.most_common():
        if any(part in frame for part in FRAMEWORK):
            continue
        print(f"  {n / total:6.1%}  {frame[:110]}")
        shown += 1
        if shown >= top:
            break
    print("\nself:")
    for frame, n in own.most_common(top // 2):
        print(f"  {n / total:6.1%}  {frame[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument(
        "--workload", default="d50x1", choices=["d50x1", "d50x3", "d500x5", "catalog", "reward"]
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--raw", type=Path, help="keep the collapsed stacks here")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bandit-prof-")))
        policies = write_policies(folder)
        url = (
            stack.enter_context(private_postgres()).url
            if args.store == "postgres"
            else f"sqlite:///{folder}/profile.db"
        )
        server = start_service("profiled", url, policies, workers=1)
        stack.callback(server.stop)
        requests = folder / "requests.txt"
        if args.workload == "reward":
            line = decision_lines("d50x1", 1)[0]
            ids = asyncio.run(make_decisions(server.url, line, 2000))
            requests.write_text("\n".join(reward_lines(ids)) + "\n")
        else:
            if args.workload == "catalog":  # one worker: it serves its own change at once
                stock_catalog(server.url, catalog_items(args.workload))
            requests.write_text("\n".join(decision_lines(args.workload, 32)) + "\n")
        run_wrk(server.url, requests, args.concurrency, 1, 10**7, folder / "warm.json")
        raw = args.raw or folder / "stacks.txt"
        profiler = subprocess.Popen(
            [
                spy,
                "record",
                "-p",
                str(server.pid),
                "-d",
                str(args.seconds + 1),
                "-r",
                "200",
                "-f",
                "raw",
                "-o",
                str(raw),
                "--nonblocking",
                "--gil",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        result = run_wrk(
            server.url, requests, args.concurrency, args.seconds, 10**7, folder / "run.json"
        )
        profiler.wait()
        print(
            f"{args.workload} on {args.store}, {args.concurrency} in flight: "
            f"{result['rate']:.0f} req/s, p50 {result['latency_us']['p50'] / 1000:.1f} ms "
            f"(while profiled)"
        )
        summarize(raw, args.top)


if __name__ == "__main__":
    main()
