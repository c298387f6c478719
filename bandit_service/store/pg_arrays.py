"""Column arrays of the PostgreSQL append, each of a list type whose array type is known.

The writer sends a batch of decisions as one ``INSERT … SELECT FROM unnest(…)`` with one
binary array per column (``repository._append_postgresql``). Given a plain ``list``,
psycopg works out the array's type on every execute, for every array: it scans the list
twice for the element types (``ListBinaryDumper.get_key`` and ``upgrade``), picks the
smallest integer type that holds the largest value, makes a new dumper for it, and for a
list of ``None`` only (``user_key`` of anonymous traffic) falls back to a text-format
array of unknown type. For 14 columns that was ~40% of the execute's client CPU at one
decision a batch (py-spy on benchmarks/pgwrite_append.py's loop), more than dumping the
elements themselves.

A list of one of these classes names its array type up front: its dumper has the array's
OID, so psycopg takes it as it is (no scan, no upgrade) and dumps the elements with the
element type's own binary dumper, the same bytes as before for the same values (each
column's values are first converted to the column's Python type, ``repository._pg_array``).
The server receives the array type the statement casts to anyway (``%b::text[]`` …), so
the values stored are the same; the prepared statement also keeps one parameter-type
signature (it had up to four: ``int2[]``/``int4[]``/``int8[]`` by the largest model
version, and the untyped array of an all-``None`` column).

The dumpers are registered on psycopg's global adapters when this module is imported,
which ``database.make_engine`` does before a PostgreSQL engine makes its first
connection (each connection copies the global map when it is made). A connection made
without them (an engine built some other way, before this import) finds ``list``'s own
dumper through the class's MRO: the same bytes, only at the old cost.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import postgres
from psycopg.types.array import ListBinaryDumper


class TextArray(list[Any]):
    """A ``text[]`` parameter (``None`` elements are NULL)."""


class Float8Array(list[Any]):
    """A ``float8[]`` parameter."""


class Int4Array(list[Any]):
    """An ``int4[]`` parameter."""


class BoolArray(list[Any]):
    """A ``bool[]`` parameter."""


ARRAY_TYPES: dict[str, type[list[Any]]] = {
    "text": TextArray,
    "float8": Float8Array,
    "int4": Int4Array,
    "bool": BoolArray,
}


def _dumper(element: str) -> type[ListBinaryDumper]:
    """A binary array dumper of a fixed element type (``BaseListDumper`` makes the
    element's binary dumper from ``element_oid``; an ``oid`` set skips the upgrade)."""
    info = postgres.types[element]
    assert info.array_oid
    return type(
        f"{element.capitalize()}ArrayDumper",
        (ListBinaryDumper,),
        {"element_oid": info.oid, "oid": info.array_oid},
    )


def register(adapters: psycopg.adapt.AdaptersMap) -> None:
    for element, cls in ARRAY_TYPES.items():
        adapters.register_dumper(cls, _dumper(element))


register(psycopg.adapters)
