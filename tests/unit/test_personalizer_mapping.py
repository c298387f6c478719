"""Personalizer features and settings as the service's feature maps and policy keys."""

from __future__ import annotations

import tomllib

import pytest

from bandit_service.api.personalizer.routes import internal_event_id, ranking
from bandit_service.personalizer.configuration import (
    ConfigurationError,
    exploration_of,
    format_duration,
    parse_duration,
    patch_policy_text,
    policy_updates,
    with_exploration,
)
from bandit_service.personalizer.features import FeatureError, to_feature_map
from bandit_service.policy import parse_policy


def test_feature_lists_become_namespaced_feature_maps() -> None:
    context = [
        {"user": {"profile": "anon", "latLong": [47.6, -122.1], "home": {"city": "Oslo"}}},
        {"environment": {"weather": "Sunny"}},
        {"device": "mobile", "tags": ["a", "b"], "n": 3, "skip": None, "_private": 1},
        {"user": {"visits": 2}},  # merges into the same namespace
        {"my-ns": {"x": 1}},
    ]
    assert to_feature_map(context, "contextFeatures") == {
        "user": {"profile": "anon", "latLong.0": 47.6, "latLong.1": -122.1,
                 "home.city": "Oslo", "visits": 2},
        "environment": {"weather": "Sunny"},
        "device": "mobile", "tags": ["a", "b"], "n": 3,
        "my_ns": {"x": 1},
    }  # fmt: skip
    assert to_feature_map({"vector": [1, 2]}, "f") == {"vector": {"0": 1, "1": 2}}
    assert to_feature_map(None, "f") == {}


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ([3], "f[0]"),
        ([{"tags": ["a", 1, "b"]}], "f[0].tags"),
        ([{"x": "y" * 5000}], "f.x"),
        ([{f"k{i}": i for i in range(300)}], "f"),
    ],
)
def test_bad_features_name_the_place(value: object, path: str) -> None:
    with pytest.raises(FeatureError) as error:
        to_feature_map(value, "f")
    assert error.value.path == path


def test_durations_round_trip() -> None:
    for text, seconds in [("PT10M", 600), ("P1D", 86400), ("PT1H30M", 5400), ("PT5S", 5),
                          ("00:05:00", 300), ("1.00:00:00", 86400), ("P1DT2H", 93600)]:  # fmt: skip
        assert parse_duration(text, "x") == seconds
    assert format_duration(600) == "PT10M" and format_duration(93600) == "P1DT2H"
    for bad in ["10 minutes", "P", "PT", 600, "PT5X"]:
        with pytest.raises(ConfigurationError):
            parse_duration(bad, "rewardWaitTime")


def test_exploration_lives_in_vw_args() -> None:
    assert exploration_of("--cb_explore_adf --epsilon 0.2 -q ::") == 0.2
    assert exploration_of("--cb_explore_adf --epsilon=0.3") == 0.3
    assert exploration_of("--cb_explore_adf") == 0.05  # VW's default
    assert exploration_of("--cb_explore_adf --squarecb") == 0.0
    assert with_exploration("--cb_explore_adf --epsilon 0.2 -q ca", 0.4) == (
        "--cb_explore_adf -q ca --epsilon 0.4"
    )
    with pytest.raises(ConfigurationError, match="squarecb"):
        with_exploration("--cb_explore_adf --squarecb", 0.1)


def test_service_configuration_maps_to_policy_keys() -> None:
    policy = parse_policy("default", {"vw_args": "--cb_explore_adf --epsilon 0.2"})
    same = {"explorationPercentage": 0.2, "rewardWaitTime": "PT1H", "defaultReward": 0,
            "rewardAggregation": "sum", "learningMode": "Online"}  # fmt: skip
    assert policy_updates(same, policy) == {}  # an unchanged round trip changes nothing
    changed = {**same, "rewardWaitTime": "PT10M", "rewardAggregation": "earliest",
               "learningMode": "Apprentice", "defaultReward": -0.5}  # fmt: skip
    assert policy_updates(changed, policy) == {
        "reward_window_seconds": 600.0, "reward_aggregation": "first",
        "learning_mode": "apprentice", "default_reward": -0.5,
    }  # fmt: skip
    assert policy_updates({"modelExportFrequency": "PT5M"}, policy, 2.0) == {
        "model_update_seconds": 300.0
    }
    assert policy_updates({"modelExportFrequency": "PT1S"}, policy, 2.0) == {}  # as found
    for field, value in [("explorationPercentage", 1.5), ("defaultReward", 3),
                         ("learningMode", "Sometimes"), ("rewardAggregation", "max")]:  # fmt: skip
        with pytest.raises(ConfigurationError) as error:
            policy_updates({field: value}, policy)
        assert error.value.field == field


def test_policy_file_patch_keeps_comments_and_tables() -> None:
    text = '# the home page\nholdout_share = 0.1 # keep\nvw_args = "--cb_explore_adf"\n\n[rules]\n'
    patched = patch_policy_text(text, {"vw_args": "--cb_explore_adf --epsilon 0.3",
                                       "reward_window_seconds": 600.0})  # fmt: skip
    assert patched.startswith("# the home page\nholdout_share = 0.1 # keep\n")
    assert tomllib.loads(patched) == {
        "holdout_share": 0.1, "vw_args": "--cb_explore_adf --epsilon 0.3",
        "reward_window_seconds": 600.0, "rules": {},
    }  # fmt: skip
    multi_line = 'vw_args = """\n--cb_explore_adf\n"""\n'
    with pytest.raises(ConfigurationError):
        patch_policy_text(multi_line, {"vw_args": "--cb_explore_adf -q ::"})


def test_ranking_keeps_excluded_actions_in_place() -> None:
    row = {
        "candidates": [{"id": i} for i in "abcde"],
        "slots": [{"id": "d", "pmf": [["a", 0.1], ["c", 0.2], ["d", 0.6], ["e", 0.1]]}],
    }
    assert ranking(row) == [
        {"id": "d", "probability": 0.6},
        {"id": "b", "probability": 0.0},  # excluded: its own place, probability 0
        {"id": "c", "probability": 0.2},
        {"id": "a", "probability": 0.1},  # ties keep request order
        {"id": "e", "probability": 0.1},
    ]


def test_event_ids_map_to_stored_ids() -> None:
    assert internal_event_id("evt-1") == "evt-1"
    long = "x" * 200
    assert internal_event_id(long) == internal_event_id(long) != long
    assert len(internal_event_id("with space")) <= 128


def test_deep_nesting_is_refused_not_a_crash() -> None:
    value: dict[str, object] = {"a": 1}
    for _ in range(900):  # beyond Python's recursion limit if followed naively
        value = {"x": value}
    with pytest.raises(FeatureError, match="nested more than"):
        to_feature_map([{"ns": value}], "contextFeatures")


def test_log_retention_days_maps_onto_retention_days() -> None:
    from bandit_service.personalizer.configuration import ConfigurationError, policy_updates
    from bandit_service.policy import parse_policy

    policy = parse_policy("p", {"reward_window_seconds": 3600})
    assert policy_updates({"logRetentionDays": 30}, policy) == {"retention_days": 30.0}
    assert policy_updates({"logRetentionDays": -1}, policy) == {}  # forever: already 0
    kept = parse_policy("p", {"retention_days": 30})
    assert policy_updates({"logRetentionDays": -1}, kept) == {"retention_days": 0.0}
    for bad in (0, -2, 1.5, True, "30"):
        with pytest.raises(ConfigurationError, match="logRetentionDays"):
            policy_updates({"logRetentionDays": bad}, policy)
    short = parse_policy("p", {"reward_window_seconds": 3 * 86400})
    with pytest.raises(ConfigurationError, match="reward wait time"):
        policy_updates({"logRetentionDays": 2}, short)
