"""Reward kinds (the primary, learned reward and others reported beside it) and reward ids
(an idempotency key, so a replayed write cannot store a reward twice).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rewards") as batch:
        batch.add_column(sa.Column("kind", sa.String(32), nullable=False, server_default="primary"))
        batch.add_column(sa.Column("reward_id", sa.String(36), nullable=True))
        batch.create_unique_constraint("uq_rewards_reward_id", ["reward_id"])


def downgrade() -> None:
    with op.batch_alter_table("rewards") as batch:
        batch.drop_constraint("uq_rewards_reward_id", type_="unique")
        batch.drop_column("reward_id")
        batch.drop_column("kind")
