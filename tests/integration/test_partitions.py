"""The partitioned log (issue 10, store/partitions.py): retention drops whole partitions on
PostgreSQL and still removes exactly the expired rows; event ids stay unique and rewards
still need their decision without the constraints a partitioned table cannot have."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bandit_service.config import Settings
from bandit_service.domain import Candidate, DecisionRequest, slot_list
from bandit_service.errors import NotFound
from bandit_service.policy import load_policies, parse_policy
from bandit_service.privacy import RetentionJob
from bandit_service.service import DecisionService
from bandit_service.store import partitions, repository
from bandit_service.store import privacy as privacy_store
from bandit_service.store.database import downgrade, make_engine, upgrade
from bandit_service.store.models import CandidateSetRow, DecisionRow, RewardRow
from tests.integration.test_retention import decision, reward

DAY = 86400.0
NOW = 20833 * DAY + 0.25 * DAY  # a quarter into a UTC day in 2027


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def pg(db: Engine) -> Engine:
    if db.dialect.name != "postgresql":
        pytest.skip("partitions exist on PostgreSQL only")
    return db


def partition_names(db: Engine, table: str, policy: str) -> set[str]:
    with db.connect() as connection:
        return {
            partitions.range_partition(table, policy, r.first_day, r.end_day)
            for r in partitions.ranges(connection, table, policy)
        }


def rows_in(db: Engine, relation: str) -> int:
    with db.connect() as connection:
        return int(connection.scalar(text(f"SELECT count(*) FROM {relation}")) or 0)


def seed(db: Engine, policies: list[str], ages_days: list[float], now: float) -> None:
    """One decision per policy and age (its own candidate set), each with a reward received
    at once and a late one received just now."""
    rows, rewards = [], []
    for name in policies:
        for i, age in enumerate(ages_days):
            event_id = f"{name}-{i}"
            rows.append(decision(event_id, name, now - age * DAY))
            rewards += [reward(event_id, 0, now - age * DAY + 1), reward(event_id, 1, now - 1)]
    with Session(db) as session, session.begin():
        repository.insert_decisions(session, rows)
        repository.insert_rewards(session, rewards)


def kept(db: Engine) -> tuple[set[str], set[str], list[str]]:
    with Session(db) as session:
        decisions = set(session.scalars(select(DecisionRow.event_id)))
        rewards = set(session.scalars(select(RewardRow.event_id)))
        sets = session.scalars(select(CandidateSetRow.candidates)).all()
    owners = sorted(s.split('"only-')[1].split('"')[0] for s in sets)
    return decisions, rewards, owners


# -- layout ----------------------------------------------------------------------------------
def test_partitions_exist_ahead_for_policies_with_a_retention(pg: Engine) -> None:
    assert partitions.ensure(pg, [("short", 7.0), ("forever", 0.0)], NOW) == 2 + 3
    today = int(NOW // DAY)
    for table in ("decisions", "rewards"):
        assert partition_names(pg, table, "short") == {
            partitions.range_partition(table, "short", d, d + 1) for d in range(today, today + 3)
        }
        assert partition_names(pg, table, "forever") == set()  # its default partition only
    assert partitions.ensure(pg, [("short", 7.0), ("forever", 0.0)], NOW) == 0  # idempotent
    # A long retention gets wider ranges, so a policy keeps about ten of them.
    assert partitions.ensure(pg, [("long", 365.0)], NOW) == 1 + 1
    with pg.connect() as connection:
        (only,) = partitions.ranges(connection, "decisions", "long")
    assert only.end_day - only.first_day == 37 and only.first_day <= today < only.end_day


def test_wanted_ranges_never_overlap_existing_ones() -> None:
    existing = [partitions.Range(10, 11), partitions.Range(13, 20)]  # width changed since
    got = partitions.wanted_ranges(existing, 10, 4)
    assert got == [partitions.Range(11, 12), partitions.Range(12, 13)]
    assert partitions.wanted_ranges([], 13, 7) == [
        partitions.Range(7, 14),
        partitions.Range(14, 21),
    ]


def test_rows_logged_before_their_partition_existed_are_moved_into_it(pg: Engine) -> None:
    """A decision logged while no partition covered it (a new policy, a late start) lands in
    a default partition; creating the partition later moves it there."""
    seed(pg, ["early"], [0.0], NOW)
    assert rows_in(pg, "decisions_default") == 1 and rows_in(pg, "rewards_default") == 2
    partitions.ensure(pg, [("early", 7.0)], NOW)
    today = int(NOW // DAY)
    assert rows_in(pg, partitions.range_partition("decisions", "early", today, today + 1)) == 1
    assert rows_in(pg, partitions.range_partition("rewards", "early", today, today + 1)) == 2
    assert rows_in(pg, "decisions_default") == 0 and rows_in(pg, "rewards_default") == 0


# -- retention -------------------------------------------------------------------------------
AGES = [0.1, 2.5, 6.9, 7.1, 8.0, 9.5, 29.0, 400.0]  # days before NOW


def partitioned_history(db: Engine, policies: dict[str, float]) -> None:
    """Partitions for the last 10 days (as serving processes would have made them day after
    day), then the rows: those older than 10 days sit in the default partitions."""
    for back in range(10, -1, -1):
        partitions.ensure(db, list(policies.items()), NOW - back * DAY)
    seed(db, list(policies), AGES, NOW)


def test_retention_drops_whole_partitions_and_removes_exactly_the_expired_rows(
    pg: Engine,
) -> None:
    retention = {"short": 7.0, "other": 30.0, "forever": 0.0}
    partitioned_history(pg, retention)
    policies = {name: parse_policy(name, {"retention_days": d}) for name, d in retention.items()}
    dropped_before = partition_names(pg, "decisions", "short")

    results = {r.policy: r for r in RetentionJob(pg, policies, batch=2).run_once(NOW)}

    # short: expired ages 7.1, 8.0, 9.5 (own day partitions), 29 and 400 (default).
    assert (results["short"].decisions, results["short"].rewards) == (5, 10)
    cutoff_day = int((NOW - 7 * DAY) // DAY)  # the range the cutoff falls in stays
    assert results["short"].partitions_dropped == cutoff_day - int((NOW - 10 * DAY) // DAY)
    assert (results["other"].decisions, results["other"].rewards) == (1, 2)  # 400 days
    assert results["other"].partitions_dropped == 0
    left = partition_names(pg, "decisions", "short")
    assert min(left) == partitions.range_partition("decisions", "short", cutoff_day, cutoff_day + 1)
    assert len(dropped_before - left) == results["short"].partitions_dropped
    assert partition_names(pg, "rewards", "short") == {
        n.replace("decisions_", "rewards_", 1) for n in left
    }  # each day's rewards went with its decisions

    expected = {f"short-{i}" for i in (0, 1, 2)} | {f"other-{i}" for i in range(7)}
    expected |= {f"forever-{i}" for i in range(len(AGES))}
    decisions, rewards, set_owners = kept(pg)
    assert decisions == expected and rewards == expected
    assert set_owners == sorted(expected)  # orphaned candidate sets went too
    again = RetentionJob(pg, policies).run_once(NOW)
    assert [(r.decisions, r.rewards, r.partitions_dropped) for r in again] == [(0, 0, 0)] * 2
    # Another process dropped a range this one had listed: nothing to do, no error.
    gone = partitions.Range(cutoff_day - 1, cutoff_day)
    assert partitions.drop_range(pg, "short", gone) == partitions.Dropped(0, 0, [])


def test_whole_partition_mode_keeps_the_cutoff_range_until_it_expires_entirely(
    pg: Engine,
) -> None:
    partitioned_history(pg, {"short": 7.0})
    policies = {"short": parse_policy("short", {"retention_days": 7})}
    boundary_age = 7 + (NOW % DAY) / DAY - 0.05  # in the range the cutoff falls in, expired
    with Session(pg) as session, session.begin():
        repository.insert_decisions(
            session, [decision("boundary", "short", NOW - boundary_age * DAY)]
        )
    job = RetentionJob(pg, policies, whole_partitions=True)
    (result,) = job.run_once(NOW)
    # Ages 8 and 9.5 (dropped) and 29 and 400 (default partition) went; 7.1 and the
    # boundary row share the range the cutoff falls in, with unexpired rows.
    assert (result.decisions, result.rewards, result.partitions_dropped) == (4, 8, 3)
    assert {"boundary", "short-3"} <= kept(pg)[0]
    (later,) = job.run_once(NOW + DAY)
    assert "boundary" not in kept(pg)[0] and later.partitions_dropped >= 1


def test_a_busy_partition_is_emptied_by_deletes_instead(pg: Engine) -> None:
    """A drop waits briefly for its locks: while a transaction reads the policy's log, the
    expired rows go by the batched delete instead, exactly as many."""
    partitioned_history(pg, {"short": 7.0})
    policies = {"short": parse_policy("short", {"retention_days": 7})}
    reader = make_engine(pg.url.render_as_string(hide_password=False))
    old = partitions.LOCK_ATTEMPTS
    partitions.LOCK_ATTEMPTS = 2
    try:
        with Session(reader) as session, session.begin():
            session.execute(select(func.count()).where(DecisionRow.policy == "short"))
            (result,) = RetentionJob(pg, policies).run_once(NOW)
    finally:
        partitions.LOCK_ATTEMPTS = old
        reader.dispose()
    assert (result.decisions, result.rewards, result.partitions_dropped) == (5, 10, 0)
    assert kept(pg)[0] == {f"short-{i}" for i in (0, 1, 2)}


def test_delete_user_leaves_nothing_across_partitions(db: Engine) -> None:
    partitions.ensure(db, [("short", 7.0)], NOW - 2 * DAY)
    partitions.ensure(db, [("short", 7.0)], NOW)
    seed(db, ["short"], [0.1, 1.5, 3.0, 50.0], NOW)  # range partitions and the default
    with Session(db) as session, session.begin():
        counts = privacy_store.delete_user(session, "k", keep_opt_out=False)
    assert (counts["decisions"], counts["rewards"], counts["candidate_sets"]) == (4, 8, 4)
    with Session(db) as session:
        for table in (DecisionRow, RewardRow, CandidateSetRow):
            assert session.scalar(select(func.count()).select_from(table)) == 0


# -- uniqueness and references without constraints ----------------------------------------------
def test_concurrent_inserts_of_one_event_id_store_it_once(pg: Engine) -> None:
    """The writer's look-up-then-insert, from several connections at once, without the
    log-append lock: only the per-event-id lock keeps the id unique (no unique index)."""
    db = pg
    threads, rounds = 4, 10
    barrier = threading.Barrier(threads)
    outcomes: list[str] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        for i in range(rounds):
            barrier.wait()
            event_id = f"same-{i}"
            with Session(db) as session, session.begin():
                repository.lock_event_ids(session, [f"other-{n}-{i}", event_id])
                if repository.find_decisions(session, [event_id]):
                    result = "found"
                else:
                    repository.insert_decisions(session, [decision(event_id, "p", 1.0)])
                    result = "inserted"
            with lock:
                outcomes.append(result)

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert outcomes.count("inserted") == rounds
    with Session(db) as session:
        stored = session.execute(
            select(DecisionRow.event_id, func.count()).group_by(DecisionRow.event_id)
        ).all()
    assert sorted(stored) == [(f"same-{i}", 1) for i in range(rounds)]


def _request(event_id: str) -> DecisionRequest:
    return DecisionRequest(
        event_id=event_id, policy="default", candidates=(Candidate("a"), Candidate("b"),
        Candidate("c")), slots=slot_list(1), context={"k": "v"}, user_id="u",
    )  # fmt: skip


def test_concurrent_decides_with_one_event_id_from_several_processes(settings: Settings) -> None:
    """Several serving processes (each its own engine, writer and event loop, in threads)
    receive the same client event ids at once: one stored decision each, one answer."""
    processes, rounds = 3, 12
    barrier = threading.Barrier(processes)
    answers: dict[int, list[dict[str, Any]]] = {}
    policies = load_policies(settings.policies_dir)
    quiet = settings.model_copy(update={"trainer": "off"})

    def serve(n: int) -> None:
        async def run() -> list[dict[str, Any]]:
            service = DecisionService(quiet, policies)
            await service.start()
            try:
                got = []
                for i in range(rounds):
                    await asyncio.to_thread(barrier.wait)
                    got.append(await service.decide(_request(f"retry-{i}")))
                return got
            finally:
                await service.close()

        answers[n] = asyncio.run(run())

    workers = [threading.Thread(target=serve, args=(n,)) for n in range(processes)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(answers) == processes
    for i in range(rounds):
        # default=list: a fresh row's pmf is the engine's Distribution (service.decision_row)
        seen = {(json.dumps(a[i]["slots"], sort_keys=True, default=list), a[i]["created_at"])
                for a in answers.values()}  # fmt: skip
        assert len(seen) == 1
    db = make_engine(settings.database_url)
    try:
        with Session(db) as session:
            assert session.scalar(select(func.count()).select_from(DecisionRow)) == rounds
    finally:
        db.dispose()


def test_a_reward_for_an_unknown_event_is_refused(db: Engine, settings: Settings) -> None:
    seed(db, ["p"], [0.0], NOW)
    with pytest.raises(NotFound, match="nope"), Session(db) as session, session.begin():
        repository.insert_rewards(session, [reward("p-0", 9, NOW), reward("nope", 0, NOW)])

    async def through_the_service() -> None:
        service = DecisionService(
            settings.model_copy(update={"trainer": "off"}), load_policies(settings.policies_dir)
        )
        await service.start()
        try:
            with pytest.raises(NotFound):
                await service.reward("never-decided", 1.0, 0, None)
            # The decision vanished after the service looked it up (delete-user, retention):
            # refused as not found, not stored and not a 503.
            with pytest.raises(NotFound):
                await service.writer.write_reward(
                    {"event_id": "gone", "slot": 0, "value": 1.0, "received_at": NOW,
                     "window_end": None, "kind": "primary", "reward_id": "r-gone"}
                )  # fmt: skip
        finally:
            await service.close()

    asyncio.run(through_the_service())
    with Session(db) as session:
        assert set(session.scalars(select(RewardRow.event_id))) == {"p-0"}
        assert session.scalar(select(func.count()).select_from(RewardRow)) == 2


# -- migration -------------------------------------------------------------------------------
def test_upgrade_and_downgrade_keep_the_log(empty_database_url: str) -> None:
    url = empty_database_url
    upgrade(url, "0007_shared_lines")
    db = make_engine(url)
    try:
        rows = [decision(f"{p}-{i}", p, NOW - i * DAY) for p in ("a", "b") for i in range(3)]
        with Session(db) as session, session.begin():
            repository.insert_decisions(session, rows)
            for row in rows:
                session.execute(
                    text(
                        "INSERT INTO rewards (event_id, slot, value, received_at, late, kind, "
                        "reward_id) VALUES (:e, 0, 1.0, :t, false, 'primary', :r)"
                    ),
                    {"e": row["event_id"], "t": NOW, "r": f"r-{row['event_id']}"},
                )
        before = snapshot(db)
        upgrade(url)
        assert snapshot(db) == before
        with Session(db) as session:
            filled = session.execute(
                select(RewardRow.event_id, RewardRow.policy, RewardRow.decision_created_at)
            ).all()
        assert {(e, p) for e, p, _ in filled} == {(r["event_id"], r["policy"]) for r in rows}
        assert all(c == NOW - int(e[2]) * DAY for e, _, c in filled)
        if db.dialect.name == "postgresql":  # the history is in one range per policy
            for table in ("decisions", "rewards"):
                assert rows_in(db, partitions.policy_partition(table, "a") + "_default") == 0
                assert rows_in(db, f"{table}_default") == 0
                (history,) = partition_names(db, table, "a")
                assert rows_in(db, history) == 3
        partitions.ensure(db, [("a", 7.0)], NOW)  # a range partition gets rows...
        with Session(db) as session, session.begin():
            repository.insert_decisions(session, [decision("a-new", "a", NOW)])
            repository.insert_rewards(session, [reward("a-new", 0, NOW)])
        newest = max(p for _e, p, _c in snapshot(db)[0])
        assert newest > max(p for _e, p, _c in before[0])  # positions continue
        downgrade(url, "0007_shared_lines")  # ...and the downgrade keeps them too
        after = snapshot(db)
        assert {e for e, _p, _c in after[0]} == {e for e, _p, _c in before[0]} | {"a-new"}
        with Session(db) as session, session.begin():
            repository.insert_decisions(session, [decision("after", "a", NOW)])
        assert max(p for _e, p, _c in snapshot(db)[0]) > newest  # never reused
        with pytest.raises(IntegrityError), Session(db) as session, session.begin():
            session.execute(  # the foreign key is back
                text(
                    "INSERT INTO rewards (event_id, slot, value, received_at, late, kind) "
                    "VALUES ('nope', 0, 1.0, 1.0, false, 'primary')"
                )
            )
        with pytest.raises(IntegrityError), Session(db) as session, session.begin():
            repository.insert_decisions(session, [decision("a-1", "a", NOW)])  # unique again
        upgrade(url)
    finally:
        db.dispose()


def snapshot(db: Engine) -> tuple[set[tuple[str, int, float]], set[tuple[str, str | None]]]:
    with db.connect() as connection:
        decisions = connection.execute(
            text("SELECT event_id, position, created_at FROM decisions")
        ).all()
        rewards = connection.execute(text("SELECT event_id, reward_id FROM rewards")).all()
    return {(e, p, c) for e, p, c in decisions}, {(e, r) for e, r in rewards}
