"""Training-curve plots of a run, drawn from its `metrics.jsonl` (see `zerosearch_jax.metrics`).

    python -m zerosearch_jax.plot --workdir runs/nq_hotpot_grpo [--out DIR]

writes into `<workdir>/plots/` (or DIR):
  - `training_curves.png`: a grid with the panels of every metric group the run logged;
  - `<group>.png`: the panels of one group (reward, validation, curriculum, search,
    response_length, optimization, throughput), for reports.
and prints the paths. Groups with no logged key, and keys whose values are all null (NaN), are
left out. Each curve is the raw series, plus a moving average when it has more than
`_SMOOTH_MIN_POINTS` points; x is the training step.

Most groups are one panel. Validation is one panel per metric (f1, cover_em, ...), each with the
overall and per-data-source curves, and optimization is one panel per key, because a KL loss of
1e-3 and a gradient norm of 10 on one axis would leave the KL flat at zero.

Figures are built with `matplotlib.figure.Figure` and saved by the Agg renderer, not through
pyplot, so plotting neither needs a display nor changes the backend of a notebook importing this.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from zerosearch_jax.metrics import INTERVAL_BOUNDS, metrics_path, read_metrics

GRID_FILE = "training_curves.png"
PLOTS_DIR = "plots"
_SMOOTH_MIN_POINTS = 10  # shorter series are drawn raw, with markers
_GRID_COLUMNS = 3
_PANEL_SIZE = (5.0, 3.5)  # inches
_DPI = 110


class EmptyMetricsError(ValueError):
    """The metrics file has no rows, or nothing that any metric group plots."""


Panel = tuple[str, list[str]]  # (title, metric keys drawn in it)


@dataclasses.dataclass(frozen=True)
class MetricGroup:
    """A family of metrics drawn together; `split`, if set, names the panel a key goes to."""

    name: str  # file stem of the group's own figure
    title: str
    patterns: tuple[str, ...]  # fnmatch patterns over metric keys; "*" also matches "/"
    split: Callable[[str], str] | None = None

    def matches(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in self.patterns)

    def panels(self, keys: Sequence[str]) -> list[Panel]:
        # A score's interval bounds (`val/f1_lo`, `val/f1_hi`) are drawn as its band, not as
        # curves of their own.
        keys = [k for k in keys if not k.endswith(INTERVAL_BOUNDS)]
        if self.split is None:
            return [(self.title, list(keys))]
        by_panel: dict[str, list[str]] = {}
        for key in keys:
            by_panel.setdefault(self.split(key), []).append(key)
        return [(f"{self.title}: {name}", members) for name, members in by_panel.items()]


GROUPS: tuple[MetricGroup, ...] = (
    MetricGroup("reward", "Reward", ("reward/*",)),
    # val/f1 (all sources) and val/<source>/f1 share the panel "f1".
    MetricGroup("validation", "Validation", ("val/*",), split=lambda key: key.rsplit("/", 1)[-1]),
    MetricGroup("curriculum", "Noise curriculum", ("curriculum/*",)),
    MetricGroup(
        "search",
        "Search behaviour",
        ("episode/searches", "episode/invalid_actions", "episode/answered"),
    ),
    MetricGroup("response_length", "Response length (tokens)", ("episode/response_tokens*",)),
    MetricGroup("optimization", "Optimization", ("train/*",), split=lambda key: key),
    MetricGroup("throughput", "Throughput (tokens/s)", ("throughput/*",)),
)


def load_series(rows: Sequence[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per metric key, (steps, values) sorted by step, from `read_metrics` rows.

    Null and non-finite values are dropped, and keys left with no point are omitted. If a step
    was logged twice for a key (a resumed run whose metrics were not truncated), the later row
    wins, so a curve never doubles back.
    """
    points: dict[str, dict[int, float]] = {}
    for row in rows:
        step = row["step"]
        for key, value in row.items():
            if key in ("step", "time") or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                points.setdefault(key, {})[step] = float(value)
    series = {}
    for key, by_step in points.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        series[key] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return series


def plan_panels(keys: Sequence[str]) -> list[tuple[MetricGroup, list[Panel]]]:
    """The groups that have at least one of `keys`, each with its panels, in `GROUPS` order."""
    plan = []
    for group in GROUPS:
        members = sorted(key for key in keys if group.matches(key))
        if members:
            plan.append((group, group.panels(members)))
    return plan


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred mean over `window` (made odd) points, narrowed symmetrically near the ends.

    Narrowing rather than padding keeps the ends unbiased: a linear series is returned unchanged.
    """
    half = window // 2
    index = np.arange(len(values))
    radius = np.minimum(half, np.minimum(index, len(values) - 1 - index))
    cumsum = np.concatenate([[0.0], np.cumsum(values)])
    return (cumsum[index + radius + 1] - cumsum[index - radius]) / (2 * radius + 1)


def _draw_panel(ax, title: str, keys: Sequence[str], series) -> None:
    for key in keys:
        steps, values = series[key]
        if len(values) <= _SMOOTH_MIN_POINTS:
            (line,) = ax.plot(steps, values, marker="o", markersize=3, linewidth=1.2, label=key)
            lo, hi = (series.get(key + b) for b in INTERVAL_BOUNDS)
            if lo is not None and hi is not None and np.array_equal(lo[0], hi[0]):
                ax.fill_between(lo[0], lo[1], hi[1], color=line.get_color(), alpha=0.15,
                                linewidth=0)
            continue
        (raw,) = ax.plot(steps, values, linewidth=0.8, alpha=0.3)
        window = max(3, len(values) // 20)
        ax.plot(steps, moving_average(values, window), color=raw.get_color(), linewidth=1.6,
                label=key)
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2 if len(keys) > 4 else 1)


def _save_grid(panels: Sequence[Panel], series, title: str, path: Path) -> None:
    columns = min(_GRID_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = Figure(
        figsize=(_PANEL_SIZE[0] * columns, _PANEL_SIZE[1] * rows), dpi=_DPI, layout="constrained"
    )
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (panel_title, keys) in zip(axes[: len(panels)], panels, strict=True):
        _draw_panel(ax, panel_title, keys, series)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.savefig(path)


def plot_run(workdir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[str]:
    """Writes the PNG plots of a run (see the module docstring) and returns their paths.

    `workdir` is a run directory or its metrics.jsonl; plots go to `out_dir`, by default the
    `plots/` folder beside metrics.jsonl. Raises FileNotFoundError if there is no metrics file
    and EmptyMetricsError if it holds nothing to plot.
    """
    path = metrics_path(workdir)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}; is {workdir} a run's workdir?")
    series = load_series(read_metrics(path))
    plan = plan_panels(list(series))
    if not plan:
        patterns = ", ".join(p for group in GROUPS for p in group.patterns)
        raise EmptyMetricsError(
            f"{path} has no finite values for any plotted metric (keys matching {patterns})"
        )
    out = Path(out_dir) if out_dir is not None else path.parent / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    run_name = path.parent.name

    written = []
    grid_path = out / GRID_FILE
    _save_grid([panel for _, panels in plan for panel in panels], series, run_name, grid_path)
    written.append(str(grid_path))
    for group, panels in plan:
        group_path = out / f"{group.name}.png"
        _save_grid(panels, series, f"{run_name}: {group.title}", group_path)
        written.append(str(group_path))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zerosearch_jax.plot",
        description="Plot the training curves of a run from its metrics.jsonl.",
    )
    parser.add_argument("--workdir", required=True, help="run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output directory (default: WORKDIR/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.workdir, args.out)
    except (FileNotFoundError, EmptyMetricsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
