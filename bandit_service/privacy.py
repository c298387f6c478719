"""Rights and data minimisation (issue 10): opt-outs, delete-user, retention, redaction.

* **Opt-out.** A user opted out (stored, ``PUT /v1/users/{user_id}/opt-out``) or a request
  with ``personalize: false`` gets the non-personalized ranking under the arm
  ``opted_out``; no context features (nor exclusions) are logged for it, those of the
  user's earlier decisions are emptied, and the trainer and the popularity board never
  learn from it. Each serving process keeps the set of
  opted-out keys in memory (:class:`OptOutRegistry`): the process that stored the opt-out
  applies it at once, the others within ``model_reload_seconds``. The trainer reads the
  store itself, so a user is never learned from once the opt-out has committed, whatever a
  serving process still believed.
* **Delete-user.** Every decision and reward of the user (by keyed hash), and the stored
  opt-out unless asked to keep it. Models already trained stay (they hold weights, not
  rows; see docs/data.md), as for retention.
* **Retention.** A policy's ``retention_days`` removes older decisions with their rewards,
  periodically in every serving process. On PostgreSQL whole time-range partitions that
  have expired are dropped (milliseconds, whatever they hold; store/partitions.py); what
  remains expired (the range the cutoff falls in, default partitions, SQLite) goes in
  batches of deletes (one short transaction each).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from bandit_service.policy import PolicyConfig
from bandit_service.store import partitions
from bandit_service.store import privacy as store

log = logging.getLogger(__name__)

# Serving processes may read an opt-out a little after another process committed it with an
# earlier timestamp; re-reading this far back makes such late commits visible.
OPT_OUT_OVERLAP_SECONDS = 30.0
RETENTION_BATCH = 5000
# An undone opt-out is kept as a marker so running processes see the undo; then forgotten.
UNDONE_OPT_OUT_KEPT_SECONDS = 86400.0


class OptOutRegistry:
    """The opted-out user keys, in memory, kept current by :meth:`refresh`."""

    def __init__(self, db: Engine) -> None:
        self._db = db
        self._keys: set[str] = set()
        self._since: float | None = None  # None: never loaded
        self._lock = threading.Lock()

    def __contains__(self, user_key: object) -> bool:
        return user_key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def loaded(self) -> bool:
        return self._since is not None

    def apply(self, user_key: str, opted_out: bool) -> None:
        with self._lock:
            if opted_out:
                self._keys.add(user_key)
            else:
                self._keys.discard(user_key)

    def refresh(self) -> None:
        """Read the opt-outs (and undos) recorded since the last refresh.

        Opt-outs recorded in the last ``OPT_OUT_OVERLAP_SECONDS`` are re-read on every
        refresh, and the context of those users' decisions is scrubbed again each time: a
        decision this process personalized before it knew of the opt-out, still in its group
        commit at the first refresh, is caught by the next one."""
        started = time.time()
        since = 0.0 if self._since is None else self._since - OPT_OUT_OVERLAP_SECONDS
        with Session(self._db) as session, session.begin():
            changes = store.opt_out_changes(session, since)
            recent = [
                k for k, out, at in changes if out and at >= started - 2 * OPT_OUT_OVERLAP_SECONDS
            ]
            if recent:
                store.scrub_opted_out(session, recent)
        with self._lock:
            for key, opted_out, _at in changes:
                if opted_out:
                    self._keys.add(key)
                else:
                    self._keys.discard(key)
            self._since = started


def set_opt_out(db: Engine, user_key: str, opted_out: bool) -> dict[str, Any]:
    """Store (or undo) an opt-out. Opting out also empties the context and exclusions of the
    user's decisions logged before (undoing cannot bring them back)."""
    now = time.time()
    with Session(db) as session, session.begin():
        store.set_opt_out(session, user_key, opted_out, now)
        scrubbed = store.scrub_opted_out(session, [user_key]) if opted_out else 0
    return {"opted_out": opted_out, "updated_at": now, "scrubbed_decisions": scrubbed}


def opt_out_state(db: Engine, user_key: str) -> dict[str, Any]:
    with Session(db) as session:
        state = store.opt_out_state(session, user_key)
    return state or {"opted_out": False, "updated_at": None}


def delete_user(db: Engine, user_key: str, *, keep_opt_out: bool) -> dict[str, int]:
    """Remove every stored row of one user in one transaction; rows removed per table."""
    with Session(db) as session, session.begin():
        return store.delete_user(session, user_key, keep_opt_out=keep_opt_out)


@dataclass
class RetentionResult:
    policy: str
    cutoff: float
    decisions: int = 0
    rewards: int = 0
    batches: int = 0
    seconds: float = 0.0
    partitions_dropped: int = 0  # PostgreSQL: time ranges dropped whole (rows counted above)
    longest_drop_lock_seconds: float = 0.0  # the policy's log locked exclusively, per drop

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "cutoff": self.cutoff,
            "decisions": self.decisions,
            "rewards": self.rewards,
            "batches": self.batches,
            "partitions_dropped": self.partitions_dropped,
            "longest_drop_lock_seconds": round(self.longest_drop_lock_seconds, 6),
            "seconds": round(self.seconds, 6),
        }


@dataclass
class RetentionJob:
    """Removes decisions (and their rewards) older than each policy's ``retention_days``.

    PostgreSQL first drops every time-range partition of the policy whose rows are all
    older than the cutoff (store/partitions.py), and creates the partitions the coming days
    need. Then, on both stores, batched deletes (``batch`` decisions per short transaction)
    remove what is left of the expired rows, so the job never holds a long lock over the
    log and concurrent decisions keep flowing. Several processes may run it at once: drops
    and deletes are idempotent. Rows the trainer has not learned yet are removed too
    (retention is a promise to users; a stalled trainer must not extend it), which the
    validation ``retention_days * 86400 > reward_window_seconds`` makes rare.

    ``whole_partitions`` (PostgreSQL; ``BANDIT_RETENTION_WHOLE_PARTITIONS``): remove rows
    of a time-range partition only by dropping it, once all of them expired. With the job
    running hourly, exact removal deletes each hour the hour of rows that just expired in
    the current range, so in steady state nearly every row still goes by ``DELETE``; with
    this flag no row of a range partition ever does, and a row lives at most one partition
    width (``retention_days / 10``, at least a day) beyond its retention.
    Rows in default partitions are still removed exactly.
    """

    db: Engine
    policies: Mapping[str, PolicyConfig]
    batch: int = RETENTION_BATCH
    whole_partitions: bool = False
    last_results: list[RetentionResult] = field(default_factory=list)

    def run_once(self, now: float | None = None) -> list[RetentionResult]:
        now = time.time() if now is None else now
        with Session(self.db) as session, session.begin():
            store.forget_undone_opt_outs(session, now - UNDONE_OPT_OUT_KEPT_SECONDS)
        partitions.ensure(
            self.db, [(p.name, p.retention_days) for p in self.policies.values()], now
        )
        results = []
        for policy in self.policies.values():
            if policy.retention_days > 0:
                results.append(self._expire(policy, now - policy.retention_days * 86400.0))
        self.last_results = results
        return results

    def _drop_partitions(self, policy: str, cutoff: float, result: RetentionResult) -> None:
        with self.db.connect() as connection:
            expired = partitions.expired_ranges(connection, policy, cutoff)
        for expired_range in expired:
            dropped = partitions.drop_range(self.db, policy, expired_range)
            if dropped is None:
                log.warning("retention: partition %s of policy %s is busy; deleting its rows "
                            "instead", expired_range, policy)  # fmt: skip
                continue
            result.partitions_dropped += 1
            result.longest_drop_lock_seconds = max(
                result.longest_drop_lock_seconds, dropped.exclusive_seconds
            )
            result.decisions += dropped.decisions
            result.rewards += dropped.rewards
            keys = dropped.candidate_sets
            for start in range(0, len(keys), self.batch):  # short transactions
                with Session(self.db) as session, session.begin():
                    store.drop_orphaned_sets(session, keys[start : start + self.batch])

    def _kept_ranges(self, policy: str) -> list[tuple[float, float]]:
        """Whole-partition mode: the time ranges whose rows only a drop removes."""
        if not (self.whole_partitions and partitions.is_partitioned(self.db)):
            return []
        with self.db.connect() as connection:
            return [(r.start, r.end) for r in partitions.ranges(connection, "decisions", policy)]

    def _expire(self, policy: PolicyConfig, cutoff: float) -> RetentionResult:
        result = RetentionResult(policy.name, cutoff)
        started = time.perf_counter()
        if partitions.is_partitioned(self.db):
            self._drop_partitions(policy.name, cutoff, result)
        kept = self._kept_ranges(policy.name)
        while True:
            with Session(self.db) as session, session.begin():
                decisions, rewards = store.expire_batch(
                    session, policy.name, cutoff, self.batch, outside=kept
                )
            result.decisions += decisions
            result.rewards += rewards
            result.batches += 1
            if decisions < self.batch:
                break
        result.seconds = time.perf_counter() - started
        if result.decisions:
            log.info(
                "retention: policy %s removed %d decisions and %d rewards older than %d days",
                policy.name, result.decisions, result.rewards, policy.retention_days,
            )  # fmt: skip
        return result


# -- logs ------------------------------------------------------------------------------------
_USER_PATH = re.compile(r"(/v1/users/)[^/?\s]+")


def redact_user_path(path: str) -> str:
    """``/v1/users/ana%40example.com/opt-out`` -> ``/v1/users/<redacted>/opt-out``."""
    return _USER_PATH.sub(r"\1<redacted>", path)


class RedactUserIds(logging.Filter):
    """Keeps raw user ids (which appear in the paths of ``/v1/users/...``) out of access
    logs: uvicorn's access record carries the path as its third argument."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if (
            isinstance(args, tuple)
            and len(args) >= 3
            and isinstance(args[2], str)
            and "/v1/users/" in args[2]
        ):
            record.args = (*args[:2], redact_user_path(args[2]), *args[3:])
        return True


def install_log_redaction() -> None:
    """Idempotent: one filter on uvicorn's access logger."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactUserIds) for f in access.filters):
        access.addFilter(RedactUserIds())
