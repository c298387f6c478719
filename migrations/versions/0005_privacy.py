"""Privacy (issue 10): stored per-user opt-outs, and an index to find one user's decisions.

The index on ``decisions.user_key`` makes ``DELETE /v1/users/{user_id}`` an index look-up
instead of a scan of the whole log; the one on ``decisions.candidate_set`` lets delete-user
and retention drop candidate sets no decision references any more.

Revision ID: 0005_privacy
Revises: 0004_compact_log
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_privacy"
down_revision = "0004_compact_log"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "user_opt_outs",
        sa.Column("user_key", sa.String(64), primary_key=True),
        sa.Column("opted_out", sa.Boolean, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_user_opt_outs_updated", "user_opt_outs", ["updated_at"])
    op.create_index("ix_decisions_user_key", "decisions", ["user_key"])
    op.create_index("ix_decisions_candidate_set", "decisions", ["candidate_set"])


def downgrade() -> None:
    op.drop_index("ix_decisions_candidate_set", table_name="decisions")
    op.drop_index("ix_decisions_user_key", table_name="decisions")
    op.drop_index("ix_user_opt_outs_updated", table_name="user_opt_outs")
    op.drop_table("user_opt_outs")
