"""Repository functions over a SQLAlchemy ``Session``. None of them commits."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from bandit_service.store.models import DecisionRow, MetaRow, RewardRow

DECISION_COLUMNS = [c.name for c in DecisionRow.__table__.columns if c.name != "position"]


def find_decisions(session: Session, event_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Stored decisions among ``event_ids``, as column dicts keyed by event id."""
    ids = list(event_ids)
    if not ids:
        return {}
    rows = session.execute(select(DecisionRow).where(DecisionRow.event_id.in_(ids))).scalars()
    return {row.event_id: decision_as_dict(row) for row in rows}


def decision_as_dict(row: DecisionRow) -> dict[str, Any]:
    return {name: getattr(row, name) for name in ["position", *DECISION_COLUMNS]}


def get_decision(session: Session, event_id: str) -> dict[str, Any] | None:
    row = session.execute(
        select(DecisionRow).where(DecisionRow.event_id == event_id)
    ).scalar_one_or_none()
    return decision_as_dict(row) if row is not None else None


def insert_decisions(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        session.execute(insert(DecisionRow), list(rows))


def insert_rewards(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        session.execute(insert(RewardRow), list(rows))


def rewards_for(session: Session, event_id: str) -> list[dict[str, Any]]:
    rows = session.execute(
        select(RewardRow).where(RewardRow.event_id == event_id).order_by(RewardRow.id)
    ).scalars()
    return [
        {
            "slot": r.slot,
            "value": r.value,
            "received_at": r.received_at,
            "late": r.late,
        }
        for r in rows
    ]


def activate(session: Session, event_id: str, at: float) -> None:
    """Mark a deferred decision activated (first activation wins; repeats change nothing)."""
    session.execute(
        update(DecisionRow)
        .where(DecisionRow.event_id == event_id, DecisionRow.activated_at.is_(None))
        .values(activated_at=at)
    )


def get_or_create_meta(session: Session, key: str, factory: Callable[[], str]) -> str:
    """Read a service-wide value, creating it on first use (race-safe via the primary key)."""
    row = session.get(MetaRow, key)
    if row is not None:
        return row.value
    session.add(MetaRow(key=key, value=factory()))
    session.flush()
    return session.get(MetaRow, key).value  # type: ignore[union-attr]
