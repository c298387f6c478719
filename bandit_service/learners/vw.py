"""The only module that imports Vowpal Wabbit; also home of the one cost = -reward flip.

Each slot is one ``cb_explore_adf`` decision: a shared line (context + slot features) and
one line per still-eligible candidate. VW returns a probability mass function over those
candidates; the engine draws from it with its own seeded sampler, so the logged probability
is the one actually used.
"""

from __future__ import annotations

import functools
import os
import shlex
import tempfile
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import vowpalwabbit
from vowpalwabbit import pyvw

from bandit_service.domain import Candidate
from bandit_service.learners import vw_text

# pyvw wraps every parsed line in a Python ``Example`` object (~8 µs each: 400 µs for a
# 50-candidate decision) before calling these same pylibvw functions. Calling them
# directly on the parsed examples gives identical results (tests/unit/test_vw_text.py
# checks it against the public API) at about a third of the cost.
_pylibvw = pyvw.pylibvw


def cost_from_reward(reward: float) -> float:
    """VW minimises cost; the service maximises reward. This is the only place the sign flips."""
    return -reward


def workspace_args(vw_args: str, seed: int = 0) -> str:
    """The policy's VW arguments plus what the service always needs (quiet, seeded)."""
    tokens = shlex.split(vw_args)
    extra = ["--quiet"] if "--quiet" not in tokens else []
    if "--random_seed" not in tokens:
        extra += ["--random_seed", str(seed)]
    return " ".join([*tokens, *extra])


@functools.lru_cache(maxsize=256)
def vw_args_problem(vw_args: str) -> str | None:
    """Why VW refuses ``vw_args`` (e.g. an unknown option), or None: a workspace is built
    once and dropped. Policies are checked with it when loaded, so a bad option fails at
    start or at a configuration change with a clear message, not later in a learner."""
    try:
        workspace = vowpalwabbit.Workspace(workspace_args(vw_args))
    except Exception as exc:  # VW raises RuntimeError for options it does not know
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    workspace.finish()
    return None


class VWLearner:
    """A VW ``cb_explore_adf`` model for one policy.

    VW workspaces are not thread-safe; a lock serialises calls so the learner may be shared
    between the event loop and a training thread.
    """

    def __init__(self, vw_args: str, model_bytes: bytes | None = None, model_version: int = 0):
        self.vw_args = vw_args
        self.model_version = model_version
        self._lock = threading.Lock()
        self._ws = self._workspace(vw_args, model_bytes)
        self.lines = vw_text.ActionLineCache()

    @staticmethod
    def _workspace(vw_args: str, model_bytes: bytes | None) -> vowpalwabbit.Workspace:
        args = workspace_args(vw_args)
        if model_bytes is None:
            return vowpalwabbit.Workspace(args)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.vw")
            with open(path, "wb") as handle:
                handle.write(model_bytes)
            return vowpalwabbit.Workspace(f"{args} --initial_regressor {shlex.quote(path)}")

    def scorer(self, context: Mapping[str, Any], candidates: Sequence[Candidate]) -> _VWScorer:
        return _VWScorer(self, context, candidates)

    def predict_lines(self, lines: list[str]) -> list[float]:
        """The pmf over the action lines (``lines[0]`` is the shared line), in order."""
        with self._lock:
            examples = self._ws._parse("\n".join(lines))
            try:
                _pylibvw.vw.predict_multi(self._ws, examples)
                return list(examples[0].get_action_scores())
            finally:
                _pylibvw.vw._finish_example_multi_ex(self._ws, examples)

    def action_scores(self, lines: list[str]) -> list[float]:
        """The model's score (predicted cost, lower is better) of each action line after the
        shared line ``lines[0]``: VW's per-example partial prediction, before exploration
        turns scores into a pmf. Explanations ablate features and compare these scores."""
        with self._lock:
            examples = self._ws._parse("\n".join(lines))
            try:
                _pylibvw.vw.predict_multi(self._ws, examples)
                return [float(e.get_partial_prediction()) for e in examples[1:]]
            finally:
                _pylibvw.vw._finish_example_multi_ex(self._ws, examples)

    def learn_lines(self, lines: list[str]) -> None:
        self.learn_text("\n".join(lines))

    def learn_text(self, text: str) -> None:
        """Learn one multi-line example given as text (shared line first, no blank lines)."""
        with self._lock:
            examples = self._ws._parse(text)
            try:
                _pylibvw.vw.learn_multi(self._ws, examples)
            finally:
                _pylibvw.vw._finish_example_multi_ex(self._ws, examples)

    def learn_slot(
        self,
        context: Mapping[str, Any],
        slot_index: int,
        slot_features: Mapping[str, Any],
        candidates: Sequence[Candidate],
        chosen: int,
        probability: float,
        reward: float,
    ) -> None:
        """Learn one slot's outcome: ``candidates`` are those that were eligible for it.

        Given :class:`vw_text.EligibleCandidates` (the trainer), their pre-rendered lines are
        reused: the text VW parses is the same either way, so is the model.
        """
        shared = vw_text.shared_line(context, slot_index, slot_features)
        # The label goes in front of the chosen candidate's line: "0:cost:probability |…".
        label = f"0:{cost_from_reward(reward)!r}:{probability!r}"
        if isinstance(candidates, vw_text.EligibleCandidates):
            self.learn_text(f"{shared}\n{candidates.labelled(chosen, label)}")
            return
        lines = [shared]
        lines.extend(self.lines.line(c.id, c.features) for c in candidates)
        lines[1 + chosen] = label + lines[1 + chosen]
        self.learn_lines(lines)

    def to_bytes(self) -> bytes:
        with self._lock, tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.vw")
            self._ws.save(path)
            with open(path, "rb") as handle:
                return handle.read()

    def close(self) -> None:
        with self._lock:
            self._ws.finish()


class _VWScorer:
    """Renders each candidate once per request and reuses the text for every slot."""

    def __init__(
        self, learner: VWLearner, context: Mapping[str, Any], candidates: Sequence[Candidate]
    ) -> None:
        self._learner = learner
        self._context = context
        self._lines = [learner.lines.line(c.id, c.features) for c in candidates]
        # The context's rendering, made at the first slot and reused by the others; the
        # service stores it with the decision for the trainer (None: never rendered).
        self.context_line: str | None = None

    def pmf(
        self, slot_index: int, slot_features: Mapping[str, Any], eligible: Sequence[int]
    ) -> list[float]:
        if self.context_line is None:
            self.context_line = vw_text.render_context(self._context)
        shared = vw_text.shared_line_from(self.context_line, slot_index, slot_features)
        return self._learner.predict_lines([shared, *(self._lines[i] for i in eligible)])
