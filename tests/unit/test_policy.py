from __future__ import annotations

from pathlib import Path

import pytest

from bandit_service.policy import PolicyError, load_policies, load_policy_file, parse_policy

REPO = Path(__file__).resolve().parents[2]


def test_shipped_policies_load() -> None:
    policies = load_policies(REPO / "policies")
    assert "default" in policies
    assert policies["default"].reward_aggregation == "sum"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"reward_windw_seconds": 5}, "unknown key"),
        ({"slots": 0}, "slots"),
        ({"slots": "3"}, "slots"),
        ({"reward_min": 1, "reward_max": 0}, "reward_min"),
        ({"default_reward": 5}, "default_reward"),
        ({"reward_aggregation": "mean"}, "reward_aggregation"),
        ({"vw_args": "--cb_adf"}, "--cb_explore_adf"),
        ({"vw_args": "--cb_explore_adf -f /tmp/model"}, "-f"),
        ({"vw_args": "--cb_explore_adf --data=/etc/passwd"}, "--data"),
        ({"vw_args": "--cb_explore_adf '"}, "cannot be parsed"),
        ({"reward_window_seconds": 0}, "reward_window_seconds"),
        ({"reward_min": True}, "number"),
    ],
)
def test_invalid_policies_are_refused_with_the_key_named(raw: dict, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy("p", raw)


def test_bad_policy_name() -> None:
    with pytest.raises(PolicyError, match="policy name"):
        parse_policy("bad name", {})


def test_version_follows_configuration_not_formatting(tmp_path: Path) -> None:
    a = tmp_path / "a.toml"
    a.write_text("slots = 2\n")
    b = tmp_path / "b" / "a.toml"
    b.parent.mkdir()
    b.write_text("# a comment\nslots   =   2\n")
    assert load_policy_file(a).version == load_policy_file(b).version
    a.write_text("slots = 3\n")
    assert load_policy_file(a).version != load_policy_file(b).version


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "x.toml").write_text("slots = = 2")
    with pytest.raises(PolicyError, match=r"x\.toml"):
        load_policies(tmp_path)


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no"):
        load_policies(tmp_path)


def test_keys_added_later_change_the_version_only_away_from_their_default() -> None:
    """Upgrading the service must not turn an unchanged policy file into a new version."""
    plain = parse_policy("p", {})
    for key, value in (
        ("retention_days", 30),
        ("allow_identifier_features", True),
        ("model_update_seconds", 60),
    ):
        explicit_default = parse_policy("p", {key: getattr(plain, key)})
        assert explicit_default.version == plain.version, key
        assert parse_policy("p", {key: value}).version != plain.version, key
