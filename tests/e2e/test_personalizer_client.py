"""The official ``azure-ai-personalizer`` client (PyPI, 1.0.0b1) against a live server.

The client is used exactly as a Personalizer user's application uses it: endpoint + key,
``rank``/``reward``/``activate``, multi-slot, and the administration client's
configuration calls. What it did is then checked through the native API, so facade
traffic is shown to be logged like native traffic.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from azure.ai.personalizer import PersonalizerAdministrationClient, PersonalizerClient
from azure.core.credentials import AzureKeyCredential
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from bandit_service.config import Settings
from bandit_service.store.database import upgrade
from tests.e2e.personalizer_server import live_server

POLICY = 'holdout_share = 0\nvw_args = "--cb_explore_adf --epsilon 0.2 -q ::"\n'
ACTIONS = [
    {"id": "news", "features": [{"topic": "politics", "length": 3}]},
    {"id": "sports", "features": [{"topic": "football"}, {"meta": {"live": True}}]},
    {"id": "food", "features": [{"topic": "cooking", "tags": ["vegan", "quick"]}]},
    {"id": "travel", "features": [{"topic": "travel"}]},
]
CONTEXT = [{"user": {"segment": "commuter", "latLong": [47.6, -122.1]}}, {"device": "mobile"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("personalizer")
    policies = root / "policies"
    policies.mkdir()
    (policies / "default.toml").write_text(POLICY)
    url = f"sqlite:///{root / 'bandit.db'}"
    upgrade(url)
    with live_server(Settings(database_url=url, policies_dir=policies)) as base:
        yield base, policies


@pytest.fixture
def client(server: tuple[str, Path]) -> PersonalizerClient:
    return PersonalizerClient(server[0], AzureKeyCredential("any-key"))


@pytest.fixture
def admin(server: tuple[str, Path]) -> PersonalizerAdministrationClient:
    return PersonalizerAdministrationClient(server[0], AzureKeyCredential("any-key"))


def native(server: tuple[str, Path], event_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server[0]}/v1/decisions/{event_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_single_slot_rank_with_exclusions_then_reward(
    client: PersonalizerClient, server: tuple[str, Path]
) -> None:
    request = {
        "contextFeatures": CONTEXT,
        "actions": ACTIONS,
        "excludedActions": ["sports", "travel"],
        "eventId": "single-1",
    }
    result = client.rank(request)
    assert result["eventId"] == "single-1"
    ranking = result["ranking"]
    # Excluded actions stay at their request positions (1 and 3) with probability 0.
    assert [ranking[1], ranking[3]] == [
        {"id": "sports", "probability": 0.0},
        {"id": "travel", "probability": 0.0},
    ]
    # The other positions hold the eligible actions, the chosen one first.
    assert {ranking[0]["id"], ranking[2]["id"]} == {"news", "food"}
    assert ranking[0]["id"] == result["rewardActionId"]
    assert ranking[0]["probability"] + ranking[2]["probability"] == pytest.approx(1.0)
    assert ranking[0]["probability"] >= ranking[2]["probability"] > 0  # epsilon 0.2: 0.9/0.1

    assert client.rank(request) == result  # a client retry gets the same answer

    client.reward("single-1", {"value": 1.0})
    logged = native(server, "single-1")
    assert logged["policy"] == "default" and logged["arm"] == "bandit"
    assert logged["excluded"] == ["sports", "travel"]
    assert logged["context"] == {
        "user": {"segment": "commuter", "latLong.0": 47.6, "latLong.1": -122.1},
        "device": "mobile",
    }
    assert logged["slots"][0]["id"] == result["rewardActionId"]
    assert logged["slots"][0]["reward"] == 1.0


def test_generated_event_id_and_unknown_event(client: PersonalizerClient) -> None:
    result = client.rank({"contextFeatures": CONTEXT, "actions": ACTIONS})
    assert len(result["eventId"]) >= 16
    client.reward(result["eventId"], {"value": 0.5})
    with pytest.raises(ResourceNotFoundError):
        client.reward("never-ranked", {"value": 1.0})


def test_deferred_rank_then_activate(client: PersonalizerClient, server: tuple[str, Path]) -> None:
    result = client.rank(
        {
            "contextFeatures": CONTEXT,
            "actions": ACTIONS,
            "eventId": "deferred-1",
            "deferActivation": True,
        }
    )
    before = native(server, "deferred-1")
    assert before["deferred"] is True and before["activated_at"] is None
    client.activate("deferred-1")
    after = native(server, "deferred-1")
    assert after["activated_at"] is not None
    client.reward("deferred-1", {"value": 1.0})
    assert native(server, "deferred-1")["slots"][0]["id"] == result["rewardActionId"]


def test_multi_slot_rank_and_rewards_per_slot(
    client: PersonalizerClient, server: tuple[str, Path]
) -> None:
    slots = [
        {"id": "hero", "features": [{"size": "large"}], "excludedActions": ["news"],
         "baselineAction": "sports"},
        {"id": "sidebar", "features": [{"size": "small"}], "baselineAction": "news"},
    ]  # fmt: skip
    for i in range(12):  # the per-slot exclusion holds on every draw, not by luck
        answer = client.rank_multi_slot(
            {
                "contextFeatures": CONTEXT,
                "actions": ACTIONS,
                "slots": slots,
                "eventId": f"multi-{i}",
            }
        )
        assert answer["eventId"] == f"multi-{i}"
        assert [s["id"] for s in answer["slots"]] == ["hero", "sidebar"]
        chosen = [s["rewardActionId"] for s in answer["slots"]]
        assert chosen[0] != "news" and len(set(chosen)) == 2

    client.reward_multi_slot("multi-0", {"reward": [{"slotId": "hero", "value": 1.0}]})
    client.reward_multi_slot("multi-0", {"reward": [{"slotId": "sidebar", "value": 0.5}]})
    client.activate_multi_slot("multi-0")
    logged = native(server, "multi-0")
    assert [s["slot_id"] for s in logged["slots"]] == ["hero", "sidebar"]
    assert [s["reward"] for s in logged["slots"]] == [1.0, 0.5]
    assert logged["slots"][0]["slot_features"] == {"size": "large"}

    with pytest.raises(HttpResponseError) as bad:
        client.reward_multi_slot("multi-0", {"reward": [{"slotId": "footer", "value": 1}]})
    assert bad.value.status_code == 400
    assert bad.value.error is not None and bad.value.error.code == "InvalidRewardRequest"


def test_configuration_read_and_update(
    admin: PersonalizerAdministrationClient,
    client: PersonalizerClient,
    server: tuple[str, Path],
) -> None:
    base, policies = server
    config = admin.get_service_configuration()
    assert config["explorationPercentage"] == pytest.approx(0.2)
    assert config["rewardWaitTime"] == "PT1H" and config["learningMode"] == "Online"
    before = httpx.get(f"{base}/v1/policies/default").json()

    config.update(explorationPercentage=0.3, rewardWaitTime="PT10M", defaultReward=0.1,
                  rewardAggregation="earliest", logRetentionDays=30,
                  modelExportFrequency="PT1M")  # fmt: skip
    updated = admin.update_service_configuration(config)
    assert updated["explorationPercentage"] == pytest.approx(0.3)
    assert updated["rewardWaitTime"] == "PT10M" and updated["rewardAggregation"] == "earliest"
    assert updated["logRetentionDays"] == 30 and updated["modelExportFrequency"] == "PT1M"
    assert updated["lastConfigurationEditDate"] is not None
    assert admin.get_service_configuration() == updated

    # Persisted in the policy file, applied at once, as a new version of the same lineage.
    written = tomllib.loads((policies / "default.toml").read_text())
    assert written["reward_window_seconds"] == 600 and written["reward_aggregation"] == "first"
    assert "--epsilon 0.3" in written["vw_args"] and written["holdout_share"] == 0
    assert written["model_update_seconds"] == 60  # modelExportFrequency PT1M
    assert written["retention_days"] == 30  # logRetentionDays
    after = httpx.get(f"{base}/v1/policies/default").json()
    assert after["policy"]["version"] != before["policy"]["version"]
    assert after["model"]["model_key"] == before["model"]["model_key"]  # exploration only
    event = client.rank({"actions": ACTIONS, "eventId": "after-config"})["eventId"]
    assert native(server, event)["policy_version"] == after["policy"]["version"]

    with pytest.raises(HttpResponseError) as bad:
        admin.update_service_configuration({**updated, "explorationPercentage": 2})
    assert bad.value.status_code == 400
    assert bad.value.error is not None and bad.value.error.code == "InvalidServiceConfiguration"
    assert tomllib.loads((policies / "default.toml").read_text()) == written  # untouched

    # Learning settings: arguments are the policy's vw_args; a new lineage starts.
    assert admin.get_policy()["arguments"] == written["vw_args"]
    changed = admin.update_policy({"name": "custom", "arguments": "--cb_explore_adf "
                                   "--epsilon 0.3 -q ua -q da"})  # fmt: skip
    assert changed == {"name": "custom", "arguments": "--cb_explore_adf --epsilon 0.3 -q ua -q da"}
    lineage = httpx.get(f"{base}/v1/policies/default").json()["model"]["model_key"]
    assert lineage != after["model"]["model_key"]
    with pytest.raises(HttpResponseError) as refused:
        admin.update_policy({"name": "x", "arguments": "--cb_explore_adf -f /tmp/model"})
    assert refused.value.status_code == 400
    reset = admin.reset_policy()
    assert reset["arguments"].startswith("--cb_explore_adf --epsilon 0.3")
    assert admin.get_service_configuration()["explorationPercentage"] == pytest.approx(0.3)
