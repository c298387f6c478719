"""Trainer throughput: learned events per second, VW alone and end to end from the store.

    .venv/bin/python benchmarks/trainer_throughput.py [--events 5000] [--candidates 50]

Builds a SQLite log of closed-window decisions (``--candidates`` candidates x 10 features,
a 20-feature context, 1 slot), then times (a) VW learning alone on those examples and
(b) the trainer: read from the store, join rewards, learn, checkpoint.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synthetic import candidates, context
from sqlalchemy.orm import Session

from bandit_service.domain import DecisionRequest, slot_list
from bandit_service.engine import DecisionEngine
from bandit_service.learners.vw import VWLearner
from bandit_service.policy import PolicyConfig
from bandit_service.service import decision_row
from bandit_service.store import repository
from bandit_service.store.database import make_engine, upgrade
from bandit_service.training import PolicyTrainer, TrainerOptions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--candidates", type=int, default=50)
    args = parser.parse_args()
    rng = random.Random(7)
    policy = PolicyConfig(name="bench", vw_args="--cb_explore_adf --epsilon 0.1 -q ua")
    pool = candidates(rng, args.candidates)
    engine_ = DecisionEngine({"bench": policy}, lambda _n: serving)
    serving = VWLearner(policy.vw_args)

    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/bench.db"
        upgrade(url)
        db = make_engine(url)
        print(f"logging {args.events} decisions ({args.candidates} candidates)...", flush=True)
        rows = []
        for i in range(args.events):
            request = DecisionRequest(f"e{i}", "bench", tuple(pool), slot_list(1), context(rng))
            rows.append(decision_row(engine_.decide(request), request, None, 1000.0 + i))
        with Session(db) as session, session.begin():
            repository.insert_decisions(session, rows)

        learner = VWLearner(policy.vw_args)
        start = time.perf_counter()
        for row in rows:
            slot = row["slots"][0]
            eligible = [c for c in pool]
            chosen = next(i for i, c in enumerate(eligible) if c.id == slot["id"])
            learner.learn_slot(row["context"], 0, {}, eligible, chosen, slot["probability"], 0.0)
        vw_only = args.events / (time.perf_counter() - start)

        trainer = PolicyTrainer(
            db, policy, "bench", TrainerOptions(batch_events=2000, commit_grace_seconds=0),
            clock=lambda: 10_000_000.0,
        )  # fmt: skip
        start = time.perf_counter()
        learned = 0
        while True:
            result = trainer.step()
            learned += result.learned
            print(f"  learned {learned}/{args.events}", flush=True)
            if not result.more:
                break
        end_to_end = learned / (time.perf_counter() - start)
        db.dispose()

    print(f"VW learn only (text examples):      {vw_only:8.0f} events/s")
    print(f"trainer, store -> learn -> checkpoint: {end_to_end:8.0f} events/s")


if __name__ == "__main__":
    main()
