"""Routes of issue 10: delete-user, opt-out, explanations. Thin: parse, delegate, format.

Scopes (``bandit_service.api.auth.require``); these routes act on a user across every
policy, so a key restricted to some policies is refused them:

* ``DELETE /v1/users/{user_id}``                   -> ``admin``
* ``PUT|DELETE|GET /v1/users/{user_id}/opt-out``   -> ``admin``
* ``GET /v1/decisions/{event_id}/explanation``      -> ``read``

User ids travel in the path, URL-encoded (``/`` as ``%2F`` is not supported by the router:
such ids cannot be addressed here). Access logs never show them: see
``bandit_service.privacy.RedactUserIds``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from bandit_service.api.auth import require
from bandit_service.api.features import text_problem
from bandit_service.api.routes import ERRORS, ServiceDep, iso, json_response, known_event_id
from bandit_service.errors import InvalidRequest

router = APIRouter()

ADMIN: list[Any] = [Depends(require("admin", all_policies=True))]
READ_EVENT: list[Any] = [Depends(require("read", event_param="event_id"))]


def user_id_param(user_id: str) -> str:
    """The same rules as ``user_id`` in a decision request, so every stored key is reachable."""
    if not 1 <= len(user_id) <= 256:
        raise InvalidRequest("user_id must be 1 to 256 characters", "user_id")
    if (problem := text_problem(user_id)) is not None:
        raise InvalidRequest(f"user_id {problem}", "user_id")
    return user_id


@router.delete(
    "/v1/users/{user_id}",
    responses=ERRORS,
    dependencies=ADMIN,
    summary="Delete every stored decision and reward of a user (scope: admin)",
    description=(
        "Removes, on the store, every decision logged with this user's id (by its keyed "
        "hash), their rewards, and the user's stored opt-out (unless `keep_opt_out=true`). "
        "Answers the rows removed per table. Models trained before stay: they hold weights, "
        "not rows. Requests of this user still in flight when this runs may be stored after "
        "it: repeat the call once the user's traffic has stopped."
    ),
)
async def delete_user(
    user_id: str, service: ServiceDep, keep_opt_out: Annotated[bool, Query()] = False
) -> Response:
    removed = await service.delete_user(user_id_param(user_id), keep_opt_out)
    return json_response(
        {
            "removed": removed,
            "total": sum(removed.values()),
            "note": "models trained before keep what they learned (weights, not rows); "
            "see docs/data.md",
        }
    )


@router.put(
    "/v1/users/{user_id}/opt-out",
    responses=ERRORS,
    dependencies=ADMIN,
    summary="Opt a user out of personalization (scope: admin)",
    description=(
        "From now on this user gets the non-personalized popularity ranking (arm "
        "`opted_out`), no context features are logged for them, and neither the trainer nor "
        "popularity learns from them. Other serving processes apply it within "
        "`model_reload_seconds`; the trainer at once. Undo with DELETE."
    ),
)
async def opt_out(user_id: str, service: ServiceDep) -> Response:
    state = await service.set_opt_out(user_id_param(user_id), True)
    return json_response({**state, "updated_at": iso(state["updated_at"])})


@router.delete(
    "/v1/users/{user_id}/opt-out",
    responses=ERRORS,
    dependencies=ADMIN,
    summary="Undo a user's opt-out (scope: admin)",
)
async def opt_in(user_id: str, service: ServiceDep) -> Response:
    state = await service.set_opt_out(user_id_param(user_id), False)
    return json_response({**state, "updated_at": iso(state["updated_at"])})


@router.get(
    "/v1/users/{user_id}/opt-out",
    responses=ERRORS,
    dependencies=ADMIN,
    summary="Whether a user is opted out (scope: admin)",
)
async def opt_out_state(user_id: str, service: ServiceDep) -> Response:
    state = await service.opt_out_state(user_id_param(user_id))
    return json_response({**state, "updated_at": iso(state["updated_at"])})


@router.get(
    "/v1/decisions/{event_id}/explanation",
    responses=ERRORS,
    dependencies=READ_EVENT,
    summary="Why a decision showed what it showed (scope: read)",
    description=(
        "Per slot: the chosen candidate, whether the slot explored, its probability, the "
        "model's predicted reward for it and the `top` features that moved that prediction "
        "most (leave-one-feature-out on the model that made the decision; positive: made "
        "the candidate look better). Holdout and opted-out decisions used no model and say "
        "so in `reason`."
    ),
)
async def explanation(
    event_id: str, service: ServiceDep, top: Annotated[int, Query(ge=1, le=100)] = 5
) -> Response:
    return json_response(await service.explain(known_event_id(event_id), top))
