"""The whole loop over HTTP: decide, reward, the in-process trainer learns, serving reloads.

A seeded synthetic environment where the best candidate depends on the context: users of
segment s click the article on topic s with probability 0.9 and any other with 0.1. A
policy that cannot personalise stays near uniform (1/4 per candidate); a learned one puts
1 - epsilon + epsilon/4 = 0.925 on the best candidate. Requests go out 25 at a time, as
concurrent users would send them (and so that group commit batches them).

4,000 events: with 2,000, the untrained model's greedy arm (the first candidate, sports,
for every user) left the sports segment's best article below 0.8 in about one run of
three (the same seeds: which model serves which request depends on the trainer's
timing); VW's importance-weighted updates from explorations of probability 0.025 need
more of them. ``benchmarks/learning_loop_runs.py`` counts it: 2,000 events, 11 of 16 runs
learned every segment; 4,000 events, 18 of 18 (docs/performance.md, session 8).
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import httpx

from bandit_service.app import create_app
from bandit_service.config import Settings
from tests.e2e.asgi import asgi_client

EVENTS = 4000
CONCURRENCY = 25
TOPICS = ["sports", "news", "food", "travel"]
CANDIDATES = [{"id": f"article-{t}", "features": {"topic": t}} for t in TOPICS]
POLICY = """
holdout_share = 0
vw_args = "--cb_explore_adf --epsilon 0.1 -q ua"
reward_min = 0
reward_max = 1
default_reward = 0
reward_window_seconds = 1
"""


async def simulate(client: httpx.AsyncClient, rng: random.Random) -> None:
    for start in range(0, EVENTS, CONCURRENCY):
        events = [(f"sim-{i}", rng.choice(TOPICS)) for i in range(start, start + CONCURRENCY)]
        responses = await asyncio.gather(
            *(
                client.post(
                    "/v1/decisions",
                    json={
                        "policy": "learn",
                        "context": {"user": {"segment": segment}},
                        "candidates": CANDIDATES,
                        "event_id": event_id,
                    },
                )
                for event_id, segment in events
            )
        )
        rewards = []
        for (event_id, segment), response in zip(events, responses, strict=True):
            assert response.status_code == 200, response.text
            shown = response.json()["slots"][0]["id"]
            if rng.random() < (0.9 if shown == f"article-{segment}" else 0.1):
                rewards.append(client.post(f"/v1/decisions/{event_id}/rewards", json={"value": 1}))
        assert all(r.status_code == 201 for r in await asyncio.gather(*rewards))


async def wait_until_caught_up(client: httpx.AsyncClient, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = (await client.get("/v1/policies/learn")).json()
        model = status["model"]
        if status["counts"]["pending"] == 0 and model["serving_version"] == model["version"]:
            return status
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.1)


def test_the_service_learns_the_best_candidate_per_context(
    settings: Settings, policies_dir: Path
) -> None:
    (policies_dir / "learn.toml").write_text(POLICY)
    live = settings.model_copy(
        update={
            "trainer": "inline",
            "train_interval_seconds": 0.2,
            "model_reload_seconds": 0.2,
            "trainer_commit_grace_seconds": 0.2,
        }
    )
    app = create_app(live)

    async def run() -> None:
        async with asgi_client(app) as client:
            await simulate(client, random.Random(20261122))
            status = await wait_until_caught_up(client, timeout=30)
            assert status["model"]["version"] > 1  # several checkpoints along the way
            assert status["counts"]["learned"] == status["counts"]["decisions"] == EVENTS

            for segment in TOPICS:
                response = await client.post(
                    "/v1/decisions?include=pmf",
                    json={"policy": "learn", "context": {"user": {"segment": segment}},
                          "candidates": CANDIDATES},
                )  # fmt: skip
                decision = response.json()
                assert decision["model_version"] == status["model"]["version"]
                pmf = {p["id"]: p["probability"] for p in decision["slots"][0]["pmf"]}
                assert pmf[f"article-{segment}"] > 0.8, (segment, pmf)  # uniform: 0.25

    asyncio.run(run())
