"""Shared fixtures: every storage and HTTP test runs on SQLite and on PostgreSQL.

PostgreSQL comes from ``BANDIT_TEST_POSTGRES_URL`` (default: the local server, database
``test``). Each test gets its own schema, dropped afterwards. When the server is
unreachable the PostgreSQL half is skipped locally, but in CI (``CI`` set) or with
``BANDIT_REQUIRE_POSTGRES=1`` the run fails instead: CI must never skip it silently.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bandit_service.config import Settings
from bandit_service.store.database import upgrade

POSTGRES_URL = os.environ.get(
    "BANDIT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REQUIRE_POSTGRES = bool(os.environ.get("CI")) or os.environ.get("BANDIT_REQUIRE_POSTGRES") == "1"

TEST_POLICIES = {
    "default": """
holdout_share = 0
vw_args = "--cb_explore_adf --epsilon 0.2 -q ca -q sa"
slots = 1
""",
    "bounded": """
holdout_share = 0
vw_args = "--cb_explore_adf --epsilon 0.1"
slots = 2
reward_min = 0
reward_max = 1
reward_aggregation = "last"
reward_window_seconds = 60
""",
}

_postgres_error: str | None = None
_postgres_checked = False


def _postgres_unavailable() -> str | None:
    global _postgres_checked, _postgres_error
    if not _postgres_checked:
        _postgres_checked = True
        try:
            engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 5})
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            engine.dispose()
        except Exception as exc:
            _postgres_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return _postgres_error


def pytest_sessionstart(session: pytest.Session) -> None:
    if REQUIRE_POSTGRES and (error := _postgres_unavailable()):
        pytest.exit(f"PostgreSQL is required (CI) but unreachable at {POSTGRES_URL}: {error}", 3)


# Each test builds services whose VW workspaces, trainer and writer threads allocate from
# several malloc arenas; freed memory stays mapped in them, and a test worker's RSS grew to
# 5-7 GB over the suite (measured: after gc.collect() and malloc_trim(0) it stays at
# ~140 MB, so nothing leaks). Collecting and handing free pages back after each test
# keeps workers small.
_LIBC_NAME = ctypes.util.find_library("c")
_MALLOC_TRIM = getattr(ctypes.CDLL(_LIBC_NAME), "malloc_trim", None) if _LIBC_NAME else None


@pytest.fixture(autouse=True)
def _return_freed_memory() -> Iterator[None]:
    yield
    if _MALLOC_TRIM is not None:
        gc.collect()  # the services' reference cycles first, then their pages
        _MALLOC_TRIM(0)


@pytest.fixture
def policies_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "policies"
    folder.mkdir()
    for name, body in TEST_POLICIES.items():
        (folder / f"{name}.toml").write_text(body)
    return folder


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty, unmigrated store of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'bandit.db'}"
        return
    if error := _postgres_unavailable():
        pytest.skip(f"PostgreSQL unreachable ({error}); CI requires it")
    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def database_url(empty_database_url: str) -> str:
    """A migrated store of each kind."""
    upgrade(empty_database_url)
    return empty_database_url


@pytest.fixture
def settings(database_url: str, policies_dir: Path) -> Settings:
    return Settings(database_url=database_url, policies_dir=policies_dir, max_body_bytes=64 * 1024)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say plainly how many PostgreSQL tests ran, so a CI log proves they did."""
    passed = terminalreporter.stats.get("passed", [])
    failed = terminalreporter.stats.get("failed", [])
    skipped = terminalreporter.stats.get("skipped", [])

    def count(reports: list) -> int:
        return sum(1 for r in reports if "postgres" in getattr(r, "nodeid", ""))

    terminalreporter.write_line(
        f"PostgreSQL tests: {count(passed)} passed, {count(failed)} failed, "
        f"{count(skipped)} skipped (server: {POSTGRES_URL})"
    )
