"""Thin routes: parse, delegate to the DecisionService, format. No logic lives here."""

from __future__ import annotations

import datetime as dt
import functools
import re
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.types import Scope

from bandit_service.api.auth import Principal, admit_candidates, admit_policy, require
from bandit_service.api.catalog_decide import catalog_candidates
from bandit_service.api.fast_body import FastDecision, decode_decision
from bandit_service.api.json_route import JsonModelRoute, fast_path
from bandit_service.api.schemas import (
    EVENT_ID_PATTERN,
    ActivationOut,
    DecisionIn,
    DecisionOut,
    ErrorOut,
    RewardIn,
    RewardOut,
)
from bandit_service.candidate_sets import KeptCandidates
from bandit_service.domain import Candidate, DecisionRequest, Slot, slot_list
from bandit_service.errors import InvalidRequest, NotFound
from bandit_service.rewards import aggregate
from bandit_service.service import DecisionService, new_event_id
from bandit_service.timeutil import parse_instant

router = APIRouter(route_class=JsonModelRoute)  # bodies validated from JSON bytes

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "Malformed JSON"},
    404: {"model": ErrorOut, "description": "Unknown event or resource"},
    413: {"model": ErrorOut, "description": "Request body too large"},
    422: {"model": ErrorOut, "description": "Invalid field (the error names it)"},
    **{
        status: {"model": ErrorOut, "description": what}
        for status, what in (
            (401, "No API key, or not a valid one"),
            (403, "The key lacks this endpoint's scope, or may not use this policy"),
            (429, "The key's request rate is exceeded (see Retry-After)"),
        )
    },
}
# Access (bandit_service/api/auth.py): every route names the scope it needs.
DecideKey = Annotated[Principal, Depends(require("decide"))]
ReadKey = Annotated[Principal, Depends(require("read"))]
_REWARD_KEY = require("decide", event_param="event_id")
DECIDE_ON_EVENT = [Depends(_REWARD_KEY)]
READ_EVENT = [Depends(require("read", event_param="event_id"))]
READ_POLICY = [Depends(require("read", policy_param="name"))]


async def get_service(request: Request) -> DecisionService:
    service: DecisionService = request.app.state.service
    return service


ServiceDep = Annotated[DecisionService, Depends(get_service)]
_EVENT_ID = re.compile(EVENT_ID_PATTERN)


def known_event_id(event_id: str) -> str:
    """Event ids in paths: one that could never have been logged is simply not found."""
    if not _EVENT_ID.match(event_id):
        raise NotFound(f"no decision with event id {event_id!r}", "event_id")
    return event_id


class _JsonResponse(Response):
    """A Starlette ``Response`` of JSON bytes, built directly: the same attributes and
    headers (``content-length`` then ``content-type``) that ``Response(body, status,
    media_type="application/json")`` sets, without its general ``render`` and
    ``init_headers`` (~1.5 of ~1.8 µs per answer)."""

    media_type = "application/json"

    def __init__(self, body: bytes, status_code: int) -> None:
        self.status_code = status_code
        self.background = None
        self.body = body
        self.raw_headers = [(b"content-length", str(len(body)).encode()), _JSON_TYPE]


_JSON_TYPE = (b"content-type", b"application/json")


def json_response(payload: Any, status: int = 200) -> Response:
    body = orjson.dumps(payload)
    if status < 200 or status in (204, 304):  # no content-length: Starlette's own rules
        return Response(body, status, media_type="application/json")
    return _JsonResponse(body, status)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


def _slot_out(slot: dict[str, Any], include_pmf: bool) -> dict[str, Any]:
    # A literal, not a comprehension over the keys: no function frame per slot.
    out = {
        "slot": slot["slot"],
        "slot_id": slot["slot_id"],
        "id": slot["id"],
        "probability": slot["probability"],
        "explored": slot["explored"],
    }
    if include_pmf:
        out["pmf"] = [{"id": cid, "probability": p} for cid, p in slot["pmf"]]
    return out


def time_bounds(since: str | None, until: str | None) -> dict[str, float | None]:
    """``since``/``until`` query values as UNIX seconds; a bad one is a 422 naming it."""
    bounds: dict[str, float | None] = {}
    for field, text in (("since", since), ("until", until)):
        try:
            bounds[field] = parse_instant(text) if text is not None else None
        except ValueError as exc:
            raise InvalidRequest(str(exc), field) from None
    return bounds


def decision_out(row: dict[str, Any], include_pmf: bool) -> dict[str, Any]:
    return {
        "event_id": row["event_id"],
        "policy": row["policy"],
        "policy_version": row["policy_version"],
        "arm": row["arm"],
        "model_version": row["model_version"],
        "deferred": row["deferred"],
        "slots": [_slot_out(s, include_pmf) for s in row["slots"]]
        if len(row["slots"]) != 1
        else [_slot_out(row["slots"][0], include_pmf)],  # no comprehension frame for one
    }


_DECIDE = require("decide")
_JSON = "application/json"


async def decide_fast(request: Request) -> Response | None:
    """``decide`` for the common request, without FastAPI's dependency solving and with the
    body decoded by msgspec (``api/fast_body.py``): about a third less CPU per decision.
    Anything unusual -- another content type or query, a body outside the fast decoder's
    subset, including every invalid one -- returns None, and FastAPI's path answers it.
    For what it does answer, the checks and their order are FastAPI's: the body parses
    and validates, then the key is checked (same errors), then the request is served."""
    scope = request.scope
    query = scope["query_string"]
    if query and query != b"include=pmf":
        return None
    if _content_type(scope) != _JSON:
        return None
    body = decode_decision(await request.body())
    if body is None:
        return None
    principal = await _DECIDE.admit(request)
    # state["service"]: see auth.Require.admit (the same entry, without a failed look-up)
    return await _decide(body, scope["app"].state["service"], principal, bool(query))


def _content_type(scope: Scope) -> str:
    """``request.headers.get("content-type", "").lower()``, read from the raw headers
    without building the ``Headers`` object (the first such header, as it would)."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.decode("latin-1").lower()
    return ""


_NO_IDS: frozenset[str] = frozenset()


def counted_slots(count: int) -> tuple[Slot, ...]:
    """``slot_list(count)``: ``count`` frozen ``Slot`` objects with ids ``"0"``, ``"1"``,
    ... and no features, made once per count up to 64 (~2 µs a decision for one slot,
    mostly the frozen dataclass's ``__init__``; larger counts, rare and up to 10,000, are
    made per request as before). Shared by every decision asking for that count, as all
    domain objects are immutable: nothing writes to a slot or its (empty) features."""
    return _kept_slots(count) if 0 < count <= 64 else slot_list(count)


_kept_slots = functools.lru_cache(maxsize=None)(slot_list)


async def _decide(
    body: DecisionIn | FastDecision,
    service: DecisionService,
    principal: Principal,
    include_pmf: bool,
) -> Response:
    candidates: tuple[Candidate, ...]
    if body.candidates is None or body.candidate_ids is not None:  # the policy's catalog
        try:
            candidates = catalog_candidates(service, principal, body)
        except InvalidRequest:
            # A retry of a logged decision is answered from the log, whatever the
            # catalog holds now (items removed, cleared, grown past the limit).
            if body.event_id is None or body.candidates is not None:
                raise
            admit_policy(principal, body.policy)  # the key may see this policy's events
            try:
                stored = await service.get_decision(body.event_id)
            except NotFound:
                stored = None
            if stored is None or stored["policy"] != body.policy:
                raise
            return json_response(decision_out(stored, include_pmf))
    elif isinstance(body.candidates, KeptCandidates):  # the fast path's, maybe shared
        candidates = body.candidates
        admit_candidates(principal, body.policy, candidates.features, most=candidates.max_features)
    else:
        admit_candidates(principal, body.policy, [c.features for c in body.candidates])
        # Positional, from a list: half the cost of keywords and a generator (50-500 a request)
        candidates = tuple([Candidate(c.id, c.features) for c in body.candidates])
    policy = service.engine.policy(body.policy)
    slots = (
        counted_slots(policy.slots if body.slots is None else body.slots)
        if body.slots is None or isinstance(body.slots, int)
        else slot_list(
            [Slot(id=s.id, features=s.features, baseline=s.baseline) for s in body.slots]
        )
    )
    request = DecisionRequest(
        event_id=body.event_id or new_event_id(),
        policy=body.policy,
        candidates=candidates,
        slots=slots,
        context=body.context,
        excluded=frozenset(body.excluded) if body.excluded else _NO_IDS,
        user_id=body.user_id,
        defer=body.defer,
        pins=tuple([(pin.id, pin.slot) for pin in body.pins]) if body.pins else (),
        personalize=body.personalize,
    )
    row = await service.decide(request, may_exist=body.event_id is not None)
    return json_response(decision_out(row, include_pmf))


@router.post(
    "/v1/decisions",
    response_model=DecisionOut,
    responses=ERRORS,
    summary="Decide which candidates fill which ranked slots",
    description=(
        "Each slot is a contextual-bandit draw over the candidates still eligible; the "
        "response gives, per slot, the chosen candidate and the exact probability it was "
        "drawn with. The decision is durably logged before the response is sent. Repeating "
        "a known `event_id` returns the logged decision unchanged. `?include=pmf` adds each "
        "slot's full distribution."
    ),
)
@fast_path(decide_fast)
async def decide(
    body: DecisionIn,
    service: ServiceDep,
    principal: DecideKey,
    include: Annotated[str | None, Query(pattern="^pmf$")] = None,
) -> Response:
    return await _decide(body, service, principal, include == "pmf")


async def reward_fast(request: Request) -> Response | None:
    """``reward`` without FastAPI's dependency solving, as ``decide_fast`` does it: the
    body is validated by ``RewardIn`` itself (it is small), the key by the same ``Require``
    (after the body, as FastAPI orders them); any other request returns None."""
    if request.scope["query_string"] or _content_type(request.scope) != _JSON:
        return None
    try:
        body = RewardIn.model_validate_json(await request.body())
    except ValidationError:
        return None
    await _REWARD_KEY.admit(request)
    return await _reward(request.path_params["event_id"], body, request.app.state["service"])


async def _reward(event_id: str, body: RewardIn, service: DecisionService) -> Response:
    event_id = known_event_id(event_id)
    result = await service.reward(
        event_id, body.value, body.slot, body.id, body.kind, reward_id=body.reward_id
    )
    result["received_at"] = iso(result["received_at"])
    return json_response(result, 200 if result["duplicate"] else 201)


@router.post(
    "/v1/decisions/{event_id}/rewards",
    response_model=RewardOut,
    status_code=201,
    responses={
        **ERRORS,
        200: {"model": RewardOut, "description": "A retry: this reward_id is already stored"},
        409: {"model": ErrorOut, "description": "reward_id already used for another reward"},
    },
    dependencies=DECIDE_ON_EVENT,
    summary="Report a reward for one slot of a decision",
    description=(
        "Give `slot` (index) or `id` (the candidate shown); neither means slot 0. Several "
        "rewards for a slot are all stored and aggregated as the policy says (sum, first, "
        "last). A reward after the policy's reward window is stored and flagged `late`. "
        "With a `reward_id` (idempotency key) a retried request is stored once: the retry "
        "answers 200 with `duplicate: true`."
    ),
)
@fast_path(reward_fast)
async def reward(event_id: str, body: RewardIn, service: ServiceDep) -> Response:
    return await _reward(event_id, body, service)


@router.post(
    "/v1/decisions/{event_id}/activate",
    response_model=ActivationOut,
    responses=ERRORS,
    dependencies=DECIDE_ON_EVENT,
    summary="Activate a deferred decision (it was really shown)",
)
async def activate(event_id: str, service: ServiceDep) -> Response:
    event_id = known_event_id(event_id)
    result = await service.activate(event_id)
    result["activated_at"] = iso(result["activated_at"])
    return json_response(result)


@router.get(
    "/v1/decisions/{event_id}",
    responses=ERRORS,
    dependencies=READ_EVENT,
    summary="Read a logged decision back, with its rewards",
)
async def get_decision(event_id: str, service: ServiceDep) -> Response:
    event_id = known_event_id(event_id)
    row = await service.get_decision(event_id)
    policy = service.policies.get(row["policy"])
    how = policy.reward_aggregation if policy else "sum"
    out = decision_out(row, include_pmf=True)
    for slot, stored in zip(out["slots"], row["slots"], strict=True):
        slot["slot_features"] = stored.get("slot_features", {})
        on_time = [
            r["value"] for r in row["rewards"] if r["slot"] == slot["slot"] and not r["late"]
        ]
        slot["reward"] = aggregate(on_time, how)
    out.update(
        created_at=iso(row["created_at"]),
        activated_at=iso(row["activated_at"]),
        user_key=row["user_key"],
        context=row["context"],
        candidates=row["candidates"],
        excluded=row["excluded"],
        reward_aggregation=how,
        rewards=[{**r, "received_at": iso(r["received_at"])} for r in row["rewards"]],
    )
    return json_response(out)


@router.get("/v1/policies", responses=ERRORS, summary="List the configured policies")
async def list_policies(service: ServiceDep, principal: ReadKey) -> Response:
    """A key restricted to some policies sees only those."""
    visible = [p for p in service.policies.values() if principal.allows_policy(p.name)]
    return json_response({"policies": [p.to_dict() for p in visible]})


@router.get(
    "/v1/policies/{name}",
    responses=ERRORS,
    dependencies=READ_POLICY,
    summary="A policy's configuration, model version, counts and trainer lag",
)
async def get_policy(name: str, service: ServiceDep) -> Response:
    status = await service.policy_status(name)
    for key in ("created_at", "serving_loaded_at"):
        status["model"][key] = iso(status["model"][key])
    return json_response(status)


@router.get(
    "/v1/policies/{name}/lift",
    responses=ERRORS,
    dependencies=READ_POLICY,
    summary="Lift of the learned policy over the popularity holdout",
    description=(
        "Per arm: decisions, users, mean reward per decision and per user, guardrails "
        "(breadth per user per `period_seconds`, coverage, exposure Gini, secondary reward "
        "kinds: mean over the decisions that reported that kind). Lift with a user-level "
        "bootstrap 95% interval (`replicates`, default 500) and p-value, the tier label, and a "
        "sample-ratio check. The whole range is read on every call: narrow it on big logs. "
        "`since`/`until`: ISO 8601 or UNIX seconds; `until` defaults to now minus the "
        "reward window (closed windows only)."
    ),
)
async def get_lift(
    name: str,
    service: ServiceDep,
    since: str | None = None,
    until: str | None = None,
    replicates: Annotated[int, Query(ge=1, le=5000)] = 500,
    period_seconds: Annotated[float, Query(ge=60, le=366 * 86400)] = 86400,
) -> Response:
    bounds = time_bounds(since, until)
    report = await service.lift(name, bounds["since"], bounds["until"], replicates, period_seconds)
    return json_response(report)


@router.get(
    "/v1/policies/{name}/ope",
    responses=ERRORS,
    dependencies=READ_POLICY,
    summary="Off-policy estimates of target policies on this policy's log",
    description=(
        "`target` (repeatable): `uniform`, `logging`, `popularity` or `vw:ARGS` (evaluated "
        "progressively). Every logged slot with probability < 1 is a row; IPS, SNIPS, DM, DR "
        "and Switch-DR with normal and bootstrap 95% intervals, effective sample size, "
        "largest weight and overlap warnings. `since`/`until`: ISO 8601 or UNIX seconds."
    ),
)
async def get_ope(
    name: str,
    service: ServiceDep,
    target: Annotated[list[str] | None, Query()] = None,
    since: str | None = None,
    until: str | None = None,
    replicates: Annotated[int, Query(ge=1, le=5000)] = 500,
) -> Response:
    bounds = time_bounds(since, until)
    report = await service.ope(
        name, target or ["uniform", "logging"], bounds["since"], bounds["until"], replicates
    )
    return json_response(report)


@router.get("/healthz", summary="The process is alive")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get(
    "/readyz",
    summary="Ready for traffic: store migrated to head, models loaded, not shutting down",
    responses={503: {"description": "Not ready; `reason` says why (e.g. draining)"}},
)
async def readyz(service: ServiceDep) -> Response:
    ok, reason = await service.readiness()
    return json_response({"ready": ok, "reason": reason}, 200 if ok else 503)
