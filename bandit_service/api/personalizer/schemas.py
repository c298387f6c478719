"""Request bodies of the Personalizer API, as in the public REST specs (camelCase).

Unknown fields are ignored, as Personalizer did. Features are validated and converted by
:mod:`bandit_service.personalizer.features` (they are lists of free-form objects).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr

from bandit_service.api.features import check_text

# Personalizer's limit for ids, event ids and slot ids.
PzId = Annotated[StrictStr, Field(min_length=1, max_length=256), AfterValidator(check_text)]
RewardValue = Annotated[float, Field(allow_inf_nan=False, ge=-1e15, le=1e15)]


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RankableAction(Lenient):
    id: PzId
    features: list[Any] | None = None


class RankRequest(Lenient):
    contextFeatures: list[Any] | None = None
    actions: list[RankableAction] = Field(min_length=1)
    excludedActions: list[PzId] | None = Field(default=None, max_length=10_000)
    eventId: PzId | None = None
    deferActivation: bool | None = False


class SlotRequest(Lenient):
    id: PzId
    features: list[Any] | None = None
    excludedActions: list[PzId] | None = Field(default=None, max_length=10_000)
    baselineAction: PzId | None = None


class MultiSlotRankRequest(Lenient):
    contextFeatures: list[Any] | None = None
    actions: list[RankableAction] = Field(min_length=1)
    slots: list[SlotRequest] = Field(min_length=1)
    eventId: PzId | None = None
    deferActivation: bool | None = False


class RewardRequest(Lenient):
    value: RewardValue


class SlotReward(Lenient):
    slotId: PzId
    value: RewardValue


class MultiSlotRewardRequest(Lenient):
    reward: list[SlotReward] = Field(min_length=1, max_length=10_000)


class PolicyContract(Lenient):
    name: Annotated[StrictStr, Field(max_length=256)] | None = None
    arguments: Annotated[StrictStr, Field(min_length=1, max_length=1024)]


class PersonalizerErrorDetail(BaseModel):
    code: str
    message: str
    target: str | None = None


class PersonalizerErrorOut(BaseModel):
    """Personalizer's error body (also in the ``x-ms-error-code`` header)."""

    error: PersonalizerErrorDetail
