"""Repeated probabilities stored as runs: a slot's ``p_runs`` (see store/compact.py).

From this revision on, the service may store a slot's probabilities as ``p_runs``
(``[value, count, …]``) instead of ``p`` (base64 doubles) when they repeat, as an
epsilon-greedy slot's do. Upgrading changes no row: decisions written before keep ``p``,
which the service reads as before. Code of revision 0009 and earlier knows only ``p``, so
downgrading rewrites every slot stored with ``p_runs`` into ``p`` with the very same
doubles: run it (with this version's code) before rolling the service back past this
version (docs/deploy.md). Chunked, so memory stays bounded on a large log; the codec is
copied here, frozen.

Revision ID: 0010_probability_runs
Revises: 0009_catalog
Create Date: 2026-11-23
"""

from __future__ import annotations

import base64
import struct
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0010_probability_runs"
down_revision = "0009_catalog"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")
CHUNK = 1000


def _packed(slot: dict[str, Any]) -> dict[str, Any]:
    """``slot`` with ``p_runs`` replaced by ``p``, the same doubles packed (last, where
    the older code put ``p``)."""
    runs = slot.get("p_runs")
    if runs is None:
        return slot
    values = [float(runs[k]) for k in range(0, len(runs), 2) for _ in range(int(runs[k + 1]))]
    packed = {k: v for k, v in slot.items() if k != "p_runs"}
    packed["p"] = base64.b64encode(struct.pack(f"<{len(values)}d", *values)).decode("ascii")
    return packed


def upgrade() -> None:
    pass  # nothing to rewrite: rows written before hold ``p``, which is still read


def downgrade() -> None:
    connection = op.get_bind()
    decisions = sa.table(
        "decisions", sa.column("position", sa.BigInteger), sa.column("slots", Json)
    )
    holds_runs = sa.cast(decisions.c.slots, sa.Text).contains('"p_runs"', autoescape=True)
    last = 0
    while True:
        rows = connection.execute(
            sa.select(decisions.c.position, decisions.c.slots)
            .where(decisions.c.position > last, holds_runs)
            .order_by(decisions.c.position)
            .limit(CHUNK)
        ).all()
        if not rows:
            return
        connection.execute(
            sa.update(decisions)
            .where(decisions.c.position == sa.bindparam("p_"))
            .values(slots=sa.bindparam("slots_")),
            [{"p_": row.position, "slots_": [_packed(s) for s in row.slots]} for row in rows],
        )
        last = rows[-1].position
