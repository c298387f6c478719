"""A long fuzzing run of the public API: the contract test with many more examples.

    .venv/bin/python benchmarks/fuzz_contract.py [--examples 500]

Runs ``tests/contract/test_fuzz.py`` (schemathesis on the app's OpenAPI document: no 5xx,
documented statuses and schemas, every 4xx in the error shape) with ``--examples`` per
operation instead of the suite's 15, then prints how many requests were generated, per
operation and per status code. Exits non-zero if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=500, help="examples per operation")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "counts.json"
        env = {
            **os.environ,
            "BANDIT_FUZZ_EXAMPLES": str(args.examples),
            "BANDIT_FUZZ_REPORT": str(report),
        }
        command = [sys.executable, "-m", "pytest", "-p", "no:xdist", "-v",
                   "tests/contract/test_fuzz.py"]  # fmt: skip
        print(f"+ {' '.join(command)}  ({args.examples} examples per operation)", flush=True)
        code = subprocess.call(command, cwd=ROOT, env=env)  # pytest -v shows progress
        counts = json.loads(report.read_text()) if report.exists() else {}
    print(f"\ngenerated requests: {counts.get('requests', 0)}")
    for key in sorted(k for k in counts if k != "requests"):
        print(f"  {key}: {counts[key]}")
    return code


if __name__ == "__main__":
    sys.exit(main())
