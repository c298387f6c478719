"""Re-ranking rules that act on the distribution *before* each draw.

The trap this module exists to avoid: rules applied after sampling (swap in a pin, drop a
third item of one category) show something other than what was drawn, and the logged
probability becomes a lie. Here every rule is one of:

* a mask (policy filters, diversity caps, pins removing their candidate from other
  slots): candidates that may not appear in this slot get probability 0 and the rest are
  renormalised;
* a reweighting (freshness, business boosts): p_i <- p_i w_i / sum_j p_j w_j;
* a deterministic placement (pins): logged with probability 1, ``explored: false``;
* a mixture (exploration slots): with probability ``share`` a slot draws from the
  exploration distribution q instead of the policy's p, so the logged pmf is
  ``share * q + (1 - share) * p``: the marginal probability of what was shown.

Each slot is conditioned on the earlier slots and on the pins, so every logged probability
is exactly P(candidate shown in slot k | context, candidates, rules, slots 0..k-1).
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ExplorationDistribution = str  # "uniform" | "least_shown"


# Bounds on multiplicative weights: a product of a few stays a finite float, so the
# reweighted distribution can always be normalised.
MIN_FACTOR, MAX_FACTOR = 1e-6, 1e6


class RulesError(ValueError):
    pass


@dataclass(frozen=True)
class FeatureTest:
    """``feature == equals`` (a list feature matches when it contains ``equals``)."""

    feature: str
    equals: Any

    def matches(self, features: Mapping[str, Any]) -> bool:
        return self.matcher(features)

    @functools.cached_property
    def matcher(self) -> Callable[[Mapping[str, Any]], bool]:
        """:meth:`matches` as one function specialised for this test's feature name and
        value type: filters and boosts run it for every candidate of every request (500
        candidates: ~0.5 ms as three generic calls each). Same answers as
        :func:`feature_value` + :func:`_same` (tests/unit/test_rules.py compares them)."""
        return _compile_test(self.feature, self.equals)


@dataclass(frozen=True)
class Boost:
    test: FeatureTest
    factor: float


@dataclass(frozen=True)
class Cap:
    feature: str
    max: int


@dataclass(frozen=True)
class Freshness:
    feature: str
    max_age: float
    boost: float
    timestamp: bool = False  # the feature is a time (UNIX seconds or ISO 8601), not an age


@dataclass(frozen=True)
class Pin:
    id: str
    slot: int


@dataclass(frozen=True)
class RuleSet:
    exclude_if: tuple[FeatureTest, ...] = ()
    pins: tuple[Pin, ...] = ()
    max_per_value: tuple[Cap, ...] = ()
    freshness: Freshness | None = None
    boosts: tuple[Boost, ...] = ()
    exploration_share: float = 0.0
    exploration_positions: tuple[int, ...] = ()
    exploration_distribution: ExplorationDistribution = "uniform"

    @property
    def reweights(self) -> bool:
        return self.freshness is not None or bool(self.boosts)

    def excluded_by_filters(self, features: Mapping[str, Any]) -> bool:
        return self._excluded(features)

    def weight(self, features: Mapping[str, Any], now: float) -> float:
        """The multiplicative weight of a candidate (1 without freshness or boosts)."""
        weight = 1.0
        for matches, factor in self._boost_matchers:
            if matches(features):
                weight *= factor
        fresh = self.freshness
        if fresh is not None:
            age = _age(feature_value(features, fresh.feature), fresh.timestamp, now)
            if age is not None and 0 <= age < fresh.max_age:  # a future time is not fresh
                weight *= fresh.boost
        return weight

    # Compiled tests (see FeatureTest.matcher), kept outside the dataclass fields so that
    # equality, hashing and the policy's version hash (asdict) are unchanged.
    @functools.cached_property
    def _excluded(self) -> Callable[[Mapping[str, Any]], bool]:
        """Does any filter match? (One filter, the usual case: its own matcher.)"""
        matchers = tuple(test.matcher for test in self.exclude_if)
        if len(matchers) == 1:
            return matchers[0]

        def any_filter(features: Mapping[str, Any]) -> bool:
            return any(matches(features) for matches in matchers)

        return any_filter

    @functools.cached_property
    def _boost_matchers(self) -> tuple[tuple[Callable[[Mapping[str, Any]], bool], float], ...]:
        return tuple((boost.test.matcher, boost.factor) for boost in self.boosts)


def feature_value(features: Mapping[str, Any], name: str) -> Any:
    """A feature by name; ``namespace.feature`` reaches into a namespace."""
    if name in features:
        return features[name]
    if "." in name:
        namespace, inner = name.split(".", 1)
        nested = features.get(namespace)
        if isinstance(nested, Mapping):
            return nested.get(inner)
    return None


def group_key(features: Mapping[str, Any], name: str) -> str | None:
    """The value a diversity cap counts (None: the candidate is not capped)."""
    value = feature_value(features, name)
    if value is None:
        return None
    if isinstance(value, list):
        return "|".join(sorted(str(v) for v in value))
    return f"{type(value).__name__}:{value}"


def _compile_test(name: str, target: Any) -> Callable[[Mapping[str, Any]], bool]:
    """``features -> bool`` for ``FeatureTest(name, target)``: the feature's value (as
    :func:`feature_value` finds it) is ``target`` by :func:`_same`, or is a list with such
    an item. Booleans match booleans only, numbers numbers only (``1`` is not ``True``)."""
    same: Callable[[Any], bool]
    if isinstance(target, bool):

        def same(value: Any) -> bool:
            return value is target  # True and False are singletons, and bools only

        def in_list(values: list[Any]) -> bool:
            return any(item is target for item in values)

    elif isinstance(target, int | float):

        def same(value: Any) -> bool:
            kind = type(value)
            if kind is int or kind is float:
                return bool(value == target)
            return (
                not isinstance(value, bool) and isinstance(value, int | float) and value == target
            )

        def in_list(values: list[Any]) -> bool:
            return any(same(item) for item in values)

    elif isinstance(target, str):

        def same(value: Any) -> bool:
            return bool(value == target)  # a boolean never equals a string

        def in_list(values: list[Any]) -> bool:
            return target in values  # identity or ==, as ``same`` for strings

    else:  # not produced by parse_rules; the generic comparison

        def same(value: Any) -> bool:
            return _same(value, target)

        def in_list(values: list[Any]) -> bool:
            return any(_same(item, target) for item in values)

    if "." in name:

        def matches(features: Mapping[str, Any]) -> bool:
            value = feature_value(features, name)
            return in_list(value) if isinstance(value, list) else same(value)

        return matches

    def matches_flat(features: Mapping[str, Any]) -> bool:
        value = features.get(name)  # feature_value without a dot in the name
        return in_list(value) if isinstance(value, list) else same(value)

    return matches_flat


def _same(value: Any, target: Any) -> bool:
    if isinstance(target, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(target, bool) and value is target
    if isinstance(target, int | float):
        return isinstance(value, int | float) and value == target
    return value == target


def _age(value: Any, timestamp: bool, now: float) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if not timestamp:
        return float(value) if isinstance(value, int | float) else None
    if isinstance(value, int | float):
        return now - float(value)
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        return now - parsed.timestamp()
    return None


# -- parsing the [rules] table of a policy file ---------------------------------------------
_RULE_KEYS = {
    "exclude_if", "pins", "max_per_value", "freshness", "boosts", "exploration_share",
    "exploration_positions", "exploration_distribution",
}  # fmt: skip


def parse_rules(raw: Any) -> RuleSet:
    if not isinstance(raw, Mapping):
        raise RulesError("[rules] must be a table")
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise RulesError(
            f"unknown rule(s) {', '.join(unknown)}; known: {', '.join(sorted(_RULE_KEYS))}"
        )
    share = _number(raw.get("exploration_share", 0.0), "exploration_share")
    if not 0 <= share < 1:
        raise RulesError("exploration_share must be in [0, 1)")
    distribution = raw.get("exploration_distribution", "uniform")
    if distribution not in ("uniform", "least_shown"):
        raise RulesError("exploration_distribution must be 'uniform' or 'least_shown'")
    positions = raw.get("exploration_positions", [])
    if not isinstance(positions, list) or not all(_is_index(p) for p in positions):
        raise RulesError("exploration_positions must be a list of slot indices (0-based)")
    rules = RuleSet(
        exclude_if=tuple(_test(t, "exclude_if") for t in _list(raw, "exclude_if")),
        pins=tuple(parse_pin(p, "pins") for p in _list(raw, "pins")),
        max_per_value=tuple(_cap(c) for c in _list(raw, "max_per_value")),
        freshness=_freshness(raw["freshness"]) if "freshness" in raw else None,
        boosts=tuple(_boost(b) for b in _list(raw, "boosts")),
        exploration_share=share,
        exploration_positions=tuple(sorted(set(positions))),
        exploration_distribution=distribution,
    )
    pinned_slots = [p.slot for p in rules.pins]
    if len(set(pinned_slots)) != len(pinned_slots):
        raise RulesError("two pins for the same slot")
    if set(pinned_slots) & set(rules.exploration_positions):
        raise RulesError("a slot cannot be both pinned and an exploration position")
    return rules


def parse_pin(raw: Any, where: str) -> Pin:
    if not isinstance(raw, Mapping) or set(raw) != {"id", "slot"}:
        raise RulesError(f'{where}: each pin is {{id = "…", slot = N}}')
    if not isinstance(raw["id"], str) or not raw["id"] or not _is_index(raw["slot"]):
        raise RulesError(f"{where}: pin id must be a string and slot a 0-based index")
    return Pin(raw["id"], raw["slot"])


def _list(raw: Mapping[str, Any], key: str) -> list[Any]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise RulesError(f"{key} must be a list of tables")
    return value


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RulesError(f"{where} must be a number")
    return float(value)


def _feature_name(raw: Mapping[str, Any], where: str) -> str:
    name = raw.get("feature")
    if not isinstance(name, str) or not name:
        raise RulesError(f"{where}: 'feature' must be a non-empty string")
    return name


def _test(raw: Any, where: str) -> FeatureTest:
    if not isinstance(raw, Mapping) or set(raw) != {"feature", "equals"}:
        raise RulesError(f'{where}: each entry is {{feature = "…", equals = value}}')
    if not isinstance(raw["equals"], str | int | float | bool):
        raise RulesError(f"{where}: 'equals' must be a string, number or boolean")
    return FeatureTest(_feature_name(raw, where), raw["equals"])


def _cap(raw: Any) -> Cap:
    if not isinstance(raw, Mapping) or set(raw) != {"feature", "max"} or not _is_index(raw["max"]):
        raise RulesError('max_per_value: each entry is {feature = "…", max = N} with N >= 1')
    if raw["max"] < 1:
        raise RulesError("max_per_value: max must be at least 1")
    return Cap(_feature_name(raw, "max_per_value"), raw["max"])


def _boost(raw: Any) -> Boost:
    if not isinstance(raw, Mapping) or set(raw) != {"feature", "equals", "factor"}:
        raise RulesError('boosts: each entry is {feature = "…", equals = value, factor = x}')
    factor = _number(raw["factor"], "boosts.factor")
    if not MIN_FACTOR <= factor <= MAX_FACTOR:
        raise RulesError(
            f"boosts: factor must be between {MIN_FACTOR:g} and {MAX_FACTOR:g} "
            "(use exclude_if to remove a candidate)"
        )
    return Boost(_test({"feature": raw["feature"], "equals": raw["equals"]}, "boosts"), factor)


def _freshness(raw: Any) -> Freshness:
    keys = {"feature", "max_age", "boost", "timestamp"}
    if not isinstance(raw, Mapping) or not {"feature", "max_age", "boost"} <= set(raw) <= keys:
        raise RulesError('freshness is {feature = "…", max_age = x, boost = y[, timestamp = true]}')
    boost = _number(raw["boost"], "freshness.boost")
    if not MIN_FACTOR <= boost <= MAX_FACTOR:
        raise RulesError(f"freshness.boost must be between {MIN_FACTOR:g} and {MAX_FACTOR:g}")
    timestamp = raw.get("timestamp", False)
    if not isinstance(timestamp, bool):
        raise RulesError("freshness.timestamp must be true or false")
    return Freshness(
        _feature_name(raw, "freshness"), _number(raw["max_age"], "freshness.max_age"), boost,
        timestamp,
    )  # fmt: skip


def page_capacity(groups: Sequence[str | None], counts: Mapping[str, int], cap: int) -> int:
    """How many more slots the candidates with these group keys can fill under one cap."""
    available: dict[str | None, int] = {}
    for key in groups:
        available[key] = available.get(key, 0) + 1
    total = 0
    for key, count in available.items():
        total += count if key is None else min(count, max(0, cap - counts.get(key, 0)))
    return total
