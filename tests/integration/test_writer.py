"""The group-commit writer (store/writer.py): its thread hand-off, the connection it keeps
between batches, and the PostgreSQL ``COPY`` append (store/repository.py) must keep the
durability contract: answered only after commit, everything accepted before close() is
committed, a cancelled request's write still commits, a dead connection costs one retry,
and the log holds exactly what an ``INSERT`` would have stored."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from bandit_service.errors import Unavailable
from bandit_service.store import repository, writer
from bandit_service.store.database import make_engine
from bandit_service.store.models import DecisionRow
from bandit_service.store.writer import BatchWriter
from tests.integration.test_retention import decision


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def count(db: Engine) -> int:
    with Session(db) as session:
        return int(session.scalar(select(func.count()).select_from(DecisionRow)) or 0)


def test_concurrent_writes_share_commits_and_close_flushes_what_is_queued(db: Engine) -> None:
    async def run() -> tuple[list[Any], BatchWriter]:
        batch_writer = BatchWriter(db)
        batch_writer.start()
        tasks = [
            asyncio.ensure_future(batch_writer.write_decision(decision(f"e{i}", "p", 1.0 + i)))
            for i in range(200)
        ]
        await asyncio.sleep(0)  # every write queued...
        await batch_writer.close()  # ...and close() returns only when all are committed
        assert all(task.done() for task in tasks)
        with pytest.raises(Unavailable):
            await batch_writer.write_decision(decision("late", "p", 1.0))
        return [task.result() for task in tasks], batch_writer

    results, batch_writer = asyncio.run(run())
    assert all(r.created for r in results)
    assert batch_writer.rows_committed == 200
    assert batch_writer.batches_committed < 200  # grouped
    assert count(db) == 200


def test_a_cancelled_request_still_has_its_write_committed(db: Engine) -> None:
    async def run() -> None:
        batch_writer = BatchWriter(db)
        batch_writer.start()
        task = asyncio.ensure_future(batch_writer.write_decision(decision("gone", "p", 1.0)))
        await asyncio.sleep(0)
        task.cancel()  # the client went away after the write was queued
        with pytest.raises(asyncio.CancelledError):
            await task
        await batch_writer.close()

    asyncio.run(run())
    with Session(db) as session:
        assert repository.get_decision(session, "gone") is not None


def test_the_writer_gives_its_connection_back_when_idle(
    db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "IDLE_RELEASE_SECONDS", 0.05)

    async def run() -> None:
        batch_writer = BatchWriter(db)
        batch_writer.start()
        await batch_writer.write_decision(decision("a", "p", 1.0))
        deadline = time.monotonic() + 5
        while batch_writer._connection is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert batch_writer._connection is None
        await batch_writer.write_decision(decision("b", "p", 2.0))  # checked out again
        await batch_writer.close()
        assert batch_writer._connection is None

    asyncio.run(run())
    assert count(db) == 2


def test_a_kept_connection_that_died_costs_one_retry_not_a_write(db: Engine) -> None:
    if db.dialect.name != "postgresql":
        pytest.skip("a server-side disconnect needs PostgreSQL")

    async def run() -> None:
        batch_writer = BatchWriter(db)
        batch_writer.start()
        try:
            await batch_writer.write_decision(decision("before", "p", 1.0))
            held = batch_writer._connection
            assert held is not None
            pid = held.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            held.rollback()
            with db.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            result = await batch_writer.write_decision(decision("after", "p", 2.0))
            assert result.created
            assert batch_writer._connection is not held
        finally:
            await batch_writer.close()

    asyncio.run(run())
    assert count(db) == 2


AWKWARD = {
    "tab\there": "new\nline",
    "back\\slash": "\\N",
    'quote"': "ünïcödé ✓ \u2028",
    "nested": {"list": [1, 2.5, None, True, "\r\n"], "empty": {}},
    "big": 2**53 + 1,
    "small": 1e-300,
}


def test_the_log_stores_exactly_what_was_written(db: Engine) -> None:
    """Text that needs escaping in ``COPY`` (tabs, newlines, backslashes, ``\\N``),
    unicode, nested JSON and exact floats come back as written; a row without
    ``deferred`` gets the default; positions follow the batch order."""
    rows = []
    for i in range(5):
        row = decision(f"w{i}", "p", 1.0 + i / 3)
        row["context"] = {**AWKWARD, "i": i}
        row["context_line"] = "|c tab\there \\N new\nline" if i else None
        row["excluded"] = ["a\tb", "c\\d"]
        row["user_key"] = None if i % 2 else "u\t1"
        rows.append(row)
    no_deferred = decision("w-default", "p", 9.0)
    del no_deferred["deferred"]
    with Session(db) as session, session.begin():
        repository.insert_decisions(session, rows)
        repository.insert_decisions(session, [no_deferred])  # its own batch: other columns
    with Session(db) as session:
        found = repository.find_decisions(session, [r["event_id"] for r in rows])
        lines = {
            e: c for e, c in session.execute(select(DecisionRow.event_id, DecisionRow.context_line))
        }
        order = list(session.scalars(select(DecisionRow.event_id).order_by(DecisionRow.position)))
        default = repository.get_decision(session, "w-default")
    assert order == [*(r["event_id"] for r in rows), "w-default"]
    for row in rows:
        stored = found[row["event_id"]]
        for key in ("context", "excluded", "user_key", "created_at", "slots", "candidates"):
            assert stored[key] == row[key], key
        assert lines[row["event_id"]] == row["context_line"]
    assert default is not None and default["deferred"] is False


def test_rows_of_different_columns_in_one_batch_are_stored_too(db: Engine) -> None:
    plain = decision("plain", "p", 1.0)
    rendered = {**decision("rendered", "p", 2.0), "context_line": "|c x"}
    del plain["activated_at"]
    with Session(db) as session, session.begin():
        repository.insert_decisions(session, [plain, rendered])
    with Session(db) as session:
        lines = {
            e: c for e, c in session.execute(select(DecisionRow.event_id, DecisionRow.context_line))
        }
        stored = repository.get_decision(session, "plain")
    assert lines == {"plain": None, "rendered": "|c x"}
    assert stored is not None and stored["activated_at"] is None


def test_a_driver_error_surfaces_as_sqlalchemys(db: Engine) -> None:
    """The writer tells a bad write from an unreachable store by SQLAlchemy's exception
    types; the driver-level append must raise those, not sqlite3's or psycopg's."""
    from sqlalchemy.exc import IntegrityError

    with Session(db) as session, session.begin():
        repository.insert_decisions(session, [decision("twice", "p", 1.0)])
    rows = [{**decision("twice", "p", 1.0), "candidates": [{"id": "a"}, {"id": "other"}]}]
    rows[0]["slots"] = [{"slot": 0, "id": "a", "probability": 1.0, "pmf": [["a", 1.0]]}]
    with Session(db) as session, session.begin():
        if db.dialect.name == "postgresql":  # no unique key there: a NOT NULL one instead
            rows[0]["policy_version"] = None
        with pytest.raises(IntegrityError):
            repository.insert_decisions(session, rows)
        session.rollback()


def test_appends_commit_in_position_order_across_transactions(db: Engine) -> None:
    """PostgreSQL: a second appender waits for the first one's commit (the log-append lock
    that insert_decisions takes), so a trainer past a position never misses an earlier one."""
    if db.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time")
    import threading

    first = Session(db)
    first.begin()
    repository.insert_decisions(first, [decision("first", "p", 1.0)])
    done = threading.Event()

    def second() -> None:
        with Session(db) as session, session.begin():
            repository.insert_decisions(session, [decision("second", "p", 2.0)])
        done.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert not done.wait(0.5)  # held behind the uncommitted first append
    first.commit()
    first.close()
    assert done.wait(10)
    thread.join()
    with Session(db) as session:
        order = list(session.scalars(select(DecisionRow.event_id).order_by(DecisionRow.position)))
    assert order == ["first", "second"]
