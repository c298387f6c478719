"""Do two versions of the engine decide, log and learn exactly alike? A digest per scenario.

    .venv/bin/python benchmarks/engine2_equivalence.py [--requests 1000] [--compare-src DIR]

For each scenario (VW arguments x rules x candidate shape x how the candidates arrive), it
decides ``--requests`` requests with event ids ``e0, e1, ...``, learns every slot's outcome
(a reward drawn from the event id) so that later predictions come from a trained model,
and hashes: every slot's shown id, probability (``repr``, all 17 digits), explored flag,
model id and distribution (positions and probabilities), the decision's arm and context
line, its slots as the log stores and reads them back (``store/compact.compact_row_slots``
then ``expand_slots``: every logged probability, exactly, whichever encoding a version
writes) and, at the end, the VW model's bytes. ``--compare-src DIR`` runs the
``bandit_service`` found in DIR in a child process and prints both digests side by side.
Exit status 1 when any scenario differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synthetic import candidates, context

VW_CONFIGS = [
    "--cb_explore_adf --epsilon 0.1 -q ua -q sa",  # the benchmarks' policy
    "--cb_explore_adf --epsilon 0.1 -q ca -q sa",  # policies/default.toml
    "--cb_explore_adf --softmax --lambda 5 -q ua",
    "--cb_explore_adf --bag 3 --epsilon 0.05 -q sa",
]

RULES = {
    "exclude_if": [{"feature": "f1", "equals": "z"}],
    "pins": [{"id": "item-0", "slot": 0}],
    "max_per_value": [{"feature": "f3", "max": 2}],
    "freshness": {"feature": "f0", "max_age": 0.2, "boost": 2.0},
    "boosts": [{"feature": "f5", "equals": "x", "factor": 1.5}],
    "exploration_share": 0.15,
}

# (candidates, slots, rules, extra policy keys)
SHAPES: list[tuple[int, int, dict[str, Any] | None, dict[str, Any]]] = [
    (50, 1, None, {}),
    (50, 3, None, {"holdout_share": 0.2}),
    (500, 5, None, {}),
    (60, 4, RULES, {}),
    (60, 3, {"exploration_positions": [1], "exploration_distribution": "least_shown"}, {}),
    (40, 2, None, {"learning_mode": "apprentice"}),
]


def _scenario(vw_args: str, shape: tuple[Any, ...], requests: int, kept: bool) -> str:
    from bandit_service.candidate_sets import KeptCandidates
    from bandit_service.domain import Candidate, DecisionRequest, slot_list
    from bandit_service.engine import DecisionEngine
    from bandit_service.learners.vw import VWLearner
    from bandit_service.policy import parse_policy
    from bandit_service.store import compact

    count, slots, rules, extra = shape
    raw: dict[str, Any] = {"vw_args": vw_args, "holdout_share": 0, **extra}
    if rules is not None:
        raw["rules"] = rules
    policy = parse_policy("bench", raw)
    learner = VWLearner(policy.vw_args)
    engine = DecisionEngine({"bench": policy}, lambda _name: learner, clock=lambda: 1_000.0)
    rng = random.Random(count * 100 + slots)
    pool = candidates(rng, count)
    pool[0] = Candidate(pool[0].id, {**pool[0].features, "f1": "x"})  # pinnable
    digest = hashlib.sha256()
    kept_set = KeptCandidates(pool) if kept else None
    for i in range(requests):
        cands = (
            kept_set
            if kept_set is not None
            else tuple(Candidate(c.id, dict(c.features)) for c in pool)
        )
        request = DecisionRequest(
            f"e{i}", "bench", cands, slot_list(slots), context(rng), user_id=f"u{i % 37}"
        )
        decision = engine.decide(request)
        rows = []
        for choice in decision.slots:
            dist = choice.distribution
            rows.append(
                [choice.slot, choice.slot_id, choice.id, repr(choice.probability),
                 choice.explored, choice.model_id, list(dist.positions),
                 [repr(p) for p in dist.probabilities]]
            )  # fmt: skip
        logged = [{"id": c.id, "features": c.features} for c in pool]
        # What the log gives back (compacted, JSON, then read): the same for two versions that
        # log the same numbers, whichever encoding each writes (``p`` or ``p_runs``).
        stored = compact.expand_slots(
            orjson.loads(orjson.dumps(compact.compact_row_slots(
                [{"slot": c.slot, "id": c.id, "pmf": c.distribution} for c in decision.slots],
                logged,
            ))),  # as JSON text, as the store keeps it
            [c["id"] for c in logged],
        )  # fmt: skip
        digest.update(
            json.dumps(
                [decision.arm, decision.context_line, decision.model_version, rows, stored]
            ).encode()
        )
        if decision.arm != "bandit":
            continue
        reward_rng = random.Random(f"r{i}")
        for choice in decision.slots:
            eligible = [pool[j] for j in choice.distribution.positions]
            chosen = list(choice.distribution.positions).index(
                next(j for j, c in enumerate(pool) if c.id == choice.id)
            )
            learner.learn_slot(
                request.context, choice.slot, {}, eligible, chosen, choice.probability,
                round(reward_rng.random(), 3),
            )  # fmt: skip
    digest.update(learner.to_bytes())
    learner.close()
    return digest.hexdigest()


def run_all(requests: int) -> dict[str, str]:
    out = {}
    for vw_args in VW_CONFIGS:
        for shape in SHAPES:
            if shape[0] >= 500 and vw_args != VW_CONFIGS[0]:
                continue  # the large shape with the benchmarks' policy only (time)
            for kept in (False, True):
                n = requests if shape[0] < 500 else max(20, requests // 10)
                name = f"{vw_args} | {shape[0]}x{shape[1]} rules={bool(shape[2])} " \
                       f"{shape[3] or ''} kept={kept}"  # fmt: skip
                out[name] = _scenario(vw_args, shape, n, kept)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--compare-src", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child or not args.compare_src:
        print(json.dumps(run_all(args.requests)))
        return
    env = dict(os.environ, PYTHONPATH=str(args.compare_src.resolve()))
    command = [sys.executable, __file__, "--child", "--requests", str(args.requests)]
    base_run = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    base = json.loads(base_run.stdout.strip().splitlines()[-1])
    current = run_all(args.requests)
    differ = 0
    for name, digest in current.items():
        same = base.get(name) == digest
        differ += not same
        verdict = "same" if same else "DIFFERENT"
        print(f"{verdict:9s} {digest[:16]} {base.get(name, '-')[:16]}  {name}")
    print(f"{len(current) - differ} of {len(current)} scenarios identical")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
