"""Warm-start a policy's model from a Personalizer log export (DSJSON).

Each joined DSJSON line is one logged decision (context, actions, the chosen action, its
logged probability and reward = -cost); a multi-slot (CCB) line is one such row per slot
(the slot's remaining actions and features), as the trainer learns multi-slot decisions.
They are learned in file order by the policy's own learner (same VW arguments, same
feature conversion as the live facade, see :mod:`bandit_service.personalizer.features`),
continuing the newest checkpoint of the
policy's lineage, and saved as a new checkpoint, which serving processes load like any
trained model. The log position of that checkpoint is unchanged, so the trainer goes on
learning the service's own log on top of the imported history.

The import holds the policy's trainer lease, so it never races a trainer: with the
service's inline trainer (or ``bandit-service train``) running, stop it first (or set
``BANDIT_TRAINER=off``); the lease frees itself ``BANDIT_TRAINER_LEASE_SECONDS`` after a
trainer stops.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from bandit_service.learners.vw import VWLearner
from bandit_service.ope.evaluate import LogStats
from bandit_service.ope.files import iter_dsjson
from bandit_service.personalizer.features import to_feature_map
from bandit_service.policy import PolicyConfig
from bandit_service.store import repository

LEASE_SECONDS = 60.0
KEEP_CHECKPOINTS = 5


class ImportBusy(RuntimeError):
    """Another process (a trainer) holds the policy's lease."""


@dataclass
class ImportResult:
    lines: int = 0
    learned: int = 0
    malformed: int = 0
    not_joined: int = 0  # no reward joined, or not activated
    deterministic: int = 0  # probability 1: nothing to learn about the alternatives
    model_version: int | None = None
    first_errors: list[str] = field(default_factory=list)


def _features(raw: object) -> dict[str, object]:
    return to_feature_map(raw, "features")


def import_dsjson(
    db: Engine,
    policy: PolicyConfig,
    paths: Sequence[Path],
    progress: Callable[[int, ImportResult], None] | None = None,
    clock: Callable[[], float] = time.time,
) -> ImportResult:
    """Learn ``paths`` into ``policy``'s model and save a checkpoint. ``progress`` hears
    the bytes read so far and the running counts."""
    owner = f"import-{uuid.uuid4().hex[:12]}"
    name = policy.name
    with Session(db) as session, session.begin():
        if not repository.acquire_lease(session, name, owner, clock(), LEASE_SECONDS):
            holder = repository.lease_holder(session, name) or {}
            raise ImportBusy(
                f"policy {name!r} is being trained by {holder.get('owner')!r}; stop that "
                "trainer (the service's inline trainer or `bandit-service train`) and retry "
                "once its lease has expired"
            )
    result = ImportResult()
    stats = LogStats()
    read = 0
    last_renew = clock()
    unparsed = 0  # lines that are not JSON objects (never counted as decisions)
    decisions_before_line = 0

    def malformed(message: str) -> None:
        nonlocal unparsed
        result.malformed += 1
        if stats.decisions == decisions_before_line:
            unparsed += 1
        if len(result.first_errors) < 5:
            result.first_errors.append(message)

    def on_bytes(n: int) -> None:
        nonlocal read, decisions_before_line
        read += n
        decisions_before_line = stats.decisions

    try:
        with Session(db) as session:
            checkpoint = repository.latest_checkpoint(
                session, name, policy.model_key, with_model=True
            )
        learner = VWLearner(
            policy.vw_args,
            checkpoint["model"] if checkpoint else None,
            checkpoint["model_version"] if checkpoint else 0,
        )
        for path in paths:
            for row in iter_dsjson(path, stats, malformed, _features, on_bytes):
                reward = min(policy.reward_max, max(policy.reward_min, row.reward))
                learner.learn_slot(
                    row.context,
                    row.slot,
                    row.slot_features,
                    list(row.eligible),
                    row.chosen,
                    row.propensity,
                    reward,
                )
                result.learned += 1
                if result.learned % 1000 == 0:
                    if progress is not None:
                        _count(result, stats, unparsed)
                        progress(read, result)
                    if clock() - last_renew > LEASE_SECONDS / 3:
                        _renew(db, name, owner, clock())
                        last_renew = clock()
        _count(result, stats, unparsed)
        if progress is not None:
            progress(read, result)
        if result.learned:
            result.model_version = _save(db, policy, owner, learner, checkpoint, result, paths,
                                         clock())  # fmt: skip
    finally:
        with Session(db) as session, session.begin():
            repository.release_lease(session, name, owner)
    return result


def _count(result: ImportResult, stats: LogStats, unparsed: int) -> None:
    result.not_joined = stats.skipped_not_shown
    result.deterministic = stats.skipped_deterministic
    result.lines = stats.decisions + unparsed  # learned etc. count slots of multi-slot lines


def _renew(db: Engine, name: str, owner: str, now: float) -> None:
    with Session(db) as session, session.begin():
        if not repository.renew_own_lease(session, name, owner, now, LEASE_SECONDS):
            raise ImportBusy(f"lost the lease of policy {name!r}; nothing was saved")


def _save(
    db: Engine,
    policy: PolicyConfig,
    owner: str,
    learner: VWLearner,
    checkpoint: dict[str, Any] | None,
    result: ImportResult,
    paths: Sequence[Path],
    now: float,
) -> int:
    model = learner.to_bytes()
    files = ", ".join(p.name for p in paths)
    note = f"warm-started from {result.learned} Personalizer DSJSON events ({files})"
    with Session(db) as session, session.begin():
        if not repository.renew_own_lease(session, policy.name, owner, now, LEASE_SECONDS):
            raise ImportBusy(f"lost the lease of policy {policy.name!r}; nothing was saved")
        return repository.insert_checkpoint(
            session,
            {
                "policy": policy.name,
                "model_key": policy.model_key,
                "policy_version": policy.version,
                "position": checkpoint["position"] if checkpoint else 0,
                "learned_events": (checkpoint["learned_events"] if checkpoint else 0)
                + result.learned,
                "skipped_events": checkpoint["skipped_events"] if checkpoint else 0,
                "created_at": now,
                "note": note,
                "model": model,
            },
            keep=KEEP_CHECKPOINTS,
        )
