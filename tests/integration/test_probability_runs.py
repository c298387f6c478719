"""Repeated probabilities are stored as runs (``p_runs``, store/compact.py) and read back as
the very same doubles, on both stores; downgrading past migration 0010 packs them as older
code expects, exactly; anything a run could not give back exactly keeps the packed form."""

from __future__ import annotations

import math
import random
import struct
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from bandit_service.store import compact, repository
from bandit_service.store.database import downgrade, make_engine, upgrade

CATALOGUE = [{"id": f"c{i}", "features": {"n": i}} for i in range(12)]


def _json(value: Any) -> Any:
    """A JSON column read with plain SQL: text on SQLite, decoded on PostgreSQL."""
    return orjson.loads(value) if isinstance(value, str) else value


def _bits(values: list[float]) -> bytes:
    """Bit patterns: ``==`` would call 0.0 and -0.0 equal."""
    return struct.pack(f"<{len(values)}d", *values)


def _epsilon_greedy(n: int, epsilon: float, greedy: int) -> list[float]:
    """As the engine normalises VW's float32 pmf: epsilon/N everywhere, more on one."""
    weights = [float(struct.unpack("<f", struct.pack("<f", epsilon / n))[0])] * n
    weights[greedy] = float(struct.unpack("<f", struct.pack("<f", 1 - epsilon + epsilon / n))[0])
    total = sum(weights)
    return [w / total for w in weights]


def test_runs_give_back_the_same_doubles() -> None:
    rng = random.Random(5)
    for _ in range(300):
        n = rng.choice([12, 13, 50, 499, 500])  # from 12 even 3 runs are 4 times shorter
        values = _epsilon_greedy(n, rng.choice([0.05, 0.1, 1 / 3, 0.2]), rng.randrange(n))
        runs = compact.probability_runs(values)
        assert runs is not None and len(runs) <= 6
        for loads in (orjson.loads, __import__("json").loads):
            back = compact.slot_probabilities({"p_runs": loads(orjson.dumps(runs))})
            assert _bits(back) == _bits(values)


@pytest.mark.parametrize(
    "values",
    [
        [0.25, 0.25, 0.25],  # too short to gain
        [0.1 * i for i in range(1, 41)],  # all distinct: a softmax
        [0.0, 0.0, -0.0, 0.0, 0.5, 0.5, 0.5, 0.5],  # -0.0 would come back as 0.0
        [math.nan] * 8,  # NaN equals nothing
        [math.inf] * 8,  # not JSON
        [1, 1, 1, 1, 1, 1, 1, 1],  # ints: packed as doubles, as always
        [0.5, 0.25] * 8,  # 16 runs of 16 values: not four times shorter
    ],
)
def test_what_runs_cannot_hold_exactly_stays_packed(values: list[Any]) -> None:
    assert compact.probability_runs(values) is None


def test_zeros_of_one_sign_make_a_run() -> None:
    values = [0.0] * 6 + [1.0] + [0.0] * 5
    runs = compact.probability_runs(values)
    assert runs == [0.0, 6, 1.0, 1, 0.0, 5]
    assert _bits(compact.expand_runs(runs)) == _bits(values)


def _awkward() -> list[tuple[str, list[list[Any]]]]:
    """Distributions over CATALOGUE whose doubles have long or extreme decimal forms."""
    ids = [c["id"] for c in CATALOGUE]
    third = [[cid, 1 / 3 if i < 3 else 0.0] for i, cid in enumerate(ids)]
    tiny = [[cid, 5e-324 if i else 1.0] for i, cid in enumerate(ids)]
    greedy = [[cid, p] for cid, p in zip(ids, _epsilon_greedy(12, 0.1, 7), strict=True)]
    spread = [[cid, (i + 1) / 78] for i, cid in enumerate(ids)]  # distinct: packed
    return [("third", third), ("tiny", tiny), ("greedy", greedy), ("spread", spread)]


def _row(event_id: str, pmf: list[list[Any]]) -> dict[str, Any]:
    chosen, probability = max(pmf, key=lambda pair: pair[1])
    return {
        "event_id": event_id, "policy": "p", "policy_version": "v1", "model_version": 0,
        "arm": "bandit", "user_key": None, "context": {"x": 1}, "candidates": CATALOGUE,
        "slots": [{"slot": 0, "slot_id": "0", "slot_features": {}, "id": chosen,
                   "probability": probability, "explored": False, "pmf": pmf,
                   "model_id": None}],
        "excluded": [], "created_at": 100.0, "deferred": False, "activated_at": None,
    }  # fmt: skip


def test_the_store_gives_back_the_same_doubles(empty_database_url: str) -> None:
    url = empty_database_url
    upgrade(url)
    engine = make_engine(url)
    cases = _awkward()
    with Session(engine) as session, session.begin():
        repository.insert_decisions(session, [_row(name, pmf) for name, pmf in cases])
    with Session(engine) as session:
        stored = {
            event_id: _json(slots)
            for event_id, slots in session.execute(sa.text("SELECT event_id, slots FROM decisions"))
        }
        read = {name: repository.get_decision(session, name) for name, _pmf in cases}
    for name, pmf in cases:
        assert ("p_runs" in stored[name][0]) == (name != "spread")
        got = read[name]["slots"][0]["pmf"]  # type: ignore[index]
        assert [cid for cid, _p in got] == [cid for cid, _p in pmf]
        assert _bits([p for _cid, p in got]) == _bits([float(p) for _cid, p in pmf])

    # Downgrading past migration 0010 packs the runs (older code reads only "p"), exactly;
    # past the compact log (0004) the classic form comes back, exactly.
    downgrade(url, "0009_catalog")
    with engine.connect() as connection:
        packed = dict(connection.execute(sa.text("SELECT event_id, slots FROM decisions")).all())
    for name, pmf in cases:
        slot = _json(packed[name])[0]
        assert "p_runs" not in slot and "p" in slot  # (jsonb keeps no key order)
        want = _bits([float(p) for _cid, p in pmf])
        assert compact.unpack_probabilities(slot["p"]) == list(struct.unpack(f"<{len(pmf)}d", want))
        assert _bits(compact.unpack_probabilities(slot["p"])) == want
    downgrade(url, "0003")
    with engine.connect() as connection:
        restored = dict(connection.execute(sa.text("SELECT event_id, slots FROM decisions")).all())
    engine.dispose()
    for name, pmf in cases:
        back = _json(restored[name])[0]["pmf"]
        assert [cid for cid, _p in back] == [cid for cid, _p in pmf]
        assert _bits([p for _cid, p in back]) == _bits([float(p) for _cid, p in pmf])
