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
    String,
    Text,
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
    ``slots`` holds, per slot: slot index and id, slot features, chosen id, its probability,
    the full distribution it was drawn from, and the explored flag.
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
    candidates: Mapped[Any] = mapped_column(Json, nullable=False)
    slots: Mapped[Any] = mapped_column(Json, nullable=False)
    excluded: Mapped[Any] = mapped_column(Json, nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    deferred: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    activated_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (Index("ix_decisions_policy_created", "policy", "created_at"),)


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

    __table_args__ = (Index("ix_rewards_event", "event_id", "id"),)


class MetaRow(Base):
    """Service-wide values that must survive restarts (e.g. the user-id hashing key)."""

    __tablename__ = "service_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, nullable=False)
