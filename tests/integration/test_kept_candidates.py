"""Inline candidates sent again are kept (bandit_service/candidate_sets.py, decoded once by
api/fast_body.py). Nothing a client or the trainer sees may change: the same answers and
errors as a request whose candidates are decoded anew (the ``charset`` content type always
takes FastAPI's path, which never keeps them), the same log to the byte, the same model;
limits, identifier rules and duplicate ids still apply per request; a kept set is shared by
every decision over it and must never be changed by one."""

from __future__ import annotations

import asyncio
import copy
import json
import random
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from bandit_service.api import fast_body
from bandit_service.apikeys import create_key, make_entry
from bandit_service.app import create_app
from bandit_service.candidate_sets import KeptSetCache
from bandit_service.config import Settings
from bandit_service.learners.vw_text import action_line
from bandit_service.policy import load_policies
from bandit_service.store import compact, repository
from bandit_service.store.database import make_engine, upgrade
from bandit_service.store.models import (
    CandidateSetRow,
    DecisionRow,
    ModelCheckpointRow,
    RewardRow,
    TrainerLeaseRow,
)
from bandit_service.training import PolicyTrainer, TrainerOptions
from tests.e2e.asgi import asgi_client

FAST = {"content-type": "application/json"}
SLOW = {"content-type": "application/json; charset=utf-8"}  # FastAPI's path: never kept

LEARNING = """holdout_share = 0
vw_args = "--cb_explore_adf --epsilon 0.2 -q ca"
reward_window_seconds = 1
slots = 2
"""
RULED = """holdout_share = 0
vw_args = "--cb_explore_adf --epsilon 0.3"

[rules]
exclude_if = [{feature = "in_stock", equals = false}]
pins = [{id = "promo", slot = 0}]
max_per_value = [{feature = "category", max = 1}]
boosts = [{feature = "category", equals = "news", factor = 2.0}]
exploration_positions = [2]
"""
LENIENT = """holdout_share = 0
vw_args = "--cb_explore_adf --epsilon 0.2"
allow_identifier_features = true
"""


@pytest.fixture
def kept_sets(monkeypatch: pytest.MonkeyPatch) -> KeptSetCache:
    cache = KeptSetCache()
    monkeypatch.setattr(fast_body, "KEPT_SETS", cache)
    return cache


def _pools(rng: random.Random) -> list[list[dict[str, Any]]]:
    """Two pages of candidates with every feature kind: strings needing escapes, numbers
    (negative zero, integers that equal floats), booleans, lists, a non-ASCII id."""
    return [
        [
            {
                "id": f"item {i}/é" if i == 3 else f"p{page}-{i}",
                "features": {
                    "topic": ["sport", 'news "local"', "pets|cats"][(i + page) % 3],
                    "score": [0.0, -0.0, 0.25, 1, 3.0][i % 5],
                    "fresh": i % 2 == 0,
                    "tags": ["a", "b b"] if i % 3 == 0 else [],
                    "price": rng.randrange(100),
                },
            }
            for i in range(6 + page)
        ]
        for page in range(2)
    ]


_LOGGED = [
    DecisionRow.event_id, DecisionRow.policy, DecisionRow.arm, DecisionRow.candidate_set,
    DecisionRow.slots, DecisionRow.context, DecisionRow.context_line, DecisionRow.user_key,
    DecisionRow.excluded, DecisionRow.model_version, DecisionRow.deferred,
]  # fmt: skip


def _dump(url: str) -> dict[str, Any]:
    """Everything the log holds of the decisions, in log order (positions themselves go on
    counting after the log is emptied), in a comparable form."""
    engine = make_engine(url)
    with Session(engine) as session:
        decisions = session.execute(select(*_LOGGED).order_by(DecisionRow.position)).all()
        sets = session.execute(select(CandidateSetRow.key, CandidateSetRow.candidates)).all()
        rewards = session.execute(select(RewardRow.event_id, RewardRow.slot, RewardRow.value)).all()
    engine.dispose()
    return {
        "decisions": [tuple(row) for row in decisions],
        "sets": sorted(tuple(row) for row in sets),
        "rewards": sorted(tuple(row) for row in rewards),
    }


def _train_and_wipe(url: str, policies_dir: Path) -> bytes:
    """Train the whole log once (several checkpoints), return the model, empty the log."""
    policy = load_policies(policies_dir)["learning"]
    engine = make_engine(url)
    later = time.time() + 10
    trainer = PolicyTrainer(
        engine, policy, "t", TrainerOptions(batch_events=13, commit_grace_seconds=0),
        clock=lambda: later,
    )  # fmt: skip
    while trainer.step().more:
        pass
    trainer.release()
    with Session(engine) as session, session.begin():
        checkpoint = repository.latest_checkpoint(session, "learning", with_model=True)
        for table in (RewardRow, DecisionRow, CandidateSetRow, ModelCheckpointRow,
                      TrainerLeaseRow):  # fmt: skip
            session.execute(delete(table))
    engine.dispose()
    assert checkpoint is not None and checkpoint["learned_events"] == 40
    return bytes(checkpoint["model"])


def test_kept_candidates_log_and_learn_exactly_as_decoded_ones(
    settings: Settings, policies_dir: Path, kept_sets: KeptSetCache
) -> None:
    """The same 40 decisions (same event ids, so the same draws) through the fast path,
    where candidates repeat and are kept, and through FastAPI's path, where each request's
    are decoded anew: the same answers, log rows, candidate-set keys and texts, and the
    same trained model, byte for byte."""
    (policies_dir / "learning.toml").write_text(LEARNING)
    rng = random.Random(4)
    pools = _pools(rng)
    events = []
    for i in range(40):
        pool = pools[rng.randrange(2)]
        body = {
            "policy": "learning",
            "event_id": f"k-{i}",
            "candidates": pool,
            "context": {"device": rng.choice(["ios", "web"]), "hour": rng.randrange(24)},
            "user_id": f"u{i % 5}",
        }
        if i % 4 == 0:  # a middle candidate excluded: eligible runs that are not contiguous
            body["excluded"] = [pool[2]["id"]]
        rewards = [{"value": rng.choice([0.0, 1.0]), "slot": s} for s in range(2)]
        events.append((orjson.dumps(body), rewards))
    settings = settings.model_copy(update={"trainer": "off"})

    def run(headers: dict[str, str]) -> tuple[list[Any], dict[str, Any], bytes]:
        answers: list[Any] = []

        async def drive() -> None:
            app = create_app(settings)
            async with asgi_client(app) as client:
                for data, rewards in events:
                    response = await client.post(
                        "/v1/decisions?include=pmf", content=data, headers=headers
                    )
                    assert response.status_code == 200, response.text
                    answers.append(response.json())
                    event_id = response.json()["event_id"]
                    for reward in rewards:
                        stored = await client.post(f"/v1/decisions/{event_id}/rewards", json=reward)
                        assert stored.status_code == 201, stored.text

        asyncio.run(drive())
        dump = _dump(settings.database_url)
        return answers, dump, _train_and_wipe(settings.database_url, policies_dir)

    kept = run(FAST)
    assert kept_sets.hits == 38 and kept_sets.misses == 2  # two pages, decoded once each
    decoded = run(SLOW)
    assert kept_sets.hits == 38  # FastAPI's path never keeps
    assert kept[0] == decoded[0]  # the answers
    assert kept[1] == decoded[1]  # the log, every column
    assert len(kept[1]["sets"]) == 2 and len(kept[1]["decisions"]) == 40
    assert kept[2] == decoded[2]  # the model


def _sqlite_settings(tmp_path: Path, policies_dir: Path, **extra: Any) -> Settings:
    url = f"sqlite:///{tmp_path / 'kept.db'}"
    upgrade(url)
    return Settings(database_url=url, policies_dir=policies_dir, trainer="off", **extra)


async def _both(
    client: httpx.AsyncClient, body: Any, headers: dict[str, str] | None = None
) -> httpx.Response:
    """POST a decision on the fast path twice (decoded, then kept) and once on FastAPI's:
    the same status and error; successful draws differ only by their event ids."""
    data = json.dumps(body).encode()
    answers = [
        await client.post("/v1/decisions", content=data, headers={**how, **(headers or {})})
        for how in (FAST, FAST, SLOW)
    ]
    for other in answers[1:]:
        assert other.status_code == answers[0].status_code, (other.text, answers[0].text)
        if answers[0].status_code != 200:
            assert other.json() == answers[0].json()
    return answers[0]


def test_identifiers_are_refused_per_policy_with_kept_candidates(
    tmp_path: Path, policies_dir: Path, kept_sets: KeptSetCache
) -> None:
    (policies_dir / "lenient.toml").write_text(LENIENT)
    app = create_app(_sqlite_settings(tmp_path, policies_dir))
    contact = [{"id": "a", "features": {"t": "x"}},
               {"id": "b", "features": {"contact": "ana@example.com"}}]  # fmt: skip
    owned = [{"id": "a", "features": {"owner": "u-7"}}, {"id": "b"}]

    async def run() -> None:
        async with asgi_client(app) as client:
            for _ in range(2):  # the scan is kept with the set; the policy decides each time
                assert (
                    await _both(client, {"candidates": contact, "policy": "lenient"})
                ).is_success
                refused = await _both(client, {"candidates": contact})
                assert refused.status_code == 422
                assert refused.json()["error"]["field"] == "candidates[1].features.contact"
            # The context is named first, as before; then the candidates; then the slots.
            first = await _both(client, {"candidates": contact, "context": {"m": "bo@example.org"}})
            assert first.json()["error"]["field"] == "context.m"
            slots = [{"id": "s", "features": {"m": "bo@example.org"}}]
            later = await _both(client, {"candidates": contact, "slots": slots})
            assert later.json()["error"]["field"] == "candidates[1].features.contact"
            ok = [{"id": "a", "features": {"t": "x"}}, {"id": "b"}]
            last = await _both(client, {"candidates": ok, "slots": slots})
            assert last.json()["error"]["field"] == "slots[0].features.m"
            # The raw user id depends on the request, not on the kept set.
            for user, status in (("u-7", 422), ("u-8", 200), ("u-7", 422)):
                answer = await _both(client, {"candidates": owned, "user_id": user})
                assert answer.status_code == status, answer.text
            assert "raw user_id" in answer.json()["error"]["message"]
            assert answer.json()["error"]["field"] == "candidates[0].features.owner"
            allowed = {"candidates": owned, "user_id": "u-7", "policy": "lenient"}
            assert (await _both(client, allowed)).is_success
        assert kept_sets.hits >= 15

    asyncio.run(run())


def test_limits_and_duplicates_apply_to_kept_candidates(
    tmp_path: Path, policies_dir: Path, kept_sets: KeptSetCache
) -> None:
    small, roomy = create_key(), create_key()
    entries = [
        make_entry(small, name="small", scopes=["decide"], max_features_per_candidate=2,
                   max_candidates=3),
        make_entry(roomy, name="roomy", scopes=["decide"]),
    ]  # fmt: skip
    keys = json.dumps([e.model_dump(exclude_none=True) for e in entries])
    app = create_app(_sqlite_settings(tmp_path, policies_dir, api_keys=keys, max_candidates=4))
    wide = [{"id": "a", "features": {"x": 1}}, {"id": "b", "features": {"x": 1, "y": 2, "z": 3}}]
    small_key, roomy_key = {"X-API-Key": small}, {"X-API-Key": roomy}

    async def run() -> None:
        async with asgi_client(app) as client:
            for _ in range(2):  # the same kept set under both keys, in turn
                assert (await _both(client, {"candidates": wide}, roomy_key)).is_success
                refused = await _both(client, {"candidates": wide}, small_key)
                assert refused.status_code == 422, refused.text
                assert refused.json()["error"]["field"] == "candidates[1].features"
                assert "limit of key 'small' of 2" in refused.json()["error"]["message"]
            narrow = [{"id": "a", "features": {"x": 1}}, {"id": "b", "features": {"y": 2}}]
            assert (await _both(client, {"candidates": narrow}, small_key)).is_success
            four = {"candidates": [{"id": str(i)} for i in range(4)]}
            refused = await _both(client, four, small_key)
            assert "limit of key 'small' of 3" in refused.json()["error"]["message"]
            assert (await _both(client, four, roomy_key)).is_success
            five = {"candidates": [{"id": str(i)} for i in range(5)]}
            refused = await _both(client, five, roomy_key)  # BANDIT_MAX_CANDIDATES
            assert refused.status_code == 422 and refused.json()["error"]["field"] == "candidates"
            twice = {"candidates": [{"id": "a"}, {"id": "b"}, {"id": "a"}]}
            refused = await _both(client, twice, roomy_key)
            assert refused.json()["error"]["field"] == "candidates[2].id"
        assert kept_sets.hits >= 10

    asyncio.run(run())


def test_decisions_never_change_a_kept_set(
    tmp_path: Path, policies_dir: Path, kept_sets: KeptSetCache
) -> None:
    """Rules (filters, pins, caps, boosts), the learner, logging and explanations all see
    the shared feature dicts of a kept set: none may change them."""
    (policies_dir / "ruled.toml").write_text(RULED)
    app = create_app(_sqlite_settings(tmp_path, policies_dir))
    pool = [
        {"id": "promo", "features": {"category": "ads"}},
        {"id": "n1", "features": {"category": "news", "tags": ["a", "b"]}},
        {"id": "n2", "features": {"category": "news", "score": 0.5}},
        {"id": "s1", "features": {"category": "sport", "in_stock": True}},
        {"id": "gone", "features": {"category": "food", "in_stock": False}},
        {"id": "f1", "features": {"category": "food"}},
    ]
    original = copy.deepcopy(pool)
    data = orjson.dumps({"candidates": pool})

    async def run() -> None:
        async with asgi_client(app) as client:
            for i in range(30):
                body = {"candidates": pool, "context": {"i": i}, "user_id": f"u{i}"}
                body |= {"policy": "ruled", "slots": 3} if i % 2 else {"slots": 2}
                response = await client.post("/v1/decisions", json=body)
                assert response.status_code == 200, response.text
                event_id = response.json()["event_id"]
                assert (await client.post(f"/v1/decisions/{event_id}/rewards",
                                          json={"value": 1})).status_code == 201  # fmt: skip
                explained = await client.get(f"/v1/decisions/{event_id}/explanation")
                assert explained.status_code == 200, explained.text

    asyncio.run(run())
    assert kept_sets.hits == 29
    kept = fast_body.kept_candidates(data[len(b'{"candidates":') : -1])
    assert kept is not None and kept_sets.hits == 30  # the one the decisions shared
    assert [{"id": c.id, "features": c.features} for c in kept] == original
    assert kept.logged == original
    assert kept.logged.content_key == compact.candidate_set(original)
    assert kept.action_lines == tuple(action_line(c["id"], c["features"]) for c in original)
