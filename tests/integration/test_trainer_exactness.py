"""The trainer's fast path (compact log, candidate sets decoded once, eligible lines rendered
once and parsed once into kept VW examples, contexts learned from the serving engine's
stored rendering) must learn exactly what learning each logged slot one by one through
the public learner API, parsing its text, learns: the same VW model, byte for byte, on
SQLite and PostgreSQL, whether a row has its rendering stored or (logged before migration
0006) not."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from bandit_service.config import Settings
from bandit_service.domain import Candidate, DecisionRequest, slot_list
from bandit_service.learners import vw_text
from bandit_service.learners.vw import VWLearner
from bandit_service.policy import load_policies
from bandit_service.rewards import slot_rewards
from bandit_service.service import DecisionService
from bandit_service.store import repository
from bandit_service.store.database import make_engine
from bandit_service.store.models import CandidateSetRow, DecisionRow, ModelCheckpointRow
from bandit_service.training import PolicyTrainer, TrainerOptions

POLICY = """holdout_share = 0.2
vw_args = "--cb_explore_adf --epsilon 0.2 -q ca -q ua"
reward_window_seconds = 1
reward_aggregation = "sum"
default_reward = -0.5
"""


def _candidates(rng: random.Random) -> tuple[Candidate, ...]:
    """Two catalogues (so candidate sets repeat) with every feature kind the renderer takes:
    strings needing escapes, numbers (zero and negative zero), booleans, lists, a nested
    namespace, and an id needing an escape."""
    catalogue = rng.choice([0, 1])
    return tuple(
        Candidate(
            f"item {i}/é" if i == 3 else f"c{i}",
            {
                "topic": ["sport", "news:local", "pets"][(i + catalogue) % 3],
                "score": [0.0, -0.0, 0.25, 1.5, 3][i % 5],
                "fresh": i % 2 == 0,
                "tags": ["a", "b b"] if i % 3 == 0 else [],
                "meta": {"len": i * 10, "lang": "fr" if i % 2 else "en"},
            },
        )
        for i in range(6 + catalogue)
    )


def _context(rng: random.Random, i: int) -> dict[str, Any]:
    """Odd events list their keys in the order PostgreSQL's JSONB keeps them (shorter keys
    first), even events in another order: JSONB does not keep the order a context was sent
    in, so only the stored rendering reproduces what the engine saw for even events."""
    device, hour = rng.choice(["ios", "android", "web"]), rng.randrange(24)
    user = {"age": rng.random(), "vip": rng.random() < 0.3}
    if i % 2:
        return {"hour": hour, "user": user, "device": device}
    return {"device": device, "hour": hour, "user": user}


def _log(settings: Settings, count: int) -> dict[str, dict[str, Any]]:
    """Log ``count`` decisions with rewards; returns each event's context as sent."""
    rng = random.Random(11)
    sent: dict[str, dict[str, Any]] = {}

    async def run() -> None:
        service = DecisionService(
            settings.model_copy(update={"trainer": "off"}), load_policies(settings.policies_dir)
        )
        await service.start()
        try:
            for i in range(count):
                candidates = _candidates(rng)
                sent[f"x-{i}"] = _context(rng, i)
                row = await service.decide(
                    DecisionRequest(
                        event_id=f"x-{i}",
                        policy="exact",
                        candidates=candidates,
                        slots=slot_list(2),
                        # Excluding a middle candidate makes the eligible runs non-contiguous.
                        excluded=frozenset({"c2"}) if i % 4 == 0 else frozenset(),
                        context=sent[f"x-{i}"],
                        user_id=f"u{i % 7}",
                    )
                )
                for slot in range(2):
                    for _ in range(rng.choice([0, 0, 1, 2])):  # none, one or two rewards
                        await service.reward(row["event_id"], rng.choice([0.0, 1.0]), slot, None)
        finally:
            await service.close()

    asyncio.run(run())
    return sent


def _reference_model(
    settings: Settings, vw_args: str, policy: Any, sent: dict[str, dict[str, Any]]
) -> bytes:
    """Learn the log one slot at a time from its classic (written) shape, plain lists of
    candidates, and each event's context as sent, through the learner's public method,
    parsing every line's text (the trainer reuses parsed action examples instead)."""
    learner = VWLearner(vw_args, reuse_examples=False)
    engine = make_engine(settings.database_url)
    for batch in repository.iter_decisions(engine, "exact", chunk=17):
        for decision in batch:
            if decision["arm"] != "bandit":
                continue
            features = {c["id"]: c["features"] for c in decision["candidates"]}
            rewards = slot_rewards(decision, policy)
            for slot, reward in zip(decision["slots"], rewards, strict=True):
                eligible = [Candidate(cid, features[cid]) for cid, _p in slot["pmf"]]
                chosen = [c.id for c in eligible].index(slot["id"])
                learner.learn_slot(
                    sent[decision["event_id"]], slot["slot"], slot["slot_features"], eligible,
                    chosen, slot["probability"], reward,
                )  # fmt: skip
    engine.dispose()
    model = learner.to_bytes()
    learner.close()
    return model


def _train(engine: Any, policy: Any, restart_after: int | None) -> bytes:
    """Train to the end of the log in batches of 13 (several checkpoints); optionally stop
    after ``restart_after`` batches and finish with a new trainer, which resumes from the
    checkpoint's model bytes. Returns the final checkpoint's model."""
    later = time.time() + 10
    options = TrainerOptions(batch_events=13, commit_grace_seconds=0)
    first = PolicyTrainer(engine, policy, "a", options, clock=lambda: later)
    steps = 0
    while (restart_after is None or steps < restart_after) and first.step().more:
        steps += 1
    first.release()
    second = PolicyTrainer(engine, policy, "b", options, clock=lambda: later)
    while second.step().more:
        pass
    # The trainers did learn from kept action examples (not only from parsed text).
    learners = [t.learner for t in (first, second) if isinstance(t.learner, VWLearner)]
    assert sum(x.action_examples.reused for x in learners if x.action_examples) > 0
    with Session(engine) as session:
        checkpoint = repository.latest_checkpoint(session, "exact", with_model=True)
        session.execute(delete(ModelCheckpointRow))  # the next run starts from scratch
        session.commit()
    assert checkpoint is not None and checkpoint["position"] == 80
    assert 0 < checkpoint["learned_events"] < 80  # the holdout's events are not learned
    return bytes(checkpoint["model"])


def _pmfs(model: bytes, vw_args: str) -> list[list[float]]:
    learner = VWLearner(vw_args, model_bytes=model)
    rng = random.Random(3)
    out = []
    for _ in range(20):
        candidates = _candidates(rng)
        context = {"device": rng.choice(["ios", "web"]), "hour": rng.randrange(24),
                   "user": {"age": rng.random(), "vip": rng.random() < 0.5}}  # fmt: skip
        out.append(learner.scorer(context, candidates).pmf(1, {}, list(range(len(candidates)))))
    learner.close()
    return out


def test_trainer_learns_the_same_model_as_slot_by_slot_learning(
    settings: Settings, policies_dir: Path
) -> None:
    (policies_dir / "exact.toml").write_text(POLICY)
    policy = load_policies(policies_dir)["exact"]
    sent = _log(settings, 80)
    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        sets = session.scalars(select(CandidateSetRow.key)).all()
        stored = session.execute(
            select(DecisionRow.event_id, DecisionRow.arm, DecisionRow.context_line)
        ).all()
    assert len(sets) == 2  # the two catalogues, each stored once
    # Each bandit decision stores the engine's rendering of the context as sent; holdout
    # decisions (never learned) store none.
    assert {arm for _e, arm, _l in stored} == {"bandit", "holdout"}
    for event_id, arm, line in stored:
        expected = vw_text.render_context(sent[event_id]) if arm == "bandit" else None
        assert line == expected

    reference = _reference_model(settings, policy.vw_args, policy, sent)
    # One trainer from start to end, learning from the stored renderings: the same bytes.
    assert _train(engine, policy, restart_after=None) == reference
    # Rows logged before migration 0006 have no rendering: the trainer renders their
    # decoded context instead (odd events here, whose key order the store keeps).
    with Session(engine) as session, session.begin():
        session.execute(
            update(DecisionRow)
            .where(DecisionRow.event_id.in_([f"x-{i}" for i in range(1, 80, 2)]))
            .values(context_line=None)
        )
    assert _train(engine, policy, restart_after=None) == reference
    # Restarted half-way, resuming from a checkpoint: VW's reload does not restore every
    # running statistic in the file's header byte for byte, but every weight, hence every
    # prediction, is the same.
    restarted = _train(engine, policy, restart_after=3)
    engine.dispose()
    assert _weights(restarted, policy.vw_args) == _weights(reference, policy.vw_args)
    assert _pmfs(restarted, policy.vw_args) == _pmfs(reference, policy.vw_args)


def _weights(model: bytes, vw_args: str) -> list[tuple[int, float]]:
    workspace = VWLearner._workspace(vw_args, model)
    weights = [(w["index"], w["value"]) for w in json.loads(workspace.json_weights())["weights"]]
    workspace.finish()
    assert len(weights) > 100  # it learned
    return weights
