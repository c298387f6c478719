"""Which feature values count as direct identifiers (issue 10), and which do not."""

from __future__ import annotations

import pytest

from bandit_service.domain import Candidate, DecisionRequest, Slot
from bandit_service.explain import action_line, shared_line
from bandit_service.identifiers import find_identifier, identifier_kind
from bandit_service.learners import vw_text


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("ana@example.com", "e-mail address"),
        ("write to bob.smith+news@mail.co.uk today", "e-mail address"),
        ("+49 151 23456789", "phone number"),
        ("+1 (555) 123-4567", "phone number"),
        ("(555) 123-4567", "phone number"),
        ("0151 2345 6789", "phone number"),
        ("030-12345678", "phone number"),
        ("555.123.4567", "phone number"),
    ],
)
def test_identifiers_are_recognised(text: str, kind: str) -> None:
    assert identifier_kind(text) == kind


@pytest.mark.parametrize(
    "text",
    [
        "sports", "article-42", "2026-11-22", "2026-11-22 10:00", "12:30", "3.14", "v1.2.3",
        "1234567890", "978-3-16-148410-0", "100-200", "@handle", "a@b", "+5", "1 2 3",
    ],
)  # fmt: skip
def test_ordinary_values_are_not_identifiers(text: str) -> None:
    assert identifier_kind(text) is None


def _request(**kwargs: object) -> DecisionRequest:
    base: dict[str, object] = {
        "event_id": "e",
        "policy": "p",
        "candidates": (Candidate("a", {"topic": "x", "tags": ["t1"]}), Candidate("b")),
        "slots": (Slot("0"),),
    }
    return DecisionRequest(**{**base, **kwargs})  # type: ignore[arg-type]


def test_find_identifier_names_the_feature() -> None:
    assert find_identifier(_request(context={"device": "tv", "n": 3})) is None
    found = find_identifier(_request(context={"u": {"mail": "x.y@example.org"}}))
    assert found == ("context.u.mail", "e-mail address")
    request = _request(candidates=(Candidate("a", {"tags": ["ok", "+44 20 7946 0958"]}),))
    assert find_identifier(request) == ("candidates[0].features.tags[1]", "phone number")
    slots = (Slot("0", {"note": "line one\nana@example.com"}),)
    assert find_identifier(_request(slots=slots)) == ("slots[0].features.note", "e-mail address")
    # The request's own user id as a feature would store it raw, whatever it looks like.
    request = _request(user_id="u-77", context={"who": "u-77"})
    assert find_identifier(request) == ("context.who", "the raw user_id")
    assert find_identifier(_request(user_id="u-77", context={"who": "u-78"})) is None


def test_explanation_lines_match_the_served_lines() -> None:
    """Ablation must start from exactly the example the model scored when deciding."""
    context = {"device": "tv", "user": {"segment": "food"}}
    assert shared_line(context, 2, {"pos": "top"}) == vw_text.shared_line(
        context, 2, {"pos": "top"}
    )
    assert "slot_index" not in shared_line(context, None, {"pos": "top"})
    features = {"topic": "x", "item": {"price": 3}}
    assert action_line("a", features) == vw_text.action_line("a", features)
    assert "id=" not in action_line(None, features) and action_line(None, {}) == " |action"
