"""Shared lines: the serving learner's rendering of each decision's context.

``decisions.context_line`` holds the context as Vowpal Wabbit text, exactly as the engine
rendered it for the prediction, so the trainer learns from that text instead of decoding
the context JSON and rendering it again per event (the largest Python cost of training).
Nullable and not backfilled: rows logged before this revision (and holdout or opted-out
decisions) have NULL there and the trainer renders their ``context`` as before, which
gives the same text.

Revision ID: 0006_shared_lines
Revises: 0005_privacy
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_shared_lines"
down_revision = "0005_privacy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("decisions", sa.Column("context_line", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("decisions") as batch:  # SQLite rebuilds the table
        batch.drop_column("context_line")
