"""Old vs new reward path: the same answers and the same stored rows.

    PYTHONPATH=<src> .venv/bin/python benchmarks/reward_rows_compare.py --store sqlite \
        --out /tmp/new-sqlite.json [--pg-url postgresql+psycopg://postgres@127.0.0.1/db]

Run it once with each source tree (``PYTHONPATH``) and compare the two files (they must
be equal). Through the HTTP app (in process): decisions on three policies, then a few
hundred rewards at once -- by slot and by candidate id, repeated idempotency keys (4 copies
at once), keyless repeats, out-of-range values, unknown events and slots, rewards racing
their decision -- then key conflicts and, after the short policy's window closed, late
rewards. Written out: every answer (without its ``received_at``) and every stored reward
row (without ``id`` and ``received_at``; a key the service made shown only as made;
``decision_created_at`` checked equal to its decision's ``created_at``), both sorted, as
concurrent requests finish in any order.

Lateness is also decided at commit time (store/writer.py), so a machine so loaded that the
first wave takes more than the short policy's 5 s window would flag rewards late in one run
only: rerun before reading a difference in ``late`` as a change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

# The source tree compared is the one on PYTHONPATH (ahead of this one).
ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))

import bandit_service  # noqa: E402
from bandit_service.app import create_app  # noqa: E402
from bandit_service.config import Settings  # noqa: E402
from bandit_service.store.database import make_engine, upgrade  # noqa: E402
from tests.e2e.asgi import asgi_client  # noqa: E402

POLICIES = {
    "default": 'holdout_share = 0\nvw_args = "--cb_explore_adf --epsilon 0.2"\nslots = 1\n',
    "bounded": 'holdout_share = 0\nvw_args = "--cb_explore_adf --epsilon 0.1"\nslots = 2\n'
    "reward_min = 0\nreward_max = 1\nreward_window_seconds = 60\n",
    "short": 'holdout_share = 0\nvw_args = "--cb_explore_adf --epsilon 0.1"\nslots = 1\n'
    "reward_window_seconds = 5\n",
}
CANDIDATES = [{"id": f"c{i}", "features": {"topic": f"t{i % 3}"}} for i in range(5)]


async def run(url: str, policies_dir: Path) -> dict[str, Any]:
    settings = Settings(database_url=url, policies_dir=policies_dir, max_body_bytes=64 * 1024)
    answers: list[tuple[str, int, Any]] = []

    async def post(key: str, path: str, body: dict[str, Any]) -> None:
        response = await client.post(path, json=body)
        data = response.json()
        if isinstance(data, dict):
            data.pop("received_at", None)
        if key.startswith("decide"):
            data = None  # the decision itself (random choice) is not what is compared
        answers.append((key, response.status_code, data))

    async with asgi_client(create_app(settings)) as client:
        events = {f"{p}-{i}": p for p in POLICIES for i in range(20)}
        await asyncio.gather(
            *(
                post(f"decide {e}", "/v1/decisions", {
                    "event_id": e, "policy": p, "candidates": CANDIDATES,
                    "slots": 2 if p == "bounded" else 1,
                })
                for e, p in events.items()
            )
        )  # fmt: skip
        calls = []
        for i, (e, p) in enumerate(events.items()):
            path = f"/v1/decisions/{e}/rewards"
            calls.append(post(f"slot0 {e}", path, {"value": 0.5, "slot": 0}))
            calls.append(post(f"byid {e}", path, {"value": 0.25, "id": "c0"}))
            calls += [post(f"key {e}", path, {"value": 1, "reward_id": "k-1"}) for _ in range(4)]
            calls.append(post(f"nokey {e}", path, {"value": -0.5 if p != "bounded" else 0}))
            calls.append(post(f"nokey2 {e}", path, {"value": 0.75, "kind": "satisfaction"}))
            calls.append(post(f"range {e}", path, {"value": 5}))
            calls.append(post(f"badslot {e}", path, {"value": 0.5, "slot": 9}))
            calls.append(post(f"unknown {i}", f"/v1/decisions/nope-{i}/rewards", {"value": 1}))
            if p == "bounded":
                calls.append(post(f"slot1 {e}", path, {"value": 1, "slot": 1, "reward_id": "s1"}))
            race = f"race-{i}"
            calls.append(post(f"race {race}", f"/v1/decisions/{race}/rewards", {"value": 1}))
            decide = {"event_id": race, "candidates": CANDIDATES}
            calls.append(post(f"decide {race}", "/v1/decisions", decide))
        await asyncio.gather(*calls)
        for e in events:  # the key reused with other values: a conflict
            body = {"value": 0.5, "reward_id": "k-1"}
            await post(f"conflict {e}", f"/v1/decisions/{e}/rewards", body)
        await asyncio.sleep(6.5)  # the short policy's window (5 s + 1 s margin) closes
        await asyncio.gather(
            *(
                post(f"late {e}", f"/v1/decisions/{e}/rewards", {"value": 1, "reward_id": "late"})
                for e in events
            )
        )
    engine = make_engine(url)
    with engine.connect() as connection:
        created = dict(connection.execute(text("SELECT event_id, created_at FROM decisions")).all())
        rows = [
            dict(r._mapping)
            for r in connection.execute(
                text(
                    "SELECT event_id, slot, value, late, kind, reward_id, policy, "
                    "decision_created_at FROM rewards"
                )
            )
        ]
    engine.dispose()
    for row in rows:
        assert row.pop("decision_created_at") == created[row["event_id"]], row
        key = row["reward_id"]
        if key is not None and ":" not in key and len(key) == 36:
            row["reward_id"] = "<made>"
        row["late"] = bool(row["late"])
    normal = sorted(json.dumps(r, sort_keys=True) for r in rows)
    return {
        "answers": sorted(json.dumps(a, sort_keys=True) for a in answers),
        "rows": normal,
        "counts": {"answers": len(answers), "rows": len(rows)},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", choices=["sqlite", "postgres"], required=True)
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1/reward_x")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        policies = Path(tmp) / "policies"
        policies.mkdir()
        for name, body in POLICIES.items():
            (policies / f"{name}.toml").write_text(body)
        schema = None
        if args.store == "sqlite":
            url = f"sqlite:///{tmp}/bandit.db"
        else:
            schema = f"rc_{uuid.uuid4().hex[:12]}"
            admin = create_engine(args.pg_url)
            with admin.begin() as connection:
                connection.execute(text(f'CREATE SCHEMA "{schema}"'))
            url = (
                make_url(args.pg_url)
                .update_query_dict({"options": f"-csearch_path={schema}"})
                .render_as_string(hide_password=False)
            )
        try:
            upgrade(url)
            result = asyncio.run(run(url, policies))
        finally:
            if schema is not None:
                with admin.begin() as connection:
                    connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
                admin.dispose()
    args.out.write_text(json.dumps(result, indent=1))
    print(args.store, result["counts"], bandit_service.__file__)


if __name__ == "__main__":
    main()
