"""Holdout and lift end to end: the popularity arm learns what is popular from the log,
and the lift report (HTTP and CLI, table, JSON and PNG) reads the same log."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from bandit_service.app import create_app
from bandit_service.cli import main
from bandit_service.config import Settings
from bandit_service.holdout import in_holdout
from bandit_service.policy import load_policies
from tests.e2e.asgi import asgi_client

CANDIDATES = [{"id": c, "features": {"category": f"cat-{c}"}} for c in "abcd"]
POLICY = """
holdout_share = 0.5
reward_min = 0
reward_max = 1
reward_window_seconds = 1
popularity_refresh_seconds = 1
category_feature = "category"
vw_args = "--cb_explore_adf --epsilon 0.5"
"""


def test_popularity_arm_and_lift_report(
    settings: Settings, policies_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    (policies_dir / "pop.toml").write_text(POLICY)
    policy = load_policies(policies_dir)["pop"]
    live = settings.model_copy(
        update={"trainer": "off", "model_reload_seconds": 0.2, "trainer_commit_grace_seconds": 0}
    )
    app = create_app(live)

    async def run() -> dict:
        async with asgi_client(app) as client:
            arms = {"bandit": 0, "holdout": 0}
            for i in range(240):
                user = f"user-{i % 120}"  # every user comes twice
                decision = (
                    await client.post(
                        "/v1/decisions",
                        json={"policy": "pop", "user_id": user, "candidates": CANDIDATES},
                    )
                ).json()
                arms[decision["arm"]] += 1
                assert decision["arm"] == ("holdout" if in_holdout(policy, user, "") else "bandit")
                slot = decision["slots"][0]
                if decision["arm"] == "holdout":
                    assert slot["probability"] == 1 and slot["explored"] is False
                if slot["id"] == "b":  # b is what people like; others never get a reward
                    reward = {"value": 1, "slot": 0}
                    await client.post(f"/v1/decisions/{decision['event_id']}/rewards", json=reward)
                    await client.post(
                        f"/v1/decisions/{decision['event_id']}/rewards",
                        json={"value": 0.8, "slot": 0, "kind": "satisfaction"},
                    )
            assert min(arms.values()) > 50
            await asyncio.sleep(2.5)  # windows close, the popularity refresh runs
            holdout_user = next(u for u in (f"new-{i}" for i in range(100))
                                if in_holdout(policy, u, ""))  # fmt: skip
            decision = (
                await client.post(
                    "/v1/decisions",
                    json={"policy": "pop", "user_id": holdout_user, "candidates": CANDIDATES},
                )
            ).json()
            assert decision["arm"] == "holdout"
            assert decision["slots"][0]["id"] == "b"  # the most popular candidate first
            bad = await client.get("/v1/policies/pop/lift?since=yesterday")
            assert bad.status_code == 422 and bad.json()["error"]["field"] == "since"
            assert (await client.get("/v1/policies/nope/lift")).status_code == 404
            return (await client.get(f"/v1/policies/pop/lift?until={time.time()}")).json()

    report = asyncio.run(run())
    assert set(report["arms"]) == {"bandit", "holdout"}
    holdout = report["arms"]["holdout"]
    assert holdout["users"] + report["arms"]["bandit"]["users"] == 121
    assert report["tier"] == "not enough data"  # fewer than 100 users per arm
    assert report["sample_ratio"]["mismatch"] is False
    assert holdout["guardrails"]["catalog_coverage"] is not None
    assert "satisfaction" in report["arms"]["bandit"]["guardrails"]["secondary_rewards"]
    assert report["arms"]["bandit"]["guardrails"]["breadth_categories_per_user_period"] > 0

    # The same report from the command line: a table, JSON, and a PNG plot.
    monkeypatch.setenv("BANDIT_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("BANDIT_POLICIES_DIR", str(policies_dir))
    plot = tmp_path / "lift.png"
    assert main(["report", "lift", "--policy", "pop", "--until", str(time.time()),
                 "--plot", str(plot), "--replicates", "200"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "lift:" in table and "exposure Gini" in table and "mean satisfaction" in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", "lift", "--policy", "pop", "--json", "--until", str(time.time())]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["arms"]["holdout"]["decisions"] == holdout["decisions"]
    assert main(["report", "lift", "--policy", "pop", "--since", "not-a-time"]) == 2
