"""Bodies validated from JSON bytes (``JsonModelRoute``) must mean what FastAPI's own path
(``json.loads`` then ``model_validate``) means, and bad ones must fail the same way."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from bandit_service.api import routes
from bandit_service.api.json_route import _body_model
from bandit_service.api.schemas import DecisionIn, RewardIn

VALID = [
    b'{"candidates": [{"id": "a", "features": {"x": 1, "y": 2.5, "z": "s", "b": true}}]}',
    b'{"candidates": [{"id": "a", "features": {"ns": {"p": 1e15, "q": -0.0}, "l": ["u", "v"]}}],'
    b' "context": {"device": "mobile", "user": {"age": 33}}, "slots": 1, "event_id": "e-1"}',
    '{"candidates": [{"id": "é😀", "features": {"t": "\\u00e9\\ud83d\\ude00"}}]}'.encode(),
    b'{"candidates": [{"id": "a", "features": {}}], "slots": [{"id": "top"}], "defer": true}',
    b'{"candidates": [{"id": "a", "features": {"n": 12345678901234}}], "excluded": ["b"]}',
]
INVALID = [
    b'{"candidates": [{"id": "a", "features": {"x": NaN}}]}',
    b'{"candidates": [{"id": "a", "features": {"t": "\\ud800"}}]}',  # lone surrogate
    b'{"candidates": [{"id": "a", "features": {"x": null}}]}',
    b'{"candidates": [{"id": "a", "features": {"x": "1\\u0000"}}]}',
    b'{"candidates": [{"id": 1, "features": {}}]}',
    b'{"candidates": [{"id": "a", "features": {"x": 1}}], "unknown": 1}',
]


@pytest.mark.parametrize("body", VALID)
def test_valid_bodies_parse_to_the_same_request_both_ways(body: bytes) -> None:
    assert DecisionIn.model_validate_json(body) == DecisionIn.model_validate(json.loads(body))


@pytest.mark.parametrize("body", INVALID)
def test_invalid_bodies_are_refused_by_the_fast_path(body: bytes) -> None:
    # Refused here, the route falls back to FastAPI's path, which reports the error.
    with pytest.raises(ValidationError):
        DecisionIn.model_validate_json(body)


def test_the_route_class_finds_each_body_model() -> None:
    assert _body_model(routes.decide) is DecisionIn
    assert _body_model(routes.reward) is RewardIn
    assert _body_model(routes.healthz) is None
