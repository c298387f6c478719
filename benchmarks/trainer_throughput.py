"""Trainer throughput: learned events per second, end to end and against VW's own cost.

    .venv/bin/python benchmarks/trainer_throughput.py [--events 6000] [--candidates 50]
        [--reward-share 0.3] [--rounds 3]

Builds a SQLite log of closed-window decisions (``--candidates`` candidates x 10 features,
a 20-feature context, 1 slot, ``--reward-share`` of them rewarded), then times, in
alternating rounds so that all three see the same machine load:

* **VW floor**: VW parsing and learning the examples' text, rendered in advance (pylibvw
  directly, as the learner does): what no trainer written around this VW text
  interface can beat.
* **VW via learn_slot**: the learner's public per-slot method on plain candidate lists
  (cached rendering, kept action examples, learn): the "VW alone" reference of earlier
  versions of this script, which parsed every line then.
* **trainer**: read from the store, join rewards, learn, checkpoint (PolicyTrainer.step).
* **trainer, text only**: the same with ``VWLearner(reuse_examples=False)``: every action
  line parsed for every event, as before :class:`ActionExamples` (the "before" of that
  change, measured in the same rounds; the two trainers alternate which runs first).

Each is reported per wall-clock second and per CPU second of this (single-threaded)
process: on a shared machine the CPU figure is the one-core throughput, the wall figure
is what this run got. The median of ``--rounds`` is shown, plus the trainer's ratio to
the floor. Finally it checks that both trainers' models equal learn_slot's, byte for byte.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synthetic import candidates, context
from sqlalchemy import delete
from sqlalchemy.orm import Session

from bandit_service.domain import Candidate, DecisionRequest, slot_list
from bandit_service.engine import DecisionEngine
from bandit_service.learners import vw_text
from bandit_service.learners.vw import VWLearner, cost_from_reward
from bandit_service.policy import PolicyConfig
from bandit_service.rewards import slot_rewards
from bandit_service.service import decision_row
from bandit_service.store import repository
from bandit_service.store.database import make_engine, upgrade
from bandit_service.store.models import ModelCheckpointRow
from bandit_service.training import PolicyTrainer, TrainerOptions, vw_learner_factory

Timed = tuple[float, float]  # (wall seconds, CPU seconds)


def timed(action: Callable[[], object]) -> Timed:
    wall, cpu = time.perf_counter(), time.process_time()
    action()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=6000)
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--reward-share", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(7)
    policy = PolicyConfig(name="bench", vw_args="--cb_explore_adf --epsilon 0.1 -q ua")
    pool = candidates(rng, args.candidates)
    serving = VWLearner(policy.vw_args)
    engine_ = DecisionEngine({"bench": policy}, lambda _n: serving)

    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/bench.db"
        upgrade(url)
        db = make_engine(url)
        print(f"logging {args.events} decisions ({args.candidates} candidates)...", flush=True)
        rows, rewards = [], []
        for i in range(args.events):
            request = DecisionRequest(f"e{i}", "bench", tuple(pool), slot_list(1), context(rng))
            rows.append(decision_row(engine_.decide(request), request, None, 1000.0 + i))
            if rng.random() < args.reward_share:
                rewards.append(
                    {"event_id": f"e{i}", "slot": 0, "value": 1.0, "received_at": 1001.0 + i,
                     "late": False, "kind": "primary", "reward_id": str(uuid.uuid4())}
                )  # fmt: skip
        with Session(db) as session, session.begin():
            repository.insert_decisions(session, rows)
            repository.insert_rewards(session, rewards)
        with Session(db) as session:
            log = repository.decisions_after(session, "bench", 0, args.events)
        # What the trainer learns, as plain arguments of learn_slot (holdout rows excluded).
        slots: list[tuple[Any, ...]] = []
        by_id = {c.id: c for c in pool}
        for decision in log:
            if decision["arm"] != "bandit":
                continue
            slot, reward = decision["slots"][0], slot_rewards(decision, policy)[0]
            eligible = [by_id[cid] for cid, _p in slot["pmf"]]
            chosen = [c.id for c in eligible].index(slot["id"])
            probability = slot["probability"]
            slots.append((decision["context"], 0, {}, eligible, chosen, probability, reward))
        texts = [_text(*s) for s in slots]
        # Drop the harness's own copies of the log (~600,000 objects in their written and
        # read-back shapes): alive, they made every full garbage collection during the
        # timed paths scan them, which a trainer process does not have to do.
        del rows, rewards, log
        gc.collect()

        results: dict[str, list[Timed]] = {
            "floor": [], "learn_slot": [], "trainer_text": [], "trainer": []
        }  # fmt: skip
        models: dict[str, bytes] = {}
        for round_ in range(1, args.rounds + 1):
            floor = VWLearner(policy.vw_args)
            results["floor"].append(timed(lambda f=floor: [f.learn_text(t) for t in texts]))
            public = VWLearner(policy.vw_args)
            results["learn_slot"].append(timed(lambda p=public: [p.learn_slot(*s) for s in slots]))
            models["learn_slot"] = public.to_bytes()
            trainers = ["trainer_text", "trainer"] if round_ % 2 else ["trainer", "trainer_text"]
            for key in trainers:
                with Session(db) as session, session.begin():
                    session.execute(delete(ModelCheckpointRow))
                trainer = PolicyTrainer(
                    db, policy, "bench", TrainerOptions(batch_events=2000, commit_grace_seconds=0),
                    clock=lambda: 10_000_000.0,
                    learner_factory=_text_only if key == "trainer_text" else vw_learner_factory,
                )  # fmt: skip
                results[key].append(timed(lambda t=trainer: _drain(t)))
                assert trainer.learned_events == len(slots), (trainer.learned_events, len(slots))
                assert trainer.learner is not None
                models[key] = trainer.learner.to_bytes()
                trainer.learner.close()  # type: ignore[attr-defined]
            for learner in (floor, public):  # free each round's workspaces
                learner.close()
            rates = ", ".join(f"{k} {len(slots) / v[-1][1]:,.0f}" for k, v in results.items())
            print(f"  round {round_}/{args.rounds}: events/CPU-s {rates}", flush=True)
        db.dispose()

    n = len(slots)
    print(f"\n{n} learned events ({args.candidates} candidates, median of {args.rounds} rounds)")
    print(f"{'path':46s} {'events/s (wall)':>16s} {'events/CPU-s':>13s}")
    labels = {
        "floor": "VW floor: parse + learn, text pre-rendered",
        "learn_slot": "VW via learn_slot (kept action examples)",
        "trainer_text": "trainer, text only (before ActionExamples)",
        "trainer": "trainer: store -> rewards -> learn -> ckpt",
    }
    medians = {}
    for key, label in labels.items():
        wall = statistics.median(n / w for w, _c in results[key])
        cpu = statistics.median(n / c for _w, c in results[key])
        medians[key] = (wall, cpu)
        print(f"{label:46s} {wall:16,.0f} {cpu:13,.0f}")
    print(
        f"trainer / floor: {medians['trainer'][0] / medians['floor'][0]:.2f} (wall), "
        f"{medians['trainer'][1] / medians['floor'][1]:.2f} (CPU)"
    )
    speedup = medians["trainer"][1] / medians["trainer_text"][1]
    print(f"trainer / text-only trainer: {speedup:.2f} (CPU)")
    for key in ("trainer", "trainer_text"):
        print(f"{key} model == learn_slot model: {models[key] == models['learn_slot']}")


def _text(
    context_: Any, slot: int, features: Any, eligible: list[Candidate], chosen: int,
    probability: float, reward: float,
) -> str:  # fmt: skip
    lines = [vw_text.shared_line(context_, slot, features)]
    lines += [vw_text.action_line(c.id, c.features) for c in eligible]
    lines[1 + chosen] = f"0:{cost_from_reward(reward)!r}:{probability!r}{lines[1 + chosen]}"
    return "\n".join(lines)


def _text_only(vw_args: str, model: bytes | None, version: int) -> VWLearner:
    return VWLearner(vw_args, model, version, reuse_examples=False)


def _drain(trainer: PolicyTrainer) -> None:
    while trainer.step().more:
        pass


if __name__ == "__main__":
    main()
