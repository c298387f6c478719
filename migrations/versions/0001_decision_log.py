"""Decision log: decisions, rewards, service metadata.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "decisions",
        sa.Column("position", BigId, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(128), nullable=False, unique=True),
        sa.Column("policy", sa.String(64), nullable=False),
        sa.Column("policy_version", sa.String(32), nullable=False),
        sa.Column("model_version", sa.Integer, nullable=False),
        sa.Column("arm", sa.String(16), nullable=False),
        sa.Column("user_key", sa.String(64), nullable=True),
        sa.Column("context", Json, nullable=False),
        sa.Column("candidates", Json, nullable=False),
        sa.Column("slots", Json, nullable=False),
        sa.Column("excluded", Json, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("deferred", sa.Boolean, nullable=False),
        sa.Column("activated_at", sa.Float, nullable=True),
    )
    op.create_index("ix_decisions_policy_created", "decisions", ["policy", "created_at"])
    op.create_table(
        "rewards",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column(
            "event_id",
            sa.String(128),
            sa.ForeignKey("decisions.event_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("slot", sa.Integer, nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("late", sa.Boolean, nullable=False),
    )
    op.create_index("ix_rewards_event", "rewards", ["event_id", "id"])
    op.create_table(
        "service_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("service_meta")
    op.drop_index("ix_rewards_event", table_name="rewards")
    op.drop_table("rewards")
    op.drop_index("ix_decisions_policy_created", table_name="decisions")
    op.drop_table("decisions")
