"""``import dsjson``: a Personalizer log warm-starts a policy's model, saved as a checkpoint
that serving processes load; malformed lines are skipped and counted."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy.orm import Session

from bandit_service.cli import main
from bandit_service.domain import Candidate
from bandit_service.model_registry import ModelRegistry
from bandit_service.personalizer.features import to_feature_map
from bandit_service.personalizer.importer import ImportBusy, import_dsjson
from bandit_service.policy import parse_policy
from bandit_service.store import repository
from bandit_service.store.database import make_engine, upgrade

POLICY = parse_policy(
    "default", {"holdout_share": 0, "vw_args": "--cb_explore_adf --epsilon 0.2 -q uk"}
)
ACTIONS = ["x", "y"]


def dsjson_line(event: int, segment: str, chosen: int) -> dict[str, Any]:
    """A logged uniform draw; reward 1 when the action suits the segment (a->x, b->y)."""
    best = 0 if segment == "a" else 1
    order = [chosen + 1, 2 - chosen]  # 1-based, chosen first
    return {
        "_label_cost": -1.0 if chosen == best else 0.0,
        "_label_probability": 0.5,
        "_labelIndex": chosen,
        "EventId": f"e{event}",
        "a": order,
        "p": [0.5, 0.5],
        "c": {
            "user": {"segment": segment},
            "_multi": [{"_tag": a, "kind": {"name": a}} for a in ACTIONS],
        },
        "VWState": {"m": "model-id"},
    }


def write_log(path: Path, events: int) -> None:
    rng = random.Random(7)
    lines = [
        orjson.dumps(dsjson_line(i, rng.choice("ab"), rng.randrange(2))) for i in range(events)
    ]
    extra = [
        b"{not json",
        b"[1, 2]",
        orjson.dumps({"c": {"_multi": []}, "_label_cost": 0, "a": [1]}),  # missing fields
        orjson.dumps({**dsjson_line(0, "a", 0), "_labelIndex": 5}),  # no such action
        orjson.dumps({k: v for k, v in dsjson_line(0, "a", 0).items() if k != "_label_cost"}),
        orjson.dumps({**dsjson_line(0, "a", 0), "_skipLearn": True}),  # never activated
    ]
    path.write_bytes(b"\n".join(lines + extra) + b"\n")


def greedy(registry: ModelRegistry, segment: str) -> str:
    candidates = [Candidate(a, to_feature_map({"kind": {"name": a}}, "f")) for a in ACTIONS]
    scorer = registry.get("default").scorer({"user": {"segment": segment}}, candidates)
    pmf = scorer.pmf(0, {}, [0, 1])
    return ACTIONS[pmf.index(max(pmf))]


def test_import_warm_starts_the_served_model(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "export.json"
    write_log(log, 600)
    db = make_engine(database_url)
    try:
        seen: list[int] = []
        result = import_dsjson(db, POLICY, [log], progress=lambda read, _r: seen.append(read))
        assert (result.learned, result.malformed, result.not_joined) == (600, 4, 2)
        assert result.lines == 606 and result.model_version == 1
        assert seen[-1] == log.stat().st_size  # the progress reached the end of the file
        with Session(db) as session:
            checkpoint = repository.latest_checkpoint(session, "default", POLICY.model_key)
        assert checkpoint is not None
        assert checkpoint["position"] == 0 and checkpoint["learned_events"] == 600
        assert "600 Personalizer DSJSON events" in checkpoint["note"]

        registry = ModelRegistry(db, {"default": POLICY})
        assert registry.refresh() == ["default"]
        assert greedy(registry, "a") == "x" and greedy(registry, "b") == "y"

        again = import_dsjson(db, POLICY, [log])  # continues the lineage: a newer version
        assert again.model_version == 2
        with Session(db) as session, session.begin():
            repository.acquire_lease(session, "default", "trainer-other", 1e12, 30)
        with pytest.raises(ImportBusy, match="trainer-other"):
            import_dsjson(db, POLICY, [log])
    finally:
        db.dispose()


def test_cli_import_reports_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    database_url = f"sqlite:///{tmp_path / 'bandit.db'}"
    upgrade(database_url)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "default.toml").write_text('vw_args = "--cb_explore_adf --epsilon 0.2 -q uk"\n')
    log = tmp_path / "export.json"
    write_log(log, 50)
    monkeypatch.setenv("BANDIT_DATABASE_URL", database_url)
    monkeypatch.setenv("BANDIT_POLICIES_DIR", str(policies))
    assert main(["import", "dsjson", "--policy", "default", str(log)]) == 0
    out = capsys.readouterr()
    assert "56 lines: 50 learned, 4 malformed" in out.out
    assert "model version 1 saved" in out.out
    assert "100%" in out.err
    assert main(["import", "dsjson", "--policy", "nope", str(log)]) == 2


def test_multi_slot_lines_are_learned_one_slot_at_a_time(database_url: str, tmp_path: Path) -> None:
    """A Personalizer multi-slot (CCB) export: each slot is one learned row."""
    line = {
        "EventId": "ccb-1",
        "c": {
            "user": {"segment": "a"},
            "_multi": [{"_tag": a, "kind": {"name": a}} for a in [*ACTIONS, "z"]],
            "_slots": [{"_id": "top", "pos": {"rank": 1}}, {"_id": "side"}],
        },
        "_outcomes": [
            {"_id": "top", "_label_cost": -1.0, "_a": [0, 1, 2], "_p": [0.8, 0.1, 0.1]},
            {"_id": "side", "_label_cost": 0.0, "_a": [2, 1], "_p": [0.5, 0.5]},
        ],
    }
    log = tmp_path / "ccb.json"
    log.write_bytes(b"\n".join(orjson.dumps({**line, "EventId": f"c{i}"}) for i in range(10)))
    db = make_engine(database_url)
    try:
        result = import_dsjson(db, POLICY, [log])
        assert (result.lines, result.learned, result.malformed) == (10, 20, 0)
        assert result.model_version == 1
    finally:
        db.dispose()
