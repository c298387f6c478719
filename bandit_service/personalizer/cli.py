"""``bandit-service import dsjson --policy NAME FILE…``: warm-start from a Personalizer log."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_import_parser(sub: Any) -> None:
    """Register ``import dsjson`` on the main parser's subcommands."""
    parser = sub.add_parser("import", help="import history from other systems")
    kinds = parser.add_subparsers(dest="kind", required=True)
    dsjson = kinds.add_parser(
        "dsjson",
        help="warm-start a policy's model from Azure Personalizer DSJSON log exports",
        description="Learn the joined single-slot events of the files, in order, into the "
        "policy's model and save it as a checkpoint the service loads. Stop the policy's "
        "trainer first (BANDIT_TRAINER=off or stop the service): the import takes its lease.",
    )
    dsjson.add_argument("--policy", required=True, help="the policy to warm-start")
    dsjson.add_argument("files", nargs="+", type=Path, metavar="FILE")
    dsjson.set_defaults(func=run_import_dsjson)


def _bar(done: int, total: int, width: int = 30) -> str:
    share = min(1.0, done / total) if total else 1.0
    filled = int(share * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {share:4.0%}"


def run_import_dsjson(args: argparse.Namespace) -> int:
    from bandit_service.config import Settings
    from bandit_service.personalizer.importer import ImportBusy, ImportResult, import_dsjson
    from bandit_service.policy import load_policies
    from bandit_service.store.database import make_engine

    settings = Settings()
    policies = load_policies(settings.policies_dir)
    policy = policies.get(args.policy)
    if policy is None:
        print(f"bandit-service: unknown policy {args.policy!r} (known: "
              f"{', '.join(sorted(policies))})", file=sys.stderr)  # fmt: skip
        return 2
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        print(f"bandit-service: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    total = sum(p.stat().st_size for p in args.files)

    def progress(read: int, result: ImportResult) -> None:
        print(f"\r  {_bar(read, total)} {result.learned} learned, {result.malformed} "
              "malformed", end="", file=sys.stderr, flush=True)  # fmt: skip

    db = make_engine(settings.database_url)
    try:
        result = import_dsjson(db, policy, args.files, progress)
    except ImportBusy as exc:
        print(f"\nbandit-service: {exc}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    print(file=sys.stderr)
    for message in result.first_errors:
        print(f"  skipped: {message}", file=sys.stderr)
    print(
        f"{result.lines} lines: {result.learned} learned, {result.malformed} malformed "
        f"(skipped), {result.not_joined} without a joined reward or multi-slot (skipped), "
        f"{result.deterministic} with probability 1 (skipped)"
    )
    if result.model_version is None:
        print(f"nothing learned; policy {policy.name!r} keeps its model")
        return 1
    print(f"policy {policy.name!r}: model version {result.model_version} saved (lineage "
          f"{policy.model_key}); the service loads it on its next reload")  # fmt: skip
    return 0
