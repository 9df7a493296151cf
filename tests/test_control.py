"""``rlrestore compare-control``: Stage 2 against Stage 1.2 for the same seconds of steps, from one F."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlrestore.checkpoints import latest_checkpoint, save_checkpoint
from rlrestore.orchestration.cli import main
from rlrestore.orchestration.control import check_control_inputs, run_control
from rlrestore.tracking import read_metrics
from tests.conftest import TINY_CONFIG, build_tiny_policy, tiny_config

SMALL = (
    "stage2.steps=2",
    "stage2.inputs_per_step=2",
    "stage2.candidates=2",
    "stage2.rollout.batch_size=1",
    "stage2.rollout.sampler_steps=2",
    "stage2.outputs.checkpoint_every=2",
    "stage2.outputs.sample_grid_every=2",
    "stage1_2.batch_size=4",
    "sampler.steps=2",
    "eval.metrics=[psnr]",  # plus the Stage 2 rewards: sharpness (trained) and psnr
)


@pytest.mark.slow
def test_compare_control_runs_stage2_and_its_control_then_reuses_both(tmp_path: Path, ray_cluster) -> None:
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir, "stage1.2", 1, build_tiny_policy(0), {"step": 1}, keep=1)  # F
    start = latest_checkpoint(run_dir, "stage1.2") / "policy"
    config = tiny_config(run_dir, *SMALL)
    report = run_control(config)

    out = run_dir / "control"
    assert (report.start, report.out) == (start, out)
    assert not report.stage2.reused and report.stage2.steps == 2 and report.stage2.checkpoint.parent.name == "stage2"
    stage2 = read_metrics(run_dir, "stage2")
    phases = [column for column in stage2.columns if column.startswith("timing/")]
    assert report.stage2.seconds == pytest.approx(stage2[phases].to_numpy().sum())
    # The control: Stage 1.2 from F in its own run directory, ended by Stage 2's time, within one step of it.
    control = report.control
    assert control.timed_out and control.checkpoint.parent == out / "checkpoints" / "stage1.2"
    assert yaml.safe_load((out / "config.yaml").read_text())["policy"]["checkpoint"] == str(start)
    steps = read_metrics(out, "stage1.2")
    assert steps["step"].tolist() == list(range(control.step))
    assert report.stage2.seconds <= control.seconds <= report.stage2.seconds + steps["step_time"].max() + 1e-6
    assert control.seconds == pytest.approx(steps["step_time"].sum())

    assert report.evaluation.summary["model"].tolist() == ["input", "F", "Q", "C"]
    saved = json.loads(report.report_json.read_text())
    assert [row["model"] for row in saved["summary"]] == ["input", "F", "Q", "C"]
    assert (saved["control"]["step"], saved["stage2"]["steps"]) == (control.step, 2)
    assert [(v["key"], v["role"]) for v in saved["verdicts"]] == [("psnr", "fidelity"), ("sharpness", "trained reward")]
    sharpness = next(v for v in report.verdicts if v.key == "sharpness")
    assert sharpness.winner == ("Q" if sharpness.q > sharpness.c else "C")
    table = report.table.read_text()
    assert all(f"| {row} |" in table for row in ("input", "F", "Q", "C")) and sharpness.line() in table
    assert report.plot.stat().st_size > 0 and "sharpness" in report.summary()

    # Again, now with a Stage 2 run report naming a best checkpoint other than Q (here the starting
    # policy, as when step 0 is best): Stage 2 is complete (reused, not rerun), the control's budget
    # is spent (no job), only the new Q_best row is evaluated.
    best = {"checkpoint": str(start), "step": 0, "metric": "eval/total", "value": 0.0}
    (run_dir / "stage2_report.json").write_text(json.dumps({"best": best, "stopped_by_guard": False}))
    again = run_control(config)
    assert again.stage2.reused and again.stage2.wall_seconds is None
    assert again.stage2.seconds == pytest.approx(report.stage2.seconds)
    assert (again.control.step, again.control.checkpoint) == (control.step, control.checkpoint)
    assert report.control_wall_seconds is not None and again.control_wall_seconds is None
    assert (again.stage2.best, again.stage2.best_step, again.stage2.best_seconds) == (start.resolve(), 0, 0.0)
    assert sorted({model for model, _ in again.evaluation.computed}) == ["Q_best"]
    assert again.evaluation.summary["model"].tolist() == ["input", "F", "Q", "Q_best", "C"]
    assert [v for v in again.verdicts if v.model == "Q"] == report.verdicts
    assert [v.key for v in again.verdicts if v.model == "Q_best"] == ["psnr", "sharpness"]
    assert "| Q_best |" in again.table.read_text()


def test_compare_control_without_a_stage1_checkpoint_says_what_to_run(tmp_path: Path, capsys) -> None:
    code = main(["compare-control", str(TINY_CONFIG), f"run_dir={tmp_path / 'run'}", "logging.progress=false"])
    assert code == 2
    err = capsys.readouterr().err
    assert "compare-control needs the Stage-1 checkpoint" in err and "rlrestore train stage1" in err
    assert not (tmp_path / "run" / "control").exists()


def test_compare_control_needs_held_out_faces(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "run", "stage1.2", 1, build_tiny_policy(0), {"step": 1}, keep=1)
    with pytest.raises(ValueError, match=r"data\.holdout=0"):
        check_control_inputs(tiny_config(tmp_path / "run", "data.holdout=0"))
