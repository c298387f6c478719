"""Request bodies validated straight from JSON bytes, by pydantic's own parser.

FastAPI parses a JSON body with the standard library (``json.loads``) and then validates
the resulting dicts (``validate_python``). For a decision request (50 candidates x 10
features) those two steps were the largest cost outside the engine, a quarter of a
decision's CPU under load; ``Model.model_validate_json`` does both in one pass in
pydantic-core and took half the time (``benchmarks/profile_service.py``; docs/performance.md).

``JsonModelRoute`` keeps everything else as FastAPI does it (routing, OpenAPI schema,
dependencies): only ``Request.json()`` changes. For a valid body it returns the validated
model, which FastAPI then accepts as is (pydantic does not revalidate an instance of the
model itself); for an invalid one it returns what ``json.loads`` returns, so FastAPI
validates and reports the errors exactly as before.

A route may also declare a *fast path* (:func:`fast_path`): a function of the request that
answers the common, well-formed request without FastAPI's dependency solving and body
validation, or returns None to leave the request to FastAPI. It must give the same
answer FastAPI's path would (docs/performance.md: the decision route's).

The hot routes' pre-router (``api/hot_routes.py``) calls a route's fast path before any of
FastAPI's routing; when that declines, it hands the request to FastAPI marked with
``FAST_PATH_DECLINED`` in its scope, so that the route does not try the fast path twice.
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError


class _ModelRequest(Request):
    """A request whose JSON body is parsed and validated as ``model`` in one step."""

    def __init__(self, request: Request, model: type[BaseModel]) -> None:
        super().__init__(request.scope, request.receive)
        self._model = model
        if hasattr(request, "_body"):  # a fast path read it already: there is no more
            self._body = request._body

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = self._model.model_validate_json(body)
            except ValidationError:
                # Invalid: hand FastAPI the parsed JSON (or its JSONDecodeError) so that it
                # reports the problem exactly as it always has. Only bad requests pay twice.
                self._json = json.loads(body)
        return self._json


def _body_model(endpoint: Callable[..., Any]) -> type[BaseModel] | None:
    """The one pydantic model among the endpoint's parameters (its JSON body), if any."""
    hints = typing.get_type_hints(endpoint, include_extras=False)
    models = [
        hint
        for name, hint in hints.items()
        if name != "return"
        and name in inspect.signature(endpoint).parameters
        and inspect.isclass(hint)
        and issubclass(hint, BaseModel)
    ]
    return models[0] if len(models) == 1 else None


FastPath = Callable[[Request], Awaitable[Response | None]]
FAST_PATH_DECLINED = "bandit.fast_path_declined"  # scope key: the fast path said None
_Endpoint = TypeVar("_Endpoint", bound=Callable[..., Any])


def fast_path(handler: FastPath) -> Callable[[_Endpoint], _Endpoint]:
    """Mark an endpoint (below ``@router.post``) with a fast path tried before FastAPI's
    own handling: ``handler(request)`` answers, or returns None to fall through."""

    def mark(endpoint: _Endpoint) -> _Endpoint:
        endpoint.fast_path = handler  # type: ignore[attr-defined]
        return endpoint

    return mark


class JsonModelRoute(APIRoute):
    """An ``APIRoute`` whose body model is validated from the raw JSON bytes."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        model = _body_model(self.endpoint)
        if model is None:
            return handler
        fast: FastPath | None = getattr(self.endpoint, "fast_path", None)

        async def route_handler(request: Request) -> Response:
            if (
                fast is not None
                and FAST_PATH_DECLINED not in request.scope
                and (response := await fast(request)) is not None
            ):
                return response
            return await handler(_ModelRequest(request, model))

        return route_handler
