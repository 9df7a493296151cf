"""Curves of a run's local metrics: one PNG per stage, one panel per metric over step.

Uses matplotlib's object API with the Agg canvas (no pyplot), so it changes no global backend and
runs on headless cluster nodes and inside other programs alike.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rlrestore.tracking import metric_stages, read_metrics

_COLUMNS = 3
_SMOOTH_MIN_POINTS = 10  # fewer points are drawn as they are


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Draw every stage's numeric metrics over step to ``<out_dir>/<stage>.png``.

    ``out_dir`` defaults to ``<run_dir>/plots``. Curves with many points get a centred running
    mean drawn over the faint raw points. Returns the written paths, one per stage.
    """
    run_dir = Path(run_dir)
    stages = metric_stages(run_dir)
    if not stages:
        raise FileNotFoundError(
            f"no metrics to plot under {run_dir / 'metrics'}: the run has not logged any step yet"
        )
    out_dir = run_dir / "plots" if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_plot_stage(read_metrics(run_dir, stage), stage, out_dir / f"{stage}.png") for stage in stages]


def _plot_stage(metrics: pd.DataFrame, stage: str, path: Path) -> Path:
    """One figure with a panel per numeric metric column (``step`` and ``time`` excluded)."""
    names = [
        name
        for name in metrics.columns
        if name not in ("step", "time") and pd.api.types.is_numeric_dtype(metrics[name])
    ]
    rows = max(1, math.ceil(len(names) / _COLUMNS))
    columns = min(_COLUMNS, max(1, len(names)))
    figure = Figure(figsize=(4.5 * columns, 3.0 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(f"{stage} ({len(metrics)} steps)")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax, name in zip(axes, names):
        series = metrics[name].astype("float64")
        present = np.isfinite(series)  # NaN / inf steps (a diverged loss) leave a gap
        _draw_metric(ax, metrics["step"][present], series[present])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    if not names:
        axes[0].text(0.5, 0.5, "no numeric metrics", ha="center", va="center")
    figure.savefig(path, dpi=100)
    return path


def _draw_metric(ax: Axes, steps: pd.Series, values: pd.Series) -> None:
    """Raw points, plus a running-mean line when there are enough of them."""
    if len(values) < _SMOOTH_MIN_POINTS:
        ax.plot(steps, values, marker="o", markersize=3, linewidth=1)
        return
    ax.plot(steps, values, marker=".", markersize=2, linewidth=0.5, alpha=0.35, label="raw")
    window = max(3, len(values) // 20)
    smooth = values.rolling(window, center=True, min_periods=1).mean()  # centred: no lag
    ax.plot(steps, smooth, linewidth=1.5, label=f"mean of {window}")
    ax.legend(fontsize=7)
