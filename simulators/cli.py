"""``bandit-service simulate``: run a scenario over a sweep of settings and seeds.

Examples::

    bandit-service simulate --scenario drift --steps 20000 \\
        --sweep epsilon=0,0.05,0.1,0.2 --seeds 3 --out runs/drift
    bandit-service simulate --scenario clickbait --sweep objective=click,satisfaction
    bandit-service simulate --scenario steady --print-policy > policies/sim.toml
    bandit-service simulate --scenario steady --mode http --url http://127.0.0.1:8080 \\
        --sweep policy=sim --steps 2000 --seeds 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from simulators.scenarios import SCENARIOS, World

HTTP_SWEEP_KEYS = {"policy", "objective"}


def add_parser(sub: Any) -> None:
    """Register ``simulate`` on the main CLI's sub-parsers."""
    sim = sub.add_parser(
        "simulate",
        help="run a seeded scenario over a sweep of policy settings (in-process or HTTP)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sim.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    sim.add_argument("--steps", type=_positive, default=20000, help="visits per run")
    sim.add_argument(
        "--sweep", action="append", default=[], metavar="KEY=V1,V2",
        help="a policy field and its values (repeatable: the grid is the product); keys: "
        "epsilon, algorithm, vw_args, exploration_share, exploration_slots, "
        "exploration_distribution, holdout_share, objective, any policy key; http: policy",
    )  # fmt: skip
    sim.add_argument("--seeds", type=_positive, default=3, help="seeds 0..N-1 (default 3)")
    sim.add_argument("--first-seed", type=int, default=0)
    sim.add_argument("--window", type=_positive, help="steps per metrics window (steps/40)")
    sim.add_argument("--out", type=Path, help="output folder (default runs/SCENARIO)")
    sim.add_argument("--no-plots", action="store_true", help="CSV and JSON only")
    sim.add_argument("--json", action="store_true", help="print the summary JSON, not a table")
    sim.add_argument("--mode", choices=["inprocess", "http"], default="inprocess")
    sim.add_argument("--url", default="http://127.0.0.1:8080", help="service (http mode)")
    sim.add_argument(
        "--api-key", default=os.environ.get("BANDIT_API_KEY"),
        help="key with the decide and read scopes (http mode; default: $BANDIT_API_KEY)",
    )  # fmt: skip
    sim.add_argument("--policy", default="default", help="service policy (http mode)")
    sim.add_argument("--concurrency", type=_positive, default=16, help="http mode")
    sim.add_argument(
        "--print-policy", action="store_true",
        help="print the scenario's base policy as TOML (for a service in http mode) and exit",
    )  # fmt: skip
    sim.set_defaults(func=simulate)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def simulate(args: argparse.Namespace) -> int:
    from simulators.http import HttpSimulationError
    from simulators.scenarios import make_scenario
    from simulators.sweep import (
        Progress,
        SweepError,
        format_table,
        parse_sweep,
        run_sweep,
        write_outputs,
    )

    if args.print_policy:
        print(policy_toml(make_scenario(args.scenario, args.first_seed, args.steps)), end="")
        return 0
    try:
        settings = parse_sweep(args.sweep)
        if args.mode == "http":
            bad = {k for s in settings for k, _v in s.overrides} - HTTP_SWEEP_KEYS
            if bad:
                raise SweepError(
                    f"in http mode the service's policies are fixed; sweep "
                    f"{', '.join(sorted(HTTP_SWEEP_KEYS))} only (got {', '.join(sorted(bad))}): "
                    "write one policy file per setting and sweep policy=NAME1,NAME2"
                )
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        window = args.window or max(1, args.steps // 40)
        total = len(settings) * len(seeds) * args.steps
        progress = Progress(total, f"{args.scenario} ({args.mode})")
        run = _http_run(args, window) if args.mode == "http" else _inprocess_run(args, window)
        try:
            result = run_sweep(
                args.scenario, settings, args.steps, seeds, window, run, args.mode, progress
            )
        finally:
            progress.close()
    except (SweepError, HttpSimulationError) as exc:
        print(f"bandit-service simulate: {exc}", file=sys.stderr)
        return 2
    out = args.out or Path("runs") / args.scenario
    written = write_outputs(result, out, plots=not args.no_plots)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(format_table(result))
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


def _inprocess_run(args: argparse.Namespace, window: int) -> Any:
    from simulators.inprocess import run_inprocess
    from simulators.sweep import Setting, apply_setting

    def run(world: World, setting: Setting, seed: int, tick: Any) -> Any:
        policy = apply_setting(world.policy, setting)
        result = run_inprocess(world, policy, args.steps, seed, window, setting.objective, tick)
        summary = dict(result.summary)
        summary["policy"] = {"vw_args": policy.vw_args, "version": policy.version,
                             "holdout_share": policy.holdout_share,
                             "rules": _rules(policy)}  # fmt: skip
        return result.windows, summary

    return run


def _http_run(args: argparse.Namespace, window: int) -> Any:
    from simulators.http import run_http
    from simulators.sweep import Setting

    def run(world: World, setting: Setting, seed: int, tick: Any) -> Any:
        result = run_http(
            world, args.url, setting.policy_name or args.policy, args.steps, seed, window,
            setting.objective, args.concurrency, progress=tick, api_key=args.api_key,
        )  # fmt: skip
        return result.windows, result.summary

    return run


def _rules(policy: Any) -> dict[str, Any]:
    r = policy.rules
    return {
        "exploration_share": r.exploration_share,
        "exploration_positions": list(r.exploration_positions),
        "exploration_distribution": r.exploration_distribution,
    }


def policy_toml(world: World) -> str:
    """The scenario's base policy as a policy file (reward window in seconds: shorten it for
    a live run, the HTTP runner scales the scenario's delays to whatever it is)."""
    lines = [f"# Base policy of the {world.name!r} simulator scenario: {world.description}"]
    tables: list[str] = []
    for key, value in world.policy.items():
        if isinstance(value, dict):
            if value:
                tables.append(f"\n[{key}]")
                tables.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join([*lines, *tables]) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))
