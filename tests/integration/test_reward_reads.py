"""Rewards' batched decision look-ups (store/reward_reads.py), on SQLite and PostgreSQL:
every answer is the one ``repository.find_decision_for_reward`` gives alone -- found,
not found, duplicates in one batch, an unreachable store (503, never 500) -- a reward for
an acknowledged decision always finds it, no failure strands a waiting request, and
close() answers what is pending and stops the thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy import exc as sa_exc

from bandit_service.app import create_app
from bandit_service.config import Settings
from bandit_service.errors import NotFound, Unavailable
from bandit_service.policy import load_policies
from bandit_service.service import DecisionService
from bandit_service.store import repository, reward_reads
from bandit_service.store.database import make_engine
from bandit_service.store.reward_reads import RewardReader
from tests.e2e.asgi import asgi_client
from tests.integration.test_reward_driver import _seed

CANDIDATES = [{"id": f"c{i}", "features": {"topic": f"t{i % 3}"}} for i in range(6)]


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "reward-reader" and t.is_alive()]


def alone(db: Engine, event_id: str) -> Any:
    """What the look-up answered before: its row, or its exception's type."""
    try:
        return repository.find_decision_for_reward(db, event_id)
    except Exception as exc:
        return type(exc)


async def batched(reader: RewardReader, event_ids: list[str]) -> list[Any]:
    """The reader's answers (row, or exception type) to look-ups asked all at once."""
    answers = await asyncio.gather(
        *(reader.find(event_id) for event_id in event_ids), return_exceptions=True
    )
    return [type(a) if isinstance(a, BaseException) else a for a in answers]


def test_a_batch_mixing_known_unknown_and_repeated_ids_answers_each(db: Engine) -> None:
    _seed(db, ["m"])  # m-0 .. m-3; m-3 deferred and activated
    ids = ["m-0", "nope", "m-3", "m-0", "m-1", "nope", "", "M-0", "m-0 ", "m-2"]

    async def run() -> tuple[list[Any], RewardReader]:
        reader = RewardReader(db)
        reader.start()
        try:
            return await batched(reader, ids), reader
        finally:
            await reader.close()

    answers, reader = asyncio.run(run())
    expected = [alone(db, event_id) for event_id in ids]
    assert answers == expected
    assert [a is None for a in answers] == [False, True, False, False, False, True, True,
                                            True, True, False]  # fmt: skip
    for got, want in zip(answers, expected, strict=True):
        if want is not None:  # decoded alike: the same types (deferred a bool, slots a list)
            assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in want.items()}
    assert answers[2]["deferred"] is True and answers[0]["deferred"] is False
    assert answers[0] is not answers[3]  # a repeated id: each request its own row
    assert (reader.batches_read, reader.lookups_read) == (1, len(ids))  # one query
    assert readers() == []


def test_an_id_the_store_refuses_fails_only_its_own_look_up(db: Engine) -> None:
    """PostgreSQL refuses text with a NUL character: the batch is answered id by id, so
    its neighbours are found and that one gets the error it got alone."""
    _seed(db, ["n"])
    ids = ["n-0", "n-\x001", "nope", "n-2"]

    async def run() -> list[Any]:
        reader = RewardReader(db)
        reader.start()
        try:
            return await batched(reader, ids)
        finally:
            await reader.close()

    answers = asyncio.run(run())
    assert answers == [alone(db, event_id) for event_id in ids]
    assert answers[0] is not None and answers[3] is not None


def test_large_batches_are_answered_in_full(db: Engine) -> None:
    """More look-ups than a batch holds, and (SQLite) more ids than one IN list."""
    _seed(db, [f"b{i}" for i in range(300)])  # 1,200 decisions
    ids = [f"b{i}-{j}" for i in range(300) for j in (0, 3)] + [f"x{i}" for i in range(700)]

    async def run() -> tuple[list[Any], RewardReader]:
        reader = RewardReader(db, max_batch=1500)
        reader.start()
        try:
            return await batched(reader, ids), reader
        finally:
            await reader.close()

    answers, reader = asyncio.run(run())
    assert sum(a is None for a in answers) == 700
    assert [a["event_id"] for a in answers[:600]] == ids[:600]
    assert answers[1] == alone(db, "b0-3")
    assert reader.batches_read == 1


def test_concurrent_rewards_for_decisions_just_made_are_all_found(settings: Settings) -> None:
    """Each client decides, then rewards at once: an acknowledged decision is committed,
    so every batched look-up finds it (none is a 404), in far fewer queries than rewards."""

    async def run() -> tuple[list[int], RewardReader]:
        app = create_app(settings)
        async with asgi_client(app) as client:

            async def decide_then_reward(n: int) -> list[int]:
                statuses = []
                for _ in range(5):
                    decided = await client.post("/v1/decisions", json={"candidates": CANDIDATES})
                    event_id = decided.json()["event_id"]
                    rewarded = await client.post(
                        f"/v1/decisions/{event_id}/rewards", json={"value": n % 2}
                    )
                    statuses.append(rewarded.status_code)
                return statuses

            results = await asyncio.gather(*(decide_then_reward(n) for n in range(64)))
            reader = app.state.service.reward_reader
        return [s for statuses in results for s in statuses], reader

    statuses, reader = asyncio.run(run())
    assert statuses == [201] * 320
    assert reader.lookups_read == 320
    assert reader.batches_read < 320  # batched
    assert readers() == []  # stopped with the app


def test_unknown_event_ids_are_404(settings: Settings) -> None:
    async def run() -> list[Any]:
        async with asgi_client(create_app(settings)) as client:
            decided = await client.post("/v1/decisions", json={"candidates": CANDIDATES})
            known = decided.json()["event_id"]
            answers = await asyncio.gather(
                *(
                    client.post(f"/v1/decisions/{event_id}/rewards", json={"value": 1})
                    for event_id in ["nope", known, "nope", known.upper(), "x" * 200]
                )
            )
        return [(r.status_code, r.json().get("error", {}).get("code")) for r in answers]

    assert asyncio.run(run()) == [
        (404, "not_found"), (201, None), (404, "not_found"), (404, "not_found"),
        (404, "not_found"),
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_an_unreachable_store_raises_what_a_lone_look_up_raised(store: str, tmp_path: Path) -> None:
    url = (
        f"sqlite:///{tmp_path}/missing-folder/bandit.db"
        if store == "sqlite"
        else f"postgresql+psycopg://postgres@127.0.0.1:{_free_port()}/nothing"
    )
    engine = make_engine(url)

    async def run() -> list[Any]:
        reader = RewardReader(engine)
        reader.start()
        try:
            return await batched(reader, ["a", "b", "a"])
        finally:
            await reader.close()

    try:
        before = alone(engine, "a")
        assert before is sa_exc.OperationalError  # the API's 503 store_unavailable
        assert asyncio.run(run()) == [before] * 3
    finally:
        engine.dispose()


def test_a_store_outage_answers_503_not_500(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the store does not answer, a reward is 503 ``store_unavailable`` with
    Retry-After (as each lone look-up's OperationalError was), and served again after."""
    down = threading.Event()
    select = RewardReader._select

    def flaky(reader: RewardReader, event_ids: list[str]) -> Any:
        if down.is_set():
            raise sa_exc.OperationalError("SELECT", {}, ConnectionError("connection refused"))
        return select(reader, event_ids)

    monkeypatch.setattr(RewardReader, "_select", flaky)

    async def run() -> None:
        async with asgi_client(create_app(settings)) as client:
            decided = await client.post("/v1/decisions", json={"candidates": CANDIDATES})
            event_id = decided.json()["event_id"]
            down.set()
            during = await asyncio.gather(
                *(
                    client.post(f"/v1/decisions/{event_id}/rewards", json={"value": 1})
                    for _ in range(8)
                )
            )
            for response in during:
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "store_unavailable"
                assert response.headers["retry-after"] == "1"
            down.clear()
            after = await client.post(f"/v1/decisions/{event_id}/rewards", json={"value": 1})
            assert after.status_code == 201

    asyncio.run(run())


def test_a_kept_connection_that_died_costs_a_retry_not_an_answer(db: Engine) -> None:
    if db.dialect.name != "postgresql":
        pytest.skip("a server-side disconnect needs PostgreSQL")
    _seed(db, ["k"])

    async def run() -> None:
        reader = RewardReader(db)
        reader.start()
        try:
            assert (await reader.find("k-0")) is not None
            held = reader._connection
            assert held is not None
            pid = held.connection.driver_connection.info.backend_pid
            with db.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            assert await batched(reader, ["k-1", "nope"]) == [alone(db, "k-1"), None]
            assert reader._connection is not held
        finally:
            await reader.close()

    asyncio.run(run())


def test_a_failing_batch_strands_no_request_and_the_reader_goes_on(
    db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed(db, ["f"])
    failures = iter([RuntimeError("boom"), sa_exc.ProgrammingError("SELECT", {}, ValueError())])
    select = RewardReader._select

    def failing_once(reader: RewardReader, event_ids: list[str]) -> Any:
        failure = next(failures, None)
        if isinstance(failure, RuntimeError):
            raise failure  # not even a store error: each waiter gets it
        if failure is not None:
            raise failure  # a store error that is not an outage: each id alone
        return select(reader, event_ids)

    monkeypatch.setattr(RewardReader, "_select", failing_once)

    async def run() -> list[list[Any]]:
        reader = RewardReader(db)
        reader.start()
        try:
            return [await batched(reader, ["f-0", "nope", "f-0"]) for _ in range(3)]
        finally:
            await reader.close()

    first, second, third = asyncio.run(run())
    expected = [alone(db, "f-0"), None, alone(db, "f-0")]
    # RuntimeError is not a SQLAlchemy error: answered one by one as before, too.
    assert first == expected
    assert second == expected
    assert third == expected


def test_an_unexpected_failure_answers_every_waiter(
    db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(reader: RewardReader, event_ids: list[str]) -> Any:
        raise MemoryError("out of memory")

    monkeypatch.setattr(RewardReader, "_look_up", broken)

    async def run() -> list[Any]:
        reader = RewardReader(db)
        reader.start()
        try:
            return await asyncio.wait_for(batched(reader, ["a", "b", "c"]), 10)
        finally:
            await reader.close()

    assert asyncio.run(run()) == [MemoryError] * 3


def test_close_answers_pending_look_ups_then_goes_one_at_a_time(db: Engine) -> None:
    _seed(db, ["c"])

    async def run() -> tuple[list[Any], list[Any], RewardReader]:
        reader = RewardReader(db)
        reader.start()
        pending = [
            asyncio.ensure_future(reader.find(event_id)) for event_id in ["c-0", "nope", "c-3"] * 50
        ]
        await asyncio.sleep(0)  # every look-up asked for...
        await reader.close()  # ...and answered before close() returns
        assert all(task.done() for task in pending)
        assert readers() == []
        after = [await reader.find("c-0"), await reader.find("nope")]  # as before
        return [task.result() for task in pending], after, reader

    answers, after, reader = asyncio.run(run())
    assert answers == [alone(db, "c-0"), None, alone(db, "c-3")] * 50
    assert after == [alone(db, "c-0"), None]
    assert reader._connection is None
    if db.dialect.name == "postgresql":  # given back as it came: not in autocommit mode
        with db.connect() as connection:
            assert connection.connection.driver_connection.autocommit is False


def test_a_reward_after_close_answers_as_before(settings: Settings) -> None:
    """Known decision: the closed writer's 503; unknown: 404 -- as without the reader."""

    async def run() -> None:
        service = DecisionService(settings, load_policies(settings.policies_dir))
        await service.start()
        _seed(service.db, ["s"])
        pending = asyncio.ensure_future(service.reward("s-0", 1.0, None, None))
        await asyncio.sleep(0)
        await service.close()
        with pytest.raises(Unavailable):  # its look-up was answered; the writer closed
            await pending
        assert readers() == []
        with pytest.raises(Unavailable, match="shutting down"):
            await service.reward("s-1", 1.0, None, None)
        with pytest.raises(NotFound):
            await service.reward("nope", 1.0, None, None)

    asyncio.run(run())


def test_the_reader_gives_its_connection_back_when_idle(
    db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reward_reads, "IDLE_RELEASE_SECONDS", 0.05)
    _seed(db, ["i"])

    async def run() -> None:
        reader = RewardReader(db)
        reader.start()
        try:
            assert (await reader.find("i-0")) is not None
            deadline = time.monotonic() + 5
            while reader._connection is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert reader._connection is None
            assert (await reader.find("i-1")) == alone(db, "i-1")  # checked out again
        finally:
            await reader.close()

    asyncio.run(run())


def test_a_failed_start_leaves_no_reader_thread(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = DecisionService(settings, load_policies(settings.policies_dir))

    def broken() -> None:
        raise RuntimeError("catalog unreadable")

    monkeypatch.setattr(service.catalog, "refresh", broken)
    with pytest.raises(RuntimeError, match="catalog unreadable"):
        asyncio.run(service.start())
    assert readers() == []
    service.db.dispose()
