"""``rlrestore analyze determinism``: how much a checkpoint's restorations vary with the seed (paper
Sec. V-H, Fig. 8).

Each input is restored N times (``eval.determinism_seeds``, seeds ``eval.seed`` .. ``eval.seed + N - 1``)
by every checkpoint through ``rlrestore eval``'s machinery (same metrics, actors, resuming); the
spread of a metric for one input is the standard deviation (ddof 1) of its N values, and a
checkpoint's figure is the median spread over the inputs. Set-level metrics (FID) have no
per-input value and are left out.

A deterministic sampler spreads by exactly 0: ``eval.noise_seed`` starts every restoration from
the same noise, so the restoration is a function of the input alone. Outputs in ``OUT``, next to
the evaluation's: ``determinism.png`` (a box per checkpoint of the per-input spreads, one panel
per metric), ``determinism_spread.csv`` (the spreads), ``determinism.md`` and ``determinism.json``
(medians and verdicts).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from rlrestore.config import RunConfig
from rlrestore.orchestration.evaluation import EvalReport, Metric, format_value, run_evaluation
from rlrestore.orchestration.plotting import plot_determinism


@dataclass
class DeterminismReport:
    """Per-input spreads, their medians per checkpoint, and the verdicts against the first checkpoint."""

    seeds: list[int]
    metrics: list[Metric]
    spread: pd.DataFrame
    medians: pd.DataFrame
    verdicts: list[str]
    plot: Path
    evaluation: EvalReport

    def markdown(self) -> str:
        """Median spread per checkpoint and metric, then the verdicts."""
        lines = [
            f"# Determinism: std across {len(self.seeds)} seeds per input, "
            + f"median over {self.spread['image'].nunique()} input(s)",
            "",
            "| model | " + " | ".join(_std_heading(metric) for metric in self.metrics) + " |",
            "|---|" + "---:|" * len(self.metrics),
        ]
        for row in self.medians.to_dict("records"):
            lines.append(
                f"| {row['model']} | " + " | ".join(format_value(row[m.key]) for m in self.metrics) + " |"
            )
        lines += ["", *(f"- {verdict}" for verdict in self.verdicts)]
        return "\n".join(lines) + "\n"


def _std_heading(metric: Metric) -> str:
    unit = f" ({metric.unit})" if metric.unit else ""
    return f"{metric.label} std{unit} ↓"


def seed_spread(per_image: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Std (ddof 1) of each metric over the seeds of each (model, image).

    Computed on the deviations from the first seed's value (the shifted-data form), so equal values
    give exactly 0 rather than a rounding residue.
    """
    keys = list(keys)
    groups = [per_image["model"], per_image["image"]]
    shifted = per_image[keys] - per_image.groupby(groups, sort=False)[keys].transform("first")
    return shifted.groupby(groups, sort=False).std(ddof=1).reset_index()


def verdict(metric: Metric, base: str, base_std: float, other: str, other_std: float) -> str:
    """One line comparing the median spreads of two checkpoints, e.g. "Q's median PSNR std is
    0.41 dB, 63% lower than F's 1.10 dB"."""
    unit = f" {metric.unit}" if metric.unit else ""
    this = f"{other}'s median {metric.label} std is {format_value(other_std)}{unit}"
    if not (math.isfinite(base_std) and math.isfinite(other_std)):
        return f"{this}, {base}'s {format_value(base_std)}{unit}: not comparable"
    if base_std == 0:
        if other_std == 0:
            return f"{other} and {base} both have a median {metric.label} std of 0 (deterministic)"
        return f"{this}, above {base}'s 0 (deterministic)"
    change = (other_std - base_std) / base_std
    direction = "lower" if change < 0 else "higher"
    return f"{this}, {abs(change):.0%} {direction} than {base}'s {format_value(base_std)}{unit}"


def run_determinism(
    config: RunConfig,
    checkpoints: Sequence[str],
    data: str | Path,
    out: str | Path,
    *,
    real: bool = False,
    seeds: int | None = None,
    progress: bool = True,
) -> DeterminismReport:
    """Restore every input of ``data`` under ``seeds`` seeds (default ``eval.determinism_seeds``)
    with each checkpoint, and report the spread of every per-image metric (see the module docstring)."""
    count = config.eval.determinism_seeds if seeds is None else seeds
    if count < 2:
        raise ValueError(f"the spread over seeds needs at least 2 seeds, got {count}")
    names = [name for name in config.eval.metrics if name != "fid"]
    if not names:
        raise ValueError("eval.metrics lists only 'fid', which has no per-input value; add per-image metrics")
    eval_config = config.eval.model_copy(
        update={
            "samples": count,
            "metrics": names,
            "metric_args": {key: args for key, args in config.eval.metric_args.items() if key in names},
            "grid_images": 0,
        }
    )
    evaluation = run_evaluation(
        config.model_copy(update={"eval": eval_config}),
        checkpoints,
        data,
        out,
        real=real,
        progress=progress,
        baseline=False,  # the degraded input does not depend on the seed: no spread to analyse
    )
    metrics = [metric for metric in evaluation.metrics if metric.reward is not None]
    keys = [metric.key for metric in metrics]
    models = list(evaluation.models)
    spread = seed_spread(evaluation.per_image, keys)
    medians = spread.groupby("model", sort=False)[keys].median().reindex(models).reset_index()
    by_model = medians.set_index("model")
    # a metric that scored nothing (n/a in the table) gets no verdict
    verdicts = [
        verdict(metric, models[0], by_model.at[models[0], metric.key], other, by_model.at[other, metric.key])
        for other in models[1:]
        for metric in metrics
        if by_model[metric.key].notna().any()
    ]
    out = Path(out)
    plot = plot_determinism(spread, [(m.key, m.label) for m in metrics], models, out / "determinism.png")
    report = DeterminismReport(
        seeds=[eval_config.seed + k for k in range(count)],
        metrics=metrics,
        spread=spread,
        medians=medians,
        verdicts=verdicts,
        plot=plot,
        evaluation=evaluation,
    )
    spread.to_csv(out / "determinism_spread.csv", index=False)
    (out / "determinism.md").write_text(report.markdown())
    payload = {
        "seeds": report.seeds,
        "noise_seed": eval_config.noise_seed,
        "models": evaluation.models,
        "median_std": json.loads(medians.to_json(orient="records")),
        "verdicts": verdicts,
        "skipped_metrics": evaluation.skipped_metrics,
        "plot": str(plot),
    }
    (out / "determinism.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return report
