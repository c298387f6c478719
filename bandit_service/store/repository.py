"""Repository functions over a SQLAlchemy ``Session``. None of them commits."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import orjson
from sqlalchemy import (
    JSON,
    Connection,
    CursorResult,
    Engine,
    Table,
    Text,
    Update,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy import cast as cast_
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bandit_service.errors import NotFound
from bandit_service.learners.vw_text import RenderedContext
from bandit_service.store import compact
from bandit_service.store.models import (
    CandidateSetRow,
    DecisionRow,
    MetaRow,
    ModelCheckpointRow,
    RewardRow,
    TrainerLeaseRow,
)

# ``context_line`` is a rendering of ``context`` for the trainer only, not part of what a
# decision means: readers get the written shape without it.
DECISION_COLUMNS = [
    c.name for c in DecisionRow.__table__.columns if c.name not in ("position", "context_line")
]


def find_decisions(session: Session, event_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Stored decisions among ``event_ids``, as column dicts keyed by event id."""
    ids = list(event_ids)
    if not ids:
        return {}
    rows = session.execute(_DECISIONS.where(DecisionRow.event_id.in_(ids)))
    return {d["event_id"]: d for d in _classic(session, [dict(r._mapping) for r in rows])}


_DECISIONS = select(*[DecisionRow.__table__.c[name] for name in ["position", *DECISION_COLUMNS]])


def get_decision(session: Session, event_id: str) -> dict[str, Any] | None:
    return find_decisions(session, [event_id]).get(event_id)


def _classic(session: Session, decisions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored decisions in the shape they were written in: ``candidates`` as a list of
    ``{"id", "features"}`` and each slot's ``pmf`` as ``[[id, p], …]`` (store/compact.py)."""
    sets = {
        key: orjson.loads(text)
        for key, text in candidate_set_texts(session, {d["candidate_set"] for d in decisions})
    }
    ids = {key: [c["id"] for c in candidates] for key, candidates in sets.items()}
    for d in decisions:
        d["candidates"] = sets[d["candidate_set"]]
        d["slots"] = compact.expand_slots(d["slots"], ids[d["candidate_set"]])
    return decisions


def candidate_set_texts(session: Session, keys: Iterable[str]) -> list[tuple[str, str]]:
    """``(key, candidates JSON text)`` of the given candidate sets."""
    wanted = list(keys)
    found: list[tuple[str, str]] = []
    for start in range(0, len(wanted), 500):  # bounded IN lists
        query = select(CandidateSetRow.key, CandidateSetRow.candidates).where(
            CandidateSetRow.key.in_(wanted[start : start + 500])
        )
        found.extend((key, text) for key, text in session.execute(query))
    return found


REWARD_LOOKUP_COLUMNS = [
    "event_id", "policy", "arm", "model_version", "slots", "deferred", "created_at",
    "activated_at",
]  # fmt: skip
# Built once: constructing a SELECT costs more Python than running this one on SQLite.
_REWARD_LOOKUP = select(*[DecisionRow.__table__.c[name] for name in REWARD_LOOKUP_COLUMNS]).where(
    DecisionRow.__table__.c.event_id == bindparam("event_id")
)


def decision_policy(session: Session, event_id: str) -> str | None:
    """The policy of a stored decision, or None."""
    return session.execute(
        select(DecisionRow.policy).where(DecisionRow.event_id == event_id)
    ).scalar_one_or_none()


def decision_for_reward(session: Session, event_id: str) -> dict[str, Any] | None:
    """The columns a reward needs (policy, what was shown, when): not the candidates and
    context, whose decoding was most of a reward's cost (they are the bulk of a row)."""
    row = session.execute(_REWARD_LOOKUP, {"event_id": event_id}).one_or_none()
    return dict(row._mapping) if row is not None else None


_REWARD_LOOKUP_SQL = {
    dialect: f"SELECT {', '.join(REWARD_LOOKUP_COLUMNS)} FROM decisions WHERE event_id = {mark}"
    for dialect, mark in (("postgresql", "%s"), ("sqlite", "?"))
}
_REWARD_LOOKUP_SQL["postgresql"] = _REWARD_LOOKUP_SQL["postgresql"].replace(
    "slots,", "slots::text,"
)


def find_decision_for_reward(engine: Engine, event_id: str) -> dict[str, Any] | None:
    """:func:`decision_for_reward` on a connection of its own, through the driver.

    Why: with a ``Session`` and SQLAlchemy's execute, this look-up was ~31% of the
    process's time on the PostgreSQL reward workload (py-spy, benchmarks/profile_service.py):
    the session, the ORM's statement compilation and result processing cost several times
    the query. On PostgreSQL the one ``SELECT`` also runs in autocommit mode (as
    SQLAlchemy's own pre-ping does): psycopg's ``BEGIN`` and the pool's ``ROLLBACK`` on
    return were two more round trips for a single read, which sees one snapshot either
    way. The values are decoded as the engine would: ``slots`` with orjson (the engine's
    ``json_deserializer``), ``deferred`` as a bool (SQLite stores 0/1)."""
    dialect = engine.dialect.name
    if dialect not in _REWARD_LOOKUP_SQL:
        with Session(engine) as session:
            return decision_for_reward(session, event_id)
    with engine.connect() as connection, _driver_connection(connection) as raw:
        autocommit = dialect == "postgresql" and raw.pgconn.transaction_status == _IDLE
        if autocommit:
            raw.autocommit = True
        cursor = raw.cursor()
        try:
            cursor.execute(_REWARD_LOOKUP_SQL[dialect], (event_id,))
            found = cursor.fetchone()
        finally:
            cursor.close()
            if autocommit:
                # Back to the pool as it came. Only an idle connection can leave autocommit
                # mode (psycopg refuses otherwise, which would hide the error being raised);
                # one that is not idle after a lone SELECT is broken, and is discarded.
                if raw.pgconn.transaction_status == _IDLE:
                    raw.autocommit = False
                elif not connection.invalidated:
                    connection.invalidate()
    if found is None:
        return None
    row = dict(zip(REWARD_LOOKUP_COLUMNS, found, strict=True))
    row["slots"] = orjson.loads(row["slots"])
    if row["deferred"] is not None:
        row["deferred"] = bool(row["deferred"])
    return row


def insert_decisions(
    session: Session | Connection,
    rows: Sequence[dict[str, Any]],
    *,
    stored_sets: StoredSets | None = None,
    ends_transaction: bool = False,
) -> list[str]:
    """Append decisions given in their written shape (``candidates`` a list, slots with
    ``pmf``), storing each distinct candidate set once and distributions compactly (the
    engine's ``pmf``, a ``domain.Distribution``, already positional: store/compact.py).
    Returns the keys of the rows' candidate sets.

    On PostgreSQL this takes the log-append lock (:func:`serialize_log_appends`) after
    inserting the candidate sets and before the decisions, so every appender's positions
    commit in order, not only the writer's; every path takes the two in that order.

    ``stored_sets``: keys of sets known to be committed in this store already; those are
    not sent again (see :class:`StoredSets` for why that is safe). ``ends_transaction``:
    the caller writes nothing more in this transaction, so on PostgreSQL the COMMIT goes
    in the same round trip as the rows (the caller's own commit then has nothing to do).

    ``session`` may be a ``Connection`` in a transaction: the writer's usual batch (fresh
    decisions only) goes without an ORM session (``writer._apply_fresh``)."""
    if not rows:
        return []
    sets: dict[str, str] = {}
    stored: list[dict[str, Any]] = []
    for row in rows:
        candidates = row["candidates"]
        key, text = compact.candidate_set(candidates)
        sets[key] = text
        # A copy less "candidates", keys in order (~0.25 µs; a filtering comprehension
        # took ~1.1 for a decision's 14 columns).
        out = row.copy()
        del out["candidates"]
        out["candidate_set"] = key
        out.setdefault("context_line", None)  # rows built without a learner's rendering
        out["slots"] = compact.compact_row_slots(row["slots"], candidates)
        stored.append(out)
    if all(out["context_line"] is None for out in stored):
        # Left out, as the ORM's insert did, so the statement also fits a store migrated
        # only as far as 0006 (before the column existed; tests/integration/test_positions).
        for out in stored:
            del out["context_line"]
    dialect = _dialect_name(session)
    candidate_sets = sorted(
        item for item in sets.items() if stored_sets is None or item[0] not in stored_sets
    )
    if dialect in _INSERT_SETS_SQL and _append_decisions(
        session, dialect, candidate_sets, stored, ends_transaction
    ):
        return list(sets)
    # The same order as _append_postgresql: the sets, then the log-append lock. Two
    # appenders taking them in opposite orders deadlock when both insert the same new set
    # (one holds its uncommitted set row and waits for the lock, the other the reverse).
    if candidate_sets:
        session.execute(
            _INSERT_CANDIDATE_SETS[dialect],
            [{"key": key, "candidates": text} for key, text in candidate_sets],
        )
    serialize_log_appends(session)
    session.execute(_INSERT_DECISIONS, stored)
    return list(sets)


def _sa_connection(session: Session | Connection) -> Connection:
    return session.connection() if isinstance(session, Session) else session


def _dialect_name(session: Session | Connection) -> str:
    if isinstance(session, Connection):
        return session.dialect.name
    return session.get_bind().dialect.name


class StoredSets:
    """Keys of candidate sets known to be committed in one store (a bounded memo, one per
    batch writer), so that a batch does not send them again.

    Inline candidate sets repeat from request to request (a product page sends the same
    candidates each time), and each batch used to send every set's JSON text again with
    ``ON CONFLICT DO NOTHING``: ~40 KB for 500 candidates, parsed and looked up by the
    server per batch. A key goes in only after a commit that stored a decision over that
    set, so the set was committed then.

    It can be deleted since: orphaned sets are dropped by erasure and retention
    (``store/privacy.drop_orphaned_sets``), possibly in another process. Both stores
    enforce the ``decisions -> candidate_sets`` foreign key (PostgreSQL's
    ``fk_decisions_candidate_set``; SQLite with ``PRAGMA foreign_keys=ON``,
    store/database.py), so a decision over a deleted set fails to insert, whichever of the
    delete and the insert comes first (PostgreSQL's check waits for a concurrent delete to
    commit or roll back), and nothing dangling is ever stored; the writer then forgets
    every key and retries the batch with its sets (:func:`missing_candidate_set`)."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._keys: dict[str, None] = {}  # oldest first

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, keys: Iterable[str]) -> None:
        known = self._keys
        for key in keys:
            known.pop(key, None)  # the most recently used go last
            known[key] = None
        while len(known) > self.limit:
            del known[next(iter(known))]

    def forget(self) -> None:
        self._keys.clear()


def missing_candidate_set(error: BaseException) -> bool:
    """Whether ``error`` is a decision refused by its foreign key to ``candidate_sets``:
    a set :class:`StoredSets` took for stored was deleted since. (SQLite's message does
    not name the key; its other foreign key, rewards -> decisions, is checked before each
    reward insert, so it fails only under a concurrent deletion, which a retry settles.)"""
    if not isinstance(error, sa_exc.IntegrityError):
        return False
    orig = error.orig
    if getattr(orig, "sqlstate", None) == "23503":  # psycopg: foreign_key_violation
        diag = getattr(orig, "diag", None)
        return getattr(diag, "constraint_name", None) == "fk_decisions_candidate_set"
    return "FOREIGN KEY constraint failed" in str(orig)


def foreign_keys_enforced(connection: Connection) -> bool:
    """Whether this connection refuses a decision over a missing candidate set: always on
    PostgreSQL (the constraint is part of the schema); on SQLite only with
    ``PRAGMA foreign_keys=ON``, which ``make_engine`` sets on every connection."""
    if connection.dialect.name != "sqlite":
        return True
    return bool(connection.exec_driver_sql("PRAGMA foreign_keys").scalar())


# Core statements on the tables, built once: the ORM's bulk-insert machinery (given the
# mapped classes) cost ~450 µs of Python per group-commit batch of one decision, more than
# the inserts themselves (docs/performance.md).
_INSERT_DECISIONS = insert(cast(Table, DecisionRow.__table__))
_INSERT_CANDIDATE_SETS = {
    dialect: make(cast(Table, CandidateSetRow.__table__)).on_conflict_do_nothing(
        index_elements=["key"]
    )
    for dialect, make in (("postgresql", postgresql_insert), ("sqlite", sqlite_insert))
}


@contextmanager
def _driver_connection(session: Session | Connection) -> Iterator[Any]:
    """The session's DBAPI connection (psycopg or sqlite3, in the session's transaction),
    for what SQLAlchemy has no way to say (a pipeline) or adds only cost to. A driver
    error comes out as SQLAlchemy's (``IntegrityError``, ``OperationalError`` ...), as from
    ``session.execute``, and a lost connection is invalidated, so callers (the writer's
    retries, its "store unreachable" test) cannot tell the two paths apart."""
    connection = session.connection() if isinstance(session, Session) else session
    dialect = connection.dialect
    raw = connection.connection.driver_connection
    try:
        yield raw
    except dialect.loaded_dbapi.Error as exc:
        disconnect = dialect.is_disconnect(exc, raw, None)
        if disconnect and not connection.invalidated:
            connection.invalidate(exc)
        raise sa_exc.DBAPIError.instance(
            None, None, exc, dialect.loaded_dbapi.Error, connection_invalidated=disconnect,
            dialect=dialect,
        ) from exc  # fmt: skip


_JSON_COLUMNS = frozenset(c.name for c in DecisionRow.__table__.columns if isinstance(c.type, JSON))
_DECISION_DEFAULTS = {"deferred": False}  # the one Python-side default (models.DecisionRow)
_INSERT_SETS_SQL = {
    "postgresql": "INSERT INTO candidate_sets (key, candidates) VALUES (%s, %s) "
    "ON CONFLICT (key) DO NOTHING",
    "sqlite": "INSERT INTO candidate_sets (key, candidates) VALUES (?, ?) "
    "ON CONFLICT (key) DO NOTHING",
}


def _append_decisions(
    session: Session | Connection,
    dialect: str,
    candidate_sets: list[tuple[str, str]],
    stored: list[dict[str, Any]],
    ends_transaction: bool = False,
) -> bool:
    """Append ``stored`` (and their candidate sets) through the driver, on the session's
    own connection and transaction; false, writing nothing, for rows of differing columns
    (the caller then inserts them with SQLAlchemy, as before).

    Why: SQLAlchemy's executemany processes every row's parameters in Python (~25-45 µs a
    row) before the driver sees them. On SQLite, sqlite3's own executemany with one
    prebuilt statement: ~30 instead of ~37 µs a row; PostgreSQL: :func:`_append_postgresql`.
    JSON columns are encoded with orjson, as the engine's ``json_serializer`` does
    (store/database.py), so the stored values are the same; rows go in order, so positions
    follow the batch as with the ``INSERT``."""
    columns = list(stored[0])
    keys = stored[0].keys()
    if any(out.keys() != keys for out in stored):
        return False
    # A column left out gets SQLAlchemy's Python-side default in its INSERT; the driver
    # would give it the server's (none), so it is sent explicitly.
    extra = [(name, value) for name, value in _DECISION_DEFAULTS.items() if name not in keys]
    names = [*columns, *(name for name, _value in extra)]
    dumps = orjson.dumps
    with _driver_connection(session) as raw:
        if dialect == "postgresql":
            text_array = _pg_array_types()["text"]
            arrays = [
                text_array([dumps(out[name]).decode() for out in stored])
                if name in _JSON_COLUMNS
                else _pg_array(name, [out[name] for out in stored])
                for name in columns
            ] + [_pg_array(name, [value] * len(stored)) for name, value in extra]
            kept = _sa_connection(session).connection.info  # per DBAPI connection
            _append_postgresql(raw, candidate_sets, names, arrays, ends_transaction, kept)
            return True
        encoders = [(name, name in _JSON_COLUMNS) for name in columns]
        tail = [value for _name, value in extra]
        values = [
            [dumps(out[name]).decode() if is_json else out[name] for name, is_json in encoders]
            + tail
            for out in stored
        ]
        cursor = raw.cursor()
        try:
            cursor.executemany(_INSERT_SETS_SQL[dialect], candidate_sets)
            marks = ", ".join("?" * len(names))
            cursor.executemany(
                f"INSERT INTO decisions ({', '.join(names)}) VALUES ({marks})", values
            )
        finally:
            cursor.close()
    return True


def _append_postgresql(
    raw: Any,
    candidate_sets: list[tuple[str, str]],
    names: list[str],
    arrays: list[list[Any]],
    ends_transaction: bool,
    kept: dict[Any, Any] | None = None,
) -> None:
    """PostgreSQL: the candidate sets not known stored, then every row in one statement
    (``INSERT ... SELECT FROM unnest(arrays)``, one array per column, in binary) that
    takes the log-append lock itself, and -- when the caller's transaction ends with the
    rows (``ends_transaction``) -- its commit, all in one pipelined round trip.

    Why, measured with benchmarks/pgwrite_append.py (the writer's ``_commit_once`` on
    d50x1 and d500x5 rows; CPU µs per decision, client / server): the ``COPY`` this
    replaces cost five round trips a batch (psycopg's BEGIN, the lock and the sets, the
    COPY's two, the COMMIT), three of them holding the lock, whose holder's commits the
    other serving process waits for. At one decision a batch (d50x1) ~690 / ~480 µs
    became ~390 / ~240 µs and the commit latency ~1.3 ms ~0.7 ms; at 32 a batch ~55 / ~60
    became ~32 / ~35 µs. Alternatives measured: an ``executemany`` INSERT in the pipeline
    (as cheap at one a batch, ~20-80% more client CPU from 8 up, and it streams row by
    row, so the lock was held while the client still encoded rows: with two writers the
    commits took longer than with COPY); a multi-row VALUES (~2-3x the client CPU: psycopg parses a
    new query text for every batch size); ``unnest`` with text-format arrays (psycopg
    quotes every element in Python: ~1 s for 64 rows of 50 KB); the batch as one JSON
    text into ``json_to_recordset`` (~20-30% less client CPU from 8 a batch, but ~60-70%
    more server CPU: ~575 instead of ~340 µs a d500x5 decision).

    The lock is taken in the statement itself, not by a statement before it: the server
    then holds it only once the whole statement has arrived, not while the client is
    still encoding and sending the rows. ``appending`` is the outer side of the only
    possible join (a nested loop without a condition); each row's position (the column's
    ``nextval`` default) is computed in the join's output, so after the lock was taken,
    as the log-append lock requires (:func:`serialize_log_appends`).

    A transaction not yet begun (the writer's batch of fresh decisions) gets its BEGIN in
    the pipeline too: psycopg's own, sent when a pipeline's first statement opens the
    transaction, costs a round trip of its own, so the connection is put in autocommit
    mode (psycopg then sends none) for the pipeline's explicit BEGIN ... COMMIT. If
    anything fails (in the server, or in the client before all was sent) that transaction
    is rolled back here, before autocommit is turned off again.

    The usual batch -- fresh decisions only, every candidate set known stored, so no set
    to send -- needs no pipeline at all (:func:`_append_alone`): its one statement runs
    alone in autocommit mode, in the implicit transaction PostgreSQL gives a statement,
    which takes the log-append lock in the statement's CTE and commits when the
    statement ends, in the one round trip. What it saves is psycopg's pipeline machinery
    (its syncs and result bookkeeping) and the server's BEGIN and COMMIT statements.
    Measured with benchmarks/pgwrite_append.py (``--sizes 1,16,32 --rounds 3``, against
    the pipelined code, d50x1, CPU µs per decision client / server): at one decision a
    batch ~309 / ~199 became ~225 / ~175, at 16 ~35 / ~33 became ~27 / ~33, at 32 ~23 /
    ~27 became ~19 / ~30 (server within this machine's noise), the commit latency at one
    a batch 0.54 -> 0.45 ms; d500x5 the same within the noise (a run of 5 rounds: at 16
    ~167 / ~77 became ~150 / ~65)."""
    if ends_transaction and not candidate_sets and raw.pgconn.transaction_status == _IDLE:
        _append_alone(raw, names, arrays, kept)
        return
    begin_here = ends_transaction and raw.pgconn.transaction_status == _IDLE
    cursor = raw.cursor()
    if begin_here:
        raw.autocommit = True
    try:
        with raw.pipeline():
            if begin_here:
                cursor.execute("BEGIN")
            if candidate_sets:
                cursor.executemany(_INSERT_SETS_SQL["postgresql"], candidate_sets)
            cursor.execute(_append_sql(tuple(names)), [_LOG_APPEND_LOCK, *arrays])
            if ends_transaction:
                cursor.execute("COMMIT")
    finally:
        cursor.close()
        if begin_here and not raw.broken:  # a broken connection is discarded anyway
            if raw.pgconn.transaction_status != _IDLE:
                raw.rollback()
            raw.autocommit = False


def _append_alone(
    raw: Any, names: list[str], arrays: list[list[Any]], kept: dict[Any, Any] | None = None
) -> None:
    """The append statement alone, committed by itself (an idle connection, no set to
    send): autocommit mode for the one statement, restored afterwards whatever happens.

    Every guarantee of the pipelined path holds. The rows commit together or not at all
    (one statement, one implicit transaction: an error rolls all of it back, and one
    raised in the client while encoding sends nothing). The log-append lock is taken by
    the statement's CTE before any row's position is drawn, and, being
    transaction-scoped, is released only by the commit at the statement's end, so
    positions still commit in order. The connection is left idle and out of autocommit
    mode, as SQLAlchemy's transaction expects it: its COMMIT then finds nothing to do.

    ``kept``: SQLAlchemy's ``info`` of the DBAPI connection, where the statement's cursor
    stays from one batch to the next (:func:`_append_cursor`)."""
    cursor = raw.cursor() if kept is None else _append_cursor(raw, kept)
    raw.autocommit = True
    try:
        cursor.execute(_append_sql(tuple(names)), [_LOG_APPEND_LOCK, *arrays])
    finally:
        if kept is None:
            cursor.close()
        if not raw.broken:  # a broken connection is discarded anyway
            if raw.pgconn.transaction_status != _IDLE:  # not expected: a lone statement
                raw.rollback()
            raw.autocommit = False


def _append_cursor(raw: Any, kept: dict[Any, Any]) -> Any:
    """The append statement's cursor on ``raw``, made once and kept in ``kept`` (the
    ``info`` SQLAlchemy keeps per DBAPI connection and clears when it closes or
    invalidates that connection, so the cursor goes with it).

    Why: psycopg keeps a cursor's adaptation state (its ``Transformer``, with the array
    dumpers it made) while the cursor executes the same query object again (the cached
    :func:`_append_sql` text), so a kept cursor builds neither a new cursor and adapters
    map per batch nor a new dumper per column type: ~10-13 µs of client CPU a batch
    (timeit, warm caches). A cursor is reused after a failed execute, as psycopg allows
    (each execute starts afresh)."""
    cursor = kept.get(_APPEND_CURSOR)
    if cursor is None or cursor.closed or cursor.connection is not raw:
        cursor = kept[_APPEND_CURSOR] = raw.cursor()
    return cursor


_APPEND_CURSOR = "bandit_service.append_cursor"

_IDLE = 0  # psycopg.pq.TransactionStatus.IDLE (psycopg is imported by SQLAlchemy only)

# The SQL element type of each non-JSON decision column's array (JSON columns go as text
# and are cast to jsonb per element, as COPY's text input would be parsed).
_PG_ARRAY_TYPES = {
    "model_version": "int4", "created_at": "float8", "activated_at": "float8",
    "deferred": "bool",
}  # fmt: skip
_PG_ELEMENT = {"int4": int, "float8": float, "bool": bool}


def _pg_array(name: str, values: list[Any]) -> list[Any]:
    """One column's values, each of the Python type its array is dumped as (an integer
    ``created_at``, which COPY would have parsed as text, is sent as the float it is
    stored as), in a list whose class names the array's type (store/pg_arrays.py)."""
    return _pg_typed(_PG_ARRAY_TYPES.get(name, "text"), values)


@functools.cache
def _append_sql(names: tuple[str, ...]) -> str:
    columns = ", ".join(names)
    arrays = ", ".join(f"%b::{_PG_ARRAY_TYPES.get(name, 'text')}[]" for name in names)
    select_list = ", ".join(f"{name}::jsonb" if name in _JSON_COLUMNS else name for name in names)
    return (
        "WITH appending AS (SELECT pg_advisory_xact_lock(%b)) "
        f"INSERT INTO decisions ({columns}) SELECT {select_list} "
        f"FROM appending, unnest({arrays}) AS t({columns})"
    )


def insert_rewards(session: Session, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Insert rewards; one whose ``reward_id`` is already stored is skipped, so replaying a
    batch whose commit outcome was unknown, or a client retrying with the same idempotency
    key, cannot count a reward twice. Returns the ``reward_id`` values actually inserted.

    Each reward's decision must be stored (else :class:`NotFound`); its policy and time are
    copied onto the reward. On PostgreSQL, where the partitioned tables have no foreign key
    (store/partitions.py), the decisions are read ``FOR KEY SHARE`` -- what a foreign key
    does -- so a concurrent delete-user or retention either waits for this transaction and
    then removes these rewards too, or commits first and this look-up misses.

    Rows with exactly the writer's columns go through the driver (:func:`_append_rewards`);
    any other shape through SQLAlchemy, as before."""
    if not rows:
        return set()
    dialect = session.get_bind().dialect.name
    if dialect in _REWARD_INSERT_SQL and all(row.keys() == _REWARD_ROW_KEYS for row in rows):
        return _append_rewards(session, dialect, rows)
    decisions = _decisions_of(session, {row["event_id"] for row in rows}, dialect)
    full = _with_decisions(rows, decisions)
    statement = (postgresql_insert if dialect == "postgresql" else sqlite_insert)(RewardRow)
    # PostgreSQL: a unique index of a partitioned table includes the partition key.
    unique = ["reward_id", "policy", "decision_created_at"] if dialect == "postgresql" else None
    inserted = session.execute(
        statement.on_conflict_do_nothing(index_elements=unique or ["reward_id"]).returning(
            RewardRow.reward_id
        ),
        full,
    )
    return {row[0] for row in inserted if row[0] is not None}


def _with_decisions(
    rows: Sequence[dict[str, Any]], decisions: dict[str, tuple[str, float]]
) -> list[dict[str, Any]]:
    """The rows with their decisions' policy and time; :class:`NotFound` for the first
    row whose decision is not stored."""
    full = []
    for row in rows:
        found = decisions.get(row["event_id"])
        if found is None:
            raise NotFound(f"no decision with event id {row['event_id']!r}", "event_id")
        full.append({**row, "policy": found[0], "decision_created_at": found[1]})
    return full


def _decisions_of(
    session: Session, event_ids: set[str], dialect: str
) -> dict[str, tuple[str, float]]:
    """``event_id -> (policy, created_at)`` of the stored decisions among ``event_ids``."""
    found: dict[str, tuple[str, float]] = {}
    wanted = sorted(event_ids)
    for start in range(0, len(wanted), 500):  # bounded IN lists
        query = select(_d.event_id, _d.policy, _d.created_at).where(
            _d.event_id.in_(wanted[start : start + 500])
        )
        if dialect == "postgresql":
            query = query.with_for_update(key_share=True)
        found.update((e, (p, c)) for e, p, c in session.execute(query))
    return found


# The columns of a reward as the writer gives it, then the two copied from its decision.
_REWARD_ROW_COLUMNS = ("event_id", "slot", "value", "received_at", "late", "kind", "reward_id")
_REWARD_ROW_KEYS = frozenset(_REWARD_ROW_COLUMNS)
_REWARD_COLUMNS = (*_REWARD_ROW_COLUMNS, "policy", "decision_created_at")
_REWARD_PG_TYPES = (
    "text", "int4", "float8", "float8", "bool", "text", "text", "text", "float8",
)  # fmt: skip
_REWARD_INSERT_SQL = {
    # One statement for the batch, rows in order (their ids follow it, as with the
    # INSERT it replaces); binary arrays, as for decisions (_append_sql).
    "postgresql": f"INSERT INTO rewards ({', '.join(_REWARD_COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"%b::{t}[]" for t in _REWARD_PG_TYPES)
    + ") ON CONFLICT (reward_id, policy, decision_created_at) DO NOTHING RETURNING reward_id",
    "sqlite": f"INSERT INTO rewards ({', '.join(_REWARD_COLUMNS)}) VALUES "
    f"({', '.join('?' * len(_REWARD_COLUMNS))}) "
    "ON CONFLICT (reward_id) DO NOTHING RETURNING reward_id",
}
_DECISIONS_OF_SQL = {
    "postgresql": "SELECT event_id, policy, created_at FROM decisions "
    "WHERE event_id = ANY(%s) FOR KEY SHARE",
    "sqlite": "SELECT event_id, policy, created_at FROM decisions WHERE event_id IN ({})",
}


def _append_rewards(session: Session, dialect: str, rows: Sequence[dict[str, Any]]) -> set[str]:
    """:func:`insert_rewards` through the driver, on the session's connection and
    transaction: the decisions' look-up (``FOR KEY SHARE`` on PostgreSQL, in the same
    sorted chunks of 500) and one insert of the batch.

    Why: the ORM bulk insert (``_BulkORMInsert``, its per-row parameter processing,
    psycopg's query conversion) was ~17% of the serving process's time on the PostgreSQL
    reward workload (py-spy), more than the statements cost the driver. With
    :func:`find_decision_for_reward`, CPU per reward (benchmarks/http_load.py, reward
    workload, app + server, µs): PostgreSQL at 64 in flight ~840 + ~390 became ~440-470 +
    ~180-190 (at 16: ~1250 + ~465 became ~750-880 + ~335-360); SQLite ~590 became ~415
    (at 16: ~1120, ~700). Stored rows are the same (benchmarks/reward_rows_compare.py): the
    same columns and values (floats and integers dumped as the column's type, as
    PostgreSQL would cast them), rows in order."""
    wanted = sorted({row["event_id"] for row in rows})
    found: dict[str, tuple[str, float]] = {}
    with _driver_connection(session) as raw:
        cursor = raw.cursor()
        try:
            for start in range(0, len(wanted), 500):  # bounded IN lists
                chunk = wanted[start : start + 500]
                if dialect == "postgresql":
                    cursor.execute(_DECISIONS_OF_SQL[dialect], (chunk,))
                else:
                    marks = ", ".join("?" * len(chunk))
                    cursor.execute(_DECISIONS_OF_SQL[dialect].format(marks), chunk)
                found.update((e, (p, c)) for e, p, c in cursor.fetchall())
            full = _with_decisions(rows, found)
            if dialect == "postgresql":
                arrays = [
                    _pg_typed(kind, [row[name] for row in full])
                    for name, kind in zip(_REWARD_COLUMNS, _REWARD_PG_TYPES, strict=True)
                ]
                cursor.execute(_REWARD_INSERT_SQL[dialect], arrays)
                inserted = {r[0] for r in cursor.fetchall()}
            else:
                # One row a statement (sqlite3's executemany returns no rows); the
                # statement is prepared once by sqlite3's cache. Within one transaction a
                # later copy of a reward_id is skipped, as in one multi-row INSERT.
                inserted = set()
                sql = _REWARD_INSERT_SQL[dialect]
                for row in full:
                    cursor.execute(sql, [row[name] for name in _REWARD_COLUMNS])
                    inserted.update(r[0] for r in cursor.fetchall())
        finally:
            cursor.close()
    inserted.discard(None)
    return inserted


@functools.cache
def _pg_array_types() -> dict[str, type[list[Any]]]:
    """``pg_arrays.ARRAY_TYPES``, imported on first use: psycopg is not imported by
    processes that only ever use SQLite."""
    from bandit_service.store.pg_arrays import ARRAY_TYPES

    return ARRAY_TYPES


def _pg_typed(kind: str, values: list[Any]) -> list[Any]:
    """One column's values, each of the Python type its array is dumped as (an integer
    ``value`` is sent as a float, a float ``slot`` as an integer), in a list whose class
    names the array's type ``kind[]``: psycopg then neither scans the list for its
    elements' types nor picks a type by value (store/pg_arrays.py)."""
    convert = _PG_ELEMENT.get(kind, str)
    return _pg_array_types()[kind](
        [v if v is None or type(v) is convert else convert(v) for v in values]
    )


def lock_event_ids(session: Session, event_ids: Iterable[str]) -> None:
    """Serialize writers of the same client-given event ids (PostgreSQL), before looking
    them up: the partitioned log has no unique index on ``event_id`` (its unique indexes
    must include the partition key), so two transactions could each find an id absent and
    both insert it. One transaction-scoped advisory lock per id, taken in one sorted order
    (no deadlock between batches sharing ids). A fresh UUID made by the service needs none.
    SQLite allows one writer at a time and keeps its unique index."""
    if session.get_bind().dialect.name != "postgresql":
        return
    keys = sorted({_event_lock_key(e) for e in event_ids})
    if keys:
        session.execute(
            text(
                "SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) "
                "WITH ORDINALITY AS t(k, n) ORDER BY n"
            ),
            {"keys": keys},
        )


def _event_lock_key(event_id: str) -> int:
    """A signed 64-bit advisory-lock key for an event id (collisions only serialize)."""
    digest = hashlib.blake2b(event_id.encode(), digest_size=8, person=b"event-id").digest()
    return int.from_bytes(digest, "big", signed=True)


def find_rewards(session: Session, reward_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Stored rewards by ``reward_id``."""
    ids = list(set(reward_ids))
    if not ids:
        return {}
    rows = session.execute(select(RewardRow).where(RewardRow.reward_id.in_(ids))).scalars()
    return {
        r.reward_id: {
            "event_id": r.event_id, "slot": r.slot, "value": r.value, "kind": r.kind,
            "late": r.late, "received_at": r.received_at, "reward_id": r.reward_id,
        }
        for r in rows
        if r.reward_id is not None
    }  # fmt: skip


def serialize_log_appends(session: Session | Connection) -> None:
    """Make decision positions commit in order across processes (PostgreSQL).

    Positions come from a sequence at insert time; two processes' transactions could commit
    out of order and a trainer that has already moved past the later position would never
    see the earlier one. Holding one transaction-scoped advisory lock while appending makes
    commit order equal position order. SQLite already allows one writer at a time.

    :func:`insert_decisions` takes it (in its append statement, :func:`_append_postgresql`,
    in one round trip with the commit when the caller's transaction ends there), so it is
    held only from the append to the commit. A writer's batch takes its event-id locks
    (:func:`lock_event_ids`) before, never after, so the two kinds cannot deadlock.
    """
    if _dialect_name(session) == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOG_APPEND_LOCK})


_LOG_APPEND_LOCK = 0x62616E646974  # "bandit"


def rewards_for(session: Session, event_id: str) -> list[dict[str, Any]]:
    rows = session.execute(
        select(RewardRow).where(RewardRow.event_id == event_id).order_by(RewardRow.id)
    ).scalars()
    return [
        {
            "slot": r.slot,
            "value": r.value,
            "received_at": r.received_at,
            "late": r.late,
            "kind": r.kind,
        }
        for r in rows
    ]


def activate(session: Session, event_id: str, at: float) -> None:
    """Mark a deferred decision activated (first activation wins; repeats change nothing)."""
    session.execute(
        update(DecisionRow)
        .where(DecisionRow.event_id == event_id, DecisionRow.activated_at.is_(None))
        .values(activated_at=at)
    )


def get_or_create_meta(session: Session, key: str, factory: Callable[[], str]) -> str:
    """Read a service-wide value, creating it on first use. Race-safe: concurrent first
    uses insert-or-ignore on the primary key, and all of them read back the one winner."""
    row = session.get(MetaRow, key)
    if row is not None:
        return row.value
    dialect = session.get_bind().dialect.name
    statement = (postgresql_insert if dialect == "postgresql" else sqlite_insert)(MetaRow)
    session.execute(
        statement.values(key=key, value=factory()).on_conflict_do_nothing(index_elements=["key"])
    )
    value = session.scalar(select(MetaRow.value).where(MetaRow.key == key))
    assert value is not None
    return value


# -- reading the log in chunks --------------------------------------------------------------
def iter_decisions(
    engine: Any,
    policy: str,
    since: float | None = None,
    until: float | None = None,
    chunk: int = 5000,
) -> Iterator[list[dict[str, Any]]]:
    """Decisions (with rewards) of a policy in log order, a chunk per short transaction, so
    memory stays bounded and no transaction is held open across the whole scan."""
    position = 0
    while True:
        with Session(engine) as session:
            batch = decisions_after(session, policy, position, chunk, since, until)
        if not batch:
            return
        yield batch
        position = batch[-1]["position"]


# -- training -----------------------------------------------------------------------------
def decisions_after(
    session: Session,
    policy: str,
    position: int,
    limit: int,
    since: float | None = None,
    until: float | None = None,
) -> list[dict[str, Any]]:
    """The next ``limit`` decisions of a policy after a log position, each with its rewards
    (optionally only those created in ``[since, until)``), in their written shape."""
    query = _DECISIONS.where(DecisionRow.policy == policy, DecisionRow.position > position)
    if since is not None:
        query = query.where(DecisionRow.created_at >= since)
    if until is not None:
        query = query.where(DecisionRow.created_at < until)
    rows = session.execute(query.order_by(DecisionRow.position).limit(limit))
    decisions = _classic(session, [dict(row._mapping) for row in rows])
    _attach_rewards(session, decisions)
    return decisions


_d = DecisionRow.__table__.c
# JSON columns as text, decoded by orjson here: SQLAlchemy's per-row result processing
# cost the trainer more than the decoding itself. (On PostgreSQL, jsonb::text.)
_TRAINING = select(
    _d.position, _d.event_id, _d.arm, cast_(_d.context, Text), _d.candidate_set,
    cast_(_d.slots, Text), _d.created_at, _d.deferred, _d.activated_at, _d.user_key,
    _d.context_line,
)  # fmt: skip


def training_batch(
    session: Session, policy: str, position: int, limit: int
) -> list[dict[str, Any]]:
    """What the trainer needs of the next ``limit`` decisions after ``position``, with their
    rewards: slots as stored (compact) and the candidate set by key only; the trainer
    fetches and decodes each distinct set once (:func:`candidate_set_texts`).

    A context stored with its rendering (``context_line``) comes as a
    :class:`~bandit_service.learners.vw_text.RenderedContext`, decoded only if read."""
    query = _TRAINING.where(_d.policy == policy, _d.position > position)
    loads = orjson.loads
    decisions = [
        {
            "position": row[0],
            "event_id": row[1],
            "arm": row[2],
            "context": loads(row[3]) if row[10] is None else RenderedContext(row[10], row[3]),
            "candidate_set": row[4],
            "slots": loads(row[5]),
            "created_at": row[6],
            "deferred": bool(row[7]),
            "activated_at": row[8],
            "user_key": row[9],  # opted-out users are not learned from
        }
        for row in session.execute(query.order_by(_d.position).limit(limit)).all()
    ]
    if not decisions:
        return decisions
    # The batch is every decision of the policy in (position, last]: join on that range
    # rather than sending a 2,000-id IN list.
    by_event = {d["event_id"]: d for d in decisions}
    for d in decisions:
        d["rewards"] = []
    r = RewardRow.__table__.c
    rewards = (
        select(r.event_id, r.slot, r.value, r.late, r.kind, r.received_at)
        .join(DecisionRow.__table__, _d.event_id == r.event_id)
        .where(
            _d.policy == policy,
            _d.position > position,
            _d.position <= decisions[-1]["position"],
        )
        .order_by(r.id)
    )
    for event_id, slot, value, late, kind, received_at in session.execute(rewards).all():
        by_event[event_id]["rewards"].append(
            {"slot": slot, "value": value, "late": late, "kind": kind, "received_at": received_at}
        )
    return decisions


def _attach_rewards(session: Session, decisions: list[dict[str, Any]]) -> None:
    """Each decision's rewards in arrival order (plain columns: ORM objects cost ~10x)."""
    by_event = {d["event_id"]: d for d in decisions}
    for d in decisions:
        d["rewards"] = []
    if not by_event:
        return
    r = RewardRow.__table__.c
    query = (
        select(r.event_id, r.slot, r.value, r.late, r.kind, r.received_at)
        .where(r.event_id.in_(list(by_event)))
        .order_by(r.id)
    )
    for event_id, slot, value, late, kind, received_at in session.execute(query):
        by_event[event_id]["rewards"].append(
            {"slot": slot, "value": value, "late": late, "kind": kind, "received_at": received_at}
        )


CHECKPOINT_SUMMARY = [
    ModelCheckpointRow.id,
    ModelCheckpointRow.policy,
    ModelCheckpointRow.model_key,
    ModelCheckpointRow.policy_version,
    ModelCheckpointRow.model_version,
    ModelCheckpointRow.position,
    ModelCheckpointRow.learned_events,
    ModelCheckpointRow.skipped_events,
    ModelCheckpointRow.created_at,
    ModelCheckpointRow.note,
]


def latest_checkpoint(
    session: Session, policy: str, model_key: str | None = None, with_model: bool = False
) -> dict[str, Any] | None:
    """The newest checkpoint of a policy (of one model lineage if ``model_key`` is given)."""
    columns = [*CHECKPOINT_SUMMARY, ModelCheckpointRow.model] if with_model else CHECKPOINT_SUMMARY
    query = select(*columns).where(ModelCheckpointRow.policy == policy)
    if model_key is not None:
        query = query.where(ModelCheckpointRow.model_key == model_key)
    row = session.execute(query.order_by(ModelCheckpointRow.model_version.desc()).limit(1)).first()
    return dict(row._mapping) if row is not None else None


def insert_checkpoint(session: Session, row: dict[str, Any], keep: int) -> int:
    """Store a checkpoint with the next model version of its policy; keep the newest ``keep``."""
    current = session.scalar(
        select(func.max(ModelCheckpointRow.model_version)).where(
            ModelCheckpointRow.policy == row["policy"]
        )
    )
    version = (current or 0) + 1
    session.execute(insert(ModelCheckpointRow), [{**row, "model_version": version}])
    session.execute(
        delete(ModelCheckpointRow).where(
            ModelCheckpointRow.policy == row["policy"],
            ModelCheckpointRow.model_version <= version - keep,
        )
    )
    return version


def acquire_lease(session: Session, policy: str, owner: str, now: float, ttl: float) -> bool:
    """Take or renew the policy's trainer lease; false while another owner holds it."""
    taken = _rowcount(
        session,
        update(TrainerLeaseRow)
        .where(
            TrainerLeaseRow.policy == policy,
            (TrainerLeaseRow.owner == owner) | (TrainerLeaseRow.expires_at < now),
        )
        .values(owner=owner, expires_at=now + ttl),
    )
    if taken:
        return True
    if session.get(TrainerLeaseRow, policy) is not None:
        return False
    try:
        with session.begin_nested():
            session.add(TrainerLeaseRow(policy=policy, owner=owner, expires_at=now + ttl))
    except IntegrityError:  # another trainer inserted it first
        return False
    return True


def renew_own_lease(session: Session, policy: str, owner: str, now: float, ttl: float) -> bool:
    """Fencing: extend the lease only if we still own it (even if it expired meanwhile and
    nobody took it)."""
    return bool(
        _rowcount(
            session,
            update(TrainerLeaseRow)
            .where(TrainerLeaseRow.policy == policy, TrainerLeaseRow.owner == owner)
            .values(expires_at=now + ttl),
        )
    )


def _rowcount(session: Session, statement: Update) -> int:
    result = session.execute(statement.execution_options(synchronize_session=False))
    return int(cast(CursorResult[Any], result).rowcount)


def release_lease(session: Session, policy: str, owner: str) -> None:
    session.execute(
        delete(TrainerLeaseRow).where(
            TrainerLeaseRow.policy == policy, TrainerLeaseRow.owner == owner
        )
    )


def lease_holder(session: Session, policy: str) -> dict[str, Any] | None:
    row = session.get(TrainerLeaseRow, policy)
    return {"owner": row.owner, "expires_at": row.expires_at} if row else None


# -- status -------------------------------------------------------------------------------
def policy_counts(session: Session, policy: str, position: int) -> dict[str, int]:
    decisions = session.scalar(
        select(func.count()).select_from(DecisionRow).where(DecisionRow.policy == policy)
    )
    pending = session.scalar(
        select(func.count())
        .select_from(DecisionRow)
        .where(DecisionRow.policy == policy, DecisionRow.position > position)
    )
    joined = select(RewardRow).join(DecisionRow, DecisionRow.event_id == RewardRow.event_id)
    rewarded = session.scalar(
        select(func.count(func.distinct(RewardRow.event_id)))
        .join(DecisionRow, DecisionRow.event_id == RewardRow.event_id)
        .where(DecisionRow.policy == policy, RewardRow.late.is_(False))
    )
    late = session.scalar(
        select(func.count()).select_from(
            joined.where(DecisionRow.policy == policy, RewardRow.late.is_(True)).subquery()
        )
    )
    return {
        "decisions": int(decisions or 0),
        "rewarded": int(rewarded or 0),
        "late_rewards": int(late or 0),
        "pending": int(pending or 0),
    }


def oldest_pending_created_at(session: Session, policy: str, position: int) -> float | None:
    return session.scalar(
        select(func.min(DecisionRow.created_at)).where(
            DecisionRow.policy == policy, DecisionRow.position > position
        )
    )


def recent_slots(session: Session, policy: str, limit: int) -> list[list[dict[str, Any]]]:
    """The newest decisions' slots as stored: ``id``, ``model_id``, ``probability`` etc.
    are there as written; the distribution may be in compact form (store/compact.py)."""
    return list(
        session.scalars(
            select(DecisionRow.slots)
            .where(DecisionRow.policy == policy)
            .order_by(DecisionRow.position.desc())
            .limit(limit)
        )
    )
