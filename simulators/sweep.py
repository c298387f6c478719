"""Sweeps: a grid of policy settings x seeds, run in-process or over HTTP, written to disk.

A sweep names policy fields and their values, ``epsilon=0,0.05,0.1 holdout_share=0,0.1``;
the grid is their Cartesian product. Each setting is applied to the scenario's base policy
(a TOML-shaped table) and then validated by the service's own policy parser, so a sweep
can only produce policies the service would accept. Keys:

* ``epsilon``: the ``--epsilon`` of ``vw_args``;
* ``algorithm``: the exploration algorithm in ``vw_args``: ``epsilon`` (keeps the rate),
  ``greedy`` (``--epsilon 0``), ``squarecb``, ``regcbopt``, ``softmax`` (``--lambda``
  stays VW's default), ``cover`` (``--cover 4``);
* ``vw_args``: the whole argument string;
* ``exploration_share``, ``exploration_distribution``, ``exploration_slots`` (alias
  ``exploration_positions``; slot indices joined by ``;``, or ``none``): the policy's
  ``[rules]``; any ``rules.<key>`` likewise;
* ``objective``: ``click`` or ``satisfaction``, which signal the simulated product sends
  as the learned (``primary``) reward; the other is sent under its own ``kind``;
* in HTTP mode, ``policy``: the service's policy names to drive, one per setting;
* any other top-level policy key (``holdout_share``, ``reward_window_seconds``, ...).
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from bandit_service.policy import PolicyConfig, parse_policy, without_options
from simulators.metrics import WINDOW_COLUMNS
from simulators.scenarios import OBJECTIVES, Objective, World, make_scenario

_EXPLORATION_OPTIONS = {
    "--epsilon", "--squarecb", "--regcbopt", "--regcb", "--softmax", "--cover", "--bag",
    "--first", "--gamma_scale", "--gamma_exponent", "--lambda", "--synthcover",
}  # fmt: skip
ALGORITHMS = ("epsilon", "greedy", "squarecb", "regcbopt", "softmax", "cover")
_RULE_KEYS = {"exploration_share", "exploration_distribution", "exploration_positions"}
SIM_POLICY = "sim"


class SweepError(ValueError):
    """A sweep specification is invalid; the message names the key."""


@dataclass(frozen=True)
class Setting:
    """One point of the grid: the overrides, in the order the sweep named them."""

    overrides: tuple[tuple[str, str], ...]

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.overrides) or "base"

    @property
    def objective(self) -> Objective:
        value = dict(self.overrides).get("objective", "click")
        assert value in OBJECTIVES
        return value

    @property
    def policy_name(self) -> str | None:
        return dict(self.overrides).get("policy")


def parse_sweep(specs: Sequence[str]) -> list[Setting]:
    """``["epsilon=0,0.1", "holdout_share=0,0.1"]`` -> the 4 settings of their product."""
    axes: list[list[tuple[str, str]]] = []
    seen: set[str] = set()
    for spec in specs:
        for part in shlex.split(spec) if " " in spec and "vw_args=" not in spec else [spec]:
            key, sep, values = part.partition("=")
            key = key.strip()
            if not sep or not key or not values.strip():
                raise SweepError(f"sweep {part!r}: expected KEY=VALUE[,VALUE...]")
            if key in seen:
                raise SweepError(f"sweep key {key!r} given twice")
            seen.add(key)
            items = [v.strip() for v in values.split(",")]
            if any(not v for v in items):
                raise SweepError(f"sweep {key}: empty value in {values!r}")
            if key == "objective" and set(items) - set(OBJECTIVES):
                raise SweepError(f"sweep objective: values must be {' or '.join(OBJECTIVES)}")
            if key == "algorithm" and set(items) - set(ALGORITHMS):
                raise SweepError(f"sweep algorithm: values must be among {', '.join(ALGORITHMS)}")
            axes.append([(key, v) for v in items])
    return [Setting(tuple(combo)) for combo in itertools.product(*axes)]


def _number(text: str) -> int | float | str:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _set_vw(vw_args: str, options: set[str], extra: list[str]) -> str:
    return " ".join([*without_options(shlex.split(vw_args), options), *extra])


def apply_setting(base: dict[str, Any], setting: Setting, name: str = SIM_POLICY) -> PolicyConfig:
    """The scenario's base policy with ``setting`` applied, validated like a policy file."""
    raw = copy.deepcopy(base)
    raw.setdefault("rules", {})
    for key, value in setting.overrides:
        if key in ("objective", "policy"):
            continue
        if key == "epsilon":
            raw["vw_args"] = _set_vw(raw["vw_args"], {"--epsilon"}, ["--epsilon", value])
        elif key == "algorithm":
            rate = _current_epsilon(raw["vw_args"])
            extra = {
                "epsilon": ["--epsilon", rate], "greedy": ["--epsilon", "0"],
                "squarecb": ["--squarecb"], "regcbopt": ["--regcbopt"],
                "softmax": ["--softmax"], "cover": ["--cover", "4"],
            }[value]  # fmt: skip
            raw["vw_args"] = _set_vw(raw["vw_args"], _EXPLORATION_OPTIONS, extra)
        elif key == "vw_args":
            raw["vw_args"] = value
        elif key in ("exploration_slots", "exploration_positions"):
            raw["rules"]["exploration_positions"] = (
                [] if value == "none" else [_int(p, key) for p in value.split(";")]
            )
        elif key in _RULE_KEYS or key.startswith("rules."):
            raw["rules"][key.removeprefix("rules.")] = _number(value)
        else:
            raw[key] = value if key in ("vw_args", "description") else _number(value)
    if not raw["rules"]:
        del raw["rules"]
    try:
        return parse_policy(name, raw, where=f"sweep setting {setting.label!r}")
    except ValueError as exc:  # PolicyError: unknown key, bad range, bad vw_args
        raise SweepError(str(exc)) from None


def _int(text: str, key: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SweepError(f"sweep {key}: {text!r} is not a slot index") from None


def _current_epsilon(vw_args: str) -> str:
    tokens = shlex.split(vw_args)
    for i, token in enumerate(tokens):
        if token == "--epsilon" and i + 1 < len(tokens):
            return tokens[i + 1]
        if token.startswith("--epsilon="):
            return token.split("=", 1)[1]
    return "0.05"


class Progress:
    """A one-line progress bar on stderr (rewritten in place), with an ETA."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total, self.label, self.done = max(1, total), label, 0
        self.stream = stream if stream is not None else sys.stderr
        self.started = self._last = time.monotonic()
        self.note = ""
        # On a terminal, redraw 4 times a second; in a log file, a line every 10 seconds.
        self.interval = 0.25 if self.stream.isatty() else 10.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval or self.done >= self.total:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        share = min(1.0, self.done / self.total)
        bar = "#" * int(30 * share) + "." * (30 - int(30 * share))
        elapsed = now - self.started
        eta = elapsed / share - elapsed if share > 0 else float("nan")
        eta_text = f"{int(eta // 60)}m{int(eta % 60):02d}s" if math.isfinite(eta) else "?"
        self.stream.write(f"\r  {self.label} [{bar}] {share:4.0%} {self.done}/{self.total} "
                          f"steps, ETA {eta_text} {self.note}\x1b[K")  # fmt: skip
        self.stream.flush()

    def close(self) -> None:
        self._draw(time.monotonic())
        self.stream.write("\n")
        self.stream.flush()


RunFn = Callable[[World, Setting, int, Callable[[int], None]], tuple[list[dict[str, Any]],
                                                                       dict[str, Any]]]  # fmt: skip


@dataclass
class SweepResult:
    scenario: dict[str, Any]
    steps: int
    window: int
    seeds: list[int]
    mode: str
    settings: list[dict[str, Any]] = field(default_factory=list)
    windows: list[dict[str, Any]] = field(default_factory=list)  # every (setting, seed) row

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "steps": self.steps,
            "window": self.window,
            "seeds": self.seeds,
            "mode": self.mode,
            "settings": self.settings,
        }


def run_sweep(
    scenario: str,
    settings: Sequence[Setting],
    steps: int,
    seeds: Sequence[int],
    window: int,
    run: RunFn,
    mode: str = "inprocess",
    progress: Progress | None = None,
) -> SweepResult:
    """Run every setting with every seed; the world depends on the seed only, so every
    setting faces the same users, catalog and coin flips for a given seed."""
    result = SweepResult({}, steps, window, list(seeds), mode)
    for index, setting in enumerate(settings):
        runs: list[dict[str, Any]] = []
        policy_info: dict[str, Any] | None = None
        for seed in seeds:
            world = make_scenario(scenario, seed, steps)
            result.scenario = world.summary()
            if progress is not None:
                progress.note = f"[{setting.label} | seed {seed} | {index + 1}/{len(settings)}]"
            rows, summary = run(world, setting, seed, progress.update if progress else _noop)
            policy_info = summary.pop("policy", policy_info)
            runs.append({"seed": seed, **summary})
            result.windows.extend({"setting": setting.label, "seed": seed, **row} for row in rows)
        result.settings.append(
            {
                "setting": setting.label,
                "overrides": dict(setting.overrides),
                "objective": setting.objective,
                "policy": policy_info,
                "mean": _across(runs, _mean),
                "sd": _across(runs, _sd),
                "runs": runs,
            }
        )
    _paired_differences(result.settings)
    return result


PAIRED_KEYS = (
    "expected_reward", "last_quarter_expected_reward", "expected_reward_after_change",
    "cumulative_regret", "click_rate", "satisfaction_rate", "breadth",
)  # fmt: skip


def _paired_differences(settings: list[dict[str, Any]]) -> None:
    """Each setting minus the first, seed by seed. Settings with the same seed face the
    same users and coin flips, so the paired difference is far less noisy than the
    difference of the means (whose sd includes how lucky each seed's world was)."""
    if len(settings) < 2:
        return
    first = {r["seed"]: r for r in settings[0]["runs"]}
    for setting in settings[1:]:
        diffs: dict[str, Any] = {}
        for key in PAIRED_KEYS:
            values = [
                r[key] - first[r["seed"]][key]
                for r in setting["runs"]
                if isinstance(r.get(key), int | float)
                and isinstance(first.get(r["seed"], {}).get(key), int | float)
            ]
            if values:
                diffs[key] = {"mean": _mean(values), "sd": _sd(values), "min": min(values),
                              "max": max(values)}  # fmt: skip
        setting["minus_first"] = {"first": settings[0]["setting"], **diffs}


def _noop(_n: int) -> None:
    return None


def _across(runs: list[dict[str, Any]], fn: Callable[[list[float]], float]) -> dict[str, Any]:
    keys = [k for k in runs[0] if k != "seed"]
    out: dict[str, Any] = {}
    for key in keys:
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        out[key] = fn([float(v) for v in values]) if len(values) == len(runs) else None
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _sd(values: list[float]) -> float:
    """Sample standard deviation across seeds (0 for one seed)."""
    if len(values) < 2:
        return 0.0
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def write_outputs(result: SweepResult, out: Path, plots: bool = True) -> list[Path]:
    """``windows.csv``, ``summary.json`` and (unless ``plots`` is false) PNGs in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "windows.csv", out / "summary.json"]
    with open(written[0], "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["setting", "seed", *WINDOW_COLUMNS])
        writer.writeheader()
        for row in result.windows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    written[1].write_text(json.dumps(result.as_dict(), indent=2) + "\n", encoding="utf-8")
    if plots:
        from simulators.plots import plot_sweep

        written.extend(plot_sweep(result, out))
    return written


def format_table(result: SweepResult) -> str:
    """The summary as a table: mean ± sd across seeds per setting."""
    columns = [
        ("oracle_reward", "oracle"),
        ("expected_reward", "reward/visit"),
        ("last_quarter_expected_reward", "last 1/4"),
        ("cumulative_regret", "regret"),
        ("exploration_share", "explored"),
        ("breadth", "breadth"),
    ]
    if result.scenario.get("change_step") is not None:
        columns[2:2] = [
            ("expected_reward_before_change", "before change"),
            ("expected_reward_after_change", "after change"),
        ]
    if result.scenario.get("has_satisfaction"):
        columns += [("click_rate", "clicks/visit"), ("satisfaction_rate", "satisfied/visit")]
    if any(s["mean"].get("lift") is not None for s in result.settings):
        columns.append(("lift", "lift"))
    width = max(12, *(len(s["setting"]) for s in result.settings))
    head = f"{'setting':<{width}}" + "".join(f"  {title:>18}" for _k, title in columns)
    lines = [
        f"scenario {result.scenario.get('name')}: {result.steps} steps x {len(result.seeds)} "
        f"seed(s), {result.mode}; expected primary reward per visit (mean ± sd over seeds)",
        head,
    ]
    for s in result.settings:
        cells = []
        for key, _title in columns:
            m, sd = s["mean"].get(key), s["sd"].get(key)
            cells.append(f"{m:10.4f} ± {sd:<6.4f}" if m is not None else f"{'-':>19}")
        lines.append(f"{s['setting']:<{width}}" + "".join(f"  {c:>18}" for c in cells))
    if len(result.settings) > 1:
        keys = [k for k, _t in columns if k in PAIRED_KEYS]
        lines.append(f"minus {result.settings[0]['setting']}, paired by seed: mean [min, max]")
        for s in result.settings[1:]:
            cells = []
            for key in keys:
                d = s.get("minus_first", {}).get(key)
                cells.append(
                    f"{d['mean']:+.4f} [{d['min']:+.3f},{d['max']:+.3f}]" if d else f"{'-':>18}"
                )
            lines.append(f"{s['setting']:<{width}}" + "".join(f"  {c:>26}" for c in cells))
        header = "".join(f"  {t:>26}" for k, t in columns if k in PAIRED_KEYS)
        lines.insert(-(len(result.settings) - 1), " " * width + header)
    return "\n".join(lines)
