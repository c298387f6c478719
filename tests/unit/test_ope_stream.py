"""Streaming OPE: the vectorised bootstrap, chunked evaluation of CSV/Parquet logs, VW's own
driver as a progressive target, multi-slot DSJSON, and the sweep's chart."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bandit_service.domain import Candidate
from bandit_service.ope import table
from bandit_service.ope.estimators import IPS, LoggedData, bootstrap_totals, bucket_sums
from bandit_service.ope.evaluate import (
    LogStats,
    SlotRow,
    evaluate,
    logging_target,
    popularity_target,
    uniform_target,
    vw_target,
)
from bandit_service.ope.files import rows_from_dsjson
from bandit_service.ope.stream import (
    ExplicitTarget,
    LoggingTarget,
    PopularityTarget,
    UniformTarget,
    chunks_from_rows,
    evaluate_stream,
)


def _records(n: int, seed: int = 3, deterministic_every: int = 0) -> list[dict[str, Any]]:
    """A log in the project's schema: 2-5 of 8 candidates per row, a random logging pmf,
    a reward rate that grows with the candidate's number, and a greedy explicit target."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(2, 6))
        ids = [f"c{j}" for j in rng.choice(8, k, replace=False)]
        pmf = rng.dirichlet(np.ones(k))
        chosen = int(rng.choice(k, p=pmf))
        if deterministic_every and i % deterministic_every == 0:
            pmf = np.eye(k)[chosen]
        rate = 0.05 + 0.05 * int(ids[chosen][1:])
        out.append({
            "event_id": f"e{i}", "created_at": 1000.0 + i, "slot": 0,
            "context": {"segment": f"s{i % 3}", "user": {"age": i % 7}},
            "candidates": [{"id": c, "features": {"topic": c[-1]}} for c in ids],
            "chosen": ids[chosen], "probability": float(pmf[chosen]),
            "reward": float(rng.random() < rate),
            "pmf": [[c, float(p)] for c, p in zip(ids, pmf, strict=True)],
            "target_first": [[ids[0], 1.0]],
        })  # fmt: skip
    return out


def _rows(records: list[dict[str, Any]]) -> list[SlotRow]:
    rows = []
    for r in records:
        if r["probability"] == 1.0:
            continue
        ids = [c["id"] for c in r["candidates"]]
        rows.append(
            SlotRow(
                key=f"{r['event_id']}/0", created_at=r["created_at"], context=r["context"],
                slot=0, slot_features={},
                eligible=tuple(Candidate(c["id"], c["features"]) for c in r["candidates"]),
                chosen=ids.index(r["chosen"]), propensity=r["probability"], reward=r["reward"],
                logged_pmf=tuple(p for _c, p in r["pmf"]),
            )
        )  # fmt: skip
    return rows


def _same(a: list[Any], b: list[Any], tolerance: float = 1e-12) -> None:
    assert [r.target for r in a] == [r.target for r in b]
    for x, y in zip(a, b, strict=True):
        for e, f in zip(x.estimates, y.estimates, strict=True):
            assert e.estimator == f.estimator
            assert e.value == pytest.approx(f.value, abs=tolerance)
            assert e.normal_interval == pytest.approx(f.normal_interval, abs=tolerance)
            assert e.bootstrap_interval == pytest.approx(f.bootstrap_interval, abs=tolerance)
            assert e.effective_sample_size == pytest.approx(f.effective_sample_size)
            assert e.max_weight == pytest.approx(f.max_weight)


def test_streaming_in_chunks_gives_the_in_memory_results() -> None:
    """Chunks of 170 rows split the popularity counts and the model's halves mid-stream;
    values and even the bootstrap intervals (same seeded counts) must not change."""
    rows = _rows(_records(1200))
    expected = evaluate(
        rows, {"u": uniform_target, "l": logging_target, "p": popularity_target}, replicates=300
    )
    got = evaluate_stream(
        chunks_from_rows(rows, 170),
        {"u": UniformTarget(), "l": LoggingTarget(), "p": PopularityTarget()},
        replicates=300,
    )
    _same(expected, got)


@pytest.mark.parametrize("suffix", ["csv", "parquet", "json-in-parquet"])
def test_csv_and_parquet_logs_stream_with_skips_counted(tmp_path: Path, suffix: str) -> None:
    records = _records(900, deterministic_every=30)
    path = tmp_path / f"log.{suffix.removeprefix('json-in-')}"
    assert table.write_table(records, path, nested=suffix == "parquet") == 900
    stats = LogStats()
    got = evaluate_stream(
        table.table_source(path, stats, chunk_rows=250),
        {"l": LoggingTarget(), "first": ExplicitTarget("first"), "u": UniformTarget()},
        replicates=200,
    )
    assert vars(stats) == {"decisions": 900, "rows": 870, "skipped_deterministic": 30,
                           "skipped_not_shown": 0}  # fmt: skip
    rows = _rows(records)
    first = {r.key: {r.eligible[0].id: 1.0} for r in rows}
    from bandit_service.ope.evaluate import explicit_target

    expected = evaluate(
        rows, {"l": logging_target, "first": explicit_target(first), "u": uniform_target},
        replicates=200,
    )  # fmt: skip
    _same(expected, got)
    logging_ips = got[0].estimates[0].value
    assert logging_ips == pytest.approx(np.mean([r.reward for r in rows]))  # on-policy mean
    assert table.rows_from_table(path, LogStats()) == rows


def _write_csv(path: Path, header: str, *lines: str) -> Path:
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


GOOD = '"[""a"",""b""]",a,0.5,1'


@pytest.mark.parametrize(
    ("header", "line", "message"),
    [
        ("candidates,chosen,probability", GOOD, "missing column\\(s\\) reward"),
        ("candidates,chosen,probability,reward", '"[""a"",""b""]",a,0,1',
         "row 2: probability 0.0 is not in \\(0, 1\\]"),
        ("candidates,chosen,probability,reward", '"[""a"",""b""]",a,1.5,1',
         "row 2: probability 1.5 is not in"),
        ("candidates,chosen,probability,reward", '"[""a"",""b""]",c,0.5,1',
         "row 2: chosen 'c' is not a candidate"),
        ("candidates,chosen,probability,reward", '"[""a"",""b""]",a,0.5,lots',
         "row 2: reward 'lots' is not a number"),
        ("candidates,chosen,probability,reward", '"[]",a,0.5,1', "row 2: candidates must be"),
        ("candidates,chosen,probability,reward", '"{not json",a,0.5,1',
         "row 2: candidates is not valid JSON"),
        ("candidates,chosen,probability,reward,pmf",
         GOOD + ',"[[""a"",0.7],[""b"",0.7]]"', "row 2: pmf must be probabilities .* summing to 1"),
        ("candidates,chosen,probability,reward,pmf", GOOD + ',"[[""z"",1.0]]"',
         "row 2: pmf names 'z', not a candidate"),
        ("candidates,chosen,probability,reward", GOOD + ",extra", "line 3: 5 fields"),
    ],
)  # fmt: skip
def test_invalid_table_logs_are_refused_naming_row_and_column(
    tmp_path: Path, header: str, line: str, message: str
) -> None:
    first = GOOD + (',"[[""a"",0.5],[""b"",0.5]]"' if header.endswith("pmf") else "")
    path = _write_csv(tmp_path / "log.csv", header, first, line)
    with pytest.raises(ValueError, match=message):
        evaluate_stream(table.table_source(path, LogStats()), {"u": UniformTarget()})


def test_invalid_nested_parquet_and_order(tmp_path: Path) -> None:
    records = _records(20)
    records[7]["pmf"] = records[7]["pmf"][:-1]  # one probability short
    path = tmp_path / "log.parquet"
    with pytest.raises(ValueError, match="pmf must be probabilities"):
        table.write_table(records, path)
        evaluate_stream(table.table_source(path, LogStats()), {"l": LoggingTarget()})
    records = _records(20)
    records[5]["created_at"] = 0.0
    table.write_table(records, path)
    with pytest.raises(ValueError, match="time order"):
        evaluate_stream(table.table_source(path, LogStats()), {"u": UniformTarget()})
    table.write_table(_records(20), path)
    with pytest.raises(ValueError, match="no target probabilities 'other'"):
        evaluate_stream(table.table_source(path, LogStats()), {"x": ExplicitTarget("other")})


def test_parquet_without_pyarrow_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "log.parquet"
    table.write_table(_records(5), path)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"bandit-service\[parquet\]"):
        evaluate_stream(table.table_source(path, LogStats()), {"u": UniformTarget()})


def test_bucketed_bootstrap_matches_the_row_bootstrap() -> None:
    """Past ``buckets`` rows the rows are resampled in fixed buckets. For 40,000 skewed
    rows (rewards 0/1 with weights up to 20), the 95% interval from 2,000 buckets must match
    the row bootstrap's (40,000 buckets): the percentiles of 1,000 replicates move by ~5%
    of the width between seeds, so 15% is a 3-sigma tolerance."""
    rng = np.random.default_rng(5)
    n = 40_000
    p = rng.choice([0.05, 0.5, 0.95], n)
    data = LoggedData.of((rng.random(n) < 0.3).astype(float), p, np.full(n, 1 / 3))
    terms = IPS().terms(data)
    columns = np.column_stack([terms, np.ones(n)])

    def interval(buckets: int) -> np.ndarray:
        totals = bootstrap_totals(bucket_sums(columns, 0, buckets), 1000, seed=1)
        return np.percentile(totals[:, 0] / totals[:, 1], [2.5, 97.5])

    rows, bucketed = interval(n), interval(2000)
    width = rows[1] - rows[0]
    assert np.abs(bucketed - rows).max() < 0.15 * width
    normal = IPS().estimate(data, replicates=10).normal_interval
    assert np.abs(rows - np.asarray(normal)).max() < 0.15 * width


def test_bucketed_bootstrap_keeps_a_drift_in_the_variance() -> None:
    """A reward rate drifting from 5% to 95% over the log: the row bootstrap counts the
    drift as variance. Buckets of every 2,000th row would hide it (each would hold the same
    mix of times: 14% narrower here); random buckets keep it. The width of a 1,000-replicate
    interval varies by ~3% between seeds, so 8% is a safe bound that still catches 14%."""
    rng = np.random.default_rng(5)
    n = 40_000
    rewards = (rng.random(n) < 0.05 + 0.9 * np.linspace(0, 1, n)).astype(float)
    columns = np.column_stack([rewards, np.ones(n)])

    def width(buckets: int) -> float:
        totals = bootstrap_totals(bucket_sums(columns, 0, buckets), 1000, seed=1)
        low, high = np.percentile(totals[:, 0] / totals[:, 1], [2.5, 97.5])
        return float(high - low)

    assert width(2000) / width(n) == pytest.approx(1.0, abs=0.08)


def test_vw_driver_target_predicts_as_row_by_row_progressive_validation(tmp_path: Path) -> None:
    from bandit_service.ope.vwfile import ProgressiveVWTarget

    records = _records(400)
    path = tmp_path / "log.parquet"
    table.write_table(records, path)
    args = "--cb_explore_adf --epsilon 0.1 -q uc -q ca"
    expected = evaluate(_rows(records), {"vw": vw_target(args)}, replicates=100)
    target = ProgressiveVWTarget(args)
    try:
        got = evaluate_stream(
            table.table_source(path, LogStats(), chunk_rows=150), {"vw": target}, replicates=100
        )
    finally:
        target.close()
    _same(expected, got, tolerance=1e-5)  # VW prints probabilities with 6-7 digits


def _ccb_line(i: int, rng: np.random.Generator) -> dict[str, Any]:
    actions = [{"_tag": t, "i": {"id": t}, "j": [{"roast": r}]}
               for t, r in [("mocha", "light"), ("latte", "dark"), ("flat", "dark")]]  # fmt: skip
    first = [0, 1, 2]
    rng.shuffle(first)
    second = [a for a in [0, 1, 2] if a != first[0]]
    outcomes = [
        {"_id": "main", "_label_cost": -1.0 if first[0] == 1 else 0.0, "_a": first,
         "_p": [0.6, 0.2, 0.2], "_o": []},
        {"_id": "side", "_label_cost": -0.5, "_a": second, "_p": [1.0, 0.0] if i % 4 == 0
         else [0.5, 0.5], "_o": []},
    ]  # fmt: skip
    return {
        "EventId": f"ev{i}",
        "c": {"FromUrl": [{"weather": "sunny"}], "_multi": actions,
              "_slots": [{"_id": "main", "sj": {"size": "L"}}, {"_id": "side"}]},
        "_outcomes": outcomes,
    }  # fmt: skip


def test_multi_slot_dsjson_becomes_one_row_per_slot(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "ccb.json"
    path.write_text("\n".join(json.dumps(_ccb_line(i, rng)) for i in range(40)) + "\n")
    stats = LogStats()
    rows = rows_from_dsjson(path, stats)
    assert vars(stats) == {"decisions": 40, "rows": 70, "skipped_deterministic": 10,
                           "skipped_not_shown": 0}  # fmt: skip
    main = next(r for r in rows if r.key == "ev1/0")
    side = next(r for r in rows if r.key == "ev1/1")
    assert [c.id for c in main.eligible] == ["mocha", "latte", "flat"]
    assert main.context == {"FromUrl": {"weather": "sunny"}}
    assert main.eligible[1].features == {"i": {"id": "latte"}, "j": {"roast": "dark"}}
    assert main.slot_features == {"sj": {"size": "L"}} and main.propensity == 0.6
    # the side slot's eligible set excludes what the main slot took
    assert main.eligible[main.chosen] not in side.eligible and len(side.eligible) == 2
    assert side.reward == 0.5 and side.logged_pmf == (0.5, 0.5)
    results = evaluate(rows, {"logging": logging_target}, ["IPS"], replicates=50, pages=True)
    assert results[0].estimates[0].value == pytest.approx(np.mean([r.reward for r in rows]))
    assert results[1].target == "logging (page)"

    broken = tmp_path / "broken.json"
    line = _ccb_line(0, rng)
    line["_outcomes"][1]["_a"] = [0, 7]
    broken.write_text(json.dumps(line) + "\n")
    with pytest.raises(ValueError, match="line 1, slot 1: _a must list distinct indices"):
        rows_from_dsjson(broken, LogStats())


def test_the_sweep_chart_is_written(tmp_path: Path) -> None:
    from bandit_service.ope.sweep import plot_sweep

    report = {
        "current": {"vw_args": "--cb_explore_adf", "dr": 0.2, "interval_95": [0.15, 0.25]},
        "ranked": [
            {"vw_args": "--cb_explore_adf -q ca", "dr": 0.4, "interval_95": [0.3, 0.5]},
            {"vw_args": "--cb_explore_adf", "dr": 0.2, "interval_95": [0.15, 0.25]},
        ],
        "recommended": {"vw_args": "--cb_explore_adf -q ca"},
    }
    plot_sweep(report, tmp_path / "sweep.png", "test")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
