"""The compose stack, checked by parsing it: a Docker engine is not available in CI."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bandit_service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert "pgdata" in document["volumes"]
    found: dict[str, Any] = document["services"]
    return found


def env(service: dict[str, Any]) -> dict[str, str]:
    return {key: str(value) for key, value in service["environment"].items()}


def test_services_and_start_order(services: dict[str, Any]) -> None:
    assert set(services) == {"postgres", "migrate", "api", "trainer"}
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "trainer"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["postgres"]["condition"] == "service_healthy"


def test_database_keeps_its_data_and_reports_health(services: dict[str, Any]) -> None:
    postgres = services["postgres"]
    assert any(v.startswith("pgdata:/var/lib/postgresql/data") for v in postgres["volumes"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


def test_restart_policies_and_healthchecks(services: dict[str, Any]) -> None:
    assert services["migrate"]["restart"] == "no"  # one-shot
    for name in ("postgres", "api", "trainer"):
        assert services[name]["restart"] == "unless-stopped"
        assert services[name]["healthcheck"]["test"]
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    assert "/tmp/trainer.alive" in " ".join(services["trainer"]["healthcheck"]["test"])
    assert "/tmp/trainer.alive" in services["trainer"]["command"]


def test_api_runs_two_workers_without_training_and_sums_metrics(services: dict[str, Any]) -> None:
    api = services["api"]
    command = api["command"]
    assert command[:2] == ["bandit-service", "serve"]
    assert command[command.index("--workers") + 1] == "2"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert env(api)["BANDIT_TRAINER"] == "off"
    assert env(api)["PROMETHEUS_MULTIPROC_DIR"]
    assert services["trainer"]["command"][:2] == ["bandit-service", "train"]


def test_every_bandit_variable_is_a_real_setting_and_points_at_the_database(
    services: dict[str, Any],
) -> None:
    fields = set(Settings.model_fields)
    for name in ("migrate", "api", "trainer"):
        variables = env(services[name])
        assert variables["BANDIT_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in variables["BANDIT_DATABASE_URL"]
        for key in variables:
            if key.startswith("BANDIT_"):
                assert key.removeprefix("BANDIT_").lower() in fields, f"{name}: unknown {key}"


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="no docker-compose CLI on this machine"
)
def test_docker_compose_config_validates() -> None:
    """Valid once API keys are given (the API binds 0.0.0.0 in its container); without
    them compose refuses with a message pointing to the docs."""
    env = {k: v for k, v in os.environ.items() if k != "BANDIT_API_KEYS"}

    def config(extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker-compose", "-f", str(COMPOSE), "config", "--quiet"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            env={**env, **extra},
        )

    result = config({"BANDIT_API_KEYS": '[{"name": "app", "hash": "sha256:' + "0" * 64 + '"}]'})
    assert result.returncode == 0, result.stderr
    refused = config({})
    assert refused.returncode != 0 and "docs/security.md" in refused.stderr
