"""Repository functions for issue 10 (rights and retention). None of them commits.

SQLite: deletion removes rewards before their decisions (the foreign key cascades, but
counting what went requires deleting them explicitly). PostgreSQL, whose partitioned log
has no foreign key: decisions first, then their rewards (see :func:`delete_user`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

from sqlalchemy import CursorResult, Delete, delete, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from bandit_service.store.models import (
    CandidateSetRow,
    DecisionRow,
    ModelCheckpointRow,
    RewardRow,
    UserOptOutRow,
)


def _deleted(session: Session, statement: Delete) -> int:
    result = session.execute(statement.execution_options(synchronize_session=False))
    return int(cast(CursorResult[Any], result).rowcount)


def drop_orphaned_sets(session: Session, keys: Iterable[str]) -> int:
    """Delete the candidate sets among ``keys`` that no decision references any more (a
    set is shared by every decision made over the same candidates). A decision written
    concurrently over a set deleted here fails its foreign key and is retried by the batch
    writer, which writes the set again."""
    wanted = sorted(set(keys))
    removed = 0
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        referenced = select(DecisionRow.candidate_set).where(DecisionRow.candidate_set.in_(chunk))
        removed += _deleted(
            session,
            delete(CandidateSetRow).where(
                CandidateSetRow.key.in_(chunk), CandidateSetRow.key.not_in(referenced)
            ),
        )
    return removed


def _partitioned(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _delete_rewards_of(session: Session, event_ids: list[str], *where: Any) -> int:
    removed = 0
    for start in range(0, len(event_ids), 1000):  # bounded IN lists
        chunk = event_ids[start : start + 1000]
        removed += _deleted(session, delete(RewardRow).where(RewardRow.event_id.in_(chunk), *where))
    return removed


def delete_user(session: Session, user_key: str, *, keep_opt_out: bool) -> dict[str, int]:
    """Remove every row of one user (by keyed hash); returns rows removed per table.

    PostgreSQL (no foreign key between the partitioned tables): the decisions go first and
    then their rewards, in that order, so that a reward being written concurrently either
    waits for this delete and is refused, or is committed before the rewards are deleted
    (see ``insert_rewards``)."""
    if _partitioned(session):
        gone = session.execute(
            delete(DecisionRow)
            .where(DecisionRow.user_key == user_key)
            .returning(DecisionRow.event_id, DecisionRow.candidate_set)
        ).all()
        sets = {row.candidate_set for row in gone}
        counts = {
            "decisions": len(gone),
            "rewards": _delete_rewards_of(session, sorted({row.event_id for row in gone})),
            "user_opt_outs": 0,
        }
    else:
        of_user = select(DecisionRow.event_id).where(DecisionRow.user_key == user_key)
        sets = set(
            session.scalars(
                select(DecisionRow.candidate_set).where(DecisionRow.user_key == user_key).distinct()
            )
        )
        counts = {
            "rewards": _deleted(session, delete(RewardRow).where(RewardRow.event_id.in_(of_user))),
            "decisions": _deleted(
                session, delete(DecisionRow).where(DecisionRow.user_key == user_key)
            ),
            "user_opt_outs": 0,
        }
    counts["candidate_sets"] = drop_orphaned_sets(session, sets)
    if not keep_opt_out:
        counts["user_opt_outs"] = _deleted(
            session, delete(UserOptOutRow).where(UserOptOutRow.user_key == user_key)
        )
    return counts


def expire_batch(
    session: Session,
    policy: str,
    cutoff: float,
    limit: int,
    outside: Sequence[tuple[float, float]] = (),
) -> tuple[int, int]:
    """Remove up to ``limit`` of a policy's oldest decisions created before ``cutoff``, with
    their rewards; returns (decisions, rewards) removed. Uses ``ix_decisions_policy_created``.
    Decisions created within one of the ``outside`` time ranges ``[start, end)`` are kept
    (they go when their whole partition is dropped)."""
    created = DecisionRow.created_at
    rows = session.execute(
        select(DecisionRow.position, DecisionRow.event_id, DecisionRow.candidate_set)
        .where(
            DecisionRow.policy == policy,
            created < cutoff,
            *[or_(created < start, created >= end) for start, end in outside],
        )
        .order_by(DecisionRow.created_at)
        .limit(limit)
    ).all()
    if not rows:
        return 0, 0
    event_ids = [r.event_id for r in rows]
    positions = [r.position for r in rows]
    if _partitioned(session):
        # Decisions first, then their rewards (see delete_user); the policy and time
        # conditions let PostgreSQL skip every partition but the expired ones.
        decisions = _deleted(
            session,
            delete(DecisionRow).where(
                DecisionRow.policy == policy,
                DecisionRow.created_at < cutoff,
                DecisionRow.position.in_(positions),
            ),
        )
        rewards = _delete_rewards_of(
            session, event_ids, RewardRow.policy == policy, RewardRow.decision_created_at < cutoff
        )
    else:
        rewards = _deleted(session, delete(RewardRow).where(RewardRow.event_id.in_(event_ids)))
        decisions = _deleted(
            session, delete(DecisionRow).where(DecisionRow.position.in_(positions))
        )
    drop_orphaned_sets(session, (r.candidate_set for r in rows))
    return decisions, rewards


def set_opt_out(session: Session, user_key: str, opted_out: bool, now: float) -> None:
    dialect = session.get_bind().dialect.name
    statement = (postgresql_insert if dialect == "postgresql" else sqlite_insert)(UserOptOutRow)
    statement = statement.values(user_key=user_key, opted_out=opted_out, updated_at=now)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["user_key"], set_={"opted_out": opted_out, "updated_at": now}
        )
    )


def scrub_opted_out(session: Session, user_keys: Iterable[str]) -> int:
    """Empty the context (and its rendering) and exclusions of the given users' logged
    decisions (an opt-out covers what was logged before it too); returns the decisions
    rewritten."""
    keys = sorted(set(user_keys))
    scrubbed = 0
    for start in range(0, len(keys), 1000):
        result = session.execute(
            update(DecisionRow)
            .where(
                DecisionRow.user_key.in_(keys[start : start + 1000]),
                DecisionRow.arm != "opted_out",  # those were logged without context
            )
            .values(context={}, context_line=None, excluded=[])
            .execution_options(synchronize_session=False)
        )
        scrubbed += int(cast(CursorResult[Any], result).rowcount)
    return scrubbed


def forget_undone_opt_outs(session: Session, before: float) -> int:
    """Remove undo markers (``opted_out`` false) recorded before ``before``: they only exist
    so that running processes see the undo, which they do within seconds."""
    return _deleted(
        session,
        delete(UserOptOutRow).where(
            UserOptOutRow.opted_out.is_(False), UserOptOutRow.updated_at < before
        ),
    )


def opt_out_state(session: Session, user_key: str) -> dict[str, Any] | None:
    row = session.get(UserOptOutRow, user_key)
    return {"opted_out": row.opted_out, "updated_at": row.updated_at} if row else None


def opt_out_changes(session: Session, since: float) -> list[tuple[str, bool, float]]:
    """Opt-outs and their undos recorded at or after ``since`` (``None``-safe: 0 = all)."""
    rows = session.execute(
        select(UserOptOutRow.user_key, UserOptOutRow.opted_out, UserOptOutRow.updated_at).where(
            UserOptOutRow.updated_at >= since
        )
    ).all()
    return [(r.user_key, bool(r.opted_out), float(r.updated_at)) for r in rows]


def opted_out_among(session: Session, user_keys: Iterable[str | None]) -> set[str]:
    """The keys among ``user_keys`` whose users are opted out now."""
    keys = sorted({k for k in user_keys if k is not None})
    found: set[str] = set()
    for start in range(0, len(keys), 1000):  # bounded IN lists
        found.update(
            session.scalars(
                select(UserOptOutRow.user_key).where(
                    UserOptOutRow.user_key.in_(keys[start : start + 1000]),
                    UserOptOutRow.opted_out.is_(True),
                )
            )
        )
    return found


def checkpoint_by_version(
    session: Session, policy: str, model_version: int
) -> dict[str, Any] | None:
    """A stored checkpoint (with its model bytes) of one exact model version, if still kept."""
    row = session.execute(
        select(
            ModelCheckpointRow.model_version, ModelCheckpointRow.model_key, ModelCheckpointRow.model
        ).where(
            ModelCheckpointRow.policy == policy, ModelCheckpointRow.model_version == model_version
        )
    ).first()
    return dict(row._mapping) if row is not None else None
