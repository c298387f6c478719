"""PNG plots of a sweep: reward and cumulative regret per setting (mean with a band of
± one standard deviation across seeds), and breadth (and satisfaction) over time."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from simulators.sweep import SweepResult


def _series(result: SweepResult, key: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """setting -> (steps, values[seed, window]) for one window column."""
    by_setting: dict[str, dict[int, list[tuple[int, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for row in result.windows:
        value = row.get(key)
        by_setting[row["setting"]][row["seed"]].append(
            (row["step"], float("nan") if value is None else float(value))
        )
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for setting, seeds in by_setting.items():
        length = min(len(v) for v in seeds.values())
        steps = np.array([s for s, _ in next(iter(seeds.values()))[:length]])
        values = np.array([[v for _, v in rows[:length]] for rows in seeds.values()])
        out[setting] = (steps, values)
    return out


def _panel(ax: Any, result: SweepResult, key: str, title: str, smooth: int = 1) -> None:
    for setting, (steps, values) in _series(result, key).items():
        if smooth > 1 and values.shape[1] >= smooth:
            kernel = np.ones(smooth) / smooth
            values = np.array([np.convolve(v, kernel, mode="valid") for v in values])
            steps = steps[smooth - 1 :]
        mean = np.nanmean(values, axis=0)
        sd = np.nanstd(values, axis=0, ddof=1) if values.shape[0] > 1 else np.zeros_like(mean)
        (line,) = ax.plot(steps, mean, label=setting, linewidth=1.2)
        ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.2, lw=0)
    change = result.scenario.get("change_step")
    if change is not None:
        ax.axvline(change, color="grey", linestyle=":", linewidth=1)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def plot_sweep(result: SweepResult, out: Path) -> list[Path]:
    """``curves.png`` (reward per visit and cumulative regret) and ``breadth.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = result.scenario.get("name", "?")
    seeds = len(result.seeds)
    windows = max(1, result.steps // result.window)
    smooth = 3 if windows >= 30 else 1
    written = []

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    _panel(left, result, "expected_reward", "expected reward per visit", smooth)
    oracle = _series(result, "oracle_reward")
    if oracle:
        steps, values = next(iter(oracle.values()))
        left.plot(steps, np.nanmean(values, axis=0), color="black", lw=0.8, ls="--",
                  label="oracle")  # fmt: skip
    _panel(right, result, "cumulative_regret", "cumulative regret vs oracle")
    left.legend(fontsize=7)
    fig.suptitle(f"{name}: mean ± 1 sd over {seeds} seed(s)", fontsize=10)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)

    has_sat = bool(result.scenario.get("has_satisfaction"))
    fig, axes = plt.subplots(1, 2 if has_sat else 1, figsize=(9 if has_sat else 5, 3.4), dpi=80)
    axes_list = list(axes) if has_sat else [axes]
    _panel(axes_list[0], result, "breadth", "breadth of consumption (effective categories)",
           smooth)  # fmt: skip
    if has_sat:
        _panel(axes_list[1], result, "satisfaction_rate", "satisfied clicks per visit", smooth)
    axes_list[0].legend(fontsize=7)
    fig.suptitle(f"{name}: mean ± 1 sd over {seeds} seed(s)", fontsize=10)
    fig.tight_layout()
    path = out / "breadth.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    return written
