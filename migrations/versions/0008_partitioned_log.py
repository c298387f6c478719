"""Partitioned log (issue 10): retention drops whole partitions on PostgreSQL.

PostgreSQL: ``decisions`` and ``rewards`` become partitioned tables, by policy
(``LIST``) and, inside a policy, by time (``RANGE``; ``created_at`` for decisions, the
decision's ``created_at`` for rewards), each level with a default partition (see
``bandit_service/store/partitions.py``). The tables are rebuilt (new tables, rows copied,
old ones dropped); the sequences behind ``position`` and ``rewards.id`` are kept, so
positions stay monotonic and are never handed out again. Each policy present in the log gets
its partition with one time range holding its whole history (up to today; retention
deletes from it in batches and drops it once all of it expired) and an empty default
partition; the serving processes add the daily ranges from today on.

A unique index on a partitioned table must include the partition key, so on PostgreSQL:
the primary keys become ``(position, policy, created_at)`` and ``(id, policy,
decision_created_at)``; ``event_id`` keeps a plain index and is kept unique by the writer
(advisory locks); ``reward_id`` is unique with the partition key, which is the same thing
since a reward's policy and time are those of its one decision; the foreign key from
rewards to decisions becomes a check in ``insert_rewards``.

Both stores: ``rewards`` gains ``policy`` and ``decision_created_at`` (filled from the
decisions), which is what partitions rewards with their decisions on PostgreSQL; SQLite
keeps its plain tables, foreign key and unique constraints.

Revision ID: 0008_partitioned_log
Revises: 0007_shared_lines
Create Date: 2026-11-22
"""

import time

import sqlalchemy as sa
from alembic import op

from bandit_service.store.partitions import policy_partition, range_partition

revision = "0008_partitioned_log"
down_revision = "0007_shared_lines"
branch_labels = None
depends_on = None

DECISION_COLUMNS = """
    position bigint NOT NULL DEFAULT nextval('{seq}'),
    event_id varchar(128) NOT NULL,
    policy varchar(64) NOT NULL,
    policy_version varchar(32) NOT NULL,
    model_version integer NOT NULL,
    arm varchar(16) NOT NULL,
    user_key varchar(64),
    context jsonb NOT NULL,
    slots jsonb NOT NULL,
    excluded jsonb NOT NULL,
    created_at double precision NOT NULL,
    deferred boolean NOT NULL,
    activated_at double precision,
    candidate_set varchar(32) NOT NULL,
    context_line text
"""
REWARD_COLUMNS = """
    id bigint NOT NULL DEFAULT nextval('{seq}'),
    event_id varchar(128) NOT NULL,
    slot integer NOT NULL,
    value double precision NOT NULL,
    received_at double precision NOT NULL,
    late boolean NOT NULL,
    kind varchar(32) NOT NULL DEFAULT 'primary',
    reward_id varchar(36)
"""
D_COLS = (
    "position, event_id, policy, policy_version, model_version, arm, user_key, context, "
    "slots, excluded, created_at, deferred, activated_at, candidate_set, context_line"
)
R_COLS = "id, event_id, slot, value, received_at, late, kind, reward_id"
DECISION_INDEXES = [
    "CREATE INDEX ix_decisions_policy_created ON decisions (policy, created_at)",
    "CREATE INDEX ix_decisions_policy_position ON decisions (policy, position)",
    "CREATE INDEX ix_decisions_user_key ON decisions (user_key)",
    "CREATE INDEX ix_decisions_candidate_set ON decisions (candidate_set)",
    "ALTER TABLE decisions ADD CONSTRAINT fk_decisions_candidate_set "
    "FOREIGN KEY (candidate_set) REFERENCES candidate_sets (key)",
    "CREATE INDEX ix_rewards_event ON rewards (event_id, id)",
]


def _sequences(bind: sa.Connection) -> tuple[str, str]:
    """The sequences of ``decisions.position`` and ``rewards.id``, released from their
    columns so that dropping the old tables keeps them."""
    seqs = []
    for table, column in (("decisions", "position"), ("rewards", "id")):
        seq = bind.execute(
            sa.text("SELECT pg_get_serial_sequence(:t, :c)"), {"t": table, "c": column}
        ).scalar_one()
        assert seq is not None, f"{table}.{column} has no sequence"
        op.execute(f"ALTER SEQUENCE {seq} OWNED BY NONE")
        seqs.append(seq)
    return seqs[0], seqs[1]


def _own(seq_position: str, seq_reward: str) -> None:
    op.execute(f"ALTER SEQUENCE {seq_position} OWNED BY decisions.position")
    op.execute(f"ALTER SEQUENCE {seq_reward} OWNED BY rewards.id")


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        op.add_column("rewards", sa.Column("policy", sa.String(64), nullable=True))
        op.add_column("rewards", sa.Column("decision_created_at", sa.Float, nullable=True))
        op.execute(
            "UPDATE rewards SET "
            "policy = (SELECT d.policy FROM decisions d WHERE d.event_id = rewards.event_id), "
            "decision_created_at = "
            "(SELECT d.created_at FROM decisions d WHERE d.event_id = rewards.event_id)"
        )
        return
    seq_position, seq_reward = _sequences(bind)
    op.execute("ALTER TABLE rewards RENAME TO rewards_plain")
    op.execute("ALTER TABLE decisions RENAME TO decisions_plain")
    op.execute(
        f"CREATE TABLE decisions ({DECISION_COLUMNS.format(seq=seq_position)}) "
        "PARTITION BY LIST (policy)"
    )
    op.execute(
        f"CREATE TABLE rewards ({REWARD_COLUMNS.format(seq=seq_reward)}, "
        "policy varchar(64) NOT NULL, decision_created_at double precision NOT NULL) "
        "PARTITION BY LIST (policy)"
    )
    logged = bind.execute(
        sa.text(
            "SELECT policy, floor(min(created_at) / 86400), floor(max(created_at) / 86400) "
            "FROM decisions_plain GROUP BY policy"
        )
    ).all()
    today = int(time.time() // 86400)
    for table, key in (("decisions", "created_at"), ("rewards", "decision_created_at")):
        op.execute(f"CREATE TABLE {table}_default PARTITION OF {table} DEFAULT")
        for policy, first_day, last_day in logged:
            child = policy_partition(table, policy)
            literal = "'" + policy.replace("'", "''") + "'"
            op.execute(
                f"CREATE TABLE {child} PARTITION OF {table} FOR VALUES IN ({literal}) "
                f"PARTITION BY RANGE ({key})"
            )
            op.execute(f"CREATE TABLE {child}_default PARTITION OF {child} DEFAULT")
            # The history in one range, so the default partition starts empty (creating a
            # range later checks the default partition's every row under an exclusive lock).
            first, end = int(first_day), max(today, int(last_day) + 1)
            op.execute(
                f"CREATE TABLE {range_partition(table, policy, first, end)} PARTITION OF "
                f"{child} FOR VALUES FROM ({first * 86400.0!r}) TO ({end * 86400.0!r})"
            )
    op.execute(f"INSERT INTO decisions ({D_COLS}) SELECT {D_COLS} FROM decisions_plain")
    r_cols = ", ".join(f"r.{c}" for c in R_COLS.split(", "))
    op.execute(
        f"INSERT INTO rewards ({R_COLS}, policy, decision_created_at) "
        f"SELECT {r_cols}, d.policy, d.created_at FROM rewards_plain r "
        "JOIN decisions_plain d ON d.event_id = r.event_id"
    )
    op.execute("DROP TABLE rewards_plain")
    op.execute("DROP TABLE decisions_plain")
    op.execute(
        "ALTER TABLE decisions ADD CONSTRAINT decisions_pkey "
        "PRIMARY KEY (position, policy, created_at)"
    )
    op.execute("CREATE INDEX ix_decisions_event_id ON decisions (event_id)")
    op.execute(
        "ALTER TABLE rewards ADD CONSTRAINT rewards_pkey "
        "PRIMARY KEY (id, policy, decision_created_at)"
    )
    op.execute(
        "ALTER TABLE rewards ADD CONSTRAINT uq_rewards_reward_id "
        "UNIQUE (reward_id, policy, decision_created_at)"
    )
    for statement in DECISION_INDEXES:
        op.execute(statement)
    _own(seq_position, seq_reward)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        with op.batch_alter_table("rewards") as batch:
            batch.drop_column("decision_created_at")
            batch.drop_column("policy")
        return
    seq_position, seq_reward = _sequences(bind)
    op.execute("ALTER TABLE rewards RENAME TO rewards_parted")
    op.execute("ALTER TABLE decisions RENAME TO decisions_parted")
    op.execute(f"CREATE TABLE decisions ({DECISION_COLUMNS.format(seq=seq_position)})")
    op.execute(f"CREATE TABLE rewards ({REWARD_COLUMNS.format(seq=seq_reward)})")
    op.execute(f"INSERT INTO decisions ({D_COLS}) SELECT {D_COLS} FROM decisions_parted")
    # A reward whose decision is gone has no meaning (the foreign key comes back below).
    op.execute(
        f"INSERT INTO rewards ({R_COLS}) SELECT {R_COLS} FROM rewards_parted r WHERE EXISTS "
        "(SELECT 1 FROM decisions_parted d WHERE d.event_id = r.event_id)"
    )
    op.execute("DROP TABLE rewards_parted CASCADE")  # with every partition
    op.execute("DROP TABLE decisions_parted CASCADE")
    op.execute("ALTER TABLE decisions ADD CONSTRAINT decisions_pkey PRIMARY KEY (position)")
    op.execute("ALTER TABLE decisions ADD CONSTRAINT decisions_event_id_key UNIQUE (event_id)")
    op.execute("ALTER TABLE rewards ADD CONSTRAINT rewards_pkey PRIMARY KEY (id)")
    op.execute("ALTER TABLE rewards ADD CONSTRAINT uq_rewards_reward_id UNIQUE (reward_id)")
    for statement in DECISION_INDEXES:
        op.execute(statement)
    op.execute(
        "ALTER TABLE rewards ADD CONSTRAINT rewards_event_id_fkey FOREIGN KEY (event_id) "
        "REFERENCES decisions (event_id) ON DELETE CASCADE"
    )
    _own(seq_position, seq_reward)
