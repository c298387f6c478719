"""The candidate catalog over HTTP, on SQLite and PostgreSQL: CRUD, versions, decisions by
``candidate_ids`` or over the whole catalog, what is logged, and bad input."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from bandit_service.apikeys import create_key, make_entry
from bandit_service.app import create_app
from bandit_service.catalog import MAX_BATCH_ITEMS
from bandit_service.config import Settings

ITEMS = [
    {"id": "a", "features": {"topic": "sport", "age": 3}},
    {"id": "b", "features": {"topic": "news", "tags": ["x", "y"]}},
    {"id": "c", "features": {"item": {"price": 9.5, "new": True}}},
]
BASE = "/v1/policies/default/catalog"


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def ok(response: Any, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


def error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    assert body["message"]
    return body


def test_crud_versions_and_pages(client: TestClient) -> None:
    assert ok(client.get(BASE)) == {
        "policy": "default", "version": 0, "updated_at": None, "items": 0,
        "serving_version": 0, "serving_items": 0,
    }  # fmt: skip
    first = ok(client.post(f"{BASE}/items", json={"items": ITEMS}))
    assert (first["version"], first["items"], first["written"]) == (1, 3, 3)
    assert ok(client.get(f"{BASE}/items/b"))["features"] == ITEMS[1]["features"]

    # Upsert: b changes, d is new, a and c stay.
    changed = [{"id": "b", "features": {"topic": "weather"}}, {"id": "d"}]
    second = ok(client.post(f"{BASE}/items", json={"items": changed}))
    assert (second["version"], second["items"]) == (2, 4)
    item = ok(client.get(f"{BASE}/items/b"))
    assert item["features"] == {"topic": "weather"} and item["version"] == 2
    assert ok(client.get(f"{BASE}/items/d"))["features"] == {}

    # Pages in id order.
    page = ok(client.get(f"{BASE}/items", params={"limit": 3}))
    assert [i["id"] for i in page["items"]] == ["a", "b", "c"] and page["next"] == "c"
    rest = ok(client.get(f"{BASE}/items", params={"limit": 3, "after": page["next"]}))
    assert [i["id"] for i in rest["items"]] == ["d"] and rest["next"] is None

    # Delete one; deleting it again is a 404 and does not make a version.
    assert ok(client.delete(f"{BASE}/items/a"))["version"] == 3
    error(client.delete(f"{BASE}/items/a"), 404)
    error(client.get(f"{BASE}/items/a"), 404)
    status = ok(client.get(BASE))
    assert (status["version"], status["items"]) == (3, 3)
    assert (status["serving_version"], status["serving_items"]) == (3, 3)  # served at once

    # Replace: only the named items remain; a removed id may come back later.
    replaced = ok(client.put(f"{BASE}/items", json={"items": [ITEMS[0]]}))
    assert (replaced["version"], replaced["items"], replaced["removed"]) == (4, 1, 3)
    assert [i["id"] for i in ok(client.get(f"{BASE}/items"))["items"]] == ["a"]

    # Clear.
    cleared = ok(client.delete(f"{BASE}/items"))
    assert (cleared["version"], cleared["items"], cleared["removed"]) == (5, 0, 1)
    assert ok(client.get(f"{BASE}/items"))["items"] == []
    # Catalogs are per policy.
    assert ok(client.get("/v1/policies/bounded/catalog"))["version"] == 0


def test_decide_by_ids_logs_the_catalog_features_of_that_moment(client: TestClient) -> None:
    ok(client.post(f"{BASE}/items", json={"items": ITEMS}))
    decision = ok(
        client.post(
            "/v1/decisions",
            json={"candidate_ids": ["c", "a"], "event_id": "e-1", "context": {"u": 1}},
        )
    )
    assert decision["slots"][0]["id"] in {"a", "c"}
    logged = ok(client.get("/v1/decisions/e-1"))
    assert logged["candidates"] == [ITEMS[2], ITEMS[0]]  # the given order, with features
    assert [p["id"] for p in logged["slots"][0]["pmf"]] == ["c", "a"]

    # A change is served at once by this process, and only later decisions log it.
    ok(client.post(f"{BASE}/items", json={"items": [{"id": "a", "features": {"age": 4}}]}))
    ok(client.post("/v1/decisions", json={"candidate_ids": ["c", "a"], "event_id": "e-2"}))
    assert ok(client.get("/v1/decisions/e-2"))["candidates"][1] == {
        "id": "a",
        "features": {"age": 4},
    }
    assert ok(client.get("/v1/decisions/e-1"))["candidates"] == [ITEMS[2], ITEMS[0]]

    # Rewards work as for inline decisions.
    chosen = decision["slots"][0]["id"]
    reward = ok(client.post("/v1/decisions/e-1/rewards", json={"value": 1}), 201)
    assert reward["id"] == chosen
    # Explanations read the logged features, as for inline decisions.
    explained = ok(client.get("/v1/decisions/e-1/explanation"))
    assert explained["slots"][0]["id"] == chosen


def test_whole_catalog_and_inline_requests(client: TestClient) -> None:
    error_body = error(client.post("/v1/decisions", json={}), 422)
    assert "empty catalog" in error_body["message"] and error_body["field"] == "candidates"

    ok(client.post(f"{BASE}/items", json={"items": list(reversed(ITEMS))}))
    ok(client.post("/v1/decisions", json={"event_id": "all", "slots": 2}))
    logged = ok(client.get("/v1/decisions/all"))
    assert logged["candidates"] == ITEMS  # the whole catalog, in id order

    # Inline candidates are unchanged, and an inline decision over the same items is
    # logged in exactly the same shape.
    ok(client.post("/v1/decisions", json={"candidates": ITEMS, "event_id": "inline"}))
    assert ok(client.get("/v1/decisions/inline"))["candidates"] == ITEMS


@pytest.mark.parametrize(
    ("body", "status", "field", "words"),
    [
        ({"candidate_ids": ["a", "zz"]}, 422, "candidate_ids[1]", "'zz' is not in"),
        ({"candidate_ids": ["a", "a"]}, 422, "candidate_ids[1]", "named twice"),
        ({"candidate_ids": []}, 422, "candidate_ids", "at least one"),
        ({"candidate_ids": ["a"], "candidates": ITEMS}, 422, "candidate_ids", "not both"),
        ({"candidate_ids": ["a"], "policy": "nope"}, 422, "policy", "unknown policy"),
        ({"candidate_ids": [""]}, 422, None, ""),
    ],
)
def test_bad_decision_requests(
    client: TestClient, body: dict[str, Any], status: int, field: str | None, words: str
) -> None:
    ok(client.post(f"{BASE}/items", json={"items": ITEMS}))
    found = error(client.post("/v1/decisions", json=body), status)
    if field is not None:
        assert found["field"] == field and words in found["message"]


def test_bad_catalog_changes(client: TestClient) -> None:
    error(client.post("/v1/policies/nope/catalog/items", json={"items": ITEMS}), 404)
    error(client.get("/v1/policies/nope/catalog/items"), 404)
    assert error(client.post(f"{BASE}/items", json={"items": []}), 422)["field"] == "items"
    twice = error(client.post(f"{BASE}/items", json={"items": [ITEMS[0], ITEMS[0]]}), 422)
    assert twice["field"] == "items[1].id"
    bad_feature = {"items": [{"id": "x", "features": {"f": float("nan")}}]}
    assert client.post(f"{BASE}/items", content=str(bad_feature)).status_code in (400, 422)
    nested = {"items": [{"id": "x", "features": {"ns": {"deep": {"x": 1}}}}]}
    assert "nesting" in error(client.post(f"{BASE}/items", json=nested), 422)["message"]
    email = {"items": [ITEMS[0], {"id": "x", "features": {"owner": "ann@example.com"}}]}
    found = error(client.post(f"{BASE}/items", json=email), 422)
    assert found["field"].startswith("items[1].features") and "identifier" in found["message"]
    many = {"items": [{"id": f"i{n}"} for n in range(MAX_BATCH_ITEMS + 1)]}
    assert error(client.post(f"{BASE}/items", json=many), 422)["field"].startswith("items")
    # None of these changed anything.
    assert ok(client.get(BASE))["version"] == 0
    error(client.get(f"{BASE}/items/{'x' * 300}"), 422)
    error(client.get(f"{BASE}/items", params={"limit": 0}), 422)


def test_a_retried_catalog_decision_is_answered_from_the_log(client: TestClient) -> None:
    """A retry with the same event id returns the logged decision even after the catalog
    lost an item of the selection, or everything."""
    ok(client.post(f"{BASE}/items", json={"items": ITEMS}))
    by_ids = {"candidate_ids": ["a", "b"], "event_id": "retry-ids"}
    whole = {"event_id": "retry-all"}
    first = [ok(client.post("/v1/decisions", json=body)) for body in (by_ids, whole)]
    ok(client.delete(f"{BASE}/items/b"))
    assert ok(client.post("/v1/decisions", json=by_ids))["slots"] == first[0]["slots"]
    ok(client.delete(f"{BASE}/items"))
    assert ok(client.post("/v1/decisions", json=whole))["slots"] == first[1]["slots"]
    # A new event id still gets the catalog's answer: the retry rule is for logged events.
    error(client.post("/v1/decisions", json={"candidate_ids": ["a"], "event_id": "new"}), 422)


def test_catalog_items_are_checked_again_when_identifiers_stop_being_allowed(
    settings: Settings,
) -> None:
    policy_file = settings.policies_dir / "default.toml"
    original = policy_file.read_text()
    policy_file.write_text(original + "allow_identifier_features = true\n")
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        items = [ITEMS[0], {"id": "x", "features": {"contact": "ann@example.com"}}]
        ok(client.post(f"{BASE}/items", json={"items": items}))
        ok(client.post("/v1/decisions", json={"candidate_ids": ["a", "x"]}))  # allowed now
        policy_file.write_text(original)
        assert client.portal.call(app.state.service.reload_policies) == ["default"]
        for body in ({"candidate_ids": ["a", "x"]}, {}):
            found = error(client.post("/v1/decisions", json=body), 422)
            assert "catalog item 'x'" in found["message"] and "identifier" in found["message"]
        ok(client.post("/v1/decisions", json={"candidate_ids": ["a"]}))


def test_a_keys_feature_limit_applies_to_catalog_candidates(settings: Settings) -> None:
    admin, limited = create_key(), create_key()
    entries = [
        make_entry(admin, name="admin", scopes=["admin", "decide", "read"]),
        make_entry(limited, name="lim", scopes=["decide"], max_features_per_candidate=2),
    ]
    keys = orjson.dumps([e.model_dump(exclude_none=True) for e in entries]).decode()
    app = create_app(settings.model_copy(update={"api_keys": keys}))
    with TestClient(app, raise_server_exceptions=False) as client:
        wide = {"id": "w", "features": {"f1": 1, "f2": 2, "f3": 3}}
        items = {"items": [ITEMS[0], wide]}
        ok(client.post(f"{BASE}/items", json=items, headers={"X-API-Key": admin}))
        as_limited = {"X-API-Key": limited}
        ok(client.post("/v1/decisions", json={"candidate_ids": ["a"]}, headers=as_limited))
        for body in ({"candidate_ids": ["a", "w"]}, {}):
            found = error(client.post("/v1/decisions", json=body, headers=as_limited), 422)
            assert found["field"] == "candidate_ids[1].features"
            assert "3 features exceed" in found["message"]


def test_a_retry_from_the_log_respects_the_keys_policies(settings: Settings) -> None:
    admin, other = create_key(), create_key()
    entries = [
        make_entry(admin, name="admin", scopes=["admin", "decide", "read"]),
        make_entry(other, name="other", scopes=["decide"], policies=["bounded"]),
    ]
    keys = orjson.dumps([e.model_dump(exclude_none=True) for e in entries]).decode()
    app = create_app(settings.model_copy(update={"api_keys": keys}))
    with TestClient(app, raise_server_exceptions=False) as client:
        as_admin = {"X-API-Key": admin}
        ok(client.post(f"{BASE}/items", json={"items": ITEMS}, headers=as_admin))
        body = {"candidate_ids": ["a", "b"], "event_id": "guarded"}
        ok(client.post("/v1/decisions", json=body, headers=as_admin))
        ok(client.delete(f"{BASE}/items/b", headers=as_admin))
        error(client.post("/v1/decisions", json=body, headers={"X-API-Key": other}), 403)
        both = {**body, "candidates": [ITEMS[0]]}  # malformed stays malformed
        error(client.post("/v1/decisions", json=both, headers=as_admin), 422)
        ok(client.post("/v1/decisions", json=body, headers=as_admin))
