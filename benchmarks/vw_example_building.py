"""How to hand a 50-candidate decision to Vowpal Wabbit: text or examples built directly.

    .venv/bin/python benchmarks/vw_example_building.py [--repeat 2000]

Issue 2 asks to build examples directly where that is faster than text, and to measure
it. Four ways to get a cb_explore_adf prediction for one context and 50 candidates x 10
features (20 context features, -q ua), all producing the same pmf:

1. ``ws.predict(lines)``: the public API on text lines (pyvw wraps each parsed line in a
   Python ``Example``).
2. ``pyvw.Example`` built from namespace dicts (``push_feature_dict`` inside pyvw), one
   per line, then ``ws.predict`` on the list.
3. What the service does: the same text, parsed by ``ws._parse`` and passed straight to
   pylibvw's ``predict_multi`` (no Python wrapper per line).
4. Like 3, with the candidate lines rendered once and reused (the service's line cache),
   and their parsed examples kept and reused (``ActionExamples``): only the shared line
   is parsed per prediction. 4t is 4 with every line parsed (``reuse_examples=False``).

Then 1 and 3 again on lines rendered in advance, to separate VW's side from rendering.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import vowpalwabbit
from vowpalwabbit import pyvw

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synthetic import candidates, context

from bandit_service.learners import vw_text
from bandit_service.learners.vw import VWLearner

ARGS = "--cb_explore_adf --epsilon 0.1 -q ua --quiet"


def as_namespaces(features: dict, default: str) -> dict[str, list]:
    """The feature map as pyvw's dict form: namespace -> [(name, value) or name]."""
    spaces: dict[str, list] = {}
    for name, value in features.items():
        if isinstance(value, dict):
            spaces[name] = [_pyvw_feature(k, v) for k, v in value.items()]
        else:
            spaces.setdefault(default, []).append(_pyvw_feature(name, value))
    return spaces


def _pyvw_feature(name: str, value: object) -> object:
    if isinstance(value, bool | int | float):
        return (vw_text.escape(name), float(value))
    return f"{vw_text.escape(name)}={vw_text.escape(str(value))}"


def timed(label: str, fn, repeat: int) -> list[float]:  # type: ignore[no-untyped-def]
    result = fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    micros = (time.perf_counter() - start) / repeat * 1e6
    print(f"{label:<62}{micros:>8.0f} us")
    return list(result)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    rng = random.Random(11)
    pool = candidates(rng, 50)
    ctx = context(rng)
    ws = vowpalwabbit.Workspace(ARGS)
    learner = VWLearner(ARGS)
    text_learner = VWLearner(ARGS, reuse_examples=False)

    def text_lines() -> list[str]:
        return [vw_text.shared_line(ctx, 0, {})] + [
            vw_text.action_line(c.id, c.features) for c in pool
        ]

    def public_text() -> list[float]:
        return list(ws.predict(text_lines()))

    def direct_examples() -> list[float]:
        shared = pyvw.Example(ws, {**as_namespaces(ctx, "context"), "slot": ["slot_index=0"]},
                              labelType=ws.get_label_type())  # fmt: skip
        examples = [shared]
        for c in pool:
            spaces = as_namespaces(dict(c.features), "action")
            spaces.setdefault("action", []).insert(0, f"id={vw_text.escape(c.id)}")
            examples.append(pyvw.Example(ws, spaces, labelType=ws.get_label_type()))
        examples[0].set_label_string("shared")
        pmf = list(ws.predict(examples))
        ws.finish_example(examples)
        return pmf

    def service_uncached() -> list[float]:
        return learner.predict_lines(text_lines())

    rendered = text_lines()

    def public_prerendered() -> list[float]:
        return list(ws.predict(rendered))

    def service_prerendered() -> list[float]:
        return learner.predict_lines(rendered)

    def service_cached() -> list[float]:
        return learner.scorer(ctx, pool).pmf(0, {}, list(range(len(pool))))

    def service_cached_text() -> list[float]:
        return text_learner.scorer(ctx, pool).pmf(0, {}, list(range(len(pool))))

    print(f"{'path (50 candidates x 10 features, one prediction)':<62}{'time':>11}")
    reference = timed("1. ws.predict on text lines (public API)", public_text, args.repeat)
    direct = timed("2. pyvw.Example from namespace dicts", direct_examples, args.repeat)
    uncached = timed("3. text parsed straight into pylibvw (service)", service_uncached,
                     args.repeat)  # fmt: skip
    cached = timed("4. as 3, lines cached, examples kept (service, warm)", service_cached,
                   args.repeat)  # fmt: skip
    cached_text = timed("4t. as 4, every line parsed (before kept examples)",
                        service_cached_text, args.repeat)  # fmt: skip
    print("VW's side alone, on lines rendered in advance:")
    pre_public = timed("1'. ws.predict", public_prerendered, args.repeat)
    pre_service = timed("3'. parsed straight into pylibvw", service_prerendered, args.repeat)
    others = (direct, uncached, cached, cached_text, pre_public, pre_service)
    same = [max(abs(a - b) for a, b in zip(reference, other, strict=True))
            for other in others]  # fmt: skip
    print(f"largest pmf difference from path 1: {max(same):.2g}")


if __name__ == "__main__":
    main()
