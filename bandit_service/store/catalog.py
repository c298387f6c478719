"""Repository functions of the candidate catalog (tables of migration 0009_catalog).

None of them commits: a change request is one transaction that bumps the policy's catalog
version first (:func:`next_version`) and then writes its items with that version. The
bump is an upsert of the policy's ``catalog_versions`` row, whose row lock (PostgreSQL) or
the database write lock (SQLite) is held to commit, so the versions of one policy commit
in order: a reader that has seen version *v* has seen every change up to *v*.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from bandit_service.store.models import CatalogItemRow, CatalogVersionRow


def _insert(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    return (postgresql_insert if dialect == "postgresql" else sqlite_insert)(table)


def next_version(session: Session, policy: str, now: float) -> int:
    """Bump (or start at 1) the policy's catalog version; returns the new version."""
    statement = _insert(session, CatalogVersionRow).values(
        policy=policy, version=1, updated_at=now, purged_through=0
    )
    statement = statement.on_conflict_do_update(
        index_elements=["policy"],
        set_={"version": CatalogVersionRow.version + 1, "updated_at": now},
    ).returning(CatalogVersionRow.version)
    return int(session.execute(statement).scalar_one())


def upsert_items(
    session: Session, policy: str, items: Sequence[tuple[str, Any]], version: int, now: float
) -> None:
    """Create or replace items ``(id, features)``."""
    if not items:
        return
    rows = [
        {"policy": policy, "item_id": item_id, "features": orjson.dumps(features).decode(),
         "version": version, "updated_at": now, "deleted": False}
        for item_id, features in items
    ]  # fmt: skip
    statement = _insert(session, CatalogItemRow)
    statement = statement.on_conflict_do_update(
        index_elements=["policy", "item_id"],
        set_={
            "features": statement.excluded.features,
            "version": statement.excluded.version,
            "updated_at": statement.excluded.updated_at,
            "deleted": statement.excluded.deleted,
        },
    )
    session.execute(statement, rows)


def remove_items(
    session: Session,
    policy: str,
    version: int,
    now: float,
    *,
    item_id: str | None = None,
    older_than_version: bool = False,
) -> int:
    """Turn live items into tombstones: one (``item_id``), or every item not written by
    ``version`` (``older_than_version``: what a replacement did not name, or all when it
    named none). Returns how many were live."""
    query = (
        update(CatalogItemRow)
        .where(CatalogItemRow.policy == policy, CatalogItemRow.deleted.is_(False))
        .values(deleted=True, features="{}", version=version, updated_at=now)
    )
    if item_id is not None:
        query = query.where(CatalogItemRow.item_id == item_id)
    if older_than_version:
        query = query.where(CatalogItemRow.version < version)
    return int(session.execute(query).rowcount)  # type: ignore[attr-defined]


def purge_tombstones(session: Session, policy: str, before: float) -> None:
    """Forget tombstones written before ``before``; a process that knows a version older
    than the newest purged one then reloads the whole catalog (``purged_through``)."""
    newest = session.scalar(
        select(func.max(CatalogItemRow.version)).where(
            CatalogItemRow.policy == policy,
            CatalogItemRow.deleted.is_(True),
            CatalogItemRow.updated_at < before,
        )
    )
    if newest is None:
        return
    session.execute(
        delete(CatalogItemRow).where(
            CatalogItemRow.policy == policy,
            CatalogItemRow.deleted.is_(True),
            CatalogItemRow.version <= newest,
        )
    )
    session.execute(
        update(CatalogVersionRow)
        .where(CatalogVersionRow.policy == policy, CatalogVersionRow.purged_through < newest)
        .values(purged_through=newest)
    )


def live_count(session: Session, policy: str) -> int:
    return int(
        session.scalar(
            select(func.count()).where(
                CatalogItemRow.policy == policy, CatalogItemRow.deleted.is_(False)
            )
        )
        or 0
    )


def versions(session: Session) -> dict[str, tuple[int, float, int]]:
    """Every policy's ``(version, updated_at, purged_through)``: one small read, the
    whole cost of a refresh when nothing changed."""
    rows = session.execute(
        select(
            CatalogVersionRow.policy,
            CatalogVersionRow.version,
            CatalogVersionRow.updated_at,
            CatalogVersionRow.purged_through,
        )
    )
    return {policy: (int(v), float(at), int(purged)) for policy, v, at, purged in rows}


def changes(
    session: Session, policy: str, after_version: int | None
) -> list[tuple[str, str, bool]]:
    """``(id, features JSON, deleted)`` written after a version; ``None``: every live item."""
    query = select(CatalogItemRow.item_id, CatalogItemRow.features, CatalogItemRow.deleted).where(
        CatalogItemRow.policy == policy
    )
    if after_version is None:
        query = query.where(CatalogItemRow.deleted.is_(False))
    else:
        query = query.where(CatalogItemRow.version > after_version)
    return [(i, f, bool(d)) for i, f, d in session.execute(query)]


def list_items(
    session: Session, policy: str, after: str | None, limit: int
) -> list[dict[str, Any]]:
    """Live items in id order, keyset-paginated: those with an id after ``after``."""
    query = select(
        CatalogItemRow.item_id, CatalogItemRow.features, CatalogItemRow.version,
        CatalogItemRow.updated_at,
    ).where(CatalogItemRow.policy == policy, CatalogItemRow.deleted.is_(False))  # fmt: skip
    if after is not None:
        query = query.where(CatalogItemRow.item_id > after)
    rows = session.execute(query.order_by(CatalogItemRow.item_id).limit(limit))
    return [_item(*row) for row in rows]


def get_item(session: Session, policy: str, item_id: str) -> dict[str, Any] | None:
    row = session.execute(
        select(
            CatalogItemRow.item_id, CatalogItemRow.features, CatalogItemRow.version,
            CatalogItemRow.updated_at,
        ).where(
            CatalogItemRow.policy == policy, CatalogItemRow.item_id == item_id,
            CatalogItemRow.deleted.is_(False),
        )
    ).one_or_none()  # fmt: skip
    return _item(*row) if row is not None else None


def _item(item_id: str, features: str, version: int, updated_at: float) -> dict[str, Any]:
    return {
        "id": item_id,
        "features": orjson.loads(features),
        "version": int(version),
        "updated_at": updated_at,
    }
