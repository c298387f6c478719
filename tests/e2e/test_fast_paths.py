"""The decision and reward routes answer common requests on a fast path (api/routes.py,
``decide_fast``/``reward_fast``) and everything else through FastAPI's own handling. A
client must not be able to tell which path answered: the same request sent with
``application/json; charset=utf-8`` (which always takes FastAPI's path) gets the same
status and body."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from bandit_service.api import routes
from bandit_service.apikeys import create_key, make_entry
from bandit_service.app import create_app
from bandit_service.config import Settings
from bandit_service.store.database import upgrade
from tests.e2e.asgi import asgi_client

FAST = {"content-type": "application/json"}
SLOW = {"content-type": "application/json; charset=utf-8"}
CANDIDATES = [
    {"id": "a", "features": {"topic": "sport", "age": 3}},
    {"id": "b", "features": {"topic": "news", "tags": ["x", "y"]}},
]


def _comparable(response: httpx.Response) -> tuple[int, Any]:
    body = response.json()
    if isinstance(body, dict):
        body.pop("event_id", None)
        body.pop("received_at", None)
    return response.status_code, body


DECISIONS: list[Any] = [
    {"candidates": CANDIDATES, "slots": 2, "user_id": "u-1", "context": {"user": {"age": 3}}},
    {"candidates": CANDIDATES, "slots": [{"id": "top", "features": {"w": 1}}], "defer": True},
    {"candidates": CANDIDATES, "policy": "nope"},  # valid JSON shape, unknown policy: 422
    {"candidates": CANDIDATES, "slots": 3},  # more slots than candidates: 422
    {"candidates": [CANDIDATES[0], CANDIDATES[0]]},  # duplicate id: 422
    {"candidates": CANDIDATES, "pins": [{"id": "zz", "slot": 0}]},  # unknown pin: 422
    {"candidates": []},
    {"candidates": CANDIDATES, "context": {"email": "ana@example.com"}},  # identifier: 422
    {"candidates": [{"id": "a", "features": {"x": None}}]},  # invalid: FastAPI's path
    {"candidates": CANDIDATES, "extra": 1},
    "not an object",
]


def test_decisions_answer_the_same_on_both_paths(
    tmp_path: Path, policies_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'fast.db'}"
    upgrade(url)
    app = create_app(Settings(database_url=url, policies_dir=policies_dir))
    taken: list[bool] = []
    decode = routes.decode_decision

    def spy(body: bytes) -> Any:
        result = decode(body)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(routes, "decode_decision", spy)

    async def run() -> None:
        async with asgi_client(app) as client:
            for n, body in enumerate(DECISIONS):
                data = json.dumps(body).encode()
                fast = await client.post("/v1/decisions", content=data, headers=FAST)
                slow = await client.post("/v1/decisions", content=data, headers=SLOW)
                assert _comparable(fast) == _comparable(slow) or (
                    fast.status_code == slow.status_code == 200  # draws differ by event id
                    and fast.json().keys() == slow.json().keys()
                ), (n, fast.text, slow.text)
            assert taken[0] and taken[1] and not taken[-3]  # the fast path really answered
            pmf = await client.post("/v1/decisions?include=pmf", json=DECISIONS[0])
            assert "pmf" in pmf.json()["slots"][0]
            bad_query = await client.post("/v1/decisions?include=all", json=DECISIONS[0])
            assert bad_query.status_code == 422 and bad_query.json()["error"]["field"] == "include"
            # Repeating an event id returns the stored decision, whichever path answers.
            first = await client.post(
                "/v1/decisions", json={**DECISIONS[0], "event_id": "e-1"}, headers=FAST
            )
            again = await client.post(
                "/v1/decisions", content=json.dumps({**DECISIONS[0], "event_id": "e-1"}),
                headers=SLOW,
            )  # fmt: skip
            assert first.json() == again.json()
            for body in ({"value": 1}, {"value": 1, "slot": 1}, {"value": 2}, {"value": "x"}, {}):
                fast = await client.post("/v1/decisions/e-1/rewards", json=body, headers=FAST)
                slow = await client.post(
                    "/v1/decisions/e-1/rewards", content=json.dumps(body), headers=SLOW
                )
                assert _comparable(fast) == _comparable(slow), (body, fast.text, slow.text)
            unknown = await client.post("/v1/decisions/nope/rewards", json={"value": 1})
            assert unknown.status_code == 404

    asyncio.run(run())


def test_keys_are_checked_on_the_fast_path(tmp_path: Path, policies_dir: Path) -> None:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    upgrade(url)
    decider, reader, bounded = create_key(), create_key(), create_key()
    entries = [
        make_entry(decider, name="decider", scopes=["decide"]),
        make_entry(reader, name="reader", scopes=["read"]),
        make_entry(bounded, name="bounded", scopes=["decide"], policies=["bounded"]),
    ]
    keys = json.dumps([e.model_dump(exclude_none=True) for e in entries])
    app = create_app(Settings(database_url=url, policies_dir=policies_dir, api_keys=keys))
    body = json.dumps({"candidates": CANDIDATES, "event_id": "k-1"}).encode()

    async def run() -> None:
        async with asgi_client(app) as client:

            async def both(path: str, data: bytes, headers: dict[str, str]) -> httpx.Response:
                fast = await client.post(path, content=data, headers={**FAST, **headers})
                slow = await client.post(path, content=data, headers={**SLOW, **headers})
                assert _comparable(fast) == _comparable(slow), (fast.text, slow.text)
                return fast

            assert (await both("/v1/decisions", body, {})).status_code == 401
            assert (await both("/v1/decisions", body, {"X-API-Key": reader})).status_code == 403
            assert (await both("/v1/decisions", body, {"X-API-Key": bounded})).status_code == 403
            basic = {"Authorization": f"Basic {decider}"}
            assert (await both("/v1/decisions", body, basic)).status_code == 401
            ok = await both("/v1/decisions", body, {"Authorization": f"Bearer {decider}"})
            assert ok.status_code == 200
            reward = json.dumps({"value": 1}).encode()
            path = "/v1/decisions/k-1/rewards"
            assert (await both(path, reward, {"X-API-Key": reader})).status_code == 403
            assert (await both(path, reward, {"X-API-Key": bounded})).status_code == 403
            assert (await both(path, reward, {})).status_code == 401

    asyncio.run(run())
