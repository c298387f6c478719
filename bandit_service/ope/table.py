"""The project's own decision-log schema as a table: CSV or Parquet, one row per logged slot.

=================  ===========  ==========================================================
column             required     meaning
=================  ===========  ==========================================================
``candidates``     yes          the candidates eligible for the slot, in order: a JSON list
                                of ``{"id": "a", "features": {...}}`` (or of plain ids)
``chosen``         yes          id of the candidate shown
``probability``    yes          the logging policy's probability of ``chosen``, in (0, 1];
                                rows with exactly 1 (pins, holdout) are skipped and counted
``reward``         yes          the slot's reward (a number)
``event_id``       no           the decision's id (default: the row number)
``created_at``     no           UNIX seconds; rows must be in time order (default: row no.)
``slot``           no           0-based slot index (default 0)
``context``        no           JSON object of context features (nested objects are
                                namespaces, as in requests)
``slot_features``  no           JSON object of the slot's features
``pmf``            no           the logged distribution: JSON ``[["a", 0.7], ["b", 0.3]]``;
                                needed by the ``logging`` target
``target_NAME``    no           explicit target probabilities, same form as ``pmf``;
                                evaluated with ``--target explicit:NAME``
=================  ===========  ==========================================================

In Parquet the JSON columns may be strings or the equivalent nested types. The same rows
as the JSON-lines schema of :mod:`bandit_service.ope.files` (where ``pmf`` and targets are
nested values). Parquet needs ``pyarrow``: ``pip install 'bandit-service[parquet]'``.

Files are read in chunks (default 50,000 rows), so memory is bounded by the chunk, not the
file. Every error names the file, the data row (1-based, header excluded) and the column.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bandit_service.domain import Candidate
from bandit_service.ope.evaluate import LogStats, SlotRow
from bandit_service.ope.stream import Chunk, RowFeatures, Source, Vocabulary

REQUIRED = ("candidates", "chosen", "probability", "reward")
OPTIONAL = ("event_id", "created_at", "slot", "context", "slot_features", "pmf")
TARGET_PREFIX = "target_"
PARQUET_EXTRA = "pip install 'bandit-service[parquet]' (pyarrow)"


def is_table(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".csv", ".parquet", ".pq")


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading or writing Parquet needs pyarrow: {PARQUET_EXTRA}") from None
    return pq


LIGHT_COLUMNS = {"chosen", "probability", "reward", "created_at"}
FULL_COLUMNS = LIGHT_COLUMNS | {"candidates", "pmf"}  # and the target_* columns
ROW_COLUMNS = LIGHT_COLUMNS | {"candidates", "event_id", "slot", "context", "slot_features"}


def _wanted(name: str, mode: str) -> bool:
    if mode == "light":
        return name in LIGHT_COLUMNS
    if mode == "full":
        return name in FULL_COLUMNS or name.startswith(TARGET_PREFIX)
    if mode == "rows":
        return name in ROW_COLUMNS
    return True  # "all"


def _raw_chunks(path: Path, chunk_rows: int, mode: str) -> Iterator[dict[str, Any]]:
    """Column name -> values (lists, or arrays for Parquet numbers) per chunk; only the
    columns the mode needs are read (Parquet) or kept (CSV)."""
    if path.suffix.lower() == ".csv":
        import csv

        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: empty file (expected a header row)")
            _check_columns(path, header)
            keep = [(i, name) for i, name in enumerate(header) if _wanted(name, mode)]
            buffer: list[list[str]] = []
            for record in reader:
                if len(record) != len(header):
                    raise ValueError(
                        f"{path}, line {reader.line_num}: {len(record)} fields but the header "
                        f"has {len(header)}"
                    )
                buffer.append(record)
                if len(buffer) == chunk_rows:
                    yield {name: [r[i] for r in buffer] for i, name in keep}
                    buffer = []
            if buffer:
                yield {name: [r[i] for r in buffer] for i, name in keep}
        return
    pq = _pyarrow_parquet()
    handle = pq.ParquetFile(path)
    names = handle.schema_arrow.names
    _check_columns(path, names)
    columns = [n for n in names if _wanted(n, mode)]
    for batch in handle.iter_batches(batch_size=chunk_rows, columns=columns):
        out: dict[str, Any] = {}
        for name, array in zip(batch.schema.names, batch.columns, strict=True):
            kind = str(array.type)
            if kind.startswith(("int", "uint", "float", "double")):
                out[name] = array.to_numpy(zero_copy_only=False)
            elif kind.startswith(("list", "large_list")):
                out[name] = array  # nested: read column-wise by _chunk, no Python objects
            else:
                out[name] = array.to_pylist()
        yield out


def _check_columns(path: Path, names: Iterable[str]) -> None:
    missing = [c for c in REQUIRED if c not in set(names)]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")


def _numbers(path: Path, name: str, values: Any, first: int) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        for i, value in enumerate(values):
            try:
                float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path}, row {first + i + 1}: {name} {value!r} is not a number"
                ) from None
        raise
    bad = np.flatnonzero(~np.isfinite(array))
    if len(bad):
        raise ValueError(f"{path}, row {first + bad[0] + 1}: {name} is not a finite number")
    return array


def _json_column(values: list[Any], path: Path, rows: np.ndarray, column: str) -> list[Any]:
    """Parse a column of JSON texts in one call (rows already parsed, e.g. nested Parquet
    values, pass through); on an error, find and name the row."""
    texts = [v for v in values if isinstance(v, str | bytes)]
    if len(texts) < len(values):
        return [_json_value(v, path, int(rows[i]), column) for i, v in enumerate(values)]
    try:
        joined = b"[" + b",".join(t.encode() if isinstance(t, str) else t for t in texts) + b"]"
        parsed = orjson.loads(joined)
        if len(parsed) == len(values):
            return list(parsed)
    except orjson.JSONDecodeError:
        pass
    return [_json_value(v, path, int(rows[i]), column) for i, v in enumerate(values)]


def _json_value(value: Any, path: Path, index: int, column: str) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, str | bytes):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            raise ValueError(f"{path}, row {index + 1}: {column} is not valid JSON") from None
    return value


def _distribution_column(
    values: list[Any],
    ids: list[str],
    offsets: np.ndarray,
    path: Path,
    rows: np.ndarray,
    column: str,
) -> np.ndarray:
    """A ``pmf``-like column (``[["a", p], ...]`` or ``{"a": p}`` per row), aligned with the
    rows' flattened candidate ids. Fast path: every row lists its candidates in order."""
    flat_ids: list[Any] = []
    flat_p: list[Any] = []
    aligned = True
    try:
        for value in values:
            if isinstance(value, Mapping) or value is None:
                aligned = False
                break
            for cid, p in value:
                flat_ids.append(cid)
                flat_p.append(p)
    except (TypeError, ValueError):
        aligned = False
    out: np.ndarray
    if aligned and flat_ids == ids:
        try:
            out = np.asarray(flat_p, dtype=float)
        except (TypeError, ValueError):
            aligned = False
    else:
        aligned = False
    if not aligned:
        out = np.zeros(len(ids))
        for r, value in enumerate(values):
            where = f"{path}, row {rows[r] + 1}"
            row_ids = ids[offsets[r] : offsets[r + 1]]
            if value is None:
                raise ValueError(f"{where}: {column} is empty")
            try:
                pairs = value.items() if isinstance(value, Mapping) else value
                given = {str(cid): float(p) for cid, p in pairs}
            except (TypeError, ValueError):
                raise ValueError(f'{where}: {column} must be [["id", probability], ...]') from None
            unknown = set(given) - set(row_ids)
            if unknown:
                raise ValueError(f"{where}: {column} names {sorted(unknown)[0]!r}, not a candidate")
            out[offsets[r] : offsets[r + 1]] = [given.get(cid, 0.0) for cid in row_ids]
    _check_distribution(out, offsets, path, rows, column)
    return out


def _check_distribution(
    out: np.ndarray, offsets: np.ndarray, path: Path, rows: np.ndarray, column: str
) -> None:
    bad = np.flatnonzero(~np.isfinite(out) | (out < 0) | (out > 1))
    sums = np.add.reduceat(out, offsets[:-1]) if len(out) else np.zeros(0)
    bad_rows = np.flatnonzero(np.abs(sums - 1.0) > 1e-6)
    if len(bad) or len(bad_rows):
        r = int(np.searchsorted(offsets, bad[0], side="right") - 1) if len(bad) else bad_rows[0]
        raise ValueError(
            f"{path}, row {rows[r] + 1}: {column} must be probabilities in [0, 1] summing to 1"
        )


def table_source(
    path: str | Path,
    stats: LogStats,
    chunk_rows: int = 50_000,
    with_rows: bool = False,
    vocabulary: Vocabulary | None = None,
) -> Source:
    """A :data:`~bandit_service.ope.stream.Source` over a CSV or Parquet log. ``stats``
    counts what the "full" pass read; ``with_rows`` builds the :class:`SlotRow` objects
    with every column in every pass (the in-memory reader); otherwise only the "rows" mode
    builds them, for feature-based targets such as VW."""
    file = Path(path)
    if not is_table(file):
        raise ValueError(f"{file}: expected a .csv or .parquet log")
    if not file.exists():
        raise ValueError(f"{file}: no such file")
    vocab = vocabulary or Vocabulary()

    def source(mode: str) -> Iterator[Chunk]:
        kept = 0
        seen = 0
        read_mode = "all" if with_rows else mode
        for raw in _raw_chunks(file, chunk_rows, read_mode):
            chunk = _chunk(
                file, raw, seen, kept, vocab, mode, with_rows,
                stats if mode == "full" else None,
            )  # fmt: skip
            seen += len(raw["chosen"])
            if chunk is None:
                continue
            kept += len(chunk)
            yield chunk

    return source


def _chunk(
    path: Path,
    raw: dict[str, Any],
    seen: int,
    kept: int,
    vocab: Vocabulary,
    mode: str,
    with_rows: bool,
    stats: LogStats | None,
) -> Chunk | None:
    n = len(raw["chosen"])
    probability = _numbers(path, "probability", raw["probability"], seen)
    bad = np.flatnonzero((probability <= 0) | (probability > 1))
    if len(bad):
        raise ValueError(
            f"{path}, row {seen + bad[0] + 1}: probability {probability[bad[0]]} is not in (0, 1]"
        )
    reward = _numbers(path, "reward", raw["reward"], seen)
    created = (
        _numbers(path, "created_at", raw["created_at"], seen)
        if "created_at" in raw
        else np.arange(seen, seen + n, dtype=float)
    )
    keep = np.flatnonzero(probability < 1.0)
    if stats is not None:
        stats.decisions += n
        stats.skipped_deterministic += n - len(keep)
        stats.rows += len(keep)
    if len(keep) == 0:
        return None
    everything = len(keep) == n

    def kept_values(column: str) -> Any:
        values = raw[column]
        if _is_arrow_list(values):
            return values if everything else values.take(keep)
        values = list(values)
        return values if everything else [values[i] for i in keep]

    chosen_ids = [str(c) for c in kept_values("chosen")]
    codes_of = vocab.codes
    chosen_code = np.asarray(
        [codes_of[c] if c in codes_of else vocab.code(c) for c in chosen_ids], dtype=np.int64
    )
    chunk = Chunk(kept, created[keep], chosen_code, probability[keep], reward[keep])
    if mode == "light":
        return chunk
    rows_in_file = seen + keep
    column_values = kept_values("candidates")
    listed: Any
    ids: Any
    if _is_arrow_list(column_values):
        listed, ids, codes, sizes = _arrow_candidates(column_values, vocab, path, rows_in_file)
    else:
        listed, ids, codes, sizes = _json_candidates(column_values, vocab, path, rows_in_file)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    chosen_code_flat = np.repeat(chosen_code, sizes)
    hits = np.flatnonzero(codes == chosen_code_flat)
    hit_rows = np.searchsorted(offsets, hits, side="right") - 1
    first_hit = np.full(len(keep), -1, dtype=np.int64)
    first_hit[hit_rows[::-1]] = hits[::-1]  # the first match in each row wins
    missing = np.flatnonzero(first_hit < 0)
    if len(missing):
        r = missing[0]
        raise ValueError(
            f"{path}, row {rows_in_file[r] + 1}: chosen {chosen_ids[r]!r} is not a candidate"
        )
    chunk.offsets = offsets
    chunk.candidates = codes
    chunk.chosen = first_hit - offsets[:-1]
    for column in raw:
        if column == "pmf" or column.startswith(TARGET_PREFIX):
            values = _probability_column(
                kept_values(column), ids, offsets, path, rows_in_file, column
            )
            if column == "pmf":
                chunk.logged_pmf = values
            else:
                chunk.explicit[column.removeprefix(TARGET_PREFIX)] = values
    if with_rows:
        chunk.rows = _slot_rows(path, raw, kept_values, _listed(listed), chunk, rows_in_file)
    elif mode == "rows":
        keys = _feature_keys(column_values)
        chunk.features = _row_features(
            path, raw, kept_values, [] if keys is not None else _listed(listed), rows_in_file,
            len(keep),
        )  # fmt: skip
        chunk.features.candidate_keys = keys
    return chunk


def _listed(value: Any) -> list[Any]:
    return value.get() if isinstance(value, _Lazy) else list(value)


def _is_arrow_list(values: Any) -> bool:
    return hasattr(values, "value_lengths") and hasattr(values, "flatten")


def _json_candidates(
    values: list[Any], vocab: Vocabulary, path: Path, rows_in_file: np.ndarray
) -> tuple[list[Any], list[str], np.ndarray, np.ndarray]:
    """A JSON-text candidates column: the parsed lists, flat ids and codes, row sizes."""
    listed = _json_column(values, path, rows_in_file, "candidates")
    ids: list[str] = []
    sizes = np.empty(len(listed), dtype=np.int64)
    for r, candidates in enumerate(listed):
        if not isinstance(candidates, list) or not candidates:
            raise ValueError(
                f"{path}, row {rows_in_file[r] + 1}: candidates must be a non-empty JSON list"
            )
        try:
            ids.extend([str(c["id"]) if isinstance(c, dict) else str(c) for c in candidates])
        except KeyError:
            raise ValueError(
                f"{path}, row {rows_in_file[r] + 1}: every candidate needs an id"
            ) from None
        sizes[r] = len(candidates)
    codes_of = vocab.codes
    codes = np.asarray([codes_of[c] if c in codes_of else vocab.code(c) for c in ids], np.int64)
    return listed, ids, codes, sizes


class _Lazy:
    """A list built only when first used (Python objects for every candidate of a chunk
    cost more than the rest of the evaluation; only VW targets and some errors need them)."""

    def __init__(self, make: Any) -> None:
        self._make = make
        self._value: list[Any] | None = None

    def get(self) -> list[Any]:
        if self._value is None:
            self._value = list(self._make())
        return self._value


def _arrow_candidates(
    values: Any, vocab: Vocabulary, path: Path, rows_in_file: np.ndarray
) -> tuple[_Lazy, _Lazy, np.ndarray, np.ndarray]:
    """A nested Parquet candidates column (a list of ``{id, features}`` structs, or of ids),
    read column-wise: the ids are dictionary-encoded in Arrow, so a row costs no Python
    objects unless a VW target wants the features."""
    import pyarrow as pa
    import pyarrow.compute as pc

    sizes = np.asarray(values.value_lengths().fill_null(0), dtype=np.int64)
    empty = np.flatnonzero(sizes == 0)
    if len(empty):
        raise ValueError(
            f"{path}, row {rows_in_file[empty[0]] + 1}: candidates must be a non-empty list"
        )
    flat = values.flatten()
    if pa.types.is_struct(flat.type):
        if flat.type.get_field_index("id") < 0:
            raise ValueError(f"{path}: candidates structs need an id field")
        flat_ids = flat.field("id")
    else:
        flat_ids = flat
    flat_ids = flat_ids.cast(pa.string())
    if flat_ids.null_count:
        first = np.flatnonzero(np.asarray(flat_ids.is_null()))[0]
        at = int(np.searchsorted(np.cumsum(sizes), first, "right"))
        raise ValueError(f"{path}, row {rows_in_file[at] + 1}: every candidate needs an id")
    encoded = pc.dictionary_encode(flat_ids)
    mapping = np.asarray([vocab.code(str(d)) for d in encoded.dictionary.to_pylist()], np.int64)
    codes = mapping[np.asarray(encoded.indices, dtype=np.int64)]
    ids = _Lazy(flat_ids.to_pylist)
    listed = _Lazy(lambda: _features_parsed(values.to_pylist()))
    return listed, ids, codes, sizes


def _features_parsed(listed: list[Any]) -> list[Any]:
    """Candidates whose ``features`` are JSON text (a flat Parquet struct) as objects;
    identical texts are parsed once."""
    cache: dict[str, Any] = {}
    for candidates in listed:
        for c in candidates:
            if isinstance(c, dict) and isinstance(c.get("features"), str):
                text = c["features"]
                parsed = cache.get(text)
                if parsed is None:
                    parsed = cache[text] = orjson.loads(text) if text else {}
                c["features"] = parsed
    return listed


def _probability_column(
    values: Any, ids: Any, offsets: np.ndarray, path: Path, rows: np.ndarray, column: str
) -> np.ndarray:
    """``pmf`` or ``target_NAME``: in Parquet a list of numbers aligned with the candidates
    (read column-wise), else JSON pairs per row."""
    if _is_arrow_list(values) and str(values.type.value_type).startswith(("float", "double")):
        lengths = np.asarray(values.value_lengths().fill_null(0), dtype=np.int64)
        bad = np.flatnonzero(lengths != np.diff(offsets))
        if len(bad):
            raise ValueError(
                f"{path}, row {rows[bad[0]] + 1}: {column} has {lengths[bad[0]]} probabilities "
                f"for {np.diff(offsets)[bad[0]]} candidates"
            )
        out = np.asarray(values.flatten().fill_null(np.nan), dtype=float)
        _check_distribution(out, offsets, path, rows, column)
        return out
    if _is_arrow_list(values):
        values = values.to_pylist()
    flat_ids = ids.get() if isinstance(ids, _Lazy) else ids
    return _distribution_column(
        _json_column(values, path, rows, column), flat_ids, offsets, path, rows, column
    )


def _feature_keys(values: Any) -> list[tuple[str, str]] | None:
    """For nested Parquet candidates with features as JSON text: (id, text) per flattened
    candidate, read column-wise, so a VW target renders each distinct candidate once."""
    if not _is_arrow_list(values):
        return None
    import pyarrow as pa

    flat = values.flatten()
    if not pa.types.is_struct(flat.type) or flat.type.get_field_index("features") < 0:
        return None
    texts = flat.field("features")
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        return None
    ids = flat.field("id").cast(pa.string()).to_pylist()
    return list(zip(ids, texts.fill_null("").to_pylist(), strict=True))


def _row_features(
    path: Path,
    raw: dict[str, Any],
    kept_values: Any,
    listed: list[Any],
    rows_in_file: np.ndarray,
    n: int,
) -> RowFeatures:
    return RowFeatures(
        contexts=_json_column(kept_values("context"), path, rows_in_file, "context")
        if "context" in raw
        else [None] * n,
        slots=[int(s) for s in kept_values("slot")] if "slot" in raw else [0] * n,
        slot_features=_json_column(
            kept_values("slot_features"), path, rows_in_file, "slot_features"
        )
        if "slot_features" in raw
        else [None] * n,
        candidates=listed,
    )


def _slot_rows(
    path: Path,
    raw: dict[str, Any],
    kept_values: Any,
    listed: list[Any],
    chunk: Chunk,
    rows_in_file: np.ndarray,
) -> list[SlotRow]:
    n = len(chunk)
    contexts = (
        _json_column(kept_values("context"), path, rows_in_file, "context")
        if "context" in raw
        else [None] * n
    )
    slot_features = (
        _json_column(kept_values("slot_features"), path, rows_in_file, "slot_features")
        if "slot_features" in raw
        else [None] * n
    )
    slots = [int(s) for s in kept_values("slot")] if "slot" in raw else [0] * n
    events = (
        [str(e) for e in kept_values("event_id")]
        if "event_id" in raw
        else [str(i + 1) for i in rows_in_file]
    )
    assert chunk.offsets is not None and chunk.chosen is not None
    pmf = chunk.logged_pmf
    rows = []
    for r in range(n):
        candidates = tuple(
            Candidate(str(c["id"]), c.get("features") or {})
            if isinstance(c, dict)
            else Candidate(str(c))
            for c in listed[r]
        )
        start, end = chunk.offsets[r], chunk.offsets[r + 1]
        rows.append(
            SlotRow(
                key=f"{events[r]}/{slots[r]}",
                created_at=float(chunk.created_at[r]),
                context=contexts[r] or {},
                slot=slots[r],
                slot_features=slot_features[r] or {},
                eligible=candidates,
                chosen=int(chunk.chosen[r]),
                propensity=float(chunk.propensity[r]),
                reward=float(chunk.reward[r]),
                logged_pmf=tuple(pmf[start:end].tolist()) if pmf is not None else None,
            )
        )
    return rows


def rows_from_table(path: str | Path, stats: LogStats) -> list[SlotRow]:
    """Every row of a CSV or Parquet log in memory (for VW targets, sweeps and pages)."""
    out: list[SlotRow] = []
    for chunk in table_source(path, stats, with_rows=True)("full"):
        assert chunk.rows is not None
        out.extend(chunk.rows)
    return out


def write_table(records: Iterable[Mapping[str, Any]], path: str | Path, nested: bool = True) -> int:
    """Write log records (dicts with the schema's columns, as in the JSON-lines schema) as
    CSV or Parquet, in chunks; returns the number of rows written. In CSV nested values
    become JSON text. In Parquet (``nested``, the default and the fast form to read)
    ``candidates`` is a list of ``{id, features}`` structs with the features as JSON text,
    and ``pmf`` / ``target_*`` are lists of probabilities aligned with the candidates."""
    file = Path(path)
    if nested and file.suffix.lower() != ".csv":
        records = (_nested_record(r) for r in records)
    batch: list[dict[str, Any]] = []
    written = 0
    writer: Any = None
    columns: list[str] | None = None
    csv_handle = None
    try:
        for record in records:
            flat = {
                k: v if isinstance(v, _Nested) or not isinstance(v, list | dict | tuple)
                else orjson.dumps(v).decode()
                for k, v in record.items()
            }  # fmt: skip
            if columns is None:
                columns = list(flat)
            batch.append(flat)
            if len(batch) == 50_000:
                writer, csv_handle = _flush(file, batch, columns, writer, csv_handle)
                written += len(batch)
                batch = []
        if batch or columns is None:
            writer, csv_handle = _flush(file, batch, columns or list(REQUIRED), writer, csv_handle)
            written += len(batch)
    finally:
        if csv_handle is not None:
            csv_handle.close()
        if writer is not None and file.suffix.lower() != ".csv":
            writer.close()
    return written


def _nested_record(record: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(record)
    candidates = [c if isinstance(c, Mapping) else {"id": c} for c in record["candidates"]]
    ids = [str(c["id"]) for c in candidates]
    out["candidates"] = _Nested(
        [{"id": cid, "features": orjson.dumps(c.get("features") or {}).decode()}
         for cid, c in zip(ids, candidates, strict=True)]
    )  # fmt: skip
    for key, value in record.items():
        if key == "pmf" or key.startswith(TARGET_PREFIX):
            pairs = value.items() if isinstance(value, Mapping) else value
            given = {str(cid): float(p) for cid, p in pairs}
            out[key] = _Nested([given.get(cid, 0.0) for cid in ids])
    return out


class _Nested(list):
    """A value written as a Parquet list, not as JSON text."""


def _flush(
    file: Path, batch: list[dict[str, Any]], columns: list[str], writer: Any, csv_handle: Any
) -> tuple[Any, Any]:
    if file.suffix.lower() == ".csv":
        import csv

        if writer is None:
            csv_handle = open(file, "w", newline="", encoding="utf-8")  # noqa: SIM115
            writer = csv.DictWriter(csv_handle, fieldnames=columns)
            writer.writeheader()
        writer.writerows(batch)
        return writer, csv_handle
    pq = _pyarrow_parquet()
    import pyarrow as pa

    table = pa.Table.from_pylist(batch) if batch else pa.table({c: [] for c in columns})
    if writer is None:
        writer = pq.ParquetWriter(file, table.schema)
    writer.write_table(table)
    return writer, csv_handle
