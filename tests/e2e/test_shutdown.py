"""The real server with two workers: metrics add up; SIGTERM under load loses nothing.

The real server runs in a subprocess (uvicorn, 2 workers, a temp SQLite store). First,
decisions on fresh connections land on both workers and every scrape of /metrics reports
their sum (prometheus multiprocess mode). Then eight clients decide
and reward as fast as they can; after a few hundred acknowledgements the server gets
SIGTERM. It drains (``/readyz`` 503 while still serving), stops accepting, finishes what
is in flight, flushes the group-commit writer and stops the trainer. Afterwards every
decision answered 200 and every reward answered 201 must be in the store.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from tests.e2e.server import running_server

POLICY = """
holdout_share = 0.2
vw_args = "--cb_explore_adf --epsilon 0.2"
slots = 1
reward_window_seconds = 1
"""
CANDIDATES = [{"id": f"c{i}", "features": {"topic": f"t{i % 3}"}} for i in range(4)]


async def _client_loop(
    client: httpx.AsyncClient,
    worker: int,
    decided: set[str],
    rewarded: set[tuple[str, float]],
    stop: asyncio.Event,
) -> None:
    i = 0
    while not stop.is_set():
        event_id = f"w{worker}-{i}"
        value = round(((worker * 1000 + i) % 997) / 997, 6)
        i += 1
        try:
            r = await client.post(
                "/v1/decisions",
                json={"event_id": event_id, "user_id": f"u{i % 50}",
                      "candidates": CANDIDATES, "context": {"w": worker}},
            )  # fmt: skip
            if r.status_code != 200:
                assert r.status_code == 503, r.text  # refused while stopping: not acknowledged
                continue
            decided.add(event_id)
            r = await client.post(f"/v1/decisions/{event_id}/rewards", json={"value": value})
            if r.status_code == 201:
                rewarded.add((event_id, value))
            else:
                assert r.status_code == 503, r.text
        except httpx.TransportError:
            return  # the server stopped accepting: this client is done


async def _readiness_loop(client: httpx.AsyncClient, seen: list[tuple[int, str]]) -> None:
    while True:
        try:
            r = await client.get("/readyz")
        except httpx.TransportError:
            return
        seen.append((r.status_code, r.json()["reason"]))
        await asyncio.sleep(0.05)


async def _load_then_sigterm(server, decided, rewarded, readiness) -> None:  # type: ignore[no-untyped-def]
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as client:
        tasks = [
            asyncio.create_task(_client_loop(client, w, decided, rewarded, stop)) for w in range(8)
        ]
        probe = asyncio.create_task(_readiness_loop(client, readiness))
        while len(rewarded) < 200:
            await asyncio.sleep(0.05)
            assert not all(t.done() for t in tasks), server.log_text()
        server.terminate()
        # Keep the load on through the drain and the stop; clients end when refused.
        done, _ = await asyncio.wait([*tasks, probe], timeout=60)
        stop.set()
        for task in done:
            task.result()  # re-raise an unexpected status seen by a client


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def _check_metrics_sum_over_workers(url: str, decisions: int) -> None:
    for i in range(decisions):
        # A new connection each time, so the kernel spreads them over both workers.
        r = httpx.post(
            f"{url}/v1/decisions",
            json={"event_id": f"mp-{i}", "candidates": CANDIDATES},
            headers={"connection": "close"},
        )
        assert r.status_code == 200, r.text
    processes: set[str] = set()
    for _ in range(4):
        text = httpx.get(f"{url}/metrics", headers={"connection": "close"}).text
        total = sum(v for labels, v in _samples(text, "bandit_decisions_total"))
        assert total == decisions  # whichever worker answered, the sum over both
        processes |= {labels["process"] for labels, _ in
                      _samples(text, "bandit_serving_model_version")}  # fmt: skip
    assert len(processes) == 2


def test_two_workers_sum_metrics_and_sigterm_loses_no_acknowledged_event(
    tmp_path: Path,
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "default.toml").write_text(POLICY)
    db = tmp_path / "bandit.db"
    env = {
        "BANDIT_DATABASE_URL": f"sqlite:///{db}",
        "BANDIT_POLICIES_DIR": str(policies),
        "BANDIT_DRAIN_SECONDS": "1",
        "BANDIT_TRAIN_INTERVAL_SECONDS": "0.2",
        "BANDIT_TRAINER_COMMIT_GRACE_SECONDS": "0.2",
        "BANDIT_LOG_LEVEL": "info",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    decided: set[str] = set()
    rewarded: set[tuple[str, float]] = set()
    readiness: list[tuple[int, str]] = []
    with running_server(tmp_path, env, workers=2) as server:
        _check_metrics_sum_over_workers(server.url, 20)
        time.sleep(1.0)  # let some reward windows close, so the trainer is mid-work
        asyncio.run(_load_then_sigterm(server, decided, rewarded, readiness))
        code = server.wait(60)
        log = server.log_text()
    assert code == 0, log

    # /readyz went from ready to "draining" while the server still answered.
    statuses = [status for status, _ in readiness]
    assert statuses[0] == 200
    assert any(status == 503 and "draining" in reason for status, reason in readiness), readiness
    assert 200 not in statuses[statuses.index(503) :]

    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as connection:
        stored = {row[0] for row in connection.execute(text("SELECT event_id FROM decisions"))}
        stored_rewards = {
            (row[0], round(row[1], 6))
            for row in connection.execute(text("SELECT event_id, value FROM rewards"))
        }
        leases = connection.execute(text("SELECT count(*) FROM trainer_leases")).scalar()
        checkpoints = connection.execute(text("SELECT count(*) FROM model_checkpoints")).scalar()
    engine.dispose()
    assert len(decided) >= 200
    assert {f"mp-{i}" for i in range(20)} <= stored
    assert decided <= stored, f"{len(decided - stored)} acknowledged decisions lost"
    assert rewarded <= stored_rewards, f"{len(rewarded - stored_rewards)} rewards lost"
    # The trainer stopped cleanly: its checkpoints are committed and its lease released.
    assert checkpoints and checkpoints > 0
    assert leases == 0
    assert '"phase":"writer_flushed"' in log and '"phase":"trainer_stopped"' in log
