"""API-key authentication as a FastAPI dependency: ``require(scope)``.

Keys, scopes, policy restrictions and per-key limits are configured as described in
``bandit_service/apikeys.py`` and ``docs/security.md``. This module turns them into HTTP
answers in the service's error shape (``{"error": {"code", "message", "field"}}``):

* 401 ``unauthorized``: no key, or not a configured key (with ``WWW-Authenticate``);
* 403 ``forbidden``: the key lacks the endpoint's scope, or the request's policy is not
  among the key's ``policies``; 403 ``loopback_only``: no keys are configured and the
  client is not on a loopback address;
* 413 ``payload_too_large``: the body exceeds the key's ``max_body_bytes``;
* 422 ``invalid_request``: more candidates, or features in a candidate, than the key may send;
* 429 ``rate_limited`` with ``Retry-After``: the key's token bucket (per process) is empty.

A key is accepted from ``Authorization: Bearer <key>``, ``X-API-Key: <key>`` or
``Ocp-Apim-Subscription-Key: <key>`` (what Azure Personalizer clients send). With no keys
configured every request gets an anonymous principal with every scope and the global
limits, but only from loopback clients (``bandit-service serve`` also refuses to bind
anything else).

**Attaching it to a route or a router** (every route must be classified; the scope-matrix
test in ``tests/e2e/test_auth.py`` fails for a route it does not know)::

    from bandit_service.api.auth import require, Principal

    router = APIRouter(dependencies=[Depends(require("admin"))])    # a whole router

    @router.get("/v1/things/{name}", dependencies=[Depends(require("read", policy_param="name"))])
    async def thing(name: str) -> Response: ...

    @router.post("/v1/other")                      # when the body names the policy
    async def other(body: OtherIn, principal: Annotated[Principal, Depends(require("decide"))]):
        admit_candidates(principal, body.policy, [c.features for c in body.candidates])

``policy_param`` names a path parameter holding a policy name, ``event_param`` one holding
a decision's event id (the stored decision's policy is checked; an unknown event is left
for the route to answer 404). A body's policy and candidates are checked by the route,
after parsing, with ``admit_policy``/``admit_candidates``.

FastAPI parses a JSON body before dependencies run, so a body that is not JSON at all is a
400 even without a key; nothing is stored or logged for it.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from bandit_service.api.errors import error_response
from bandit_service.api.features import MAX_FEATURES
from bandit_service.apikeys import (
    SCOPE_MEANING,
    SCOPES,
    KeyRing,
    Principal,
    Scope,
    is_loopback,
    retry_after_header,
)
from bandit_service.errors import InvalidRequest
from bandit_service.store import repository

log = logging.getLogger(__name__)

KEY_HEADERS = ("Authorization: Bearer <key>", "X-API-Key", "Ocp-Apim-Subscription-Key")
# Declared as FastAPI security schemes so /docs offers "Authorize" with each of them.
_bearer = HTTPBearer(
    scheme_name="Bearer", auto_error=False, description="`Authorization: Bearer <key>`"
)
_x_api_key = APIKeyHeader(name="X-API-Key", scheme_name="X-API-Key", auto_error=False)
_ocp_key = APIKeyHeader(
    name="Ocp-Apim-Subscription-Key",
    scheme_name="Ocp-Apim-Subscription-Key",
    auto_error=False,
    description="The header Azure Personalizer clients send",
)


class AuthError(Exception):
    """An access failure, answered with ``status`` in the service's error shape."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


def _unauthorized(message: str, invalid: bool) -> AuthError:
    challenge = 'Bearer realm="bandit-service"' + (', error="invalid_token"' if invalid else "")
    return AuthError(401, "unauthorized", message, headers={"WWW-Authenticate": challenge})


def _presented_key(
    request: Request,
    bearer: HTTPAuthorizationCredentials | None,
    x_api_key: str | None,
    ocp_key: str | None,
) -> str:
    sent = {
        name: value
        for name, value in (
            ("Authorization", bearer.credentials if bearer else None),
            ("X-API-Key", x_api_key),
            ("Ocp-Apim-Subscription-Key", ocp_key),
        )
        if value
    }
    if not sent:
        if request.headers.get("authorization"):
            raise _unauthorized(
                "the Authorization header must be 'Bearer <key>' (or send the key in "
                "X-API-Key or Ocp-Apim-Subscription-Key)",
                invalid=True,
            )
        raise _unauthorized(
            f"an API key is required: send it as {', '.join(KEY_HEADERS[:-1])} or "
            f"{KEY_HEADERS[-1]}",
            invalid=False,
        )
    if len(set(sent.values())) > 1:
        raise _unauthorized(
            f"different API keys were sent in {' and '.join(sent)}; send one key",
            invalid=True,
        )
    return next(iter(sent.values()))


def _check_client(request: Request) -> None:
    """Without keys only loopback clients are served (a second line behind ``serve``)."""
    host = request.client.host if request.client else None
    if host is not None:
        _check_host(host)


def _check_host(host: str) -> None:
    """403 ``loopback_only`` for a client address that is not on loopback."""
    if _refused_host(host):
        raise AuthError(
            403,
            "loopback_only",
            "no API keys are configured, so this service answers only loopback clients; "
            "configure keys (BANDIT_API_KEYS_FILE, see docs/security.md)",
        )


@functools.lru_cache(maxsize=1024)
def _refused_host(host: str) -> bool:
    """A network peer that is not on loopback (cached: parsing the address on every
    request showed in profiles)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # not a network peer (in-process test clients name themselves)
    return not is_loopback(host)


def _decision_policy(db: Engine, event_id: str) -> str | None:
    with Session(db) as session:
        return repository.decision_policy(session, event_id)


def admit_policy(principal: Principal, policy: str, field: str = "policy") -> None:
    """403 unless the principal may use ``policy``."""
    if not principal.allows_policy(policy):
        raise AuthError(
            403,
            "forbidden",
            f"key {principal.name!r} may not use policy {policy!r} "
            f"(it may use: {principal.describe_policies()})",
            field,
        )


def count_features(features: Mapping[str, Any]) -> int:
    """Features as ``check_features`` counts them: a namespace counts its members."""
    return sum(len(v) if isinstance(v, dict) else 1 for v in features.values())


def admit_candidates(
    principal: Principal,
    policy: str,
    candidate_features: Sequence[Mapping[str, Any]],
    field: str = "candidates",
    *,
    most: int | None = None,
) -> None:
    """The policy, the number of candidates and the features of each, against the key.

    ``most``: the largest feature count among ``candidate_features`` when the caller knows
    it (a kept candidate set, ``candidate_sets.KeptCandidates.max_features``); within the
    limit, the candidates need not be counted one by one. Over it, they are, to name the
    first one over (the same error either way)."""
    admit_policy(principal, policy)
    limits = principal.limits
    keyed = not principal.anonymous
    whose = f" of key {principal.name!r}" if keyed else ""
    if len(candidate_features) > limits.max_candidates:
        raise InvalidRequest(
            f"{len(candidate_features)} candidates exceed the limit{whose} of "
            f"{limits.max_candidates}" + ("" if keyed else " (BANDIT_MAX_CANDIDATES)"),
            field,
        )
    if limits.max_features_per_candidate >= MAX_FEATURES:
        return  # the request schema already refuses more than MAX_FEATURES per candidate
    if most is not None and most <= limits.max_features_per_candidate:
        return
    for i, features in enumerate(candidate_features):
        count = count_features(features)
        if count > limits.max_features_per_candidate:
            raise InvalidRequest(
                f"{count} features exceed the limit{whose} of "
                f"{limits.max_features_per_candidate} per candidate"
                + ("" if keyed else " (BANDIT_MAX_FEATURES_PER_CANDIDATE)"),
                f"{field}[{i}].features",
            )


class Require:
    """The dependency ``require(scope)`` builds; ``scope`` is kept for introspection."""

    def __init__(
        self,
        scope: Scope,
        *,
        policy_param: str | None = None,
        event_param: str | None = None,
        all_policies: bool = False,
    ) -> None:
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r} (known: {', '.join(SCOPES)})")
        self.scope = scope
        self.policy_param = policy_param
        self.event_param = event_param
        self.all_policies = all_policies

    async def __call__(
        self,
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        x_api_key: Annotated[str | None, Depends(_x_api_key)],
        ocp_key: Annotated[str | None, Depends(_ocp_key)],
    ) -> Principal:
        return await self._admit(request, bearer, x_api_key, ocp_key)

    async def admit(self, request: Request) -> Principal:
        """The same checks, the same answers, for a route that reads the request itself
        instead of having FastAPI solve the dependency (the decision route's fast path:
        dependency solving was ~10% of a decision's CPU). The key headers are read by the
        very objects FastAPI would call."""
        # ``state["keyring"]``, not ``state.keyring``: Starlette's ``State`` answers an
        # attribute only after the normal look-up has failed and built its AttributeError
        # (~0.3 µs more; the same dict entry).
        keyring: KeyRing = request.scope["app"].state["keyring"]
        anonymous = keyring.anonymous
        if anonymous is not None:  # no keys configured: none is read
            if anonymous.policies is None and (
                anonymous.limits.max_body_bytes >= keyring.defaults.max_body_bytes
            ):
                # What ``_admit`` does for this principal, without its awaits and the
                # ``Request`` properties it goes through (client address, state object):
                # 5.6% of a decision's in-process CPU before, ~1 µs now. The same checks,
                # the same answers; any other principal takes ``_admit``.
                client = request.scope.get("client")
                if client is not None and client[0] is not None:
                    _check_host(client[0])
                request.scope.setdefault("state", {})["principal"] = anonymous
                return anonymous
            return await self._admit(request, None, None, None)
        return await self._admit(
            request, await _bearer(request), await _x_api_key(request), await _ocp_key(request)
        )

    async def _admit(
        self,
        request: Request,
        bearer: HTTPAuthorizationCredentials | None,
        x_api_key: str | None,
        ocp_key: str | None,
    ) -> Principal:
        keyring: KeyRing = request.app.state.keyring
        if keyring.anonymous is not None:
            _check_client(request)
            principal = keyring.anonymous
        else:
            found = keyring.authenticate(_presented_key(request, bearer, x_api_key, ocp_key))
            if found is None:
                log.debug("refused an unknown API key from %s", _client(request))
                raise _unauthorized("the API key is not valid", invalid=True)
            principal = found
            wait = keyring.take(principal)
            if wait > 0:
                limits = principal.limits
                raise AuthError(
                    429,
                    "rate_limited",
                    f"key {principal.name!r} is limited to {limits.rate_per_second:g} "
                    f"requests/s (burst {limits.burst}, per server process); retry in "
                    f"{retry_after_header(wait)} s",
                    headers={"Retry-After": retry_after_header(wait)},
                )
            if self.scope not in principal.scopes:
                raise AuthError(
                    403,
                    "forbidden",
                    f"key {principal.name!r} lacks the {self.scope!r} scope this endpoint "
                    f"needs ({SCOPE_MEANING[self.scope]}); it has: "
                    f"{', '.join(sorted(principal.scopes))}",
                )
        request.state.principal = principal
        await self._check_body_size(request, principal)
        if principal.policies is not None:
            if self.all_policies:
                raise AuthError(
                    403,
                    "forbidden",
                    f"key {principal.name!r} is restricted to some policies "
                    f"({principal.describe_policies()}); this endpoint acts on every policy",
                )
            await self._check_policy(request, principal)
        return principal

    async def _check_body_size(self, request: Request, principal: Principal) -> None:
        keyring: KeyRing = request.app.state.keyring
        limit = principal.limits.max_body_bytes
        if limit >= keyring.defaults.max_body_bytes:
            return  # the BodySizeLimit middleware already enforces the global limit
        length = request.headers.get("content-length")
        size = int(length) if length and length.isdigit() else len(await request.body())
        if size > limit:
            raise AuthError(
                413,
                "payload_too_large",
                f"request body exceeds {limit} bytes, the limit of key {principal.name!r}",
                "body",
            )

    async def _check_policy(self, request: Request, principal: Principal) -> None:
        if self.policy_param is not None:
            policy = request.path_params.get(self.policy_param)
            if policy is not None:
                admit_policy(principal, str(policy), self.policy_param)
        if self.event_param is not None:
            event_id = request.path_params.get(self.event_param)
            if event_id is not None:
                db: Engine = request.app.state.service.db
                stored = await asyncio.to_thread(_decision_policy, db, str(event_id))
                if stored is not None:  # unknown events are the route's 404
                    admit_policy(principal, stored, self.event_param)


def require(
    scope: Scope,
    *,
    policy_param: str | None = None,
    event_param: str | None = None,
    all_policies: bool = False,
) -> Require:
    """A dependency admitting requests whose key has ``scope`` (see the module docstring).
    ``all_policies``: the endpoint acts across policies (e.g. deleting a user), so a key
    restricted to some policies is refused."""
    return Require(
        scope, policy_param=policy_param, event_param=event_param, all_policies=all_policies
    )


def _client(request: Request) -> str:
    return request.client.host if request.client else "-"


def access_summary(keyring: KeyRing) -> str:
    """One line for the start-up log: how the service is protected."""
    if not keyring.configured:
        return (
            "no API keys configured: serving loopback clients only, with every scope "
            "(configure BANDIT_API_KEYS_FILE to serve other addresses)"
        )
    names = ", ".join(p.name for _, p in keyring.principals)
    return f"{len(keyring.principals)} API key(s) from {keyring.source}: {names}"


def install_auth(app: FastAPI, keyring: KeyRing) -> None:
    """Make ``require`` work on ``app``: the keyring and the handler of ``AuthError``."""
    app.state.keyring = keyring

    @app.exception_handler(AuthError)
    async def _on_auth_error(_request: Request, exc: AuthError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.field, headers=exc.headers)

    log.info("%s", access_summary(keyring))
