"""``decide_cpu.py``'s in-process CPU per decision, old and new run *at the same time*.

    .venv/bin/python benchmarks/request_cpu_pair.py --compare-src DIR [--rounds 7]
        [--pg-url postgresql+psycopg://postgres@127.0.0.1] [decide_cpu.py options...]

``decide_cpu.py --compare-src`` runs base and current one after the other; on a machine
shared with other work their rounds then see different loads (per-round ratios of two
identical packages ranged 0.77-1.29 here). This runs both children at once, each on its
own fresh PostgreSQL database (or SQLite file), so whatever else the machine does hits
both alike; the per-round ratio is the figure to read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from request_uvicorn_cpu import _create_db, _drop_db

DECIDE_CPU = Path(__file__).resolve().parent / "decide_cpu.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare-src", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pg-url", help="a PostgreSQL server URL (default: SQLite files)")
    args, rest = parser.parse_known_args()
    tag = uuid.uuid4().hex[:8]
    ratios: list[float] = []
    figures: dict[str, list[float]] = {"base": [], "current": []}
    for number in range(args.rounds):
        running = {}
        made = []
        for name in ("base", "current"):
            env = dict(os.environ)
            if name == "base":
                env["PYTHONPATH"] = str(args.compare_src.resolve())
            command = [sys.executable, str(DECIDE_CPU), "--child", *rest]
            if args.pg_url:
                db = f"request_pair_{name}_{tag}_{number}"
                command += ["--pg-url", _create_db(args.pg_url, db)]
                made.append(db)
            running[name] = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        cpu = {}
        for name, proc in running.items():
            out, err = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{err[-3000:]}")
            cpu[name] = json.loads(out.strip().splitlines()[-1])["cpu_us"]
            figures[name].append(cpu[name])
        for db in made:
            _drop_db(str(args.pg_url), db)
        ratios.append(cpu["current"] / cpu["base"])
        print(f"round {number + 1}: base {cpu['base']:.0f} µs, current {cpu['current']:.0f} µs "
              f"CPU/decision, ratio {ratios[-1]:.2f}", flush=True)  # fmt: skip
    print(f"\nmedians of {args.rounds} rounds: base {statistics.median(figures['base']):.0f} µs, "
          f"current {statistics.median(figures['current']):.0f} µs CPU/decision; "
          f"current/base per round {min(ratios):.2f}-{max(ratios):.2f}, "
          f"median {statistics.median(ratios):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
