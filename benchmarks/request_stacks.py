"""Where a serving process's GIL time goes, from py-spy raw (collapsed) stacks.

    .venv/bin/python benchmarks/request_stacks.py STACKS.txt [--top 40] [--match TEXT]

Prints self time by file (the innermost frame's module), self time by function, and
inclusive time by function, as shares of all samples. With ``--match``, only the samples
whose stack contains TEXT. Made for ``request_uvicorn_cpu.py --profile`` (or any
``py-spy record -f raw`` output); samples with no Python frame below the event loop's
``run`` are the loop's own C code (uvloop: polling, socket reads and writes, callbacks).
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

_LINE = re.compile(r" \(([^():]*?)(?::\d+)?\)$")


def _frame(text: str) -> tuple[str, str]:
    """(function, file) of one frame, line numbers dropped."""
    found = _LINE.search(text)
    if not found:
        return text, "?"
    where = found.group(1)
    for marker in ("site-packages/", "python3.11/", "wt-request/", "base-request/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return text[: found.start()], where


# Self time bucketed by who owns the code (``--groups``): first match wins.
GROUPS = (
    ("engine + VW (engine/, learners/, domain, policy, holdout)",
     ("bandit_service/engine/", "bandit_service/learners/", "bandit_service/domain.py",
      "bandit_service/policy.py", "bandit_service/holdout.py", "random.py", "<string>")),
    ("store writer (store/, psycopg, SQLAlchemy)",
     ("bandit_service/store/", "psycopg", "sqlalchemy/")),
    ("uvicorn protocol + event loop (uvloop C under Runner.run)",
     ("uvicorn/", "asyncio/")),
    ("Starlette / FastAPI layers", ("starlette/", "fastapi/")),
    ("request glue: api/, ops/, service, identifiers, candidate sets, app",
     ("bandit_service/",)),
    ("prometheus_client", ("prometheus_client/",)),
)  # fmt: skip


def _group(where: str) -> str:
    for name, prefixes in GROUPS:
        if any(where.startswith(p) or p in where for p in prefixes):
            return name
    return "other (stdlib, threads, logging)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stacks", type=Path)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--match", help="only samples whose stack contains this")
    args = parser.parse_args()
    by_file: collections.Counter[str] = collections.Counter()
    groups: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in args.stacks.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        if args.match and args.match not in stack:
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")[1:]]
        if not frames:
            continue
        function, where = frames[-1]
        by_file[where] += n
        groups[_group(where)] += n
        own[f"{function} ({where})"] += n
        for name in {f"{fn} ({wh})" for fn, wh in frames}:
            inclusive[name] += n
    print(f"{total} samples")
    tables = (("self by owner", groups), ("self by file", by_file),
              ("self by function", own), ("inclusive", inclusive))  # fmt: skip
    for title, counter in tables:
        print(f"\n{title}:")
        for name, n in counter.most_common(args.top):
            print(f"  {n / total:6.1%}  {name[:120]}")


if __name__ == "__main__":
    main()
