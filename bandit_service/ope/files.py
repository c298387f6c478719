"""Logged decisions from files: the project's own JSON-lines schema and VW/Personalizer
DSJSON. Both stream line by line; errors name the file and line.

Own schema, one JSON object per line (one line per logged slot)::

    {"event_id": "e1", "created_at": 1763800000.0, "slot": 0,
     "context": {"device": "mobile", "user": {"segment": "sports"}},
     "candidates": [{"id": "a", "features": {"topic": "x"}}, {"id": "b"}],
     "chosen": "a", "probability": 0.7, "reward": 1.0,
     "pmf": [["a", 0.7], ["b", 0.3]]}

``pmf`` is optional (the ``logging`` target needs it); ``slot`` defaults to 0 and
``created_at`` to the line number. ``bandit-service ope`` reads it with ``--from-jsonl``.

DSJSON (``--from-dsjson``): Vowpal Wabbit's decision-service format, as Azure Personalizer
logged it. Per line: ``c`` holds the shared features and ``_multi`` the actions' features,
``a`` the actions (1-based) in ranked order with ``p`` their probabilities,
``_labelIndex`` the chosen action (0-based), ``_label_probability`` its probability and
``_label_cost`` its cost (reward = -cost). Lines without a cost (never joined to a reward)
are skipped and counted. Multi-slot (CCB) lines, with ``c._slots`` and ``_outcomes``, give
one row per slot (see :func:`_ccb_rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from bandit_service.domain import Candidate
from bandit_service.ope.evaluate import LogStats, SlotRow

Malformed = Callable[[str], None]


def _lines(
    path: str | Path,
    on_malformed: Malformed | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Decoded lines, streamed. A line that is not a JSON object raises, or, with
    ``on_malformed``, is reported to it and skipped. ``on_bytes`` hears each line's size."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if on_bytes is not None:
                on_bytes(len(raw))
            if not raw.strip():
                continue
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                message = f"{path}, line {number}: not JSON ({exc})"
                if on_malformed is None:
                    raise ValueError(message) from None
                on_malformed(message)
                continue
            if not isinstance(value, dict):
                message = f"{path}, line {number}: expected a JSON object"
                if on_malformed is None:
                    raise ValueError(message)
                on_malformed(message)
                continue
            yield number, value


def _probability(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"{where}: probability must be a number in (0, 1], got {value!r}")
    return float(value)


def rows_from_jsonl(path: str | Path, stats: LogStats) -> list[SlotRow]:
    rows = list(iter_jsonl(path, stats))
    stats.rows += len(rows)
    return rows


def iter_jsonl(path: str | Path, stats: LogStats) -> Iterator[SlotRow]:
    """Slot rows of a log in the project's JSON-lines schema, streamed."""
    for number, line in _lines(path):
        where = f"{path}, line {number}"
        stats.decisions += 1
        try:
            candidates = tuple(
                Candidate(str(c["id"]), c.get("features") or {}) for c in line["candidates"]
            )
            ids = [c.id for c in candidates]
            chosen = ids.index(str(line["chosen"]))
            probability = _probability(line["probability"], where)
            reward = float(line["reward"])
        except KeyError as exc:
            raise ValueError(f"{where}: missing field {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        if probability == 1.0:
            stats.skipped_deterministic += 1
            continue
        pmf = None
        if "pmf" in line:
            given = {str(cid): float(p) for cid, p in line["pmf"]}
            pmf = tuple(given.get(cid, 0.0) for cid in ids)
        yield SlotRow(
            key=f"{line.get('event_id', number)}/{line.get('slot', 0)}",
            created_at=float(line.get("created_at", number)),
            context=line.get("context") or {},
            slot=int(line.get("slot", 0)),
            slot_features=line.get("slot_features") or {},
            eligible=candidates,
            chosen=chosen,
            propensity=probability,
            reward=reward,
            logged_pmf=pmf,
        )


def _vw_features(raw: Mapping[str, Any]) -> dict[str, Any]:
    """DSJSON features as the service's feature maps: a nested object is a namespace, and
    so is a list of objects (VW merges them, e.g. ``"FromUrl": [{"weather": "sunny"}]``);
    a list of strings or numbers is a multi-valued feature. Keys starting with ``_`` are
    VW's own (``_multi``, ``_slots``, ``_tag``, ...), not features."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name.startswith("_") or isinstance(value, bool):
            continue
        if isinstance(value, Mapping):
            out[name] = _scalars(value)
        elif isinstance(value, list) and any(isinstance(v, Mapping) for v in value):
            merged: dict[str, Any] = {}
            for item in value:
                if isinstance(item, Mapping):
                    merged.update(_scalars(item))
            out[name] = merged
        elif isinstance(value, list):
            out[name] = [str(v) for v in value if isinstance(v, str | int | float)]
        elif isinstance(value, str | int | float):
            out[name] = value
    return out


def _scalars(value: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in value.items()
        if not k.startswith("_") and isinstance(v, str | int | float) and not isinstance(v, bool)
    }


def _ccb_rows(
    line: Mapping[str, Any],
    number: int,
    where: str,
    stats: LogStats,
    features: Callable[[Mapping[str, Any]], dict[str, Any]] = _vw_features,
) -> list[SlotRow]:
    """One CCB (multi-slot) DSJSON line as one row per slot.

    VW's conditional contextual bandit format (as VW's ``--ccb_explore_adf --dsjson`` and
    Personalizer's multi-slot logs write it): ``c._multi`` holds the actions, ``c._slots``
    the slots (``_id`` and the slot's features), and ``_outcomes`` one entry per slot with
    ``_a`` the slot's remaining actions (0-based indices into ``_multi``, the chosen one
    first, actions taken by earlier slots already removed), ``_p`` their probabilities in
    the same order and ``_label_cost`` the slot's cost (reward = -cost; 0 when no outcome
    arrived, as VW learns it). A slot's eligible set is therefore its ``_a``: exactly the
    per-slot assumption the evaluation makes (earlier slots as logged).
    """
    context = line["c"]
    actions = context.get("_multi") or []
    slots = context.get("_slots") or []
    outcomes = line["_outcomes"]
    if not isinstance(outcomes, list) or not isinstance(actions, list):
        raise ValueError(f"{where}: _outcomes and c._multi must be lists")
    if len(slots) != len(outcomes):
        raise ValueError(f"{where}: {len(outcomes)} _outcomes for {len(slots)} c._slots")
    try:
        candidates = [
            Candidate(_action_id(action, index), features(action))
            for index, action in enumerate(actions)
        ]
        shared = features(context)
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    event = str(line.get("EventId", number))
    rows = []
    for index, (slot, outcome) in enumerate(zip(slots, outcomes, strict=True)):
        slot_where = f"{where}, slot {index}"
        try:
            order = [int(a) for a in outcome["_a"]]
            probabilities = [float(p) for p in outcome["_p"]]
            reward = -float(outcome["_label_cost"])
        except KeyError as exc:
            raise ValueError(f"{slot_where}: missing field {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{slot_where}: {exc}") from None
        if not order or len(order) != len(probabilities):
            raise ValueError(f"{slot_where}: _a and _p must be non-empty and of equal length")
        if any(not 0 <= a < len(candidates) for a in order) or len(set(order)) != len(order):
            raise ValueError(f"{slot_where}: _a must list distinct indices into c._multi")
        probability = _probability(probabilities[0], slot_where)
        if probability == 1.0:
            stats.skipped_deterministic += 1
            continue
        eligible = sorted(order)  # candidates in catalogue order; the pmf follows them
        given = dict(zip(order, probabilities, strict=True))
        rows.append(
            SlotRow(
                key=f"{event}/{index}",
                created_at=float(number),
                context=shared,
                slot=index,
                slot_features=features(slot) if isinstance(slot, Mapping) else {},
                eligible=tuple(candidates[a] for a in eligible),
                chosen=eligible.index(order[0]),
                propensity=probability,
                reward=reward,
                logged_pmf=tuple(given[a] for a in eligible),
            )
        )
    return rows


def rows_from_dsjson(path: str | Path, stats: LogStats) -> list[SlotRow]:
    rows = list(iter_dsjson(path, stats))
    stats.rows += len(rows)
    return rows


def iter_dsjson(
    path: str | Path,
    stats: LogStats,
    on_malformed: Malformed | None = None,
    features: Callable[[Mapping[str, Any]], dict[str, Any]] = _vw_features,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[SlotRow]:
    """DSJSON slot rows, streamed. Malformed lines raise, or go to ``on_malformed`` and
    are skipped; ``features`` turns a DSJSON feature object into a feature map."""
    for number, line in _lines(path, on_malformed, on_bytes):
        where = f"{path}, line {number}"
        stats.decisions += 1
        if line.get("_skipLearn"):
            stats.skipped_not_shown += 1  # deferred and never activated
            continue
        if "_outcomes" in line:  # multi-slot (CCB): one row per slot
            try:
                yield from _ccb_rows(line, number, where, stats, features)
            except KeyError as exc:
                if on_malformed is None:
                    raise ValueError(f"{where}: missing field {exc}") from None
                on_malformed(f"{where}: missing field {exc}")
            except ValueError as exc:
                if on_malformed is None:
                    raise
                on_malformed(str(exc))
            continue
        if "_label_cost" not in line:
            stats.skipped_not_shown += 1  # never joined to a reward
            continue
        try:
            row = _dsjson_row(line, number, where, features)
        except ValueError as exc:
            if on_malformed is None:
                raise
            on_malformed(str(exc))
            continue
        if row is None:
            stats.skipped_deterministic += 1
            continue
        yield row


def _dsjson_row(
    line: dict[str, Any],
    number: int,
    where: str,
    features: Callable[[Mapping[str, Any]], dict[str, Any]],
) -> SlotRow | None:
    try:
        context = line["c"]
        actions = context.get("_multi") or []
        order = [int(a) for a in line["a"]]  # 1-based action ids, ranked
        probabilities = [float(p) for p in line["p"]]
        chosen = int(line["_labelIndex"])
        probability = _probability(line["_label_probability"], where)
        reward = -float(line["_label_cost"])
    except KeyError as exc:
        raise ValueError(f"{where}: missing field {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    if len(order) != len(probabilities) or len(order) != len(actions):
        raise ValueError(f"{where}: a, p and c._multi must have the same length")
    if not 0 <= chosen < len(actions):
        raise ValueError(f"{where}: _labelIndex {chosen} is not an action index")
    if not all(1 <= a <= len(actions) for a in order):
        raise ValueError(f"{where}: a holds an action number outside 1..{len(actions)}")
    if probability == 1.0:
        return None
    pmf = [0.0] * len(actions)
    for action, p in zip(order, probabilities, strict=True):
        pmf[action - 1] = p
    try:
        candidates = tuple(
            Candidate(_action_id(action, index), features(action))
            for index, action in enumerate(actions)
        )
        shared = features(context)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return SlotRow(
        key=str(line.get("EventId", number)),
        created_at=float(number),
        context=shared,
        slot=0,
        slot_features={},
        eligible=candidates,
        chosen=chosen,
        propensity=probability,
        reward=reward,
        logged_pmf=tuple(pmf),
    )


def _action_id(action: Any, index: int) -> str:
    """Personalizer logged an action's id as ``_tag`` (older logs: an ``id`` feature)."""
    if not isinstance(action, Mapping):
        raise ValueError(f"action {index + 1} in c._multi is not an object")
    for key in ("_tag", "id"):
        if isinstance(action.get(key), str | int) and not isinstance(action.get(key), bool):
            return str(action[key])
    return str(index)
