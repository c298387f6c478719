"""Do two versions of the store's write path store the same bytes? (Not a benchmark: a
check, kept with the benchmarks that changed the write path.)

    PYTHONPATH=. .venv/bin/python benchmarks/pgwrite_compare.py --compare-src DIR \\
        [--pg-url postgresql+psycopg://postgres@127.0.0.1/postgres] [--decisions 300]

A few hundred decision rows are made once, by the real service (d50x1 and d500x5 shapes,
see ``pgwrite_append.capture_rows``), plus hand-made awkward ones (text needing escapes,
unicode, nested JSON, exact and non-finite floats, NULLs, a slot whose distribution names
an id outside its candidates, rows without ``context_line`` or ``deferred``). Each
version (the package in ``--compare-src`` and this one) then writes all of them through
``BatchWriter._commit``, in the same batches (sizes 1 to 64; fresh and looked-up
event ids; repeated event ids; batches with a reward and an activation too), into a
fresh SQLite file and a fresh PostgreSQL database, and every stored row of
``decisions``, ``candidate_sets`` and ``rewards`` is dumped as text (PostgreSQL: each
column ``::text``) and compared, with the writes' outcomes.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

AWKWARD = {
    "tab\there": "new\nline",
    "back\\slash": "\\N",
    'quote"': "ünïcödé ✓ \u2028",
    "nested": {"list": [1, 2.5, None, True, "\r\n"], "empty": {}},
    "big": 2**53 + 1,
    "small": 1e-300,
}


def make_rows(decisions: int) -> list[dict[str, Any]]:
    from pgwrite_append import capture_rows

    rows = capture_rows("d50x1", decisions * 2 // 3) + capture_rows("d500x5", decisions // 3)
    for n, row in enumerate(rows):
        row["event_id"] = f"e{n:04d}"
        row["created_at"] = 1_800_000_000.0 + n / 7
    odd = []
    for n in range(12):
        row = dict(rows[n])
        row["event_id"] = f"odd{n:02d}"
        row["context"] = {**AWKWARD, "n": n}
        row["excluded"] = ["a\tb", "c\\d"] if n % 2 else []
        row["user_key"] = None if n % 3 else "u\t1"
        row["activated_at"] = None if n % 2 else 1_800_000_000.5 + n
        row["deferred"] = bool(n % 2)
        if n % 4 == 0:
            row["context_line"] = "|c tab\there \\N new\nline"
        if n in (9, 11):  # not finite: stored as such (SQLite stores NULL for NaN)
            row["activated_at"] = float("inf") if n == 9 else float("nan")
        if n == 5:  # a distribution over an id outside the candidates: kept classic
            row["slots"] = [{**row["slots"][0], "pmf": [["nowhere", 1.0]]}]
        if n == 7:
            row["candidates"] = [{"id": "x", "features": {"f": 1.5}}, {"id": "y", "features": {}}]
            row["slots"] = [{"slot": 0, "id": "y", "probability": 0.25,
                             "pmf": [["x", 0.75], ["y", 0.25]]}]  # fmt: skip
        odd.append(row)
    # Rows of other column sets go in batches of their own (as the service never mixes).
    for n in range(4):
        row = dict(odd[n])
        row["event_id"] = f"plain{n}"
        row.pop("context_line", None)
        if n % 2:
            row.pop("deferred")
        odd.append(row)
    return rows + odd


def plan(rows: list[dict[str, Any]]) -> list[list[tuple[str, dict[str, Any], bool]]]:
    """The batches: (kind, payload, fresh) per write."""
    sizes = [1, 3, 8, 32, 2, 64, 5, 1, 17]
    batches: list[list[tuple[str, dict[str, Any], bool]]] = []
    main = [r for r in rows if not r["event_id"].startswith("plain")]
    start = 0
    n = 0
    while start < len(main):
        size = sizes[n % len(sizes)]
        chunk = main[start : start + size]
        fresh = n % 3 != 1  # every third batch looks its ids up, as a client's ids are
        batch = [("decision", row, fresh) for row in chunk]
        if n % 5 == 4:  # an earlier decision again (answered as stored), a reward, an activation
            earlier = main[start - 1]
            batch.append(("decision", earlier, False))
            batch.append(("reward", {
                "event_id": earlier["event_id"], "slot": 0, "value": 0.5,
                "received_at": earlier["created_at"] + 1, "kind": "primary",
                "reward_id": f"r{n}", "window_end": None}, False))  # fmt: skip
            batch.append(("activate", {"event_id": earlier["event_id"],
                                       "at": earlier["created_at"] + 2}, False))  # fmt: skip
        batches.append(batch)
        start += size
        n += 1
    for row in rows:
        if row["event_id"].startswith("plain"):
            batches.append([("decision", row, True)])
    return batches


def dump(url: str) -> dict[str, list[list[str | None]]]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    tables = {"decisions": "position", "candidate_sets": "key", "rewards": "id"}
    out: dict[str, list[list[str | None]]] = {}
    with engine.connect() as connection:
        for table, order in tables.items():
            empty = connection.execute(text(f"SELECT * FROM {table} LIMIT 0"))
            names = [column[0] for column in empty.cursor.description]
            if engine.dialect.name == "postgresql":
                select = ", ".join(f"{name}::text" for name in names)
            else:  # SQLite keeps what was written: the value and its storage class
                select = ", ".join(f"typeof({n}) || ':' || quote({n})" for n in names)
            rows = connection.execute(text(f"SELECT {select} FROM {table} ORDER BY {order}"))
            out[table] = [[*names]] + [list(r) for r in rows]
    engine.dispose()
    return out


def child(rows_file: Path, url: str) -> None:
    from bandit_service.store.database import make_engine, upgrade
    from bandit_service.store.writer import BatchWriter, _Write

    rows = pickle.loads(rows_file.read_bytes())
    upgrade(url)
    engine = make_engine(url)
    writer = BatchWriter(engine)
    outcomes = []
    for batch in plan(rows):
        writes = [_Write(kind, dict(payload), None, fresh)  # type: ignore[arg-type]
                  for kind, payload, fresh in batch]  # fmt: skip
        for result in writer._commit(writes):
            created = getattr(result, "created", None)
            outcomes.append(type(result).__name__ if created is None else created)
    writer._release_connection()
    engine.dispose()
    print(json.dumps({"outcomes": outcomes, "tables": dump(url)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare-src", type=Path, required=True)
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1/postgres",
                        help="a server where throwaway databases may be made")  # fmt: skip
    parser.add_argument("--decisions", type=int, default=300)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1])
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    failures = 0
    with tempfile.TemporaryDirectory(prefix="pgwrite-compare-") as folder:
        rows_file = Path(folder) / "rows.pickle"
        rows_file.write_bytes(pickle.dumps(make_rows(args.decisions)))
        admin = create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
        for store in ("sqlite", "postgresql"):
            results = {}
            for version, source in (("base", args.compare_src.resolve()), ("current", None)):
                if store == "sqlite":
                    url = f"sqlite:///{folder}/{version}.db"
                else:
                    name = f"pgwrite_cmp_{uuid.uuid4().hex[:8]}"
                    with admin.connect() as connection:
                        connection.execute(text(f'CREATE DATABASE "{name}"'))
                    url = make_url(args.pg_url).set(database=name).render_as_string(False)
                env = dict(os.environ)
                if source is not None:
                    env["PYTHONPATH"] = str(source)
                try:
                    out = subprocess.run(
                        [sys.executable, __file__, "--compare-src", str(args.compare_src),
                         "--child", str(rows_file), url],
                        env=env, capture_output=True, text=True, check=False,
                    )  # fmt: skip
                finally:
                    if store == "postgresql":
                        with admin.connect() as connection:
                            connection.execute(text(f'DROP DATABASE "{name}"'))
                if out.returncode != 0:
                    raise SystemExit(f"{version} on {store} failed:\n{out.stderr[-3000:]}")
                results[version] = json.loads(out.stdout.strip().splitlines()[-1])
            base, current = results["base"], results["current"]
            counts = {t: len(rows) - 1 for t, rows in current["tables"].items()}
            same = base == current
            failures += not same
            print(f"{store}: {'identical' if same else 'DIFFERENT'} "
                  f"({len(current['outcomes'])} writes; rows stored: {counts})")  # fmt: skip
            if not same:
                if base["outcomes"] != current["outcomes"]:
                    print("  outcomes differ")
                for table, rows in base["tables"].items():
                    other = current["tables"][table]
                    for a, b in zip(rows[1:], other[1:], strict=False):
                        if a != b:  # the first differing row: its differing columns
                            for name, x, y in zip(rows[0], a, b, strict=True):
                                if x != y:
                                    print(f"  {table}.{name}: {x!r:.200} vs {y!r:.200}")
                            break
                    if len(rows) != len(other):
                        print(f"  {table}: {len(rows)} rows vs {len(other)}")
        admin.dispose()
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
