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
from bandit_service.ope.stream import Chunk, Source, Vocabulary

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


def _raw_chunks(path: Path, chunk_rows: int, light: bool) -> Iterator[dict[str, Any]]:
    """Column name -> values (lists, or arrays for Parquet numbers) per chunk."""
    wanted = {"chosen", "probability", "reward", "created_at"} if light else None
    if path.suffix.lower() == ".csv":
        import csv

        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: empty file (expected a header row)")
            _check_columns(path, header)
            keep = [(i, name) for i, name in enumerate(header) if wanted is None or name in wanted]
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
    columns = [n for n in names if wanted is None or n in wanted]
    for batch in handle.iter_batches(batch_size=chunk_rows, columns=columns):
        out: dict[str, Any] = {}
        for name, array in zip(batch.schema.names, batch.columns, strict=True):
            is_number = str(array.type).startswith(("int", "uint", "float", "double"))
            out[name] = array.to_numpy(zero_copy_only=False) if is_number else array.to_pylist()
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


def _json(value: Any, where: str, column: str) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, str | bytes):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            raise ValueError(f"{where}: {column} is not valid JSON") from None
    return value


def _distribution(value: Any, ids: list[str], where: str, column: str) -> list[float]:
    """``[["a", p], ...]`` (or ``{"a": p}``) aligned with the row's candidates."""
    given = _json(value, where, column)
    if given is None:
        raise ValueError(f"{where}: {column} is empty")
    try:
        pairs = given.items() if isinstance(given, Mapping) else given
        probabilities = {str(cid): float(p) for cid, p in pairs}
    except (TypeError, ValueError):
        raise ValueError(f'{where}: {column} must be [["id", probability], ...]') from None
    unknown = set(probabilities) - set(ids)
    if unknown:
        raise ValueError(f"{where}: {column} names {sorted(unknown)[0]!r}, not a candidate")
    out = [probabilities.get(cid, 0.0) for cid in ids]
    if any(not 0.0 <= p <= 1.0 for p in out) or abs(sum(out) - 1.0) > 1e-6:
        raise ValueError(f"{where}: {column} must be probabilities in [0, 1] summing to 1")
    return out


def table_source(
    path: str | Path,
    stats: LogStats,
    chunk_rows: int = 50_000,
    with_rows: bool = False,
    vocabulary: Vocabulary | None = None,
) -> Source:
    """A :data:`~bandit_service.ope.stream.Source` over a CSV or Parquet log. ``stats``
    counts what the "full" pass read; ``with_rows`` builds the :class:`SlotRow` objects
    (which feature-based targets such as VW need) in every pass, not only in "rows"."""
    file = Path(path)
    if not file.exists():
        raise ValueError(f"{file}: no such file")
    vocab = vocabulary or Vocabulary()

    def source(mode: str) -> Iterator[Chunk]:
        kept = 0
        seen = 0
        light = mode == "light"
        rows = with_rows or mode == "rows"
        for raw in _raw_chunks(file, chunk_rows, light):
            chunk = _chunk(
                file, raw, seen, kept, vocab, light, rows, stats if mode == "full" else None
            )
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
    light: bool,
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
    chosen_ids = [str(raw["chosen"][i]) for i in keep]
    chosen_code = np.fromiter((vocab.code(c) for c in chosen_ids), np.int64, len(keep))
    chunk = Chunk(kept, created[keep], chosen_code, probability[keep], reward[keep])
    if light:
        return chunk
    sizes: list[int] = []
    codes: list[int] = []
    chosen: list[int] = []
    rows: list[SlotRow] = []
    pmf: list[float] | None = [] if "pmf" in raw else None
    targets = {c.removeprefix(TARGET_PREFIX): c for c in raw if c.startswith(TARGET_PREFIX)}
    explicit: dict[str, list[float]] = {name: [] for name in targets}
    for position, i in enumerate(keep):
        where = f"{path}, row {seen + i + 1}"
        listed = _json(raw["candidates"][i], where, "candidates")
        if not isinstance(listed, list) or not listed:
            raise ValueError(f"{where}: candidates must be a non-empty JSON list")
        try:
            candidates = [
                Candidate(str(c["id"]), c.get("features") or {})
                if isinstance(c, Mapping)
                else Candidate(str(c))
                for c in listed
            ]
        except KeyError:
            raise ValueError(f"{where}: every candidate needs an id") from None
        ids = [c.id for c in candidates]
        if chosen_ids[position] not in ids:
            raise ValueError(f"{where}: chosen {chosen_ids[position]!r} is not a candidate")
        sizes.append(len(ids))
        codes.extend(vocab.code(cid) for cid in ids)
        index = ids.index(chosen_ids[position])
        chosen.append(index)
        logged = None
        if pmf is not None:
            logged = _distribution(raw["pmf"][i], ids, where, "pmf")
            pmf.extend(logged)
        for name, column in targets.items():
            explicit[name].extend(_distribution(raw[column][i], ids, where, column))
        if with_rows:
            context = _json(raw["context"][i], where, "context") if "context" in raw else None
            slot_features = (
                _json(raw["slot_features"][i], where, "slot_features")
                if "slot_features" in raw
                else None
            )
            slot = int(raw["slot"][i]) if "slot" in raw else 0
            event = str(raw["event_id"][i]) if "event_id" in raw else str(seen + i + 1)
            rows.append(
                SlotRow(
                    key=f"{event}/{slot}",
                    created_at=float(created[i]),
                    context=context or {},
                    slot=slot,
                    slot_features=slot_features or {},
                    eligible=tuple(candidates),
                    chosen=index,
                    propensity=float(probability[i]),
                    reward=float(reward[i]),
                    logged_pmf=tuple(logged) if logged is not None else None,
                )
            )
    chunk.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    chunk.candidates = np.asarray(codes, dtype=np.int64)
    chunk.chosen = np.asarray(chosen, dtype=np.int64)
    chunk.logged_pmf = np.asarray(pmf) if pmf is not None else None
    chunk.explicit = {name: np.asarray(values) for name, values in explicit.items()}
    chunk.rows = rows if with_rows else None
    return chunk


def rows_from_table(path: str | Path, stats: LogStats) -> list[SlotRow]:
    """Every row of a CSV or Parquet log in memory (for VW targets, sweeps and pages)."""
    out: list[SlotRow] = []
    for chunk in table_source(path, stats, with_rows=True)("full"):
        assert chunk.rows is not None
        out.extend(chunk.rows)
    return out


def write_table(records: Iterable[Mapping[str, Any]], path: str | Path) -> int:
    """Write log records (dicts with the schema's columns; nested values become JSON text)
    as CSV or Parquet, in chunks. Returns the number of rows written."""
    file = Path(path)
    batch: list[dict[str, Any]] = []
    written = 0
    writer: Any = None
    columns: list[str] | None = None
    csv_handle = None
    try:
        for record in records:
            flat = {
                k: orjson.dumps(v).decode() if isinstance(v, list | dict | tuple) else v
                for k, v in record.items()
            }
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
