"""Retention (issue 10) on SQLite and PostgreSQL: exactly the expired rows go, per policy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from bandit_service.cli import main
from bandit_service.config import Settings
from bandit_service.policy import PolicyError, load_policies, parse_policy
from bandit_service.privacy import RetentionJob
from bandit_service.service import DecisionService
from bandit_service.store import privacy as privacy_store
from bandit_service.store import repository
from bandit_service.store.database import make_engine
from bandit_service.store.models import (
    CandidateSetRow,
    DecisionRow,
    ModelCheckpointRow,
    RewardRow,
)

DAY = 86400.0
NOW = 1_800_000_000.0


def decision(event_id: str, policy: str, created_at: float) -> dict[str, Any]:
    return {
        "event_id": event_id, "policy": policy, "policy_version": "v", "model_version": 0,
        "arm": "bandit", "user_key": "k", "context": {},
        "candidates": [{"id": "a"}, {"id": f"only-{event_id}"}],  # a candidate set of its own
        "slots": [{"slot": 0, "id": "a", "probability": 1.0, "pmf": [["a", 1.0]]}],
        "excluded": [], "created_at": created_at, "deferred": False, "activated_at": None,
    }  # fmt: skip


def reward(event_id: str, n: int, received_at: float) -> dict[str, Any]:
    return {
        "event_id": event_id, "slot": 0, "value": 1.0, "received_at": received_at,
        "late": False, "kind": "primary", "reward_id": f"{event_id}-{n}",
    }  # fmt: skip


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def test_retention_removes_exactly_the_expired_rows(db: Engine) -> None:
    policies = {
        "short": parse_policy("short", {"retention_days": 7}),
        "long": parse_policy("long", {"retention_days": 30}),
        "forever": parse_policy("forever", {}),
    }
    ages_days = [0.5, 6.9, 7.01, 8, 29.9, 30.5, 400]
    rows, rewards = [], []
    for name in policies:
        for i, age in enumerate(ages_days):
            event_id = f"{name}-{i}"
            rows.append(decision(event_id, name, NOW - age * DAY))
            # A late reward received recently still goes with its expired decision.
            rewards += [reward(event_id, 0, NOW - age * DAY + 1), reward(event_id, 1, NOW - 1)]
    with Session(db) as session, session.begin():
        repository.insert_decisions(session, rows)
        repository.insert_rewards(session, rewards)
        session.add(
            ModelCheckpointRow(
                policy="short", model_key="m", policy_version="v", model_version=1, position=99,
                learned_events=21, skipped_events=0, created_at=NOW - 100 * DAY, note="",
                model=b"weights",
            )
        )  # fmt: skip

    job = RetentionJob(db, policies, batch=2)  # small batches: the loop is exercised
    results = {r.policy: r for r in job.run_once(NOW)}
    assert set(results) == {"short", "long"}  # retention_days = 0 keeps everything
    assert (results["short"].decisions, results["short"].rewards) == (5, 10)
    assert (results["long"].decisions, results["long"].rewards) == (2, 4)
    assert results["short"].batches == 3 and results["short"].cutoff == NOW - 7 * DAY

    expected = {f"short-{i}" for i in (0, 1)} | {f"long-{i}" for i in range(5)}
    expected |= {f"forever-{i}" for i in range(len(ages_days))}
    with Session(db) as session:
        kept = set(session.scalars(select(DecisionRow.event_id)))
        kept_rewards = set(session.scalars(select(RewardRow.event_id)))
        checkpoints = session.scalars(select(ModelCheckpointRow.policy)).all()
        sets = session.scalars(select(CandidateSetRow.candidates)).all()
    assert kept == expected
    # Candidate sets no decision references any more go too (each decision had its own).
    assert sorted(s.split('"only-')[1].split('"')[0] for s in sets) == sorted(expected)
    assert kept_rewards == expected  # no reward outlives its decision
    assert checkpoints == ["short"]  # models trained on removed rows stay

    again = job.run_once(NOW)  # idempotent
    assert [(r.decisions, r.rewards) for r in again] == [(0, 0), (0, 0)]


def test_undone_opt_outs_are_forgotten_after_a_day(db: Engine) -> None:
    with Session(db) as session, session.begin():
        privacy_store.set_opt_out(session, "still-out", True, NOW - 10 * DAY)
        privacy_store.set_opt_out(session, "undone-long-ago", False, NOW - 2 * DAY)
        privacy_store.set_opt_out(session, "undone-just-now", False, NOW - 60)
    RetentionJob(db, {}).run_once(NOW)
    with Session(db) as session:
        left = {key for key, _out, _at in privacy_store.opt_out_changes(session, 0.0)}
    assert left == {"still-out", "undone-just-now"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"retention_days": -1}, "retention_days must be between"),
        ({"retention_days": 0.01, "reward_window_seconds": 3600}, "must exceed the reward window"),
        ({"retention_days": "30"}, "retention_days must be a number"),
        ({"allow_identifier_features": 1}, "allow_identifier_features must be true or false"),
    ],
)
def test_privacy_policy_keys_are_validated(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy("p", raw)


def test_privacy_keys_at_their_defaults_keep_the_policy_version() -> None:
    """Upgrading must not change the version of an unchanged policy file."""
    plain = parse_policy("p", {})
    explicit = parse_policy("p", {"retention_days": 0, "allow_identifier_features": False})
    assert plain.version == explicit.version
    assert parse_policy("p", {"retention_days": 30}).version != plain.version


def test_serving_processes_and_the_cli_enforce_retention(
    settings: Settings, policies_dir: Path, db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    (policies_dir / "kept.toml").write_text("retention_days = 2\nholdout_share = 0\n")
    now = time.time()

    def seed(prefix: str) -> None:
        with Session(db) as session, session.begin():
            repository.insert_decisions(
                session,
                [decision(f"{prefix}-old", "kept", now - 3 * DAY),
                 decision(f"{prefix}-new", "kept", now - DAY)],
            )  # fmt: skip

    def left() -> set[str]:
        with Session(db) as session:
            return set(session.scalars(select(DecisionRow.event_id)))

    async def serve_until_expired() -> None:
        service = DecisionService(settings.model_copy(update={"trainer": "off"}),
                                  load_policies(policies_dir))  # fmt: skip
        await service.start()
        try:
            for _ in range(200):  # the job runs at start, in the background
                if "svc-old" not in left():
                    return
                await asyncio.sleep(0.05)
        finally:
            await service.close()

    seed("svc")
    asyncio.run(serve_until_expired())
    assert left() == {"svc-new"}
    seed("cli")
    monkeypatch.setenv("BANDIT_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("BANDIT_POLICIES_DIR", str(policies_dir))
    assert main(["retention"]) == 0
    assert left() == {"svc-new", "cli-new"}


def test_an_opt_out_reaches_other_serving_processes(settings: Settings, db: Engine) -> None:
    """Process A stores the opt-out; process B personalized the user before it knew, then
    applies the opt-out at its next refresh and scrubs what it had logged."""
    from bandit_service.domain import Candidate, DecisionRequest, slot_list

    def request(event_id: str) -> DecisionRequest:
        return DecisionRequest(
            event_id=event_id, policy="default", candidates=(Candidate("a"), Candidate("b")),
            slots=slot_list(1), context={"device": "tv"}, user_id="someone",
        )  # fmt: skip

    async def two_processes() -> None:
        policies = load_policies(settings.policies_dir)
        # No background refresh during the test: B refreshes when the test says so.
        quiet = settings.model_copy(update={"trainer": "off", "model_reload_seconds": 600})
        a, b = DecisionService(quiet, policies), DecisionService(quiet, policies)
        await a.start()
        await b.start()
        try:
            await a.set_opt_out("someone", True)
            assert (await a.decide(request("on-a")))["arm"] == "opted_out"
            early = await b.decide(request("on-b-early"))  # B has not refreshed yet
            assert early["arm"] == "bandit" and early["context"] == {"device": "tv"}
            with Session(db) as session:  # logged with the context's rendering too
                assert (
                    session.scalar(
                        select(DecisionRow.context_line).where(DecisionRow.event_id == "on-b-early")
                    )
                    == " |context device=tv"
                )
            await asyncio.to_thread(b.opt_outs.refresh)
            assert (await b.decide(request("on-b-late")))["arm"] == "opted_out"
        finally:
            await a.close()
            await b.close()

    asyncio.run(two_processes())
    with Session(db) as session:
        contexts = dict(session.execute(select(DecisionRow.event_id, DecisionRow.context)).all())
    assert contexts == {"on-a": {}, "on-b-early": {}, "on-b-late": {}}
    with Session(db) as session:  # the rendering of the context is scrubbed with it
        assert session.scalars(select(DecisionRow.context_line)).all() == [None] * 3
