"""Decisions whose event id the service generated (a random UUID) skip the duplicate
look-up. On SQLite the store's unique key must still refuse a second copy, never store it
twice. PostgreSQL's partitioned log has no unique index on event_id (store/partitions.py),
so there a fresh id is trusted to be new: only a UUID collision could repeat it.

Either way, the one way the service itself could write a fresh id twice -- a batch retried
after a commit whose outcome was unknown (a connection lost while committing) -- looks the
ids up again, so the write is answered with the stored decision and stored once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bandit_service.config import Settings
from bandit_service.domain import Candidate, DecisionRequest, slot_list
from bandit_service.policy import load_policies
from bandit_service.service import DecisionService
from bandit_service.store.database import make_engine
from bandit_service.store.models import DecisionRow
from bandit_service.store.writer import BatchWriter


def _request(event_id: str) -> DecisionRequest:
    candidates = tuple(Candidate(f"c{i}", {"n": i}) for i in range(4))
    return DecisionRequest(event_id, "default", candidates, slot_list(1), {"k": "v"})


def _stored_rows(settings: Settings) -> int:
    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        count = session.scalar(select(func.count()).select_from(DecisionRow))
    engine.dispose()
    return int(count or 0)


def test_a_fresh_event_id_is_never_stored_twice_on_sqlite(settings: Settings) -> None:
    if not settings.database_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's partitioned log has no unique key on event_id")

    async def run() -> tuple[dict, dict]:
        service = DecisionService(settings, load_policies(settings.policies_dir))
        await service.start()
        try:
            first = await service.decide(_request("gen-1"), may_exist=False)
            replayed = await service.decide(_request("gen-1"), may_exist=False)
            assert replayed["slots"] == first["slots"]  # the stored one, not a second copy
            again = await service.decide(_request("gen-1"))  # a client-given id: looked up
            return first, again
        finally:
            await service.close()

    first, again = asyncio.run(run())
    assert again["slots"] == first["slots"] and again["created_at"] == first["created_at"]
    assert _stored_rows(settings) == 1


def test_a_commit_of_unknown_outcome_is_retried_without_a_second_copy(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch commits, then the driver reports the connection lost: the retry finds the
    fresh decision stored and answers with it (``created`` false), on both stores."""
    real = BatchWriter._commit_once
    calls = {"n": 0}

    def commit_then_lose_the_answer(self: BatchWriter, batch: list[Any]) -> list[Any]:
        outcomes = real(self, batch)
        calls["n"] += 1
        if calls["n"] == 1:
            raise sa_exc.OperationalError("COMMIT", {}, ConnectionError("connection lost"))
        return outcomes

    monkeypatch.setattr(BatchWriter, "_commit_once", commit_then_lose_the_answer)

    async def run() -> tuple[dict, Any]:
        service = DecisionService(settings, load_policies(settings.policies_dir))
        await service.start()
        try:
            decided = await service.decide(_request("gen-2"), may_exist=False)
            stored = await service.get_decision("gen-2")
            return decided, stored
        finally:
            await service.close()

    decided, stored = asyncio.run(run())
    assert calls["n"] == 2  # committed, "lost", retried
    assert stored is not None and decided["created_at"] == stored["created_at"]
    assert decided["slots"] == stored["slots"]
    assert _stored_rows(settings) == 1
