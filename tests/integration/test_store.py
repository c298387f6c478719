"""Store behaviour on SQLite and PostgreSQL: migrations, group commit, restart durability."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session

from bandit_service.config import Settings
from bandit_service.domain import Candidate, DecisionRequest, slot_list
from bandit_service.policy import load_policies
from bandit_service.service import DecisionService
from bandit_service.store.database import (
    check_ready,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    upgrade,
)
from bandit_service.store.models import DecisionRow, RewardRow

TABLES = {
    "decisions", "rewards", "service_meta", "model_checkpoints", "trainer_leases",
    "catalog_items", "catalog_versions",
}  # fmt: skip


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) & (TABLES | {"alembic_version"})
    finally:
        engine.dispose()


def test_migrations_up_down_up(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    assert check_ready(engine)[0] is False
    upgrade(empty_database_url)
    assert _tables(empty_database_url) >= TABLES
    assert current_revision(engine) == head_revision()
    assert check_ready(engine) == (True, "ok")
    downgrade(empty_database_url, "base")
    assert not TABLES & _tables(empty_database_url)
    assert check_ready(engine)[0] is False
    upgrade(empty_database_url)
    assert _tables(empty_database_url) >= TABLES
    engine.dispose()


def _request(event_id: str, user: str | None = None) -> DecisionRequest:
    return DecisionRequest(
        event_id=event_id,
        policy="default",
        candidates=tuple(Candidate(f"c{i}", {"n": i}) for i in range(4)),
        slots=slot_list(1),
        context={"k": "v"},
        user_id=user,
    )


async def _run_burst(settings: Settings, count: int) -> DecisionService:
    service = DecisionService(settings, load_policies(settings.policies_dir))
    await service.start()
    ids = [f"burst-{i}" for i in range(count)]
    # Several requests for one id at once, plus repeats: still one stored decision each.
    requests = [_request(i, user="alice") for i in ids] + [_request(ids[0]), _request(ids[1])]
    results = await asyncio.gather(*(service.decide(r) for r in requests))
    assert results[0]["slots"] == results[-2]["slots"]
    await asyncio.gather(
        *(service.reward(i, 0.5, None, None) for i in ids), service.reward(ids[0], 1.0, 0, None)
    )
    await service.close()
    return service


def test_concurrent_writes_are_batched_and_survive_a_restart(settings: Settings) -> None:
    service = asyncio.run(_run_burst(settings, 200))
    assert service.writer.batches_committed < service.writer.rows_committed  # group commit
    engine = make_engine(settings.database_url)  # a fresh process's view of the store
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(DecisionRow)) == 200
        assert session.scalar(select(func.count()).select_from(RewardRow)) == 201
        keys = set(session.scalars(select(DecisionRow.user_key)))
        assert len(keys) == 1 and "alice" not in next(iter(keys))  # hashed, never raw
    engine.dispose()


def test_repeated_event_id_returns_the_stored_decision_after_restart(settings: Settings) -> None:
    async def first() -> dict:
        service = DecisionService(settings, load_policies(settings.policies_dir))
        await service.start()
        row = await service.decide(_request("once"))
        await service.close()
        return row

    stored = asyncio.run(first())
    time.sleep(0.01)
    again = asyncio.run(first())  # a new service instance (model untouched, same draw)
    assert again["created_at"] == stored["created_at"]  # the stored row, not a new decision


@pytest.mark.parametrize("how", ["sum", "first", "last"])
def test_aggregation(how: str) -> None:
    from bandit_service.rewards import aggregate

    expected = {"sum": 3.0, "first": 1.0, "last": 2.0}[how]
    assert aggregate([1.0, 0.0, 2.0], how) == expected
    assert aggregate([], how) is None


def test_two_processes_racing_on_one_event_id_both_get_the_stored_decision(
    settings: Settings,
) -> None:
    """A client retrying on another worker: both try to insert the same event id at once.
    Neither may fail; both must answer with the one stored decision."""

    async def race() -> None:
        policies = load_policies(settings.policies_dir)
        first = DecisionService(settings.model_copy(update={"trainer": "off"}), policies)
        second = DecisionService(settings.model_copy(update={"trainer": "off"}), policies)
        await first.start()
        await second.start()
        for i in range(20):
            a, b = await asyncio.gather(
                first.decide(_request(f"race-{i}", user="u")),
                second.decide(_request(f"race-{i}", user="u")),
            )
            assert a["slots"] == b["slots"] and a["created_at"] == b["created_at"]
        await first.close()
        await second.close()

    asyncio.run(race())
    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(DecisionRow)) == 20
    engine.dispose()


def test_a_replayed_reward_write_is_stored_once(settings: Settings) -> None:
    from bandit_service.store import repository

    asyncio.run(_run_burst(settings, 2))
    engine = make_engine(settings.database_url)
    row = {"event_id": "burst-0", "slot": 0, "value": 1.0, "received_at": 1.0, "late": False,
           "kind": "primary", "reward_id": "0f8fad5b-d9cb-469f-a165-70867728950e"}  # fmt: skip
    for _ in range(2):  # e.g. a batch retried after a commit whose outcome was unknown
        with Session(engine) as session, session.begin():
            repository.insert_rewards(session, [row])
    with Session(engine) as session:
        stored = session.scalars(select(RewardRow).where(RewardRow.reward_id == row["reward_id"]))
        assert len(list(stored)) == 1
    engine.dispose()


def test_the_user_hash_key_is_created_once_under_concurrency(settings: Settings) -> None:
    import concurrent.futures
    import secrets

    from bandit_service.store import repository

    engine = make_engine(settings.database_url)

    def create() -> str:
        with Session(engine) as session, session.begin():
            return repository.get_or_create_meta(session, "k", lambda: secrets.token_hex(8))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        values = list(pool.map(lambda _i: create(), range(16)))
    assert len(set(values)) == 1
    engine.dispose()
