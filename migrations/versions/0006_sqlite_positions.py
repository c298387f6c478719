"""SQLite: log positions are never handed out twice (``AUTOINCREMENT``).

Without ``AUTOINCREMENT`` SQLite gives a new row ``max(rowid) + 1``. Once retention or
delete-user removed the newest decisions, new ones got positions at or below the trainer's
checkpoint, and the trainer (which reads ``position > checkpoint``) never learned them.
PostgreSQL's sequence never goes back, so only SQLite changes: the table is rebuilt with
``AUTOINCREMENT`` and its counter starts above every position handed out so far that is
still known (the log's and every checkpoint's).

Revision ID: 0006_sqlite_positions
Revises: 0005_privacy
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_sqlite_positions"
down_revision = "0005_privacy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    with op.batch_alter_table(
        "decisions", recreate="always", table_kwargs={"sqlite_autoincrement": True}
    ):
        pass
    high = bind.execute(
        sa.text(
            "SELECT max(coalesce((SELECT max(position) FROM decisions), 0), "
            "coalesce((SELECT max(position) FROM model_checkpoints), 0))"
        )
    ).scalar_one()
    bind.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = 'decisions'"))
    bind.execute(
        sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES ('decisions', :high)"),
        {"high": int(high)},
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table(
        "decisions", recreate="always", table_kwargs={"sqlite_autoincrement": False}
    ):
        pass
