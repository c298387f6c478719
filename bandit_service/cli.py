"""``bandit-service``: serve | migrate | train | check-policies."""

from __future__ import annotations

import argparse
import logging
import sys

from bandit_service.config import Settings
from bandit_service.policy import PolicyError, load_policies


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = Settings()
    load_policies(settings.policies_dir)  # fail here, once, with a clear message
    if args.migrate:
        _migrate(args)
    uvicorn.run(
        "bandit_service.app:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        access_log=args.access_log,
    )
    return 0


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
    trainer.run_forever(stop, settings.train_interval_seconds)
    log.info("trainer %s stopped", trainer.owner)
    return 0


def _check_policies(_args: argparse.Namespace) -> int:
    settings = Settings()
    for name, policy in load_policies(settings.policies_dir).items():
        print(f"{name}: version {policy.version}: {policy.vw_args}")
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
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--access-log", action="store_true", help="log every request")
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
    train.set_defaults(func=_train)

    check = sub.add_parser("check-policies", help="validate the policy files and print them")
    check.set_defaults(func=_check_policies)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except PolicyError as exc:
        print(f"bandit-service: policy error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
