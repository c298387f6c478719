"""Personalizer features (lists of JSON objects, VW JSON style) as the service's feature maps.

Personalizer takes ``contextFeatures`` and each action's ``features`` as a *list of
objects*; it merged them into one VW JSON example, where an object-valued key opens a
namespace. The service's feature maps allow one level of nesting (namespace -> features),
so the conversion is:

* a scalar (string, number, boolean) under a top-level key: a feature of the default
  namespace (``context`` for context, ``action`` for actions, ``slot`` for slots);
* an object (or a list of objects) under a key: the namespace of that key, its deeper
  objects flattened into ``outer.inner`` names;
* a list of strings: a multi-valued string feature; a list of numbers: a dense vector
  (features ``0``, ``1``, … of a namespace named by the key);
* ``null`` and keys starting with ``_`` (VW JSON's reserved keys) are ignored.

Namespace names are made to match ``[A-Za-z][A-Za-z0-9_]*``. The same function converts
a Personalizer DSJSON log line, so a warm-started model sees imported history exactly as
it later sees live facade traffic.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic_core import PydanticCustomError

from bandit_service.api.features import check_features, printable

_NOT_NAME = re.compile(r"[^A-Za-z0-9_]")


class FeatureError(ValueError):
    """Features that cannot be converted; ``path`` points into the request."""

    def __init__(self, path: str, message: str) -> None:
        path, message = printable(path), printable(message)  # names may hold lone surrogates
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def namespace_name(key: str) -> str:
    name = _NOT_NAME.sub("_", key)
    if not name or not name[0].isalpha():
        name = "n" + name
    return name[:64]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


MAX_DEPTH = 8  # nesting levels inside a namespace; deeper is almost surely a mistake


def _flatten(prefix: str, value: Any, into: dict[str, Any], path: str, depth: int = 0) -> None:
    """Put ``value`` into one namespace's map under ``prefix`` (nested names joined by .)."""
    if value is None:
        return
    if depth > MAX_DEPTH:
        raise FeatureError(path, f"nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, Mapping):
        for key, inner in value.items():
            if isinstance(key, str) and key.startswith("_"):
                continue
            name = f"{prefix}.{key}" if prefix else str(key)
            _flatten(name, inner, into, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            if prefix:
                into[prefix] = list(value)
        elif all(_is_number(v) for v in value):
            for i, v in enumerate(value):
                into[f"{prefix}.{i}" if prefix else str(i)] = v
        else:
            for i, v in enumerate(value):
                name = prefix if isinstance(v, Mapping) else f"{prefix}.{i}" if prefix else str(i)
                _flatten(name, v, into, f"{path}[{i}]", depth + 1)
    elif isinstance(value, str | bool | int | float):
        if not prefix:
            raise FeatureError(path, "a feature needs a name")
        into[prefix] = value
    else:
        raise FeatureError(path, f"unsupported feature value of type {type(value).__name__}")


def _merge_object(obj: Mapping[str, Any], out: dict[str, Any], path: str) -> None:
    for key, value in obj.items():
        if not isinstance(key, str) or key.startswith("_") or value is None:
            continue
        where = f"{path}.{key}"
        is_vector = isinstance(value, list) and value and all(_is_number(v) for v in value)
        if (
            isinstance(value, Mapping)
            or is_vector
            or (isinstance(value, list) and any(isinstance(v, Mapping) for v in value))
        ):
            name = namespace_name(key)
            namespace = out.get(name)
            if not isinstance(namespace, dict):
                namespace = {}
                out[name] = namespace
            _flatten("", value, namespace, where)
            if not namespace:
                del out[name]
        elif isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                raise FeatureError(where, "a list must hold only strings, numbers or objects")
            out[key] = list(value)
        elif isinstance(value, str | bool | int | float):
            out[key] = value
        else:
            raise FeatureError(where, f"unsupported feature value of type {type(value).__name__}")


def to_feature_map(value: Any, path: str) -> dict[str, Any]:
    """A Personalizer feature list (or one object, as DSJSON stores it) as a feature map,
    validated like native features (types, sizes, counts)."""
    out: dict[str, Any] = {}
    if value is None:
        return out
    items = value if isinstance(value, list) else [value]
    for i, item in enumerate(items):
        where = f"{path}[{i}]" if isinstance(value, list) else path
        if not isinstance(item, Mapping):
            raise FeatureError(where, "each entry must be a JSON object of features")
        _merge_object(item, out, where)
    try:
        check_features(out)
    except PydanticCustomError as exc:
        ctx = exc.context or {}
        inner = str(ctx.get("path", ""))
        where = path if inner in ("", "features") else f"{path}.{inner}"
        raise FeatureError(where, str(ctx.get("message", exc.message()))) from None
    return out
