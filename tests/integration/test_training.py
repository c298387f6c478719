"""The learning loop on SQLite and PostgreSQL: windows, exactly-once, leases, modes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import text

from bandit_service.config import Settings
from bandit_service.domain import Candidate, DecisionRequest, Slot, slot_list
from bandit_service.policy import PolicyConfig, load_policies, parse_policy
from bandit_service.service import DecisionService
from bandit_service.store.database import make_engine
from bandit_service.training import LeaseLost, PolicyTrainer, Trainer, TrainerOptions

T = TypeVar("T")
CANDIDATES = tuple(Candidate(f"c{i}", {"k": f"v{i}"}) for i in range(4))


class RecordingLearner:
    """A learner whose 'model' is the list of what it learned, so a checkpoint round-trips
    exactly what was learned and a test can see skips and doubles."""

    def __init__(self, vw_args: str, model: bytes | None, version: int) -> None:
        self.model_version = version
        self.learned: list[dict[str, Any]] = json.loads(model) if model else []

    def learn_slot(
        self,
        context: Mapping[str, Any],
        slot_index: int,
        slot_features: Mapping[str, Any],
        candidates: list[Candidate],
        chosen: int,
        probability: float,
        reward: float,
    ) -> None:
        self.learned.append(
            {
                "n": context["n"],
                "slot": slot_index,
                "id": candidates[chosen].id,
                "eligible": [c.id for c in candidates],
                "p": probability,
                "reward": reward,
            }
        )

    def to_bytes(self) -> bytes:
        return json.dumps(self.learned).encode()


def write_policy(folder: Path, name: str, body: str) -> PolicyConfig:
    """Write a policy file; without a holdout unless the body sets one."""
    if "holdout_share" not in body:
        body = "holdout_share = 0\n" + body
    (folder / f"{name}.toml").write_text(body)
    return load_policies(folder)[name]


def with_service(settings: Settings, action: Callable[[DecisionService], Awaitable[T]]) -> T:
    """Run ``action`` against a started service (trainer off), then close it."""

    async def run() -> T:
        service = DecisionService(
            settings.model_copy(update={"trainer": "off"}), load_policies(settings.policies_dir)
        )
        await service.start()
        try:
            return await action(service)
        finally:
            await service.close()

    return asyncio.run(run())


def log_decisions(
    settings: Settings,
    policy: str,
    count: int,
    slots: int = 1,
    prefix: str | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Decide ``count`` times (event ids ``{prefix}-{i}``, context ``{"n": i}``)."""

    async def decide_all(service: DecisionService) -> list[dict[str, Any]]:
        return [
            await service.decide(
                DecisionRequest(
                    event_id=f"{prefix or policy}-{i}",
                    policy=policy,
                    candidates=CANDIDATES,
                    slots=slot_list(slots),
                    context={"n": i},
                    **kwargs,
                )
            )
            for i in range(count)
        ]

    return with_service(settings, decide_all)


def reward(settings: Settings, event_id: str, value: float, slot: int = 0) -> dict[str, Any]:
    return with_service(settings, lambda service: service.reward(event_id, value, slot, None))


def sql(settings: Settings, statement: str, **params: Any) -> None:
    engine = make_engine(settings.database_url)
    with engine.begin() as connection:
        connection.execute(text(statement), params)
    engine.dispose()


_ENGINES: list[Any] = []


@pytest.fixture(autouse=True)
def _dispose_engines() -> Any:
    """Trainers built by these tests share nothing; close their pools after each test so
    the PostgreSQL server is not left with idle connections."""
    yield
    while _ENGINES:
        _ENGINES.pop().dispose()


def trainer(
    settings: Settings, policy: PolicyConfig, clock: float, owner: str = "t1", **options: Any
) -> PolicyTrainer:
    engine = make_engine(settings.database_url)
    _ENGINES.append(engine)
    return PolicyTrainer(
        engine,
        policy,
        owner,
        TrainerOptions(commit_grace_seconds=0, **options),
        clock=lambda: clock,
        learner_factory=RecordingLearner,
    )


def test_reward_window_default_reward_late_and_deferred(
    settings: Settings, policies_dir: Path
) -> None:
    policy = write_policy(
        policies_dir, "win", 'vw_args = "--cb_explore_adf"\nreward_window_seconds = 60\n'
        "default_reward = -0.25\nreward_aggregation = \"sum\"\n",
    )  # fmt: skip
    rows = log_decisions(settings, "win", 3, slots=2)
    # Event 0: two on-time rewards on slot 1 (summed), none on slot 0 (default).
    reward(settings, rows[0]["event_id"], 0.5, slot=1)
    reward(settings, rows[0]["event_id"], 0.25, slot=1)
    # Event 1: no reward at all. Event 2: a reward after its window -> late, not learned.
    sql(settings, "UPDATE decisions SET created_at = created_at - 120 WHERE event_id = :e",
        e=rows[2]["event_id"])  # fmt: skip
    late = reward(settings, rows[2]["event_id"], 1.0)
    assert late["late"] is True

    now = time.time()
    # Before the windows close (except event 2's), nothing is learned: order is kept.
    early = trainer(settings, policy, clock=now + 30)
    assert early.step().learned == 0

    t = trainer(settings, policy, clock=now + 61)
    result = t.step()
    assert result.learned == 3
    learned = {(x["n"], x["slot"]): x for x in t.learner.learned}  # type: ignore[union-attr]
    assert learned[(0, 0)]["reward"] == -0.25
    assert learned[(0, 1)]["reward"] == 0.75
    assert learned[(1, 0)]["reward"] == learned[(1, 1)]["reward"] == -0.25
    assert learned[(2, 0)]["reward"] == -0.25  # the late 1.0 is not learned
    for (n, slot), example in learned.items():
        stored = rows[n]["slots"][slot]
        assert example["id"] == stored["id"] and example["p"] == stored["probability"]
        assert example["eligible"] == [cid for cid, _ in stored["pmf"]]


def test_deferred_decisions_are_learned_only_if_activated(
    settings: Settings, policies_dir: Path
) -> None:
    policy = write_policy(policies_dir, "def", "reward_window_seconds = 60\n")
    rows = log_decisions(settings, "def", 3, defer=True)
    now = time.time()
    sql(settings, "UPDATE decisions SET activated_at = :t WHERE event_id = :e",
        t=now, e=rows[1]["event_id"])  # fmt: skip
    # Activated after its window: does not count either.
    sql(settings, "UPDATE decisions SET activated_at = :t WHERE event_id = :e",
        t=now + 100, e=rows[2]["event_id"])  # fmt: skip
    t = trainer(settings, policy, clock=now + 200)
    result = t.step()
    assert (result.learned, result.skipped) == (1, 2)
    assert [x["n"] for x in t.learner.learned] == [1]  # type: ignore[union-attr]


def test_crash_between_learning_and_checkpoint_neither_skips_nor_doubles(
    settings: Settings, policies_dir: Path
) -> None:
    policy = write_policy(policies_dir, "crash", "reward_window_seconds = 1\n")
    log_decisions(settings, "crash", 30)
    clock = time.time() + 10

    crashing = trainer(settings, policy, clock, batch_events=10)
    crashing.step()  # events 0-9 learned and checkpointed

    def die() -> None:
        raise SystemExit("killed between learning and checkpoint")

    crashing.before_checkpoint = die
    with pytest.raises(SystemExit):
        crashing.step()  # events 10-19 learned in memory, then the process dies

    restarted = trainer(settings, policy, clock, batch_events=10)  # same owner: a restart
    while restarted.step().more:
        pass
    learned = [x["n"] for x in restarted.learner.learned]  # type: ignore[union-attr]
    assert learned == list(range(30))  # each event once, in order
    assert restarted.learned_events == 30


def test_only_one_trainer_per_policy_learns(settings: Settings, policies_dir: Path) -> None:
    policy = write_policy(policies_dir, "solo", "reward_window_seconds = 1\n")
    log_decisions(settings, "solo", 20)
    clock = time.time() + 10
    first = trainer(settings, policy, clock, owner="a", batch_events=10, lease_seconds=30)
    second = trainer(settings, policy, clock, owner="b", batch_events=10, lease_seconds=30)
    assert first.step().learned == 10
    assert second.step().active is False  # waits while the lease is held
    assert first.step().learned == 10
    assert second.step().active is False
    assert second.learned_events == 0

    # When the first trainer dies and its lease expires, the second takes over where the
    # first stopped.
    later = trainer(settings, policy, clock + 60, owner="b", batch_events=100)
    result = later.step()
    assert result.active is True and result.learned == 0
    assert later.learned_events == 20 and later.position == first.position


def apprentice_decisions(settings: Settings, prefix: str, count: int) -> list[dict[str, Any]]:
    """Apprentice decisions whose baseline is c2: not the first candidate, so an untrained
    model (whose top choice is the first candidate) does not match it by accident."""

    async def decide_all(service: DecisionService) -> list[dict[str, Any]]:
        return [
            await service.decide(
                DecisionRequest(
                    event_id=f"{prefix}-{i}",
                    policy="app",
                    candidates=CANDIDATES,
                    slots=(Slot("0", baseline="c2"),),
                    context={"n": i},
                )
            )
            for i in range(count)
        ]

    return with_service(settings, decide_all)


def test_apprentice_serves_baseline_and_reports_match_rate(
    settings: Settings, policies_dir: Path
) -> None:
    write_policy(
        policies_dir, "app",
        'learning_mode = "apprentice"\nreward_window_seconds = 1\n'
        'vw_args = "--cb_explore_adf --epsilon 0.1"\n',
    )  # fmt: skip
    policies = load_policies(policies_dir)
    rows = apprentice_decisions(settings, "before", 40)
    for row in rows:  # always the baseline, with probability 1, never explored
        slot = row["slots"][0]
        assert (slot["id"], slot["probability"], slot["explored"]) == ("c2", 1.0, False)
    assert sum(r["slots"][0]["model_id"] == "c2" for r in rows) == 0  # untrained: no match
    before = with_service(settings, lambda service: service.policy_status("app"))
    assert before["apprentice"]["slots_compared"] == 40
    assert before["apprentice"]["match_rate"] == 0

    engine = make_engine(settings.database_url)
    results = Trainer(
        engine, policies, TrainerOptions(commit_grace_seconds=0), clock=lambda: time.time() + 5
    ).run_once()
    engine.dispose()
    assert results["app"].learned == 40

    after_rows = apprentice_decisions(settings, "after", 20)
    assert all(r["slots"][0]["id"] == "c2" for r in after_rows)  # still serves the baseline
    assert all(r["slots"][0]["model_id"] == "c2" for r in after_rows)  # and now imitates it
    after = with_service(settings, lambda service: service.policy_status("app"))
    assert after["apprentice"]["slots_compared"] == 60
    assert after["apprentice"]["match_rate"] == pytest.approx(20 / 60)


def test_a_failure_before_checkpoint_relearns_each_event_exactly_once(
    settings: Settings, policies_dir: Path
) -> None:
    """An ordinary exception (database hiccup) between learning and checkpoint: the trainer
    goes on running, and the events of the failed step are learned once, not twice."""
    policy = write_policy(policies_dir, "hiccup", "reward_window_seconds = 1\n")
    log_decisions(settings, "hiccup", 12)
    t = trainer(settings, policy, time.time() + 10, batch_events=5)
    failures = iter([RuntimeError("connection reset")])

    def flaky() -> None:
        if (error := next(failures, None)) is not None:
            raise error

    t.before_checkpoint = flaky
    with pytest.raises(RuntimeError):
        t.step()
    while t.step().more:
        pass
    assert [x["n"] for x in t.learner.learned] == list(range(12))  # type: ignore[union-attr]
    assert t.learned_events == 12


def test_a_trainer_that_outlives_its_lease_cannot_checkpoint(
    settings: Settings, policies_dir: Path
) -> None:
    """Trainer A stalls after learning, past its lease; B takes over and checkpoints. A's
    checkpoint is then refused (fencing), so nothing is learned twice."""
    policy = write_policy(policies_dir, "fence", "reward_window_seconds = 1\n")
    log_decisions(settings, "fence", 10)
    now = time.time() + 10
    a = trainer(settings, policy, now, owner="a", lease_seconds=5)
    b = trainer(settings, policy, now + 60, owner="b", lease_seconds=5)
    a.before_checkpoint = lambda: b.step()  # while A stalls, its lease expires and B works
    with pytest.raises(LeaseLost):
        a.step()
    assert b.learned_events == 10
    assert a.step().active is False  # B holds the lease now
    resumed = trainer(settings, policy, now + 60, owner="b")
    resumed.step()
    assert [x["n"] for x in resumed.learner.learned] == list(range(10))  # type: ignore[union-attr]


def test_an_unreplayable_row_is_skipped_not_stalling(
    settings: Settings, policies_dir: Path
) -> None:
    policy = write_policy(policies_dir, "bad", "reward_window_seconds = 1\n")
    rows = log_decisions(settings, "bad", 5)
    # Row 2 names a candidate set without the candidates its slot was drawn over; row 3's
    # slot has no distribution at all. Neither can be replayed; both are skipped.
    sql(settings, "INSERT INTO candidate_sets (key, candidates) VALUES ('empty', '[]')")
    sql(settings, "UPDATE decisions SET candidate_set = 'empty' WHERE event_id = :e",
        e=rows[2]["event_id"])  # fmt: skip
    sql(settings, "UPDATE decisions SET slots = '[{\"slot\": 0}]' WHERE event_id = :e",
        e=rows[3]["event_id"])  # fmt: skip
    t = trainer(settings, policy, time.time() + 10)
    result = t.step()
    assert (result.learned, result.skipped) == (3, 2)
    assert [x["n"] for x in t.learner.learned] == [0, 1, 4]  # type: ignore[union-attr]


def test_logging_only_never_changes_the_model(settings: Settings, policies_dir: Path) -> None:
    write_policy(
        policies_dir, "quiet", 'learning_mode = "logging_only"\nreward_window_seconds = 1\n'
    )
    policies = load_policies(policies_dir)
    rows = log_decisions(settings, "quiet", 10)
    assert all(r["slots"][0]["id"] == "c0" for r in rows)  # the default baseline: the first
    for r in rows:
        reward(settings, r["event_id"], 1.0)
    engine = make_engine(settings.database_url)
    results = Trainer(engine, policies, TrainerOptions(commit_grace_seconds=0),
                      clock=lambda: time.time() + 5).run_once()  # fmt: skip
    assert "quiet" not in results
    engine.dispose()
    rows = log_decisions(settings, "quiet", 3, prefix="again")
    assert all(r["model_version"] == 0 for r in rows)


def test_policy_changes_continue_or_warm_start(settings: Settings, policies_dir: Path) -> None:
    body = "holdout_share = 0\nreward_window_seconds = 1\n"
    body += 'vw_args = "--cb_explore_adf --epsilon {eps} {q}"\n'
    v1 = parse_policy("evolve", json_toml(body.format(eps=0.1, q="-q ca")))
    write_policy(policies_dir, "evolve", body.format(eps=0.1, q="-q ca"))
    log_decisions(settings, "evolve", 12)
    clock = time.time() + 5
    t1 = trainer(settings, v1, clock)
    t1.step()
    assert t1.learned_events == 12

    # Only the exploration rate changes: the same model continues, nothing is relearned.
    v2 = parse_policy("evolve", json_toml(body.format(eps=0.3, q="-q ca")))
    assert v2.version != v1.version and v2.model_key == v1.model_key
    t2 = trainer(settings, v2, clock, owner="t2", lease_seconds=1)
    t2.clock = lambda: clock + 100  # the first trainer's lease has expired
    t2.step()
    assert t2.learned_events == 12 and t2.model_version == t1.model_version
    assert len(t2.learner.learned) == 12  # type: ignore[union-attr]

    # The interactions change: a new model, warm-started by replaying the whole log.
    v3 = parse_policy("evolve", json_toml(body.format(eps=0.3, q="-q cc")))
    assert v3.model_key != v1.model_key
    t3 = trainer(settings, v3, clock + 200, owner="t3")
    t3.step()
    assert t3.learned_events == 12
    assert t3.model_version == t2.model_version + 1  # versions never repeat across models
    assert "warm-starting" in t3.note


def json_toml(body: str) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(body)
