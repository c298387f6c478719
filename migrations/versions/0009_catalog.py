"""Candidate catalog: per policy, items ``{id, features}`` that decisions may reference.

``catalog_items`` holds the items (removed ones as tombstones, so serving processes that
read the changes since their last version see removals); ``catalog_versions`` one row per
policy with its current version, the watermark of those reads.

Revision ID: 0009_catalog
Revises: 0007_shared_lines
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_catalog"
down_revision = "0007_shared_lines"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "catalog_items",
        sa.Column("policy", sa.String(64), primary_key=True),
        sa.Column(
            "item_id",
            sa.String(256).with_variant(sa.String(256, collation="C"), "postgresql"),
            primary_key=True,
        ),
        sa.Column("features", sa.Text, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_index("ix_catalog_items_changes", "catalog_items", ["policy", "version"])
    op.create_table(
        "catalog_versions",
        sa.Column("policy", sa.String(64), primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("purged_through", sa.BigInteger, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("catalog_versions")
    op.drop_index("ix_catalog_items_changes", table_name="catalog_items")
    op.drop_table("catalog_items")
