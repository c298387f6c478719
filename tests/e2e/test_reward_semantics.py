"""Rewards under concurrency, on SQLite and PostgreSQL: duplicates, retries with an
idempotency key, out-of-order and late rewards, rewards for unknown events and rewards
racing their own decision. Every answer is defined, and what is stored is exactly what
was acknowledged: nothing lost, nothing counted twice.
"""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from bandit_service.app import create_app
from bandit_service.config import Settings
from bandit_service.store.database import make_engine
from bandit_service.store.models import RewardRow
from tests.e2e.asgi import asgi_client

CANDIDATES = [{"id": f"c{i}", "features": {"topic": f"t{i % 3}"}} for i in range(6)]
EVENTS = 12


async def reward(
    client: httpx.AsyncClient, event_id: str, **body: Any
) -> tuple[str, dict[str, Any], httpx.Response]:
    response = await client.post(f"/v1/decisions/{event_id}/rewards", json=body)
    return event_id, body, response


def test_concurrent_rewards_are_stored_exactly_as_acknowledged(settings: Settings) -> None:
    async def run() -> tuple[list[tuple[str, dict[str, Any], httpx.Response]], dict[str, Any]]:
        async with asgi_client(create_app(settings)) as client:
            ids = [f"evt-{i}" for i in range(EVENTS)]
            decided = await asyncio.gather(
                *(
                    client.post(
                        "/v1/decisions", json={"event_id": e, "candidates": CANDIDATES, "slots": 2}
                    )
                    for e in ids
                )
            )
            assert all(r.status_code == 200 for r in decided)
            calls = []
            for i, event_id in enumerate(ids):
                # Out of order: slot 1 before slot 0, and a second slot-0 reward.
                calls.append(reward(client, event_id, value=0.25, slot=1))
                calls.append(reward(client, event_id, value=0.5, slot=0))
                calls.append(reward(client, event_id, value=0.125, slot=0))
                # A client retrying one reward 4 times at once with its idempotency key.
                calls += [
                    reward(client, event_id, value=1, slot=0, reward_id="r-1") for _ in range(4)
                ]
                # The same bytes twice without a key: two rewards (documented).
                calls += [reward(client, event_id, value=-0.5, slot=1) for _ in range(2)]
                # Unknown event, and a reward racing its own decision.
                calls.append(reward(client, f"unknown-{i}", value=1))
                race = f"race-{i}"
                calls.append(reward(client, race, value=1))
                calls.append(
                    client.post("/v1/decisions", json={"event_id": race, "candidates": CANDIDATES})
                )
            results = await asyncio.gather(*calls)
            answers = [r for r in results if isinstance(r, tuple)]
            # After everything settled: the key reused with another value is a conflict.
            conflict = await client.post(
                "/v1/decisions/evt-0/rewards", json={"value": 0.5, "slot": 0, "reward_id": "r-1"}
            )
            assert conflict.status_code == 409, conflict.text
            assert conflict.json()["error"]["field"] == "reward_id"
            read = {e: (await client.get(f"/v1/decisions/{e}")).json() for e in ids}
            races = {
                f"race-{i}": await client.get(f"/v1/decisions/race-{i}") for i in range(EVENTS)
            }
            return answers, {"decisions": read, "races": races}

    answers, stored = asyncio.run(run())
    acknowledged: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
    for event_id, body, response in answers:
        if event_id.startswith("unknown-"):
            assert response.status_code == 404, response.text
            assert response.json()["error"]["field"] == "event_id"
            continue
        if event_id.startswith("race-"):
            # Before the decision is stored the event is unknown; after, it is a reward.
            assert response.status_code in (201, 404), response.text
        elif body.get("reward_id"):
            assert response.status_code in (200, 201), response.text
        else:
            assert response.status_code == 201, response.text
        if response.status_code == 201:
            acknowledged[event_id].append((body.get("slot", 0), float(body["value"])))

    for event_id, decision in stored["decisions"].items():
        keyed = [
            r for e, b, r in answers if e == event_id and b.get("reward_id") == "r-1"
        ]  # fmt: skip
        assert sorted(r.status_code for r in keyed) == [200, 200, 200, 201]
        first = next(r.json() for r in keyed if r.status_code == 201)
        for retry in (r.json() for r in keyed if r.status_code == 200):
            assert retry["duplicate"] is True and retry["received_at"] == first["received_at"]
        got = sorted((r["slot"], r["value"]) for r in decision["rewards"])
        assert got == sorted(acknowledged[event_id])  # nothing lost, nothing twice
        assert len(got) == 6  # slot 0: 0.5, 0.125, 1 (once); slot 1: 0.25, -0.5 twice
        sums = {s["slot"]: s["reward"] for s in decision["slots"]}  # default policy: sum
        assert sums == {0: 1.625, 1: -0.75}
    for event_id, response in stored["races"].items():
        assert response.status_code == 200
        assert len(response.json()["rewards"]) == len(acknowledged.get(event_id, []))

    engine = make_engine(settings.database_url)
    with engine.connect() as connection:
        total = connection.scalar(select(func.count()).select_from(RewardRow))
    engine.dispose()
    assert total == sum(len(v) for v in acknowledged.values())


SHORT_WINDOW = """
holdout_share = 0
vw_args = "--cb_explore_adf --epsilon 0.2"
reward_window_seconds = 1
reward_aggregation = "sum"
"""


def test_late_rewards_are_stored_flagged_and_not_counted(
    settings: Settings, policies_dir: Path
) -> None:
    (policies_dir / "short.toml").write_text(SHORT_WINDOW)

    async def run() -> tuple[list[httpx.Response], dict[str, Any]]:
        async with asgi_client(create_app(settings)) as client:
            body = {"event_id": "late-1", "policy": "short", "candidates": CANDIDATES}
            assert (await client.post("/v1/decisions", json=body)).status_code == 200
            on_time = await client.post(
                "/v1/decisions/late-1/rewards", json={"value": 1, "reward_id": "a"}
            )
            await asyncio.sleep(1.3)  # the 1-second window closes
            late = await asyncio.gather(
                *(
                    client.post("/v1/decisions/late-1/rewards", json={"value": 0.5})
                    for _ in range(3)
                )
            )
            retry = await client.post(
                "/v1/decisions/late-1/rewards", json={"value": 1, "reward_id": "a"}
            )
            return [on_time, *late, retry], (await client.get("/v1/decisions/late-1")).json()

    (on_time, *late, retry), decision = asyncio.run(run())
    assert on_time.status_code == 201 and on_time.json()["late"] is False
    assert all(r.status_code == 201 and r.json()["late"] is True for r in late)
    # A retry after the window answers the stored reward: on time, as it was acknowledged.
    assert retry.status_code == 200 and retry.json()["late"] is False
    assert retry.json()["duplicate"] is True
    assert sorted((r["value"], r["late"]) for r in decision["rewards"]) == [
        (0.5, True), (0.5, True), (0.5, True), (1.0, False),
    ]  # fmt: skip
    assert decision["slots"][0]["reward"] == 1.0  # late rewards are stored, not learned
