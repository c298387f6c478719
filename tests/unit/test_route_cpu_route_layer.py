"""The decision route's per-request shortcuts answer exactly what they replace: slots made
once per count, the answer built from literals (same keys, same order, same bytes)."""

from __future__ import annotations

from typing import Any

import orjson

from bandit_service.api.routes import counted_slots, decision_out
from bandit_service.domain import Distribution, Slot, slot_list


def test_counted_slots_are_slot_list_and_kept_for_small_counts() -> None:
    for count in (1, 2, 3, 5, 64, 65, 200):
        assert counted_slots(count) == slot_list(count)
        assert all(type(s) is Slot and s.features == {} for s in counted_slots(count))
    assert counted_slots(3) is counted_slots(3)  # made once
    assert counted_slots(65) is not counted_slots(65)  # large counts are not kept
    assert counted_slots(0) == () and counted_slots(-1) == ()


def _row(slots: int) -> dict[str, Any]:
    return {
        "event_id": "e1",
        "policy": "default",
        "policy_version": "v",
        "arm": "bandit",
        "model_version": 3,
        "deferred": False,
        "user_key": "k",
        "context": {"c": 1},
        "candidates": [{"id": "a", "features": {}}, {"id": "b", "features": {}}],
        "slots": [
            {
                "slot": k,
                "slot_id": str(k),
                "slot_features": {},
                "id": "ab"[k % 2],
                "probability": 0.25 + k / 10,
                "explored": bool(k % 2),
                "pmf": Distribution(["a", "b"], [0, 1], [0.25 + k / 10, 0.75 - k / 10]),
                "model_id": None,
            }
            for k in range(slots)
        ],
    }


def _previous(row: dict[str, Any], include_pmf: bool) -> dict[str, Any]:
    """``decision_out`` as it was written before (a comprehension over the keys)."""

    def slot_out(slot: dict[str, Any]) -> dict[str, Any]:
        out = {k: slot[k] for k in ("slot", "slot_id", "id", "probability", "explored")}
        if include_pmf:
            out["pmf"] = [{"id": cid, "probability": p} for cid, p in slot["pmf"]]
        return out

    return {
        "event_id": row["event_id"],
        "policy": row["policy"],
        "policy_version": row["policy_version"],
        "arm": row["arm"],
        "model_version": row["model_version"],
        "deferred": row["deferred"],
        "slots": [slot_out(s) for s in row["slots"]],
    }


def test_the_answer_is_byte_for_byte_the_previous_one() -> None:
    for slots in (0, 1, 2, 5):
        for include_pmf in (False, True):
            row = _row(slots)
            assert orjson.dumps(decision_out(row, include_pmf)) == orjson.dumps(
                _previous(row, include_pmf)
            )
