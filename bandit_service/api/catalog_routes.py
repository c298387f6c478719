"""Routes of the candidate catalog (``bandit_service/catalog.py``). Thin: parse, delegate.

Scopes (``bandit_service.api.auth.require``), checked against the policy in the path:

* ``GET    /v1/policies/{name}/catalog``                   -> ``read``  (version, size)
* ``GET    /v1/policies/{name}/catalog/items``             -> ``read``  (a page, by id)
* ``GET    /v1/policies/{name}/catalog/items/{item_id}``   -> ``read``
* ``POST   /v1/policies/{name}/catalog/items``             -> ``admin`` (upsert a batch)
* ``PUT    /v1/policies/{name}/catalog/items``             -> ``admin`` (replace them all)
* ``DELETE /v1/policies/{name}/catalog/items``             -> ``admin`` (clear)
* ``DELETE /v1/policies/{name}/catalog/items/{item_id}``   -> ``admin``

The shape follows HTTP's methods on a collection: ``PUT`` replaces the collection's whole
state (RFC 9110 §9.3.4), so upserting some items while keeping the others is a ``POST``
of a batch to the collection; ``DELETE`` of the collection clears it. Each of them is one
transaction and one new catalog version. Item ids travel in the path URL-encoded; an id
holding ``/`` cannot be addressed there (list the items, or replace the catalog).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from pydantic import Field
from sqlalchemy.orm import Session

from bandit_service.api.auth import Principal, count_features, require
from bandit_service.api.features import text_problem
from bandit_service.api.json_route import JsonModelRoute
from bandit_service.api.routes import ERRORS, ServiceDep, iso, json_response
from bandit_service.api.schemas import CandidateIn, Strict
from bandit_service.catalog import MAX_BATCH_ITEMS
from bandit_service.domain import Candidate
from bandit_service.errors import InvalidRequest, NotFound
from bandit_service.policy import PolicyConfig
from bandit_service.service import DecisionService
from bandit_service.store import catalog as store

router = APIRouter(route_class=JsonModelRoute)

AdminKey = Annotated[Principal, Depends(require("admin", policy_param="name"))]
READ: list[Any] = [Depends(require("read", policy_param="name"))]
PAGE_MAX = 1000


class CatalogItemsIn(Strict):
    items: list[CandidateIn] = Field(
        max_length=MAX_BATCH_ITEMS,
        description=f"Items `{{id, features}}` (ids unique; at most {MAX_BATCH_ITEMS}); "
        "features follow the rules of request candidates",
    )


def _policy(service: DecisionService, name: str) -> PolicyConfig:
    policy = service.policies.get(name)
    if policy is None:
        raise NotFound(f"unknown policy {name!r}", "name")
    return policy


def _item_id(item_id: str) -> str:
    """The rules of a candidate id, so every stored item is addressable (but ``/``)."""
    if not 1 <= len(item_id) <= 256:
        raise InvalidRequest("item_id must be 1 to 256 characters", "item_id")
    if (problem := text_problem(item_id)) is not None:
        raise InvalidRequest(f"item_id {problem}", "item_id")
    return item_id


def _items(principal: Principal, body: CatalogItemsIn) -> list[Candidate]:
    """The batch as candidates, within the key's features-per-candidate limit."""
    limit = principal.limits.max_features_per_candidate
    for i, item in enumerate(body.items):
        if (count := count_features(item.features)) > limit:
            raise InvalidRequest(
                f"{count} features exceed the limit of {limit} per candidate",
                f"items[{i}].features",
            )
    return [Candidate(id=item.id, features=item.features) for item in body.items]


def _change_out(result: dict[str, Any]) -> Response:
    return json_response({**result, "updated_at": iso(result["updated_at"])})


@router.post(
    "/v1/policies/{name}/catalog/items",
    responses=ERRORS,
    summary="Add or replace catalog items by id; the others stay (scope: admin)",
    description=(
        f"Up to {MAX_BATCH_ITEMS} items per request, written in one transaction as one new "
        "catalog version. This process serves them at once, the others within "
        "`BANDIT_MODEL_RELOAD_SECONDS`."
    ),
)
async def upsert_items(
    name: str, body: CatalogItemsIn, service: ServiceDep, principal: AdminKey
) -> Response:
    policy = _policy(service, name)
    if not body.items:
        raise InvalidRequest("items must hold at least one item", "items")
    items = _items(principal, body)
    result = await asyncio.to_thread(
        service.catalog.upsert, name, items, allow_identifiers=policy.allow_identifier_features
    )
    return _change_out(result)


@router.put(
    "/v1/policies/{name}/catalog/items",
    responses=ERRORS,
    summary="Replace the whole catalog with these items (scope: admin)",
    description=(
        "Items not named are removed; an empty list clears the catalog. One transaction, "
        f"one new version; at most {MAX_BATCH_ITEMS} items (grow a bigger catalog with POST)."
    ),
)
async def replace_items(
    name: str, body: CatalogItemsIn, service: ServiceDep, principal: AdminKey
) -> Response:
    policy = _policy(service, name)
    items = _items(principal, body)
    result = await asyncio.to_thread(
        service.catalog.replace, name, items, allow_identifiers=policy.allow_identifier_features
    )
    return _change_out(result)


@router.delete(
    "/v1/policies/{name}/catalog/items",
    responses=ERRORS,
    summary="Remove every catalog item (scope: admin)",
)
async def clear_items(name: str, service: ServiceDep, _principal: AdminKey) -> Response:
    _policy(service, name)
    result = await asyncio.to_thread(service.catalog.replace, name, [], allow_identifiers=True)
    return _change_out(result)


@router.delete(
    "/v1/policies/{name}/catalog/items/{item_id}",
    responses=ERRORS,
    summary="Remove one catalog item (scope: admin)",
)
async def remove_item(
    name: str, item_id: str, service: ServiceDep, _principal: AdminKey
) -> Response:
    _policy(service, name)
    result = await asyncio.to_thread(service.catalog.remove, name, _item_id(item_id))
    return _change_out(result)


@router.get(
    "/v1/policies/{name}/catalog",
    responses=ERRORS,
    dependencies=READ,
    summary="The catalog's version and size, in the store and as this process serves it",
)
async def catalog_status(name: str, service: ServiceDep) -> Response:
    _policy(service, name)

    def read() -> tuple[tuple[int, float, int] | None, int]:
        with Session(service.db) as session:
            return store.versions(session).get(name), store.live_count(session, name)

    stored, count = await asyncio.to_thread(read)
    serving = service.catalog.snapshot(name)
    return json_response({
        "policy": name,
        "version": stored[0] if stored else 0,
        "updated_at": iso(stored[1]) if stored else None,
        "items": count,
        "serving_version": serving.version,
        "serving_items": len(serving),
    })  # fmt: skip


@router.get(
    "/v1/policies/{name}/catalog/items",
    responses=ERRORS,
    dependencies=READ,
    summary="Catalog items in id order, a page at a time",
    description=(
        "`limit` items (default 100, at most 1000) with an id after `after`; the answer's "
        "`next` is the `after` of the next page (null on the last one)."
    ),
)
async def list_items(
    name: str,
    service: ServiceDep,
    after: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 100,
) -> Response:
    _policy(service, name)
    if after is not None:
        _item_id(after)

    def read() -> list[dict[str, Any]]:
        with Session(service.db) as session:
            return store.list_items(session, name, after, limit + 1)

    rows = await asyncio.to_thread(read)
    page = rows[:limit]
    return json_response({
        "policy": name,
        "items": [{**row, "updated_at": iso(row["updated_at"])} for row in page],
        "next": page[-1]["id"] if len(rows) > limit else None,
    })  # fmt: skip


@router.get(
    "/v1/policies/{name}/catalog/items/{item_id}",
    responses=ERRORS,
    dependencies=READ,
    summary="One catalog item",
)
async def get_item(name: str, item_id: str, service: ServiceDep) -> Response:
    _policy(service, name)
    item_id = _item_id(item_id)

    def read() -> dict[str, Any] | None:
        with Session(service.db) as session:
            return store.get_item(session, name, item_id)

    row = await asyncio.to_thread(read)
    if row is None:
        raise NotFound(f"no item {item_id!r} in policy {name!r}'s catalog", "item_id")
    return json_response({**row, "updated_at": iso(row["updated_at"])})
