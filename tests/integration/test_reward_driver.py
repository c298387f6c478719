"""The reward path through the driver (repository.find_decision_for_reward and the
driver branch of insert_rewards) answers and stores exactly what the SQLAlchemy path does,
on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from bandit_service.errors import NotFound
from bandit_service.store import repository
from bandit_service.store.database import make_engine
from bandit_service.store.models import RewardRow
from tests.integration.test_retention import decision

NOW = 1_700_000_000.0


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def _seed(db: Engine, prefixes: list[str]) -> None:
    rows = []
    for prefix in prefixes:
        for i in range(4):
            row = decision(f"{prefix}-{i}", "p", NOW - i)
            if i == 3:
                row.update(deferred=True, activated_at=NOW + 5)
            rows.append(row)
    with Session(db) as session, session.begin():
        repository.insert_decisions(session, rows)


def _batch(prefix: str) -> list[dict[str, Any]]:
    """Writer-shaped rows: an integer value, a reward_id twice in the batch, late ones."""

    def row(i: int, n: int, value: Any, late: bool, kind: str = "primary") -> dict[str, Any]:
        return {
            "event_id": f"{prefix}-{i}", "slot": 0, "value": value,
            "received_at": NOW + n / 8, "late": late, "kind": kind,
            "reward_id": f"{prefix}-r{n}",
        }  # fmt: skip

    return [
        row(0, 0, 1, False), row(1, 1, 0.1, True), row(0, 0, 1, False),
        row(2, 2, -3.25, False, "satisfaction"), row(3, 3, 1e-300, True), row(1, 4, 2**40, False),
    ]  # fmt: skip


def _stored(db: Engine, prefix: str) -> list[tuple[Any, ...]]:
    with Session(db) as session:
        rows = session.scalars(
            select(RewardRow).where(RewardRow.event_id.like(f"{prefix}-%")).order_by(RewardRow.id)
        )
        return [
            (r.event_id.split("-", 1)[1], r.slot, r.value, type(r.value), r.received_at, r.late,
             r.kind, r.reward_id.split("-", 1)[1] if r.reward_id else None, r.policy,
             r.decision_created_at)
            for r in rows
        ]  # fmt: skip


def _insert(db: Engine, rows: list[dict[str, Any]]) -> set[str]:
    with Session(db) as session, session.begin():
        return repository.insert_rewards(session, rows)


def test_driver_insert_stores_what_sqlalchemy_stores(
    db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed(db, ["new", "old"])
    new = [_insert(db, _batch("new")), _insert(db, _batch("new")[:2])]  # the 2nd: replays
    with monkeypatch.context() as patch:
        patch.setattr(repository, "_REWARD_INSERT_SQL", {})  # the SQLAlchemy path
        old = [_insert(db, _batch("old")), _insert(db, _batch("old")[:2])]
    strip = [{key.split("-", 1)[1] for key in keys} for keys in new]
    assert strip == [{key.split("-", 1)[1] for key in keys} for keys in old]
    assert strip[0] == {"r0", "r1", "r2", "r3", "r4"} and strip[1] == set()
    assert _stored(db, "new") == _stored(db, "old")
    assert len(_stored(db, "new")) == 5


def test_driver_insert_refuses_an_unknown_event_and_writes_nothing(db: Engine) -> None:
    _seed(db, ["e"])
    rows = _batch("e")
    rows.insert(1, {**rows[0], "event_id": "missing", "reward_id": "x"})
    with pytest.raises(NotFound, match="missing"):
        _insert(db, rows)
    assert _stored(db, "e") == []


def test_lookup_answers_what_the_session_lookup_answers(db: Engine) -> None:
    _seed(db, ["l"])
    for event_id in ["l-0", "l-3", "nope"]:
        with Session(db) as session:
            expected = repository.decision_for_reward(session, event_id)
        found = repository.find_decision_for_reward(db, event_id)
        assert found == expected
        if expected is not None:
            assert {k: type(v) for k, v in found.items()} == {
                k: type(v) for k, v in expected.items()
            }
    # The connection goes back to the pool as it came (not in autocommit mode).
    with db.connect() as connection:
        raw = connection.connection.driver_connection
        if db.dialect.name == "postgresql":
            assert raw.autocommit is False
