"""Nothing acknowledged is lost, on SQLite and PostgreSQL.

* kill -9: a real ``bandit-service serve`` process is SIGKILLed while concurrent clients
  decide and reward; every event id that got a 200 and every reward that got a 201 must be
  in the store, and the service must start again on it.
* store outage (PostgreSQL): the service reaches PostgreSQL through a TCP proxy that the
  test cuts and restores (the shared server itself is never stopped). While it is cut,
  decisions, rewards and /readyz answer 503 with a JSON error, never 500; once it is back,
  the service serves again by itself, and nothing acknowledged is missing.

The longer, heavier versions of both are ``benchmarks/durability.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from bandit_service.app import create_app
from bandit_service.config import Settings
from bandit_service.store.database import make_engine
from bandit_service.store.models import DecisionRow, RewardRow
from tests.e2e.asgi import asgi_client

CANDIDATES = [{"id": f"c{i}", "features": {"topic": f"t{i % 4}", "n": i}} for i in range(20)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Acknowledged:
    def __init__(self) -> None:
        self.decisions: set[str] = set()
        self.rewards: set[tuple[str, float]] = set()


async def decide_and_reward(
    client: httpx.AsyncClient, stop: asyncio.Event, acked: Acknowledged, values: itertools.count
) -> None:
    """Loop until stopped; record what was acknowledged; tolerate a vanished server."""
    while not stop.is_set():
        try:
            response = await client.post("/v1/decisions", json={"candidates": CANDIDATES})
            if response.status_code != 200:
                await asyncio.sleep(0.02)
                continue
            event_id = response.json()["event_id"]
            acked.decisions.add(event_id)
            value = next(values) / 1e6  # unique, so each acknowledged reward is identifiable
            response = await client.post(f"/v1/decisions/{event_id}/rewards", json={"value": value})
            if response.status_code == 201:
                acked.rewards.add((event_id, value))
        except httpx.HTTPError:
            await asyncio.sleep(0.02)


def assert_all_stored(database_url: str, acked: Acknowledged) -> None:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            decisions = set(connection.scalars(select(DecisionRow.event_id)))
            rewards = set(connection.execute(select(RewardRow.event_id, RewardRow.value)))
    finally:
        engine.dispose()
    assert acked.decisions, "nothing was acknowledged: the test proved nothing"
    assert acked.decisions <= decisions, f"lost: {sorted(acked.decisions - decisions)[:5]}"
    assert acked.rewards <= {(e, v) for e, v in rewards}, "an acknowledged reward was lost"


def serve(settings: Settings, port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "BANDIT_DATABASE_URL": settings.database_url,
        "BANDIT_POLICIES_DIR": str(settings.policies_dir),
        "BANDIT_TRAINER": "off",
    }
    cli = Path(sys.executable).parent / "bandit-service"
    return subprocess.Popen(
        [str(cli), "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def wait_ready(client: httpx.AsyncClient, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited"
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get("/readyz")).status_code == 200:
                return
        await asyncio.sleep(0.1)
    raise AssertionError("the server never became ready")


def test_kill_9_under_load_loses_nothing_acknowledged(settings: Settings) -> None:
    port = free_port()
    acked = Acknowledged()

    async def run() -> None:
        proc = serve(settings, port)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                await wait_ready(c, proc)
                stop = asyncio.Event()
                values = itertools.count(1)
                load = asyncio.gather(
                    *(decide_and_reward(c, stop, acked, values) for _ in range(8))
                )
                deadline = time.monotonic() + 20
                while len(acked.rewards) < 40 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                os.kill(proc.pid, signal.SIGKILL)  # one worker: the serving process itself
                proc.wait(timeout=10)
                await asyncio.sleep(0.2)
                stop.set()
                await load
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert_all_stored(settings.database_url, acked)
        proc = serve(settings, port)  # and it starts again on the same store
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                await wait_ready(c, proc)
                response = await c.post("/v1/decisions", json={"candidates": CANDIDATES})
                assert response.status_code == 200
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    asyncio.run(run())


class CuttableProxy:
    """A TCP proxy in front of PostgreSQL: ``cut()`` drops every connection and refuses new
    ones (what clients see while the server restarts); ``restore()`` listens again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def restore(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.mark.postgres
@pytest.mark.parametrize("empty_database_url", ["postgres"], indirect=True)
def test_postgres_outage_answers_503_and_recovers_by_itself(
    settings: Settings, database_url: str
) -> None:
    real = make_url(database_url)
    acked = Acknowledged()

    async def run() -> None:
        proxy = CuttableProxy(real.host or "127.0.0.1", real.port or 5432)
        await proxy.restore()
        via_proxy = real.set(host="127.0.0.1", port=proxy.port)
        proxied = settings.model_copy(
            update={"database_url": via_proxy.render_as_string(hide_password=False)}
        )
        async with asgi_client(create_app(proxied)) as client:
            stop = asyncio.Event()
            values = itertools.count(1)
            load = asyncio.gather(
                *(decide_and_reward(client, stop, acked, values) for _ in range(6))
            )
            await asyncio.sleep(0.5)
            decided = await client.post("/v1/decisions", json={"candidates": CANDIDATES})
            assert decided.status_code == 200
            event_id = decided.json()["event_id"]

            await proxy.cut()
            await asyncio.sleep(0.3)
            during = [
                await client.post("/v1/decisions", json={"candidates": CANDIDATES}),
                await client.post(f"/v1/decisions/{event_id}/rewards", json={"value": 1}),
                await client.get(f"/v1/decisions/{event_id}"),
                await client.get("/readyz"),
            ]
            for response in during:
                assert response.status_code == 503, response.text
                assert response.headers["content-type"] == "application/json"
                if response.url.path != "/readyz":
                    assert response.headers["retry-after"] == "1"
            assert during[1].json()["error"]["code"] == "store_unavailable"

            await proxy.restore()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                response = await client.post(f"/v1/decisions/{event_id}/rewards", json={"value": 1})
                if response.status_code == 201:
                    break
                assert response.status_code == 503
                await asyncio.sleep(0.1)
            assert response.status_code == 201, "the service did not recover by itself"
            assert (await client.get("/readyz")).status_code == 200
            acked.rewards.add((event_id, 1.0))
            before = len(acked.decisions)
            await asyncio.sleep(0.5)
            stop.set()
            await load
            assert len(acked.decisions) > before  # the load is being served again
        await proxy.cut()

    asyncio.run(run())
    assert_all_stored(database_url, acked)
