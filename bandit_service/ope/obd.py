"""Reading Open Bandit Dataset style CSVs (Saito et al., NeurIPS 2021 Datasets track).

Columns used: ``item_id`` (the action), ``position`` (1-based slot), ``click`` (reward),
``propensity_score`` (the logging policy's probability of that item at that position), and
``timestamp``; the user features and affinities are kept per row for models that want
them. Rows are read in chunks, so memory stays bounded whatever the file's size. Rows
logged with probability 1 (a deterministic override, not a draw) cannot be reweighted and
are skipped and counted.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REQUIRED = ("item_id", "position", "click", "propensity_score")


@dataclass(frozen=True)
class OBDRow:
    item_id: int
    position: int  # 1-based, as in the files
    click: float
    propensity: float
    timestamp: str
    user_features: tuple[str, ...]


@dataclass
class ReadStats:
    rows: int = 0
    skipped_deterministic: int = 0


def read_obd(
    path: str | Path, chunk_rows: int = 10_000, stats: ReadStats | None = None
) -> Iterator[list[OBDRow]]:
    """Yield the file's rows in chunks of at most ``chunk_rows``.

    Raises ``ValueError`` naming the file, line and column for a missing column or a bad
    value (a propensity outside (0, 1], a non-numeric item, position or click).
    """
    stats = stats if stats is not None else ReadStats()
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        user_columns = [c for c in columns if c.startswith("user_feature_")]
        chunk: list[OBDRow] = []
        for line, record in enumerate(reader, start=2):
            try:
                row = OBDRow(
                    item_id=int(record["item_id"]),
                    position=int(record["position"]),
                    click=float(record["click"]),
                    propensity=float(record["propensity_score"]),
                    timestamp=record.get("timestamp", ""),
                    user_features=tuple(record[c] for c in user_columns),
                )
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}, line {line}: {exc}") from None
            if not 0 < row.propensity <= 1:
                raise ValueError(
                    f"{path}, line {line}: propensity_score {row.propensity} is not in (0, 1]"
                )
            stats.rows += 1
            if row.propensity == 1:
                stats.skipped_deterministic += 1
                continue
            chunk.append(row)
            if len(chunk) >= chunk_rows:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def read_action_distribution(path: str | Path) -> dict[tuple[int, int], float]:
    """A target policy as ``item_id, position, <probability>`` rows (e.g. the derived
    ``bts_eval_action_dist_*.csv`` of the OBD sample): (item, position) -> probability."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        if header[:2] != ["item_id", "position"] or len(header) != 3:
            raise ValueError(f"{path}: expected columns item_id, position, <probability>")
        return {(int(item), int(pos)): float(p) for item, pos, p in reader}
