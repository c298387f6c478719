"""The HTTP contract, on SQLite and PostgreSQL: decide, reward, read back, and bad input."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from bandit_service.app import create_app
from bandit_service.config import Settings
from bandit_service.store.database import make_engine

CANDIDATES = [
    {"id": "a", "features": {"topic": "sport", "age": 3}},
    {"id": "b", "features": {"topic": "news", "tags": ["x", "y"]}},
    {"id": "c", "features": {"item": {"price": 9.5, "new": True}}},
]


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def decide(client: TestClient, **body: Any) -> dict[str, Any]:
    body.setdefault("candidates", CANDIDATES)
    response = client.post("/v1/decisions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_decide_reward_and_read_back(client: TestClient, settings: Settings) -> None:
    decision = decide(
        client, user_id="user-1", context={"device": "mobile"}, slots=2, event_id="evt-1"
    )
    assert decision["event_id"] == "evt-1"
    assert decision["arm"] == "bandit" and decision["policy"] == "default"
    assert [s["slot"] for s in decision["slots"]] == [0, 1]
    shown = [s["id"] for s in decision["slots"]]
    assert len(set(shown)) == 2 and set(shown) <= {"a", "b", "c"}
    for slot in decision["slots"]:
        assert 0 < slot["probability"] <= 1

    r1 = client.post("/v1/decisions/evt-1/rewards", json={"value": 1, "slot": 1})
    assert r1.status_code == 201, r1.text
    assert r1.json()["id"] == shown[1] and r1.json()["late"] is False
    r2 = client.post("/v1/decisions/evt-1/rewards", json={"value": 0.5, "id": shown[1]})
    assert r2.status_code == 201
    r3 = client.post("/v1/decisions/evt-1/rewards", json={"value": -1})  # slot 0 by default
    assert r3.json()["slot"] == 0

    logged = client.get("/v1/decisions/evt-1").json()
    assert logged["context"] == {"device": "mobile"}
    assert logged["candidates"] == CANDIDATES
    assert [s["id"] for s in logged["slots"]] == shown
    assert logged["slots"][1]["reward"] == 1.5  # default policy aggregates by sum
    assert logged["slots"][0]["reward"] == -1.0
    assert len(logged["rewards"]) == 3
    for slot in logged["slots"]:
        pmf = {p["id"]: p["probability"] for p in slot["pmf"]}
        assert pmf[slot["id"]] == slot["probability"]
        assert sum(pmf.values()) == pytest.approx(1.0)
    assert logged["user_key"] and logged["user_key"] != "user-1"

    engine = make_engine(settings.database_url)
    with engine.connect() as connection:  # the raw user id is stored nowhere
        rows = connection.execute(text("SELECT * FROM decisions")).all()
    engine.dispose()
    assert "user-1" not in repr(rows)


def test_same_event_id_returns_the_same_decision(client: TestClient, settings: Settings) -> None:
    first = decide(client, event_id="same", slots=2)
    for _ in range(3):
        assert decide(client, event_id="same", slots=2) == first
    # Even with a different body the logged decision stands: an event happens once.
    assert decide(client, event_id="same", candidates=CANDIDATES[:2], slots=1) == first
    engine = make_engine(settings.database_url)
    with engine.connect() as connection:
        count = connection.execute(
            text("SELECT count(*) FROM decisions WHERE event_id = 'same'")
        ).scalar()
    engine.dispose()
    assert count == 1


def test_pmf_on_request_and_slot_objects(client: TestClient) -> None:
    slots = [{"id": "hero", "features": {"size": "l"}}, {"id": "side"}]
    decision = client.post(
        "/v1/decisions?include=pmf", json={"candidates": CANDIDATES, "slots": slots}
    ).json()
    assert [s["slot_id"] for s in decision["slots"]] == ["hero", "side"]
    first, second = decision["slots"]
    assert len(first["pmf"]) == 3 and len(second["pmf"]) == 2
    assert first["id"] not in {p["id"] for p in second["pmf"]}
    assert "pmf" not in decide(client)["slots"][0]


def test_policy_default_slots_and_exclusions(client: TestClient) -> None:
    decision = decide(client, policy="bounded", excluded=["a"])
    assert len(decision["slots"]) == 2  # the policy's default slot count
    assert {s["id"] for s in decision["slots"]} == {"b", "c"}


def test_deferred_activation(client: TestClient) -> None:
    decision = decide(client, defer=True)
    event = decision["event_id"]
    assert decision["deferred"] is True
    assert client.get(f"/v1/decisions/{event}").json()["activated_at"] is None
    response = client.post(f"/v1/decisions/{event}/activate")
    assert response.status_code == 200
    activated = response.json()["activated_at"]
    assert activated is not None
    assert client.post(f"/v1/decisions/{event}/activate").json()["activated_at"] == activated
    assert client.get(f"/v1/decisions/{event}").json()["activated_at"] == activated
    assert client.post("/v1/decisions/nope/activate").status_code == 404


def test_health_readiness_and_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["ready"] is True
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/decisions"]["post"]["requestBody"]
    assert body and "examples" in str(spec["components"]["schemas"]["DecisionIn"])
    assert client.get("/v1/policies/bounded").json()["policy"]["reward_aggregation"] == "last"


def test_readyz_is_false_before_migrations(empty_database_url: str, policies_dir: Any) -> None:
    settings = Settings(database_url=empty_database_url, policies_dir=policies_dir)
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["ready"] is False


def test_late_reward_is_stored_and_flagged(client: TestClient, settings: Settings) -> None:
    event = decide(client, policy="bounded")["event_id"]
    engine = make_engine(settings.database_url)
    with engine.begin() as connection:  # pretend the decision is two minutes old
        connection.execute(
            text("UPDATE decisions SET created_at = created_at - 120 WHERE event_id = :e"),
            {"e": event},
        )
    engine.dispose()
    response = client.post(f"/v1/decisions/{event}/rewards", json={"value": 1})
    assert response.status_code == 201 and response.json()["late"] is True
    logged = client.get(f"/v1/decisions/{event}").json()
    assert logged["rewards"][0]["late"] is True
    assert logged["slots"][0]["reward"] is None  # late rewards do not count


BIG = "x" * 70_000
BAD_DECISIONS: list[tuple[str, Any, int, str, str]] = [
    # (case, body, status, error code, field)
    ("malformed json", b'{"candidates": [', 400, "malformed_json", "body"),
    ("not an object", b"[1, 2]", 422, "invalid_request", "body"),
    ("empty body", b"", 422, "invalid_request", "body"),
    ("missing candidates", {}, 422, "invalid_request", "candidates"),
    ("empty candidates", {"candidates": []}, 422, "invalid_request", "candidates"),
    (
        "candidate without id",
        {"candidates": [{"features": {}}]},
        422,
        "invalid_request",
        "candidates[0].id",
    ),
    (
        "numeric candidate id",
        {"candidates": [{"id": 5}]},
        422,
        "invalid_request",
        "candidates[0].id",
    ),
    (
        "duplicate ids",
        {"candidates": [{"id": "a"}, {"id": "b"}, {"id": "a"}]},
        422,
        "invalid_request",
        "candidates[2].id",
    ),
    (
        "more slots than candidates",
        {"candidates": [{"id": "a"}], "slots": 2},
        422,
        "invalid_request",
        "slots",
    ),
    (
        "more slots than eligible",
        {"candidates": CANDIDATES, "slots": 2, "excluded": ["a", "b"]},
        422,
        "invalid_request",
        "slots",
    ),
    ("zero slots", {"candidates": CANDIDATES, "slots": 0}, 422, "invalid_request", "slots"),
    ("empty slot list", {"candidates": CANDIDATES, "slots": []}, 422, "invalid_request", "slots"),
    (
        "duplicate slot ids",
        {"candidates": CANDIDATES, "slots": [{"id": "x"}, {"id": "x"}]},
        422,
        "invalid_request",
        "slots",
    ),
    (
        "unknown policy",
        {"policy": "nope", "candidates": CANDIDATES},
        422,
        "unknown_policy",
        "policy",
    ),
    (
        "NaN feature",
        b'{"candidates": [{"id": "a", "features": {"x": NaN}}]}',
        422,
        "invalid_request",
        "candidates[0].features.x",
    ),
    (
        "infinite feature",
        b'{"candidates": [{"id": "a", "features": {"x": Infinity}}]}',
        422,
        "invalid_request",
        "candidates[0].features.x",
    ),
    (
        "overflowing feature",
        b'{"candidates": [{"id": "a", "features": {"x": 1e400}}]}',
        422,
        "invalid_request",
        "candidates[0].features.x",
    ),
    (
        "huge feature",
        {"candidates": [{"id": "a", "features": {"x": 10**30}}]},
        422,
        "invalid_request",
        "candidates[0].features.x",
    ),
    (
        "null feature",
        {"candidates": [{"id": "a", "features": {"x": None}}]},
        422,
        "invalid_request",
        "candidates[0].features.x",
    ),
    (
        "object in list",
        {"candidates": [{"id": "a", "features": {"x": [{"y": 1}]}}]},
        422,
        "invalid_request",
        "candidates[0].features.x[0]",
    ),
    (
        "numbers in list",
        {"context": {"x": [1, 2]}, "candidates": CANDIDATES},
        422,
        "invalid_request",
        "context.x[0]",
    ),
    (
        "two-level nesting",
        {"context": {"u": {"v": {"w": 1}}}, "candidates": CANDIDATES},
        422,
        "invalid_request",
        "context.u.v",
    ),
    (
        "bad namespace name",
        {"context": {"a b": {"w": 1}}, "candidates": CANDIDATES},
        422,
        "invalid_request",
        "context.a b",
    ),
    (
        "features not an object",
        {"candidates": [{"id": "a", "features": [1]}]},
        422,
        "invalid_request",
        "candidates[0].features",
    ),
    ("unknown field", {"candidates": CANDIDATES, "slot": 1}, 422, "invalid_request", "slot"),
    (
        "bad event id",
        {"candidates": CANDIDATES, "event_id": "a b"},
        422,
        "invalid_request",
        "event_id",
    ),
    (
        "defer not a bool",
        {"candidates": CANDIDATES, "defer": "yes"},
        422,
        "invalid_request",
        "defer",
    ),
    (
        "too large",
        {"candidates": [{"id": "a", "features": {"x": BIG}}]},
        413,
        "payload_too_large",
        "body",
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_DECISIONS],
)
def test_bad_decision_requests(
    client: TestClient, body: Any, status: int, code: str, field: str
) -> None:
    if isinstance(body, bytes):
        response = client.post(
            "/v1/decisions", content=body, headers={"content-type": "application/json"}
        )
    else:
        response = client.post("/v1/decisions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["field"] == field
    assert error["message"]
    assert "Traceback" not in response.text


def test_too_many_candidates(settings: Settings) -> None:
    limited = settings.model_copy(update={"max_candidates": 2})
    with TestClient(create_app(limited)) as client:
        response = client.post("/v1/decisions", json={"candidates": CANDIDATES})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "candidates"


BAD_REWARDS: list[tuple[str, str, Any, int, str]] = [
    ("unknown event", "missing", {"value": 1}, 404, "event_id"),
    ("above bounds", "{event}", {"value": 2}, 422, "value"),
    ("below bounds", "{event}", {"value": -0.5}, 422, "value"),
    ("no value", "{event}", {"slot": 0}, 422, "value"),
    ("string value", "{event}", {"value": "1"}, 422, "value"),
    ("NaN value", "{event}", b'{"value": NaN}', 422, "value"),
    ("slot out of range", "{event}", {"value": 1, "slot": 5}, 422, "slot"),
    ("negative slot", "{event}", {"value": 1, "slot": -1}, 422, "slot"),
    ("id not shown", "{event}", {"value": 1, "id": "zzz"}, 422, "id"),
    ("malformed", "{event}", b"{value", 400, "body"),
]


@pytest.mark.parametrize(
    ("event", "body", "status", "field"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REWARDS],
)
def test_bad_rewards(client: TestClient, event: str, body: Any, status: int, field: str) -> None:
    event_id = decide(client, policy="bounded")["event_id"]  # bounds [0, 1], 2 slots
    url = f"/v1/decisions/{event.format(event=event_id)}/rewards"
    if isinstance(body, bytes):
        response = client.post(url, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(url, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field


def test_unknown_routes_and_decisions_are_json_404(client: TestClient) -> None:
    for path in ("/v1/decisions/unknown", "/nope", "/v1/decisions/ab%00c", "/v1/decisions/%F0"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    for path in ("/v1/decisions/%00/rewards", "/v1/decisions/a%20b/activate"):
        response = client.post(path, json={"value": 1})
        assert response.status_code == 404, response.text


RULED_POLICY = """
holdout_share = 0
vw_args = "--cb_explore_adf --epsilon 0.3"

[rules]
exclude_if = [{feature = "in_stock", equals = false}]
pins = [{id = "promo", slot = 0}]
max_per_value = [{feature = "category", max = 1}]
boosts = [{feature = "category", equals = "news", factor = 2.0}]
exploration_positions = [2]
"""


def test_rules_over_http(settings: Settings, policies_dir: Any) -> None:
    (policies_dir / "ruled.toml").write_text(RULED_POLICY)
    candidates = [
        {"id": "promo", "features": {"category": "ads"}},
        {"id": "n1", "features": {"category": "news"}},
        {"id": "n2", "features": {"category": "news"}},
        {"id": "s1", "features": {"category": "sport"}},
        {"id": "gone", "features": {"category": "food", "in_stock": False}},
        {"id": "f1", "features": {"category": "food"}},
    ]
    with TestClient(create_app(settings)) as client:
        for _i in range(30):
            response = client.post(
                "/v1/decisions?include=pmf",
                json={"policy": "ruled", "candidates": candidates, "slots": 3},
            )
            assert response.status_code == 200, response.text
            slots = response.json()["slots"]
            assert slots[0]["id"] == "promo" and slots[0]["probability"] == 1.0
            assert not slots[0]["explored"] and slots[2]["explored"]
            shown = [s["id"] for s in slots]
            assert "gone" not in shown and not {"n1", "n2"} <= set(shown)
        too_many = client.post(
            "/v1/decisions", json={"policy": "ruled", "candidates": candidates, "slots": 5}
        )
        assert too_many.status_code == 422
        assert too_many.json()["error"]["field"] == "slots[1]"
        assert "no eligible candidate" in too_many.json()["error"]["message"]


def test_off_policy_estimates_over_http(client: TestClient) -> None:
    for i in range(60):
        event = decide(client, event_id=f"ope-{i}")["event_id"]
        if i % 3 == 0:
            client.post(f"/v1/decisions/{event}/rewards", json={"value": 1})
    response = client.get("/v1/policies/default/ope?target=uniform&target=logging&replicates=50")
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["log"]["rows"] == 60
    assert [r["target"] for r in report["results"]] == ["uniform", "logging"]
    logging_ips = report["results"][1]["estimates"][0]
    assert logging_ips["estimator"] == "IPS" and logging_ips["value"] == pytest.approx(20 / 60)
    bad = client.get("/v1/policies/default/ope?target=nonsense")
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "target"
    vw_bad = client.get("/v1/policies/default/ope?target=vw:--cb_explore_adf%20--nonsense_flag")
    assert vw_bad.status_code == 422
    assert client.get("/v1/policies/nope/ope").status_code == 404
