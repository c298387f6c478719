"""Access over HTTP: the scope matrix, policy restrictions, per-key limits, loopback-only
serving without keys, and keys that never appear in clear anywhere."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI

from bandit_service import cli
from bandit_service.api.auth import Require, require
from bandit_service.apikeys import KeyConfigError, create_key, make_entry
from bandit_service.app import create_app
from bandit_service.config import Settings
from bandit_service.store.database import upgrade
from tests.e2e.asgi import asgi_client

# Every route of the app and the scope it needs. A route missing here (or listed here and
# gone) fails test_every_route_is_classified: a new endpoint must be classified first.
SCOPE_OF: dict[tuple[str, str], str] = {
    ("POST", "/v1/decisions"): "decide",
    ("POST", "/v1/decisions/{event_id}/rewards"): "decide",
    ("POST", "/v1/decisions/{event_id}/activate"): "decide",
    ("GET", "/v1/decisions/{event_id}"): "read",
    ("GET", "/v1/policies"): "read",
    ("GET", "/v1/policies/{name}"): "read",
    ("GET", "/v1/policies/{name}/lift"): "read",
    ("GET", "/v1/policies/{name}/ope"): "read",
    ("GET", "/v1/decisions/{event_id}/explanation"): "read",
    ("GET", "/metrics"): "read",
    ("DELETE", "/v1/users/{user_id}"): "admin",
    ("PUT", "/v1/users/{user_id}/opt-out"): "admin",
    ("DELETE", "/v1/users/{user_id}/opt-out"): "admin",
    ("GET", "/v1/users/{user_id}/opt-out"): "admin",
    ("GET", "/v1/policies/{name}/catalog"): "read",
    ("GET", "/v1/policies/{name}/catalog/items"): "read",
    ("GET", "/v1/policies/{name}/catalog/items/{item_id}"): "read",
    ("POST", "/v1/policies/{name}/catalog/items"): "admin",
    ("PUT", "/v1/policies/{name}/catalog/items"): "admin",
    ("DELETE", "/v1/policies/{name}/catalog/items/{item_id}"): "admin",
    ("DELETE", "/v1/policies/{name}/catalog/items"): "admin",
    ("GET", "/healthz"): "open",
    ("GET", "/readyz"): "open",
    ("GET", "/openapi.json"): "open",
    ("GET", "/docs"): "open",
    ("GET", "/docs/oauth2-redirect"): "open",
    ("GET", "/redoc"): "open",
}
CANDIDATES = [{"id": "a", "features": {"x": 1}}, {"id": "b", "features": {"x": 2}}]
# A request that succeeds with the right scope: (url, JSON body, expected status).
SAMPLE: dict[tuple[str, str], tuple[str, Any, int]] = {
    ("POST", "/v1/decisions"): ("/v1/decisions", {"candidates": CANDIDATES}, 200),
    ("POST", "/v1/decisions/{event_id}/rewards"): (
        "/v1/decisions/evt-m/rewards", {"value": 1}, 201,
    ),
    ("POST", "/v1/decisions/{event_id}/activate"): ("/v1/decisions/evt-m/activate", None, 200),
    ("GET", "/v1/decisions/{event_id}"): ("/v1/decisions/evt-m", None, 200),
    ("GET", "/v1/policies"): ("/v1/policies", None, 200),
    ("GET", "/v1/policies/{name}"): ("/v1/policies/default", None, 200),
    ("GET", "/v1/policies/{name}/lift"): (
        "/v1/policies/default/lift?replicates=5&until=2100-01-01", None, 200,
    ),
    ("GET", "/v1/policies/{name}/ope"): ("/v1/policies/default/ope?replicates=5", None, 200),
    ("GET", "/v1/decisions/{event_id}/explanation"): (
        "/v1/decisions/evt-m/explanation", None, 200,
    ),
    ("GET", "/metrics"): ("/metrics", None, 200),
    ("DELETE", "/v1/users/{user_id}"): ("/v1/users/someone-else", None, 200),
    ("PUT", "/v1/users/{user_id}/opt-out"): ("/v1/users/u-opt/opt-out", None, 200),
    ("DELETE", "/v1/users/{user_id}/opt-out"): ("/v1/users/u-opt/opt-out", None, 200),
    ("GET", "/v1/users/{user_id}/opt-out"): ("/v1/users/u-opt/opt-out", None, 200),
    # The matrix runs in this order: the catalog holds "a" and "b" (made with the decision
    # evt-m) until the admin key's calls change it, each of which succeeds on its own.
    ("GET", "/v1/policies/{name}/catalog"): ("/v1/policies/default/catalog", None, 200),
    ("GET", "/v1/policies/{name}/catalog/items"): (
        "/v1/policies/default/catalog/items", None, 200,
    ),
    ("GET", "/v1/policies/{name}/catalog/items/{item_id}"): (
        "/v1/policies/default/catalog/items/a", None, 200,
    ),
    ("POST", "/v1/policies/{name}/catalog/items"): (
        "/v1/policies/default/catalog/items", {"items": CANDIDATES}, 200,
    ),
    ("PUT", "/v1/policies/{name}/catalog/items"): (
        "/v1/policies/default/catalog/items", {"items": CANDIDATES}, 200,
    ),
    ("DELETE", "/v1/policies/{name}/catalog/items/{item_id}"): (
        "/v1/policies/default/catalog/items/a", None, 200,
    ),
    ("DELETE", "/v1/policies/{name}/catalog/items"): (
        "/v1/policies/default/catalog/items", None, 200,
    ),
    ("GET", "/healthz"): ("/healthz", None, 200),
    ("GET", "/readyz"): ("/readyz", None, 200),
    ("GET", "/openapi.json"): ("/openapi.json", None, 200),
    ("GET", "/docs"): ("/docs", None, 200),
    ("GET", "/docs/oauth2-redirect"): ("/docs/oauth2-redirect", None, 200),
    ("GET", "/redoc"): ("/redoc", None, 200),
}  # fmt: skip
SCOPED_KEYS = ("decide", "read", "admin")

# The Personalizer facade: each operation under every URL style (v1.0 has no multi-slot).
PZ_ACTIONS = [{"id": "a", "features": [{"x": 1}]}, {"id": "b", "features": [{"x": 2}]}]
PZ_OPERATIONS: list[tuple[str, str, str, Any, int, bool]] = [
    # method, path, URL (evt-m is made by the test), body, success status, multi-slot
    ("POST", "/rank", "/rank", {"actions": PZ_ACTIONS}, 201, False),
    ("POST", "/events/{eventId:path}/reward", "/events/evt-m/reward", {"value": 1}, 204, False),
    ("POST", "/events/{eventId:path}/activate", "/events/evt-m/activate", None, 204, False),
    ("POST", "/multislot/rank", "/multislot/rank",
     {"actions": PZ_ACTIONS, "slots": [{"id": "s1", "baselineAction": "a"}]}, 201, True),
    ("POST", "/multislot/events/{eventId:path}/reward", "/multislot/events/evt-m/reward",
     {"reward": [{"slotId": "0", "value": 1}]}, 204, True),
    ("POST", "/multislot/events/{eventId:path}/activate", "/multislot/events/evt-m/activate",
     None, 204, True),
    ("GET", "/configurations/service", "/configurations/service", None, 200, False),
    ("PUT", "/configurations/service", "/configurations/service",
     {"explorationPercentage": 0.2}, 200, False),
    ("GET", "/configurations/policy", "/configurations/policy", None, 200, False),
    ("PUT", "/configurations/policy", "/configurations/policy",
     {"name": "p", "arguments": "--cb_explore_adf --epsilon 0.2"}, 200, False),
    ("DELETE", "/configurations/policy", "/configurations/policy", None, 200, False),
]  # fmt: skip
PZ_SCOPE = {
    "/rank": "decide", "/events/{eventId:path}/reward": "decide",
    "/events/{eventId:path}/activate": "decide", "/multislot/rank": "decide",
    "/multislot/events/{eventId:path}/reward": "decide",
    "/multislot/events/{eventId:path}/activate": "decide",
}  # fmt: skip
for _prefix, _query in [
    ("/personalizer/v1.0", ""),
    ("/personalizer/v1.1-preview.1", ""),
    ("/personalizer/v1.1-preview.2", ""),
    ("/personalizer/v1.1-preview.3", ""),
    ("/personalizer", "?api-version=2022-09-01-preview"),
]:
    for _method, _path, _url, _body, _ok, _multislot in PZ_OPERATIONS:
        if _multislot and _prefix.endswith("v1.0"):
            continue
        _scope = PZ_SCOPE.get(_path) or ("read" if _method == "GET" else "admin")
        SCOPE_OF[(_method, _prefix + _path)] = _scope
        SAMPLE[(_method, _prefix + _path)] = (_prefix + _url + _query, _body, _ok)
# Anything else under /personalizer is Personalizer's 404, key or not.
for _method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
    SCOPE_OF[(_method, "/personalizer/{rest:path}")] = "open"
    SAMPLE[(_method, "/personalizer/{rest:path}")] = ("/personalizer/v1.0/evaluations", None, 404)


class Keys:
    """Raw keys by name and the BANDIT_API_KEYS JSON holding only their hashes."""

    def __init__(self) -> None:
        self.raw: dict[str, str] = {}
        self.entries: list[dict[str, Any]] = []

    def add(self, name: str, scopes: list[str], **limits: Any) -> str:
        key = create_key()
        self.raw[name] = key
        entry = make_entry(key, name=name, scopes=scopes, **limits)
        self.entries.append(entry.model_dump(exclude_none=True))
        return key

    def json(self) -> str:
        return json.dumps(self.entries)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def sqlite_settings(tmp_path: Path, policies_dir: Path) -> Settings:
    """Access does not depend on the store: most tests here run on SQLite only."""
    url = f"sqlite:///{tmp_path / 'auth.db'}"
    upgrade(url)
    return Settings(database_url=url, policies_dir=policies_dir, max_body_bytes=64 * 1024)


def with_keys(settings: Settings, keys: Keys) -> Settings:
    return settings.model_copy(update={"api_keys": keys.json()})


def routes_of(app: FastAPI) -> dict[tuple[str, str], Any]:
    """Every (method, path) the app answers, FastAPI's and Starlette's own routes, with
    routers flattened (FastAPI >= 0.16x keeps included routers nested)."""
    import fastapi.routing

    flatten = getattr(fastapi.routing, "iter_route_contexts", None)
    found = {}
    for route in flatten(app.routes) if flatten else app.routes:
        methods = getattr(route, "methods", None)
        assert methods, f"a route without methods (a mount?) needs classifying: {route!r}"
        for method in methods:
            if method != "HEAD":
                found[(method, route.path)] = route
    return found


def scopes_required(route: Any) -> set[str]:
    """The scopes of the ``require`` dependencies anywhere in the route's dependency tree."""
    found: set[str] = set()
    root = getattr(route, "dependant", None)
    stack = [root] if root is not None else []
    while stack:
        dependant = stack.pop()
        if isinstance(dependant.call, Require):
            found.add(dependant.call.scope)
        stack.extend(dependant.dependencies)
    return found


def test_every_route_is_classified(sqlite_settings: Settings) -> None:
    app = create_app(sqlite_settings)
    routes = routes_of(app)
    unclassified = sorted(set(routes) - set(SCOPE_OF))
    assert not unclassified, f"classify these routes in SCOPE_OF (and SAMPLE): {unclassified}"
    assert not sorted(set(SCOPE_OF) - set(routes)), "SCOPE_OF lists routes that are gone"
    assert set(SAMPLE) == set(SCOPE_OF)
    for key, route in routes.items():
        expected = set() if SCOPE_OF[key] == "open" else {SCOPE_OF[key]}
        assert scopes_required(route) == expected, key


def test_scope_matrix(sqlite_settings: Settings) -> None:
    """Every route x (no key, a bad key, each single-scope key) -> the expected status."""
    keys = Keys()
    for scope in SCOPED_KEYS:
        keys.add(scope, [scope])
    keys.add("all", list(SCOPED_KEYS))
    app = create_app(with_keys(sqlite_settings, keys))
    seen: dict[tuple[str, str, str], int] = {}
    expected: dict[tuple[str, str, str], int] = {}

    async def run() -> None:
        async with asgi_client(app) as client:
            made = await client.post(
                "/v1/decisions",
                json={"candidates": CANDIDATES, "event_id": "evt-m", "defer": True},
                headers=bearer(keys.raw["all"]),
            )
            assert made.status_code == 200, made.text
            stocked = await client.post(
                "/v1/policies/default/catalog/items",
                json={"items": CANDIDATES},
                headers=bearer(keys.raw["all"]),
            )
            assert stocked.status_code == 200, stocked.text
            callers: dict[str, dict[str, str]] = {
                "no key": {},
                "bad key": bearer(create_key()),
                **{scope: bearer(keys.raw[scope]) for scope in SCOPED_KEYS},
            }
            for (method, path), scope in SCOPE_OF.items():
                url, body, ok = SAMPLE[(method, path)]
                for caller, headers in callers.items():
                    response = await client.request(method, url, json=body, headers=headers)
                    cell = (method, path, caller)
                    seen[cell] = response.status_code
                    if scope == "open":
                        expected[cell] = ok
                    elif caller in ("no key", "bad key"):
                        expected[cell] = 401
                    else:
                        expected[cell] = ok if caller == scope else 403
                    if response.status_code in (401, 403):
                        error = response.json()["error"]
                        codes = ("unauthorized", "forbidden", "Unauthorized", "Forbidden")
                        assert error["code"] in codes
                        assert error["message"]
                    if response.status_code == 401:
                        assert response.headers["WWW-Authenticate"].startswith("Bearer")
                    if response.status_code == 403:
                        assert repr(scope) in response.json()["error"]["message"]

    asyncio.run(run())
    wrong = {cell: (seen[cell], want) for cell, want in expected.items() if seen[cell] != want}
    assert not wrong, f"(method, path, caller): (got, expected): {wrong}"


def test_admin_scope_on_an_attached_router(sqlite_settings: Settings) -> None:
    """What the lead does for admin routes: one dependency on the router."""
    keys = Keys()
    admin = keys.add("ops", ["admin"])
    reader = keys.add("reader", ["read", "decide"])
    app = create_app(with_keys(sqlite_settings, keys))
    extra = APIRouter(dependencies=[Depends(require("admin"))])

    @extra.delete("/v1/things/{name}")
    async def delete_thing(name: str) -> dict[str, str]:
        return {"deleted": name}

    app.include_router(extra)

    async def run() -> None:
        async with asgi_client(app) as client:
            assert (await client.delete("/v1/things/x", headers=bearer(admin))).status_code == 200
            refused = await client.delete("/v1/things/x", headers=bearer(reader))
            assert refused.status_code == 403
            assert "'admin'" in refused.json()["error"]["message"]
            assert (await client.delete("/v1/things/x")).status_code == 401

    asyncio.run(run())


def test_key_headers(sqlite_settings: Settings) -> None:
    keys = Keys()
    key = keys.add("reader", ["read"])
    other = keys.add("other", ["read"])
    app = create_app(with_keys(sqlite_settings, keys))

    async def run() -> None:
        async with asgi_client(app) as client:
            for headers in (
                {"Authorization": f"Bearer {key}"},
                {"Authorization": f"bearer {key}"},
                {"X-API-Key": key},
                {"Ocp-Apim-Subscription-Key": key},
                {"X-API-Key": key, "Authorization": f"Bearer {key}"},  # the same key twice
            ):
                response = await client.get("/v1/policies", headers=headers)
                assert response.status_code == 200, (headers, response.text)
            basic = await client.get("/v1/policies", headers={"Authorization": f"Basic {key}"})
            assert basic.status_code == 401
            assert "Bearer" in basic.json()["error"]["message"]
            mixed = await client.get(
                "/v1/policies", headers={"X-API-Key": key, "Ocp-Apim-Subscription-Key": other}
            )
            assert mixed.status_code == 401
            assert "one key" in mixed.json()["error"]["message"]
            # The key is checked before the body's fields: no key, invalid body -> 401.
            invalid = await client.post("/v1/decisions", json={"candidates": "nope"})
            assert invalid.status_code == 401
            missing = await client.get("/v1/policies")
            assert missing.json()["error"]["code"] == "unauthorized"
            assert "X-API-Key" in missing.json()["error"]["message"]
            # A key's hash is not a key.
            entry_hash = keys.entries[0]["hash"]
            assert (await client.get("/v1/policies", headers=bearer(entry_hash))).status_code == 401

    asyncio.run(run())


def test_policy_restriction(settings: Settings) -> None:
    """On both stores: events are checked against the stored decision's policy."""
    keys = Keys()
    full = keys.add("full", ["decide", "read"])
    bounded = keys.add("bounded-only", ["decide", "read"], policies=["bounded"])
    bounded_admin = keys.add("bounded-admin", ["admin"], policies=["bounded"])
    admin = keys.add("admin", ["admin"])
    app = create_app(with_keys(settings, keys))

    async def run() -> None:
        async with asgi_client(app) as client:
            body = {"candidates": CANDIDATES, "event_id": "evt-default"}
            assert (await client.post("/v1/decisions", json=body, headers=bearer(full))).is_success
            body = {"candidates": CANDIDATES, "event_id": "evt-bounded", "policy": "bounded"}
            mine = await client.post("/v1/decisions", json=body, headers=bearer(bounded))
            assert mine.status_code == 200, mine.text

            refused = await client.post(
                "/v1/decisions", json={"candidates": CANDIDATES}, headers=bearer(bounded)
            )  # the default policy
            assert refused.status_code == 403
            error = refused.json()["error"]
            assert error["field"] == "policy" and "'default'" in error["message"]

            for method, url, body in (
                ("POST", "/v1/decisions/evt-default/rewards", {"value": 1}),
                ("POST", "/v1/decisions/evt-default/activate", None),
                ("GET", "/v1/decisions/evt-default", None),
            ):
                response = await client.request(method, url, json=body, headers=bearer(bounded))
                assert response.status_code == 403, (url, response.text)
                assert response.json()["error"]["field"] == "event_id"
                allowed = await client.request(
                    method, url.replace("evt-default", "evt-bounded"), json=body,
                    headers=bearer(bounded),
                )  # fmt: skip
                assert allowed.is_success, (url, allowed.text)
            unknown = await client.get("/v1/decisions/evt-nope", headers=bearer(bounded))
            assert unknown.status_code == 404

            for url in ("/v1/policies/default", "/v1/policies/default/lift",
                        "/v1/policies/default/ope"):  # fmt: skip
                response = await client.get(url, headers=bearer(bounded))
                assert response.status_code == 403
                assert response.json()["error"]["field"] == "name"
            own = await client.get("/v1/policies/bounded", headers=bearer(bounded))
            assert own.status_code == 200
            listed = await client.get("/v1/policies", headers=bearer(bounded))
            assert [p["name"] for p in listed.json()["policies"]] == ["bounded"]
            everything = await client.get("/v1/policies", headers=bearer(full))
            assert {p["name"] for p in everything.json()["policies"]} == {"bounded", "default"}

            # A user's rows span every policy: only an unrestricted admin key may act on them.
            for method in ("DELETE", "PUT"):
                url = "/v1/users/u1" + ("/opt-out" if method == "PUT" else "")
                narrow = await client.request(method, url, headers=bearer(bounded_admin))
                assert narrow.status_code == 403, narrow.text
                assert "every policy" in narrow.json()["error"]["message"]
                assert (await client.request(method, url, headers=bearer(admin))).is_success

            # Catalogs belong to a policy: a key restricted to another may not touch them,
            # nor decide over them.
            items = {"items": CANDIDATES}
            for policy, allowed_status in (("default", 403), ("bounded", 200)):
                url = f"/v1/policies/{policy}/catalog/items"
                put = await client.post(url, json=items, headers=bearer(bounded_admin))
                assert put.status_code == allowed_status, put.text
                read = await client.get(url, headers=bearer(bounded))
                assert read.status_code == allowed_status, read.text
            await client.post("/v1/policies/default/catalog/items", json=items,
                              headers=bearer(admin))  # fmt: skip
            by_ids = await client.post(
                "/v1/decisions", json={"candidate_ids": ["a"]}, headers=bearer(bounded)
            )
            assert by_ids.status_code == 403 and by_ids.json()["error"]["field"] == "policy"
            whole = await client.post(
                "/v1/decisions", json={"policy": "bounded", "slots": 1}, headers=bearer(bounded)
            )
            assert whole.status_code == 200, whole.text

    asyncio.run(run())


def test_per_key_limits(sqlite_settings: Settings) -> None:
    keys = Keys()
    small = keys.add(
        "small", ["decide"], max_body_bytes=2048, max_candidates=3, max_features_per_candidate=2
    )
    roomy = keys.add("roomy", ["decide"])
    stock = keys.add("stock", ["admin"])
    slow = keys.add("slow", ["decide", "read"], rate_per_second=0.01, burst=2)
    app = create_app(with_keys(sqlite_settings, keys))

    async def run() -> None:
        async with asgi_client(app) as client:

            async def decide(body: dict[str, Any], key: str) -> httpx.Response:
                return await client.post("/v1/decisions", json=body, headers=bearer(key))

            big = {"candidates": [{"id": f"c{i}", "features": {"t": "x" * 100}} for i in range(20)]}
            too_big = await client.post("/v1/decisions", json=big, headers=bearer(small))
            assert too_big.status_code == 413
            assert too_big.json()["error"]["code"] == "payload_too_large"
            assert "2048" in too_big.json()["error"]["message"]
            assert (await client.post("/v1/decisions", json=big, headers=bearer(roomy))).is_success

            four = {"candidates": [{"id": str(i)} for i in range(4)]}
            refused = await client.post("/v1/decisions", json=four, headers=bearer(small))
            assert refused.status_code == 422
            assert refused.json()["error"]["field"] == "candidates"
            assert "limit of key 'small' of 3" in refused.json()["error"]["message"]
            three = {"candidates": [{"id": str(i)} for i in range(3)]}
            assert (await decide(three, small)).is_success
            # The same count limit for catalog candidates, named or the whole catalog.
            stocked = await client.post(
                "/v1/policies/default/catalog/items", json=four | {"items": four["candidates"]},
                headers=bearer(stock),
            )  # fmt: skip
            assert stocked.status_code == 422  # "candidates" is not a field of a batch
            stocked = await client.post(
                "/v1/policies/default/catalog/items", json={"items": four["candidates"]},
                headers=bearer(stock),
            )  # fmt: skip
            assert stocked.is_success, stocked.text
            for body, field in (({"candidate_ids": ["0", "1", "2", "3"]}, "candidate_ids"),
                                ({}, "candidates")):  # fmt: skip
                refused = await decide(body, small)
                assert refused.status_code == 422, refused.text
                assert refused.json()["error"]["field"] == field
            assert (await decide({"candidate_ids": ["0", "1", "2"]}, small)).is_success
            assert (await decide({}, roomy)).is_success

            wide_features = {"x": 1, "ns": {"y": 1, "z": 2}}  # a namespace counts its members
            wide = {"candidates": [{"id": "a"}, {"id": "b", "features": wide_features}]}
            refused = await client.post("/v1/decisions", json=wide, headers=bearer(small))
            assert refused.status_code == 422
            assert refused.json()["error"]["field"] == "candidates[1].features"
            assert "3 features" in refused.json()["error"]["message"]
            assert (await client.post("/v1/decisions", json=wide, headers=bearer(roomy))).is_success

            # Burst 2 at 0.01/s: the third request within 100 s is refused, with Retry-After.
            for _ in range(2):
                assert (await client.get("/v1/policies", headers=bearer(slow))).is_success
            limited = await client.post("/v1/decisions", json=three, headers=bearer(slow))
            assert limited.status_code == 429
            assert limited.json()["error"]["code"] == "rate_limited"
            retry_after = int(limited.headers["Retry-After"])
            assert 1 <= retry_after <= 100
            assert f"retry in {retry_after} s" in limited.json()["error"]["message"]
            # Other keys have their own buckets; health checks need no key.
            assert (await decide(three, roomy)).is_success
            assert (await client.get("/healthz")).status_code == 200

    asyncio.run(run())


def test_key_limits_cannot_exceed_the_global_ones(sqlite_settings: Settings) -> None:
    keys = Keys()
    keys.add("greedy", ["decide"], max_candidates=sqlite_settings.max_candidates + 1)
    with pytest.raises(KeyConfigError, match="BANDIT_MAX_CANDIDATES"):
        create_app(with_keys(sqlite_settings, keys))
    keys = Keys()
    keys.add("typo", ["read"], policies=["defualt"])
    with pytest.raises(KeyConfigError, match="unknown policy defualt"):
        create_app(with_keys(sqlite_settings, keys))


def test_without_keys_only_loopback_clients(sqlite_settings: Settings) -> None:
    app = create_app(sqlite_settings)

    async def run() -> None:
        async with app.router.lifespan_context(app):
            for client_host, status in (("127.0.0.1", 200), ("::1", 200), ("203.0.113.9", 403)):
                transport = httpx.ASGITransport(app=app, client=(client_host, 4000))
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                    response = await client.get("/v1/policies")
                    assert response.status_code == status, client_host
                    if status == 403:
                        assert response.json()["error"]["code"] == "loopback_only"
                        assert (await client.get("/healthz")).status_code == 200

    asyncio.run(run())


def test_global_limits_apply_without_keys(sqlite_settings: Settings) -> None:
    settings = sqlite_settings.model_copy(update={"max_features_per_candidate": 2})
    app = create_app(settings)

    async def run() -> None:
        async with asgi_client(app) as client:
            wide = [{"id": "a", "features": {"x": 1, "y": 2}}, {"id": "b", "features": {"u": {
                "x": 1, "y": 2, "z": 3}}}]  # fmt: skip
            refused = await client.post("/v1/decisions", json={"candidates": wide})
            assert refused.status_code == 422
            error = refused.json()["error"]
            assert error["field"] == "candidates[1].features"
            assert "BANDIT_MAX_FEATURES_PER_CANDIDATE" in error["message"]
            ok = await client.post("/v1/decisions", json={"candidates": wide[:1]})
            assert ok.status_code == 200

    asyncio.run(run())


def test_serve_refuses_other_addresses_without_keys(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    policies_dir: Path,
    tmp_path: Path,
) -> None:
    import uvicorn

    started: list[str] = []
    monkeypatch.setattr(uvicorn, "run", lambda *_a, **kw: started.append(kw["host"]))
    monkeypatch.setenv("BANDIT_POLICIES_DIR", str(policies_dir))
    monkeypatch.setenv("BANDIT_DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    monkeypatch.delenv("BANDIT_API_KEYS", raising=False)
    monkeypatch.delenv("BANDIT_API_KEYS_FILE", raising=False)

    for host in ("0.0.0.0", "::", "192.0.2.1", "example.com"):
        assert cli.main(["serve", "--host", host]) == 2
        assert "refusing to serve on" in capsys.readouterr().err
    assert started == []

    assert cli.main(["serve", "--host", "127.0.0.1"]) == 0
    assert "no API keys configured: serving loopback clients only" in capsys.readouterr().err
    assert cli.main(["serve", "--host", "localhost"]) == 0

    keys = Keys()
    keys.add("web", ["decide"])
    monkeypatch.setenv("BANDIT_API_KEYS", keys.json())
    assert cli.main(["serve", "--host", "0.0.0.0"]) == 0
    assert "1 API key(s) from BANDIT_API_KEYS: web" in capsys.readouterr().err
    assert started == ["127.0.0.1", "localhost", "0.0.0.0"]

    monkeypatch.setenv("BANDIT_API_KEYS", "[]")
    assert cli.main(["serve", "--host", "127.0.0.1"]) == 2  # configured, but empty: a mistake
    assert "holding no keys" in capsys.readouterr().err


def test_keys_are_kept_only_as_hashes(
    sqlite_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The raw key leaves `keys create` once and appears in no config, log or response."""
    assert cli.main(["keys", "create", "--name", "web", "--scope", "decide",
                     "--scope", "read", "--rate", "100"]) == 0  # fmt: skip
    printed = capsys.readouterr()
    key = printed.err.splitlines()[-1]
    entry = printed.out  # what `keys create >> keys.toml` appends
    assert key.startswith("bsk_") and key not in entry and entry.startswith("[[keys]]")
    key_file = tmp_path / "keys.toml"
    key_file.write_text(entry)

    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(key + "\n"))
    assert cli.main(["keys", "hash"]) == 0
    assert capsys.readouterr().out.strip() in entry

    settings = sqlite_settings.model_copy(update={"api_keys_file": key_file})
    assert key not in repr(settings) and key not in key_file.read_text()
    wrong = create_key()
    bodies: list[str] = []
    caplog.set_level(logging.DEBUG)
    app = create_app(settings)

    async def run() -> None:
        async with asgi_client(app) as client:
            for headers in (bearer(key), {"X-API-Key": wrong}, bearer(wrong)):
                response = await client.post(
                    "/v1/decisions", json={"candidates": CANDIDATES}, headers=headers
                )
                bodies.append(response.text)
            assert json.loads(bodies[0])["slots"]
            assert json.loads(bodies[1])["error"]["code"] == "unauthorized"

    asyncio.run(run())
    monkeypatch.setenv("BANDIT_API_KEYS_FILE", str(key_file))
    monkeypatch.setenv("BANDIT_POLICIES_DIR", str(sqlite_settings.policies_dir))
    assert cli.main(["keys", "list"]) == 0
    listed = capsys.readouterr().out
    assert "web: scopes decide, read" in listed
    everything = caplog.text + "".join(bodies) + listed
    assert key not in everything and wrong not in everything
    assert "API key(s) from" in caplog.text  # the start-up line was logged, without keys
