"""Decisions whose event id the service generated skip the duplicate look-up on SQLite;
the store's unique key must still refuse a second copy, never store it twice. The refused
batch is retried with look-ups (its first commit may have happened after all, e.g. a
connection lost while committing), so the write is answered with the stored decision.
PostgreSQL's partitioned log has no unique index on event_id, so there they are looked up
(store/partitions.py)."""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bandit_service.config import Settings
from bandit_service.domain import Candidate, DecisionRequest, slot_list
from bandit_service.policy import load_policies
from bandit_service.service import DecisionService
from bandit_service.store.database import make_engine
from bandit_service.store.models import DecisionRow


def _request(event_id: str) -> DecisionRequest:
    candidates = tuple(Candidate(f"c{i}", {"n": i}) for i in range(4))
    return DecisionRequest(event_id, "default", candidates, slot_list(1), {"k": "v"})


def test_a_fresh_event_id_is_never_stored_twice(settings: Settings) -> None:
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
    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(DecisionRow)) == 1
    engine.dispose()
