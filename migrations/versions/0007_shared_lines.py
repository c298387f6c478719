"""Shared lines: the serving learner's rendering of each decision's context.

``decisions.context_line`` holds the context as Vowpal Wabbit text, exactly as the engine
rendered it for the prediction, so the trainer learns from that text instead of decoding
the context JSON and rendering it again per event (the largest Python cost of training).
Nullable and not backfilled: rows logged before this revision (and holdout or opted-out
decisions) have NULL there and the trainer renders their ``context`` as before, which
gives the same text.

Revision ID: 0007_shared_lines
Revises: 0006_sqlite_positions
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_shared_lines"
down_revision = "0006_sqlite_positions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("decisions", sa.Column("context_line", sa.Text, nullable=True))


def downgrade() -> None:
    bind = op.get_bind()
    high = None
    if bind.dialect.name == "sqlite":  # the rebuild below must keep the position counter
        high = bind.execute(
            sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'decisions'")
        ).scalar_one_or_none()
    with op.batch_alter_table(
        "decisions", table_kwargs={"sqlite_autoincrement": True}
    ) as batch:  # SQLite rebuilds the table (AUTOINCREMENT kept: 0006_sqlite_positions)
        batch.drop_column("context_line")
    if high is not None:
        bind.execute(
            sa.text("UPDATE sqlite_sequence SET seq = max(seq, :high) WHERE name = 'decisions'"),
            {"high": int(high)},
        )
