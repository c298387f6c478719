"""Drive a running service through its public API: the whole loop, store to reload.

Visits go out ``concurrency`` at a time (``POST /v1/decisions``), as concurrent users would
send them; each user's rewards (``POST /v1/decisions/{id}/rewards``) are sent after the
scenario's delay, scaled from simulated to real seconds by the ratio of the service
policy's reward window to the scenario's, so the same share of rewards arrives late. The
service stores everything, its trainer learns each event after its window closes, and the
serving path reloads the new model: the ``model_version`` of later decisions shows it.
At the end the runner waits until the trainer has caught up (nothing pending, serving the
newest model) and reports the service's own counts.

Only the standard library is used (``http.client`` with one keep-alive connection per
worker thread), so this works from a plain ``pip install``.
"""

from __future__ import annotations

import heapq
import http.client
import json
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from simulators.inprocess import RunResult
from simulators.metrics import WindowAggregator
from simulators.outcomes import ShownSlot, outcome
from simulators.scenarios import Objective, World


class HttpSimulationError(RuntimeError):
    """The service answered something the simulator cannot continue from."""


class ServiceClient:
    """A tiny JSON client over ``http.client``; one connection per thread, retried once."""

    def __init__(self, url: str, timeout: float = 30.0, api_key: str | None = None) -> None:
        parts = urllib.parse.urlsplit(url)
        # A service with API keys needs one with the decide and read scopes.
        self._auth = {"X-API-Key": api_key} if api_key else {}
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HttpSimulationError(f"--url must be http(s)://host[:port], got {url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._timeout = timeout
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self._timeout)
            self._local.conn = conn
        return conn

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"content-type": "application/json"} if data is not None else {}
        headers.update(self._auth)
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request(method, self._prefix + path, body=data, headers=headers)
                response = conn.getresponse()
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                conn.close()
                self._local.conn = None
                if attempt == 1:
                    raise HttpSimulationError(f"{method} {path}: {exc}") from exc
        raise AssertionError("unreachable")


def _check(status: int, body: Any, what: str, expected: int) -> Any:
    if status != expected:
        raise HttpSimulationError(f"{what}: HTTP {status}: {json.dumps(body)[:500]}")
    return body


def run_http(
    world: World,
    url: str,
    policy: str,
    steps: int,
    seed: int,
    window: int,
    objective: Objective = "click",
    concurrency: int = 16,
    catch_up_timeout: float = 120.0,
    progress: Callable[[int], None] | None = None,
    api_key: str | None = None,
) -> RunResult:
    client = ServiceClient(url, api_key=api_key)
    status = _check(*client.call("GET", f"/v1/policies/{policy}"), f"policy {policy!r}", 200)
    server_policy = status["policy"]
    scale = float(server_policy["reward_window_seconds"]) / float(
        world.policy["reward_window_seconds"]
    )
    window_seconds = float(world.policy["reward_window_seconds"])
    start_version = int(status["model"]["version"])
    run_id = uuid.uuid4().hex[:10]  # event ids never collide with an earlier run's
    visits_rng = np.random.default_rng([seed, 0])
    metrics = WindowAggregator(window, world.has_satisfaction)
    due: list[tuple[float, int, str, dict[str, Any]]] = []
    counter = 0
    posted = [0]
    posted_lock = threading.Lock()

    def decide(visit: Any, event_id: str) -> dict[str, Any]:
        body = {
            "policy": policy,
            "event_id": event_id,
            "user_id": visit.user_id,
            "context": visit.context,
            "candidates": [{"id": c.id, "features": dict(c.features)} for c in visit.candidates],
            "slots": visit.slots,
        }
        return _check(*client.call("POST", "/v1/decisions", body), f"decide {event_id}", 200)

    def reward(item: tuple[float, int, str, dict[str, Any]]) -> None:
        _at, _n, event_id, body = item
        _check(*client.call("POST", f"/v1/decisions/{event_id}/rewards", body),
               f"reward {event_id}", 201)  # fmt: skip
        with posted_lock:
            posted[0] += 1

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="sim") as pool:

        def send_due(until: float) -> None:
            ready = []
            while due and due[0][0] <= until:
                ready.append(heapq.heappop(due))
            list(pool.map(reward, ready))

        for start in range(0, steps, concurrency):
            send_due(time.monotonic())
            batch = [
                world.visit(step, visits_rng)
                for step in range(start, min(steps, start + concurrency))
            ]
            ids = [f"sim-{run_id}-{seed}-{v.step}" for v in batch]
            decisions = list(pool.map(decide, batch, ids))
            now = time.monotonic()
            for visit, event_id, decision in zip(batch, ids, decisions, strict=True):
                shown = [ShownSlot(s["id"], bool(s["explored"])) for s in decision["slots"]]
                record, events = outcome(
                    world, visit, shown, decision["arm"], objective, seed, window_seconds,
                    int(decision["model_version"]),
                )  # fmt: skip
                for event in events:
                    counter += 1
                    body = {"value": event.value, "slot": event.slot, "kind": event.kind}
                    heapq.heappush(due, (now + event.delay * scale, counter, event_id, body))
                metrics.add(record)
            if progress is not None:
                progress(len(batch))
        while due:  # the last users' rewards, at their time
            time.sleep(max(0.0, min(0.5, due[0][0] - time.monotonic())))
            send_due(time.monotonic())
    final = _wait_caught_up(client, policy, catch_up_timeout)
    summary = metrics.run_summary(world.change_step)
    summary["service"] = {
        "model_version_start": start_version,
        "model_version_end": final["model"]["version"],
        "serving_version": final["model"]["serving_version"],
        "counts": final["counts"],
        "reward_time_scale": scale,
        "rewards_posted": posted[0],
    }
    summary["policy"] = {k: server_policy.get(k) for k in ("name", "version", "vw_args")}
    return RunResult(metrics.rows, summary)


def _wait_caught_up(client: ServiceClient, policy: str, timeout: float) -> dict[str, Any]:
    """Poll until every decision is learned (or skipped) and the newest model serves."""
    deadline = time.monotonic() + timeout
    while True:
        status = _check(*client.call("GET", f"/v1/policies/{policy}"), "status", 200)
        model = status["model"]
        if status["counts"]["pending"] == 0 and model["serving_version"] == model["version"]:
            return status
        if time.monotonic() > deadline:
            raise HttpSimulationError(
                f"the service's trainer did not catch up within {timeout:.0f}s: "
                f"{status['counts']['pending']} decision(s) pending, model {model['version']}, "
                f"serving {model['serving_version']} (is its trainer running?)"
            )
        time.sleep(0.2)
