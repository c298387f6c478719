"""With two worker processes, /metrics adds up: any worker answers with the sum of both."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.server import running_server

POLICY = 'holdout_share = 0\nvw_args = "--cb_explore_adf --epsilon 0.2"\nslots = 1\n'


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def test_two_workers_metrics_sum_over_processes(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "default.toml").write_text(POLICY)
    env = {
        "BANDIT_DATABASE_URL": f"sqlite:///{tmp_path / 'bandit.db'}",
        "BANDIT_POLICIES_DIR": str(policies),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    decisions = 40
    with running_server(tmp_path, env, workers=2) as server:
        for i in range(decisions):
            # A new connection each time, so the kernel spreads them over both workers.
            r = httpx.post(
                f"{server.url}/v1/decisions",
                json={"event_id": f"mp-{i}", "candidates": [{"id": "a"}, {"id": "b"}]},
                headers={"connection": "close"},
            )
            assert r.status_code == 200, r.text
        processes: set[str] = set()
        for _ in range(6):
            text = httpx.get(f"{server.url}/metrics", headers={"connection": "close"}).text
            (total,) = samples(text, "bandit_decisions_total")
            assert total == ({"policy": "default", "arm": "bandit"}, decisions)
            processes |= {labels["process"] for labels, _ in
                          samples(text, "bandit_serving_model_version")}  # fmt: skip
        assert len(processes) == 2  # every scrape saw both workers' values
        server.terminate()
        assert server.wait(60) == 0, server.log_text()
