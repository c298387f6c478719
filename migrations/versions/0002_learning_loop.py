"""Learning loop: model checkpoints and trainer leases.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "model_checkpoints",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("policy", sa.String(64), nullable=False),
        sa.Column("model_key", sa.String(32), nullable=False),
        sa.Column("policy_version", sa.String(32), nullable=False),
        sa.Column("model_version", sa.Integer, nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("learned_events", sa.BigInteger, nullable=False),
        sa.Column("skipped_events", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("model", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("policy", "model_version", name="uq_checkpoint_policy_version"),
    )
    op.create_index(
        "ix_checkpoints_lineage", "model_checkpoints", ["policy", "model_key", "model_version"]
    )
    op.create_table(
        "trainer_leases",
        sa.Column("policy", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    # The trainer scans one policy's log in position order.
    op.create_index("ix_decisions_policy_position", "decisions", ["policy", "position"])


def downgrade() -> None:
    op.drop_index("ix_decisions_policy_position", table_name="decisions")
    op.drop_table("trainer_leases")
    op.drop_index("ix_checkpoints_lineage", table_name="model_checkpoints")
    op.drop_table("model_checkpoints")
