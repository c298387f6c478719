"""What naming catalog items saves per decision, in-process (no HTTP, no store, no VW).

    .venv/bin/python benchmarks/catalog_request.py [--rounds 5] [--requests 2000]

The per-request steps that differ between inline candidates and ``candidate_ids``, for the
``d50x1`` shape of ``http_load.py`` (50 candidates x 10 features, 20-feature context):

* parse: ``DecisionIn.model_validate_json`` of the request body (pydantic-core parses the
  JSON and runs the feature checks of ``api/features.py`` on every candidate);
* candidates: building the request's ``Candidate`` tuple (inline), or taking the snapshot's
  cached selection (catalog);
* identifiers: ``find_identifier`` (the e-mail/phone scan) over what the request carries;
* log set: the compact log's candidate-set key (JSON text + BLAKE2b) of the candidates,
  computed per decision inline, cached per catalog version for a catalog selection.

CPU time (``time.process_time``) per request, inline and catalog alternating round by
round so a change in machine load hits both alike.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synthetic import candidates, context

from bandit_service.api.schemas import DecisionIn
from bandit_service.catalog import CatalogSnapshot
from bandit_service.domain import Candidate, DecisionRequest, slot_list
from bandit_service.identifiers import find_identifier
from bandit_service.store import compact


def bodies(variants: int, catalog: bool, seed: int = 7) -> tuple[list[bytes], list[Candidate]]:
    rng = random.Random(seed)
    pool = candidates(rng, 50)
    items = [{"id": c.id, "features": dict(c.features)} for c in pool]
    out = []
    for _ in range(variants):
        body: dict[str, object] = {"context": context(rng), "slots": 1}
        body.update({"candidate_ids": [c.id for c in pool]} if catalog else {"candidates": items})
        out.append(orjson.dumps(body))
    return out, [Candidate(i["id"], i["features"]) for i in items]  # type: ignore[arg-type]


def run(texts: list[bytes], snapshot: CatalogSnapshot | None, count: int) -> dict[str, float]:
    spent = dict.fromkeys(("parse", "candidates", "identifiers", "log set"), 0.0)
    clock = time.process_time
    for n in range(count):
        t0 = clock()
        body = DecisionIn.model_validate_json(texts[n % len(texts)])
        t1 = clock()
        if snapshot is not None and body.candidate_ids is not None:
            chosen: tuple[Candidate, ...] = snapshot.select(body.candidate_ids)
        else:
            assert body.candidates is not None
            chosen = tuple(Candidate(id=c.id, features=c.features) for c in body.candidates)
        t2 = clock()
        request = DecisionRequest(
            event_id=str(n), policy="default", candidates=chosen, slots=slot_list(1),
            context=body.context,
        )  # fmt: skip
        if hasattr(chosen, "logged"):  # as DecisionService._check_identifiers does
            request = DecisionRequest(
                event_id=str(n), policy="default", candidates=(), slots=request.slots,
                context=body.context,
            )  # fmt: skip
        find_identifier(request)
        t3 = clock()
        logged = getattr(chosen, "logged", None) or [
            {"id": c.id, "features": c.features} for c in chosen
        ]
        compact.candidate_set(logged)
        t4 = clock()
        for key, took in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            spent[key] += took
    return {key: total / count * 1e6 for key, total in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    inline_texts, pool = bodies(64, catalog=False)
    catalog_texts, _ = bodies(64, catalog=True)
    snapshot = CatalogSnapshot("default", 1, None, {c.id: c for c in pool})
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores; "
          f"body {len(inline_texts[0])} bytes inline, {len(catalog_texts[0])} by ids")  # fmt: skip
    results: dict[str, list[dict[str, float]]] = {"inline": [], "catalog": []}
    for _ in range(args.rounds):
        results["inline"].append(run(inline_texts, None, args.requests))
        results["catalog"].append(run(catalog_texts, snapshot, args.requests))
    print(f"{'us per request (median of rounds)':<36}{'inline':>10}{'catalog':>10}")
    totals = {}
    for step in results["inline"][0]:
        row = {kind: statistics.median(r[step] for r in rounds) for kind, rounds in results.items()}
        print(f"{step:<36}{row['inline']:>10.1f}{row['catalog']:>10.1f}")
    for kind, rounds in results.items():
        totals[kind] = statistics.median(sum(r.values()) for r in rounds)
    print(f"{'total':<36}{totals['inline']:>10.1f}{totals['catalog']:>10.1f}")


if __name__ == "__main__":
    main()
