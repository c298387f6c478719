"""Migration 0004 (compact decision log) on SQLite and PostgreSQL: existing decisions are
rewritten and read back unchanged; downgrading restores the previous columns exactly."""

from __future__ import annotations

from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from bandit_service.store import compact, repository
from bandit_service.store.database import downgrade, make_engine, upgrade

Json = sa.JSON().with_variant(JSONB(), "postgresql")
CATALOGUE = [{"id": f"c{i}", "features": {"k": f"v{i}", "n": i / 3}} for i in range(5)]


def _json(value: Any) -> Any:
    """A JSON column read with plain SQL: text on SQLite, decoded on PostgreSQL."""
    return orjson.loads(value) if isinstance(value, str) else value


def _slot(k: int, pmf: list[list[Any]], chosen: str) -> dict[str, Any]:
    p = dict((cid, p) for cid, p in pmf)[chosen]
    return {"slot": k, "slot_id": str(k), "slot_features": {"pos": k}, "id": chosen,
            "probability": p, "explored": False, "pmf": pmf, "model_id": None}  # fmt: skip


def _old_rows() -> list[dict[str, Any]]:
    """Decisions as revision 0003 stored them: two sharing a catalogue, one with exclusions
    and two slots (non-contiguous eligibility), one pinned, one whose distribution names an
    id missing from its candidates (kept as written)."""
    third = 1 / 3
    rows = [
        ([_slot(0, [[c["id"], 0.2] for c in CATALOGUE], "c1")], CATALOGUE),
        ([_slot(0, [[c["id"], 0.2] for c in CATALOGUE], "c4")], CATALOGUE),
        (
            [
                _slot(0, [["c0", 0.5], ["c1", 0.25], ["c3", 0.25]], "c0"),
                _slot(1, [["c1", third], ["c3", third], ["c4", third]], "c3"),
            ],
            CATALOGUE,
        ),
        ([_slot(0, [["c2", 1.0]], "c2")], CATALOGUE[:3]),
        ([_slot(0, [["c0", 0.5], ["gone", 0.5]], "c0")], CATALOGUE[:1]),
    ]
    return [
        {
            "event_id": f"e{i}",
            "policy": "p",
            "policy_version": "v1",
            "model_version": 0,
            "arm": "bandit",
            "user_key": None,
            "context": {"i": i},
            "candidates": candidates,
            "slots": slots,
            "excluded": ["c2"] if i == 2 else [],
            "created_at": 100.0 + i,
            "deferred": False,
            "activated_at": None,
        }
        for i, (slots, candidates) in enumerate(rows)
    ]


def _decisions_table() -> sa.Table:
    return sa.Table(
        "decisions", sa.MetaData(),
        sa.Column("position", sa.BigInteger, primary_key=True),
        *(sa.Column(name, sa.String) for name in
          ["event_id", "policy", "policy_version", "arm", "user_key"]),
        sa.Column("model_version", sa.Integer),
        *(sa.Column(name, Json) for name in ["context", "candidates", "slots", "excluded"]),
        sa.Column("created_at", sa.Float), sa.Column("deferred", sa.Boolean),
        sa.Column("activated_at", sa.Float),
    )  # fmt: skip


def test_upgrade_rewrites_and_downgrade_restores_existing_decisions(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    upgrade(url, "0003")
    engine = make_engine(url)
    old = _old_rows()
    table = _decisions_table()
    rewards = sa.table(
        "rewards", *(sa.column(n) for n in ["event_id", "slot", "value", "received_at", "late"])
    )
    with engine.begin() as connection:
        connection.execute(sa.insert(table), old)
        connection.execute(
            sa.insert(rewards),
            [{"event_id": "e2", "slot": 1, "value": 1.0, "received_at": 101.0, "late": False}],
        )

    upgrade(url)
    with Session(engine) as session:
        keys = set(session.scalars(sa.text("SELECT key FROM candidate_sets")))
        read = repository.decisions_after(session, "p", 0, 100)
        stored = {
            event_id: slots
            for event_id, slots in session.execute(sa.text("SELECT event_id, slots FROM decisions"))
        }
    assert len(keys) == 3  # the shared catalogue once, plus two others
    for before, after in zip(old, read, strict=True):
        assert after["candidates"] == before["candidates"]
        assert after["slots"] == before["slots"]  # exact probabilities, same ids and order
    assert read[2]["rewards"][0]["value"] == 1.0  # rewards survived the table rewrite
    compact_slots = _json(stored["e2"])
    assert [s["eligible"] for s in compact_slots] == [[0, 2, 3, 4], [1, 2, 3, 5]]
    assert "pmf" in _json(stored["e4"])[0]  # kept as written: "gone" is unknown

    # New writes share the stored catalogue.
    with Session(engine) as session, session.begin():
        repository.insert_decisions(session, [{**old[0], "event_id": "new"}])
    with Session(engine) as session:
        assert len(set(session.scalars(sa.text("SELECT key FROM candidate_sets")))) == 3
        assert repository.get_decision(session, "new")["slots"] == old[0]["slots"]  # type: ignore[index]
        session.execute(sa.text("DELETE FROM decisions WHERE event_id = 'new'"))
        session.commit()

    downgrade(url, "0003")
    with engine.connect() as connection:
        restored = connection.execute(sa.select(table).order_by(table.c.position)).all()
        reward_count = connection.execute(sa.text("SELECT count(*) FROM rewards")).scalar()
        tables = set(sa.inspect(connection).get_table_names())
    engine.dispose()
    assert "candidate_sets" not in tables and reward_count == 1
    for before, after in zip(old, restored, strict=True):
        assert after.candidates == before["candidates"]
        assert after.slots == before["slots"]
        assert after.context == before["context"]


def test_compact_codec_round_trips() -> None:
    assert compact.runs([0, 1, 2, 5, 7, 8]) == [0, 3, 5, 6, 7, 9]
    assert compact.indices([0, 3, 5, 6, 7, 9]) == [0, 1, 2, 5, 7, 8]
    assert compact.runs([3, 1]) == [3, 4, 1, 2]  # any order survives
    assert compact.indices(compact.runs([3, 1])) == [3, 1]
    values = [0.1, 1 / 3, 5e-324, 0.0, 1.0, 0.30000000000000004]
    assert compact.unpack_probabilities(compact.pack_probabilities(values)) == values
    key, text = compact.candidate_set(CATALOGUE)
    assert compact.candidate_set([dict(c) for c in CATALOGUE]) == (key, text)
    assert compact.candidate_set(CATALOGUE[:4])[0] != key
