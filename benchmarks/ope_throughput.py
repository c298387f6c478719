"""Off-policy evaluation throughput: 1,000,000 logged slot rows, 5 target policies.

    .venv/bin/python benchmarks/ope_throughput.py [--events 1000000] [--data /tmp/ope-1m.parquet]
        [--no-vw] [--replicates 1000] [--chunk-rows 50000] [--profile ope-profile.txt]
        [--plot ope-benchmark.png]

Writes (once, cached at ``--data``) a synthetic log in the project's Parquet schema
(nested columns, as ``bandit_service.ope.table.write_table`` writes them): 20
items, 5 eligible per row with one feature each, a 2-feature context, an epsilon-greedy
logging policy with its pmf, Bernoulli rewards, and a ``target_softmax`` column (explicit
probabilities of a policy "built elsewhere"). Then times ``evaluate_stream`` on it, the
way ``bandit-service ope --from-file`` runs: the five estimators (IPS, SNIPS, DM, DR,
Switch-DR) with normal and 1,000-replicate bootstrap intervals for five targets:
uniform, logging, popularity, explicit:softmax, and vw:--cb_explore_adf --epsilon 0.05
-q ua (progressive, VW's C++ driver in a child process).

The machine is shared, so the same run also times a fixed numpy reference (sorting 10M
floats, twice) before and after, and prints the ratio. Peak RSS is ``getrusage``'s: this
process, and the largest child (VW; the data generation runs in a child only when the
file does not exist yet, so time a second run). The simulator knows the true value of
the uniform and softmax targets; they are printed next to the estimates.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ITEMS = 20
PER_ROW = 5
SEGMENTS = 4
VW_ARGS = "--cb_explore_adf --epsilon 0.05 -q ua"


def _click_rate(items: np.ndarray, segment: np.ndarray) -> np.ndarray:
    """True click rate: 5% + 10% more when the item's topic matches the user's segment."""
    return 0.05 + 0.10 * ((items % SEGMENTS) == segment[..., None] if items.ndim == 2
                          else (items % SEGMENTS) == segment)  # fmt: skip


def generate(path: Path, events: int, seed: int = 0) -> dict[str, float]:
    """Write the log in chunks; return the true values of the uniform and softmax targets."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    writer = None
    truth = {"uniform": 0.0, "explicit:softmax": 0.0}
    chunk = 100_000
    for start in range(0, events, chunk):
        n = min(chunk, events - start)
        segment = rng.integers(0, SEGMENTS, n)
        device = rng.integers(0, 2, n)
        items = np.argsort(rng.random((n, ITEMS)), axis=1)[:, :PER_ROW]
        rate = _click_rate(items, segment)
        # logging: 80% on a noisy guess of the best, 20% uniform
        guess = np.argmax(rate + rng.normal(0, 0.08, rate.shape), axis=1)
        pmf = np.full((n, PER_ROW), 0.2 / PER_ROW)
        pmf[np.arange(n), guess] += 0.8
        chosen = (rng.random(n)[:, None] > np.cumsum(pmf, axis=1)).sum(axis=1)
        chosen = np.minimum(chosen, PER_ROW - 1)
        reward = (rng.random(n) < rate[np.arange(n), chosen]).astype(float)
        softmax = np.exp(rate / 0.05)
        softmax /= softmax.sum(axis=1, keepdims=True)
        truth["uniform"] += float(rate.mean(axis=1).sum())
        truth["explicit:softmax"] += float((softmax * rate).sum())
        names = np.asarray([f"item-{i}" for i in range(ITEMS)], dtype=object)
        features = np.asarray(
            [f'{{"topic":"t{i % SEGMENTS}"}}' for i in range(ITEMS)], dtype=object
        )
        offsets = pa.array(np.arange(0, n * PER_ROW + 1, PER_ROW, dtype=np.int32))
        flat_items = items.ravel()
        candidates = pa.ListArray.from_arrays(
            offsets,
            pa.StructArray.from_arrays(
                [
                    pa.array(names[flat_items], pa.string()),
                    pa.array(features[flat_items], pa.string()),
                ],
                names=["id", "features"],
            ),
        )
        contexts = [f'{{"device":"{"mobile" if d else "desktop"}","user":{{"segment":"s{s}"}}}}'
                    for d, s in zip(device, segment, strict=True)]  # fmt: skip
        columns = {
            "event_id": [f"e{start + i}" for i in range(n)],
            "created_at": (1.7e9 + np.arange(start, start + n)).astype(float),
            "slot": np.zeros(n, dtype=np.int64),
            "context": contexts,
            "candidates": candidates,
            "chosen": pa.array(names[items[np.arange(n), chosen]], pa.string()),
            "probability": pmf[np.arange(n), chosen],
            "reward": reward,
            "pmf": pa.ListArray.from_arrays(offsets, pa.array(pmf.ravel())),
            "target_softmax": pa.ListArray.from_arrays(offsets, pa.array(softmax.ravel())),
        }
        table = pa.table(columns)
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
        print(f"\r  generated {start + n}/{events} rows", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    assert writer is not None
    writer.close()
    return {k: v / events for k, v in truth.items()}


def reference_seconds() -> float:
    """A fixed numpy workload (sort 10M floats twice), to compare runs on a busy machine."""
    x = np.random.default_rng(0).random(10_000_000)
    start = time.perf_counter()
    for _ in range(2):
        np.sort(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--data", type=Path, default=Path("/tmp/ope-1m.parquet"))
    parser.add_argument("--replicates", type=int, default=1000)
    parser.add_argument("--chunk-rows", type=int, default=50_000)
    parser.add_argument("--no-vw", action="store_true", help="four targets, without VW")
    parser.add_argument("--profile", metavar="TXT", help="profile with pyinstrument")
    parser.add_argument("--plot", metavar="PNG")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    truth_file = args.data.with_suffix(".truth.json")
    if args.generate_only:
        truth_file.write_text(json.dumps(generate(args.data, args.events)))
        return
    if not args.data.exists():
        subprocess.run([sys.executable, __file__, "--generate-only", "--events",
                        str(args.events), "--data", str(args.data)], check=True)  # fmt: skip
    truth = json.loads(truth_file.read_text()) if truth_file.exists() else {}

    from bandit_service.ope.evaluate import LogStats, format_table
    from bandit_service.ope.stream import evaluate_stream, parse_stream_target
    from bandit_service.ope.table import table_source
    from bandit_service.ope.vwfile import ProgressiveVWTarget

    specs = ["uniform", "logging", "popularity", "explicit:softmax"]
    targets = {spec: parse_stream_target(spec) for spec in specs}
    if not args.no_vw:
        targets[f"vw:{VW_ARGS}"] = ProgressiveVWTarget(VW_ARGS)
    stats = LogStats()
    started = time.perf_counter()
    marks: list[tuple[str, float, float]] = []

    def progress(what: str, done: int) -> None:
        if not marks or marks[-1][0] != what:
            marks.append((what, time.perf_counter(), time.process_time()))
        print(f"\r  {what}: {done} rows   ", end="", file=sys.stderr, flush=True)

    reference_before = reference_seconds()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    profiler = None
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler()
        profiler.start()
    cpu_before = time.process_time()
    started = time.perf_counter()
    results = evaluate_stream(
        table_source(args.data, stats, chunk_rows=args.chunk_rows),
        targets,  # type: ignore[arg-type]
        replicates=args.replicates,
        progress=progress,
    )
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    print(file=sys.stderr)
    if profiler is not None:
        profiler.stop()
        Path(args.profile).write_text(profiler.output_text(unicode=False, color=False))
    reference_after = reference_seconds()
    for target in targets.values():
        close = getattr(target, "close", None)
        if close is not None:
            close()
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(format_table(results, stats))
    for name, value in truth.items():
        print(f"true value of {name}: {value:.5f}")
    phases = [*marks, ("end", started + elapsed, cpu_before + cpu)]
    print("\nphases: wall seconds from the start, and CPU seconds of this process in each")
    for (what, at, cpu_at), (_next, until, cpu_until) in itertools.pairwise(phases):
        print(f"  {what:<48} {at - started:7.1f} -> {until - started:7.1f}  "
              f"CPU {cpu_until - cpu_at:6.1f}")  # fmt: skip
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"  CPU of the VW child process: {children.ru_utime + children.ru_stime:.1f} s")
    reference = (reference_before + reference_after) / 2
    print(
        f"\n{stats.rows} rows x {len(targets)} targets x 5 estimators, {args.replicates} "
        f"bootstrap replicates: {elapsed:.1f} s wall ({stats.rows / elapsed:,.0f} rows/s), "
        f"{cpu:.1f} s CPU in this process\n"
        f"numpy reference: {reference_before:.2f} s before, {reference_after:.2f} s after; "
        f"benchmark / reference = {elapsed / reference:.0f}\n"
        f"peak RSS: {self_rss:.0f} MB this process ({rss_before:.0f} MB before the "
        f"evaluation, with the reference's arrays), {child_rss:.0f} MB largest child"
    )
    if args.plot:
        from bandit_service.ope.evaluate import plot

        plot(results, args.plot, f"{stats.rows:,} logged rows, 95% bootstrap intervals")
        print(f"plot written to {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
