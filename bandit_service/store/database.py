"""Engine creation and migration checks for SQLite and PostgreSQL."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import orjson
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def make_engine(url: str, *, background_checkpoints: bool = False, **kwargs: Any) -> Engine:
    """Create an engine with the settings each backend needs for durable group commits.

    JSON columns go through orjson: a decision row carries every candidate's features, and
    the standard library's encoder and decoder were a third of the trainer's time.

    ``background_checkpoints`` (SQLite, serving processes): SQLite's automatic WAL
    checkpoint runs inside whichever commit crosses 1,000 pages, adding ~80 ms to every
    ~20th large decision; the service turns it off and checkpoints from a background
    thread instead (:func:`checkpoint_wal`).
    """
    kwargs.setdefault("json_serializer", _json_dumps)
    kwargs.setdefault("json_deserializer", orjson.loads)
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets readers proceed during a write; synchronous=FULL makes each commit
            # durable through power loss (affordable because commits are batched).
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            if background_checkpoints:
                cursor.execute("PRAGMA wal_autocheckpoint=0")
            cursor.close()

        return engine
    # The append's typed column arrays (store/pg_arrays.py): their dumpers go on psycopg's
    # global adapters, which each connection copies when it is made, so before any is.
    from bandit_service.store import pg_arrays  # noqa: F401

    kwargs.setdefault("pool_size", 8)
    kwargs.setdefault("max_overflow", 8)
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def checkpoint_wal(engine: Engine) -> None:
    """Copy committed WAL pages into the SQLite database without blocking writers."""
    if engine.dialect.name == "sqlite":
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


@functools.cache
def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)  # once per probe
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def check_ready(engine: Engine) -> tuple[bool, str]:
    """Is the store reachable and migrated to head? Returns (ok, human-readable reason)."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        current = current_revision(engine)
    except Exception as exc:  # any driver error means "not ready", with its reason
        return False, f"store unreachable: {type(exc).__name__}: {exc}".splitlines()[0]
    head = head_revision()
    if current != head:
        return False, f"migrations not at head (store at {current}, code at {head}); run migrate"
    return True, "ok"
