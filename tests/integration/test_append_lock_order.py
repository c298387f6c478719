"""Every decision append takes the candidate sets' rows and the log-append lock in one
order (the sets, then the lock), whichever path it goes: the pipelined statement
(``repository._append_postgresql``) or SQLAlchemy's (rows of differing columns). Taken in
opposite orders, two appenders of the same new set deadlock: one holds its uncommitted set
row and waits for the lock, the other holds the lock and waits for that row (PostgreSQL
then aborts one after ``deadlock_timeout``). Found in review: the SQLAlchemy path took
the lock first. Here both paths append decisions over the same new sets at the same
moment, round after round; with the old order this test failed with a deadlock within a
few rounds."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from bandit_service.store import repository
from bandit_service.store.database import make_engine
from bandit_service.store.models import DecisionRow

ROUNDS = 30


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    if not database_url.startswith("postgresql"):
        pytest.skip("the log-append lock exists on PostgreSQL only")
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def decision(event_id: str, round_: int) -> dict[str, Any]:
    candidates = [{"id": "a", "features": {"round": round_}}, {"id": "b", "features": {}}]
    return {
        "event_id": event_id, "policy": "p", "policy_version": "v", "model_version": 0,
        "arm": "bandit", "user_key": None, "context": {}, "candidates": candidates,
        "slots": [{"slot": 0, "id": "a", "probability": 0.5, "pmf": [["a", 0.5], ["b", 0.5]]}],
        "excluded": [], "created_at": 1.0, "deferred": False, "activated_at": None,
    }  # fmt: skip


def test_both_append_paths_take_sets_and_lock_in_one_order(
    db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = repository._append_decisions

    def by_thread(*args: Any) -> bool:
        # The thread named "sqlalchemy" appends as rows of differing columns would.
        if threading.current_thread().name == "sqlalchemy":
            return False
        return real(*args)

    monkeypatch.setattr(repository, "_append_decisions", by_thread)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def append(path: str) -> None:
        for n in range(ROUNDS):
            barrier.wait(timeout=30)
            try:
                with Session(db) as session, session.begin():
                    repository.insert_decisions(session, [decision(f"{path}-{n}", n)])
            except BaseException as exc:
                errors.append(exc)

    threads = [
        threading.Thread(target=append, args=(p,), name=p) for p in ("pipelined", "sqlalchemy")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    with Session(db) as session:
        assert session.scalar(select(func.count()).select_from(DecisionRow)) == 2 * ROUNDS
