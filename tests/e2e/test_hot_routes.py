"""The hot routes' pre-router (``api/hot_routes.py``) must answer exactly as FastAPI's own
stack does: the same status, headers and body, the same request-id handling, the same
metrics labels, for good and bad requests alike.

Two apps on two fresh stores get the same requests in the same order: one pre-routes the
decision and reward requests, the other has its pre-router switched off (everything
through FastAPI's middlewares, routing and the route's own fast path, as before). Draws
are seeded by event id, so with explicit event ids even the decisions are identical.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from sqlalchemy import exc as sa_exc
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import ClientDisconnect
from starlette.requests import Request as StarletteRequest

from bandit_service.api import hot_routes
from bandit_service.apikeys import create_key, make_entry
from bandit_service.app import BanditApp, create_app
from bandit_service.config import Settings
from bandit_service.ops import metrics
from bandit_service.store.database import upgrade

CANDIDATES = [
    {"id": "a", "features": {"topic": "sport", "age": 3}},
    {"id": "b", "features": {"topic": "news", "tags": ["x", "y"]}},
]
JSON = {"content-type": "application/json"}
Request = tuple[str, str, dict[str, str], Any]  # method, path, headers, body (bytes/obj)


def _decision(**extra: Any) -> bytes:
    return json.dumps({"candidates": CANDIDATES, **extra}).encode()


# Good and bad requests to both hot routes (and near misses that must not be pre-routed).
TABLE: list[Request] = [
    ("POST", "/v1/decisions", JSON, _decision(event_id="e-1", slots=2, user_id="u-1")),
    ("POST", "/v1/decisions?include=pmf", JSON, _decision(event_id="e-2")),
    ("POST", "/v1/decisions", JSON, _decision(event_id="e-1", slots=2, user_id="u-1")),  # retry
    ("POST", "/v1/decisions?include=all", JSON, _decision(event_id="e-3")),  # bad query: 422
    ("POST", "/v1/decisions?x=1", JSON, _decision(event_id="e-4")),  # unknown query: ignored
    (
        "POST",
        "/v1/decisions",
        {"content-type": "application/json; charset=utf-8"},
        _decision(event_id="e-5"),
    ),
    ("POST", "/v1/decisions", {"content-type": "text/plain"}, _decision(event_id="e-6")),
    ("POST", "/v1/decisions", {}, _decision(event_id="e-7")),  # no content type
    ("POST", "/v1/decisions", JSON, b'{"candidates": ['),  # malformed JSON: 400
    ("POST", "/v1/decisions", JSON, b""),  # no body: 422
    ("POST", "/v1/decisions", JSON, b'"not an object"'),
    ("POST", "/v1/decisions", JSON, _decision(policy="nope")),  # unknown policy: 422
    ("POST", "/v1/decisions", JSON, _decision(slots=3)),  # more slots than candidates
    ("POST", "/v1/decisions", JSON, _decision(context={"email": "ana@example.com"})),
    ("POST", "/v1/decisions", JSON, _decision(pins=[{"id": "zz", "slot": 0}])),
    ("POST", "/v1/decisions", JSON, json.dumps({"candidates": [CANDIDATES[0]] * 2}).encode()),
    ("POST", "/v1/decisions", JSON, b'{"candidates": [{"id": "a", "features": {"x": null}}]}'),
    ("POST", "/v1/decisions", JSON, _decision(extra=1)),
    ("POST", "/v1/decisions", {**JSON, "x-request-id": "trace-1.a:b_c"}, _decision(event_id="e-8")),
    ("POST", "/v1/decisions", {**JSON, "x-request-id": "bad id!"}, _decision(event_id="e-9")),
    ("POST", "/v1/decisions", {**JSON, "content-length": "999999"}, None),  # 413 up front
    ("POST", "/v1/decisions/", JSON, _decision(event_id="e-10")),  # trailing slash: redirect
    ("PUT", "/v1/decisions", JSON, _decision(event_id="e-11")),  # 405
    ("GET", "/v1/decisions", {}, None),  # 405
    ("POST", "/v1/decisions/e-1/rewards", JSON, b'{"value": 1, "slot": 1}'),
    ("POST", "/v1/decisions/e-1/rewards", JSON, b'{"value": 1, "reward_id": "r-1"}'),
    ("POST", "/v1/decisions/e-1/rewards", JSON, b'{"value": 1, "reward_id": "r-1"}'),  # 200
    ("POST", "/v1/decisions/e-1/rewards", JSON, b'{"value": 2, "reward_id": "r-1"}'),  # reused id
    ("POST", "/v1/decisions/e-1/rewards", JSON, b'{"value": "x"}'),
    ("POST", "/v1/decisions/e-1/rewards", JSON, b"{}"),
    ("POST", "/v1/decisions/e-1/rewards", JSON, b'{"value": 1, "slot": 7}'),
    ("POST", "/v1/decisions/e-1/rewards?x=1", JSON, b'{"value": 1}'),
    ("POST", "/v1/decisions/e-1/rewards", {"content-type": "text/plain"}, b'{"value": 1}'),
    ("POST", "/v1/decisions/unknown-event/rewards", JSON, b'{"value": 1}'),  # 404
    ("POST", "/v1/decisions/not%20an%20id/rewards", JSON, b'{"value": 1}'),  # 404
    ("POST", "/v1/decisions/a.b:c/rewards", JSON, b'{"value": 1}'),
    ("POST", "/v1/decisions/e-1/rewards/", JSON, b'{"value": 1}'),  # not the route
    ("POST", "/v1/decisions/a/b/rewards", JSON, b'{"value": 1}'),  # not the route
    ("POST", "/v1/decisions/e-1/activate", JSON, None),  # a neighbour, not pre-routed
    ("GET", "/v1/decisions/e-1/rewards", {}, None),  # 405
    ("GET", "/v1/decisions/e-1", {}, None),
    ("POST", "/v1/decisions/e-2/rewards", {**JSON, "content-length": "999999"}, None),
]


def _app(tmp_path: Path, policies_dir: Path, name: str, **settings: Any) -> BanditApp:
    url = f"sqlite:///{tmp_path / name}.db"
    upgrade(url)
    return create_app(
        Settings(
            database_url=url,
            policies_dir=policies_dir,
            trainer="off",
            max_body_bytes=64 * 1024,
            **settings,
        )
    )


@asynccontextmanager
async def _clients(
    tmp_path: Path, policies_dir: Path, **settings: Any
) -> AsyncIterator[tuple[list[BanditApp], httpx.AsyncClient, httpx.AsyncClient]]:
    """The pre-routing app and the plain one, each started, each with a client."""
    hot = _app(tmp_path, policies_dir, "hot", **settings)
    plain = _app(tmp_path, policies_dir, "plain", **settings)
    async with AsyncExitStack() as stack:
        clients = []
        for app in (hot, plain):
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            clients.append(
                await stack.enter_async_context(
                    httpx.AsyncClient(transport=transport, base_url="http://test")
                )
            )
        assert hot.hot_routes is not None
        assert [r.path for r in hot.hot_routes.routes] == [
            "/v1/decisions",
            "/v1/decisions/{event_id}/rewards",
        ]
        plain.hot_routes = None
        yield [hot, plain], clients[0], clients[1]


def _counted(method: str) -> dict[tuple[str, str], float]:
    """The request counter's values by (route label, status) for ``method``."""
    out: dict[tuple[str, str], float] = {}
    for family in metrics.REQUESTS.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels["method"] == method:
                key = (sample.labels["route"], sample.labels["status"])
                out[key] = out.get(key, 0) + sample.value
    return out


def _answer(response: httpx.Response) -> tuple[int, dict[str, str], Any]:
    headers = dict(response.headers)
    if headers.get("x-request-id") != response.request.headers.get("x-request-id"):
        assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])
        headers["x-request-id"] = "<fresh>"
    text = re.sub(r"incident [0-9a-f]{12}", "incident <id>", response.text)
    # Times, and the user key (keyed with each store's own secret), differ by store.
    text = re.sub(r'"(\w+_at|user_key)":"[^"]+"', r'"\1":"<per store>"', text)
    if headers.get("content-length"):
        headers["content-length"] = "<n>"  # timestamps may differ in length
    return response.status_code, headers, text


async def _send(client: httpx.AsyncClient, request: Request) -> httpx.Response:
    method, path, headers, body = request
    if isinstance(body, bytes):
        return await client.request(method, path, content=body, headers=headers)
    return await client.request(method, path, headers=headers)


async def _same_answers(
    hot_client: httpx.AsyncClient, plain_client: httpx.AsyncClient, table: list[Request]
) -> list[httpx.Response]:
    """Each request to both apps: identical answers and identical metrics increments."""
    answers = []
    for request in table:
        method = request[0]
        before = _counted(method)
        hot = await _send(hot_client, request)
        middle = _counted(method)
        plain = await _send(plain_client, request)
        after = _counted(method)
        assert _answer(hot) == _answer(plain), (request, hot.text, plain.text)
        hot_delta = {k: v - before.get(k, 0) for k, v in middle.items() if v != before.get(k, 0)}
        plain_delta = {k: v - middle.get(k, 0) for k, v in after.items() if v != middle.get(k, 0)}
        assert hot_delta == plain_delta, (request, hot_delta, plain_delta)
        answers.append(hot)
    return answers


def test_pre_routed_and_fastapi_paths_answer_alike(
    tmp_path: Path, policies_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served: list[str] = []
    call = hot_routes.HotRoute.__call__

    async def spy(self: hot_routes.HotRoute, scope: Any, receive: Any, send: Any) -> None:
        served.append(scope["path"])
        await call(self, scope, receive, send)

    monkeypatch.setattr(hot_routes.HotRoute, "__call__", spy)

    async def run() -> None:
        async with _clients(tmp_path, policies_dir) as (_, hot, plain):
            answers = await _same_answers(hot, plain, TABLE)
        statuses = [a.status_code for a in answers]
        assert {200, 201, 307, 400, 404, 405, 413, 422} <= set(statuses)
        assert answers[0].json()["event_id"] == "e-1"
        # The route's label is its template on both paths (the 413 sent before any
        # routing is "unmatched" on both).
        assert ("/v1/decisions/{event_id}/rewards", "201") in _counted("POST")
        # Exactly the hot (method, path) pairs were pre-routed, trailing slashes not.
        assert "/v1/decisions/" not in served and "/v1/decisions/e-1/rewards/" not in served
        assert "/v1/decisions/a/b/rewards" not in served
        assert "/v1/decisions" in served and "/v1/decisions/a.b:c/rewards" in served

    asyncio.run(run())


def test_streamed_bodies_over_the_limit_are_413_on_both_paths(
    tmp_path: Path, policies_dir: Path
) -> None:
    async def run() -> None:
        async with _clients(tmp_path, policies_dir) as (_, hot, plain):
            for path in ("/v1/decisions", "/v1/decisions/e-1/rewards"):
                before = _counted("POST")
                answers = []
                for client in (hot, plain):

                    async def chunks() -> AsyncIterator[bytes]:
                        for _ in range(20):  # 80 KiB with no Content-Length
                            yield b" " * 4096

                    answers.append(await client.post(path, content=chunks(), headers=JSON))
                assert _answer(answers[0]) == _answer(answers[1])
                assert answers[0].status_code == 413
                # Routed before the body ran over: labelled with the route, on both paths.
                label = (
                    path if path == "/v1/decisions" else "/v1/decisions/{event_id}/rewards",
                    "413",
                )
                assert _counted("POST")[label] - before.get(label, 0) == 2

    asyncio.run(run())


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (RuntimeError("boom"), 500),
        (sa_exc.OperationalError("SELECT 1", {}, Exception("server closed")), 503),
    ],
)
def test_failures_inside_the_service_answer_alike(
    tmp_path: Path, policies_dir: Path, error: Exception, status: int
) -> None:
    """An unexpected error is the same 500 (incident id, the request's id echoed) and a
    store outage the same 503, whichever path served the request."""

    async def run() -> None:
        async with _clients(tmp_path, policies_dir) as (apps, hot, plain):
            for app in apps:

                async def fail(*_args: Any, **_kwargs: Any) -> Any:
                    raise error

                app.state.service.decide = fail
                app.state.service.reward = fail
            table: list[Request] = [
                ("POST", "/v1/decisions", JSON, _decision(event_id="f-1")),
                ("POST", "/v1/decisions", {**JSON, "x-request-id": "req-9"}, _decision()),
                ("POST", "/v1/decisions/f-1/rewards", JSON, b'{"value": 1}'),
            ]
            answers = await _same_answers(hot, plain, table)
            for answer in answers:
                assert answer.status_code == status, answer.text
                if status == 500:
                    assert answer.json()["error"]["code"] == "internal"
                    assert answer.headers["x-request-id"]
            assert answers[1].headers["x-request-id"] == "req-9"

    asyncio.run(run())


def test_keys_are_checked_alike(tmp_path: Path, policies_dir: Path) -> None:
    decider, reader, bounded, slow, tiny = (create_key() for _ in range(5))
    entries = [
        make_entry(decider, name="decider", scopes=["decide"]),
        make_entry(reader, name="reader", scopes=["read"]),
        make_entry(bounded, name="bounded", scopes=["decide"], policies=["bounded"]),
        make_entry(slow, name="slow", scopes=["decide"], rate_per_second=0.001, burst=1),
        make_entry(tiny, name="tiny", scopes=["decide"], max_body_bytes=16),
    ]
    keys = json.dumps([e.model_dump(exclude_none=True) for e in entries])
    body = _decision(event_id="k-1")
    reward = b'{"value": 1}'
    path = "/v1/decisions/k-1/rewards"
    table: list[Request] = [
        ("POST", "/v1/decisions", JSON, body),  # no key: 401
        ("POST", "/v1/decisions", {**JSON, "x-api-key": "nonsense"}, body),
        ("POST", "/v1/decisions", {**JSON, "authorization": f"Basic {decider}"}, body),
        ("POST", "/v1/decisions", {**JSON, "x-api-key": reader}, body),  # scope: 403
        ("POST", "/v1/decisions", {**JSON, "x-api-key": bounded}, body),  # policy: 403
        (
            "POST",
            "/v1/decisions",
            {**JSON, "x-api-key": decider, "authorization": f"Bearer {reader}"},
            body,
        ),  # two keys
        ("POST", "/v1/decisions", {**JSON, "authorization": f"Bearer {decider}"}, body),
        ("POST", "/v1/decisions", {**JSON, "x-api-key": slow}, _decision(event_id="k-2")),
        ("POST", "/v1/decisions", {**JSON, "x-api-key": slow}, _decision(event_id="k-3")),
        ("POST", "/v1/decisions", {**JSON, "x-api-key": tiny}, body),  # the key's limit: 413
        ("POST", path, JSON, reward),
        ("POST", path, {**JSON, "x-api-key": reader}, reward),
        ("POST", path, {**JSON, "x-api-key": bounded}, reward),  # the event's policy: 403
        ("POST", path, {**JSON, "ocp-apim-subscription-key": decider}, reward),
    ]

    async def run() -> None:
        async with _clients(tmp_path, policies_dir, api_keys=keys) as (_, hot, plain):
            answers = await _same_answers(hot, plain, table)
        assert [a.status_code for a in answers] == [
            401,
            401,
            401,
            403,
            403,
            401,
            200,
            200,
            429,
            413,
            401,
            403,
            403,
            201,
        ]

    asyncio.run(run())


def _started(app: FastAPI) -> Callable[[], Awaitable[hot_routes.HotRoutes | None]]:
    async def arm() -> hot_routes.HotRoutes | None:
        async with app.router.lifespan_context(app):
            return app.hot_routes  # type: ignore[attr-defined,no-any-return]

    return arm


def test_the_pre_router_stands_aside_for_an_app_it_does_not_know(
    tmp_path: Path, policies_dir: Path
) -> None:
    """Another middleware, a root path or a route that shadows a hot one: FastAPI routes
    everything (what the pre-router would skip could matter there)."""
    with_middleware = _app(tmp_path, policies_dir, "mw")

    async def passthrough(request: Any, call_next: Any) -> Any:
        return await call_next(request)

    with_middleware.add_middleware(BaseHTTPMiddleware, dispatch=passthrough)
    rooted = _app(tmp_path, policies_dir, "rooted")
    rooted.root_path = "/api"
    shadowed = _app(tmp_path, policies_dir, "shadowed")

    async def shadow() -> dict[str, str]:
        return {}

    shadowed.router.routes.insert(
        0, APIRoute("/v1/decisions/{x}/rewards", shadow, methods=["POST"])
    )
    normal = _app(tmp_path, policies_dir, "normal")

    async def run() -> None:
        assert await _started(with_middleware)() is None
        assert await _started(rooted)() is None
        assert await _started(shadowed)() is None
        assert await _started(normal)() is not None
        assert normal.hot_routes is None  # disarmed when the app stops

    asyncio.run(run())


def test_before_start_requests_go_through_fastapi(tmp_path: Path, policies_dir: Path) -> None:
    app = _app(tmp_path, policies_dir, "cold")
    assert app.hot_routes is None

    async def run() -> None:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/v1/decisions", content=b"{", headers=JSON)
        assert response.status_code == 400

    asyncio.run(run())


@pytest.mark.parametrize(
    "messages",
    [
        [{"type": "http.request", "body": b'{"a": 1}'}],
        [
            {"type": "http.request", "body": b'{"a"', "more_body": True},
            {"type": "http.request", "body": b"", "more_body": True},
            {"type": "http.request", "body": b": 1}"},
        ],
        [{"type": "http.request"}],
        [{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}],
        [{"type": "http.disconnect"}],
    ],
)
def test_the_hot_request_reads_bodies_as_starlette_does(messages: list[dict[str, Any]]) -> None:
    """``_BodyRequest.body()`` (a plain loop) against Starlette's own: same bytes, same
    disconnect error, the same cached body afterwards, and a stream consumed once."""
    assert hot_routes._body_request_fits()

    async def outcome(cls: type[StarletteRequest]) -> tuple[Any, ...]:
        queue = list(messages)

        async def receive() -> dict[str, Any]:
            return queue.pop(0)

        request = cls({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
        try:
            first: Any = await request.body()
        except ClientDisconnect:
            first = "disconnect"
        try:
            again: Any = await request.body()
        except Exception as exc:  # a second read after a disconnect reads on
            again = type(exc).__name__
        return first, again, len(queue)

    async def run() -> None:
        assert await outcome(hot_routes._BodyRequest) == await outcome(StarletteRequest)

    asyncio.run(run())
