"""Which VW configuration would have done better? A grid, ranked by DR, gated by its
interval; and which namespaces matter (leave one out).

Every configuration is evaluated progressively on the same logged rows (predict each row,
then learn it), with the same cross-fitted reward model, so estimates are paired row by
row. A configuration is *recommended* only when the lower end of its DR interval (normal,
95%) beats the current configuration's DR estimate; it is then written as a new policy
file for a person to review, never applied to the running service.

Feature importance: the current configuration with one namespace ignored (``--ignore``);
the change in DR value is reported with a paired 95% interval (the per-row DR terms of the
two configurations, differenced), so "the namespace helps" means the interval is above 0.
"""

from __future__ import annotations

import itertools
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bandit_service.ope.estimators import DR, Z95
from bandit_service.ope.evaluate import Prepared, SlotRow, parse_target
from bandit_service.policy import without_options

# grid key -> the VW option it sets (interactions: a space-separated list of crosses)
GRID_OPTIONS = {
    "epsilon": "--epsilon",
    "learning_rate": "-l",
    "cb_type": "--cb_type",
    "interactions": "-q",
}
DEFAULT_GRID = {
    "epsilon": ["0.05", "0.2"],
    "cb_type": ["mtr", "dr"],
}
_REPLACED = {"--epsilon", "-l", "--learning_rate", "--cb_type", "-q", "--quadratic",
             "--interactions"}  # fmt: skip


def parse_grid(text: str) -> dict[str, list[str]]:
    """``"epsilon=0.05,0.1 cb_type=mtr,dr interactions=ca;ca sa"`` -> a grid."""
    grid: dict[str, list[str]] = {}
    entries = list(re.finditer(r"(\S+?)=(.*?)(?=\s+\S+?=|\s*$)", text.strip()))
    if not entries:
        raise ValueError(f"grid entries are KEY=V1,V2 with KEY one of {sorted(GRID_OPTIONS)}")
    for entry in entries:
        key, values = entry.group(1), entry.group(2).strip()
        if key not in GRID_OPTIONS or not values:
            raise ValueError(f"grid entries are KEY=V1,V2 with KEY one of {sorted(GRID_OPTIONS)}")
        separator = ";" if key == "interactions" else ","
        grid[key] = [v.strip() for v in values.split(separator)]
    return grid


def configurations(base: str, grid: Mapping[str, Sequence[str]]) -> list[str]:
    """Every combination of the grid applied to ``base`` (options the grid sets replace
    the base's own)."""
    keys = list(grid)
    replaced = {GRID_OPTIONS[k] for k in keys}
    if "interactions" in grid:
        replaced |= {"-q", "--quadratic", "--interactions"}
    if "learning_rate" in grid:
        replaced |= {"-l", "--learning_rate"}
    kept = without_options(shlex.split(base), replaced & _REPLACED)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        extra: list[str] = []
        for key, value in zip(keys, values, strict=True):
            if key == "interactions":
                extra += [f"-q {cross}" for cross in value.split() if value != "none"]
            else:
                extra.append(f"{GRID_OPTIONS[key]} {value}")
        out.append(" ".join([*kept, *extra]))
    return list(dict.fromkeys(out))


def _dr(prepared: Prepared, vw_args: str) -> tuple[float, float, np.ndarray]:
    terms = DR().terms(prepared.data(parse_target(f"vw:{vw_args}")))
    se = float(np.std(terms, ddof=1) / math.sqrt(len(terms))) if len(terms) > 1 else math.inf
    return float(terms.mean()), se, terms


def sweep(rows: Sequence[SlotRow], current: str, candidates: Sequence[str]) -> dict[str, Any]:
    prepared = Prepared(rows)
    base_value, base_se, _ = _dr(prepared, current)
    ranked: list[dict[str, Any]] = []
    for args in candidates:
        value, se, _ = _dr(prepared, args)
        ranked.append({"vw_args": args, "dr": value,
                       "interval_95": [value - Z95 * se, value + Z95 * se]})  # fmt: skip
    ranked.sort(key=lambda r: -r["dr"])
    better = [r for r in ranked if r["vw_args"] != current and r["interval_95"][0] > base_value]
    return {
        "current": {"vw_args": current, "dr": base_value,
                    "interval_95": [base_value - Z95 * base_se, base_value + Z95 * base_se]},
        "ranked": ranked,
        "recommended": better[0] if better else None,
        "rule": "recommended only if the lower end of its DR interval beats the current DR",
    }  # fmt: skip


def namespaces_of(rows: Sequence[SlotRow]) -> list[str]:
    """Namespace names the rows use (flat features: context, action, slot)."""
    names: set[str] = {"slot"}
    for row in rows[:200]:
        for space, default in ((row.context, "context"), (row.slot_features, "slot")):
            names |= {k if isinstance(v, Mapping) else default for k, v in space.items()}
        for candidate in row.eligible:
            names.add("action")
            names |= {k for k, v in candidate.features.items() if isinstance(v, Mapping)}
    return sorted(names)


def feature_importance(rows: Sequence[SlotRow], current: str) -> list[dict[str, Any]]:
    prepared = Prepared(rows)
    base, _se, base_terms = _dr(prepared, current)
    by_letter: dict[str, list[str]] = {}
    for name in namespaces_of(prepared.rows):
        by_letter.setdefault(name[0], []).append(name)
    out = []
    for letter, names in sorted(by_letter.items()):
        value, _se, terms = _dr(prepared, f"{current} --ignore {letter}")
        diff = base_terms - terms
        se = float(np.std(diff, ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.inf
        change = base - value
        out.append({"namespaces": names, "ignored_letter": letter, "dr_without": value,
                    "value_of_namespace": change,
                    "interval_95": [change - Z95 * se, change + Z95 * se]})  # fmt: skip
    return out


def write_recommended_policy(source: Path, vw_args: str, target: Path) -> None:
    """Copy a policy file with a new ``vw_args`` (comments and rules kept), validated."""
    from bandit_service.policy import load_policy_file

    text = source.read_text(encoding="utf-8")
    line = f"vw_args = {_toml_string(vw_args)}"
    pattern = re.compile(r"^vw_args\s*=.*$", re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _m: line, text, count=1)
    else:
        text = f"{line}\n{text}"
    header = f"# Recommended by `bandit-service ope --sweep` from {source.name}; review it.\n"
    target.write_text(header + text, encoding="utf-8")
    load_policy_file(target)  # fails loudly if the result is not a valid policy


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def plot_sweep(report: Mapping[str, Any], path: str | Path, title: str = "") -> None:
    """A PNG of the sweep: each configuration's DR estimate with its 95% interval (best at
    the top), the current configuration's estimate as a vertical reference line (its
    interval shaded), and the recommended configuration, if any, in another colour. A bar
    entirely right of the line is what a recommendation needs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    current = report["current"]
    ranked = list(report["ranked"])
    recommended = (report.get("recommended") or {}).get("vw_args")
    labels = [_short(r["vw_args"]) for r in ranked]
    values = np.asarray([r["dr"] for r in ranked])
    lows = values - np.asarray([r["interval_95"][0] for r in ranked])
    highs = np.asarray([r["interval_95"][1] for r in ranked]) - values
    height = max(2.5, 0.45 * len(ranked) + 1.5)
    fig, ax = plt.subplots(figsize=(9, height))
    positions = np.arange(len(ranked))[::-1]
    colours = [
        "tab:green" if r["vw_args"] == recommended
        else "tab:gray" if r["vw_args"] == current["vw_args"]
        else "tab:blue"
        for r in ranked
    ]  # fmt: skip
    for y, v, lo, hi, colour in zip(positions, values, lows, highs, colours, strict=True):
        ax.errorbar(v, y, xerr=[[lo], [hi]], fmt="o", capsize=4, color=colour)
    ax.axvline(current["dr"], color="tab:red", linestyle="--",
               label=f"current: DR {current['dr']:.4f}")  # fmt: skip
    ax.axvspan(*current["interval_95"], color="tab:red", alpha=0.08, label="current 95% interval")
    ax.set_yticks(positions, labels, fontsize=7)
    ax.set_xlabel("DR estimate of the value per slot (95% interval)")
    verdict = f"recommended: {_short(recommended)}" if recommended else "no recommendation"
    ax.set_title(f"{title}\n{verdict}" if title else verdict, fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(vw_args: str | None, width: int = 70) -> str:
    text = (vw_args or "").replace("--cb_explore_adf", "").strip() or "(defaults)"
    return text if len(text) <= width else text[: width - 1] + "…"
