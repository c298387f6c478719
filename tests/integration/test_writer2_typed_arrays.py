"""The PostgreSQL append sends each column as a list whose class names its array type
(``store/pg_arrays.py``), so psycopg does not work the type out from the elements. The
values stored must be exactly those of the plain lists it replaces -- for every element
type, with NULLs, an all-NULL column, integers where floats are stored and the other way
round, and a model version too large for the ``int2`` psycopg used to pick -- and a
connection that never got the dumpers must send the same values (the class then falls
back to ``list``'s own dumper). The usual append's cursor is kept per DBAPI connection
(``repository._append_cursor``) and must survive a statement the server refuses."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.types.array import ListBinaryDumper
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bandit_service.store import compact, pg_arrays, repository
from bandit_service.store.database import make_engine
from bandit_service.store.models import DecisionRow, RewardRow
from bandit_service.store.writer import BatchWriter, _Write

CANDIDATES = [{"id": "a", "features": {"x": 1}}, {"id": "b", "features": {"x": 2}}]


def decision(event_id: str, **changes: Any) -> dict[str, Any]:
    row = {
        "event_id": event_id, "policy": "p", "policy_version": "v", "model_version": 3,
        "arm": "bandit", "user_key": None, "context": {"k": event_id, "é": [1, 2.5]},
        "candidates": CANDIDATES,
        "slots": [{"slot": 0, "id": "a", "probability": 0.5, "pmf": [["a", 0.5], ["b", 0.5]]}],
        "excluded": [], "created_at": 1.5, "deferred": False, "activated_at": None,
    }  # fmt: skip
    row.update(changes)
    return row


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def commit(db: Engine, rows: list[dict[str, Any]]) -> None:
    writer = BatchWriter(db)
    try:
        batch = [_Write("decision", row, None, True) for row in rows]  # type: ignore[arg-type]
        assert all(o.created for o in writer._commit_once(batch))
    finally:
        writer._release_connection()


ROWS = [
    decision("e1"),
    decision("e2", user_key="u-2", model_version=70_000, created_at=7, activated_at=9),
    decision("e3", deferred=True, context_line="|c k=1", activated_at=2.25),
]


def test_stored_values_are_those_written(db: Engine) -> None:
    commit(db, [decision("first")])  # its candidate set is known stored from now on
    commit(db, [decision("anon-1"), decision("anon-2")])  # an all-NULL user_key column
    commit(db, ROWS)
    with Session(db) as session:
        stored = repository.find_decisions(session, [r["event_id"] for r in ROWS])
        lines = dict(session.execute(text("SELECT event_id, context_line FROM decisions")).all())
        anonymous = repository.find_decisions(session, ["anon-1", "anon-2"])
    assert [anonymous[e]["user_key"] for e in ("anon-1", "anon-2")] == [None, None]
    for row in ROWS:
        got = stored[row["event_id"]]
        for name in ("policy", "policy_version", "model_version", "arm", "user_key", "context",
                     "excluded", "deferred", "candidates"):  # fmt: skip
            assert got[name] == row[name], name
        assert got["created_at"] == row["created_at"] and type(got["created_at"]) is float
        activated = got["activated_at"]
        assert activated == row["activated_at"]
        assert activated is None or type(activated) is float
        assert got["slots"][0]["pmf"] == [["a", 0.5], ["b", 0.5]]
        assert lines[row["event_id"]] == row.get("context_line")


def test_rewards_store_the_values_written(db: Engine) -> None:
    commit(db, [decision("r1")])
    rows = [
        {"event_id": "r1", "slot": 0, "value": 1, "received_at": 3, "late": False,
         "kind": "click", "reward_id": "k1"},
        {"event_id": "r1", "slot": 0, "value": 0.25, "received_at": 4.5, "late": True,
         "kind": "view", "reward_id": None},
    ]  # fmt: skip
    with Session(db) as session, session.begin():
        assert repository.insert_rewards(session, rows) == {"k1"}
    with Session(db) as session:
        stored = session.execute(
            select(RewardRow.value, RewardRow.received_at, RewardRow.late, RewardRow.kind,
                   RewardRow.reward_id, RewardRow.decision_created_at).order_by(RewardRow.id)
        ).all()  # fmt: skip
    assert [tuple(r) for r in stored] == [(1.0, 3.0, False, "click", "k1", 1.5),
                                          (0.25, 4.5, True, "view", None, 1.5)]  # fmt: skip
    assert all(type(r[0]) is float and type(r[1]) is float for r in stored)


@pytest.mark.postgres
def test_the_statement_keeps_one_parameter_signature(db: Engine) -> None:
    """Typed arrays: model_version is int4[] whatever its values, an all-NULL user_key is
    text[] (psycopg picked int2[] for small versions and an untyped array for NULLs, so
    the prepared statement had a variant per combination)."""
    if db.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only")
    writer = BatchWriter(db)
    try:
        for n in range(8):  # past psycopg's prepare threshold
            row = decision(f"s{n}", model_version=n * 40_000, user_key=None if n % 2 else "u")
            writer._commit_once([_Write("decision", row, None, True)])  # type: ignore[arg-type]
        assert writer._connection is not None
        raw = writer._connection.connection.driver_connection
        signatures = raw.execute(
            "SELECT parameter_types::text[] FROM pg_prepared_statements "
            "WHERE statement LIKE '%pg_advisory_xact_lock%INSERT INTO decisions%'"
        ).fetchall()
    finally:
        writer._release_connection()
    assert len(signatures) == 1
    types = signatures[0][0]
    assert types.count("integer[]") == 1 and "smallint[]" not in types
    assert "bigint[]" not in types


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("kind", "values"),
    [
        ("text", ["a", "", "é ü", None, "x" * 300]),
        ("text", [None, None]),
        ("float8", [1.5, 2, None, -0.0, 1e300]),
        ("int4", [0, 2**31 - 1, None, -5]),
        ("bool", [True, False, None]),
    ],
)
def test_a_connection_without_the_dumpers_sends_the_same(
    database_url: str, kind: str, values: list[Any]
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    dsn = database_url.replace("postgresql+psycopg://", "postgresql://")
    typed = repository._pg_typed(kind, list(values))
    assert type(typed) is pg_arrays.ARRAY_TYPES[kind]
    with psycopg.connect(dsn, autocommit=True) as connection:
        (sent,) = connection.execute(f"SELECT %b::{kind}[]", [typed]).fetchone() or ()
        (as_list,) = connection.execute(f"SELECT %b::{kind}[]", [list(typed)]).fetchone() or ()
    with psycopg.connect(dsn, autocommit=True) as without:
        # What a connection made before pg_arrays registered its dumpers finds for the
        # class: list's own (binary) dumper, through the class's MRO.
        without.adapters.register_dumper(type(typed), ListBinaryDumper)
        (fallback,) = without.execute(f"SELECT %b::{kind}[]", [typed]).fetchone() or ()
    expected = [None if v is None else {"float8": float, "int4": int}.get(kind, type(v))(v)
                for v in values]  # fmt: skip
    assert sent == as_list == fallback == expected


@pytest.mark.postgres
def test_the_append_cursor_is_kept_per_connection_and_survives_a_failed_append(
    db: Engine,
) -> None:
    """The usual append (no set to send) reuses one cursor per DBAPI connection; a
    statement the server refuses on it leaves it usable; it goes with its connection."""
    if db.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only")
    key = compact.candidate_set(CANDIDATES)[0]
    other = [{"id": "z", "features": {}}]
    known = repository.StoredSets()
    known.add([key, compact.candidate_set(other)[0]])  # the second one is not stored
    with db.connect() as connection:
        with connection.begin():  # sends the set: the pipelined path
            repository.insert_decisions(connection, [decision("c1")], ends_transaction=True)
        cursors = []
        for event_id in ("c2", "c3"):
            with connection.begin():
                repository.insert_decisions(
                    connection, [decision(event_id)], stored_sets=known, ends_transaction=True
                )
            cursors.append(connection.connection.info[repository._APPEND_CURSOR])
        assert cursors[0] is cursors[1] and not cursors[0].closed
        with pytest.raises(IntegrityError), connection.begin():  # the foreign key refuses it
            repository.insert_decisions(
                connection, [decision("c4", candidates=other)], stored_sets=known,
                ends_transaction=True,
            )  # fmt: skip
        with connection.begin():
            repository.insert_decisions(
                connection, [decision("c5")], stored_sets=known, ends_transaction=True
            )
        assert connection.connection.info[repository._APPEND_CURSOR] is cursors[0]
        assert connection.connection.driver_connection.autocommit is False
        connection.invalidate()
        assert repository._APPEND_CURSOR not in connection.connection.info
    with Session(db) as session:
        stored = set(session.scalars(select(DecisionRow.event_id)))
    assert stored == {"c1", "c2", "c3", "c5"}
