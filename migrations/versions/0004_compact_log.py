"""Compact decision log: candidate sets stored once (content-addressed), distributions
stored positionally. See bandit_service/store/compact.py for the encoding and why.

Upgrading rewrites every decision (candidates -> a candidate_sets row referenced by key;
each slot's ``pmf`` -> ``eligible`` runs + ``p``); downgrading restores the previous
columns exactly. Both work in chunks so memory stays bounded on a large log. The codec is
copied here, frozen, so later changes to the service's code cannot change this migration.

Revision ID: 0004_compact_log
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004_compact_log"
down_revision = "0003"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")
CHUNK = 1000
FK_NAME = "fk_decisions_candidate_set"


def _set_key(candidates: Any) -> tuple[str, str]:
    data = orjson.dumps(candidates)
    return hashlib.blake2b(data, digest_size=16).hexdigest(), data.decode()


def _compact(slots: Sequence[dict[str, Any]], ids: Sequence[str]) -> list[dict[str, Any]]:
    position = {cid: i for i, cid in enumerate(ids)}
    out = []
    for slot in slots:
        pmf = slot.get("pmf")
        if pmf is None or any(cid not in position for cid, _p in pmf):
            out.append(slot)
            continue
        runs: list[int] = []
        for cid, _p in pmf:
            i = position[cid]
            if runs and runs[-1] == i:
                runs[-1] = i + 1
            else:
                runs += [i, i + 1]
        compact = {k: v for k, v in slot.items() if k != "pmf"}
        compact["eligible"] = runs
        probabilities = [float(p) for _cid, p in pmf]
        compact["p"] = base64.b64encode(
            struct.pack(f"<{len(probabilities)}d", *probabilities)
        ).decode("ascii")
        out.append(compact)
    return out


def _expand(slots: Sequence[dict[str, Any]], ids: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for slot in slots:
        if "eligible" not in slot:
            out.append(slot)
            continue
        runs = slot["eligible"]
        chosen = [ids[i] for k in range(0, len(runs), 2) for i in range(runs[k], runs[k + 1])]
        classic = {k: v for k, v in slot.items() if k not in ("eligible", "p")}
        data = base64.b64decode(slot["p"])
        probabilities = struct.unpack(f"<{len(data) // 8}d", data)
        classic["pmf"] = [[cid, p] for cid, p in zip(chosen, probabilities, strict=True)]
        out.append(classic)
    return out


def _chunks(connection: sa.Connection, columns: list[Any]) -> Any:
    """Decision rows in position order, CHUNK at a time (keyset pagination)."""
    decisions = sa.table("decisions", sa.column("position", sa.BigInteger), *columns)
    last = 0
    while True:
        rows = connection.execute(
            sa.select(decisions)
            .where(decisions.c.position > last)
            .order_by(decisions.c.position)
            .limit(CHUNK)
        ).all()
        if not rows:
            return
        yield rows
        last = rows[-1].position


def upgrade() -> None:
    op.create_table(
        "candidate_sets",
        sa.Column("key", sa.String(32), primary_key=True),
        sa.Column("candidates", sa.Text, nullable=False),
    )
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("candidate_set", sa.String(32), nullable=True))

    connection = op.get_bind()
    sets = sa.table("candidate_sets", sa.column("key", sa.String), sa.column("candidates"))
    decisions = sa.table(
        "decisions",
        sa.column("position", sa.BigInteger),
        sa.column("candidate_set", sa.String),
        sa.column("slots", Json),
    )
    stored: set[str] = set()
    columns = [sa.column("candidates", Json), sa.column("slots", Json)]
    for rows in _chunks(connection, columns):
        new_sets = []
        updates = []
        for row in rows:
            key, text = _set_key(row.candidates)
            if key not in stored:
                stored.add(key)
                new_sets.append({"key": key, "candidates": text})
            ids = [c["id"] for c in row.candidates]
            updates.append({"p_": row.position, "set_": key, "slots_": _compact(row.slots, ids)})
        if new_sets:
            connection.execute(sa.insert(sets), new_sets)
        connection.execute(
            sa.update(decisions)
            .where(decisions.c.position == sa.bindparam("p_"))
            .values(candidate_set=sa.bindparam("set_"), slots=sa.bindparam("slots_")),
            updates,
        )

    with op.batch_alter_table("decisions") as batch:
        batch.alter_column("candidate_set", existing_type=sa.String(32), nullable=False)
        batch.create_foreign_key(FK_NAME, "candidate_sets", ["candidate_set"], ["key"])
        batch.drop_column("candidates")


def downgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("candidates", Json, nullable=True))

    connection = op.get_bind()
    decisions = sa.table(
        "decisions",
        sa.column("position", sa.BigInteger),
        sa.column("candidates", Json),
        sa.column("slots", Json),
    )
    sets = sa.table("candidate_sets", sa.column("key", sa.String), sa.column("candidates"))
    decoded: dict[str, Any] = {}
    columns = [sa.column("candidate_set", sa.String), sa.column("slots", Json)]
    for rows in _chunks(connection, columns):
        missing = {row.candidate_set for row in rows} - decoded.keys()
        if len(decoded) + len(missing) > 10_000:  # bounded memory
            decoded.clear()
            missing = {row.candidate_set for row in rows}
        for key, text in connection.execute(
            sa.select(sets.c.key, sets.c.candidates).where(sets.c.key.in_(missing))
        ):
            decoded[key] = orjson.loads(text)
        updates = []
        for row in rows:
            candidates = decoded[row.candidate_set]
            ids = [c["id"] for c in candidates]
            updates.append(
                {"p_": row.position, "c_": candidates, "slots_": _expand(row.slots, ids)}
            )
        connection.execute(
            sa.update(decisions)
            .where(decisions.c.position == sa.bindparam("p_"))
            .values(candidates=sa.bindparam("c_"), slots=sa.bindparam("slots_")),
            updates,
        )

    with op.batch_alter_table("decisions") as batch:
        batch.alter_column("candidates", existing_type=Json, nullable=False)
        batch.drop_constraint(FK_NAME, type_="foreignkey")
        batch.drop_column("candidate_set")
    op.drop_table("candidate_sets")
