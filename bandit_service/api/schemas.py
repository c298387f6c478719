"""Pydantic request/response models: the public JSON contract, with OpenAPI examples."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr

from bandit_service.api.features import check_features, check_text

FeatureMap = Annotated[
    dict[str, Any],
    AfterValidator(check_features),
    Field(
        description=(
            "feature -> string | number | boolean | list of strings; one level of nesting "
            "means namespace -> features"
        )
    ),
]
Identifier = Annotated[StrictStr, Field(min_length=1, max_length=256), AfterValidator(check_text)]
EVENT_ID_PATTERN = r"^[A-Za-z0-9._:\-]{1,128}$"
EventId = Annotated[StrictStr, Field(pattern=EVENT_ID_PATTERN)]
FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-1e15, le=1e15)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CandidateIn(Strict):
    id: Identifier
    features: FeatureMap = Field(default_factory=dict)


class SlotIn(Strict):
    id: Identifier
    features: FeatureMap = Field(default_factory=dict)
    baseline: Identifier | None = Field(
        default=None,
        description="Candidate id that apprentice/logging-only policies show in this slot "
        "(default: the first eligible candidate)",
    )


DECISION_EXAMPLE: dict[str, Any] = {
    "policy": "default",
    "user_id": "user-42",
    "context": {"device": "mobile", "hour": 21, "user": {"segment": "sports"}},
    "candidates": [
        {"id": "article-1", "features": {"topic": "football", "age_hours": 2}},
        {"id": "article-2", "features": {"topic": "politics", "age_hours": 5}},
        {"id": "article-3", "features": {"topic": "cooking", "tags": ["quick", "vegan"]}},
    ],
    "slots": 2,
}


class PinIn(Strict):
    id: Identifier
    slot: Annotated[int, Field(ge=0, le=10_000, strict=True)]


class DecisionIn(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [DECISION_EXAMPLE]})

    policy: Identifier = "default"
    user_id: Identifier | None = None
    context: FeatureMap = Field(default_factory=dict)
    candidates: list[CandidateIn] | None = Field(
        default=None,
        description="What may be shown; at least one, ids unique. Omit it (and "
        "`candidate_ids`) to decide over the policy's whole catalog.",
    )
    candidate_ids: list[Identifier] | None = Field(
        default=None,
        max_length=10_000,
        description="Ids of the policy's catalog items to decide over, in this order "
        "(instead of `candidates`; giving both is a 422).",
    )
    slots: (
        Annotated[int, Field(ge=1, le=10_000, strict=True)]
        | Annotated[list[SlotIn], Field(max_length=10_000)]
        | None
    ) = Field(
        default=None, description="Number of ranked slots, or slot objects; default: the policy's"
    )
    excluded: list[Identifier] = Field(default_factory=list, max_length=10_000)
    event_id: EventId | None = None
    defer: bool = Field(default=False, strict=True)
    personalize: bool = Field(
        default=True,
        strict=True,
        description="false: serve the non-personalized popularity ranking, log no context "
        "features and never learn from this decision (a stored opt-out does the same)",
    )
    pins: list[PinIn] = Field(
        default_factory=list,
        max_length=10_000,
        description="Candidates fixed at slots for this request (on top of the policy's pins; "
        "a request pin wins for its slot). Logged with probability 1, never explored.",
    )


class SlotOut(BaseModel):
    slot: int
    slot_id: str
    id: str
    probability: float
    explored: bool
    pmf: list[dict[str, Any]] | None = None


class DecisionOut(BaseModel):
    event_id: str
    policy: str
    policy_version: str
    arm: Literal["bandit", "holdout", "opted_out"]
    model_version: int
    deferred: bool
    slots: list[SlotOut]


class RewardIn(Strict):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"value": 1.0, "slot": 0}]}
    )

    value: FiniteNumber
    slot: Annotated[int, Field(ge=0, strict=True)] | None = None
    id: Identifier | None = None
    kind: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")] = Field(
        default="primary",
        description="`primary` (learned, within the policy's bounds) or another kind such as "
        "`satisfaction`, stored and reported beside it",
    )
    reward_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,64}$")] | None = Field(
        default=None,
        description="Idempotency key, unique per decision: a retry with the same key stores "
        "nothing new and answers 200 with the stored reward and `duplicate: true`; the same "
        "key with another slot, value or kind is a 409",
    )


class RewardOut(BaseModel):
    event_id: str
    slot: int
    id: str
    value: float
    kind: str
    late: bool
    received_at: str
    reward_id: str | None = None
    duplicate: bool = False


class ActivationOut(BaseModel):
    event_id: str
    deferred: bool
    activated_at: str | None


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None
    details: list[dict[str, Any]] | None = None


class ErrorOut(BaseModel):
    error: ErrorBody
