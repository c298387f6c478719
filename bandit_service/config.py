"""Service settings, read once from ``BANDIT_*`` environment variables and passed in.

Nothing here is read at import time: ``Settings()`` is built by the CLI or by a test
and handed to ``create_app``, so two apps with different settings can live in one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from bandit_service.training import TrainerOptions

DEFAULT_SQLITE_URL = "sqlite:///bandit.db"


class Settings(BaseSettings):
    """All tunables of one service process."""

    model_config = SettingsConfigDict(env_prefix="BANDIT_", extra="ignore")

    database_url: str = Field(
        default=DEFAULT_SQLITE_URL,
        description="SQLAlchemy URL; SQLite file by default, postgresql+psycopg://… in production.",
    )
    policies_dir: Path = Field(default=Path("policies"), description="Folder of <name>.toml files.")
    max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    max_candidates: int = Field(default=500, ge=1)
    max_slots: int = Field(default=50, ge=1)
    batch_max_rows: int = Field(
        default=512, ge=1, description="Group commit: rows per transaction."
    )
    model_reload_seconds: float = Field(
        default=2.0, gt=0, description="How often a serving process looks for a newer model."
    )
    trainer: Literal["inline", "off"] = Field(
        default="inline",
        description="inline: `serve` also trains (one process); off: run `bandit-service train`.",
    )
    train_interval_seconds: float = Field(default=1.0, gt=0)
    trainer_batch_events: int = Field(default=2000, ge=1)
    trainer_commit_grace_seconds: float = Field(
        default=2.0, ge=0, description="Wait past a window's end for in-flight commits."
    )
    trainer_lease_seconds: float = Field(default=30.0, gt=0)
    personalizer_policy: str = Field(
        default="default",
        description="The policy behind the Azure Personalizer-compatible API (/personalizer).",
    )
    retention_interval_seconds: float = Field(
        default=3600.0, gt=0, description="How often retention (policy retention_days) runs."
    )
    retention_whole_partitions: bool = Field(
        default=False,
        description="PostgreSQL: remove partitioned rows only by dropping whole partitions "
        "(a row may outlive retention_days by one partition width; see docs/data.md).",
    )
    user_hash_secret: str | None = Field(
        default=None,
        description="HMAC key for user ids; unset: a random key is made and kept in the store.",
    )
    # -- access (bandit_service/apikeys.py, docs/security.md) ---------------------------
    api_keys_file: Path | None = Field(
        default=None,
        description="TOML or JSON file of API keys (hashes, scopes, policies, limits).",
    )
    api_keys: str | None = Field(
        default=None, description="API keys as inline JSON, the same entries as the file."
    )
    max_features_per_candidate: int = Field(
        default=200,
        ge=1,
        le=200,  # bandit_service.api.features.MAX_FEATURES, the schema's hard cap
        description="Features per candidate (nested names count one each); keys may narrow.",
    )
    key_rate_per_second: float | None = Field(
        default=None,
        gt=0,
        description="Default request rate of a key without its own (per process); None: none.",
    )
    key_rate_burst: int | None = Field(
        default=None, ge=1, description="Default bucket size; None: max(1, rate)."
    )

    # -- operability (issue 11): shutdown, logs, metrics ------------------------------------
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        default="info", description="Level of the JSON log lines (BANDIT_LOG_LEVEL)."
    )
    access_log: bool = Field(
        default=False, description="Log every request at info (else at debug)."
    )
    drain_seconds: float = Field(
        default=0.0,
        ge=0,
        le=300,
        description="After SIGTERM, keep serving this long with /readyz false (so a load "
        "balancer stops routing here) before refusing new connections.",
    )
    shutdown_timeout_seconds: int = Field(
        default=30, gt=0, description="Longest wait for in-flight requests after SIGTERM."
    )
    metrics_window_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="Sliding window of the store-derived reward metrics on /metrics.",
    )

    @field_validator("database_url")
    @classmethod
    def _known_driver(cls, value: str) -> str:
        if not value.startswith(("sqlite", "postgresql")):
            raise ValueError("BANDIT_DATABASE_URL must be a sqlite:// or postgresql+psycopg:// URL")
        if value.startswith("postgresql://"):
            # psycopg 3 is the only PostgreSQL driver we install.
            value = "postgresql+psycopg://" + value[len("postgresql://") :]
        return value

    def trainer_options(self) -> TrainerOptions:
        from bandit_service.training import TrainerOptions

        return TrainerOptions(
            batch_events=self.trainer_batch_events,
            commit_grace_seconds=self.trainer_commit_grace_seconds,
            lease_seconds=self.trainer_lease_seconds,
        )
