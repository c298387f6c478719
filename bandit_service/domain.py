"""Plain, frozen data passed between the HTTP layer, the engine and the store.

No FastAPI, SQLAlchemy or Vowpal Wabbit types appear here, so the engine can be driven
from a script, a simulator or a test without a server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

FeatureScalar = str | bool | int | float
FeatureValue = FeatureScalar | Sequence[str]
# A feature map: name -> value, or one level of nesting: namespace -> {name -> value}.
Features = Mapping[str, Any]

# "opted_out": the user asked not to be personalized (request flag or stored opt-out); such
# decisions show the popularity ranking and are never learned from (issue 10).
Arm = Literal["bandit", "holdout", "opted_out"]


@dataclass(frozen=True)
class Candidate:
    id: str
    features: Features = field(default_factory=dict)


@dataclass(frozen=True)
class Slot:
    """A ranked position. ``baseline`` is what apprentice/logging-only policies show here."""

    id: str
    features: Features = field(default_factory=dict)
    baseline: str | None = None
    excluded: frozenset[str] = frozenset()  # candidates never shown in this slot


@dataclass(frozen=True)
class DecisionRequest:
    """What a caller asks: fill ``slots`` in order from ``candidates`` for this context."""

    event_id: str
    policy: str
    candidates: tuple[Candidate, ...]
    slots: tuple[Slot, ...]
    context: Features = field(default_factory=dict)
    excluded: frozenset[str] = frozenset()
    user_id: str | None = None
    defer: bool = False
    pins: tuple[tuple[str, int], ...] = ()  # (candidate id, slot index), on top of the policy's
    personalize: bool = True  # false: the popularity ranking, arm "opted_out" (issue 10)


@dataclass(frozen=True)
class SlotChoice:
    """One filled slot: what was shown, with the exact probability it was drawn with.

    ``pmf`` is the distribution the draw used, over the candidates still eligible for this
    slot (request order); ``probability`` is ``pmf``'s entry for ``id``. ``explored`` is true
    when the slot drew from an exploration distribution (a reserved exploration slot), or
    when the drawn candidate is not among the policy's greedy choices (those tied for the
    highest probability). Pinned, holdout and baseline slots are never explored.
    """

    slot: int
    slot_id: str
    id: str
    probability: float
    explored: bool
    pmf: tuple[tuple[str, float], ...]
    model_id: str | None = None  # apprentice mode: what the model would have shown


@dataclass(frozen=True)
class Decision:
    event_id: str
    policy: str
    policy_version: str
    model_version: int
    arm: Arm
    slots: tuple[SlotChoice, ...]
    deferred: bool = False
    # The context as the learner rendered it for this decision (Vowpal Wabbit text, see
    # learners/vw_text.render_context), stored so the trainer need not render it again;
    # None when no learner rendered it (holdout, opted out, all slots pinned).
    context_line: str | None = None


def slot_list(count_or_slots: int | Sequence[Slot]) -> tuple[Slot, ...]:
    """Normalise ``slots`` as given in a request: a count becomes ids ``"0"``, ``"1"``, …"""
    if isinstance(count_or_slots, int):
        return tuple(Slot(id=str(i)) for i in range(count_or_slots))
    return tuple(count_or_slots)


def to_jsonable(value: Any) -> Any:
    """Feature maps as plain dicts/lists (for storage), whatever Mapping/Sequence came in."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return value
