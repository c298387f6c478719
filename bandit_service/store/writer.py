"""Group commit: many concurrent requests, one transaction, each answered after it commits.

A commit with fsync costs milliseconds, so one commit per request caps throughput at a few
hundred per second. Requests instead enqueue their write and await a future; one writer
thread takes everything queued (up to ``max_rows``), writes it in a single transaction and
resolves every future only after the commit returned. While one batch commits, the next one
accumulates, so batches grow with load and a lone request still commits at once.

If a batch fails (for example a concurrent process inserted the same event id), each of its
writes is retried alone, so one bad write cannot fail its neighbours.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from bandit_service.errors import NotFound, Unavailable
from bandit_service.ops import metrics
from bandit_service.store import repository

log = logging.getLogger(__name__)

WriteKind = Literal["decision", "reward", "activate"]


@dataclass
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
        self._queue: asyncio.Queue[_Write] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="writer")
        self.batches_committed = 0
        self.rows_committed = 0

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batch-writer")

    async def close(self) -> None:
        """Stop accepting writes, flush what is queued, and stop the writer."""
        self._closing = True
        if self._queue is not None and self._task is not None:
            await self._queue.join()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def write_decision(self, row: dict[str, Any], fresh: bool = False) -> DecisionWriteResult:
        """Store a decision, or return the stored one with the same event id.

        ``fresh``: the service made the event id itself (a random UUID), so the look-up for
        an earlier copy is skipped -- at one request per batch it was a third of the
        batch's CPU. The unique key still refuses a duplicate on SQLite (the write is then
        503); PostgreSQL's partitioned log has none, so there the look-up stays."""
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
        if self._closing or self._queue is None:
            raise Unavailable("the service is shutting down; retry on another instance")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Write(kind, payload, future, fresh))
        metrics.WRITER_QUEUE.inc()
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_rows and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            metrics.WRITER_QUEUE.dec(len(batch))
            try:
                outcomes = await loop.run_in_executor(self._executor, self._commit, batch)
            except BaseException as exc:  # even cancellation must not strand waiting requests
                outcomes = [exc] * len(batch)
            for write, outcome in zip(batch, outcomes, strict=True):
                if not write.future.done():
                    if isinstance(outcome, BaseException):
                        write.future.set_exception(outcome)
                    else:
                        write.future.set_result(outcome)
                self._queue.task_done()

    def _commit(self, batch: list[_Write]) -> list[Any]:
        """Commit a batch; if it fails, each write gets its own transaction (and one retry),
        so one bad or conflicting write cannot fail its neighbours. A write that still fails
        is answered 503 (retry), never a 500 and never a 2xx."""
        try:
            return self._commit_once(batch)
        except Exception as exc:
            # The failed commit may have happened after all (a connection lost while
            # committing): every retry looks its event id up again, so a decision that is
            # in the store is answered as stored, not refused as a duplicate.
            for write in batch:
                write.fresh = False
            if store_unreachable(exc):
                return self._commit_when_reachable(batch, exc)
            log.warning("batch of %d failed; retrying each write alone", len(batch), exc_info=True)
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
        with Session(self._engine) as session, session.begin():
            if any(w.kind == "decision" for w in batch):
                repository.serialize_log_appends(session)
            outcomes = _apply(session, batch, self._late_margin)
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


def store_unreachable(exc: BaseException) -> bool:
    """Errors that say the store could not be reached, as opposed to a bad write."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError)


def _apply(session: Session, batch: list[_Write], late_margin: float) -> list[Any]:
    """Write one batch inside the caller's transaction; return one outcome per write."""
    decision_ids = [w.payload["event_id"] for w in batch if w.kind == "decision" and not w.fresh]
    repository.lock_event_ids(session, decision_ids)  # PostgreSQL: event ids stay unique
    if not repository.event_id_is_unique_key(session):
        # PostgreSQL's partitioned log has no unique index on event_id to refuse a fresh
        # id written twice: look those up as well (no lock: one process made each).
        decision_ids += [w.payload["event_id"] for w in batch if w.kind == "decision" and w.fresh]
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
    # Decisions first: rewards and activations in the same batch may refer to them.
    repository.insert_decisions(session, new_decisions)
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
    return outcomes
