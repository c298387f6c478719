"""Metrics, request ids and JSON log lines, in process, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from bandit_service.app import create_app
from bandit_service.config import Settings
from bandit_service.ops.logs import JsonFormatter

CANDIDATES = [{"id": c, "features": {"topic": c}} for c in "abcd"]


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def scrape(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_decisions_rewards_and_requests_per_route(client: TestClient) -> None:
    before = scrape(client)
    event_ids = [f"m-{i}-{time.monotonic_ns()}" for i in range(6)]
    for event_id in event_ids:
        r = client.post(
            "/v1/decisions",
            json={"event_id": event_id, "candidates": CANDIDATES, "slots": 2, "user_id": "u"},
        )
        assert r.status_code == 200, r.text
    for event_id in event_ids[:4]:
        r = client.post(f"/v1/decisions/{event_id}/rewards", json={"value": -0.5, "slot": 1})
        assert r.status_code == 201, r.text
    # A repeated event id returns the stored decision: not a new decision.
    again = {"event_id": event_ids[0], "candidates": CANDIDATES}
    assert client.post("/v1/decisions", json=again).status_code == 200
    assert client.post("/v1/decisions", json={"candidates": []}).status_code == 422
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("bandit_decisions_total", policy="default", arm="bandit") == 6
    explored = delta("bandit_slots_total", policy="default", arm="bandit", explored="true")
    exploited = delta("bandit_slots_total", policy="default", arm="bandit", explored="false")
    assert explored + exploited == 12
    assert delta("bandit_rewards_total", policy="default", arm="bandit", timeliness="on_time") == 4
    assert delta(
        "bandit_reward_value_sum", policy="default", arm="bandit", timeliness="on_time"
    ) == pytest.approx(-2.0)
    route = "/v1/decisions/{event_id}/rewards"
    assert delta("bandit_http_requests_total", method="POST", route=route, status="201") == 4
    assert delta("bandit_http_requests_total",
                 method="POST", route="/v1/decisions", status="422") == 1  # fmt: skip
    assert delta("bandit_http_request_duration_seconds_count", method="POST", route=route) == 4
    assert delta("bandit_writer_batch_rows_sum") == 10  # 6 decisions and 4 rewards written
    assert value(after, "bandit_writer_queue_depth") == 0
    # The raw path (with an event id) is never a label value.
    text = client.get("/metrics").text
    assert not any(event_id in text for event_id in event_ids)
    # Store-derived gauges are present for every policy.
    assert value(after, "bandit_model_version", policy="default") >= 0
    assert ("bandit_trainer_lag_seconds", frozenset({("policy", "bounded")})) in after


def test_store_window_counts_on_time_late_and_default_outcomes(
    client: TestClient, settings: Settings
) -> None:
    """`bounded` (2 slots, window 60 s, aggregation last, default reward 0): read the window
    as if 61 s had passed, so every decision made now has a closed window."""
    ids = [f"w-{i}-{time.monotonic_ns()}" for i in range(5)]
    for event_id in ids:
        r = client.post("/v1/decisions", json={"policy": "bounded", "event_id": event_id,
                                               "candidates": CANDIDATES})  # fmt: skip
        assert r.status_code == 200, r.text
    # ids[0]: two on-time rewards on slot 0 (last wins: 0.25) and one on slot 1 (1.0).
    for body in ({"value": 1, "slot": 0}, {"value": 0.25, "slot": 0}, {"value": 1, "slot": 1}):
        assert client.post(f"/v1/decisions/{ids[0]}/rewards", json=body).status_code == 201
    # ids[1]: one on-time reward; a secondary kind on ids[2] does not count as a reward.
    assert client.post(f"/v1/decisions/{ids[1]}/rewards", json={"value": 0.5}).status_code == 201
    r = client.post(f"/v1/decisions/{ids[2]}/rewards", json={"value": 3, "kind": "satisfaction"})
    assert r.status_code == 201
    store = client.app.state.store_metrics  # type: ignore[attr-defined]
    metrics = {m.name: m for m in store._read(time.time() + 61)}
    outcomes = {
        s.labels["outcome"]: s.value
        for s in metrics["bandit_window_decisions"].samples
        if s.labels["policy"] == "bounded" and s.labels["arm"] == "bandit"
    }
    assert outcomes == {"on_time": 2, "late_only": 0, "default": 3}
    (mean,) = [
        s.value for s in metrics["bandit_window_mean_reward"].samples
        if s.labels["policy"] == "bounded"
    ]  # fmt: skip
    assert mean == pytest.approx((0.25 + 1.0 + 0.5) / 5)


def test_request_id_is_echoed_when_sane_and_replaced_otherwise(client: TestClient) -> None:
    assert (
        client.get("/healthz", headers={"X-Request-ID": "trace-1.a:b_c"}).headers["x-request-id"]
        == "trace-1.a:b_c"
    )
    for bad in ("has space", "x" * 129, "new\\nline", "<script>"):
        echoed = client.get("/healthz", headers={"X-Request-ID": bad}).headers["x-request-id"]
        assert echoed != bad and len(echoed) == 32 and echoed.isalnum()
    assert len(client.get("/nope").headers["x-request-id"]) == 32  # also on 404s


def test_decision_and_reward_log_lines_name_the_event_and_never_the_user(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    user_id = "alice@example.com"
    with caplog.at_level(logging.INFO):
        r = client.post(
            "/v1/decisions",
            headers={"X-Request-ID": "req-42"},
            json={"event_id": "log-1", "user_id": user_id, "candidates": CANDIDATES},
        )
        assert r.status_code == 200
        assert client.post("/v1/decisions/log-1/rewards", json={"value": 1}).status_code == 201
    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert all(user_id not in line for line in lines)
    entries = [orjson.loads(line) for line in lines]
    decision = next(e for e in entries if e.get("event") == "decision")
    reward = next(e for e in entries if e.get("event") == "reward")
    for entry in (decision, reward):
        assert entry["event_id"] == "log-1"
        assert entry["policy"] == "default" and entry["arm"] == "bandit"
        assert entry["model_version"] == 0
    assert decision["request_id"] == "req-42"
    assert reward["value"] == 1 and reward["late"] is False


def test_json_formatter_keeps_a_traceback_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("it",), None)
        import sys

        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = orjson.loads(line)
    assert entry["message"] == "failed it" and "ValueError: boom" in entry["exc"]


def test_store_metrics_degrade_to_up_zero_when_the_store_cannot_be_read(
    tmp_path: Path, policies_dir: Path
) -> None:
    from bandit_service.ops.metrics import StoreMetrics, exposition
    from bandit_service.policy import load_policies
    from bandit_service.store.database import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'unmigrated.db'}")  # no tables at all
    store = StoreMetrics(engine, load_policies(policies_dir), window_seconds=60)
    text = exposition(store).decode()
    assert "bandit_store_metrics_up 0.0" in text
    assert "bandit_decisions_total" in text or "bandit_http_requests" in text  # live still served
    engine.dispose()


def test_an_app_that_stopped_is_freed(settings: Settings) -> None:
    """The lifespan freezes start-up objects out of the collector's reach while serving;
    after shutdown they must be collectable again, or every app a process builds (tests,
    embedding) keeps its service, models and VW workspaces for good."""
    import gc
    import weakref

    thresholds = gc.get_threshold()
    app = create_app(settings)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
    service = weakref.ref(app.state.service)
    del app, client
    gc.collect()
    assert service() is None
    assert gc.get_threshold() == thresholds
