"""The trainer: join rewards to decisions once their window closes, learn, checkpoint.

Exactly-once learning (DESIGN invariant 4): the model and the log position it covers are
saved in one transaction. A crash between learning and checkpoint loses the in-memory
learning *and* the position together, so the restarted trainer relearns exactly those
events from the last checkpoint: nothing skipped, nothing learned twice.

Events are handled strictly in log-position order. An event is ready when its reward
window has closed plus a small commit grace (so a decision or reward still in flight in
another process's group commit is not overtaken); the first event not yet ready stops the
batch. A deferred decision counts only if it was activated within its reward window from
creation; its rewards then count until ``activated_at + window``. Otherwise it is skipped
(counted, not learned).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from bandit_service.domain import Candidate
from bandit_service.learners.vw import VWLearner
from bandit_service.learners.vw_text import EligibleCandidates
from bandit_service.policy import PolicyConfig
from bandit_service.rewards import readiness, slot_rewards
from bandit_service.store import compact, repository
from bandit_service.store.privacy import opted_out_among

log = logging.getLogger(__name__)


class TrainableLearner(Protocol):
    model_version: int

    def learn_slot(
        self,
        context: Mapping[str, Any],
        slot_index: int,
        slot_features: Mapping[str, Any],
        candidates: list[Candidate],
        chosen: int,
        probability: float,
        reward: float,
    ) -> None: ...

    def to_bytes(self) -> bytes: ...


LearnerFactory = Callable[[str, bytes | None, int], TrainableLearner]


def vw_learner_factory(vw_args: str, model: bytes | None, version: int) -> TrainableLearner:
    return VWLearner(vw_args, model_bytes=model, model_version=version)


@dataclass(frozen=True)
class TrainerOptions:
    batch_events: int = 2000
    commit_grace_seconds: float = 2.0
    lease_seconds: float = 30.0
    keep_checkpoints: int = 5


@dataclass
class StepResult:
    policy: str
    active: bool  # false: another trainer holds the lease
    learned: int = 0
    skipped: int = 0
    model_version: int | None = None
    more: bool = False  # a full batch was handled; call again


_MAX_CANDIDATE_SETS = 256
_MAX_ELIGIBLE = 1024


class LeaseLost(RuntimeError):
    pass


@dataclass
class PolicyTrainer:
    """Trains one policy's model. Not thread-safe: one thread drives it."""

    db: Engine
    policy: PolicyConfig
    owner: str
    options: TrainerOptions = field(default_factory=TrainerOptions)
    clock: Callable[[], float] = time.time
    learner_factory: LearnerFactory = vw_learner_factory
    before_checkpoint: Callable[[], None] | None = None  # crash injection for tests

    learner: TrainableLearner | None = None
    position: int = 0
    learned_events: int = 0
    skipped_events: int = 0
    model_version: int = 0
    note: str = ""
    # Decoded candidate sets by key, and eligible lists by (set key, eligibility): both
    # repeat from event to event, so each is decoded (and rendered by the learner) once.
    _candidate_sets: dict[str, list[Candidate]] = field(default_factory=dict, repr=False)
    _eligible: dict[tuple[str, tuple[Any, ...]], EligibleCandidates] = field(
        default_factory=dict, repr=False
    )

    def step(self) -> StepResult:
        now = self.clock()
        with Session(self.db) as session, session.begin():
            if not repository.acquire_lease(
                session, self.policy.name, self.owner, now, self.options.lease_seconds
            ):
                self.learner = None  # someone else trains; reload when we get the lease
                return StepResult(self.policy.name, active=False)
            latest = repository.latest_checkpoint(session, self.policy.name)
            if self.learner is None or (latest and latest["model_version"] != self.model_version):
                self._load(session)
            batch = repository.training_batch(
                session, self.policy.name, self.position, self.options.batch_events
            )
            self._load_candidate_sets(session, {d["candidate_set"] for d in batch})
            # Opted-out users are never learned from (issue 10), whatever arm was served.
            opted_out = opted_out_among(session, (d["user_key"] for d in batch))
        for decision in batch:
            decision["opted_out"] = decision["user_key"] in opted_out
        return self._learn_batch(batch, now)

    def _load_candidate_sets(self, session: Session, keys: set[str]) -> None:
        """Decode the batch's candidate sets not already known (bounded caches)."""
        missing = keys - self._candidate_sets.keys()
        if len(self._candidate_sets) + len(missing) > _MAX_CANDIDATE_SETS:
            self._candidate_sets.clear()
            self._eligible.clear()
            missing = keys
        for key, text in repository.candidate_set_texts(session, missing):
            self._candidate_sets[key] = [
                Candidate(c["id"], c.get("features") or {}) for c in orjson.loads(text)
            ]

    def _load(self, session: Session) -> None:
        """Resume from this lineage's newest checkpoint, or start (warm) from position 0."""
        name, key = self.policy.name, self.policy.model_key
        checkpoint = repository.latest_checkpoint(session, name, key, with_model=True)
        if checkpoint is not None:
            self.learner = self.learner_factory(
                self.policy.vw_args, checkpoint["model"], checkpoint["model_version"]
            )
            self.position = checkpoint["position"]
            self.learned_events = checkpoint["learned_events"]
            self.skipped_events = checkpoint["skipped_events"]
            self.model_version = checkpoint["model_version"]
            self.note = checkpoint["note"]
            return
        self.learner = self.learner_factory(self.policy.vw_args, None, 0)
        self.position = self.learned_events = self.skipped_events = 0
        other = repository.latest_checkpoint(session, name)
        if other is not None:
            self.model_version = other["model_version"]
            self.note = (
                f"new model {key} for policy version {self.policy.version} (the previous "
                f"model {other['model_key']} is not compatible with vw_args "
                f"{self.policy.vw_args!r}); warm-starting by replaying the logged history"
            )
            log.warning("policy %s: %s", name, self.note)
        else:
            self.model_version = 0
            self.note = ""

    def _learn_batch(self, batch: list[dict[str, Any]], now: float) -> StepResult:
        """Learn the ready prefix of ``batch`` and checkpoint it.

        Whatever goes wrong between the first learn and the committed checkpoint, the
        in-memory model is discarded, so the next step reloads the last checkpoint and
        relearns from its position: never an event learned twice, never one skipped.
        """
        try:
            return self._learn_and_checkpoint(batch, now)
        except BaseException:
            self.learner = None
            raise

    def _learn_and_checkpoint(self, batch: list[dict[str, Any]], now: float) -> StepResult:
        assert self.learner is not None
        learned = skipped = 0
        position = self.position
        for decision in batch:
            state = readiness(decision, self.policy, now, self.options.commit_grace_seconds)
            if state == "wait":
                break
            examples = self._examples(decision) if state == "learn" else None
            if examples:
                for example in examples:
                    self.learner.learn_slot(*example)
                learned += 1
            else:
                skipped += 1
            position = decision["position"]
        result = StepResult(self.policy.name, active=True, learned=learned, skipped=skipped)
        if position == self.position:
            result.model_version = self.model_version
            return result
        if self.before_checkpoint is not None:
            self.before_checkpoint()
        self._checkpoint(position, learned, skipped)
        result.model_version = self.model_version
        result.more = len(batch) == self.options.batch_events and position == batch[-1]["position"]
        return result

    def _examples(self, decision: Mapping[str, Any]) -> list[tuple[Any, ...]] | None:
        """One learning example per slot, or None when the event is not learned: holdout
        events (the bandit learns from its own traffic only) and rows that cannot be
        replayed (logged and skipped, so one bad row cannot stall the log). Opted-out users'
        decisions are skipped too (issue 10)."""
        if decision["arm"] != "bandit" or decision.get("opted_out"):
            return None
        try:
            return learning_examples(
                decision,
                self.policy,
                lambda slot: self._eligible_for(decision["candidate_set"], slot),
            )
        except (KeyError, TypeError, ValueError, IndexError, StopIteration) as exc:
            log.error(
                "policy %s: cannot replay event %s (%s: %s); skipped",
                self.policy.name, decision.get("event_id"), type(exc).__name__, exc,
            )  # fmt: skip
            return None

    def _eligible_for(self, set_key: str, slot: Mapping[str, Any]) -> EligibleCandidates:
        """The candidates eligible for a logged slot, in logged order, shared by every event
        with the same candidate set and eligibility."""
        compact_form = "eligible" in slot
        shape = tuple(slot["eligible"] if compact_form else (cid for cid, _p in slot["pmf"]))
        found = self._eligible.get((set_key, shape))
        if found is None:
            candidates = self._candidate_sets[set_key]
            if compact_form:
                found = EligibleCandidates(candidates[i] for i in compact.indices(shape))
            else:  # a slot stored in the classic form (see store/compact.py)
                by_id = {c.id: c for c in candidates}
                found = EligibleCandidates(by_id.get(cid) or Candidate(cid) for cid in shape)
            if len(self._eligible) >= _MAX_ELIGIBLE:
                self._eligible.clear()
            self._eligible[(set_key, shape)] = found
        return found

    def _checkpoint(self, position: int, learned: int, skipped: int) -> None:
        assert self.learner is not None
        model = self.learner.to_bytes()
        now = self.clock()
        with Session(self.db) as session, session.begin():
            if not repository.renew_own_lease(
                session, self.policy.name, self.owner, now, self.options.lease_seconds
            ):
                self.learner = None
                raise LeaseLost(f"trainer {self.owner} lost the lease of {self.policy.name}")
            version = repository.insert_checkpoint(
                session,
                {
                    "policy": self.policy.name,
                    "model_key": self.policy.model_key,
                    "policy_version": self.policy.version,
                    "position": position,
                    "learned_events": self.learned_events + learned,
                    "skipped_events": self.skipped_events + skipped,
                    "created_at": now,
                    "note": self.note,
                    "model": model,
                },
                keep=self.options.keep_checkpoints,
            )
        self.position = position
        self.learned_events += learned
        self.skipped_events += skipped
        self.model_version = version
        self.learner.model_version = version

    def release(self) -> None:
        with Session(self.db) as session, session.begin():
            repository.release_lease(session, self.policy.name, self.owner)


def eligible_from_pmf(
    by_id: Mapping[str, Candidate],
) -> Callable[[Mapping[str, Any]], Sequence[Candidate]]:
    """Eligible candidates of a slot in the classic row shape (``pmf`` of ``(id, p)``)."""
    return lambda slot: [by_id.get(cid) or Candidate(cid) for cid, _p in slot["pmf"]]


def learning_examples(
    decision: Mapping[str, Any],
    policy: PolicyConfig,
    eligible_for: Callable[[Mapping[str, Any]], Sequence[Candidate]],
) -> list[tuple[Any, ...]]:
    """One ``learn_slot`` argument tuple per slot of a logged bandit decision whose window
    has closed: the candidates eligible for the slot (in pmf order, from ``eligible_for``),
    the chosen one, its logged probability and the slot's reward (on-time rewards
    aggregated, else the default).

    Shared by the trainer and the in-process simulator, so both learn the same examples.
    """
    rewards = slot_rewards(decision, policy)
    apprentice = policy.learning_mode == "apprentice"
    examples = []
    for slot, reward in zip(decision["slots"], rewards, strict=True):
        eligible = eligible_for(slot)
        if isinstance(eligible, EligibleCandidates):  # indexes its ids
            chosen = eligible.position[slot["id"]]
        else:
            chosen = next(i for i, c in enumerate(eligible) if c.id == slot["id"])
        # Apprentice mode imitates: with only the baseline ever shown there is nothing
        # to compare its reward against, so the baseline is learned as the best action.
        examples.append(
            (
                decision["context"],
                slot["slot"],
                slot.get("slot_features") or {},
                eligible,
                chosen,
                slot["probability"],
                policy.reward_max if apprentice else reward,
            )
        )
    return examples


class Trainer:
    """Trains every learning policy; at most one active trainer per policy across processes."""

    def __init__(
        self,
        db: Engine,
        policies: Mapping[str, PolicyConfig],
        options: TrainerOptions | None = None,
        clock: Callable[[], float] = time.time,
        learner_factory: LearnerFactory = vw_learner_factory,
        on_checkpoint: Callable[[str, int], object] | None = None,
    ) -> None:
        self.owner = f"trainer-{uuid.uuid4().hex[:12]}"
        self.on_checkpoint = on_checkpoint
        self._db = db
        self._options = options or TrainerOptions()
        self._clock = clock
        self._learner_factory = learner_factory
        self._pending: dict[str, PolicyConfig] = {}
        self._pending_lock = threading.Lock()
        self.trainers = {
            name: PolicyTrainer(
                db,
                policy,
                self.owner,
                options or TrainerOptions(),
                clock=clock,
                learner_factory=learner_factory,
            )
            for name, policy in policies.items()
            if policy.learning_mode != "logging_only"
        }

    def set_policy(self, policy: PolicyConfig) -> None:
        """Train ``policy`` (new or changed) from the next cycle on. Thread-safe: the
        training thread applies it between cycles, never in the middle of a step."""
        with self._pending_lock:
            self._pending[policy.name] = policy

    def _apply_pending(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for name, policy in pending.items():
            old = self.trainers.pop(name, None)
            if old is not None and policy.learning_mode == "logging_only":
                old.release()
            if policy.learning_mode != "logging_only":
                # A fresh PolicyTrainer resumes from the newest checkpoint of the policy's
                # (possibly new) lineage, or warm-starts a new lineage from the log.
                self.trainers[name] = PolicyTrainer(
                    self._db, policy, self.owner, self._options,
                    clock=self._clock, learner_factory=self._learner_factory,
                )  # fmt: skip

    def run_once(self) -> dict[str, StepResult]:
        """Learn everything ready now; returns the last step's result per policy."""
        self._apply_pending()
        results: dict[str, StepResult] = {}
        for name, trainer in self.trainers.items():
            before = trainer.model_version
            try:
                result = trainer.step()
                while result.more:
                    result = trainer.step()
            except LeaseLost as exc:
                log.warning("%s", exc)
                result = StepResult(name, active=False)
            except Exception:  # one policy's failure must not stop the others
                log.exception("policy %s: training step failed; will retry", name)
                result = StepResult(name, active=False)
            results[name] = result
            if result.model_version not in (None, before) and self.on_checkpoint:
                self.on_checkpoint(name, result.model_version)
        return results

    def run_forever(
        self,
        stop: threading.Event,
        interval: float,
        on_cycle: Callable[[], object] | None = None,
    ) -> None:
        """Train until ``stop`` is set; errors are logged and retried, never fatal.
        ``on_cycle`` runs after every cycle (the CLI's liveness heartbeat)."""
        while not stop.is_set():
            if on_cycle is not None:
                on_cycle()
            try:
                for name, result in self.run_once().items():
                    if result.learned or result.skipped:
                        log.info(
                            "policy %s: learned %d, skipped %d; model version %s",
                            name, result.learned, result.skipped, result.model_version,
                        )  # fmt: skip
            except Exception:
                log.exception("training cycle failed; retrying in %.1fs", interval)
            stop.wait(interval)
        for trainer in self.trainers.values():
            try:
                trainer.release()
            except Exception:
                log.exception("could not release the lease of %s", trainer.policy.name)
