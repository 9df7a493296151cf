"""Stage 2's reward-hacking guard and best-checkpoint selection, over the held-out evaluations.

Every held-out evaluation (``stage2.eval_every``, ``rlrestore.orchestration.stage2_eval``) is an
:class:`EvalPoint`: the steps trained, the policy evaluated (a checkpoint, or at step 0 the
starting policy) and its values: ``total`` (the weighted trained reward), ``reward/<name>`` (each
trained reward, higher is better) and each guard metric raw (``psnr`` in dB; ``dlib_identity``,
``dlib_lmd`` distances, lower is better). A :class:`GuardRule` bounds how far a value may move in
its worse direction from the step-0 value; :class:`EvalHistory` keeps the points, the guard's
events and the rollbacks across resumes and names the best checkpoint by ``stage2.select``.

Files under the run directory::

    stage2_eval.json     every evaluation, oldest first (EvalPoint)
    stage2_report.json   the run report: best checkpoint, start values, guard events (read_stage2_report)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rewards import reward_class
from rlrestore.config import EVAL_TOTAL, GuardRule, SelectionConfig, Stage2Config

EVAL_HISTORY_FILE = "stage2_eval.json"
REPORT_FILE = "stage2_report.json"


def higher_is_better(metric: str) -> bool:
    """Direction of an evaluated value: the trained rewards and their total are higher-is-better;
    a guard metric has its reward class's direction (its raw value is logged)."""
    if metric == EVAL_TOTAL or metric.startswith("reward/"):
        return True
    return reward_class(metric).higher_is_better


@dataclass
class EvalPoint:
    """One held-out evaluation: ``step`` steps trained, the policy directory it evaluated."""

    step: int
    checkpoint: str
    values: dict[str, float]
    crossed: list[str] = field(default_factory=list)  # the guard rules it crossed, as sentences


@dataclass
class Crossing:
    """A guard rule crossed: the value moved past ``limit`` (its step-0 value +- ``max_worse``)."""

    metric: str
    start: float
    value: float
    limit: float
    max_worse: float

    def sentence(self) -> str:
        side = "below" if higher_is_better(self.metric) else "above"
        return (
            f"eval/{self.metric} = {self.value:.4g} is {side} {self.limit:.4g} "
            f"(step 0: {self.start:.4g}, max_worse {self.max_worse:g})"
        )


def crossings(rules: list[GuardRule], start: dict[str, float], values: dict[str, float]) -> list[Crossing]:
    """The rules ``values`` cross relative to ``start``. A rule whose value or start is not finite
    (e.g. no face detected for a dlib metric) cannot be checked and counts as not crossed."""
    found = []
    for rule in rules:
        first, value = start.get(rule.metric, math.nan), values.get(rule.metric, math.nan)
        if not (math.isfinite(first) and math.isfinite(value)):
            continue
        higher = higher_is_better(rule.metric)
        limit = first - rule.max_worse if higher else first + rule.max_worse
        if (value < limit) if higher else (value > limit):
            found.append(Crossing(rule.metric, first, value, limit, rule.max_worse))
    return found


@dataclass
class GuardEvent:
    """A guard crossing and what the run did about it (an entry of the report's ``guard_events``)."""

    step: int
    crossed: list[str]
    action: str  # "stop", "rollback" or "none" (at the last step)
    detail: str


def best_point(points: list[EvalPoint], select: SelectionConfig) -> EvalPoint | None:
    """The best evaluation by ``select`` among those whose policy is still on disk (and, with
    ``guarded_only``, that crossed no rule); later ones win ties. None when there is none."""
    higher = higher_is_better(select.metric) if select.mode is None else select.mode == "max"
    candidates = [
        point
        for point in points
        if math.isfinite(point.values.get(select.metric, math.nan))
        and Path(point.checkpoint).exists()
        and not (select.guarded_only and point.crossed)
    ]
    if not candidates:
        return None
    sign = 1.0 if higher else -1.0
    return max(candidates, key=lambda point: (sign * point.values[select.metric], point.step))


class EvalHistory:
    """The evaluations, guard events and rollbacks of a run, kept in ``run_dir`` across resumes."""

    def __init__(self, run_dir: Path, stage: Stage2Config, resume: bool) -> None:
        self.run_dir, self.stage = run_dir, stage
        self.rules = stage.guard.active_rules(stage.eval.guard_metrics)
        self.points: list[EvalPoint] = []
        self.events: list[GuardEvent] = []
        self.rollbacks, self.stopped_at = 0, None
        if resume and self.history_path.is_file():
            self.points = [EvalPoint(**entry) for entry in json.loads(self.history_path.read_text())]
        if resume and self.report_path.is_file():
            report = json.loads(self.report_path.read_text())
            self.events = [GuardEvent(**entry) for entry in report.get("guard_events", [])]
            self.rollbacks = int(report.get("rollbacks", 0))

    @property
    def history_path(self) -> Path:
        return self.run_dir / EVAL_HISTORY_FILE

    @property
    def report_path(self) -> Path:
        return self.run_dir / REPORT_FILE

    @property
    def start(self) -> dict[str, float]:
        """The values at step 0, which the guard's thresholds are relative to."""
        return self.points[0].values if self.points and self.points[0].step == 0 else {}

    def at(self, step: int) -> EvalPoint | None:
        return next((point for point in self.points if point.step == step), None)

    def add(self, step: int, checkpoint: Path, values: dict[str, float]) -> list[Crossing]:
        """Record an evaluation (replacing one of the same step: a redone step) and return the
        rules it crosses."""
        found = crossings(self.rules, self.start, values) if step > 0 else []
        self.points = [point for point in self.points if point.step != step]
        self.points.append(EvalPoint(step, str(checkpoint), values, [c.sentence() for c in found]))
        self.points.sort(key=lambda point: point.step)
        self.save()
        return found

    def move_checkpoint(self, step: int, path: Path) -> None:
        """The checkpoint evaluated at ``step`` now lies at ``path`` (set aside by a rollback)."""
        for point in self.points:
            if point.step == step:
                point.checkpoint = str(path)
        self.save()

    def save(self) -> None:
        self.history_path.write_text(json.dumps([asdict(point) for point in self.points], indent=2))

    def limits(self) -> dict[str, float]:
        """Each rule's bound, ``eval/<metric>`` -> its step-0 value moved ``max_worse`` the worse way."""
        start = self.start
        return {
            f"eval/{rule.metric}": start[rule.metric]
            + (-rule.max_worse if higher_is_better(rule.metric) else rule.max_worse)
            for rule in self.rules
            if math.isfinite(start.get(rule.metric, math.nan))
        }

    def best(self) -> EvalPoint | None:
        return best_point(self.points, self.stage.select)

    def report(self, steps_trained: int) -> dict[str, Any]:
        """The run report (``stage2_report.json``)."""
        best, select = self.best(), self.stage.select
        rule = {"metric": select.metric, "mode": select.mode, "guarded_only": select.guarded_only}
        return {
            "best": None
            if best is None
            else {
                "checkpoint": best.checkpoint,
                "step": best.step,
                "metric": f"eval/{select.metric}",
                "value": best.values[select.metric],
                "values": best.values,
            },
            "selection": {**rule, "direction": "max" if higher_is_better(select.metric) else "min"}
            if select.mode is None
            else rule,
            "start": self.start,
            "guard": {
                "rules": [rule.model_dump() for rule in self.rules],
                "limits": self.limits(),
                "action": self.stage.guard.action,
                "max_rollbacks": self.stage.guard.max_rollbacks,
            },
            "guard_events": [asdict(event) for event in self.events],
            "rollbacks": self.rollbacks,
            "stopped_by_guard": self.stopped_at is not None,
            "steps_trained": steps_trained,
            "steps_configured": self.stage.steps,
            "eval_history": str(self.history_path),
            "metrics": str(self.run_dir / "metrics" / "stage2"),
        }

    def write_report(self, steps_trained: int) -> Path:
        self.report_path.write_text(json.dumps(self.report(steps_trained), indent=2))
        return self.report_path


def read_stage2_report(run_dir: str | Path, missing_ok: bool = False) -> dict[str, Any]:
    """The Stage 2 run report of ``run_dir`` (``stage2_report.json``): ``best`` (checkpoint, step,
    metric, value), ``start`` values, ``guard_events``, ``rollbacks``, ``stopped_by_guard`` and the
    path of the evaluation history. A run without one (eval off) raises FileNotFoundError, or gives
    {} with ``missing_ok``."""
    path = Path(run_dir) / REPORT_FILE
    if not path.is_file():
        if missing_ok:
            return {}
        raise FileNotFoundError(
            f"{path} does not exist: the Stage 2 run report is written when stage2.eval_every > 0"
        )
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}); delete it or run Stage 2 again to rewrite it"
        ) from None
