"""``bandit-service``: serve | migrate | train | report lift | ope | simulate | retention |
check-policies | keys | import."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from bandit_service.apikeys import KeyConfigError
from bandit_service.config import Settings
from bandit_service.policy import PolicyError, load_policies


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from bandit_service.ops import logs, protocol
    from bandit_service.ops.lifecycle import exit_cleanly_on_sigterm

    # Workers build their own Settings from the environment: pass the flags on that way.
    if args.log_level:
        os.environ["BANDIT_LOG_LEVEL"] = args.log_level.lower()
    if args.access_log:
        os.environ["BANDIT_ACCESS_LOG"] = "true"
    settings = Settings()
    logs.configure(settings.log_level)
    policies = load_policies(settings.policies_dir)  # fail here, once, with a clear message
    if not _access_allows(settings, policies, args.host):
        return 2
    if args.migrate:
        _migrate(args)
    if args.workers > 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _prepare_multiprocess_metrics()
    exit_cleanly_on_sigterm()
    uvicorn.run(
        "bandit_service.app:app_from_env",
        factory=True,
        http=protocol.http_protocol(),  # one write per answer (ops/protocol.py)
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_config=logs.dict_config(settings.log_level),
        access_log=False,  # client addresses and raw paths; the app logs its own lines
        timeout_graceful_shutdown=settings.shutdown_timeout_seconds,
    )
    return 0


def _access_allows(settings: Settings, policies: Any, host: str) -> bool:
    """Keys are valid; without keys only a loopback address may be bound (say which)."""
    from bandit_service.api.auth import access_summary
    from bandit_service.apikeys import is_loopback, load_keyring

    keyring = load_keyring(settings, policies)
    if not keyring.configured and not is_loopback(host):
        print(
            f"bandit-service: refusing to serve on {host} without API keys: anyone who can "
            "reach that address could decide, read and administer. Configure keys "
            "(`bandit-service keys create`, BANDIT_API_KEYS_FILE; see docs/security.md) or "
            "bind a loopback address (--host 127.0.0.1).",
            file=sys.stderr,
        )
        return False
    print(f"bandit-service: {access_summary(keyring)}", file=sys.stderr)
    return True


def _keys_create(args: argparse.Namespace) -> int:
    import json

    from bandit_service.apikeys import create_key, entry_toml, make_entry

    key = create_key()
    entry = make_entry(
        key,
        name=args.name,
        scopes=sorted(set(args.scope), key=args.scope.index),
        policies=args.policy,
        rate_per_second=args.rate,
        burst=args.burst,
    ).model_dump(exclude_none=True)
    if args.json:
        print(json.dumps({"key": key, "entry": entry}, indent=2))
        return 0
    # The key goes to the terminal (stderr), the entry to stdout: `keys create >> keys.toml`
    # appends the entry and never writes the key into the file.
    print(f"key for {args.name!r}, shown only now (give it to the client, keep it secret):\n"
          f"{key}", file=sys.stderr)  # fmt: skip
    print(entry_toml(entry), end="")
    return 0


def _keys_hash(_args: argparse.Namespace) -> int:
    """Hash a key read from stdin (never from argv: argv lands in shell history and ps)."""
    from bandit_service.apikeys import hash_key

    if sys.stdin.isatty():
        import getpass

        key = getpass.getpass("API key (not echoed): ")
    else:
        key = sys.stdin.readline()
    key = key.strip()
    if not key:
        print("bandit-service keys hash: no key on stdin", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


def _keys_list(_args: argparse.Namespace) -> int:
    settings = Settings()
    from bandit_service.apikeys import load_keyring

    keyring = load_keyring(settings, load_policies(settings.policies_dir))
    if not keyring.configured:
        print("no API keys configured (serving is limited to loopback addresses)")
    for _, p in keyring.principals:
        rate = "unlimited" if p.limits.rate_per_second is None else (
            f"{p.limits.rate_per_second:g}/s burst {p.limits.burst}")  # fmt: skip
        print(f"{p.name}: scopes {', '.join(sorted(p.scopes))}; policies "
              f"{p.describe_policies()}; rate {rate}; body <= {p.limits.max_body_bytes} B, "
              f"<= {p.limits.max_candidates} candidates, <= "
              f"{p.limits.max_features_per_candidate} features each")  # fmt: skip
    return 0


def _prepare_multiprocess_metrics() -> None:
    """Several workers: each writes its metrics to files in PROMETHEUS_MULTIPROC_DIR and any
    of them answers a scrape with the sum. The folder must be emptied before the workers
    start (values of a previous run would be added); unset, a fresh temporary one is made.
    Must run before anything imports prometheus_client (it reads the variable at import).
    """
    import tempfile

    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        folder = tempfile.mkdtemp(prefix="bandit-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    logging.getLogger(__name__).info(
        "metrics of all workers are summed through %s", folder,
        extra={"event": "startup", "prometheus_multiproc_dir": folder},
    )  # fmt: skip


def _migrate(args: argparse.Namespace) -> int:
    from bandit_service.store.database import downgrade, upgrade

    settings = Settings()
    target = getattr(args, "revision", "head")
    if getattr(args, "down", False):
        downgrade(settings.database_url, target)
    else:
        upgrade(settings.database_url, target)
    print(f"migrated {_safe_url(settings.database_url)} to {target}")
    return 0


def _train(args: argparse.Namespace) -> int:
    """A standalone trainer, for deployments with several API processes (BANDIT_TRAINER=off
    on those). Several may run; a lease lets at most one train each policy, the others wait.
    """
    import signal
    import threading

    from bandit_service.store.database import make_engine
    from bandit_service.training import Trainer

    settings = Settings()
    policies = load_policies(settings.policies_dir)
    if args.policy:
        unknown = sorted(set(args.policy) - set(policies))
        if unknown:
            raise PolicyError(f"unknown policy {', '.join(unknown)}")
        policies = {name: policies[name] for name in args.policy}
    engine = make_engine(settings.database_url)
    trainer = Trainer(engine, policies, settings.trainer_options())
    log = logging.getLogger("bandit_service.train")
    if args.once:
        for name, result in trainer.run_once().items():
            state = "trained" if result.active else "waiting (another trainer holds the lease)"
            print(f"{name}: {state}; learned {result.learned}, skipped {result.skipped}, "
                  f"model version {result.model_version}")  # fmt: skip
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("trainer %s started for %s", trainer.owner, ", ".join(trainer.trainers) or "nothing")
    heartbeat = Path(args.heartbeat) if args.heartbeat else None
    follow = _policy_follower(settings.policies_dir, policies, trainer, log)

    def on_cycle() -> None:
        if heartbeat is not None:
            heartbeat.touch()
        follow()

    trainer.run_forever(stop, settings.train_interval_seconds, on_cycle)
    log.info("trainer %s stopped", trainer.owner)
    return 0


def _policy_follower(
    folder: Path, policies: dict[str, Any], trainer: Any, log: logging.Logger
) -> Any:
    """Each cycle, apply policy files changed since (e.g. by a configuration PUT on an API
    process) to the trainer, as serving processes do; an invalid file is logged and the
    running version kept. Only the policies this trainer was started for are followed."""
    from bandit_service.policy import load_policy_file, policy_file_marks

    marks = policy_file_marks(folder)

    def follow() -> None:
        nonlocal marks
        current = policy_file_marks(folder)
        changed = sorted(n for n, mark in current.items() if marks.get(n) != mark)
        marks = current
        for name in changed:
            if name not in policies:
                continue
            try:
                policy = load_policy_file(folder / f"{name}.toml")
            except (PolicyError, OSError) as exc:
                log.error("policy file of %s not applied, still training the previous "
                          "version: %s", name, exc)  # fmt: skip
                continue
            if policy.version != policies[name].version:
                policies[name] = policy
                trainer.set_policy(policy)
                log.info("policy %s: now version %s (model lineage %s)", name,
                         policy.version, policy.model_key)  # fmt: skip

    return follow


def _report_lift(args: argparse.Namespace) -> int:
    import json
    import time

    from bandit_service.reports.lift import (
        collect_outcomes,
        format_table,
        lift_over_time,
        lift_report,
        plot_lift,
    )
    from bandit_service.store.database import make_engine
    from bandit_service.timeutil import parse_instant

    settings = Settings()
    policies = load_policies(settings.policies_dir)
    if args.policy not in policies:
        raise PolicyError(f"unknown policy {args.policy!r} (known: {', '.join(policies)})")
    policy = policies[args.policy]
    try:
        since = parse_instant(args.since) if args.since else None
        until = (
            parse_instant(args.until) if args.until else time.time() - policy.reward_window_seconds
        )
    except ValueError as exc:
        print(f"bandit-service: {exc}", file=sys.stderr)
        return 2

    def progress(read: int) -> None:
        print(f"\r  read {read} decisions", end="", file=sys.stderr, flush=True)

    outcomes = collect_outcomes(make_engine(settings.database_url), policy, since, until, progress)
    print(file=sys.stderr)
    report = lift_report(
        outcomes,
        policy,
        replicates=args.replicates,
        seed=args.seed,
        period_seconds=args.period_seconds,
    )
    report["since"], report["until"] = since, until
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    if args.plot:
        print("  computing lift over time for the plot...", file=sys.stderr)
        points = lift_over_time(outcomes, replicates=min(args.replicates, 500), seed=args.seed)
        plot_lift(points, args.plot, f"{policy.name}: learned policy vs popularity holdout")
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def _ope(args: argparse.Namespace) -> int:

    from bandit_service.ope import evaluate as ope
    from bandit_service.ope.obd import read_action_distribution

    stats = ope.LogStats()
    targets: dict[str, ope.Target] = {}

    def progress(what: str, done: int, total: int) -> None:
        print(f"\r  {what}: {done}/{total} rows", end="\n" if done == total else "",
              file=sys.stderr, flush=True)  # fmt: skip

    ope.PROGRESS = progress
    try:
        specs = args.target or ["uniform"]
        streamable = args.from_file or args.policy or args.from_jsonl or args.from_dsjson or (
            args.from_obd and not args.target_distribution)  # fmt: skip
        if streamable and not (args.sweep or args.importance or args.pages):
            return _ope_stream(args, specs, stats)
        for spec in specs:
            if spec.startswith("explicit:"):
                raise ValueError(
                    f"{spec}: explicit targets are read from a target_NAME column of a CSV or "
                    "Parquet log given with --from-file"
                )
            targets[spec] = ope.parse_target(spec)
        if args.from_file:
            from bandit_service.ope import table

            rows = table.rows_from_table(args.from_file, stats)
        elif args.from_jsonl or args.from_dsjson:
            from bandit_service.ope import files

            rows = (
                files.rows_from_jsonl(args.from_jsonl, stats)
                if args.from_jsonl
                else files.rows_from_dsjson(args.from_dsjson, stats)
            )
        elif args.from_obd:
            if args.items is None:
                raise ValueError("--from-obd needs --items (80, 34 or 46 in the OBD sample)")
            rows = ope.rows_from_obd(args.from_obd, args.items, stats)
            if args.target_distribution:
                dist = read_action_distribution(args.target_distribution)
                name = f"file:{Path(args.target_distribution).stem}"
                targets[name] = ope.position_target(dist, args.items)
        else:
            from bandit_service.store.database import make_engine
            from bandit_service.store.repository import iter_decisions
            from bandit_service.timeutil import parse_instant

            settings = Settings()
            policies = load_policies(settings.policies_dir)
            if args.policy not in policies:
                raise ValueError(f"unknown policy {args.policy!r} (known: {', '.join(policies)})")
            policy = policies[args.policy]
            policy_file = settings.policies_dir / f"{policy.name}.toml"
            since = parse_instant(args.since) if args.since else None
            until = parse_instant(args.until) if args.until else None
            db = make_engine(settings.database_url)
            rows = []
            for batch in iter_decisions(db, policy.name, since, until):
                rows.extend(ope.rows_from_decisions(batch, policy, stats))
                print(f"\r  read {stats.decisions} decisions", end="", file=sys.stderr)
            print(file=sys.stderr)
            db.dispose()
        if args.sweep or args.importance:
            return _ope_sweep(args, rows, policy_file if args.policy else None,
                              policy.vw_args if args.policy else args.vw_args)  # fmt: skip
        print(f"  evaluating {len(targets)} target(s) on {len(rows)} rows...", file=sys.stderr)
        results = ope.evaluate(
            rows, targets, args.estimators, args.replicates, args.seed, pages=args.pages
        )
    except ValueError as exc:
        print(f"bandit-service ope: {exc}", file=sys.stderr)
        return 2
    return _ope_output(args, results, stats)


def _ope_output(args: argparse.Namespace, results: list[Any], stats: Any) -> int:
    """The estimates as JSON or a table, and the chart if asked (both OPE paths)."""
    import json

    from bandit_service.ope import evaluate as ope

    if args.json:
        print(json.dumps({"log": vars(stats), "results": [r.as_dict() for r in results]},
                         indent=2))  # fmt: skip
    else:
        print(ope.format_table(results, stats))
    if args.plot:
        ope.plot(results, args.plot, "off-policy estimates with 95% bootstrap intervals")
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def _ope_stream(args: argparse.Namespace, specs: list[str], stats: Any) -> int:
    """Stream the log in chunks (bounded memory): ``--from-file`` CSV/Parquet, JSON lines,
    DSJSON, OBD or ``--policy``. Sweeps, importance, whole pages and an OBD position target
    read it into memory instead."""

    from bandit_service.ope import evaluate as ope
    from bandit_service.ope import stream, table
    from bandit_service.ope.vwfile import ProgressiveVWTarget

    db = None
    if args.from_file:
        if not table.is_table(args.from_file):
            raise ValueError(f"{args.from_file}: --from-file reads .csv or .parquet logs")
        source = table.table_source(args.from_file, stats)
    elif args.from_jsonl or args.from_dsjson or args.from_obd:
        from bandit_service.ope import files

        if args.from_jsonl:
            path = args.from_jsonl
            source = stream.rows_source(lambda counts: files.iter_jsonl(path, counts), stats)
        elif args.from_dsjson:
            path = args.from_dsjson
            source = stream.rows_source(lambda counts: files.iter_dsjson(path, counts), stats)
        else:
            if args.items is None:
                raise ValueError("--from-obd needs --items (80, 34 or 46 in the OBD sample)")
            path, items = args.from_obd, args.items
            source = stream.rows_source(lambda counts: ope.iter_obd(path, items, counts), stats)
    else:
        from bandit_service.store.database import make_engine
        from bandit_service.timeutil import parse_instant

        settings = Settings()
        policies = load_policies(settings.policies_dir)
        if args.policy not in policies:
            raise ValueError(f"unknown policy {args.policy!r} (known: {', '.join(policies)})")
        since = parse_instant(args.since) if args.since else None
        until = parse_instant(args.until) if args.until else None
        db = make_engine(settings.database_url)
        source = stream.store_source(db, policies[args.policy], since, until, stats)
    targets: dict[str, stream.StreamTarget] = {}
    for spec in specs:
        if not args.from_file and spec.startswith("explicit:"):
            raise ValueError(
                f"{spec}: explicit targets are read from a target_NAME column of a CSV or "
                "Parquet log given with --from-file"
            )
        target = stream.parse_stream_target(spec)
        if target is None:
            ope.parse_target(spec)  # the same checks (and errors) as the other sources
            target = ProgressiveVWTarget(spec[3:])
        targets[spec] = target

    def progress(what: str, done: int) -> None:
        print(f"\r  {what}: {done} rows   ", end="", file=sys.stderr, flush=True)

    try:
        results = stream.evaluate_stream(
            source,
            targets,
            args.estimators,
            args.replicates,
            args.seed,
            progress=progress,
            time_ordered=db is None,
        )
    finally:
        print(file=sys.stderr)
        if db is not None:
            db.dispose()
        for target in targets.values():
            if isinstance(target, ProgressiveVWTarget):
                target.close()
    return _ope_output(args, results, stats)


def _ope_sweep(
    args: argparse.Namespace, rows: list[Any], policy_file: Path | None, current: str | None
) -> int:
    import json

    from bandit_service.ope import sweep

    if not current:
        raise ValueError("--sweep and --importance need --policy, or --vw-args with a file")
    report: dict[str, Any] = {}
    if args.sweep:
        grid = sweep.parse_grid(args.grid) if args.grid else sweep.DEFAULT_GRID
        configs = sweep.configurations(current, grid)
        print(f"  sweeping {len(configs)} configuration(s) on {len(rows)} rows...",
              file=sys.stderr)  # fmt: skip
        report["sweep"] = sweep.sweep(rows, current, configs)
        recommended = report["sweep"]["recommended"]
        if recommended and policy_file is not None:
            out = Path(args.write_policy or f"{policy_file.stem}.recommended.toml")
            sweep.write_recommended_policy(policy_file, recommended["vw_args"], out)
            report["sweep"]["written_to"] = str(out)
    if args.sweep and args.plot:
        sweep.plot_sweep(report["sweep"], args.plot, "VW configurations ranked by DR")
        print(f"plot written to {args.plot}", file=sys.stderr)
    if args.importance:
        print("  leaving one namespace out at a time...", file=sys.stderr)
        report["importance"] = sweep.feature_importance(rows, current)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if "sweep" in report:
        result = report["sweep"]
        cur = result["current"]
        print(f"current: {cur['vw_args']}\n  DR {cur['dr']:.5f} "
              f"[{cur['interval_95'][0]:.5f}, {cur['interval_95'][1]:.5f}]")  # fmt: skip
        for entry in result["ranked"]:
            low, high = entry["interval_95"]
            print(f"  DR {entry['dr']:.5f} [{low:.5f}, {high:.5f}]  {entry['vw_args']}")
        chosen = result["recommended"]
        print(
            f"recommended: {chosen['vw_args']} (written to {result.get('written_to', '-')})"
            if chosen
            else "recommended: none (no interval's lower end beats the current estimate)"
        )
    for entry in report.get("importance", []):
        low, high = entry["interval_95"]
        print(f"namespaces {', '.join(entry['namespaces'])}: worth "
              f"{entry['value_of_namespace']:+.5f} [{low:+.5f}, {high:+.5f}]")  # fmt: skip
    return 0


def _check_policies(_args: argparse.Namespace) -> int:
    settings = Settings()
    for name, policy in load_policies(settings.policies_dir).items():
        print(f"{name}: version {policy.version}: {policy.vw_args}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _retention(_args: argparse.Namespace) -> int:
    """Run the retention job once (issue 10): for cron, or stores no server process serves."""
    from bandit_service.privacy import RetentionJob
    from bandit_service.store.database import make_engine

    settings = Settings()
    policies = load_policies(settings.policies_dir)
    engine = make_engine(settings.database_url)
    job = RetentionJob(engine, policies, whole_partitions=settings.retention_whole_partitions)
    results = job.run_once()
    engine.dispose()
    for r in results:
        print(f"{r.policy}: removed {r.decisions} decisions and {r.rewards} rewards created "
              f"before {r.cutoff:.0f} in {r.seconds:.2f}s")  # fmt: skip
    kept = sorted(name for name, p in policies.items() if p.retention_days <= 0)
    if kept:
        print(f"no retention_days (kept until deleted): {', '.join(kept)}")
    return 0


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bandit-service", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument(
        "--log-level",
        type=str.lower,
        choices=["debug", "info", "warning", "error", "critical"],
        help="default: BANDIT_LOG_LEVEL, else info",
    )
    serve.add_argument(
        "--access-log", action="store_true", help="log every request (BANDIT_ACCESS_LOG)"
    )
    serve.add_argument("--migrate", action="store_true", help="migrate the store to head first")
    serve.set_defaults(func=_serve)

    migrate = sub.add_parser("migrate", help="apply database migrations (default: to head)")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.add_argument("--down", action="store_true", help="downgrade to REVISION instead")
    migrate.set_defaults(func=_migrate)

    train = sub.add_parser(
        "train", help="run the trainer (when serve runs with BANDIT_TRAINER=off)"
    )
    train.add_argument("--policy", action="append", help="only this policy (repeatable)")
    train.add_argument("--once", action="store_true", help="learn what is ready now, then exit")
    train.add_argument(
        "--heartbeat", metavar="FILE", help="touch FILE every cycle (a liveness healthcheck)"
    )
    train.set_defaults(func=_train)

    report = sub.add_parser("report", help="reports from the decision log")
    report_sub = report.add_subparsers(dest="report", required=True)
    lift = report_sub.add_parser("lift", help="lift of the learned policy over the holdout")
    lift.add_argument("--policy", required=True)
    lift.add_argument("--since", help="ISO 8601 or UNIX seconds (default: the beginning)")
    lift.add_argument("--until", help="default: now minus the reward window")
    lift.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lift.add_argument("--plot", metavar="PNG", help="also write lift over time as a PNG")
    lift.add_argument("--replicates", type=_positive_int, default=2000, help="bootstrap replicates")
    lift.add_argument(
        "--period-seconds", type=float, default=86400.0, help="breadth period (default a day)"
    )
    lift.add_argument("--seed", type=int, default=0)
    lift.set_defaults(func=_report_lift)

    ope_parser = sub.add_parser("ope", help="off-policy evaluation of target policies")
    source = ope_parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--policy", help="evaluate on this policy's logged decisions")
    source.add_argument("--from-obd", metavar="CSV", help="an Open Bandit Dataset CSV")
    source.add_argument("--from-jsonl", metavar="FILE", help="the project's JSON-lines schema")
    source.add_argument("--from-dsjson", metavar="FILE", help="VW/Personalizer DSJSON")
    source.add_argument(
        "--from-file", metavar="FILE", help="the project's schema as .csv or .parquet (streamed)"
    )
    ope_parser.add_argument("--items", type=int, help="number of items (with --from-obd)")
    ope_parser.add_argument(
        "--target-distribution", metavar="CSV",
        help="with --from-obd: a target as item_id,position,probability rows",
    )  # fmt: skip
    ope_parser.add_argument("--since")
    ope_parser.add_argument("--until")
    ope_parser.add_argument(
        "--target", action="append",
        help="uniform | logging | popularity | vw:ARGS | explicit:NAME (the target_NAME "
        "column of a --from-file log); repeatable; default uniform",
    )  # fmt: skip
    ope_parser.add_argument(
        "--estimators", nargs="+", default=["IPS", "SNIPS", "DM", "DR", "SwitchDR"]
    )
    ope_parser.add_argument("--replicates", type=_positive_int, default=1000)
    ope_parser.add_argument("--seed", type=int, default=0)
    ope_parser.add_argument("--json", action="store_true")
    ope_parser.add_argument(
        "--pages", action="store_true", help="also whole-page IPS/SNIPS (multi-slot logs)"
    )
    ope_parser.add_argument("--sweep", action="store_true", help="rank a grid of VW configs")
    ope_parser.add_argument(
        "--grid", help='e.g. "epsilon=0.05,0.1 learning_rate=0.1,0.5 cb_type=mtr,dr '
        'interactions=ca;ca sa" (default: epsilon 0.05,0.2 x cb_type mtr,dr)',
    )  # fmt: skip
    ope_parser.add_argument("--write-policy", metavar="TOML", help="where a recommendation goes")
    ope_parser.add_argument("--importance", action="store_true",
                            help="leave one namespace out at a time")  # fmt: skip
    ope_parser.add_argument("--vw-args", help="the current configuration, for file sources")
    ope_parser.add_argument("--plot", metavar="PNG")
    ope_parser.set_defaults(func=_ope)

    retention = sub.add_parser(
        "retention", help="remove decisions and rewards older than each policy's retention_days"
    )
    retention.set_defaults(func=_retention)
    # -- simulate (issue #7): seeded scenarios and sweeps, see simulators/ --
    from simulators.cli import add_parser as add_simulate_parser

    add_simulate_parser(sub)
    # -- end simulate --

    check = sub.add_parser("check-policies", help="validate the policy files and print them")
    check.set_defaults(func=_check_policies)

    keys = sub.add_parser("keys", help="API keys: create, hash, list (see docs/security.md)")
    keys_sub = keys.add_subparsers(dest="keys", required=True)
    create = keys_sub.add_parser("create", help="print a new key and its key-file entry")
    create.add_argument("--name", required=True, help="shown in errors and logs")
    create.add_argument(
        "--scope", action="append", required=True, choices=["decide", "read", "admin"],
        help="repeatable",
    )  # fmt: skip
    create.add_argument("--policy", action="append", help="restrict to this policy (repeatable)")
    create.add_argument("--rate", type=float, help="requests per second (per process)")
    create.add_argument("--burst", type=_positive_int, help="token bucket size")
    create.add_argument("--json", action="store_true", help="print {key, entry} as JSON")
    create.set_defaults(func=_keys_create)
    hash_parser = keys_sub.add_parser("hash", help="hash a key read from stdin")
    hash_parser.set_defaults(func=_keys_hash)
    list_parser = keys_sub.add_parser("list", help="check and list the configured keys")
    list_parser.set_defaults(func=_keys_list)
    from bandit_service.personalizer.cli import add_import_parser

    add_import_parser(sub)  # import dsjson (Personalizer migration)
    return parser


def main(argv: list[str] | None = None) -> int:
    from bandit_service.ops import logs

    level = os.environ.get("BANDIT_LOG_LEVEL", "info").lower()
    logs.configure(level if level in logs.LEVELS else "info")  # Settings() reports a bad one
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except PolicyError as exc:
        print(f"bandit-service: policy error: {exc}", file=sys.stderr)
        return 2
    except KeyConfigError as exc:
        print(f"bandit-service: API key configuration: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
