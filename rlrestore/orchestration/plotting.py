"""Figures: a run's metric curves, the Stage 2 reward curves (Fig. 6), determinism box plots
(Fig. 8), the fidelity-quality dial's curve, the bars of ``compare-control`` and captioned
comparison grids.

``plot_run`` writes one PNG per stage (one panel per metric over step) and, for Stage 2, the
reward components and total on two y axes as in Fig. 6 of the paper. Uses matplotlib's object
API with the Agg canvas (no pyplot), so it changes no global backend and runs on headless cluster
nodes and inside other programs alike.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image, ImageDraw, ImageFont

from rlrestore.tracking import metric_stages, read_metrics

_COLUMNS = 3
_SMOOTH_MIN_POINTS = 10  # fewer points are drawn as they are
REWARD_STAGE = "stage2"
_REWARD_MEAN = re.compile(r"^reward/(?P<name>.+)/mean$")  # per-component means logged by the aggregator
_TOTAL = "reward/total/mean"
_EVAL = "eval/"  # Stage 2's held-out evaluation curves (rlrestore.orchestration.stage2_eval)
_TOTAL_COLOUR = "purple"  # the paper's Fig. 6 draws the total in purple on the left axis


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Draw every stage's numeric metrics over step to ``<out_dir>/<stage>.png`` (Stage 1's
    losses among them), Stage 2's rewards Fig. 6 style to ``<out_dir>/stage2_rewards.png`` and its
    held-out evaluations (``eval/*``) to ``<out_dir>/stage2_eval.png``.

    ``out_dir`` defaults to ``<run_dir>/plots``. Curves with many points get a centred running
    mean drawn over the faint raw points. Returns the written paths: one per stage, then the
    reward figure when Stage 2 logged rewards.
    """
    run_dir = Path(run_dir)
    stages = metric_stages(run_dir)
    if not stages:
        raise FileNotFoundError(
            f"no metrics to plot under {run_dir / 'metrics'}: the run has not logged any step yet"
        )
    out_dir = run_dir / "plots" if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [_plot_stage(read_metrics(run_dir, stage), stage, out_dir / f"{stage}.png") for stage in stages]
    if REWARD_STAGE in stages:
        metrics = read_metrics(run_dir, REWARD_STAGE)
        if _TOTAL in metrics.columns:
            path = out_dir / f"{REWARD_STAGE}_rewards.png"
            reward_figure(metrics).savefig(path, dpi=100)
            paths.append(path)
        evaluated = [name for name in metrics.columns if name.startswith(_EVAL)]
        if evaluated:  # the held-out evaluations (stage2.eval_every): their steps only
            rows = metrics.loc[metrics[evaluated].notna().any(axis=1), ["step", *evaluated]]
            path, title = out_dir / f"{REWARD_STAGE}_eval.png", f"{REWARD_STAGE} held-out evaluation"
            paths.append(_plot_stage(rows, title, path, "evaluations", _guard_limits(run_dir)))
    return paths


def _guard_limits(run_dir: Path) -> dict[str, float]:
    """The guard's bounds by ``eval/*`` column, from the Stage 2 run report (none without one)."""
    report = run_dir / "stage2_report.json"
    return json.loads(report.read_text())["guard"]["limits"] if report.is_file() else {}


def _plot_stage(
    metrics: pd.DataFrame, stage: str, path: Path, rows_are: str = "steps", limits: dict[str, float] | None = None
) -> Path:
    """One figure with a panel per numeric metric column (``step`` and ``time`` excluded); a
    column in ``limits`` gets its bound as a dashed red line (the Stage 2 guard's)."""
    names = [
        name
        for name in metrics.columns
        if name not in ("step", "time") and pd.api.types.is_numeric_dtype(metrics[name])
    ]
    rows = max(1, math.ceil(len(names) / _COLUMNS))
    columns = min(_COLUMNS, max(1, len(names)))
    figure = Figure(figsize=(4.5 * columns, 3.0 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(f"{stage} ({len(metrics)} {rows_are})")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax, name in zip(axes, names):
        series = metrics[name].astype("float64")
        present = np.isfinite(series)  # NaN / inf steps (a diverged loss) leave a gap
        _draw_metric(ax, metrics["step"][present], series[present])
        if name in (limits or {}):
            ax.axhline(limits[name], color="red", linestyle="--", linewidth=1, label="guard limit")
            ax.legend(fontsize=7)
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
    ax.plot(steps, _running_mean(values), linewidth=1.5, label=f"mean of {_window(values)}")
    ax.legend(fontsize=7)


def _window(values: pd.Series) -> int:
    return max(3, len(values) // 20)


def _running_mean(values: pd.Series) -> pd.Series:
    return values.rolling(_window(values), center=True, min_periods=1).mean()  # centred: no lag


def _curve(ax: Axes, steps: pd.Series, values: pd.Series, label: str, colour: str, width: float) -> Line2D:
    """One labelled curve (NaN steps left out): the values, or with many points faint raw points
    under their running mean. Returns the labelled line."""
    present = np.isfinite(values.astype("float64"))
    steps, values = steps[present], values[present].astype("float64")
    if len(values) < _SMOOTH_MIN_POINTS:
        return ax.plot(steps, values, marker="o", markersize=3, linewidth=width, color=colour, label=label)[0]
    ax.plot(steps, values, linewidth=0.5, alpha=0.3, color=colour)
    return ax.plot(steps, _running_mean(values), linewidth=width, color=colour, label=label)[0]


def reward_figure(metrics: pd.DataFrame) -> Figure:
    """Fig. 6 of the paper: the total reward (purple, left axis) and each reward component's mean
    (right axis) over Stage 2 steps, from the aggregator's ``reward/<name>/mean`` columns."""
    if _TOTAL not in metrics.columns:
        raise ValueError(f"Stage 2 metrics have no {_TOTAL!r} column; columns: {sorted(metrics.columns)}")
    components = [
        match["name"]
        for name in metrics.columns
        if (match := _REWARD_MEAN.match(name)) is not None and name != _TOTAL
    ]
    figure = Figure(figsize=(7.5, 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    left = figure.add_subplot()
    right = left.twinx()
    lines = [_curve(left, metrics["step"], metrics[_TOTAL], "total reward", _TOTAL_COLOUR, 2.0)]
    lines += [
        _curve(right, metrics["step"], metrics[f"reward/{name}/mean"], name, f"C{index}", 1.2)
        for index, name in enumerate(components)
    ]
    left.set_xlabel("Stage 2 step")
    left.set_ylabel("total reward (weighted sum)", color=_TOTAL_COLOUR)
    left.tick_params(axis="y", labelcolor=_TOTAL_COLOUR)
    right.set_ylabel("reward components (mean per step)")
    left.grid(alpha=0.3)
    left.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="best")
    figure.suptitle(f"Stage 2 rewards ({len(metrics)} steps)")
    return figure


def quality_curve_figure(
    curves: dict[str, list[tuple[float, float, float]]], x_label: str, y_label: str
) -> Figure:
    """The fidelity-quality dial: per swept model, (s, fidelity, quality) points joined in s order,
    fidelity on x, quality on y, each point labelled ``s=...``."""
    figure = Figure(figsize=(6.0, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for index, (name, points) in enumerate(curves.items()):
        points = sorted(points)
        xs, ys = [x for _, x, _ in points], [y for _, _, y in points]
        ax.plot(xs, ys, marker="o", linewidth=1.2, color=f"C{index}", label=name)
        for s, x, y in points:
            ax.annotate(f"s={s:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title("fidelity-quality dial: weights F + s (Q - F)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure


def control_figure(rows: Sequence[str], panels: Sequence[tuple[str, Sequence[float]]], title: str) -> Figure:
    """``compare-control``: per metric (heading, one value per row) a panel of bars, one per row
    (input, F, Q, C), each labelled with its value; a metric without a finite value reads "n/a"."""
    columns = min(_COLUMNS, max(1, len(panels)))
    count = max(1, math.ceil(len(panels) / columns))
    figure = Figure(figsize=(3.4 * columns, 3.0 * count), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(count, columns, squeeze=False).flatten()
    positions = np.arange(len(rows))
    for ax, (heading, values) in zip(axes, panels):
        heights = np.array([value if math.isfinite(value) else 0.0 for value in values])
        bars = ax.bar(positions, heights, color=[f"C{index}" for index in range(len(rows))], alpha=0.85)
        labels = [f"{value:.4g}" if math.isfinite(value) else "n/a" for value in values]
        ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
        ax.set_xticks(positions, list(rows))
        ax.set_title(heading, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.margins(y=0.15)
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    figure.suptitle(title, fontsize=9)
    return figure


def plot_determinism(
    spread: pd.DataFrame, metrics: Sequence[tuple[str, str]], models: Sequence[str], path: Path
) -> Path:
    """Fig. 8 of the paper: per metric, a box per model of the per-input std across seeds.

    ``spread`` has columns ``model``, ``image`` and one std column per metric key; ``metrics``
    lists (key, axis label) in panel order.
    """
    columns = min(_COLUMNS, max(1, len(metrics)))
    rows = max(1, math.ceil(len(metrics) / columns))
    figure = Figure(figsize=(3.2 * columns, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax, (key, label) in zip(axes, metrics):
        data = [spread.loc[spread["model"] == model, key].dropna().to_numpy() for model in models]
        ax.boxplot(data, tick_labels=list(models))
        if not any(len(values) for values in data):
            ax.text(0.5, 0.5, "not scored", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"std of {label} across seeds", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    for ax in axes[len(metrics) :]:
        ax.set_axis_off()
    figure.suptitle(f"Spread over seeds per input ({spread['image'].nunique()} inputs)")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def captioned_grid(
    rows: Sequence[Sequence[np.ndarray]], column_titles: Sequence[str], row_titles: Sequence[str], cell: int
) -> np.ndarray:
    """A grid of uint8 RGB images with a title over each column and a label left of each row.

    Every image is fitted into a ``cell`` x ``cell`` square (aspect kept, white margins), so inputs
    of any size line up; returns the grid as an ``HxWx3`` uint8 array.
    """
    if not rows or any(len(row) != len(column_titles) for row in rows) or len(rows) != len(row_titles):
        raise ValueError(
            f"captioned_grid needs {len(row_titles)} rows of {len(column_titles)} images, "
            f"got {[len(row) for row in rows]}"
        )
    font = ImageFont.load_default(size=max(10, cell // 10))
    gap, pad = 2, 4
    label_width = pad + max(int(font.getlength(title)) for title in row_titles) + pad
    title_height = pad + int(font.getbbox("Ag")[3]) + pad
    width = label_width + len(column_titles) * (cell + gap) - gap
    height = title_height + len(rows) * (cell + gap) - gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(column_titles):
        x = label_width + c * (cell + gap) + (cell - int(font.getlength(title))) // 2
        draw.text((x, pad), title, fill="black", font=font)
    for r, (row, title) in enumerate(zip(rows, row_titles)):
        top = title_height + r * (cell + gap)
        draw.text((pad, top + cell // 2), title, fill="black", font=font, anchor="lm")
        for c, image in enumerate(row):
            fitted = Image.fromarray(image)
            scale = cell / max(fitted.size)
            if scale != 1:
                size = (max(1, round(fitted.width * scale)), max(1, round(fitted.height * scale)))
                fitted = fitted.resize(size, Image.Resampling.LANCZOS)
            left = label_width + c * (cell + gap) + (cell - fitted.width) // 2
            canvas.paste(fitted, (left, top + (cell - fitted.height) // 2))
    return np.asarray(canvas)
