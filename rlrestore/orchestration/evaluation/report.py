"""What an evaluation reports: the per-checkpoint summary (means, best per metric), its tables
(summary.csv, summary.md, summary.json), the LQ | checkpoints | GT grid and, for a ``--quality``
sweep, the fidelity-quality curve (quality_curve.png).

The tables open with the ``input`` row (the degraded input, scored as an image): the baseline a
reader compares every checkpoint with. It is never "best": best answers which checkpoint to keep,
and an input that beats every checkpoint on a metric shows as such by its numbers."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlrestore.data import load_image, save_image
from rlrestore.orchestration.evaluation.inputs import INPUT_MODEL, EvalInputs
from rlrestore.orchestration.evaluation.metrics import Metric
from rlrestore.orchestration.evaluation.store import PER_IMAGE, restored_path
from rlrestore.orchestration.plotting import captioned_grid, quality_curve_figure

_GRID_CELL_MAX = 256


@dataclass
class EvalReport:
    """What an evaluation computed and wrote (see the module docstring for the files)."""

    out: Path
    kind: str
    models: dict[str, str]
    metrics: list[Metric]
    skipped_metrics: dict[str, str]
    skipped_inputs: list[dict[str, str]]
    notes: list[dict[str, Any]]
    per_image: pd.DataFrame
    summary: pd.DataFrame
    best: dict[str, list[str]]
    computed: list[tuple[str, int]]
    reused: list[tuple[str, int]]
    grid: Path | None
    dial: list[dict[str, Any]] = field(default_factory=list)  # a --quality sweep: model, s, metric means
    quality_curve: Path | None = None
    dial_axes: tuple[str, str] | None = None  # the curve's (fidelity, quality) metric keys

    def markdown(self) -> str:
        """The summary table (best per metric in bold, ↑/↓ directions), then what was skipped and why."""
        inputs = int(self.summary["images"].max())
        samples = int(self.summary["restorations"].max()) // max(inputs, 1)
        lines = [
            f"# Evaluation: {self.kind} set, {inputs} input(s) x {samples} restoration(s) per checkpoint",
            "",
            "| model | images | " + " | ".join(metric.heading for metric in self.metrics) + " |",
            "|---|---:|" + "---:|" * len(self.metrics),
        ]
        for row in self.summary.to_dict("records"):
            cells = []
            for metric in self.metrics:
                text = format_value(row[metric.key])
                cells.append(f"**{text}**" if row["model"] in self.best.get(metric.key, []) else text)
            lines.append(f"| {row['model']} | {row['images']} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Means over every restoration with a finite value (FID: one value per checkpoint, set-level); "
            + "↑ higher is better, ↓ lower is better; best per metric in bold (with two or more checkpoints).",
        ]
        if INPUT_MODEL in set(self.summary["model"]):
            lines.append(
                f"`{INPUT_MODEL}`: the degraded input itself, scored as an image (the baseline; not a "
                "checkpoint, so never bold)."
            )
        lines += self._dial_lines()
        if self.skipped_metrics:
            lines += ["", "## Skipped metrics", ""]
            lines += [f"- `{key}`: {reason}" for key, reason in self.skipped_metrics.items()]
        if self.notes:
            lines += ["", "## Notes", ""]
            lines += [
                f"- {note['model']}, `{note['metric']}`: {note['reason']} ({note['images']} image(s))"
                for note in self.notes
            ]
        if self.skipped_inputs:
            lines += ["", "## Skipped inputs", ""]
            lines += [f"- {item['path']}: {item['reason']}" for item in self.skipped_inputs]
        lines += ["", "Checkpoints: " + ", ".join(f"{name} = {path}" for name, path in self.models.items())]
        return "\n".join(lines) + "\n"


    def _dial_lines(self) -> list[str]:
        """The ``--quality`` sweep: every metric per dial setting s (the trained rewards among them)."""
        if not self.dial:
            return []
        keys = [metric.key for metric in self.metrics]
        lines = [
            "",
            "## Fidelity-quality dial",
            "",
            "Weights F + s (Q - F): s = 0 is the Stage 1 policy F, s = 1 the Stage 2 policy Q.",
            "",
            "| model | s | " + " | ".join(metric.heading for metric in self.metrics) + " |",
            "|---|---:|" + "---:|" * len(keys),
        ]
        for row in self.dial:
            cells = " | ".join(format_value(row[key]) for key in keys)
            lines.append(f"| {row['model']} | {row['s']:g} | {cells} |")
        if self.quality_curve is not None and self.dial_axes is not None:
            x, y = self.dial_axes
            lines += ["", f"Curve: {self.quality_curve.name} (`{x}` on x, `{y}` on y)"]
        return lines


def format_value(value: float) -> str:
    """4 decimals (2 from 100 up), 'n/a' for NaN."""
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}" if abs(value) >= 100 else f"{value:.4f}"


def summarize(
    per_image: pd.DataFrame, metrics: list[Metric], set_level: dict[str, dict[str, float]], models: list[str]
) -> pd.DataFrame:
    """One row per model: inputs, restorations, and each metric's mean over finite values (or set-level value)."""
    rows = []
    for model in models:
        part = per_image[per_image["model"] == model]
        row: dict[str, Any] = {"model": model, "images": part["image"].nunique(), "restorations": len(part)}
        for metric in metrics:
            if metric.reward is None:
                row[metric.key] = set_level[model].get(metric.key, math.nan)
            else:
                finite = part[metric.key][np.isfinite(part[metric.key])]
                row[metric.key] = float(finite.mean()) if len(finite) else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "images", "restorations", *(m.key for m in metrics)])


def best_models(summary: pd.DataFrame, metrics: list[Metric]) -> dict[str, list[str]]:
    """Metric key -> the model(s) with the best value (ties share it); empty with fewer than two models."""
    if len(summary) < 2:
        return {}
    best = {}
    for metric in metrics:
        values = summary[metric.key].astype("float64")
        finite = values[np.isfinite(values)]
        if len(finite):
            target = finite.max() if metric.higher_is_better else finite.min()
            best[metric.key] = summary.loc[values == target, "model"].tolist()
    return best


def write_summaries(report: EvalReport) -> None:
    """summary.csv (columns ``<key>↑``/``<key>↓``; ``best`` lists the metrics where the row is best,
    ';'-separated), summary.md and summary.json."""
    out, metrics = report.out, report.metrics
    table = report.summary.rename(
        columns={metric.key: f"{metric.key}{'↑' if metric.higher_is_better else '↓'}" for metric in metrics}
    )
    table["best"] = [
        ";".join(key for key, models in report.best.items() if model in models)
        for model in report.summary["model"]
    ]
    table.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(report.markdown())
    payload = {
        "kind": report.kind,
        "models": report.models,
        "metrics": [
            {
                "key": metric.key,
                "label": metric.label,
                "unit": metric.unit,
                "higher_is_better": metric.higher_is_better,
                "full_reference": metric.needs_gt,
                "set_level": metric.reward is None,
            }
            for metric in metrics
        ],
        "summary": json.loads(report.summary.to_json(orient="records")),
        "best": report.best,
        "skipped_metrics": report.skipped_metrics,
        "notes": report.notes,
        "skipped_inputs": report.skipped_inputs,
        "per_image": str(out / PER_IMAGE),
        "grid": None if report.grid is None else str(report.grid),
        "dial": report.dial,
        "quality_curve": None if report.quality_curve is None else str(report.quality_curve),
        "quality_curve_axes": report.dial_axes,
    }
    (out / "summary.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def write_grid(out: Path, inputs: EvalInputs, models: list[str], seed: int, count: int) -> Path | None:
    """LQ | each model | GT (synthetic sets) for the first ``count`` inputs, captioned, to grid.png."""
    ids = inputs.ids[:count]
    if not ids:
        return None
    rows = []
    for image_id in ids:
        row = [load_image(inputs.lq_dir / f"{image_id}.png")]
        row += [load_image(restored_path(out, model, image_id, seed)) for model in models]
        if inputs.gt_dir is not None:
            row.append(load_image(inputs.gt_dir / f"{image_id}.png"))
        rows.append(row)
    titles = ["LQ", *(f"{model} (seed {seed})" for model in models)] + (["GT"] if inputs.gt_dir else [])
    cell = min(_GRID_CELL_MAX, max(rows[0][0].shape[:2]))
    return save_image(captioned_grid(rows, titles, ids, cell), out / "grid.png")


_DIAL = "@s="


def write_quality_curve(report: EvalReport, qualities: dict[str, float], trained: list[str]) -> Path | None:
    """Fill ``report.dial`` (metric means per dial setting) and draw quality_curve.png: fidelity (PSNR,
    else the first full-reference metric) on x, quality (the first trained reward ``trained`` among
    the metrics, else the first no-reference metric) on y, one line per swept checkpoint, points
    labelled by s. No figure (None) when either kind of metric is missing or has no finite value.
    ``trained``: the Stage 2 rewards trained on (weight > 0)."""
    summary = report.summary.set_index("model")
    report.dial = [
        {"model": name.rsplit(_DIAL, 1)[0], "s": s, **{m.key: float(summary.at[name, m.key]) for m in report.metrics}}
        for name, s in sorted(qualities.items(), key=lambda item: (item[0].rsplit(_DIAL, 1)[0], item[1]))
    ]
    x = _first(report.metrics, lambda m: m.key == "psnr") or _first(report.metrics, lambda m: m.needs_gt)
    y = _first(report.metrics, lambda m: m.key in trained and m is not x) or _first(
        report.metrics, lambda m: not m.needs_gt
    )
    if x is None or y is None:
        return None
    report.dial_axes = (x.key, y.key)
    curves: dict[str, list[tuple[float, float, float]]] = {}
    for row in report.dial:
        if math.isfinite(row[x.key]) and math.isfinite(row[y.key]):
            curves.setdefault(row["model"], []).append((row["s"], row[x.key], row[y.key]))
    if not curves:
        return None
    path = report.out / "quality_curve.png"
    quality_curve_figure(curves, x.heading, y.heading).savefig(path, dpi=100)
    report.quality_curve = path
    return path


def _first(metrics: list[Metric], accept: Callable[[Metric], bool]) -> Metric | None:
    return next((metric for metric in metrics if accept(metric)), None)
