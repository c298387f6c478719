"""Off-policy evaluation end to end: the service's own log (both stores) and an OBD file."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from bandit_service.cli import main
from bandit_service.config import Settings
from bandit_service.domain import Candidate, DecisionRequest, slot_list
from bandit_service.ope import evaluate as ope
from bandit_service.policy import load_policies
from bandit_service.service import DecisionService
from bandit_service.store.database import make_engine
from bandit_service.store.repository import iter_decisions

OBD = Path(__file__).resolve().parents[3] / "shared" / "data" / "obd-sample"
POLICY = """
holdout_share = 0
reward_min = 0
reward_max = 1
vw_args = "--cb_explore_adf --epsilon 0.5"
[rules]
pins = [{id = "pinned", slot = 1}]
"""


def test_evaluating_the_services_own_log(
    settings: Settings,
    policies_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (policies_dir / "eval.toml").write_text(POLICY)
    policy = load_policies(policies_dir)["eval"]
    candidates = (*(Candidate(f"c{i}", {"t": f"v{i}"}) for i in range(4)), Candidate("pinned"))
    rng = random.Random(4)

    async def log() -> None:
        service = DecisionService(
            settings.model_copy(update={"trainer": "off"}), load_policies(policies_dir)
        )
        await service.start()
        for i in range(300):
            row = await service.decide(
                DecisionRequest(f"e{i}", "eval", candidates, slot_list(2), {"u": "x"})
            )
            if row["slots"][0]["id"] == "c2" and rng.random() < 0.8:
                await service.reward(f"e{i}", 1.0, 0, None)
        await service.close()

    asyncio.run(log())
    engine = make_engine(settings.database_url)
    stats = ope.LogStats()
    rows = [
        r for b in iter_decisions(engine, "eval") for r in ope.rows_from_decisions(b, policy, stats)
    ]
    engine.dispose()
    assert stats.decisions == 300 and stats.skipped_deterministic == 300  # the pinned slot
    assert len(rows) == 300
    mean_reward = sum(r.reward for r in rows) / len(rows)
    results = ope.evaluate(
        rows,
        {"logging": ope.logging_target, "uniform": ope.uniform_target,
         "vw:greedy": ope.parse_target("vw:--cb_explore_adf --epsilon 0.0")},
        replicates=200,
    )  # fmt: skip
    by_target = {r.target: {e.estimator: e for e in r.estimates} for r in results}
    assert by_target["logging"]["IPS"].value == pytest.approx(mean_reward)
    # Only c2 pays (0.8), so uniform over 4 is worth about 0.2 and a learning greedy
    # policy is worth more; the intervals are honest about 300 rows.
    uniform = by_target["uniform"]["DR"]
    assert uniform.bootstrap_interval[0] < 0.2 < uniform.bootstrap_interval[1]
    assert by_target["vw:greedy"]["DR"].value > uniform.value

    # Streamed from the store a batch at a time (bounded memory), through the command line:
    # the decisions were made one after another, so log order is time order and the
    # estimates are the in-memory ones.
    monkeypatch.setenv("BANDIT_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("BANDIT_POLICIES_DIR", str(policies_dir))
    assert main(["ope", "--policy", "eval", "--target", "logging", "--target", "uniform",
                 "--target", "vw:--cb_explore_adf --epsilon 0.0", "--replicates", "200",
                 "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["log"]["decisions"] == 300 and report["log"]["skipped_deterministic"] == 300
    streamed = {r["target"]: {e["estimator"]: e for e in r["estimates"]} for r in report["results"]}
    for target, name in (("logging", "logging"), ("uniform", "uniform"),
                         ("vw:--cb_explore_adf --epsilon 0.0", "vw:greedy")):  # fmt: skip
        for estimator, estimate in by_target[name].items():
            assert streamed[target][estimator]["value"] == pytest.approx(estimate.value, abs=1e-6)


def test_the_ope_command_on_the_open_bandit_sample(capsys: pytest.CaptureFixture[str]) -> None:
    code = main([
        "ope", "--from-obd", str(OBD / "random/men/men.csv"), "--items", "34",
        "--target-distribution", str(OBD / "derived/bts_eval_action_dist_men.csv"),
        "--target", "uniform", "--replicates", "100", "--json",
    ])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["log"]["rows"] == 10_000
    uniform = report["results"][0]["estimates"][0]
    assert uniform["estimator"] == "IPS" and uniform["value"] == pytest.approx(46 / 10_000)
    assert {r["target"] for r in report["results"]} == {"uniform", "file:bts_eval_action_dist_men"}
    assert main(["ope", "--from-obd", str(OBD / "random/men/men.csv")]) == 2  # no --items
    assert main(["ope", "--from-obd", str(OBD / "random/men/men.csv"), "--items", "34",
                 "--target", "nonsense"]) == 2  # fmt: skip


def test_obd_streamed_in_chunks_equals_in_memory(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a position target the OBD file is streamed; same values as in memory."""
    men = str(OBD / "random/men/men.csv")
    assert main(["ope", "--from-obd", men, "--items", "34", "--target", "uniform",
                 "--target", "popularity", "--replicates", "50", "--json"]) == 0  # fmt: skip
    streamed = json.loads(capsys.readouterr().out)
    stats = ope.LogStats()
    rows = ope.rows_from_obd(men, 34, stats)
    assert streamed["log"]["rows"] == stats.rows == len(rows) == 10_000
    in_memory = ope.evaluate(
        rows,
        {"uniform": ope.parse_target("uniform"), "popularity": ope.parse_target("popularity")},
        replicates=50,
    )  # fmt: skip
    for result in in_memory:
        got = next(r for r in streamed["results"] if r["target"] == result.target)
        for estimate, row in zip(result.estimates, got["estimates"], strict=True):
            assert row["estimator"] == estimate.estimator
            assert row["value"] == pytest.approx(estimate.value, abs=1e-9)


def test_json_lines_and_dsjson_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    own = tmp_path / "log.jsonl"
    lines = []
    for i in range(200):
        chosen = "a" if i % 4 else "b"
        lines.append(json.dumps({
            "event_id": f"e{i}", "created_at": 1000.0 + i, "context": {"u": "x"},
            "candidates": [{"id": "a", "features": {"t": 1}}, {"id": "b"}],
            "chosen": chosen, "probability": 0.75 if chosen == "a" else 0.25,
            "reward": 1.0 if chosen == "b" else 0.0, "pmf": [["a", 0.75], ["b", 0.25]],
        }))  # fmt: skip
    lines.append(json.dumps({"candidates": [{"id": "a"}], "chosen": "a", "probability": 1.0,
                             "reward": 0.0}))  # fmt: skip
    own.write_text("\n".join(lines) + "\n")
    assert main(["ope", "--from-jsonl", str(own), "--target", "logging", "--target", "uniform",
                 "--estimators", "IPS", "SNIPS", "--replicates", "50", "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["log"] == {"decisions": 201, "rows": 200, "skipped_deterministic": 1,
                             "skipped_not_shown": 0}  # fmt: skip
    logging_ips, uniform_ips = (r["estimates"][0]["value"] for r in report["results"])
    assert logging_ips == pytest.approx(50 / 200)  # the on-policy mean reward
    assert uniform_ips == pytest.approx(0.5)  # b pays 1, a pays 0: uniform earns 1/2

    dsjson = tmp_path / "log.dsjson"
    events = []
    for i in range(100):
        chosen = i % 2  # 0-based action index
        events.append(json.dumps({
            "_label_cost": -1.0 if chosen == 1 else 0.0, "_label_probability": 0.5,
            "_label_Action": chosen + 1, "_labelIndex": chosen, "EventId": f"d{i}",
            "a": [chosen + 1, 2 - chosen], "p": [0.5, 0.5],
            "c": {"User": {"age": 30},
                  "_multi": [{"Item": {"kind": "x"}}, {"Item": {"kind": "y"}}]},
        }))  # fmt: skip
    events.append(json.dumps({"EventId": "unjoined", "a": [1], "p": [1.0], "c": {"_multi": [{}]}}))
    dsjson.write_text("\n".join(events) + "\n")
    assert main(["ope", "--from-dsjson", str(dsjson), "--target", "uniform",
                 "--estimators", "IPS", "--replicates", "50", "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["log"]["rows"] == 100 and report["log"]["skipped_not_shown"] == 1
    assert report["results"][0]["estimates"][0]["value"] == pytest.approx(0.5)

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"candidates": [{"id": "a"}], "chosen": "a", "probability": 0}\n')
    assert main(["ope", "--from-jsonl", str(broken)]) == 2
    assert "line 1" in capsys.readouterr().err


SWEEP_POLICY = """
holdout_share = 0
reward_min = 0
reward_max = 1
# Logging explores almost uniformly; no interactions, so it cannot personalise.
vw_args = "--cb_explore_adf --epsilon 0.9"
"""


def test_sweep_recommends_only_a_clear_winner_and_importance_ranks_namespaces(
    settings: Settings, policies_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    (policies_dir / "sw.toml").write_text(SWEEP_POLICY)
    topics = ["sports", "news", "food", "travel"]
    candidates = tuple(Candidate(f"c-{t}", {"topic": t}) for t in topics)
    rng = random.Random(8)

    async def log() -> None:
        service = DecisionService(
            settings.model_copy(update={"trainer": "off"}), load_policies(policies_dir)
        )
        await service.start()
        for i in range(1000):
            segment = rng.choice(topics)
            row = await service.decide(
                DecisionRequest(
                    f"s{i}", "sw", candidates, slot_list(1), {"user": {"segment": segment}}
                )
            )
            if rng.random() < (0.9 if row["slots"][0]["id"] == f"c-{segment}" else 0.1):
                await service.reward(f"s{i}", 1.0, 0, None)
        await service.close()

    asyncio.run(log())
    monkeypatch.setenv("BANDIT_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("BANDIT_POLICIES_DIR", str(policies_dir))
    out = tmp_path / "sw.recommended.toml"
    assert main(["ope", "--policy", "sw", "--sweep", "--grid", "interactions=none;ua",
                 "--write-policy", str(out), "--importance", "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    recommended = report["sweep"]["recommended"]
    assert recommended is not None and "-q ua" in recommended["vw_args"]
    assert recommended["interval_95"][0] > report["sweep"]["current"]["dr"]
    written = load_policies_from(out)
    assert "-q ua" in written.vw_args and written.reward_max == 1  # other settings kept
    # Without interactions nothing personalises: every candidate is best for a quarter of
    # the users, so leaving any namespace out is worth about nothing.
    for entry in report["importance"]:
        assert entry["interval_95"][0] <= 0.02, entry
    # With the user x candidate cross, both sides of it matter.
    engine = make_engine(settings.database_url)
    stats = ope.LogStats()
    policy = load_policies(policies_dir)["sw"]
    rows = [
        row for batch in iter_decisions(engine, "sw")
        for row in ope.rows_from_decisions(batch, policy, stats)
    ]  # fmt: skip
    engine.dispose()
    from bandit_service.ope.sweep import feature_importance

    importance = {
        e["ignored_letter"]: e
        for e in feature_importance(rows, "--cb_explore_adf --epsilon 0.05 -q ua")
    }
    assert importance["u"]["interval_95"][0] > 0 and importance["a"]["interval_95"][0] > 0
    assert importance["u"]["namespaces"] == ["user"]

    # With nothing better in the grid, nothing is recommended or written.
    again = tmp_path / "none.toml"
    assert main(["ope", "--policy", "sw", "--sweep", "--grid", "interactions=none",
                 "--write-policy", str(again), "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["sweep"]["recommended"] is None
    assert not again.exists()


def load_policies_from(path: Path):  # type: ignore[no-untyped-def]
    from bandit_service.policy import load_policy_file

    return load_policy_file(path)
