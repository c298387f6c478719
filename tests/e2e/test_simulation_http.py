"""The HTTP simulator against a real uvicorn server: decide, delayed rewards (some late),
the inline trainer learns after each window, the serving path reloads newer models."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from bandit_service.app import create_app
from bandit_service.config import Settings
from simulators.cli import policy_toml
from simulators.http import run_http
from simulators.scenarios import make_scenario

STEPS = 240


@contextmanager
def live_server(settings: Settings) -> Iterator[str]:
    """uvicorn serving the app on a free loopback port, in a thread, lifespan included."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_an_http_run_completes_the_loop(settings: Settings, policies_dir: Path) -> None:
    world = make_scenario("delayed", seed=0, steps=STEPS)
    # The service's window is 1 s; the runner scales the scenario's delays (mean 120 s of
    # a 300 s window) to it, so about 8% of clicks still arrive late.
    text = policy_toml(world).replace("reward_window_seconds = 300.0", "reward_window_seconds = 1")
    assert "reward_window_seconds = 1\n" in text
    (policies_dir / "sim.toml").write_text(text)
    live = settings.model_copy(
        update={
            "trainer": "inline",
            "train_interval_seconds": 0.2,
            "model_reload_seconds": 0.2,
            "trainer_commit_grace_seconds": 0.2,
        }
    )
    with live_server(live) as url:
        result = run_http(world, url, "sim", STEPS, seed=0, window=60, concurrency=8)
        service = result.summary["service"]
        counts = service["counts"]
        assert counts["decisions"] == STEPS
        assert counts["pending"] == 0
        assert counts["learned"] + counts["skipped"] == STEPS
        assert counts["learned"] == STEPS  # no holdout: every event is the bandit's
        assert counts["rewarded"] > 0
        assert service["model_version_end"] > service["model_version_start"] == 0
        assert service["serving_version"] == service["model_version_end"]
        assert service["reward_time_scale"] == 1 / 300
        assert result.summary["visits"] == STEPS
        # run_http returns once the newest model serves, so a second run's decisions come
        # from a model the trainer checkpointed (and serving reloaded) during the first.
        again = run_http(world, url, "sim", 40, seed=1, window=20, concurrency=8)
        assert min(w["model_version"] for w in again.windows) >= service["model_version_end"] > 0
        assert again.summary["service"]["counts"]["decisions"] == STEPS + 40

    # Every reward the simulated users sent is stored (and only those), joined to its
    # decision, with the kinds the scenario sends.
    from bandit_service.store.database import make_engine
    from bandit_service.store.repository import iter_decisions

    db = make_engine(settings.database_url)
    try:
        decisions = [d for batch in iter_decisions(db, "sim") for d in batch]
    finally:
        db.dispose()
    rewards = [r for d in decisions for r in d["rewards"]]
    assert len(decisions) == STEPS + 40
    posted = service["rewards_posted"] + again.summary["service"]["rewards_posted"]
    assert len(rewards) == posted > 0
    assert {r["kind"] for r in rewards} == {"primary"}
    assert sum(r["late"] for r in rewards) < len(rewards)
