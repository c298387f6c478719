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
  in batches (one short transaction each), periodically in every serving process.
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

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "cutoff": self.cutoff,
            "decisions": self.decisions,
            "rewards": self.rewards,
            "batches": self.batches,
            "seconds": round(self.seconds, 6),
        }


@dataclass
class RetentionJob:
    """Removes decisions (and their rewards) older than each policy's ``retention_days``.

    Batched deletes (``batch`` decisions per short transaction) on both stores, so the job
    never holds a long lock over the log and concurrent decisions keep flowing. Several
    processes may run it at once: deletes are idempotent. Rows the trainer has not learned
    yet are removed too (retention is a promise to users; a stalled trainer must not extend
    it), which the validation ``retention_days * 86400 > reward_window_seconds`` makes rare.
    """

    db: Engine
    policies: Mapping[str, PolicyConfig]
    batch: int = RETENTION_BATCH
    last_results: list[RetentionResult] = field(default_factory=list)

    def run_once(self, now: float | None = None) -> list[RetentionResult]:
        now = time.time() if now is None else now
        with Session(self.db) as session, session.begin():
            store.forget_undone_opt_outs(session, now - UNDONE_OPT_OUT_KEPT_SECONDS)
        results = []
        for policy in self.policies.values():
            if policy.retention_days > 0:
                results.append(self._expire(policy, now - policy.retention_days * 86400.0))
        self.last_results = results
        return results

    def _expire(self, policy: PolicyConfig, cutoff: float) -> RetentionResult:
        result = RetentionResult(policy.name, cutoff)
        started = time.perf_counter()
        while True:
            with Session(self.db) as session, session.begin():
                decisions, rewards = store.expire_batch(session, policy.name, cutoff, self.batch)
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
