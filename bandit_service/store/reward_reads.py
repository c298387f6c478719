"""Batched decision look-ups for rewards: one reader thread, one query per batch.

Every reward first reads its decision (policy, what was shown, when). Done one at a time
(``repository.find_decision_for_reward`` in ``asyncio.to_thread``) each look-up paid a
thread-pool hop, a pool check-out with SQLAlchemy's pre-ping (a ``SELECT 1`` round trip
on PostgreSQL), toggling autocommit twice, and its own ``SELECT``: on PostgreSQL reward
ingestion ran at half SQLite's rate (issue 8: 1,584 vs 3,282 rewards/s at 64 in flight).

:class:`RewardReader` does for these reads what the group-commit writer
(``store/writer.py``) does for writes, with the same hand-off: look-ups collect in a list
on the event loop; while the reader thread is idle, the first one schedules a hand-over
at the end of the loop's current iteration (``call_soon``), so the look-ups of the
requests that iteration resumes share a batch; the thread answers the whole batch with
one ``call_soon_threadsafe``, which also hands over the next batch. The thread runs one
``SELECT ... WHERE event_id = ANY(%s)`` per batch on PostgreSQL (SQLite: ``IN (...)`` in
chunks of 500, under its variable limit), with the very columns and decoding of
``find_decision_for_reward``.

Measured (benchmarks/reward_cpu.py: the ASGI app in process, 64 in flight, 4,000 rewards
a round, 5 rounds alternating with the previous code, load average 2-6 on the shared
2-core machine): CPU per reward on SQLite 147 -> 82 µs (per-round ratio median 0.51),
5,806 -> 6,660 rewards/s; on PostgreSQL 291 -> 94 µs in the process (median ratio 0.32)
and 129 -> 36 µs in the PostgreSQL backends, 1,992 -> 3,739 rewards/s. With one request
in flight (a batch of one) the CPU is unchanged (ratios 1.00 SQLite, 0.91 PostgreSQL).

It keeps one store connection while look-ups keep coming (no check-out, no pre-ping per
batch), in autocommit mode on PostgreSQL, and gives it back after
:data:`IDLE_RELEASE_SECONDS` without look-ups, or at once after any failure. Each batch's
statement starts after its look-ups were handed over, so it sees every decision committed
before they were asked for: a decision is answered only after its commit, so a reward for
an acknowledged decision always finds it.

Failures answer what a lone look-up would have: a batch that fails on the kept connection
is retried once on a fresh (pre-pinged) one -- a kept connection may have died with a
restarted server, which the pool's pre-ping used to hide -- and if the store is still
unreachable every look-up of the batch gets that SQLAlchemy error (the API answers 503
``store_unavailable``, as before); any other failure is answered look-up by look-up with
``find_decision_for_reward``, so one odd event id cannot fail its neighbours. Before
:meth:`RewardReader.start` and after :meth:`RewardReader.close`, look-ups go the old way
(one ``find_decision_for_reward`` each, in a worker thread): a reward arriving during
shutdown gets exactly the answer it got before.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any

import orjson
from sqlalchemy import Connection, Engine

from bandit_service.store import repository
from bandit_service.store.repository import (
    _IDLE,
    _REWARD_LOOKUP_SQL,
    REWARD_LOOKUP_COLUMNS,
    _driver_connection,
)
from bandit_service.store.writer import store_unreachable

log = logging.getLogger(__name__)

# The reader's connection goes back to the pool after this long without look-ups (as the
# writer's does): a connection held while idle could die unseen with a restarted store.
IDLE_RELEASE_SECONDS = 2.0
# Look-ups handed over at most per batch; more wait for the next one.
MAX_BATCH = 512
# SQLite's bound on a statement's variables was 999 before 3.32: bounded IN lists, as
# repository's other batched reads use.
SQLITE_CHUNK = 500


def _batch_sql(dialect: str) -> str:
    """``find_decision_for_reward``'s statement (its columns, ``slots::text`` on
    PostgreSQL) for many event ids: the same select list, another ``WHERE``."""
    select_list, where, _ = _REWARD_LOOKUP_SQL[dialect].partition(" WHERE ")
    assert where and select_list.endswith(" FROM decisions"), _REWARD_LOOKUP_SQL[dialect]
    if dialect == "postgresql":
        return f"{select_list} WHERE event_id = ANY(%s)"
    return f"{select_list} WHERE event_id IN ({{}})"


_BATCH_SQL = {dialect: _batch_sql(dialect) for dialect in ("postgresql", "sqlite")}
_EVENT_ID = REWARD_LOOKUP_COLUMNS.index("event_id")


def decode(found: tuple[Any, ...]) -> dict[str, Any]:
    """A row as ``find_decision_for_reward`` answers it: ``slots`` decoded with orjson
    (the engine's ``json_deserializer``), ``deferred`` a bool (SQLite stores 0/1)."""
    row = dict(zip(REWARD_LOOKUP_COLUMNS, found, strict=True))
    row["slots"] = orjson.loads(row["slots"])
    if row["deferred"] is not None:
        row["deferred"] = bool(row["deferred"])
    return row


class RewardReader:
    """``await find(event_id)``: the decision's reward columns, or None. ``start()`` on the
    serving loop, ``close()`` to answer what is pending and stop the thread."""

    def __init__(self, engine: Engine, max_batch: int = MAX_BATCH) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name
        self._max_batch = max_batch
        self._loop: asyncio.AbstractEventLoop | None = None
        # Loop side: look-ups not yet handed over, and whether a batch is with the thread.
        self._pending: list[tuple[str, asyncio.Future[dict[str, Any] | None]]] = []
        self._busy = False
        self._drained: asyncio.Future[None] | None = None  # close() waits on it
        # Thread side: batches to answer; ``None`` stops the thread.
        self._batches: queue.SimpleQueue[list[tuple[str, Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._connection: Connection | None = None  # the reader thread's only
        self._closing = False
        self.batches_read = 0
        self.lookups_read = 0

    def start(self) -> None:
        if self._dialect not in _BATCH_SQL:  # another store: one look-up at a time
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="reward-reader", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Answer the look-ups already asked for, then stop the thread (its connection goes
        back to the pool); later look-ups go one at a time, as before."""
        self._closing = True
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if self._busy or self._pending:
            if self._drained is None or self._drained.done():
                self._drained = loop.create_future()
            await asyncio.shield(self._drained)
        self._batches.put(None)
        await asyncio.to_thread(thread.join)
        self._thread = None

    async def find(self, event_id: str) -> dict[str, Any] | None:
        """The reward columns of decision ``event_id`` (a fresh dict per call), or None."""
        if self._closing or self._thread is None:
            return await asyncio.to_thread(
                repository.find_decision_for_reward, self._engine, event_id
            )
        assert self._loop is not None
        future: asyncio.Future[dict[str, Any] | None] = self._loop.create_future()
        self._pending.append((event_id, future))
        if not self._busy:
            # Handed over once this loop iteration's other callbacks ran: the look-ups of
            # the requests they resume join the same batch.
            self._busy = True
            self._loop.call_soon(self._hand_over)
        return await future

    # -- on the event loop ----------------------------------------------------------------
    def _hand_over(self) -> None:
        """Give the thread the next batch, or note that the reader is idle."""
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        if batch:
            self._batches.put(batch)
            return
        self._busy = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _done(self, batch: list[tuple[str, Any]], outcomes: list[Any]) -> None:
        """A batch is answered (one loop callback per batch); the next one starts at once
        with whatever accumulated meanwhile."""
        try:
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():  # the request was cancelled meanwhile
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
        finally:
            self._hand_over()

    # -- the reader thread --------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                try:
                    batch = self._batches.get(timeout=IDLE_RELEASE_SECONDS)
                except queue.Empty:
                    self._release_connection()
                    continue
                if batch is None:
                    return
                try:
                    outcomes = self._look_up([event_id for event_id, _ in batch])
                except BaseException as exc:  # never strand waiting requests
                    log.exception("the reward reader failed")
                    outcomes = [exc] * len(batch)
                self._answer(batch, outcomes)
        finally:
            self._release_connection()

    def _answer(self, batch: list[tuple[str, Any]], outcomes: list[Any]) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._done, batch, outcomes)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            log.warning("event loop closed; %d look-up answers dropped", len(batch))

    def _look_up(self, event_ids: list[str]) -> list[Any]:
        """One outcome per event id: a fresh row dict, None, or the exception to raise."""
        try:
            found = self._select(event_ids)
        except Exception as exc:
            self._release_connection()
            if not store_unreachable(exc):
                return self._one_by_one(event_ids, exc)
            # The kept connection may have died with a restarted server (the pool's
            # pre-ping used to hide that): once more, on a connection checked out afresh.
            try:
                found = self._select(event_ids)
            except Exception as again:
                self._release_connection()
                if not store_unreachable(again):
                    return self._one_by_one(event_ids, again)
                log.warning("store unreachable; answering %d reward look-ups 503: %s",
                            len(event_ids), str(again).splitlines()[0])  # fmt: skip
                return [again] * len(event_ids)
        self.batches_read += 1
        self.lookups_read += len(event_ids)
        return [decode(found[e]) if e in found else None for e in event_ids]

    def _one_by_one(self, event_ids: list[str], error: Exception) -> list[Any]:
        """A failure that is not the store's absence (an event id the store refuses, say):
        each look-up alone, as before, so each gets its own answer or error."""
        log.warning("reward look-up batch of %d failed; looking each up alone: %s",
                    len(event_ids), str(error).splitlines()[0])  # fmt: skip
        outcomes: list[Any] = []
        for event_id in event_ids:
            try:
                outcomes.append(repository.find_decision_for_reward(self._engine, event_id))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def _select(self, event_ids: list[str]) -> dict[str, tuple[Any, ...]]:
        """The raw rows of the stored decisions among ``event_ids``, by event id."""
        wanted = list(dict.fromkeys(event_ids))  # each id once
        connection = self._connect()
        found: dict[str, tuple[Any, ...]] = {}
        with _driver_connection(connection) as raw:
            cursor = raw.cursor()
            try:
                if self._dialect == "postgresql":
                    cursor.execute(_BATCH_SQL["postgresql"], (wanted,))
                    rows = cursor.fetchall()
                else:
                    rows = []
                    for start in range(0, len(wanted), SQLITE_CHUNK):
                        chunk = wanted[start : start + SQLITE_CHUNK]
                        sql = _BATCH_SQL["sqlite"].format(", ".join("?" * len(chunk)))
                        cursor.execute(sql, chunk)
                        rows.extend(cursor.fetchall())  # read to the end: no open snapshot
            finally:
                cursor.close()
        for row in rows:
            found[row[_EVENT_ID]] = row
        return found

    def _connect(self) -> Connection:
        connection = self._connection
        if connection is not None and not connection.closed and not connection.invalidated:
            return connection
        self._release_connection()
        connection = self._engine.connect()
        if self._dialect == "postgresql":
            try:
                with _driver_connection(connection) as raw:
                    if raw.pgconn.transaction_status != _IDLE:
                        raw.rollback()
                    # Each SELECT its own transaction: no BEGIN, no ROLLBACK, a fresh
                    # snapshot per batch.
                    raw.autocommit = True
            except BaseException:
                connection.invalidate()
                connection.close()
                raise
        self._connection = connection
        return connection

    def _release_connection(self) -> None:
        """Back to the pool as it came (out of autocommit mode); a connection that cannot
        leave it (not idle: broken) is discarded."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            if self._dialect == "postgresql" and not connection.invalidated:
                raw = connection.connection.driver_connection
                if raw is not None and not raw.closed and raw.pgconn.transaction_status == _IDLE:
                    raw.autocommit = False
                else:
                    connection.invalidate()
        except Exception:
            log.warning("reward reader: discarding its connection", exc_info=True)
            if not connection.invalidated:
                connection.invalidate()
        try:
            connection.close()  # back to the pool (an invalidated one is discarded)
        except Exception:
            log.warning("could not release the reward reader's connection", exc_info=True)
