"""The Personalizer facade over plain HTTP, on SQLite and PostgreSQL: the v1.0 and
v1.1-preview.3 paths, the api-version rule, limits, and Personalizer's error bodies."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from bandit_service.app import create_app
from bandit_service.config import Settings

ACTIONS = [
    {"id": "a", "features": [{"topic": "sport"}]},
    {"id": "b", "features": [{"topic": "news"}]},
    {"id": "c", "features": [{"item": {"price": 9.5}}]},
]


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def error_of(response: Any, status: int) -> dict[str, Any]:
    """Personalizer's error body: exactly ``{"error": {"code", "message"[, "target"]}}``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert {"code", "message"} <= set(body["error"]) <= {"code", "message", "target"}
    assert response.headers["x-ms-error-code"] == body["error"]["code"]
    error: dict[str, Any] = body["error"]
    return error


def test_v1_0_rank_reward_activate(client: TestClient) -> None:
    response = client.post(
        "/personalizer/v1.0/rank",
        json={"contextFeatures": [{"device": "mobile"}], "actions": ACTIONS,
              "excludedActions": ["a"], "eventId": "v10-1", "deferActivation": True},
    )  # fmt: skip
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["ranking"][0] == {"id": "a", "probability": 0.0}
    assert body["ranking"][1]["id"] == body["rewardActionId"] != "a"
    activated = client.post("/personalizer/v1.0/events/v10-1/activate")
    assert activated.status_code == 204 and activated.content == b""
    rewarded = client.post("/personalizer/v1.0/events/v10-1/reward", json={"value": 0.7})
    assert rewarded.status_code == 204
    logged = client.get("/v1/decisions/v10-1").json()
    assert logged["deferred"] and logged["activated_at"] is not None
    assert logged["slots"][0]["reward"] == 0.7
    # Multi-slot arrived with v1.1: not part of v1.0.
    missing = client.post("/personalizer/v1.0/multislot/rank", json={})
    assert error_of(missing, 404)["code"] == "ResourceNotFound"


def test_v1_1_preview_3_multislot_and_configuration(client: TestClient) -> None:
    base = "/personalizer/v1.1-preview.3"
    response = client.post(
        f"{base}/multislot/rank",
        json={"actions": ACTIONS, "eventId": "v113-1",
              "slots": [{"id": "top", "baselineAction": "a", "excludedActions": ["b"]},
                        {"id": "bottom", "baselineAction": "b"}]},
    )  # fmt: skip
    assert response.status_code == 201, response.text
    slots = response.json()["slots"]
    assert [s["id"] for s in slots] == ["top", "bottom"] and slots[0]["rewardActionId"] != "b"
    rewarded = client.post(
        f"{base}/multislot/events/v113-1/reward",
        json={"reward": [{"slotId": "bottom", "value": 1}, {"slotId": "top", "value": 0}]},
    )
    assert rewarded.status_code == 204
    assert [s["reward"] for s in client.get("/v1/decisions/v113-1").json()["slots"]] == [0, 1]
    assert client.get(f"{base}/configurations/service").status_code == 200
    assert (
        client.get(f"{base}/configurations/policy")
        .json()["arguments"]
        .startswith("--cb_explore_adf")
    )


def test_api_version_query_is_required_on_unversioned_paths(client: TestClient) -> None:
    ok = client.post("/personalizer/rank?api-version=2022-09-01-preview", json={"actions": ACTIONS})
    assert ok.status_code == 201
    missing = client.post("/personalizer/rank", json={"actions": ACTIONS})
    assert "api-version" in error_of(missing, 400)["message"]
    wrong = client.post("/personalizer/rank?api-version=2019-01-01", json={"actions": ACTIONS})
    assert "2022-09-01-preview" in error_of(wrong, 400)["message"]


def test_long_event_ids_and_retries(client: TestClient) -> None:
    event_id = "user 42/visit#" + "x" * 242  # 256 characters, outside the native alphabet
    assert len(event_id) == 256
    first = client.post("/personalizer/v1.0/rank", json={"actions": ACTIONS, "eventId": event_id})
    assert first.status_code == 201 and first.json()["eventId"] == event_id
    # A retry (even with another body) gets the logged answer, not a new decision.
    again = client.post(
        "/personalizer/v1.0/rank", json={"actions": ACTIONS[::-1], "eventId": event_id}
    )
    assert again.json() == first.json()
    quoted = event_id.replace(" ", "%20").replace("/", "%2F").replace("#", "%23")
    assert (
        client.post(f"/personalizer/v1.0/events/{quoted}/reward", json={"value": 1}).status_code
        == 204
    )
    too_long = client.post(
        "/personalizer/v1.0/rank", json={"actions": ACTIONS, "eventId": "e" * 257}
    )
    assert error_of(too_long, 400)["code"] == "InvalidRankRequest"


BAD_RANK_REQUESTS: list[tuple[dict[str, Any], str | None]] = [
    ({}, "actions"),
    ({"actions": []}, "actions"),
    ({"actions": [{"id": "a"}, {"id": "a"}]}, None),  # duplicate ids
    ({"actions": ACTIONS, "excludedActions": ["a", "b", "c"]}, None),  # nothing left
    ({"actions": [{"id": "a", "features": [3]}]}, "actions[0].features[0]"),
    ({"actions": ACTIONS, "contextFeatures": [{"x": {"y": "z" * 2000}}]}, None),
    ({"actions": [{"id": 7, "features": []}]}, "actions[0].id"),
    ({"actions": ACTIONS, "deferActivation": "maybe"}, "deferActivation"),
]


def test_bad_rank_requests_are_400_in_personalizer_shape(client: TestClient) -> None:
    for body, target in BAD_RANK_REQUESTS:
        error = error_of(client.post("/personalizer/v1.0/rank", json=body), 400)
        assert error["code"] == "InvalidRankRequest", (body, error)
        if target is not None:
            assert error.get("target") == target, (body, error)


def test_other_error_bodies(client: TestClient) -> None:
    malformed = client.post(
        "/personalizer/v1.0/rank",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert error_of(malformed, 400)["code"] == "BadRequest"
    unknown = client.post("/personalizer/v1.0/events/nope/reward", json={"value": 1})
    assert error_of(unknown, 404)["code"] == "ResourceNotFound"
    client.post("/personalizer/v1.0/rank", json={"actions": ACTIONS, "eventId": "err-1"})
    out_of_bounds = client.post("/personalizer/v1.0/events/err-1/reward", json={"value": 5})
    assert error_of(out_of_bounds, 400)["code"] == "InvalidRewardRequest"
    no_value = client.post("/personalizer/v1.0/events/err-1/reward", json={})
    assert error_of(no_value, 400)["target"] == "value"
    bad_config = client.put(
        "/personalizer/v1.0/configurations/service", json={"rewardWaitTime": "ten minutes"}
    )
    assert error_of(bad_config, 400)["code"] == "InvalidServiceConfiguration"
    bad_policy = client.put("/personalizer/v1.0/configurations/policy", json={"name": "p"})
    assert error_of(bad_policy, 400)["code"] == "InvalidPolicyContract"
    assert (
        error_of(client.get("/personalizer/v1.0/nothing-here"), 404)["code"] == "ResourceNotFound"
    )
    # Native routes keep the native error shape (with the field).
    native = client.post("/v1/decisions", json={})
    assert native.status_code == 422 and native.json()["error"]["field"] == "candidates"


def test_api_keys_answer_in_personalizer_shape(settings: Settings) -> None:
    """The official clients send Ocp-Apim-Subscription-Key; refusals are Personalizer-shaped
    (401, 403 outside the key's scopes or policies, 400 over the key's action limit)."""
    import json

    from bandit_service.apikeys import create_key, make_entry

    raw = {name: create_key() for name in ("app", "reader", "other", "small")}
    entries = [
        make_entry(raw["app"], name="app", scopes=["decide"]),
        make_entry(raw["reader"], name="reader", scopes=["read"]),
        make_entry(raw["other"], name="other", scopes=["decide"], policies=["other"]),
        make_entry(raw["small"], name="small", scopes=["decide"], max_candidates=2),
    ]
    (settings.policies_dir / "other.toml").write_text(
        (settings.policies_dir / "default.toml").read_text()
    )
    keyed = settings.model_copy(
        update={"api_keys": json.dumps([e.model_dump(exclude_none=True) for e in entries])}
    )

    def key(name: str) -> dict[str, str]:
        return {"Ocp-Apim-Subscription-Key": raw[name]}

    rank = "/personalizer/v1.0/rank"
    with TestClient(create_app(keyed), raise_server_exceptions=False) as keyed_client:
        missing = keyed_client.post(rank, json={"actions": ACTIONS})
        assert error_of(missing, 401)["code"] == "Unauthorized"
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = keyed_client.post(rank, json={"actions": ACTIONS}, headers=key("reader"))
        assert "'decide'" in error_of(wrong, 403)["message"]
        elsewhere = keyed_client.post(rank, json={"actions": ACTIONS}, headers=key("other"))
        assert "'default'" in error_of(elsewhere, 403)["message"]
        too_many = keyed_client.post(rank, json={"actions": ACTIONS}, headers=key("small"))
        assert error_of(too_many, 400)["code"] == "InvalidRankRequest"
        ok = keyed_client.post(rank, json={"actions": ACTIONS[:2]}, headers=key("small"))
        assert ok.status_code == 201, ok.text
        config = "/personalizer/v1.0/configurations/service"
        assert keyed_client.get(config, headers=key("reader")).status_code == 200
        assert error_of(keyed_client.get(config, headers=key("app")), 403)["code"] == "Forbidden"


def test_apprentice_mode_shows_personalizer_baselines(client: TestClient) -> None:
    """learningMode Apprentice: the baseline (first non-excluded action; per slot its
    baselineAction) is shown with probability 1 while the model learns to imitate it."""
    base = "/personalizer/v1.1-preview.3"
    put = client.put(f"{base}/configurations/service", json={"learningMode": "Apprentice"})
    assert put.status_code == 200 and put.json()["learningMode"] == "Apprentice"
    single = client.post(f"{base}/rank", json={"actions": ACTIONS, "excludedActions": ["a"]})
    assert single.json()["rewardActionId"] == "b"
    assert single.json()["ranking"][1] == {"id": "b", "probability": 1.0}
    multi = client.post(
        f"{base}/multislot/rank",
        json={"actions": ACTIONS, "slots": [{"id": "s1", "baselineAction": "c"},
                                            {"id": "s2", "baselineAction": "a"}]},
    )  # fmt: skip
    assert [s["rewardActionId"] for s in multi.json()["slots"]] == ["c", "a"]


def test_routing_and_size_refusals_are_personalizer_shaped(client: TestClient) -> None:
    """Refusals made before the facade's routes run (size limit, unknown method) too."""
    huge = {"actions": [{"id": f"a{i}", "features": [{"x": "y" * 1000}]} for i in range(80)]}
    too_large = client.post("/personalizer/v1.0/rank", json=huge)
    assert error_of(too_large, 413)["code"] == "PayloadSizeExceeded"
    wrong_method = client.request("QUERY", "/personalizer/v1.0/rank")
    assert error_of(wrong_method, 405)["code"] == "BadRequest"
    native = client.request("QUERY", "/v1/decisions")
    assert native.status_code == 405 and native.json()["error"]["code"] == "method_not_allowed"


def test_lone_surrogates_in_feature_names_are_4xx_on_both_apis(client: TestClient) -> None:
    """A name that cannot be encoded must not break the error message naming it."""
    headers = {"content-type": "application/json"}
    facade = client.post(
        "/personalizer/v1.0/rank", headers=headers,
        content=b'{"actions":[{"id":"x","features":[{"\\ud800":1}]}]}',
    )  # fmt: skip
    assert "\\ud800" in error_of(facade, 400)["message"]
    native = client.post(
        "/v1/decisions", headers=headers,
        content=b'{"candidates":[{"id":"x"}],"context":{"\\ud800":1}}',
    )  # fmt: skip
    assert native.status_code == 422 and "\\ud800" in native.json()["error"]["message"]


def test_facade_events_of_another_policy_are_not_found(settings: Settings) -> None:
    """Event ids are shared with the native API: the facade only reaches its own policy's
    decisions, and a native decide cannot reuse another policy's event id."""
    (settings.policies_dir / "other.toml").write_text(
        (settings.policies_dir / "default.toml").read_text()
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        made = c.post("/v1/decisions", json={"policy": "other", "event_id": "evt-o",
                                             "candidates": [{"id": "a"}, {"id": "b"}]})  # fmt: skip
        assert made.status_code == 200
        for path, body in (("reward", {"value": 1}), ("activate", None)):
            refused = c.post(f"/personalizer/v1.0/events/evt-o/{path}", json=body)
            assert error_of(refused, 404)["code"] == "ResourceNotFound"
        reused = c.post("/v1/decisions", json={"event_id": "evt-o", "candidates": [{"id": "a"}]})
        assert reused.status_code == 409 and reused.json()["error"]["field"] == "event_id"
        assert "'other'" not in reused.json()["error"]["message"]  # not named
        ranked = c.post("/personalizer/v1.0/rank", json={"eventId": "evt-o", "actions": ACTIONS})
        assert error_of(ranked, 400)["code"] == "InvalidRankRequest"
        assert c.get("/v1/decisions/evt-o").json()["rewards"] == []


def test_configuration_changes_reach_retention_and_bad_vw_options_write_nothing(
    settings: Settings,
) -> None:
    base = "/personalizer/v1.1-preview.3/configurations"
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        service = c.app.state.service  # type: ignore[attr-defined]
        config = c.get(f"{base}/service").json()
        assert c.put(f"{base}/service", json={**config, "logRetentionDays": 30}).status_code == 200
        assert service.retention.policies["default"].retention_days == 30
        before = (settings.policies_dir / "default.toml").read_text()
        bogus = c.put(f"{base}/policy", json={"name": "x", "arguments":
                                             "--cb_explore_adf --bogus_flag"})  # fmt: skip
        assert "bogus_flag" in error_of(bogus, 400)["message"]
        assert (settings.policies_dir / "default.toml").read_text() == before
