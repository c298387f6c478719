"""A service whose start fails stops its group-commit writer's thread (found in review:
the thread started first and outlived the failed app)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from bandit_service.config import Settings
from bandit_service.policy import load_policies
from bandit_service.service import DecisionService


def test_a_failed_start_leaves_no_writer_thread(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = DecisionService(settings, load_policies(settings.policies_dir))

    def broken() -> None:
        raise RuntimeError("catalog unreadable")

    monkeypatch.setattr(service.catalog, "refresh", broken)

    def writers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "batch-writer" and t.is_alive()]

    before = len(writers())
    with pytest.raises(RuntimeError, match="catalog unreadable"):
        asyncio.run(service.start())
    assert len(writers()) == before
    service.db.dispose()
