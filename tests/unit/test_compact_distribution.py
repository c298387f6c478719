"""The engine hands each slot's distribution over positionally (domain.Distribution), a
decision row's ``pmf`` is that Distribution, and the log stores it from those
positions (store/compact.compact_row_slots). Every reader must
see exactly what the classic ``[[id, p], ...]`` form gave, and the stored bytes must be the
ones the classic form's id-by-id compaction (store/compact.compact_slots) produces."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import orjson
import pytest

from bandit_service.api.routes import decision_out
from bandit_service.candidate_sets import KeptCandidates
from bandit_service.domain import (
    Candidate,
    DecisionRequest,
    Distribution,
    Slot,
    slot_list,
)
from bandit_service.engine import DecisionEngine
from bandit_service.holdout import PopularityScores
from bandit_service.learners.vw import VWLearner
from bandit_service.policy import parse_policy
from bandit_service.service import decision_row
from bandit_service.store import compact

IDS = ["a", "b/é", "c", "d", "e", "f"]


def _logged(ids: list[str]) -> list[dict[str, Any]]:
    return [{"id": cid, "features": {"n": i}} for i, cid in enumerate(ids)]


def _classic(slots: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The slots as decision_row wrote them before: ``pmf`` a plain list of ``[id, p]``."""
    return [{k: (list(v) if k == "pmf" else v) for k, v in slot.items()} for slot in slots]


# -- Distribution reads as the list it stands for ------------------------------------------
def test_distribution_reads_as_its_classic_list() -> None:
    d = Distribution(IDS, [0, 2, 3], [0.5, 0.25, 0.25])
    classic = [["a", 0.5], ["c", 0.25], ["d", 0.25]]
    listed = d.classic()
    assert listed == classic and type(listed) is list
    assert json.dumps(listed) == json.dumps(classic)
    assert orjson.dumps(listed) == orjson.dumps(classic)
    assert copy.deepcopy(listed) == classic
    assert list(d) == classic and len(d) == 3 and bool(d)
    assert d == classic and classic == d
    assert not d.__ne__(classic)
    assert d != [("a", 0.5), ("c", 0.25), ("d", 0.25)]  # as a list: unequal to tuples
    assert d != tuple(classic) and d != "x"
    assert d[1] == ["c", 0.25] and d[-1] == ["d", 0.25] and d[1:] == classic[1:]
    assert {cid: p for cid, p in d} == {"a": 0.5, "c": 0.25, "d": 0.25}
    assert d == Distribution(list(IDS), [0, 2, 3], [0.5, 0.25, 0.25])
    assert d != Distribution(IDS, [0, 2, 4], [0.5, 0.25, 0.25])
    assert repr(d) == f"Distribution({classic!r})"
    with pytest.raises(TypeError):
        hash(d)
    with pytest.raises(IndexError):
        d[3]
    with pytest.raises(ValueError, match="2 positions but 1 probabilities"):
        Distribution(IDS, [0, 1], [1.0])
    # A dict holding it equals the dict holding the list (a fresh row vs a stored one).
    assert {"pmf": d, "id": "a"} == {"pmf": classic, "id": "a"}


# -- stored bytes: positional == id by id ---------------------------------------------------
def _random_slot(rng: random.Random, n: int) -> dict[str, Any]:
    shape = rng.choice(["all", "contiguous", "gaps", "one"])
    if shape == "all":
        positions = list(range(n))
    elif shape == "contiguous":
        start = rng.randrange(n)
        positions = list(range(start, rng.randrange(start, n) + 1))
    elif shape == "gaps":
        positions = sorted(rng.sample(range(n), rng.randint(1, n)))
    else:
        positions = [rng.randrange(n)]
    weights = [rng.random() + 1e-9 for _ in positions]
    total = sum(weights)
    probabilities = [w / total for w in weights]
    return {"positions": positions, "probabilities": probabilities}


@pytest.mark.parametrize("kept", [False, True])
def test_positional_compaction_is_byte_identical_to_id_by_id(kept: bool) -> None:
    rng = random.Random(8)
    for _ in range(300):
        n = rng.choice([1, 2, 7, 50, 500])
        ids = [f"id-{rng.randrange(10**6)}-{i}" for i in range(n)]
        candidates = (
            KeptCandidates(Candidate(cid, {"n": i}) for i, cid in enumerate(ids)).logged
            if kept
            else _logged(ids)
        )
        slots = []
        for k in range(rng.randint(1, 5)):
            drawn = _random_slot(rng, n)
            dist = Distribution(ids, drawn["positions"], drawn["probabilities"])
            pmf: Any = dist.classic() if k % 2 == 0 else dist  # a classic list, or the engine's
            slots.append(
                {"slot": k, "slot_id": str(k), "slot_features": {}, "id": dist[0][0],
                 "probability": drawn["probabilities"][0], "explored": False, "pmf": pmf,
                 "model_id": None}
            )  # fmt: skip
        positional = compact.compact_row_slots(slots, candidates)
        by_id = compact.compact_slots(_classic(slots), compact.candidate_ids(candidates))
        assert orjson.dumps(positional) == orjson.dumps(by_id)
        assert compact.expand_slots(positional, ids) == _classic(slots)


def test_a_distribution_over_other_candidates_is_compacted_by_id() -> None:
    """A row whose candidates are not the ones its Distribution indexes (only a row put
    together by hand could be) is stored by id, as before, never by wrong positions."""
    reordered = _logged(["c", "a", "b/é", "d", "e", "f"])  # same length, other order
    shorter = _logged(["a", "c"])
    slot = {"slot": 0, "id": "c", "pmf": Distribution(IDS, [2, 0], [0.75, 0.25])}
    for candidates in (reordered, shorter):
        got = compact.compact_row_slots([slot], candidates)
        assert got == compact.compact_slots(_classic([slot]), compact.candidate_ids(candidates))
    assert compact.compact_row_slots([slot], shorter)[0]["eligible"] == [1, 2, 0, 1]
    # An id outside the candidate set keeps the classic form, as a plain (storable) list.
    outside = compact.compact_row_slots([slot], _logged(["x", "y", "z", "d", "e", "f"]))
    assert outside == [{"slot": 0, "id": "c", "pmf": [["c", 0.75], ["a", 0.25]]}]
    assert type(outside[0]["pmf"]) is list
    orjson.dumps(outside)
    # An empty distribution (never the engine's) is kept as written, too.
    empty = {"slot": 0, "id": "c", "pmf": Distribution(IDS, [], [])}
    assert compact.compact_row_slots([empty], _logged(IDS)) == [{**empty, "pmf": []}]


def test_classic_rows_still_compact_as_before() -> None:
    """Rows written with a classic pmf (tests, scripts) take the id-by-id path."""
    slots = [
        {"slot": 0, "id": "c", "pmf": [["a", 0.25], ["c", 0.75]]},
        {"slot": 1, "id": "zz", "pmf": [["zz", 1.0]]},
    ]
    got = compact.compact_row_slots(slots, _logged(IDS))
    assert got[0] == {"slot": 0, "id": "c", "eligible": [0, 1, 2, 3], "p": got[0]["p"]}
    assert compact.unpack_probabilities(got[0]["p"]) == [0.25, 0.75]
    assert got[1] is slots[1]


# -- the engine's slots, through decision_row, for every kind of slot ----------------------
CANDIDATES = tuple(
    Candidate(f"c{i}", {"category": "abc"[i % 3], "in_stock": i != 4}) for i in range(9)
)
CONTEXT = {"user": {"segment": "s"}}
POLICIES: dict[str, dict[str, Any]] = {
    "online": {},
    "rules": {"rules": {"exclude_if": [{"feature": "in_stock", "equals": False}],
                        "pins": [{"id": "c7", "slot": 1}],
                        "max_per_value": [{"feature": "category", "max": 2}],
                        "boosts": [{"feature": "category", "equals": "a", "factor": 2.0}],
                        "exploration_positions": [2], "exploration_distribution": "least_shown",
                        "exploration_share": 0.3}},
    "holdout": {"holdout_share": 0.5},
    "apprentice": {"learning_mode": "apprentice"},
    "logging_only": {"learning_mode": "logging_only"},
}  # fmt: skip


def _engine() -> DecisionEngine:
    policies = {
        name: parse_policy(
            name, {"vw_args": "--cb_explore_adf --epsilon 0.2", "holdout_share": 0.0, **raw}
        )
        for name, raw in POLICIES.items()
    }
    learners = {name: VWLearner(policy.vw_args) for name, policy in policies.items()}
    popularity = PopularityScores(prior=1.0, shown={"c1": 3.0})
    return DecisionEngine(policies, learners.__getitem__, lambda _n: popularity)


def _requests() -> list[DecisionRequest]:
    out = []
    for name in POLICIES:
        for i in range(12):
            slots = slot_list(1 + i % 4)
            if name == "apprentice" and i % 3 == 0:
                slots = tuple(Slot(str(k), baseline=f"c{8 - k}") for k in range(len(slots)))
            out.append(
                DecisionRequest(
                    event_id=f"{name}-{i}",
                    policy=name,
                    candidates=KeptCandidates(CANDIDATES) if i % 2 else CANDIDATES,
                    slots=slots,
                    context=CONTEXT,
                    excluded=frozenset({"c3"}) if i % 3 == 1 else frozenset(),
                    pins=(("c0", len(slots) - 1),) if i % 4 == 3 and name != "rules" else (),
                    personalize=i % 5 != 4,
                )
            )
    return out


def test_engine_slots_store_and_read_as_the_classic_form() -> None:
    engine = _engine()
    arms = set()
    for request in _requests():
        decision = engine.decide(request)
        arms.add(decision.arm)
        ids = [c.id for c in request.candidates]
        for choice in decision.slots:
            dist = choice.distribution
            positions = list(dist.positions)
            assert positions == sorted(set(positions)), "increasing request positions"
            assert choice.id in {ids[i] for i in positions}
            assert dict(choice.pmf)[choice.id] == choice.probability
            assert choice.pmf == tuple(
                (ids[i], p) for i, p in zip(positions, dist.probabilities, strict=True)
            )
        row = decision_row(decision, request, None, 1000.0)
        assert all(type(s["pmf"]) is Distribution for s in row["slots"])
        plain = {**row, "slots": [{**s, "pmf": s["pmf"].classic()} for s in row["slots"]]}
        assert json.loads(json.dumps(plain)) == row  # plain JSON data once pmf is listed
        classic_slots = _classic(row["slots"])
        assert row["slots"] == classic_slots
        for slot, choice in zip(classic_slots, decision.slots, strict=True):
            assert slot["pmf"] == [list(pair) for pair in choice.pmf]
        positional = compact.compact_row_slots(row["slots"], row["candidates"])
        by_id = compact.compact_slots(classic_slots, compact.candidate_ids(row["candidates"]))
        assert orjson.dumps(positional) == orjson.dumps(by_id)
        assert all("pmf" not in s for s in positional)
        # The answer, with and without the distribution, is the classic row's.
        classic_row = {**row, "slots": classic_slots}
        for include in (False, True):
            assert orjson.dumps(decision_out(row, include)) == orjson.dumps(
                decision_out(classic_row, include)
            )
    assert arms == {"bandit", "holdout", "opted_out"}
