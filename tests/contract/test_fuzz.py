"""The public API under generated input (schemathesis): no 5xx, every 4xx in the error shape.

Schemathesis reads the app's own OpenAPI document and generates requests for every
operation, valid ones and deliberately invalid ones (wrong types, missing fields, odd
strings, huge numbers). Every response must be below 500, conform to the documented
responses (status and schema), and every 4xx body must be the documented error object
``{"error": {"code", "message", "field"}}`` (under ``/personalizer``, the facade's own
``{"error": {"code", "message"[, "target"]}}``). The number of examples per operation is
bounded here (``BANDIT_FUZZ_EXAMPLES``, default 15) to keep the suite fast;
``benchmarks/fuzz_contract.py`` runs the same test with many more.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bandit_service.app import create_app
from bandit_service.config import Settings
from bandit_service.store.database import upgrade
from tests.conftest import TEST_POLICIES

EXAMPLES = int(os.environ.get("BANDIT_FUZZ_EXAMPLES", "15"))
COUNTS: collections.Counter[str] = collections.Counter()


def _app(folder: Path) -> Any:
    """The app on a SQLite store in ``folder`` (made and migrated on first use)."""
    policies = folder / "policies"
    url = f"sqlite:///{folder / 'fuzz.db'}"
    if not policies.exists():
        policies.mkdir()
        for name, body in TEST_POLICIES.items():
            (policies / f"{name}.toml").write_text(body)
        upgrade(url)
    settings = Settings(
        database_url=url, policies_dir=policies, trainer="off", max_body_bytes=64 * 1024
    )
    return create_app(settings)


def _schema_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="bandit-fuzz-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


# The schema is read at import (schemathesis parametrizes per operation at collection).
# The Personalizer facade serves the same handlers under five URL styles: fuzz two of them
# (a path version and the api-version query style the Python client uses), not all five.
schema = schemathesis.openapi.from_asgi("/openapi.json", _app(_schema_folder())).exclude(
    path_regex=r"^/personalizer/v1\.(0|1-preview\.[12])/"
)


SEEDED = {"seed-single": "default", "seed-pair": "bounded"}  # event id -> policy


@schema.hook
def flatmap_path_parameters(_context: Any, path_parameters: dict[str, Any]) -> Any:
    """Random ids are almost never found (404); a third of the time use an id or policy
    name that exists, so the reward, activation, read-back, lift and OPE code runs on
    generated bodies and queries too."""
    if not path_parameters:
        return st.just(path_parameters)
    choices = [path_parameters]
    if "event_id" in path_parameters:
        choices += [{**path_parameters, "event_id": event_id} for event_id in SEEDED]
    if "name" in path_parameters:
        choices += [{**path_parameters, "name": name} for name in TEST_POLICIES]
    return st.sampled_from(choices)


@pytest.fixture
def app(tmp_path: Path) -> Any:
    """A fresh app and store per operation (schemathesis ends an app's lifespan, which
    flushes the writer as on SIGTERM, when each operation's test ends), with one decision
    per policy already logged by another app instance on the same store."""
    with TestClient(_app(tmp_path)) as seeder:
        for event_id, policy in SEEDED.items():
            body = {"event_id": event_id, "policy": policy, "user_id": "u",
                    "candidates": [{"id": "a"}, {"id": "b"}, {"id": "c"}]}  # fmt: skip
            assert seeder.post("/v1/decisions", json=body).status_code == 200
    return _app(tmp_path)


def assert_error_shape(response: Any, path: str) -> None:
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    if path.startswith("/personalizer"):  # Personalizer's own shape
        assert isinstance(error["code"], str) and error["code"], body
        assert isinstance(error["message"], str) and error["message"], body
        assert set(error) <= {"code", "message", "target"}, body
        header = response.headers["x-ms-error-code"]  # a list in schemathesis' responses
        assert (header[0] if isinstance(header, list) else header) == error["code"]
        return
    assert isinstance(error["code"], str) and error["code"], body
    assert isinstance(error["message"], str) and error["message"], body
    assert error["field"] is None or isinstance(error["field"], str), body
    assert set(error) <= {"code", "message", "field", "details"}, body


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_5xx_and_documented_errors(case: Any, app: Any) -> None:
    response = case.call(app=app)
    COUNTS[f"{case.method} {case.path}"] += 1
    COUNTS[f"status {response.status_code}"] += 1
    COUNTS["requests"] += 1
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )
    if 400 <= response.status_code < 500:
        assert_error_shape(response, case.path)


def teardown_module() -> None:
    """Record how many requests were generated (the long run prints this file)."""
    report = os.environ.get("BANDIT_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps(dict(COUNTS), indent=2, sort_keys=True))
