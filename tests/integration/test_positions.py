"""Log positions are never handed out twice, on both stores, even after the newest decisions
were removed (delete-user, retention): the trainer learns ``position > checkpoint``, so a
reused position would be skipped forever."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from bandit_service.store import repository
from bandit_service.store.database import downgrade, make_engine, upgrade
from bandit_service.store.models import DecisionRow, ModelCheckpointRow


def decision(event_id: str) -> dict[str, Any]:
    return {
        "event_id": event_id, "policy": "p", "policy_version": "v", "model_version": 0,
        "arm": "bandit", "user_key": None, "context": {}, "candidates": [{"id": "a"}],
        "slots": [{"slot": 0, "id": "a", "probability": 1.0, "pmf": [["a", 1.0]]}],
        "excluded": [], "created_at": 1.0, "deferred": False, "activated_at": None,
    }  # fmt: skip


def positions(session: Session) -> list[int]:
    return list(session.scalars(select(DecisionRow.position).order_by(DecisionRow.position)))


def test_positions_are_not_reused_after_the_newest_rows_go(database_url: str) -> None:
    db = make_engine(database_url)
    try:
        with Session(db) as session, session.begin():
            repository.insert_decisions(session, [decision("e1"), decision("e2")])
        with Session(db) as session, session.begin():
            first = positions(session)
            session.execute(delete(DecisionRow).where(DecisionRow.event_id == "e2"))
        with Session(db) as session, session.begin():
            repository.insert_decisions(session, [decision("e3")])
        with Session(db) as session:
            assert positions(session)[-1] > max(first)
    finally:
        db.dispose()


def test_the_sqlite_migration_starts_above_every_known_position(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0005_privacy")
    db = make_engine(url)
    try:
        with Session(db) as session, session.begin():
            repository.insert_decisions(session, [decision(f"e{i}") for i in range(3)])
            session.execute(delete(DecisionRow).where(DecisionRow.event_id == "e2"))
            # The trainer had learned up to e2 (position 3) before it was deleted.
            session.add(
                ModelCheckpointRow(
                    policy="p", model_key="m", policy_version="v", model_version=1,
                    position=3, learned_events=3, skipped_events=0, created_at=1.0, note="",
                    model=b"w",
                )
            )  # fmt: skip
        upgrade(url)
        with Session(db) as session, session.begin():
            repository.insert_decisions(session, [decision("after")])
        with Session(db) as session:
            got = dict(session.execute(select(DecisionRow.event_id, DecisionRow.position)).all())
            sql = session.execute(text("SELECT sql FROM sqlite_master WHERE name='decisions'"))
            assert "AUTOINCREMENT" in sql.scalar_one()
        assert got["after"] == 4  # e2's position 3 is gone but a checkpoint covers it
        with Session(db) as session, session.begin():
            session.execute(delete(DecisionRow).where(DecisionRow.event_id == "after"))
        downgrade(url, "0006_sqlite_positions")  # rebuilds the table: the counter stays
        with Session(db) as session, session.begin():
            repository.insert_decisions(session, [decision("after-downgrade")])
        with Session(db) as session:
            newest = session.scalar(select(func.max(DecisionRow.position)))
        assert newest == 5
        downgrade(url, "0005_privacy")
        upgrade(url)
    finally:
        db.dispose()
