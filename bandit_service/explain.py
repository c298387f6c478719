"""Why a decision showed what it showed: per slot, the features that moved the model's score
of the chosen candidate most (``GET /v1/decisions/{event_id}/explanation``, issue 10).

Method: leave-one-feature-out (occlusion) on the model that made the decision. VW's
``cb_explore_adf`` scores each candidate with a linear model over its features and their
``-q``/``--interactions`` crosses; the score is a predicted cost. A feature's contribution
is the change in the chosen candidate's predicted reward (minus cost) when the feature is
removed from the example:

    contribution(f) = cost(x without f) - cost(x)

For a linear model this is exactly the sum of the weight times value of every term the
feature takes part in (its own weight and each interaction with the other namespaces'
features), which is what ``--audit`` prints term by term (Zeiler & Fergus 2014 call the
general technique occlusion; for linear models it equals the additive attribution of
Lundberg & Lee 2017 with a zero baseline per feature). Positive: the feature made the
candidate look better. Scores come from VW itself (``VWLearner.action_scores``), so hashing,
interactions and namespaces are VW's own, not re-implemented here.

The model is the checkpoint the decision was made with (its ``model_version``) while it is
still stored (the newest few are kept); otherwise the serving model, and the answer says so.
Holdout and opted-out decisions used no model: the answer says so instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bandit_service.learners import vw_text
from bandit_service.learners.vw import VWLearner

DEFAULT_TOP = 5

NOT_PERSONALIZED = {
    "holdout": (
        "holdout arm: this user (or anonymous event) is in the popularity holdout that "
        "measures the learned policy's lift; the candidates were ranked by popularity and "
        "no model or user feature was used"
    ),
    "opted_out": (
        "not personalized: the user opted out (stored opt-out or `personalize: false`); the "
        "candidates were ranked by popularity, no context features were used or logged, and "
        "the decision is never learned from"
    ),
}


@dataclass(frozen=True)
class _Feature:
    source: str  # context | slot | candidate
    namespace: str | None  # a nested object's key, or None for a flat feature
    name: str
    value: Any

    @property
    def label(self) -> str:
        return self.name if self.namespace is None else f"{self.namespace}.{self.name}"


def _features(source: str, features: Mapping[str, Any]) -> list[_Feature]:
    out: list[_Feature] = []
    for name, value in features.items():
        if isinstance(value, Mapping):
            out.extend(_Feature(source, name, inner, v) for inner, v in value.items())
        else:
            out.append(_Feature(source, None, name, value))
    return out


def _without(features: Mapping[str, Any], feature: _Feature) -> dict[str, Any]:
    if feature.namespace is None:
        return {k: v for k, v in features.items() if k != feature.name}
    inner = {k: v for k, v in features[feature.namespace].items() if k != feature.name}
    out = {k: v for k, v in features.items() if k != feature.namespace}
    if inner:
        out[feature.namespace] = inner
    return out


def shared_line(
    context: Mapping[str, Any], slot_index: int | None, slot_features: Mapping[str, Any]
) -> str:
    """:func:`vw_text.shared_line`, with the slot index optional (to ablate it)."""
    if slot_index is not None:
        return vw_text.shared_line(context, slot_index, slot_features)
    return (
        "shared"
        + vw_text.render_namespaces(context, vw_text.CONTEXT_NAMESPACE)
        + vw_text.render_namespaces(slot_features, vw_text.SLOT_NAMESPACE)
    )


def action_line(candidate_id: str | None, features: Mapping[str, Any]) -> str:
    """:func:`vw_text.action_line`, with the ``id`` feature optional (to ablate it)."""
    if candidate_id is not None:
        return vw_text.action_line(candidate_id, features)
    body = vw_text.render_namespaces(features, vw_text.ACTION_NAMESPACE)
    prefix = f" |{vw_text.ACTION_NAMESPACE}"
    return body if body.startswith(prefix) else prefix + body


def explain_slot(
    learner: VWLearner,
    context: Mapping[str, Any],
    slot_index: int,
    slot_features: Mapping[str, Any],
    candidate_id: str,
    candidate_features: Mapping[str, Any],
    top: int,
) -> dict[str, Any]:
    """The chosen candidate's predicted reward and its ``top`` largest contributions."""

    def cost(shared: str, action: str) -> float:
        return learner.action_scores([shared, action])[0]

    full_shared = shared_line(context, slot_index, slot_features)
    full_action = action_line(candidate_id, candidate_features)
    full = cost(full_shared, full_action)
    rows: list[dict[str, Any]] = []

    def add(source: str, label: str, value: Any, shared: str, action: str) -> None:
        delta = cost(shared, action) - full
        rows.append(
            {"source": source, "feature": label, "value": value, "contribution": round(delta, 6)}
        )

    for f in _features("context", context):
        add(f.source, f.label, f.value, shared_line(_without(context, f), slot_index,
            slot_features), full_action)  # fmt: skip
    for f in _features("slot", slot_features):
        add(f.source, f.label, f.value, shared_line(context, slot_index,
            _without(slot_features, f)), full_action)  # fmt: skip
    add("slot", "slot_index", slot_index, shared_line(context, None, slot_features), full_action)
    for f in _features("candidate", candidate_features):
        add(f.source, f.label, f.value, full_shared,
            action_line(candidate_id, _without(candidate_features, f)))  # fmt: skip
    add("candidate", "id", candidate_id, full_shared, action_line(None, candidate_features))
    ranked = sorted(
        (r for r in rows if r["contribution"] != 0.0),
        key=lambda r: (-abs(r["contribution"]), r["source"], r["feature"]),
    )
    return {"predicted_reward": round(-full, 6), "features": ranked[:top]}


LearnerLookup = Callable[[str, int], tuple[VWLearner, int, str]]


def explain_decision(
    row: Mapping[str, Any],
    learner_for: LearnerLookup | None,
    top: int = DEFAULT_TOP,
    learning_mode: str = "online",
) -> dict[str, Any]:
    """The explanation of a logged decision (``row`` as the repository returns it).

    ``learner_for(policy, model_version)`` gives the model to explain with, the version it
    is, and a note (empty when it is the decision's own model); None when the policy is no
    longer configured.
    """
    arm = row["arm"]
    out: dict[str, Any] = {
        "event_id": row["event_id"],
        "policy": row["policy"],
        "arm": arm,
        "personalized": arm == "bandit",
        "model_version": row["model_version"],
        "explained_with_model_version": None,
        "reason": NOT_PERSONALIZED.get(arm),
        "note": "",
        "slots": [],
    }
    base = [
        {k: s[k] for k in ("slot", "slot_id", "id", "probability", "explored")}
        for s in row["slots"]
    ]
    if arm != "bandit" or learner_for is None:
        if learner_for is None and arm == "bandit":
            out["note"] = f"policy {row['policy']!r} is no longer configured; no model to ask"
        out["slots"] = [{**s, "predicted_reward": None, "features": []} for s in base]
        return out
    learner, version, note = learner_for(row["policy"], row["model_version"])
    out["explained_with_model_version"] = version
    out["note"] = note
    by_id = {c["id"]: c.get("features") or {} for c in row["candidates"]}
    for info, stored in zip(base, row["slots"], strict=True):
        explained = explain_slot(
            learner,
            row["context"],
            stored["slot"],
            stored.get("slot_features") or {},
            stored["id"],
            by_id.get(stored["id"], {}),
            top,
        )
        out["slots"].append({**info, **explained})
    notes = [note] if note else []
    if learning_mode != "online":
        notes.append(
            f"this {learning_mode} policy shows its baseline, not the model's choice; the "
            "contributions say how the model scores what was shown"
        )
    if version == 0:
        notes.append(
            "model version 0 is untrained: every weight is zero, so no feature contributes yet"
        )
    out["note"] = "; ".join(notes)
    return out
