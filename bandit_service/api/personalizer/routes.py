"""The Personalizer-compatible routes, under all three URL styles.

``/personalizer/v1.0/…`` (no multi-slot), ``/personalizer/v1.1-preview.{1,2,3}/…`` and
``/personalizer/…?api-version=2022-09-01-preview`` (what ``azure-ai-personalizer`` sends).
Each operation maps onto the DecisionService like the native API does, so facade traffic
is logged, held out, learned and evaluated exactly like native traffic.

Authentication: each operation requires an API-key scope (``decide`` for rank, reward and
activate; ``read`` to read the configuration; ``admin`` to change it; see
``bandit_service/api/auth.py``). Clients send ``Ocp-Apim-Subscription-Key``. The check runs
inside the routes, so its 401/403/429 come out in Personalizer's error shape too. A key
restricted to some policies may use the facade only if the loop's policy is among them.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from bandit_service.api.auth import admit_candidates, admit_policy, require
from bandit_service.api.personalizer.errors import PersonalizerError, PersonalizerRoute
from bandit_service.api.personalizer.schemas import (
    MultiSlotRankRequest,
    MultiSlotRewardRequest,
    PersonalizerErrorOut,
    PolicyContract,
    RankableAction,
    RankRequest,
    RewardRequest,
)
from bandit_service.api.schemas import EVENT_ID_PATTERN
from bandit_service.apikeys import Scope
from bandit_service.domain import Candidate, DecisionRequest, Slot
from bandit_service.personalizer.features import to_feature_map
from bandit_service.personalizer.loop import PersonalizerLoop
from bandit_service.service import DecisionService, new_event_id

API_VERSIONS = ("2022-09-01-preview",)
PATH_VERSIONS = ("v1.0", "v1.1-preview.1", "v1.1-preview.2", "v1.1-preview.3")
_NATIVE_EVENT_ID = __import__("re").compile(EVENT_ID_PATTERN)


def internal_event_id(event_id: str) -> str:
    """The stored event id: the caller's own when the native log accepts it (up to 128
    of ``[A-Za-z0-9._:-]``), else a stable hash of it (Personalizer allows any 256
    characters), so a retry, a reward and an activation all find the same decision."""
    if _NATIVE_EVENT_ID.match(event_id):
        return event_id
    return "pz:" + hashlib.sha256(event_id.encode("utf-8")).hexdigest()


def _service(request: Request) -> DecisionService:
    """The service, once the key may use the loop's policy (every facade call is on it)."""
    return _loop(request).service


def _loop(request: Request) -> PersonalizerLoop:
    state = request.app.state
    loop: PersonalizerLoop | None = getattr(state, "personalizer_loop", None)
    if loop is None:
        service: DecisionService = state.service
        loop = PersonalizerLoop(service, service.settings.personalizer_policy)
        state.personalizer_loop = loop
    admit_policy(request.state.principal, loop.policy().name)
    return loop


def _admitted_candidates(
    request: Request, loop: PersonalizerLoop, candidates: tuple[Candidate, ...]
) -> tuple[Candidate, ...]:
    """The key's limits on candidates and features per candidate (422 → 400 here)."""
    features = [c.features for c in candidates]
    admit_candidates(request.state.principal, loop.policy().name, features, "actions")
    return candidates


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status, media_type="application/json")


def _candidates(actions: list[RankableAction]) -> tuple[Candidate, ...]:
    return tuple(
        Candidate(a.id, to_feature_map(a.features, f"actions[{i}].features"))
        for i, a in enumerate(actions)
    )


def ranking(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Every action at its request position: excluded (and rule-filtered) ones keep their
    place with probability 0; the eligible places hold the eligible actions ranked, the
    chosen one first, then by probability (ties keep request order)."""
    slot = row["slots"][0]
    probs = {cid: float(p) for cid, p in slot["pmf"]}
    order = [c["id"] for c in row["candidates"]]
    others = [cid for cid in order if cid in probs and cid != slot["id"]]
    ranked = iter([slot["id"], *sorted(others, key=lambda cid: -probs[cid])])
    out = []
    for cid in order:
        shown = next(ranked) if cid in probs else cid
        out.append({"id": shown, "probability": probs.get(shown, 0.0) if cid in probs else 0.0})
    return out


# -- operations --------------------------------------------------------------------------------
async def rank(body: RankRequest, request: Request) -> Response:
    loop = _loop(request)
    event_id = body.eventId or new_event_id()
    decision = DecisionRequest(
        event_id=internal_event_id(event_id),
        policy=loop.policy().name,
        candidates=_admitted_candidates(request, loop, _candidates(body.actions)),
        slots=(Slot(id="0"),),
        context=to_feature_map(body.contextFeatures, "contextFeatures"),
        excluded=frozenset(body.excludedActions or ()),
        defer=bool(body.deferActivation),
    )
    row = await loop.service.decide(decision, may_exist=body.eventId is not None)
    return _json(
        {"ranking": ranking(row), "eventId": event_id, "rewardActionId": row["slots"][0]["id"]},
        201,
    )


async def multislot_rank(body: MultiSlotRankRequest, request: Request) -> Response:
    loop = _loop(request)
    event_id = body.eventId or new_event_id()
    ids = {a.id for a in body.actions}
    slots = []
    for k, s in enumerate(body.slots):
        if s.baselineAction is not None and s.baselineAction not in ids:
            raise PersonalizerError(
                400, "InvalidRankRequest",
                f"slots[{k}].baselineAction: {s.baselineAction!r} is not one of the actions",
            )  # fmt: skip
        features = to_feature_map(s.features, f"slots[{k}].features")
        excluded = frozenset(s.excludedActions or ())
        slots.append(Slot(id=s.id, features=features, baseline=s.baselineAction,
                          excluded=excluded))  # fmt: skip
    decision = DecisionRequest(
        event_id=internal_event_id(event_id),
        policy=loop.policy().name,
        candidates=_admitted_candidates(request, loop, _candidates(body.actions)),
        slots=tuple(slots),
        context=to_feature_map(body.contextFeatures, "contextFeatures"),
        defer=bool(body.deferActivation),
    )
    row = await loop.service.decide(decision, may_exist=body.eventId is not None)
    return _json(
        {
            "slots": [{"id": s["slot_id"], "rewardActionId": s["id"]} for s in row["slots"]],
            "eventId": event_id,
        },
        201,
    )


async def _loop_event(request: Request, event_id: str) -> str:
    """The stored id of a decision of the loop's policy; any other event is not found (a
    facade key must not reach another policy's decisions through a shared event id)."""
    _check_event_id(event_id)
    stored_id = internal_event_id(event_id)
    loop = _loop(request)
    if await loop.service.decision_policy(stored_id) != loop.policy().name:
        raise PersonalizerError(404, "ResourceNotFound", f"no event {event_id!r}")
    return stored_id


async def reward(eventId: str, body: RewardRequest, request: Request) -> Response:
    stored_id = await _loop_event(request, eventId)
    await _service(request).reward(stored_id, body.value, 0, None)
    return Response(status_code=204)


async def multislot_reward(
    eventId: str,
    body: MultiSlotRewardRequest,
    request: Request,
) -> Response:
    """Rewards per slot id; several calls may each reward some slots. All are checked
    before any is stored."""
    stored_id = await _loop_event(request, eventId)
    service = _service(request)
    row = await service.get_decision(stored_id)
    index = {s["slot_id"]: s["slot"] for s in row["slots"]}
    for i, r in enumerate(body.reward):
        if r.slotId not in index:
            raise PersonalizerError(
                400, "InvalidRewardRequest",
                f"reward[{i}].slotId: slot {r.slotId!r} is not part of event {eventId!r} "
                f"(slots: {sorted(index)})",
            )  # fmt: skip
    policy = _loop(request).policy()
    for i, r in enumerate(body.reward):
        if not policy.reward_min <= r.value <= policy.reward_max:
            raise PersonalizerError(
                400, "InvalidRewardRequest",
                f"reward[{i}].value: {r.value} is outside the policy's reward bounds "
                f"[{policy.reward_min:g}, {policy.reward_max:g}]",
            )  # fmt: skip
    for r in body.reward:
        await service.reward(stored_id, r.value, index[r.slotId], None)
    return Response(status_code=204)


async def activate(eventId: str, request: Request) -> Response:
    stored_id = await _loop_event(request, eventId)
    await _service(request).activate(stored_id)
    return Response(status_code=204)


def _check_event_id(event_id: str) -> None:
    if not 1 <= len(event_id) <= 256:
        raise PersonalizerError(400, "BadRequest", "eventId: must be 1 to 256 characters long")


async def get_service_configuration(request: Request) -> Response:
    return _json(await _loop(request).service_configuration())


async def put_service_configuration(request: Request) -> Response:
    body = await _object_body(request)
    return _json(await _loop(request).update_service_configuration(body))


async def get_policy(request: Request) -> Response:
    return _json(await _loop(request).policy_contract())


async def put_policy(body: PolicyContract, request: Request) -> Response:
    return _json(await _loop(request).update_policy(body.name, body.arguments))


async def delete_policy(request: Request) -> Response:
    return _json(await _loop(request).reset_policy())


async def _object_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError as exc:
        raise PersonalizerError(
            400, "BadRequest", f"the request body is not valid JSON: {exc}"
        ) from None
    if not isinstance(body, dict):
        raise PersonalizerError(400, "InvalidServiceConfiguration",
                                "the request body must be a JSON object")  # fmt: skip
    return body


def require_api_version(
    api_version: Annotated[str | None, Query(alias="api-version")] = None,
) -> None:
    if api_version is None:
        raise PersonalizerError(
            400, "BadRequest",
            f"the api-version query parameter is required (supported: {', '.join(API_VERSIONS)})",
        )  # fmt: skip
    if api_version not in API_VERSIONS:
        raise PersonalizerError(
            400, "BadRequest",
            f"unsupported api-version {api_version!r} (supported: {', '.join(API_VERSIONS)}; "
            f"or use the path versions {', '.join(PATH_VERSIONS)})",
        )  # fmt: skip


async def not_found(request: Request) -> Response:
    raise PersonalizerError(
        404, "ResourceNotFound",
        f"{request.method} {request.url.path} is not part of the Personalizer API served here",
    )  # fmt: skip


# -- the router ------------------------------------------------------------------------------
_OPERATIONS: list[tuple[str, str, Any, int, str, bool, Scope]] = [
    # path, method, handler, success status, invalid-input code, multi-slot, key scope
    ("/rank", "POST", rank, 201, "InvalidRankRequest", False, "decide"),
    ("/events/{eventId:path}/reward", "POST", reward, 204, "InvalidRewardRequest", False,
     "decide"),
    ("/events/{eventId:path}/activate", "POST", activate, 204, "InvalidEventIdToActivate", False,
     "decide"),
    ("/multislot/rank", "POST", multislot_rank, 201, "InvalidRankRequest", True, "decide"),
    ("/multislot/events/{eventId:path}/reward", "POST", multislot_reward, 204,
     "InvalidRewardRequest", True, "decide"),
    ("/multislot/events/{eventId:path}/activate", "POST", activate, 204,
     "InvalidEventIdToActivate", True, "decide"),
    ("/configurations/service", "GET", get_service_configuration, 200, "BadRequest", False,
     "read"),
    ("/configurations/service", "PUT", put_service_configuration, 200,
     "InvalidServiceConfiguration", False, "admin"),
    ("/configurations/policy", "GET", get_policy, 200, "BadRequest", False, "read"),
    ("/configurations/policy", "PUT", put_policy, 200, "InvalidPolicyContract", False, "admin"),
    ("/configurations/policy", "DELETE", delete_policy, 200, "BadRequest", False, "admin"),
]  # fmt: skip


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": PersonalizerErrorOut, "description": description}
    for status, description in [
        (400, "Invalid request (the message names the field)"),
        (401, "No valid API key (Ocp-Apim-Subscription-Key)"),
        (403, "The key's scopes or policies do not allow this"),
        (404, "Unknown event or operation"),
        (413, "Request body too large"),
        (429, "The key's request rate is exceeded (Retry-After)"),
    ]
}


def document(openapi: dict[str, Any]) -> dict[str, Any]:
    """The facade answers invalid input with 400, never FastAPI's 422: drop that from its
    operations in the app's OpenAPI document (``openapi`` is changed and returned)."""
    for path, operations in openapi.get("paths", {}).items():
        if path.startswith("/personalizer"):
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
    return openapi


def _add(router: APIRouter, prefix: str, tag: str, versioned_by_query: bool) -> None:
    for path, method, handler, status, invalid, multislot, scope in _OPERATIONS:
        if multislot and prefix.endswith("/v1.0"):
            continue  # multi-slot arrived with v1.1-preview.1
        router.add_api_route(
            prefix + path,
            handler,
            methods=[method],
            status_code=status,
            tags=[tag],
            name=f"personalizer {tag} {method} {path}",
            summary=f"Personalizer {method} {path}",
            # The key is checked first (a 401 before anything about the request), then the
            # api-version.
            dependencies=[Depends(require(scope))]
            + ([Depends(require_api_version)] if versioned_by_query else []),
            openapi_extra={"x-invalid-code": invalid},
            response_class=Response,
            responses=_ERRORS,
        )


def build_router() -> APIRouter:
    router = APIRouter(route_class=PersonalizerRoute)
    for version in PATH_VERSIONS:
        _add(router, f"/personalizer/{version}", f"personalizer {version}", False)
    _add(router, "/personalizer", "personalizer", True)
    router.add_api_route(
        "/personalizer/{rest:path}",
        not_found,
        methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
        include_in_schema=False,
    )
    return router


router = build_router()
