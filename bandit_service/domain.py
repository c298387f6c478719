"""Plain, frozen data passed between the HTTP layer, the engine and the store.

No FastAPI, SQLAlchemy or Vowpal Wabbit types appear here, so the engine can be driven
from a script, a simulator or a test without a server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, overload

FeatureScalar = str | bool | int | float
FeatureValue = FeatureScalar | Sequence[str]
# A feature map: name -> value, or one level of nesting: namespace -> {name -> value}.
Features = Mapping[str, Any]

# "opted_out": the user asked not to be personalized (request flag or stored opt-out); such
# decisions show the popularity ranking and are never learned from (issue 10).
Arm = Literal["bandit", "holdout", "opted_out"]

_Frozen = TypeVar("_Frozen")


class _FactoryDefault:
    """The default of a field whose default comes from its factory (shown as the
    generated ``__init__`` shows it)."""

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _FactoryDefault()


def _cheap_init(cls: type[_Frozen]) -> type[_Frozen]:
    """Give a frozen dataclass an ``__init__`` that stores its fields in the instance's
    ``__dict__`` directly, with the generated one's signature, defaults and factories.

    Why: a frozen dataclass's generated ``__init__`` sets each field with
    ``object.__setattr__`` (the class's own ``__setattr__`` refuses), a call per field:
    ~0.9 µs for a ``Decision`` and ~1.1 µs for a ``DecisionRequest``, about a third of
    that this way (timeit); a 50 x 1 decision builds four such objects. Everything else
    is the dataclass's own and unchanged: assigning or deleting a field still raises
    ``FrozenInstanceError``, equality, hashing, ``repr``, ``dataclasses.replace`` and
    copying are as before (tests/unit/test_engine_cpu_domain.py). Only for classes
    whose fields all go through ``__init__`` positionally, without ``__post_init__``:
    anything else is refused here rather than built differently.
    """
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    if (
        not cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
        or hasattr(cls, "__post_init__")
        or "__slots__" in cls.__dict__
        or any(not f.init or f.kw_only or isinstance(f.type, dataclasses.InitVar) for f in fields)
    ):
        raise TypeError(f"{cls.__name__}: not a plain frozen dataclass")
    env: dict[str, Any] = {"_FACTORY": _FACTORY}
    params, body = [], []
    for f in fields:
        if f.default is not dataclasses.MISSING:
            env[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        elif f.default_factory is not dataclasses.MISSING:
            env[f"_factory_{f.name}"] = f.default_factory
            params.append(f"{f.name}=_FACTORY")
            body.append(f"    if {f.name} is _FACTORY:\n        {f.name} = _factory_{f.name}()")
        else:
            params.append(f.name)
    body.append("    values = self.__dict__")
    body.extend(f"    values[{f.name!r}] = {f.name}" for f in fields)
    source = f"def __init__(self, {', '.join(params)}) -> None:\n" + "\n".join(body)
    exec(source, env)  # built from the class's own field names only
    init: Callable[..., None] = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


@_cheap_init
@dataclass(frozen=True)
class Candidate:
    id: str
    features: Features = field(default_factory=dict)


@_cheap_init
@dataclass(frozen=True)
class Slot:
    """A ranked position. ``baseline`` is what apprentice/logging-only policies show here."""

    id: str
    features: Features = field(default_factory=dict)
    baseline: str | None = None
    excluded: frozenset[str] = frozenset()  # candidates never shown in this slot


@_cheap_init
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


class Distribution(Sequence[list[Any]]):
    """A slot's distribution as the engine drew it: positions and probabilities.

    ``positions`` are the eligible candidates' indices in the request's candidate order
    (``ids`` is that order), ``probabilities`` their probabilities, aligned. The decision
    log stores exactly this, positionally (``store/compact.py``), so the write path takes
    it as is instead of mapping each id back to its position, and the engine no longer
    pairs every probability with its id in a tuple (per 500 x 5 decision, 2,500 tuples
    and 2,500 dict look-ups).

    It reads as the classic form, ``[[id, p], ...]``: a sequence of ``[id, p]`` lists,
    equal to the list it stands for. A decision row holds it as its slots' ``pmf`` (see
    ``service.decision_row``): every reader iterates or indexes it, and the store writes
    it positionally. Building the classic list instead cost 2,500 small lists per 500 x 5
    decision, ~14% of that decision's CPU, mostly in the garbage collector (each list is
    a tracked container that lives until the write commits). :meth:`classic` gives a real
    list for whoever needs one (to encode it as JSON, say). It is immutable, as are the
    lists it is built from (the engine makes new ones per slot).
    """

    __slots__ = ("ids", "positions", "probabilities")

    def __init__(
        self, ids: Sequence[str], positions: Sequence[int], probabilities: Sequence[float]
    ) -> None:
        if len(positions) != len(probabilities):
            raise ValueError(f"{len(positions)} positions but {len(probabilities)} probabilities")
        self.ids = ids
        self.positions = positions
        self.probabilities = probabilities

    def classic(self) -> list[list[Any]]:
        """``[[id, p], ...]``, the form the log has always been read in, as a new list."""
        ids = self.ids
        return [[ids[i], p] for i, p in zip(self.positions, self.probabilities, strict=True)]

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self) -> Iterator[list[Any]]:
        ids = self.ids
        return ([ids[i], p] for i, p in zip(self.positions, self.probabilities, strict=True))

    @overload
    def __getitem__(self, index: int) -> list[Any]: ...
    @overload
    def __getitem__(self, index: slice) -> list[list[Any]]: ...
    def __getitem__(self, index: int | slice) -> list[Any] | list[list[Any]]:
        if isinstance(index, slice):
            return self.classic()[index]
        return [self.ids[self.positions[index]], self.probabilities[index]]

    def __eq__(self, other: object) -> bool:
        # As the list it stands for: equal to an equal list (not to a tuple, as a list).
        if isinstance(other, Distribution):
            return self.classic() == other.classic()
        if isinstance(other, list):
            return self.classic() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # a list is not hashable either

    def __repr__(self) -> str:
        return f"Distribution({self.classic()!r})"


@_cheap_init
@dataclass(frozen=True)
class SlotChoice:
    """One filled slot: what was shown, with the exact probability it was drawn with.

    ``distribution`` is the distribution the draw used, over the candidates still eligible
    for this slot (request order); ``probability`` is its entry for ``id``. ``explored`` is
    true when the slot drew from an exploration distribution (a reserved exploration slot),
    or when the drawn candidate is not among the policy's greedy choices (those tied for the
    highest probability). Pinned, holdout and baseline slots are never explored.
    """

    slot: int
    slot_id: str
    id: str
    probability: float
    explored: bool
    distribution: Distribution
    model_id: str | None = None  # apprentice mode: what the model would have shown

    @property
    def pmf(self) -> tuple[tuple[str, float], ...]:
        """The distribution as ``((id, p), ...)``, built on demand (tests, scripts)."""
        return tuple((cid, p) for cid, p in self.distribution)


@_cheap_init
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
        # Positional, from a list: cheaper than keywords and a generator (every request).
        return tuple([Slot(str(i)) for i in range(count_or_slots)])
    return tuple(count_or_slots)


def to_jsonable(value: Any) -> Any:
    """Feature maps as plain dicts/lists (for storage), whatever Mapping/Sequence came in."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return value
