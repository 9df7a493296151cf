"""The demo's report: the checks a reader wants first, then where every output lies.

Checks (each with the values it compares, from ``rlrestore compare-control``'s evaluation of the
held-out faces): F beats the degraded input on PSNR and on the dlib identity distance, Q beats F on
each trained reward, and each trained reward moves monotonically along the fidelity-quality dial
(F + s (Q - F), s from 0 to 1). The guard's events and the best checkpoint come from Stage 2's run
report, the control's verdicts from its table.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlrestore.config import RunConfig
from rlrestore.orchestration.analysis import DeterminismReport
from rlrestore.orchestration.control_report import BEST, ControlReport
from rlrestore.orchestration.evaluation import EvalReport
from rlrestore.orchestration.evaluation.metrics import Metric
from rlrestore.orchestration.guard import read_stage2_report

INPUT_ROW = "input"
FIDELITY = ("psnr", "dlib_identity")  # where F must beat the degraded input
DIAL_TOLERANCE = 1e-6  # a dial step may move this little the wrong way and still count as monotone


@dataclass
class DemoOutputs:
    """What the demo made (see ``rlrestore.orchestration.demo.run_demo``)."""

    run_dir: Path
    lq_dir: Path
    variants: dict[str, Path]  # F and Q policy directories
    grid: Path
    rewards: dict[str, dict[str, float]]  # restore-path Stage 2 rewards of each variant
    control: ControlReport
    dial: EvalReport
    determinism: DeterminismReport
    plots: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class Check:
    """One claim of the demo, the values behind it and whether it holds."""

    claim: str
    before: float
    after: float
    holds: bool

    def line(self) -> str:
        return f"[{'yes' if self.holds else 'NO '}] {self.claim}: {self.before:.4f} -> {self.after:.4f}"


def _better(metric: Metric, new: float, old: float) -> bool:
    if not (math.isfinite(new) and math.isfinite(old)):
        return False
    return new > old if metric.higher_is_better else new < old


def comparison_checks(control: ControlReport, trained: list[str]) -> list[Check]:
    """F against the input on ``FIDELITY``, Q (its best checkpoint when named) against F on ``trained``."""
    evaluation = control.evaluation
    summary = evaluation.summary.set_index("model")
    metrics = {metric.key: metric for metric in evaluation.metrics}
    q_row = BEST if BEST in summary.index else "Q"
    checks = []
    for key in [k for k in FIDELITY if k in metrics]:
        before, after = float(summary.at[INPUT_ROW, key]), float(summary.at["F", key])
        checks.append(
            Check(f"F beats the degraded input on {key}", before, after, _better(metrics[key], after, before))
        )
    for key in [k for k in trained if k in metrics]:
        before, after = float(summary.at["F", key]), float(summary.at[q_row, key])
        checks.append(
            Check(f"{q_row} beats F on {key} (trained)", before, after, _better(metrics[key], after, before))
        )
    return checks


def dial_checks(dial: EvalReport, trained: list[str]) -> list[Check]:
    """Each trained reward along the dial: monotone in its better direction from s = 0 to s = 1."""
    metrics = {metric.key: metric for metric in dial.metrics}
    checks = []
    for key in [k for k in trained if k in metrics]:
        values = [row[key] for row in sorted(dial.dial, key=lambda row: row["s"])]
        sign = 1.0 if metrics[key].higher_is_better else -1.0
        steps = [sign * (b - a) for a, b in itertools.pairwise(values)]
        monotone = (
            bool(values)
            and all(math.isfinite(v) for v in values)
            and min(steps, default=0) >= -DIAL_TOLERANCE
        )
        shown = ", ".join(f"{v:.3f}" for v in values)
        checks.append(
            Check(f"{key} monotone along the dial s = 0..1 ({shown})", values[0], values[-1], monotone)
        )
    return checks


def write_report(config: RunConfig, outputs: DemoOutputs) -> dict[str, Any]:
    """``demo/report.json``: the checks, the guard, the control, the dial, the determinism and the files."""
    trained = [spec.name for spec in config.stage2.rewards if spec.weight > 0]
    checks = comparison_checks(outputs.control, trained) + dial_checks(outputs.dial, trained)
    stage2 = read_stage2_report(outputs.run_dir, missing_ok=True)
    control_json = json.loads(outputs.control.report_json.read_text())
    report = {
        "run_dir": str(outputs.run_dir),
        "start_policy": str(outputs.variants["F"]),
        "q_policy": str(outputs.variants["Q"]),
        "checks": [
            {"claim": c.claim, "before": c.before, "after": c.after, "holds": c.holds} for c in checks
        ],
        "grid": str(outputs.grid),
        "held_back_faces": sorted(p.stem for p in outputs.lq_dir.glob("*.png")),
        "restore_path_rewards": outputs.rewards,
        "stage2": {
            "best": stage2.get("best"),
            "start": stage2.get("start"),
            "guard": stage2.get("guard"),
            "guard_events": stage2.get("guard_events", []),
            "stopped_by_guard": stage2.get("stopped_by_guard"),
            "eval_history": stage2.get("eval_history"),
        },
        "control": {
            "table": str(outputs.control.table),
            "plot": str(outputs.control.plot),
            "verdicts": outputs.control.verdict_lines(),
            "summary": control_json["summary"],
            "stage2_seconds": outputs.control.stage2.seconds,
            "control_seconds": outputs.control.control.seconds,
            "control_steps": outputs.control.control.step,
        },
        "dial": {
            "rows": outputs.dial.dial,
            "curve": None if outputs.dial.quality_curve is None else str(outputs.dial.quality_curve),
        },
        "determinism": {
            "seeds": outputs.determinism.seeds,
            "median_std": json.loads(outputs.determinism.medians.to_json(orient="records")),
            "verdicts": outputs.determinism.verdicts,
            "plot": str(outputs.determinism.plot),
        },
        "plots": [str(p) for p in outputs.plots],
    }
    demo_dir = outputs.run_dir / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    (demo_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def print_summary(config: RunConfig, outputs: DemoOutputs, report: dict[str, Any]) -> None:
    """The demo's closing lines on the terminal: the checks first, then where everything is."""
    run_dir, stage2 = outputs.run_dir, report["stage2"]
    print("\n== rlrestore demo finished ==")
    print(f"start policy F       : {outputs.variants['F']}")
    print(f"Stage 2 policy Q     : {outputs.variants['Q']}")
    for check in report["checks"]:
        print("  " + Check(check["claim"], check["before"], check["after"], check["holds"]).line())
    best = stage2.get("best") or {}
    print(
        f"best checkpoint      : {best.get('checkpoint')} (step {best.get('step')}, {best.get('metric')} = {best.get('value')})"
    )
    events = stage2.get("guard_events") or []
    print(
        f"guard                : {len(events)} event(s)"
        + "".join(f"\n  step {e['step']}: {'; '.join(e['crossed'])}: {e['detail']}" for e in events)
    )
    print(
        f"control (Stage 1.2 for Stage 2's {outputs.control.stage2.seconds:.0f} s): {outputs.control.table}"
    )
    for line in outputs.control.verdict_lines():
        print(f"  {line}")
    print(f"dial                 : {outputs.dial.out / 'summary.md'} (curve {outputs.dial.quality_curve})")
    print(f"grid LQ | F | Q | GT : {outputs.grid}")
    print(f"curves (PNG)         : {', '.join(str(p) for p in outputs.plots)}")
    print(f"metrics (Parquet)    : {run_dir / 'metrics'}")
    print(f"determinism ({len(outputs.determinism.seeds)} seeds): {outputs.determinism.plot}")
    print(f"report               : {run_dir / 'demo' / 'report.json'}")
