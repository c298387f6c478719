"""Issue 10 over HTTP, on SQLite and PostgreSQL: hashed identities, delete-user, opt-out,
identifier-looking features, explanations. (Retention: tests/integration/test_retention.py.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, MetaData, select

from bandit_service.app import create_app
from bandit_service.config import Settings
from bandit_service.policy import load_policies
from bandit_service.privacy import RedactUserIds
from bandit_service.store.database import make_engine
from bandit_service.training import PolicyTrainer, Trainer

RAW_USER = "Raw-User-7Q2X"  # distinctive, so a substring search over the store means something
OTHER_USER = "other-user-31"
CANDIDATES = [
    {"id": f"art-{t}", "features": {"topic": t, "length": n}}
    for n, t in enumerate(["sports", "news", "food", "travel"])
]
LEARN_POLICY = """
holdout_share = 0
vw_args = "--cb_explore_adf --epsilon 0.1 -q ca"
reward_min = 0
reward_max = 1
reward_window_seconds = 1
"""
HOLDOUT_POLICY = """
holdout_share = 0.5
vw_args = "--cb_explore_adf --epsilon 0.1 -q ca"
"""
LOOSE_POLICY = """
holdout_share = 0
allow_identifier_features = true
"""


@pytest.fixture
def privacy_settings(settings: Settings, policies_dir: Path) -> Settings:
    for name, body in (("learn", LEARN_POLICY), ("split", HOLDOUT_POLICY), ("loose", LOOSE_POLICY)):
        (policies_dir / f"{name}.toml").write_text(body)
    return settings.model_copy(update={"trainer": "off"})


@pytest.fixture
def client(privacy_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(privacy_settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def db(privacy_settings: Settings) -> Iterator[Engine]:
    engine = make_engine(privacy_settings.database_url)
    yield engine
    engine.dispose()


def decide(client: TestClient, **body: Any) -> dict[str, Any]:
    body.setdefault("candidates", CANDIDATES)
    response = client.post("/v1/decisions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def all_rows(db: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table in the store (reflected, so a new table is not forgotten)."""
    meta = MetaData()
    meta.reflect(db)
    with db.connect() as connection:
        return {name: list(connection.execute(select(t)).all()) for name, t in meta.tables.items()}


def store_text(db: Engine) -> str:
    """The whole store as text; bytes (models) are decoded leniently so ids inside show."""
    parts = []
    for name, rows in all_rows(db).items():
        for row in rows:
            for value in row:
                text = value.decode("latin-1") if isinstance(value, bytes) else repr(value)
                parts.append(f"{name}:{text}")
    return "\n".join(parts)


def traffic(client: TestClient, user: str, n: int, **extra: Any) -> list[str]:
    events = []
    for i in range(n):
        d = decide(client, user_id=user, context={"device": "mobile", "n": i}, **extra)
        client.post(f"/v1/decisions/{d['event_id']}/rewards", json={"value": 1})
        events.append(d["event_id"])
    return events


# -- identity ---------------------------------------------------------------------------------
def test_raw_user_id_is_stored_nowhere_and_logged_nowhere(
    client: TestClient, db: Engine, privacy_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    traffic(client, RAW_USER, 5, policy="learn")
    traffic(client, RAW_USER, 3, policy="split")
    assert client.put(f"/v1/users/{RAW_USER}/opt-out").status_code == 200
    traffic(client, RAW_USER, 2, policy="learn")
    # The trainer's checkpoint (model bytes) is part of the store too.
    policies = load_policies(privacy_settings.policies_dir)
    Trainer(db, policies, clock=lambda: time.time() + 3600).run_once()
    # A feature value that is the user id would store it raw: refused, naming the feature.
    refused = client.post(
        "/v1/decisions",
        json={"user_id": RAW_USER, "context": {"who": RAW_USER}, "candidates": CANDIDATES},
    )
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "context.who"

    tables = all_rows(db)
    assert {"decisions", "rewards", "user_opt_outs", "model_checkpoints"} <= set(tables)
    assert tables["decisions"] and tables["rewards"] and tables["model_checkpoints"]
    assert RAW_USER not in store_text(db) and RAW_USER.lower() not in store_text(db).lower()
    # The service's own log records (the test client's httpx logs its requests client-side).
    service_logs = [r.getMessage() for r in caplog.records if not r.name.startswith("httpx")]
    assert service_logs is not None and not any(RAW_USER in m for m in service_logs)


def test_access_log_never_shows_user_ids() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "DELETE", f"/v1/users/{RAW_USER}/opt-out?x=1", "1.1", 200), None,
    )  # fmt: skip
    assert RedactUserIds().filter(record)
    assert RAW_USER not in record.getMessage()
    assert "/v1/users/<redacted>/opt-out?x=1" in record.getMessage()


# -- delete-user ------------------------------------------------------------------------------
def test_delete_user_leaves_nothing_of_them(client: TestClient, db: Engine) -> None:
    mine = traffic(client, RAW_USER, 4, policy="learn") + traffic(client, RAW_USER, 2, slots=2)
    # Candidate sets are stored once and shared; one only this user was shown goes too.
    own_set = [*CANDIDATES, {"id": "shown-only-to-them"}]
    mine.append(decide(client, user_id=RAW_USER, candidates=own_set)["event_id"])
    others = traffic(client, OTHER_USER, 3, policy="learn")
    client.put(f"/v1/users/{RAW_USER}/opt-out")
    client.put(f"/v1/users/{OTHER_USER}/opt-out")
    user_key = client.get(f"/v1/decisions/{mine[0]}").json()["user_key"]
    before = {name: len(rows) for name, rows in all_rows(db).items()}

    response = client.delete(f"/v1/users/{RAW_USER}")
    assert response.status_code == 200, response.text
    removed = response.json()["removed"]
    assert removed == {"decisions": 7, "rewards": 6, "user_opt_outs": 1, "candidate_sets": 1}
    after = {name: len(rows) for name, rows in all_rows(db).items()}
    assert before["decisions"] - after["decisions"] == 7
    assert before["rewards"] - after["rewards"] == 6
    assert before["candidate_sets"] - after["candidate_sets"] == 1
    assert "shown-only-to-them" not in store_text(db)
    assert user_key not in store_text(db)  # not one row of any table mentions the user
    for event_id in mine:
        assert client.get(f"/v1/decisions/{event_id}").status_code == 404
        assert event_id not in store_text(db)
    for event_id in others:  # nobody else lost anything
        assert len(client.get(f"/v1/decisions/{event_id}").json()["rewards"]) == 1
    assert client.get(f"/v1/users/{OTHER_USER}/opt-out").json()["opted_out"] is True
    # Deleting again finds nothing; the user's opt-out went with the rest.
    assert client.delete(f"/v1/users/{RAW_USER}").json()["total"] == 0
    assert client.get(f"/v1/users/{RAW_USER}/opt-out").json()["opted_out"] is False


def test_delete_user_can_keep_the_opt_out(client: TestClient) -> None:
    traffic(client, RAW_USER, 2)
    client.put(f"/v1/users/{RAW_USER}/opt-out")
    removed = client.delete(f"/v1/users/{RAW_USER}?keep_opt_out=true").json()["removed"]
    assert removed == {"decisions": 2, "rewards": 2, "user_opt_outs": 0, "candidate_sets": 1}
    assert decide(client, user_id=RAW_USER)["arm"] == "opted_out"


def test_user_paths_take_any_url_encoded_id_and_validate_it(client: TestClient) -> None:
    user = "ana lópez@example.com"  # spaces, unicode, "@": URL-encoded in the path
    path = "/v1/users/ana%20l%C3%B3pez%40example.com"
    traffic(client, user, 2)
    assert client.put(f"{path}/opt-out").json()["scrubbed_decisions"] == 2
    assert decide(client, user_id=user)["arm"] == "opted_out"
    assert client.delete(path).json()["removed"]["decisions"] == 3
    for bad in ("x" * 300, "a%00b"):
        response = client.delete(f"/v1/users/{bad}")
        assert response.status_code == 422 and response.json()["error"]["field"] == "user_id"


# -- opt-out ----------------------------------------------------------------------------------
def test_opt_out_serves_popularity_logs_no_context_and_can_be_undone(client: TestClient) -> None:
    before = decide(client, user_id=RAW_USER, policy="learn", context={"device": "tv"})
    assert before["arm"] == "bandit"
    state = client.put(f"/v1/users/{RAW_USER}/opt-out").json()
    assert state["opted_out"] is True and state["updated_at"] and state["scrubbed_decisions"] == 1
    # What was logged before the opt-out loses its context too (it is never learned either).
    assert client.get(f"/v1/decisions/{before['event_id']}").json()["context"] == {}
    assert client.get(f"/v1/users/{RAW_USER}/opt-out").json()["opted_out"] is True
    d = decide(
        client, user_id=RAW_USER, policy="learn", context={"device": "tv"}, excluded=["art-news"]
    )
    assert d["arm"] == "opted_out" and d["slots"][0]["probability"] == 1.0
    logged = client.get(f"/v1/decisions/{d['event_id']}").json()
    assert logged["context"] == {} and logged["excluded"] == []
    assert logged["slots"][0]["id"] != "art-news"  # exclusions still apply to what is shown
    # The request flag does the same for anyone, without storing anything.
    flagged = decide(client, user_id=OTHER_USER, context={"device": "tv"}, personalize=False)
    assert flagged["arm"] == "opted_out"
    assert client.get(f"/v1/decisions/{flagged['event_id']}").json()["context"] == {}
    assert client.get(f"/v1/users/{OTHER_USER}/opt-out").json()["opted_out"] is False
    # Undo.
    assert client.delete(f"/v1/users/{RAW_USER}/opt-out").json()["opted_out"] is False
    assert decide(client, user_id=RAW_USER, policy="learn")["arm"] == "bandit"


class RecordingLearner:
    """Records what the trainer learns (contexts carry the event's marker)."""

    learned: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, *_args: Any) -> None:
        self.model_version = 0

    def learn_slot(self, context: Any, *_args: Any) -> None:
        RecordingLearner.learned.append(dict(context))

    def to_bytes(self) -> bytes:
        return b"model"


def test_opted_out_users_are_never_learned_from(
    client: TestClient, db: Engine, privacy_settings: Settings
) -> None:
    def send(user: str, marker: str, **extra: Any) -> None:
        d = decide(client, user_id=user, policy="learn", context={"m": marker}, **extra)
        client.post(f"/v1/decisions/{d['event_id']}/rewards", json={"value": 1})

    for i in range(3):
        send(RAW_USER, f"before-opt-out-{i}")  # logged personalized, opted out before training
        send(OTHER_USER, f"learn-{i}")
        send(OTHER_USER, f"flagged-{i}", personalize=False)
    client.put(f"/v1/users/{RAW_USER}/opt-out")
    for i in range(3):
        send(RAW_USER, f"after-opt-out-{i}")
    RecordingLearner.learned = []
    policy = load_policies(privacy_settings.policies_dir)["learn"]
    trainer = PolicyTrainer(
        db, policy, "t", clock=lambda: time.time() + 3600, learner_factory=RecordingLearner
    )
    result = trainer.step()
    assert result.learned == 3 and result.skipped == 9
    assert sorted(c.get("m") for c in RecordingLearner.learned) == [f"learn-{i}" for i in range(3)]


def test_popularity_ignores_opted_out_decisions() -> None:
    from bandit_service.holdout import compute_popularity
    from bandit_service.policy import parse_policy

    policy = parse_policy("p", {"reward_window_seconds": 1})

    def row(arm: str, cid: str) -> dict[str, Any]:
        return {
            "arm": arm, "created_at": 0.0, "deferred": False, "activated_at": None,
            "slots": [{"slot": 0, "id": cid}], "rewards": [{"slot": 0, "value": 1.0,
            "late": False}],
        }  # fmt: skip

    scores = compute_popularity([row("bandit", "a"), row("opted_out", "b")], policy, now=100)
    assert "a" in scores.scores and "b" not in scores.scores


# -- identifier-looking features --------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"context": {"email": "ana.lopez@example.com"}}, "context.email"),
        ({"context": {"user": {"phone": "+49 151 2345 6789"}}}, "context.user.phone"),
        (
            {
                "candidates": [
                    CANDIDATES[0],
                    {"id": "x", "features": {"tags": ["ok", "(555) 123-4567"]}},
                ]
            },
            "candidates[1].features.tags[1]",
        ),
        (
            {"slots": [{"id": "top", "features": {"owner": "bob@corp.io"}}]},
            "slots[0].features.owner",
        ),
    ],
)
def test_identifier_looking_features_are_refused(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    body = {"candidates": CANDIDATES, **body}
    response = client.post("/v1/decisions", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and "identifier" in error["message"]
    # A policy that explicitly allows them accepts the same request.
    assert client.post("/v1/decisions", json={**body, "policy": "loose"}).status_code == 200


# -- explanations -----------------------------------------------------------------------------
def test_explanation_names_features_of_the_request(
    client: TestClient, db: Engine, privacy_settings: Settings
) -> None:
    # Users of segment s reward the article on topic s: the model must learn context x topic.
    topics = ["sports", "news", "food", "travel"]
    for i in range(160):
        segment = topics[i % 4]
        d = decide(client, policy="learn", context={"segment": segment, "noise": i % 3})
        shown = d["slots"][0]["id"]
        value = 1 if shown == f"art-{segment}" else 0
        client.post(f"/v1/decisions/{d['event_id']}/rewards", json={"value": value})
    policies = load_policies(privacy_settings.policies_dir)
    Trainer(db, {"learn": policies["learn"]}, clock=lambda: time.time() + 3600).run_once()
    service = client.app.state.service  # type: ignore[attr-defined]
    service.models.refresh()
    d = decide(client, policy="learn", context={"segment": "food", "noise": 1}, user_id="u-1")
    assert d["model_version"] >= 1
    response = client.get(f"/v1/decisions/{d['event_id']}/explanation?top=3")
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["personalized"] is True and out["reason"] is None
    assert out["explained_with_model_version"] == d["model_version"] and out["note"] == ""
    slot = out["slots"][0]
    assert slot["id"] == d["slots"][0]["id"] and slot["explored"] == d["slots"][0]["explored"]
    assert 1 <= len(slot["features"]) <= 3
    named = {(f["source"], f["feature"]) for f in slot["features"]}
    request_features = {
        ("context", "segment"), ("context", "noise"), ("candidate", "topic"),
        ("candidate", "length"), ("candidate", "id"), ("slot", "slot_index"),
    }  # fmt: skip
    assert named <= request_features
    # The feature that decides the reward, the segment, is what moved the score most.
    top = slot["features"][0]
    assert (top["source"], top["feature"], top["value"]) == ("context", "segment", "food")
    if slot["id"] == "art-food":
        assert top["contribution"] > 0


def test_explanations_of_unpersonalized_decisions_say_so(client: TestClient) -> None:
    arms: dict[str, str] = {}
    for i in range(40):
        d = decide(client, policy="split", user_id=f"user-{i}")
        arms.setdefault(d["arm"], d["event_id"])
    d = decide(client, user_id=RAW_USER, personalize=False)
    arms["opted_out"] = d["event_id"]
    for arm in ("holdout", "opted_out"):
        out = client.get(f"/v1/decisions/{arms[arm]}/explanation").json()
        assert out["arm"] == arm and out["personalized"] is False
        assert arm.replace("_", " ").split()[0] in out["reason"].replace("-", " ")
        assert all(s["features"] == [] and s["explored"] is False for s in out["slots"])
    assert client.get("/v1/decisions/nope/explanation").status_code == 404


def test_untrained_model_explanation_says_so(client: TestClient) -> None:
    d = decide(client, policy="learn", context={"segment": "food"})
    out = client.get(f"/v1/decisions/{d['event_id']}/explanation").json()
    assert out["explained_with_model_version"] == 0 and "untrained" in out["note"]
    assert out["slots"][0]["features"] == []


def test_popularity_leaves_out_what_opted_out_users_did_before(
    client: TestClient, privacy_settings: Settings
) -> None:
    """Rewards of a user who later opts out stop counting in the popularity ranking."""
    service = client.app.state.service  # type: ignore[attr-defined]
    for _ in range(5):
        d = decide(client, user_id=RAW_USER, policy="split", personalize=True, slots=1)
        client.post(f"/v1/decisions/{d['event_id']}/rewards", json={"value": 1})
    later = time.time() + 7200  # every reward window closed
    assert service.popularity.refresh("split", later).scores  # the user's clicks count
    client.put(f"/v1/users/{RAW_USER}/opt-out")
    assert service.popularity.refresh("split", later).scores == {}
