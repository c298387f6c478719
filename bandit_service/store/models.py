"""Tables of the decision log. Timestamps are UNIX seconds (float) for portable comparisons."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# JSONB on PostgreSQL (compact, indexable); JSON text elsewhere.
Json = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments INTEGER PRIMARY KEY columns.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class DecisionRow(Base):
    """One logged decision with everything needed to replay and evaluate it.

    ``position`` is the log position (monotonic per store) that the trainer checkpoints.
    ``candidate_set`` names the request's candidates, stored once in ``candidate_sets``.
    ``slots`` holds, per slot: slot index and id, slot features, chosen id, its probability,
    the full distribution it was drawn from (positionally, see ``store/compact.py``), and
    the explored flag.
    """

    __tablename__ = "decisions"

    position: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(128), unique=True, nullable=False)
    policy: Mapped[str] = mapped_column(String(64), nullable=False)
    policy_version: Mapped[str] = mapped_column(String(32), nullable=False)
    model_version: Mapped[int] = mapped_column(Integer, nullable=False)
    arm: Mapped[str] = mapped_column(String(16), nullable=False)
    user_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    context: Mapped[Any] = mapped_column(Json, nullable=False)
    # ``context`` as the serving learner rendered it (VW text; migration 0007_shared_lines),
    # so the trainer skips decoding and rendering it; NULL for rows logged before, holdout
    # and opted-out decisions (the trainer renders ``context`` then, or does not learn).
    context_line: Mapped[str | None] = mapped_column(Text, nullable=True)
    candidate_set: Mapped[str] = mapped_column(
        String(32),
        ForeignKey("candidate_sets.key", name="fk_decisions_candidate_set"),
        nullable=False,
    )
    slots: Mapped[Any] = mapped_column(Json, nullable=False)
    excluded: Mapped[Any] = mapped_column(Json, nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    deferred: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    activated_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (
        Index("ix_decisions_policy_created", "policy", "created_at"),
        Index("ix_decisions_policy_position", "policy", "position"),
        Index("ix_decisions_user_key", "user_key"),  # delete-user (migration 0005_privacy)
        Index("ix_decisions_candidate_set", "candidate_set"),  # orphaned sets (0005_privacy)
        # SQLite must never hand a position out twice (migration 0006_sqlite_positions).
        {"sqlite_autoincrement": True},
    )


class CandidateSetRow(Base):
    """A request's candidates (JSON text), stored once and keyed by the hash of that text.

    Text rather than JSON: the key is the hash of exactly these bytes, and the trainer
    decodes each distinct set once, by key, however many decisions reference it.
    """

    __tablename__ = "candidate_sets"

    key: Mapped[str] = mapped_column(String(32), primary_key=True)
    candidates: Mapped[str] = mapped_column(Text, nullable=False)


class RewardRow(Base):
    """One reward as received. Aggregation (sum/first/last) happens when read or learned."""

    __tablename__ = "rewards"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("decisions.event_id", ondelete="CASCADE"), nullable=False
    )
    slot: Mapped[int] = mapped_column(Integer, nullable=False)
    value: Mapped[float] = mapped_column(Float, nullable=False)
    received_at: Mapped[float] = mapped_column(Float, nullable=False)
    late: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    kind: Mapped[str] = mapped_column(String(32), nullable=False, server_default="primary")
    # Idempotency key of the write (a UUID made when the reward was received).
    reward_id: Mapped[str | None] = mapped_column(String(36), nullable=True)

    __table_args__ = (
        Index("ix_rewards_event", "event_id", "id"),
        UniqueConstraint("reward_id", name="uq_rewards_reward_id"),
    )


class MetaRow(Base):
    """Service-wide values that must survive restarts (e.g. the user-id hashing key)."""

    __tablename__ = "service_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, nullable=False)


class ModelCheckpointRow(Base):
    """A trained model and the log position it covers, written in one transaction.

    Every decision of ``policy`` with ``position <= position`` has been handled (learned,
    or skipped for a stated reason) by this model; ``learned_events`` counts the learned
    ones over the model's lineage (``model_key``). ``model_version`` increases per policy
    across lineages, so a version number in the decision log is never ambiguous.
    """

    __tablename__ = "model_checkpoints"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    policy: Mapped[str] = mapped_column(String(64), nullable=False)
    model_key: Mapped[str] = mapped_column(String(32), nullable=False)
    policy_version: Mapped[str] = mapped_column(String(32), nullable=False)
    model_version: Mapped[int] = mapped_column(Integer, nullable=False)
    position: Mapped[int] = mapped_column(BigInteger, nullable=False)
    learned_events: Mapped[int] = mapped_column(BigInteger, nullable=False)
    skipped_events: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    note: Mapped[str] = mapped_column(Text, nullable=False, default="")
    model: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)

    __table_args__ = (
        UniqueConstraint("policy", "model_version", name="uq_checkpoint_policy_version"),
        Index("ix_checkpoints_lineage", "policy", "model_key", "model_version"),
    )


class TrainerLeaseRow(Base):
    """At most one active trainer per policy: a lease renewed while it works.

    The checkpoint transaction re-checks the lease (fencing), so a trainer that lost its
    lease during a long pause cannot overwrite the new owner's progress.
    """

    __tablename__ = "trainer_leases"

    policy: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), nullable=False)
    expires_at: Mapped[float] = mapped_column(Float, nullable=False)


class UserOptOutRow(Base):
    """A user's stored choice not to be personalized (issue 10), by keyed hash of the id.

    Undoing an opt-out keeps the row with ``opted_out`` false, so serving processes that
    read changes since a time (``updated_at``) see the undo as well as the opt-out.
    """

    __tablename__ = "user_opt_outs"

    user_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    opted_out: Mapped[bool] = mapped_column(Boolean, nullable=False)
    updated_at: Mapped[float] = mapped_column(Float, nullable=False)

    __table_args__ = (Index("ix_user_opt_outs_updated", "updated_at"),)


class CatalogItemRow(Base):
    """One item of a policy's candidate catalog (migration 0009_catalog; see
    ``bandit_service/catalog.py``).

    ``features`` is the item's feature map as JSON text (decoded once per change by each
    serving process). ``version`` is the catalog version that last wrote the row; a removed
    item stays as a tombstone (``deleted``) so processes reading changes since a version
    see the removal too.
    """

    __tablename__ = "catalog_items"

    policy: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Byte (code point) order on both stores, as Python sorts ids: lists and the whole-
    # catalog candidate order agree.
    item_id: Mapped[str] = mapped_column(
        String(256).with_variant(String(256, collation="C"), "postgresql"), primary_key=True
    )
    features: Mapped[str] = mapped_column(Text, nullable=False)
    version: Mapped[int] = mapped_column(BigInteger, nullable=False)
    updated_at: Mapped[float] = mapped_column(Float, nullable=False)
    deleted: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)

    __table_args__ = (Index("ix_catalog_items_changes", "policy", "version"),)


class CatalogVersionRow(Base):
    """A policy's catalog version: one more per change request (the watermark processes
    read changes after). ``purged_through``: tombstones up to this version are gone, so a
    process that knows an older version reloads the whole catalog."""

    __tablename__ = "catalog_versions"

    policy: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, nullable=False)
    updated_at: Mapped[float] = mapped_column(Float, nullable=False)
    purged_through: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
