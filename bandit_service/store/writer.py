"""Group commit: many concurrent requests, one transaction, each answered after it commits.

A commit with fsync costs milliseconds, so one commit per request caps throughput at a few
hundred per second. Requests instead enqueue their write and await a future; one writer
thread takes everything queued (up to ``max_rows``), writes it in a single transaction and
resolves every future only after the commit returned. While one batch commits, the next one
accumulates, so batches grow with load and a lone request still commits at once.

If a batch fails (for example a concurrent process inserted the same event id), each of its
writes is retried alone, so one bad write cannot fail its neighbours.

The hand-off is built for CPU. Writes collect in a list on the event loop; while the
writer thread is idle, the first write schedules one hand-over at the end of the loop's
current iteration (so the writes of the requests that iteration resumes share a batch, as
with the ``asyncio.Queue`` drained by a task this replaces), and while it commits, the next
batch collects. The thread answers a whole batch with one ``call_soon_threadsafe``, which
also hands over the next batch: no executor future per batch and no queue operations per
write (that machinery was ~8% of a serving process's CPU at 64 requests in flight).
(A thread woken by a thread-safe queue on every write was tried and is worse: it starts
committing the first write at once, so batches shrink and commits multiply.)

The thread keeps one store connection while writes keep coming (no pool check-out, and
on PostgreSQL no pre-ping round trip, per batch) and gives it back after
:data:`IDLE_RELEASE_SECONDS` without writes, or at once after any failure, so a retry
always runs on a connection checked out (and pinged) afresh.

It also remembers the candidate sets it committed and does not send them again
(``repository.StoredSets``: inline candidates repeat from request to request, ~40 KB of
JSON for 500 candidates); a set deleted since makes the foreign key refuse the batch,
which is then retried with every set. A batch of decisions only is committed in the same
round trip as its rows on PostgreSQL (``repository._append_postgresql``); the usual one,
fresh decisions over known sets, as one statement in autocommit mode, written without an
ORM session (:func:`_apply_fresh`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Connection, Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from bandit_service.errors import NotFound, Unavailable
from bandit_service.ops import metrics
from bandit_service.store import repository
from bandit_service.store.write_turns import write_turns

log = logging.getLogger(__name__)

WriteKind = Literal["decision", "reward", "activate"]

# The writer's connection goes back to the pool after this long without writes: a
# connection held while idle could die unseen (a store restart) and fail the next batch once.
IDLE_RELEASE_SECONDS = 2.0


@dataclass(slots=True)  # one per write: slots make it smaller and quicker to build
class _Write:
    kind: WriteKind
    payload: dict[str, Any]
    future: asyncio.Future[Any] = field(repr=False)
    fresh: bool = False  # a decision whose event id the service just made: no look-up


@dataclass(frozen=True)
class DecisionWriteResult:
    """``created`` is false when the event id was already logged; ``row`` is the stored one."""

    created: bool
    row: dict[str, Any]


@dataclass(frozen=True)
class RewardWriteResult:
    """``created`` is false when a reward with the same ``reward_id`` was already stored;
    ``row`` is then the stored one (its slot, value, kind, ``late`` and ``received_at``)."""

    created: bool
    row: dict[str, Any]


class BatchWriter:
    def __init__(self, engine: Engine, max_rows: int = 512, late_margin_seconds: float = 1.0):
        self._engine = engine
        self._max_rows = max_rows
        self._late_margin = late_margin_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        # Loop side: writes not yet handed over, and whether a batch is with the thread.
        self._pending: list[_Write] = []
        self._busy = False
        self._drained: asyncio.Future[None] | None = None  # close() waits on it
        # Thread side: batches to commit; ``None`` stops the thread.
        self._batches: queue.SimpleQueue[list[_Write] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._connection: Connection | None = None  # the writer thread's only
        # Candidate sets this writer committed (decisions over them need not send them
        # again); None while the connection would not refuse a dangling reference.
        self._known_sets = repository.StoredSets()
        self._sets_memo: repository.StoredSets | None = None
        # SQLite: the serving processes' writers take turns (store/write_turns.py).
        self._turns = write_turns(engine)
        self._closing = False
        self.batches_committed = 0
        self.rows_committed = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="batch-writer", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Stop accepting writes, flush what is queued, and stop the writer."""
        self._closing = True
        if self._thread is None or self._loop is None:
            return
        if self._busy or self._pending:
            self._drained = self._loop.create_future()
            await self._drained
        self._batches.put(None)
        await asyncio.to_thread(self._thread.join)

    async def write_decision(self, row: dict[str, Any], fresh: bool = False) -> DecisionWriteResult:
        """Store a decision, or return the stored one with the same event id.

        ``fresh``: the service made the event id itself (a random UUID), so the look-up for
        an earlier copy is skipped -- at one request per batch it was a third of the
        batch's CPU. The unique key still refuses a duplicate on SQLite (the write is then
        503). PostgreSQL's partitioned log has no unique index on event_id, and a fresh id
        is not looked up there either: only a UUID collision (~2^-122 per pair) could
        store one twice, and a batch whose commit outcome is unknown is retried with every
        id looked up (see :meth:`_commit`)."""
        result: DecisionWriteResult = await self._submit("decision", row, fresh)
        return result

    async def write_reward(self, row: dict[str, Any]) -> RewardWriteResult:
        """Store a reward, unless one with the same ``row["reward_id"]`` is stored already.

        ``row["window_end"]`` (or None) is when the decision's reward window closes. The
        reward is late if it was received after that, or if its commit happens so near the
        trainer's read (``window_end`` plus the commit grace) that the trainer may already
        have learned the event without it: the flag is set at commit time, so an answer
        ``late: false`` always means the reward will be learned.
        """
        result: RewardWriteResult = await self._submit("reward", row)
        return result

    async def activate(self, event_id: str, at: float) -> None:
        await self._submit("activate", {"event_id": event_id, "at": at})

    async def _submit(self, kind: WriteKind, payload: dict[str, Any], fresh: bool = False) -> Any:
        if self._closing or self._thread is None:
            raise Unavailable("the service is shutting down; retry on another instance")
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending.append(_Write(kind, payload, future, fresh))
        if not self._busy:
            # Handed over once this loop iteration's other callbacks ran: the writes of
            # the requests they resume join the same batch.
            self._busy = True
            self._loop.call_soon(self._hand_over)
        # A request cancelled meanwhile (client gone) does not withdraw its write: it is
        # committed with its batch, and the answer is dropped (_resolve).
        return await future

    # -- on the event loop ----------------------------------------------------------------
    def _hand_over(self) -> None:
        """Give the thread the next batch (the writes accumulated so far, up to
        ``max_rows``), or note that the writer is idle."""
        batch = self._pending[: self._max_rows]
        del self._pending[: self._max_rows]
        # Sampled here, once per batch rather than inc/dec per write: the writes left waiting.
        metrics.WRITER_QUEUE.set(len(self._pending))
        if batch:
            self._batches.put(batch)
            return
        self._busy = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _done(self, batch: list[_Write], outcomes: list[Any]) -> None:
        """A batch is answered (one loop callback per batch); the next one starts at once
        with whatever accumulated while it committed."""
        try:
            _resolve(batch, outcomes)
        finally:
            self._hand_over()

    # -- the writer thread --------------------------------------------------------------
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
                    outcomes = self._commit(batch)
                except BaseException as exc:  # never strand waiting requests
                    log.exception("the batch writer failed")
                    outcomes = [exc] * len(batch)
                self._answer(batch, outcomes)
        finally:
            self._release_connection()
            if self._turns is not None:
                self._turns.close()

    def _answer(self, batch: list[_Write], outcomes: list[Any]) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._done, batch, outcomes)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            log.warning("event loop closed; %d write outcomes dropped", len(batch))

    def _connect(self) -> Connection:
        if self._connection is None or self._connection.closed or self._connection.invalidated:
            self._release_connection()
            self._connection = connection = self._engine.connect()
            # The memo of stored sets is only safe where the store refuses a decision
            # over a deleted set (repository.StoredSets); one cheap check per check-out.
            self._sets_memo = None
            with connection.begin():
                if repository.foreign_keys_enforced(connection):
                    self._sets_memo = self._known_sets
        return self._connection

    def _release_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()  # back to the pool (an invalidated one is discarded)
            except Exception:
                log.warning("could not release the writer's connection", exc_info=True)

    def _commit(self, batch: list[_Write]) -> list[Any]:
        """Commit a batch; if it fails, each write gets its own transaction (and one retry),
        so one bad or conflicting write cannot fail its neighbours. A write that still fails
        is answered 503 (retry), never a 500 and never a 2xx."""
        try:
            return self._commit_once(batch)
        except Exception as exc:
            error = exc
        if repository.missing_candidate_set(error):
            # A candidate set this writer took for stored was deleted since (orphan
            # clean-up, maybe in another process): the foreign key refused the batch, and
            # nothing of it was committed. The memo is forgotten (_commit_once), so the
            # batch is retried whole with every set included.
            log.info("a known candidate set was deleted; retrying the batch with its sets")
            try:
                return self._commit_once(batch)
            except Exception as exc:
                error = exc
        # The failed commit may have happened after all (a connection lost while
        # committing): every retry looks its event id up again, so a decision that is
        # in the store is answered as stored, not refused as a duplicate.
        for write in batch:
            write.fresh = False
        if store_unreachable(error):
            return self._commit_when_reachable(batch, error)
        log.warning("batch of %d failed; retrying each write alone", len(batch), exc_info=error)
        return [self._commit_alone(write) for write in batch]

    def _commit_when_reachable(self, batch: list[_Write], error: Exception) -> list[Any]:
        """The store did not answer (restart, failover, dropped connection). Retrying each
        write alone would cost two more failed connections per write and stall the queue for
        the whole outage, so the batch is retried once, whole, on a fresh connection (this
        covers a pooled connection that died with the old server); if that fails too, every
        write is answered 503 at once."""
        log.warning("store unreachable (%s); retrying the batch of %d once",
                    str(error).splitlines()[0], len(batch))  # fmt: skip
        try:
            return self._commit_once(batch)
        except Exception as exc:
            if not store_unreachable(exc):
                return [self._commit_alone(write) for write in batch]
            log.warning("store still unreachable; answering %d writes 503", len(batch))
        return [
            Unavailable(f"the store is unreachable; the {w.kind} was not stored, retry it")
            for w in batch
        ]

    def _commit_once(self, batch: list[_Write]) -> list[Any]:
        start = time.perf_counter()
        turn = self._turns.turn() if self._turns is not None else contextlib.nullcontext()
        try:
            # (Positions commit in log order: insert_decisions takes the log-append lock.)
            if all(write.fresh and write.kind == "decision" for write in batch):
                with turn, self._connect().begin() as transaction:
                    outcomes, set_keys = _apply_fresh(
                        transaction.connection, batch, self._sets_memo
                    )
            else:
                with turn, Session(self._connect()) as session, session.begin():
                    outcomes, set_keys = _apply(session, batch, self._late_margin, self._sets_memo)
        except BaseException:
            # The next attempt (a retry, or the next batch) checks a connection out afresh,
            # and sends every candidate set: a failure may come from a deleted one.
            self._release_connection()
            self._known_sets.forget()
            raise
        # Committed: the decisions' candidate sets are in the store.
        self._known_sets.add(set_keys)
        metrics.WRITER_COMMIT_SECONDS.observe(time.perf_counter() - start)
        metrics.WRITER_BATCH_ROWS.observe(len(batch))
        self.batches_committed += 1
        self.rows_committed += len(batch)
        return outcomes

    def _commit_alone(self, write: _Write) -> Any:
        # A second attempt resolves the common conflict: another process stored the same
        # event id first, and the retry finds and returns that stored decision.
        for attempt in (1, 2):
            try:
                return self._commit_once([write])[0]
            except NotFound as exc:  # a reward whose decision is gone: 404, not a retry
                return exc
            except Exception as exc:
                error = exc
                log.warning("%s write failed (attempt %d): %s", write.kind, attempt, exc)
        log.error("could not store a %s: %s", write.kind, error)
        return Unavailable(f"could not store the {write.kind} right now; retry the request")


def _resolve(batch: list[_Write], outcomes: list[Any]) -> None:
    """On the event loop: answer a committed (or failed) batch's requests."""
    for write, outcome in zip(batch, outcomes, strict=True):
        future = write.future
        if future.done():  # the request was cancelled; its write was handled all the same
            continue
        if not isinstance(outcome, BaseException):  # the usual case first: one check
            future.set_result(outcome)
        elif isinstance(outcome, asyncio.CancelledError):
            future.cancel()
        else:
            future.set_exception(outcome)


def store_unreachable(exc: BaseException) -> bool:
    """Errors that say the store could not be reached, as opposed to a bad write."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError)


def _apply_fresh(
    connection: Connection, batch: list[_Write], stored_sets: repository.StoredSets | None
) -> tuple[list[Any], list[str]]:
    """:func:`_apply` for the usual batch, fresh decisions only, on the connection's
    transaction without an ORM ``Session``: such a batch looks nothing up (see
    :func:`_apply`) and writes no reward, so what remained of the session was its cost,
    ~24 µs of client CPU per batch (its construction, ``begin()``, the connection
    look-up, the commit and close: ~28 µs, against ~4 µs for the connection's own
    transaction; timeit on PostgreSQL). The outcomes are :func:`_apply`'s: an event id
    repeated within the batch (not expected of fresh ids) is stored once, and its later
    writes are answered with the first one, as stored."""
    written: dict[str, dict[str, Any]] = {}
    outcomes: list[Any] = []
    for write in batch:
        event_id = write.payload["event_id"]
        if event_id in written:
            outcomes.append(DecisionWriteResult(False, written[event_id]))
        else:
            written[event_id] = write.payload
            outcomes.append(DecisionWriteResult(True, write.payload))
    set_keys = repository.insert_decisions(
        connection, list(written.values()), stored_sets=stored_sets, ends_transaction=True
    )
    return outcomes, set_keys


def _apply(
    session: Session,
    batch: list[_Write],
    late_margin: float,
    stored_sets: repository.StoredSets | None = None,
) -> tuple[list[Any], list[str]]:
    """Write one batch inside the caller's transaction; return one outcome per write and
    the keys of the decisions' candidate sets (``stored_sets``: those known stored)."""
    # Fresh ids (random UUIDs the service just made) are neither locked nor looked up, on
    # SQLite (its unique key refuses a copy) nor on PostgreSQL (no unique key there: only
    # a UUID collision could repeat one, ~2^-122 a pair). The one way this process could
    # write a fresh id twice is a retry after a commit whose outcome was unknown, and
    # _commit marks such a batch's writes not fresh, so the retry locks and looks them up.
    decision_ids = [w.payload["event_id"] for w in batch if w.kind == "decision" and not w.fresh]
    repository.lock_event_ids(session, decision_ids)  # PostgreSQL: event ids stay unique
    stored = repository.find_decisions(session, decision_ids)
    new_decisions: list[dict[str, Any]] = []
    rewards: list[dict[str, Any]] = []
    reward_outcomes: list[tuple[int, dict[str, Any]]] = []
    now = time.time()
    outcomes: list[Any] = []
    for write in batch:
        if write.kind == "decision":
            event_id = write.payload["event_id"]
            if event_id in stored:
                outcomes.append(DecisionWriteResult(False, stored[event_id]))
            else:
                stored[event_id] = write.payload
                new_decisions.append(write.payload)
                outcomes.append(DecisionWriteResult(True, write.payload))
        elif write.kind == "reward":
            row = dict(write.payload)
            window_end = row.pop("window_end")
            row["late"] = window_end is not None and (
                row["received_at"] > window_end or now > window_end + late_margin
            )
            rewards.append(row)
            reward_outcomes.append((len(outcomes), row))
            outcomes.append(None)  # known once inserted
        else:
            outcomes.append(None)
    # Decisions first: rewards and activations in the same batch may refer to them. A
    # batch of decisions only (the usual one) ends with them: on PostgreSQL the COMMIT
    # then goes in the same round trip as the rows, the log-append lock held for no
    # client round trip at all.
    only_decisions = all(write.kind == "decision" for write in batch)
    set_keys = repository.insert_decisions(
        session, new_decisions, stored_sets=stored_sets, ends_transaction=only_decisions
    )
    inserted = repository.insert_rewards(session, rewards)
    # A reward_id that was not inserted is stored already (an earlier request, a concurrent
    # one from another process, or an earlier write of this batch): answer with that one.
    seen: set[str] = set()
    repeated = []
    for row in rewards:
        if row["reward_id"] not in inserted or row["reward_id"] in seen:
            repeated.append(row["reward_id"])
        seen.add(row["reward_id"])
    stored_rewards = repository.find_rewards(session, repeated)
    claimed: set[str] = set()
    for index, row in reward_outcomes:
        key = row["reward_id"]
        if key in inserted and key not in claimed:
            claimed.add(key)
            outcomes[index] = RewardWriteResult(True, row)
        else:
            outcomes[index] = RewardWriteResult(False, stored_rewards[key])
    for write in batch:
        if write.kind == "activate":
            repository.activate(session, write.payload["event_id"], write.payload["at"])
    return outcomes, set_keys
