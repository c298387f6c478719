"""The models a serving process decides with, and their hot reload from checkpoints.

Every process (API worker) polls the store for each policy's newest checkpoint of its
current model lineage and, when it is newer than what it serves, loads it into a fresh
VW workspace and swaps the reference. The swap is one dictionary assignment, so a decision
uses either the old model or the new one, never a mix; in-flight decisions keep a
reference to the model they started with.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from bandit_service.learners.vw import VWLearner
from bandit_service.ops import metrics
from bandit_service.policy import PolicyConfig
from bandit_service.store import repository

log = logging.getLogger(__name__)


class ModelRegistry:
    def __init__(self, db: Engine, policies: Mapping[str, PolicyConfig]) -> None:
        self._db = db
        self._policies = dict(policies)
        self._learners = {name: VWLearner(p.vw_args) for name, p in self._policies.items()}
        self._loaded_at = dict.fromkeys(self._policies, time.time())
        self._swapped_at: dict[str, float] = {}  # when a checkpoint was last swapped in
        self._refresh_lock = threading.Lock()
        self.reloads = 0
        for name in self._policies:
            metrics.observe_serving(name, 0)

    def get(self, name: str) -> VWLearner:
        return self._learners[name]

    def loaded_at(self, name: str) -> float:
        return self._loaded_at[name]

    def set_policy(self, policy: PolicyConfig) -> None:
        """Serve ``policy`` from now on (a new or changed policy file).

        Same VW arguments: the current model stays. Otherwise the newest checkpoint of the
        new lineage (``model_key``) is loaded under the new arguments, or a fresh model
        starts when that lineage has none yet (the trainer then warm-starts it by replaying
        the log); an exploration-only change keeps the lineage and so the learned weights.
        """
        with self._refresh_lock:
            old = self._policies.get(policy.name)
            self._policies = {**self._policies, policy.name: policy}
            if old is not None and old.vw_args == policy.vw_args:
                return
            with Session(self._db) as session:
                full = repository.latest_checkpoint(
                    session, policy.name, policy.model_key, with_model=True
                )
            learner = (
                VWLearner(policy.vw_args, full["model"], full["model_version"])
                if full is not None
                else VWLearner(policy.vw_args)
            )
            self._learners = {**self._learners, policy.name: learner}
            self._loaded_at = {**self._loaded_at, policy.name: time.time()}

    def refresh(self) -> list[str]:
        """Load newer checkpoints; returns the policies whose model changed."""
        changed: list[str] = []
        with self._refresh_lock:
            for name, policy in self._policies.items():
                swapped = self._swapped_at.get(name)
                if swapped is not None and time.time() - swapped < policy.model_update_seconds:
                    continue  # the policy asks for fewer model changes (model_update_seconds)
                current = self._learners[name].model_version
                with Session(self._db) as session:
                    latest = repository.latest_checkpoint(session, name, policy.model_key)
                    if latest is None or latest["model_version"] <= current:
                        continue
                    full = repository.latest_checkpoint(
                        session, name, policy.model_key, with_model=True
                    )
                assert full is not None
                try:
                    version = full["model_version"]
                    learner = VWLearner(policy.vw_args, full["model"], version)
                except Exception:  # a bad checkpoint must not stop serving
                    log.exception(
                        "policy %s: cannot load model version %d; still serving version %d",
                        name, full["model_version"], current,
                    )  # fmt: skip
                    continue
                self._learners[name] = learner
                self._loaded_at[name] = self._swapped_at[name] = time.time()
                self.reloads += 1
                metrics.observe_reload(name, version)
                changed.append(name)
                log.info("policy %s: now serving model version %d", name, full["model_version"])
        return changed
