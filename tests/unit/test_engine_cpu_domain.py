"""The domain's frozen dataclasses built by ``domain._cheap_init``: the same objects, the
same signature, the same immutability as the ``__init__`` that ``dataclass`` generates."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
from typing import Any

import pytest

from bandit_service import domain
from bandit_service.domain import (
    Candidate,
    Decision,
    DecisionRequest,
    Distribution,
    Slot,
    SlotChoice,
    _cheap_init,
)

CLASSES = [Candidate, Slot, DecisionRequest, SlotChoice, Decision]


def _reference(cls: type) -> type:
    """The same fields in a plain frozen dataclass: the generated ``__init__``."""
    fields = [(f.name, f.type, dataclasses.field(default=f.default,
                                                   default_factory=f.default_factory))
              for f in dataclasses.fields(cls)]  # fmt: skip
    return dataclasses.make_dataclass(cls.__name__, fields, frozen=True)


def _arguments(cls: type) -> list[Any]:
    """One distinct value per field, for positional construction."""
    values: dict[str, Any] = {
        "event_id": "e1", "policy": "p", "candidates": (Candidate("a"),),
        "slots": (Slot("0"),), "context": {"x": 1}, "excluded": frozenset({"b"}),
        "user_id": "u", "defer": True, "pins": (("a", 0),), "personalize": False,
        "id": "a", "features": {"f": "v"}, "baseline": "a", "slot": 0, "slot_id": "0",
        "probability": 0.25, "explored": True,
        "distribution": Distribution(["a"], [0], [1.0]), "model_id": "m",
        "policy_version": "v1", "model_version": 3, "arm": "holdout",
        "deferred": True, "context_line": " |context x:1",
    }  # fmt: skip
    return [values[f.name] for f in dataclasses.fields(cls)]


def _hash(obj: object) -> int | str:
    try:
        return hash(obj)
    except TypeError as exc:
        return str(exc)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_signature_is_the_generated_one(cls: type) -> None:
    ours = inspect.signature(cls)
    theirs = inspect.signature(_reference(cls))
    assert list(ours.parameters) == list(theirs.parameters)
    for name, parameter in ours.parameters.items():
        other = theirs.parameters[name]
        assert parameter.kind == other.kind
        assert repr(parameter.default) == repr(other.default)  # <factory> for factories


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_objects_are_as_the_generated_init_built_them(cls: type) -> None:
    reference = _reference(cls)
    args = _arguments(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    ours, theirs = cls(*args), reference(*args)
    assert vars(ours) == vars(theirs)
    assert cls(**dict(zip(names, args, strict=True))) == ours
    assert repr(ours) == repr(theirs)
    assert _hash(ours) == _hash(theirs)  # a value, or the same refusal (a dict inside)
    missing = dataclasses.MISSING
    required = [
        f for f in dataclasses.fields(cls)
        if f.default is missing and f.default_factory is missing
    ]  # fmt: skip
    short_ours = cls(*args[: len(required)])
    short_theirs = reference(*args[: len(required)])
    assert vars(short_ours) == vars(short_theirs)  # defaults and factories
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:  # a fresh object every time
            assert getattr(short_ours, f.name) is not getattr(cls(*args[: len(required)]),
                                                                f.name)  # fmt: skip
    with pytest.raises(TypeError):
        cls(*args[: len(required) - 1])
    with pytest.raises(TypeError):
        cls(*args, "one too many")
    with pytest.raises(TypeError):
        cls(*args[: len(required)], no_such_field=1)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_objects_stay_frozen(cls: type) -> None:
    obj = cls(*_arguments(cls))
    for f in dataclasses.fields(cls):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, f.name, None)
        with pytest.raises(dataclasses.FrozenInstanceError):
            delattr(obj, f.name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        obj.new_attribute = 1


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_replace_copy_and_pickle(cls: type) -> None:
    obj = cls(*_arguments(cls))
    first = dataclasses.fields(cls)[0].name
    changed = dataclasses.replace(obj, **{first: "other"})
    assert getattr(changed, first) == "other" and getattr(obj, first) != "other"
    assert copy.copy(obj) == obj and copy.deepcopy(obj) == obj
    if cls is not SlotChoice and cls is not Decision:  # Distribution holds no pickle hooks
        assert pickle.loads(pickle.dumps(obj)) == obj


def test_only_plain_frozen_dataclasses_are_accepted() -> None:
    @dataclasses.dataclass
    class Mutable:
        a: int

    @dataclasses.dataclass(frozen=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclasses.dataclass(frozen=True)
    class KeywordOnly:
        a: int = dataclasses.field(kw_only=True)

    @dataclasses.dataclass(frozen=True)
    class NotInInit:
        a: int = dataclasses.field(default=0, init=False)

    @dataclasses.dataclass(frozen=True, slots=True)
    class Slotted:
        a: int

    for cls in (Mutable, PostInit, KeywordOnly, NotInInit, Slotted):
        with pytest.raises(TypeError):
            _cheap_init(cls)


def test_every_frozen_domain_class_uses_it() -> None:
    """A class added to the module later is either built this way or left out knowingly."""
    frozen = [
        value for value in vars(domain).values()
        if isinstance(value, type) and dataclasses.is_dataclass(value)
        and value.__module__ == domain.__name__ and value.__dataclass_params__.frozen  # type: ignore[attr-defined]
    ]  # fmt: skip
    assert sorted(c.__name__ for c in frozen) == sorted(c.__name__ for c in CLASSES)
    for cls in frozen:
        assert cls.__init__.__qualname__ == f"{cls.__qualname__}.__init__"
        assert "__setattr__" not in cls.__init__.__code__.co_names  # not the generated one
