"""``rlrestore compare-control``: did RL beat simply training Stage 1 longer?

From the Stage-1 policy F that Stage 2 starts from (``stage2.starting_point``), two runs get the
same time: Stage 2 (Q; run here, resumed, or reused when already complete) and the control C,
Stage 1.2 continued from F in ``<run_dir>/control`` with ``stage1_2.max_seconds`` set to Stage 2's
seconds of steps. Then ``rlrestore eval`` scores the degraded input, F, Q and C on the held-out
faces (``data.holdout``, degraded with Eq. 16 under ``eval.seed``) with the eval metrics plus the
Stage 2 rewards, and ``control_report`` writes the table, the verdicts and the plot.

Time is compared as seconds of steps on both sides (Stage 2: the sum of its logged ``timing/*``
phases per step; Stage 1: rank 0's ``step_time`` summed, the quantity ``max_seconds`` bounds):
start-up (actors, process groups) and checkpoint writes count for neither. The control finishes
the step in flight when its time runs out, so it gets at most one step more than Stage 2's time.

Layout of ``<run_dir>/control``::

    config.yaml, checkpoints/stage1.2/, metrics/stage1.2/, logs/   the control's own run
    heldout/<id>.png                     the clean held-out faces (eval degrades them)
    eval/                                ``rlrestore eval`` of input, F, Q, C (summary.md, per_image.parquet, grid.png)
    table.md, report.json, control.png   what ``control_report`` writes
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

from rlrestore.checkpoints import checkpoint_root, latest_checkpoint, resolve_policy_dir
from rlrestore.config import RunConfig
from rlrestore.data import save_image
from rlrestore.models.loading import CheckpointError
from rlrestore.orchestration.control_report import BEST, ControlReport, Stage2Budget, write_control_report
from rlrestore.orchestration.evaluation import EvalReport, run_evaluation, with_stage2_rewards
from rlrestore.orchestration.evaluation.store import MANIFEST
from rlrestore.orchestration.guard import REPORT_FILE, read_stage2_report
from rlrestore.orchestration.jobs import (
    Stage1Result,
    held_back_faces,
    prepare_shards,
    ray_session,
    run_stage1,
)
from rlrestore.orchestration.stage2 import check_stage2_inputs, run_stage2, starting_point
from rlrestore.runtime.console import FILE_ONLY
from rlrestore.runtime.devices import check_cluster_gpus, check_run_devices
from rlrestore.tracking import read_metrics

log = logging.getLogger(__name__)

CONTROL_DIR = "control"
CONTROL_STAGE = "stage1.2"
# The control's `steps`: never reached, so its max_seconds (Stage 2's time) ends it.
CONTROL_STEP_CAP = 10_000_000


def control_start(config: RunConfig) -> Path:
    """F: the Stage-1 policy directory Stage 2 starts (or started) from. Raises
    ``FileNotFoundError`` saying what to run when there is none."""
    try:
        policy_dir, _ = starting_point(config)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"compare-control needs the Stage-1 checkpoint both runs start from: {exc}"
        ) from None
    if checkpoint_root(config.run_dir, "stage2").resolve() in policy_dir.resolve().parents:
        raise FileNotFoundError(
            f"compare-control needs the Stage-1 policy Stage 2 started from, but {config.run_dir}/checkpoints/stage1.2 "
            "holds no checkpoint any more (only Stage 2's remain) and policy.checkpoint is not set: set "
            "policy.checkpoint to that policy directory"
        )
    return policy_dir


def check_control_inputs(config: RunConfig) -> None:
    """What compare-control can check before Ray starts: F exists, held-out faces are configured,
    every device request can be met, and (when Stage 2 still has steps to run) its inputs."""
    control_start(config)
    if config.data.holdout == 0:
        raise ValueError(
            "data.holdout=0: compare-control scores F, Q and the control on the held-out faces; set data.holdout "
            "(the faces Stage 1 and Stage 2 never train on) to a positive number and train with it"
        )
    check_run_devices(config, [CONTROL_STAGE, "stage2"])
    if not _stage2_complete(config):
        check_stage2_inputs(config)


def run_control(
    config: RunConfig, out: str | Path | None = None, budget_seconds: float | None = None
) -> ControlReport:
    """Stage 2 (unless complete), the control for the same seconds of steps, and the evaluation of
    input, F, Q and C on the held-out faces; writes ``table.md``, ``report.json`` and
    ``control.png`` into ``out`` (default ``<run_dir>/control``, also the control's run directory).
    ``budget_seconds``: the control's time instead of Stage 2's measured seconds of steps."""
    check_control_inputs(config)
    run_dir = Path(config.run_dir)
    out = run_dir / CONTROL_DIR if out is None else Path(out)
    start = control_start(config)
    with ray_session(config.ray):
        check_cluster_gpus(config, [CONTROL_STAGE, "stage2"])
        stage2 = ensure_stage2(config)
        seconds = stage2.seconds if budget_seconds is None else budget_seconds
        control, wall = Stage1Result.read(out, CONTROL_STAGE), None
        if control is None or control.seconds is None or control.seconds < seconds:
            began = time.perf_counter()
            control = run_stage1(
                control_config(config, start, seconds, prepare_shards(config), out), CONTROL_STAGE
            )
            wall = time.perf_counter() - began
        else:
            log.info("compare-control: the control in %s already had its %.1f s; reusing it", out, seconds)
    assert control is not None  # the control's steps are CONTROL_STEP_CAP, never 0
    log.info(
        "compare-control: Stage 2 %d steps in %.1f s of steps; control %d steps in %.1f s (%s)", stage2.steps,
        stage2.seconds, control.step, control.seconds or 0.0, "time limit" if control.timed_out else "step cap",
        extra=FILE_ONLY,
    )  # fmt: skip
    evaluation = evaluate_control(config, start, stage2, control, out)
    report = write_control_report(config, out, start, stage2, control, wall, evaluation)
    log.info("compare-control: table %s, plot %s\n%s", report.table, report.plot, "\n".join(report.verdict_lines()),
             extra=FILE_ONLY)  # fmt: skip
    return report


def _stage2_complete(config: RunConfig) -> bool:
    """Stage 2 reached ``stage2.steps``, or its guard stopped it (so a rerun would not train on)."""
    latest = latest_checkpoint(config.run_dir, "stage2")
    if latest is None:
        return False
    return _step(latest) >= config.stage2.steps or bool(
        read_stage2_report(config.run_dir, missing_ok=True).get("stopped_by_guard")
    )


def _best(run_dir: Path, q_policy: Path) -> tuple[Path, int] | None:
    """The best checkpoint's policy directory and step named by Stage 2's run report, when not Q."""
    best = read_stage2_report(run_dir, missing_ok=True).get("best") or {}
    if not best.get("checkpoint"):
        return None
    try:
        policy = resolve_policy_dir(best["checkpoint"]).resolve()
    except CheckpointError as exc:
        log.warning(
            "compare-control: the best checkpoint of %s is gone (%s); no Q_best row", REPORT_FILE, exc
        )
        return None
    return None if policy == q_policy.resolve() else (policy, int(best.get("step", 0)))


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step_"))


def ensure_stage2(config: RunConfig) -> Stage2Budget:
    """Q and its time: Stage 2 run (or resumed) to ``stage2.steps``, or reused when the run directory
    already holds it complete (then it is not rerun)."""
    reused = _stage2_complete(config)
    wall = None
    if reused:
        log.info("compare-control: Stage 2 is complete in %s; reusing it", config.run_dir)
    else:
        began = time.perf_counter()
        run_stage2(config)
        wall = time.perf_counter() - began
    run_dir = Path(config.run_dir)
    checkpoint = latest_checkpoint(run_dir, "stage2")
    assert checkpoint is not None  # complete, or just written by run_stage2
    steps = _step(checkpoint)
    budget = Stage2Budget(checkpoint, steps, stage2_seconds(run_dir, steps), reused, wall)
    best = _best(run_dir, checkpoint / "policy")
    if best is None:
        return budget
    return replace(budget, best=best[0], best_step=best[1], best_seconds=stage2_seconds(run_dir, best[1]))


def stage2_seconds(run_dir: Path, steps: int) -> float:
    """Seconds of Stage 2's first ``steps`` steps: per logged step, the sum of its ``timing/*``
    phases (rollout, reward, learn, sync); a resumed run's steps count once (the last session's)."""
    frame = read_metrics(run_dir, "stage2")
    frame = frame[frame["step"] < steps]
    phases = [column for column in frame.columns if column.startswith("timing/")]
    if len(frame) < steps or not phases:
        raise FileNotFoundError(
            f"{run_dir}/metrics/stage2 logs {len(frame)} of the {steps} steps of its newest checkpoint"
            f"{'' if phases else ' and no timing/* column'}: Stage 2's time cannot be measured; pass the control's "
            "seconds (run_control(..., budget_seconds=S))"
        )
    return float(frame[phases].fillna(0.0).to_numpy().sum())


def control_config(config: RunConfig, start: Path, seconds: float, shards: Path, out: Path) -> RunConfig:
    """The control's config: Stage 1.2 from ``start`` (``policy.checkpoint``) in its own run directory
    ``out`` on the run's shards, for ``seconds`` of steps (``stage1_2.max_seconds``; ``steps`` a cap
    it never reaches), at a constant learning rate ``stage1_2.optim.lr`` without warm-up: a run
    ended by time has no known end for a schedule to decay towards (Stage 2 also starts a fresh
    optimizer from F)."""
    if seconds <= 0:
        raise ValueError(f"the control's time must be positive, got {seconds} s")
    stage = config.stage1_2
    optim = stage.optim.model_copy(update={"schedule": "constant", "warmup_ratio": 0.0})
    updates = {"steps": CONTROL_STEP_CAP, "max_seconds": float(seconds), "optim": optim}
    return config.model_copy(
        update={
            "run_dir": str(out),
            "stage1_2": stage.model_copy(update=updates),
            "policy": config.policy.model_copy(update={"checkpoint": str(start)}),
            "data": config.data.model_copy(update={"shards": str(shards)}),
        }
    )


def heldout_faces(config: RunConfig, folder: Path) -> Path:
    """The clean held-out faces (``data.holdout``, never trained on) at the policy's resolution, as
    PNGs in ``folder``; the evaluation degrades them (Eq. 16, seeded per face by ``eval.seed``)."""
    for face_id, face in held_back_faces(config).items():
        path = folder / f"{face_id}.png"
        if not path.is_file():
            save_image(face, path)
    return folder


def evaluate_control(
    config: RunConfig, start: Path, stage2: Stage2Budget, control: Stage1Result, out: Path
) -> EvalReport:
    """``rlrestore eval`` of input, F, Q and C on the held-out faces into ``out/eval`` (the eval
    metrics plus the Stage 2 rewards). An earlier evaluation of other checkpoints there (Stage 2 or
    the control went on since) is replaced."""
    models = {"F": start, "Q": stage2.checkpoint / "policy"}
    if stage2.best is not None:
        models[BEST] = stage2.best
    models["C"] = control.checkpoint / "policy"
    eval_dir = out / "eval"
    manifest = eval_dir / MANIFEST
    if manifest.is_file():
        stored = json.loads(manifest.read_text()).get("models", {})
        if any(stored.get(name, str(path)) != str(path) for name, path in models.items()):
            log.info("compare-control: %s evaluated other checkpoints; evaluating again", eval_dir)
            shutil.rmtree(eval_dir)
    eval_config = config.model_copy(update={"eval": with_stage2_rewards(config.eval, config.stage2)})
    faces = heldout_faces(config, out / "heldout")
    checkpoints = [f"{name}={path}" for name, path in models.items()]
    return run_evaluation(eval_config, checkpoints, faces, eval_dir, progress=config.logging.progress)
