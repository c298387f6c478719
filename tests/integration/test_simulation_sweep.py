"""In-process simulation and sweeps: the shape of what a user gets, reproducibility, reward
windows honoured, and clear errors for bad sweep specifications."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest

from bandit_service.cli import main
from simulators.inprocess import run_inprocess
from simulators.scenarios import make_scenario
from simulators.sweep import (
    Setting,
    SweepError,
    apply_setting,
    parse_sweep,
    run_sweep,
)


def _run(world, setting, seed, tick):  # type: ignore[no-untyped-def]
    policy = apply_setting(world.policy, setting)
    result = run_inprocess(world, policy, 300, seed, 50, setting.objective, tick)
    return result.windows, result.summary


def test_a_short_sweep_writes_csv_json_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "drift"
    code = main(
        ["simulate", "--scenario", "drift", "--steps", "300", "--window", "50", "--seeds", "2",
         "--sweep", "epsilon=0,0.2", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario"]["name"] == "drift"
    assert summary["seeds"] == [0, 1] and summary["steps"] == 300
    assert [s["setting"] for s in summary["settings"]] == ["epsilon=0", "epsilon=0.2"]
    for setting in summary["settings"]:
        assert [r["seed"] for r in setting["runs"]] == [0, 1]
        assert "--epsilon" in setting["policy"]["vw_args"]
        for key in ("expected_reward", "cumulative_regret", "exploration_share", "breadth",
                    "expected_reward_after_change", "oracle_reward"):  # fmt: skip
            assert isinstance(setting["mean"][key], float), key
            assert setting["sd"][key] >= 0
        assert 0 <= setting["mean"]["expected_reward"] <= setting["mean"]["oracle_reward"]
    explored = [s["mean"]["exploration_share"] for s in summary["settings"]]
    assert explored[0] == 0.0 and 0.05 < explored[1] < 0.35  # epsilon 0.2 of 12 items
    with open(out / "windows.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 6  # settings x seeds x windows
    assert {r["step"] for r in rows} == {str(s) for s in range(50, 301, 50)}
    regret = [
        float(r["cumulative_regret"])
        for r in rows
        if r["setting"] == "epsilon=0" and r["seed"] == "0"
    ]
    assert len(regret) == 6
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(regret))  # regret >= 0 per visit
    for png in ("curves.png", "breadth.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
        assert (out / png).stat().st_size < 150_000


def test_the_same_seed_gives_the_same_numbers() -> None:
    settings = parse_sweep(["epsilon=0.1"])
    first = run_sweep("clickbait", settings, 300, [4], 50, _run)
    second = run_sweep("clickbait", settings, 300, [4], 50, _run)
    other = run_sweep("clickbait", settings, 300, [5], 50, _run)
    assert first.settings == second.settings and first.windows == second.windows
    assert first.windows != other.windows


def test_events_are_learned_only_after_their_reward_window_closes() -> None:
    # delayed: a 300 s window, one visit per second. After 500 visits exactly the events
    # created at t <= 199 have a closed window (t + 300 <= 499) and have been learned.
    world = make_scenario("delayed", 0, 500)
    policy = apply_setting(world.policy, Setting(()))
    result = run_inprocess(world, policy, 500, 0, 100)
    assert result.summary["final_model_version"] == 200
    # At each window's last visit (t = 99, 199, ...) the events of t - 300 and earlier.
    assert [w["model_version"] for w in result.windows] == [0, 0, 0, 100, 200]
    assert 0 < result.summary["late_share"] < 0.3  # exp(-300/120) = 8% expected


def test_the_holdout_arm_is_measured_when_enabled() -> None:
    world = make_scenario("steady", 0, 600)
    policy = apply_setting(world.policy, parse_sweep(["holdout_share=0.3"])[0])
    result = run_inprocess(world, policy, 600, 0, 200)
    assert result.summary["lift"] is not None
    assert all(w["holdout_reward_rate"] is not None for w in result.windows)


def test_sweep_settings_become_validated_policies() -> None:
    world = make_scenario("position_bias", 0, 10)
    grid = parse_sweep(["algorithm=greedy,squarecb", "exploration_slots=none,2"])
    assert len(grid) == 4
    policies = [apply_setting(world.policy, s) for s in grid]
    assert "--epsilon 0" in policies[0].vw_args and "--squarecb" in policies[2].vw_args
    assert "--epsilon" not in policies[2].vw_args
    assert policies[1].rules.exploration_positions == (2,)
    assert policies[0].rules.exploration_positions == ()
    share = apply_setting(world.policy, parse_sweep(["exploration_share=0.2"])[0])
    assert share.rules.exploration_share == 0.2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (["epsilon"], "expected KEY=VALUE"),
        (["epsilon=0,,1"], "empty value"),
        (["objective=views"], "click or satisfaction"),
        (["algorithm=bogus"], "among epsilon"),
        (["holdout_share=0.9"], "holdout_share must be between 0 and 0.5"),
        (["reward_windw_seconds=3"], "unknown key.*reward_windw_seconds"),
        (["exploration_share=1.5"], "exploration_share must be in"),
        (["vw_args=--cb_adf"], "must contain --cb_explore_adf"),
    ],
)
def test_bad_sweeps_are_refused_with_the_key_named(spec: list[str], message: str) -> None:
    world = make_scenario("steady", 0, 10)
    with pytest.raises(SweepError, match=message):
        for setting in parse_sweep(spec):
            apply_setting(world.policy, setting)


def test_the_cli_refuses_bad_input_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "x")
    assert main(["simulate", "--scenario", "steady", "--steps", "10", "--sweep", "holdout_share=2",
                 "--out", out]) == 2  # fmt: skip
    assert "holdout_share must be between 0 and 0.5" in capsys.readouterr().err
    assert main(["simulate", "--scenario", "steady", "--mode", "http", "--sweep", "epsilon=0",
                 "--out", out]) == 2  # fmt: skip
    assert "sweep objective, policy only" in capsys.readouterr().err
    assert not Path(out).exists()


def test_print_policy_is_a_valid_policy_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bandit_service.policy import load_policy_file

    assert main(["simulate", "--scenario", "clickbait", "--print-policy"]) == 0
    path = tmp_path / "sim.toml"
    path.write_text(capsys.readouterr().out)
    policy = load_policy_file(path)
    assert policy.reward_window_seconds == 20 and policy.reward_min == 0
