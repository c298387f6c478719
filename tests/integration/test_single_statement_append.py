"""The writer's usual batch -- fresh decisions only, every candidate set known stored --
is appended on PostgreSQL as one statement in autocommit mode (``repository._append_alone``),
on the connection's own transaction without an ORM session (``writer._apply_fresh``). It
must keep every guarantee of the pipelined transaction it replaces: the batch commits
whole or not at all, positions commit in order behind the log-append lock (released when
the statement ends), the connection is never left in autocommit mode, and a failed batch
goes through the writer's retries as before. The failure cases run on SQLite too (the
same writer path, without the single statement)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bandit_service.errors import Unavailable
from bandit_service.store import repository
from bandit_service.store.database import make_engine
from bandit_service.store.models import DecisionRow
from bandit_service.store.writer import BatchWriter, DecisionWriteResult, _Write

CANDIDATES = [{"id": "a", "features": {"x": 1}}, {"id": "b", "features": {"x": 2}}]


def decision(event_id: str, created_at: float = 1.0) -> dict[str, Any]:
    return {
        "event_id": event_id, "policy": "p", "policy_version": "v", "model_version": 0,
        "arm": "bandit", "user_key": None, "context": {"k": event_id},
        "candidates": CANDIDATES,
        "slots": [{"slot": 0, "id": "a", "probability": 0.5, "pmf": [["a", 0.5], ["b", 0.5]]}],
        "excluded": [], "created_at": created_at, "deferred": False, "activated_at": None,
    }  # fmt: skip


def fresh(*rows: dict[str, Any]) -> list[_Write]:
    return [_Write("decision", row, None, True) for row in rows]  # type: ignore[arg-type]


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def alone(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The driver connection of each single-statement append, in order."""
    calls: list[Any] = []
    real = repository._append_alone

    def spy(raw: Any, *args: Any) -> None:
        calls.append(raw)
        real(raw, *args)

    monkeypatch.setattr(repository, "_append_alone", spy)
    return calls


@pytest.fixture
def appends(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The driver connection of each PostgreSQL append, whichever way it went."""
    calls: list[Any] = []
    real = repository._append_postgresql

    def spy(raw: Any, *args: Any) -> None:
        calls.append(raw)
        real(raw, *args)

    monkeypatch.setattr(repository, "_append_postgresql", spy)
    return calls


@pytest.fixture
def writer(db: Engine) -> Iterator[BatchWriter]:
    """A writer that has committed one batch, so its candidate set is known stored."""
    batch_writer = BatchWriter(db)
    assert batch_writer._commit_once(fresh(decision("known")))[0].created
    yield batch_writer
    batch_writer._release_connection()


def stored_ids(db: Engine) -> list[str]:
    with Session(db) as session:
        return list(session.scalars(select(DecisionRow.event_id).order_by(DecisionRow.position)))


@pytest.mark.parametrize("failure", ["server", "client"])
def test_a_failing_batch_commits_nothing_and_leaves_no_autocommit(
    db: Engine, writer: BatchWriter, appends: list[Any], alone: list[Any], failure: str
) -> None:
    """The bad row is the batch's last: a statement committed row by row, or a batch split
    across commits, would leave the first ones stored. (A value the client cannot encode
    fails before anything is sent, autocommit mode included.)"""
    bad = decision("bad")
    if failure == "server":
        bad["policy_version"] = None  # NOT NULL
    else:
        bad["context_line"] = "lone surrogate \ud800"  # the client cannot encode it
    batch = fresh(decision("good-1"), decision("good-2"), bad)
    with pytest.raises(IntegrityError if failure == "server" else UnicodeEncodeError):
        writer._commit_once(batch)
    assert stored_ids(db) == ["known"]
    if db.dialect.name == "postgresql":
        # The single-statement path was the one taken (for "client", psycopg's encoding
        # of the parameters failed in its execute, before anything was sent).
        assert len(appends) == 1 and len(alone) == 1
        raw = appends[-1]
        assert raw.autocommit is False
        assert raw.pgconn.transaction_status == 0  # idle: nothing half done
    # The writer's own retries (each write alone) store the good ones and answer 503 for
    # the bad one, as before.
    outcomes = writer._commit(fresh(decision("good-3"), bad))
    assert isinstance(outcomes[0], DecisionWriteResult) and outcomes[0].created
    assert isinstance(outcomes[1], Unavailable)
    assert stored_ids(db) == ["known", "good-3"]


def test_a_connection_that_failed_in_autocommit_mode_is_transactional_again(
    db: Engine, alone: list[Any]
) -> None:
    """The same connection, after a failed single-statement append: a transaction on it
    that is rolled back must leave nothing (it would, were autocommit still on)."""
    if db.dialect.name != "postgresql":
        pytest.skip("autocommit mode is used on PostgreSQL only")
    known = repository.StoredSets()
    with db.connect() as connection:
        with connection.begin():
            repository.insert_decisions(connection, [decision("first")])
        known.add([repository.compact.candidate_set(CANDIDATES)[0]])
        bad = decision("bad") | {"policy_version": None}
        with pytest.raises(IntegrityError), connection.begin():
            repository.insert_decisions(
                connection, [decision("ok"), bad], stored_sets=known, ends_transaction=True
            )
        assert len(alone) == 1
        transaction = connection.begin()
        repository.insert_decisions(connection, [decision("rolled-back")], stored_sets=known)
        transaction.rollback()
    assert stored_ids(db) == ["first"]


def test_the_single_statement_waits_for_the_log_append_lock_and_releases_it(
    db: Engine, writer: BatchWriter, alone: list[Any]
) -> None:
    """Positions commit in order: while another transaction holds the log-append lock
    (an uncommitted append), the writer's single statement waits; once it has committed,
    no advisory lock is left held."""
    if db.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time")
    first = Session(db)
    first.begin()
    repository.insert_decisions(first, [decision("first")])
    done = threading.Event()
    errors: list[BaseException] = []

    def second() -> None:
        try:
            writer._commit_once(fresh(decision("second-1"), decision("second-2")))
        except BaseException as exc:
            errors.append(exc)
        done.set()

    thread = threading.Thread(target=second)
    thread.start()
    try:
        assert not done.wait(0.5)  # held behind the uncommitted first append
        assert len(alone) == 1
    finally:
        first.commit()
        first.close()
    assert done.wait(10)
    thread.join()
    assert not errors, errors[0]
    assert stored_ids(db) == ["known", "first", "second-1", "second-2"]
    with db.connect() as connection:
        held = connection.execute(
            text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = :pid"),
            {"pid": alone[0].info.backend_pid},
        ).scalar_one()
    assert held == 0


def test_a_dead_connection_costs_one_retry_on_the_fresh_path(
    db: Engine, writer: BatchWriter, alone: list[Any]
) -> None:
    """The kept connection died (a store restart): the single statement fails as the store
    being unreachable, and the writer's retry on a fresh connection stores the batch."""
    if db.dialect.name != "postgresql":
        pytest.skip("a server-side disconnect needs PostgreSQL")
    held = writer._connection
    assert held is not None
    pid = held.connection.driver_connection.info.backend_pid
    with db.connect() as other:
        other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    outcomes = writer._commit(fresh(decision("after-1"), decision("after-2")))
    assert [o.created for o in outcomes] == [True, True]
    assert writer._connection is not held
    assert len(alone) == 1  # the failed attempt; the retry sends its set again (pipelined)
    assert stored_ids(db) == ["known", "after-1", "after-2"]


def test_an_event_id_repeated_within_a_fresh_batch_is_stored_once(
    db: Engine, writer: BatchWriter
) -> None:
    """As ``writer._apply`` answers it: the first write is created, a later one with the
    same id is answered with the first one, and one row is stored."""
    first, again = decision("twice"), decision("twice", created_at=2.0)
    outcomes = writer._commit_once(fresh(first, again, decision("once")))
    assert [(o.created, o.row is first) for o in outcomes] == [
        (True, True), (False, True), (True, False)
    ]  # fmt: skip
    assert stored_ids(db) == ["known", "twice", "once"]
