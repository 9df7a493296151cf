"""What ``rlrestore compare-control`` reports: the table of input, F, Q and C (``table.md``), a
verdict per trained reward and fidelity metric (did Q beat the control?), ``report.json`` and the
bar plot ``control.png``.

A verdict compares the means of Q and C; for a per-image metric it also gives the standard error
of the paired difference (same face, same seed) and calls a difference under two of them "within
noise": with a few held-out faces a small gap says little.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlrestore.config import RunConfig
from rlrestore.orchestration.evaluation import INPUT_MODEL, EvalReport, Metric, format_value
from rlrestore.orchestration.jobs import Stage1Result
from rlrestore.orchestration.plotting import control_figure

BEST = "Q_best"  # Stage 2's best checkpoint, when its run report (stage2_report.json) names one other than Q
ROWS = (INPUT_MODEL, "F", "Q", BEST, "C")  # in table order; Q_best only when there is one
WHAT = {
    INPUT_MODEL: "the degraded input",
    "F": "start: the Stage-1 policy both runs start from",
    "Q": "Stage 2 (RL) from F",
    BEST: "Stage 2's best checkpoint (stage2_report.json)",
    "C": "control: Stage 1.2 from F for the same time",
}
NOISE_SE = 2.0  # a |Q - C| under this many standard errors of the paired difference is within noise


@dataclass(frozen=True)
class Stage2Budget:
    """Q and the time it took: its checkpoint, steps, seconds of steps (the control's budget),
    whether an already complete run was reused, the wall time of running it here (None when
    reused), and the best checkpoint its run report names when that is not Q (policy dir, step, seconds)."""

    checkpoint: Path
    steps: int
    seconds: float
    reused: bool
    wall_seconds: float | None
    best: Path | None = None
    best_step: int | None = None
    best_seconds: float | None = None


@dataclass(frozen=True)
class Verdict:
    """Did Q (or Q_best: ``model``) beat C on one metric: both means, Q - C in the metric's better
    direction (> 0: Q better), its paired standard error (None for a set-level metric or a single pair)."""

    model: str
    key: str
    heading: str
    role: str  # "trained reward" or "fidelity"
    q: float
    c: float
    gain: float
    se: float | None

    @property
    def winner(self) -> str:
        if not math.isfinite(self.gain):
            return "n/a"
        return "tie" if self.gain == 0 else (self.model if self.gain > 0 else "C")

    def line(self) -> str:
        """One line, e.g. ``sharpness ↑ (trained reward): Q 0.1234, C 0.1000: Q beat the control by 0.0234 (SE 0.0050)``."""
        head = f"{self.heading} ({self.role}): {self.model} {format_value(self.q)}, C {format_value(self.c)}: "
        if self.winner == "n/a":
            return head + "not comparable (no finite value)"
        if self.winner == "tie":
            return head + "a tie"
        verb = f"{self.model} beat the control" if self.winner == self.model else f"the control beat {self.model}"
        noise = ""
        if self.se is not None:
            noise = f" (SE {format_value(self.se)}" + (", within noise)" if abs(self.gain) < NOISE_SE * self.se else ")")
        return head + f"{verb} by {format_value(abs(self.gain))}{noise}"


@dataclass
class ControlReport:
    """The comparison's outcome and files (see ``rlrestore.orchestration.control``)."""

    out: Path
    start: Path
    stage2: Stage2Budget
    control: Stage1Result
    control_wall_seconds: float | None  # the control job's wall time here (None: an earlier one reused)
    evaluation: EvalReport
    verdicts: list[Verdict]
    table: Path
    report_json: Path
    plot: Path

    def verdict_lines(self) -> list[str]:
        return [verdict.line() for verdict in self.verdicts] or ["no trained reward or fidelity metric was scored"]

    def summary(self) -> str:
        """The console's summary: times, files and verdicts."""
        s2, c = self.stage2, self.control
        lines = [
            "== rlrestore compare-control ==",
            f"start F        : {self.start}",
            f"Stage 2 Q      : {s2.steps} steps, {s2.seconds:.1f} s of steps ({_origin(s2.wall_seconds, 'run here')})",
            *([f"Stage 2 Q_best : step {s2.best_step} ({s2.best})"] if s2.best is not None else []),
            (f"control C      : {c.step} Stage 1.2 steps, {c.seconds or 0.0:.1f} s of steps ({_stopped(c)}; "
            f"{_origin(self.control_wall_seconds, 'trained here')})"),
            f"table          : {self.table}",
            f"plot           : {self.plot}",
            f"report         : {self.report_json}",
            "verdicts (Q against the control):",
        ]
        return "\n".join(lines + [f"  {line}" for line in self.verdict_lines()])


def _origin(wall_seconds: float | None, ran: str) -> str:
    """'reused', or how long the job took here with its start-up."""
    return "reused" if wall_seconds is None else f"{ran}, {wall_seconds:.0f} s wall with start-up"


def _stopped(control: Stage1Result) -> str:
    return "stopped by the time limit" if control.timed_out else "stopped at its step cap"


def verdicts(config: RunConfig, evaluation: EvalReport) -> list[Verdict]:
    """One verdict per trained Stage 2 reward (weight > 0) and per fidelity (full-reference) metric
    that the evaluation scored."""
    trained = {spec.name for spec in config.stage2.rewards if spec.weight > 0}
    summary = evaluation.summary.set_index("model")
    found = []
    for model in [row for row in ("Q", BEST) if row in summary.index]:
        for metric in evaluation.metrics:
            if metric.key not in trained and not metric.needs_gt:
                continue
            q, c = float(summary.at[model, metric.key]), float(summary.at["C", metric.key])
            sign = 1.0 if metric.higher_is_better else -1.0
            role = "trained reward" if metric.key in trained else "fidelity"
            se = _paired_se(evaluation, metric, model)
            found.append(Verdict(model, metric.key, metric.heading, role, q, c, sign * (q - c), se))
    return found


def _paired_se(evaluation: EvalReport, metric: Metric, model: str) -> float | None:
    """Standard error of ``model`` - C over the (image, seed) pairs both scored (None: set-level or < 2 pairs)."""
    if metric.reward is None:
        return None
    frame = evaluation.per_image
    pairs = frame.pivot_table(index=["image", "seed"], columns="model", values=metric.key).dropna()
    if not {model, "C"} <= set(pairs.columns) or len(pairs) < 2:
        return None
    differences = (pairs[model] - pairs["C"]).to_numpy()
    return float(np.std(differences, ddof=1) / math.sqrt(len(differences)))


def write_control_report(
    config: RunConfig,
    out: Path,
    start: Path,
    stage2: Stage2Budget,
    control: Stage1Result,
    control_wall_seconds: float | None,
    evaluation: EvalReport,
) -> ControlReport:
    """Write ``table.md``, ``report.json`` and ``control.png`` into ``out``. ``control_wall_seconds``:
    the control job's wall time here, start-up included (None when an earlier one was reused)."""
    report = ControlReport(
        out, start, stage2, control, control_wall_seconds, evaluation, verdicts(config, evaluation),
        out / "table.md", out / "report.json", out / "control.png",
    )  # fmt: skip
    report.table.write_text(markdown(report))
    report.report_json.write_text(json.dumps(payload(report), indent=2, ensure_ascii=False) + "\n")
    summary = evaluation.summary.set_index("model")
    trained = {v.key for v in report.verdicts if v.role == "trained reward"}
    panels = [
        (metric.heading + (" (trained)" if metric.key in trained else ""), [float(summary.at[row, metric.key]) for row in rows(report)])
        for metric in evaluation.metrics
    ]
    figure = control_figure(rows(report), panels, _title(report))
    figure.savefig(report.plot, dpi=100)
    return report


def _title(report: ControlReport) -> str:
    return (
        f"Q: Stage 2, {report.stage2.steps} steps in {report.stage2.seconds:.0f} s; "
        f"C: Stage 1.2, {report.control.step} steps in {report.control.seconds or 0.0:.0f} s (same start F)"
    )


def rows(report: ControlReport) -> list[str]:
    """The rows the evaluation holds, in table order."""
    models = set(report.evaluation.summary["model"])
    return [row for row in ROWS if row in models]


def _steps_and_seconds(report: ControlReport, row: str) -> tuple[str, str]:
    if row == "Q":
        return str(report.stage2.steps), f"{report.stage2.seconds:.1f}"
    if row == BEST:
        return str(report.stage2.best_step), f"{report.stage2.best_seconds or 0.0:.1f}"
    if row == "C":
        return str(report.control.step), f"{report.control.seconds or 0.0:.1f}"
    return ("0", "0") if row == "F" else ("", "")


def markdown(report: ControlReport) -> str:
    """table.md: the rows input, F, Q, C with their steps and seconds from F, every metric, the verdicts."""
    evaluation, metrics = report.evaluation, report.evaluation.metrics
    summary = evaluation.summary.set_index("model")
    inputs = int(evaluation.summary["images"].max())
    lines = [
        "# Stage 2 (RL) against its control (Stage 1.2 for the same time)",
        "",
        (f"Both start from F = `{report.start}`. Held-out faces: {inputs} (`data.holdout`, degraded with Eq. 16, each "
        f"seeded by `eval.seed` and its id). Q: `{report.stage2.checkpoint}` "
        f"({_origin(report.stage2.wall_seconds, 'run here')}); C: `{report.control.checkpoint}` "
        f"({_stopped(report.control)}; {_origin(report.control_wall_seconds, 'trained here')})."),
        *_best_lines(report.stage2),
        "",
        "| row | what | steps from F | seconds of steps | " + " | ".join(m.heading for m in metrics) + " |",
        "|---|---|---:|---:|" + "---:|" * len(metrics),
    ]
    for row in rows(report):
        steps, seconds = _steps_and_seconds(report, row)
        cells = " | ".join(format_value(float(summary.at[row, m.key])) for m in metrics)
        lines.append(f"| {row} | {WHAT[row]} | {steps} | {seconds} | {cells} |")
    lines += ["", "## Did RL beat training Stage 1 longer?", ""]
    lines += [f"- {line}" for line in report.verdict_lines()]
    lines += [
        "",
        ("How to read it: F -> C is what the same time buys by training Stage 1.2 on (supervised, same batch "
        "size and learning rate); F -> Q is what Stage 2 bought. Q beating C on the trained rewards says the RL "
        "objective, not just more training, moved them; Q falling behind C on the fidelity metrics is the price "
        "paid for it. A gap under two standard errors of the paired (same face, same seed) difference is within "
        f"noise of {inputs} face(s). Time is seconds of steps on both sides (start-up and checkpoint writes not "
        "counted); the control finishes the step in flight when its time runs out."),
        "",
        f"Every metric, skipped metrics and the grid: `{evaluation.out / 'summary.md'}`, `{evaluation.out / 'grid.png'}`.",
    ]
    return "\n".join(lines) + "\n"


def _best_lines(stage2: Stage2Budget) -> list[str]:
    if stage2.best is None:
        return []
    return [
        "",
        (f"{BEST}: `{stage2.best}` (step {stage2.best_step}), the best checkpoint Stage 2's run report "
        "(`stage2_report.json`) names; the control had Q's full time all the same."),
    ]


def payload(report: ControlReport) -> dict[str, Any]:
    """report.json: runs, times, metrics per row and the verdicts."""
    evaluation = report.evaluation
    summary = json.loads(evaluation.summary.to_json(orient="records"))
    return {
        "start": str(report.start),
        "stage2": {
            **asdict(report.stage2),
            "checkpoint": str(report.stage2.checkpoint),
            "best": None if report.stage2.best is None else str(report.stage2.best),
        },
        "control": {
            **asdict(report.control),
            "checkpoint": str(report.control.checkpoint),
            "run_dir": str(report.out),
            "wall_seconds": report.control_wall_seconds,
            "stopped_by": "time limit" if report.control.timed_out else "step cap",
        },
        "metrics": [
            {"key": m.key, "heading": m.heading, "higher_is_better": m.higher_is_better, "full_reference": m.needs_gt}
            for m in evaluation.metrics
        ],
        "rows": {row: WHAT[row] for row in rows(report)},
        "summary": summary,
        "skipped_metrics": evaluation.skipped_metrics,
        "verdicts": [
            {**asdict(v), "q": _number(v.q), "c": _number(v.c), "gain": _number(v.gain), "winner": v.winner, "line": v.line()}
            for v in report.verdicts
        ],
        "table": str(report.table),
        "plot": str(report.plot),
        "eval_dir": str(evaluation.out),
    }


def _number(value: float) -> float | None:
    """A float for JSON: NaN / inf (a metric without a finite value) as null."""
    return value if math.isfinite(value) else None
