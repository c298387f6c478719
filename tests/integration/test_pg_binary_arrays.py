"""The decision append's column arrays are encoded by the repository in PostgreSQL's binary
array format (``repository._binary_arrays``) instead of by psycopg's array dumper: the
server must receive exactly the arrays psycopg would have sent for the same values (the
same elements, bit for bit: ``array_send`` of both compared), and whatever the encoder
does not handle as psycopg does is left to psycopg."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine

from bandit_service.store import repository
from bandit_service.store.database import make_engine

VALUES: dict[str, list[Any]] = {
    "text": ["", "plain", "tab\there", "new\nline", "back\\slash", "\\N", 'quote"', "ünïcödé ✓",
             "\u2028", "𝄞 astral", None, "x" * 70_000, "{,}"],
    "float8": [0.0, -0.0, 1.0 / 3, 1e-300, 5e-324, -1.7976931348623157e308, math.inf,
               -math.inf, math.nan, None, 2.0**53 + 1],
    "int4": [0, 1, -1, 2**31 - 1, -(2**31), None, 7],
    "bool": [True, False, None, True],
}  # fmt: skip
COLUMN = {"text": "event_id", "float8": "created_at", "int4": "model_version", "bool": "deferred"}


@pytest.fixture
def raw(empty_database_url: str) -> Iterator[Any]:
    if not empty_database_url.startswith("postgresql"):
        pytest.skip("binary arrays are PostgreSQL's")
    engine: Engine = make_engine(empty_database_url)
    with engine.connect() as connection:
        yield connection.connection.driver_connection
        connection.rollback()
    engine.dispose()


def sent(raw: Any, kind: str, value: Any) -> tuple[bytes, list[Any]]:
    """What the server received: its own binary form of the array, and the elements."""
    row = raw.execute(f"SELECT array_send(%b::{kind}[]), %b::{kind}[]", [value, value]).fetchone()
    return bytes(row[0]), row[1]


@pytest.mark.parametrize("kind", sorted(VALUES))
@pytest.mark.parametrize("count", [1, 2, "all"])
def test_the_server_receives_what_psycopg_would_have_sent(raw: Any, kind: str, count: Any) -> None:
    values = VALUES[kind] if count == "all" else VALUES[kind][:count]
    values = repository._pg_array(COLUMN[kind], values)
    [encoded] = repository._binary_arrays(raw, [COLUMN[kind]], [values])
    assert isinstance(encoded, repository._EncodedArray)  # not left to psycopg
    ours, elements = sent(raw, kind, encoded)
    theirs, _ = sent(raw, kind, values)
    assert ours == theirs
    assert [repr(e) for e in elements] == [repr(v) for v in values]  # -0.0 and nan too


def test_all_nulls_and_the_lock_parameter(raw: Any) -> None:
    for kind in VALUES:
        [encoded] = repository._binary_arrays(raw, [COLUMN[kind]], [[None, None]])
        assert sent(raw, kind, encoded)[1] == [None, None]


def test_an_int4_out_of_range_is_left_to_psycopg_and_refused_as_before(raw: Any) -> None:
    from psycopg.errors import NumericValueOutOfRange

    [plain] = repository._binary_arrays(raw, ["model_version"], [[1, 2**31]])
    assert plain == [1, 2**31]
    with pytest.raises(NumericValueOutOfRange):
        sent(raw, "int4", plain)


def test_a_lone_surrogate_fails_in_the_client_as_with_psycopg(raw: Any) -> None:
    with pytest.raises(UnicodeEncodeError):
        repository._binary_arrays(raw, ["context_line"], [["ok", "lone \ud800"]])


def test_a_connection_not_in_utf8_is_left_to_psycopg(raw: Any) -> None:
    raw.execute("SET client_encoding TO 'LATIN1'")
    arrays = [["café"]]
    assert repository._binary_arrays(raw, ["event_id"], arrays) is arrays
    assert sent(raw, "text", arrays[0])[1] == ["café"]
