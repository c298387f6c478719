"""The writer's memo of stored candidate sets (``repository.StoredSets``): a set it has
committed is not sent again, and a set deleted since (orphan clean-up by erasure or
retention, maybe in another process) costs one retry, never a lost decision or an error
answer: the ``decisions -> candidate_sets`` foreign key refuses the decision, and the
writer retries the batch with its sets."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, delete, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bandit_service.store import compact, repository
from bandit_service.store import privacy as privacy_store
from bandit_service.store.database import make_engine
from bandit_service.store.models import CandidateSetRow, DecisionRow
from bandit_service.store.writer import BatchWriter

CANDIDATES = [{"id": "a", "features": {"x": 1}}, {"id": "b", "features": {"x": 2}}]
KEY = compact.candidate_set(CANDIDATES)[0]


def decision(event_id: str, created_at: float = 1.0) -> dict[str, Any]:
    return {
        "event_id": event_id, "policy": "p", "policy_version": "v", "model_version": 0,
        "arm": "bandit", "user_key": f"user-{event_id}", "context": {"k": event_id},
        "candidates": CANDIDATES,
        "slots": [{"slot": 0, "id": "a", "probability": 0.5, "pmf": [["a", 0.5], ["b", 0.5]]}],
        "excluded": [], "created_at": created_at, "deferred": False, "activated_at": None,
    }  # fmt: skip


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sent_sets(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The candidate-set keys each append sent to the store, in order."""
    sent: list[list[str]] = []
    real = repository._append_decisions

    def spy(session: Session, dialect: str, sets: list[tuple[str, str]], *args: Any) -> bool:
        sent.append([key for key, _text in sets])
        return real(session, dialect, sets, *args)

    monkeypatch.setattr(repository, "_append_decisions", spy)
    return sent


def drop_set_of(db: Engine, event_ids: list[str]) -> None:
    """What erasure does: the decisions go, then their set, now orphaned."""
    with Session(db) as session, session.begin():
        session.execute(delete(DecisionRow).where(DecisionRow.event_id.in_(event_ids)))
        assert privacy_store.drop_orphaned_sets(session, [KEY]) == 1


def test_a_stored_set_is_sent_once_and_a_deleted_one_is_written_again(
    db: Engine, sent_sets: list[list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    async def run() -> list[Any]:
        writer = BatchWriter(db)
        writer.start()
        try:
            results = [await writer.write_decision(decision("first"), fresh=True)]
            results.append(await writer.write_decision(decision("second"), fresh=True))
            assert KEY in writer._known_sets
            drop_set_of(db, ["first", "second"])  # behind the writer's back
            results.append(await writer.write_decision(decision("third"), fresh=True))
            results.append(await writer.write_decision(decision("fourth"), fresh=True))
            return results
        finally:
            await writer.close()

    with caplog.at_level("INFO", logger="bandit_service.store.writer"):
        results = asyncio.run(run())
    assert [r.created for r in results] == [True] * 4
    # Sent with the first decision, not with the second; the third's batch was refused
    # by the foreign key and retried whole with its set; the fourth sends none again.
    assert sent_sets == [[KEY], [], [], [KEY], []]
    assert "known candidate set was deleted" in caplog.text
    with Session(db) as session:
        stored = repository.find_decisions(session, ["first", "second", "third", "fourth"])
        assert sorted(stored) == ["fourth", "third"]
        for event_id in ("third", "fourth"):
            assert stored[event_id]["candidates"] == CANDIDATES
            assert stored[event_id]["slots"] == decision(event_id)["slots"]
        assert session.scalars(select(CandidateSetRow.key)).all() == [KEY]


def test_no_memo_where_the_foreign_key_is_not_enforced(
    db: Engine, sent_sets: list[list[str]]
) -> None:
    """A SQLite connection without ``PRAGMA foreign_keys=ON`` would store a decision over
    a deleted set: the writer then sends every set, as before."""
    if db.dialect.name != "sqlite":
        pytest.skip("PostgreSQL always enforces its constraints")
    from sqlalchemy import event

    @event.listens_for(db, "connect")
    def _foreign_keys_off(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA foreign_keys=OFF")

    async def run() -> None:
        writer = BatchWriter(db)
        writer.start()
        try:
            for event_id in ("first", "second"):
                assert (await writer.write_decision(decision(event_id), fresh=True)).created
        finally:
            await writer.close()

    asyncio.run(run())
    assert sent_sets == [[KEY], [KEY]]


def _wait_for_lock_wait(db: Engine, deadline: float) -> None:
    """Until some other backend waits for a lock (the writer, on the deleted row)."""
    while time.monotonic() < deadline:
        with db.connect() as connection:
            waiting = connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND pid <> pg_backend_pid() AND datname = current_database() "
                    "AND query LIKE '%INSERT INTO decisions%'"
                )
            ).scalar_one()
        if waiting:
            return
        time.sleep(0.02)
    raise AssertionError("the writer never waited for the uncommitted delete")


def test_a_delete_committing_while_the_writer_relies_on_the_set(db: Engine) -> None:
    """PostgreSQL, the race: the set is deleted (uncommitted) when the writer's batch,
    trusting its memo, inserts a decision over it. The foreign-key check waits for the
    deleting transaction; once that commits, the check fails, and the retry writes the
    set again: the decision is stored, with its candidates."""
    if db.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: a delete and a write cannot overlap")

    async def run() -> Any:
        writer = BatchWriter(db)
        writer.start()
        try:
            assert (await writer.write_decision(decision("first"), fresh=True)).created
            deleter = Session(db)
            deleter.begin()
            deleter.execute(delete(DecisionRow).where(DecisionRow.event_id == "first"))
            assert privacy_store.drop_orphaned_sets(deleter, [KEY]) == 1
            pending = asyncio.ensure_future(writer.write_decision(decision("second"), fresh=True))
            await asyncio.to_thread(_wait_for_lock_wait, db, time.monotonic() + 10)
            assert not pending.done()
            deleter.commit()
            deleter.close()
            return await pending
        finally:
            await writer.close()

    result = asyncio.run(run())
    assert result.created
    with Session(db) as session:
        stored = repository.get_decision(session, "second")
        assert stored is not None and stored["candidates"] == CANDIDATES
        assert repository.get_decision(session, "first") is None


def test_an_orphan_drop_racing_a_decision_over_its_set_fails_safe(db: Engine) -> None:
    """PostgreSQL, the other order: a decision over a set (not sent: the memo knew it) is
    inserted but not yet committed when the orphan clean-up deletes the set. The delete
    waits for the decision's commit and then fails on the foreign key (as it does when
    the set was sent with ``ON CONFLICT DO NOTHING``): the set and the decision stay."""
    if db.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: a delete and a write cannot overlap")
    with Session(db) as session, session.begin():
        repository.insert_decisions(session, [decision("old")])
        session.execute(delete(DecisionRow).where(DecisionRow.event_id == "old"))
    known = repository.StoredSets()
    known.add([KEY])
    writing = Session(db)
    writing.begin()
    repository.insert_decisions(writing, [decision("new")], stored_sets=known)
    outcome: list[BaseException | int] = []

    def drop() -> None:
        try:
            with Session(db) as session, session.begin():
                outcome.append(privacy_store.drop_orphaned_sets(session, [KEY]))
        except BaseException as exc:
            outcome.append(exc)

    dropper = threading.Thread(target=drop)
    dropper.start()
    dropper.join(0.5)
    assert dropper.is_alive()  # waits for the uncommitted decision's key-share lock
    writing.commit()
    writing.close()
    dropper.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], IntegrityError)
    with Session(db) as session:
        stored = repository.get_decision(session, "new")
        assert stored is not None and stored["candidates"] == CANDIDATES


@pytest.mark.parametrize("failure", ["server", "client"])
def test_a_failed_append_that_ends_its_transaction_leaves_nothing(db: Engine, failure: str) -> None:
    """PostgreSQL sends BEGIN, the sets, the rows and COMMIT in one pipeline, the
    connection in autocommit mode meanwhile: a batch refused by the server (a NOT NULL
    column), or failing in the client after its candidate set was sent (a string the
    driver cannot encode), stores nothing, not even the set, and leaves the connection as
    it was: not in autocommit, the next transaction working as usual."""
    row = decision("bad")
    row["candidates"] = [{"id": "only-here"}]
    row["slots"] = [{"slot": 0, "id": "only-here", "probability": 1.0,
                     "pmf": [["only-here", 1.0]]}]  # fmt: skip
    if failure == "server":
        row["policy_version"] = None
    else:
        row["context_line"] = "lone surrogate \ud800"  # psycopg cannot encode it
    expected = IntegrityError if failure == "server" else UnicodeEncodeError
    with Session(db) as session:
        with pytest.raises(expected), session.begin():
            repository.insert_decisions(session, [row], ends_transaction=True)
        raw = session.connection().connection.driver_connection
        if db.dialect.name == "postgresql":
            assert raw.autocommit is False
    with Session(db) as session, session.begin():
        repository.insert_decisions(session, [decision("good")])
    with Session(db) as session:
        assert session.scalars(select(DecisionRow.event_id)).all() == ["good"]
        assert session.scalars(select(CandidateSetRow.key)).all() == [KEY]
