"""Per-slot sampling costs, old against new, in one process (timeit, medians).

    .venv/bin/python benchmarks/sampling_micro.py --compare-src DIR [--candidates 500]

Times, for one slot over ``--candidates`` candidates, what the engine's default slot does
with the model's pmf: ``normalise``, ``draw_normalised`` and ``is_greedy_normalised`` as
DIR's ``bandit_service/engine/sampling.py`` has them (e.g. a ``git archive`` of an older
commit), against this tree's ``normalise_and_draw``; for three pmfs: uniform (an
untrained model: every score tied), epsilon-greedy with one greedy entry (at 137), and
distinct values (softmax-like, the general path). Also ``_VWScorer._batch_for`` for the
second slot (the first slot's positions less one), DIR's against this tree's. The pmfs
are float32-rounded and distinct float objects, as VW's list is. The answers are checked
equal before anything is timed.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import struct
import sys
import timeit
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bandit_service.engine import sampling
from bandit_service.learners import vw


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _f32(x: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def _median_us(stmt: Any, repeat: int = 9) -> float:
    timer = timeit.Timer(stmt)
    number, _ = timer.autorange()
    return statistics.median(timer.repeat(repeat, number)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare-src", type=Path, required=True)
    parser.add_argument("--candidates", type=int, default=500)
    args = parser.parse_args()
    n = args.candidates
    old = _load(args.compare_src / "bandit_service/engine/sampling.py", "old_sampling")
    rng = random.Random(1)
    low, high = _f32(0.1 / n), _f32(0.9 + 0.1 / n)
    one = [float(repr(low)) for _ in range(n)]
    one[min(137, n - 1)] = high
    pmfs = {
        "uniform": [float(repr(_f32(1 / n))) for _ in range(n)],
        "one greedy": one,
        "softmax-like": [_f32(rng.random()) for _ in range(n)],
    }
    draws = random.Random(5).random

    def before(weights: list[float]) -> tuple[list[float], int, bool]:
        p = old.normalise(weights)
        chosen = old.draw_normalised(p, draws())
        return p, chosen, old.is_greedy_normalised(p, chosen)

    print(f"one slot over {n} candidates, µs (timeit, median of 9):")
    print(f"  {'':42s}{'before':>8}{'after':>8}")
    for name, weights in pmfs.items():
        us = random.Random(9)
        for u in [us.random() for _ in range(200)]:
            got = sampling.normalise_and_draw(weights, lambda u=u: u)
            assert before_at(old, weights, u) == got
        a = _median_us(lambda w=weights: before(w))
        b = _median_us(lambda w=weights: sampling.normalise_and_draw(w, draws))
        print(f"  {'normalise + draw + greedy, ' + name:42s}{a:8.2f}{b:8.2f}")

    old_vw = _load(args.compare_src / "bandit_service/learners/vw.py", "old_vw")
    kept = [object() for _ in range(n)]
    second = list(range(n))
    del second[min(137, n - 1)]

    def batch_for(scorer_class: Any) -> Any:
        scorer = scorer_class.__new__(scorer_class)
        scorer._batch, scorer._positions = None, []
        scorer._batch_for(kept, list(range(n)))  # the first slot's
        first_batch, first_positions = list(scorer._batch), list(scorer._positions)

        def second_slot() -> list[Any]:
            scorer._batch, scorer._positions = list(first_batch), list(first_positions)
            result: list[Any] = scorer._batch_for(kept, second)
            return result

        return second_slot

    slot_old, slot_new = batch_for(old_vw._VWScorer), batch_for(vw._VWScorer)
    assert slot_old() == slot_new() == [None, *(kept[i] for i in second)]
    copies = _median_us(lambda: (list(kept), list(second)))  # the two copies each call makes
    a, b = _median_us(slot_old) - copies, _median_us(slot_new) - copies
    print(f"  {'_batch_for, second slot':42s}{a:8.2f}{b:8.2f}")


def before_at(old: ModuleType, weights: list[float], u: float) -> tuple[list[float], int, bool]:
    p = old.normalise(weights)
    chosen = old.draw_normalised(p, u)
    return p, chosen, old.is_greedy_normalised(p, chosen)


if __name__ == "__main__":
    main()
