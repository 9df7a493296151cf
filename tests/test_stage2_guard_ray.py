"""Stage 2's held-out evaluation and reward-hacking guard on a local Ray cluster: a run trained on
a reward that pays for noise is stopped by the PSNR guard; with ``action: rollback`` the learners
and rollout actors go back to the best checkpoint and training continues."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import ray
import torch

from rlrestore.checkpoints import list_checkpoints
from rlrestore.orchestration.guard import EVAL_HISTORY_FILE, read_stage2_report
from rlrestore.orchestration.jobs import run_stage1
from rlrestore.orchestration.plotting import plot_run
from rlrestore.orchestration.stage2 import Stage2Run, run_stage2
from rlrestore.tracking import read_metrics
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow

HACKED = (
    "stage1_1.steps=2",
    "stage1_2.steps=2",
    "stage2.inputs_per_step=2",
    "stage2.candidates=3",
    "stage2.rollout.batch_size=2",
    "stage2.rollout.sampler_steps=2",
    "stage2.resources.rollout.num_actors=1",
    "stage2.resources.learner.num_actors=1",
    "stage2.rewards=[{name: 'tests.hacked_rewards:PaysForNoise', weight: 1.0}, {name: psnr, weight: 0.0}]",
    "stage2.optim.lr=2e-2",  # PSNR falls ~0.2 dB per 2 steps on the noise reward
    "stage2.nft.beta=1.0",
    "stage2.outputs.checkpoint_every=100",
    "stage2.outputs.keep_checkpoints=1",
    "stage2.outputs.sample_grid_every=100",
    "stage2.eval_every=2",
    "stage2.eval.faces=2",
    "stage2.eval.guard_metrics=[psnr, sharpness]",
    "stage2.guard.rules=[{metric: psnr, max_worse: 0.5}]",
)


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory: pytest.TempPathFactory, ray_cluster) -> Path:
    run_dir = tmp_path_factory.mktemp("guard") / "stage1"
    config = tiny_config(run_dir, *HACKED)
    for stage in ("stage1.1", "stage1.2"):
        run_stage1(config, stage)
    return run_dir


def test_the_guard_stops_a_run_whose_reward_pays_for_noise(stage1_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "stop"
    shutil.copytree(stage1_run, run_dir)
    run_stage2(tiny_config(run_dir, *HACKED, "stage2.steps=8"))

    report = read_stage2_report(run_dir)
    assert report["stopped_by_guard"] is True
    (event,) = report["guard_events"]
    assert event["action"] == "stop" and event["crossed"][0].startswith("eval/psnr = ")
    stopped = event["step"]
    assert stopped < 8 and report["steps_trained"] == stopped and report["steps_configured"] == 8
    frame = read_metrics(run_dir, "stage2").set_index("step")
    assert frame.index.max() == stopped  # the rows of the trained steps 0..stopped-1 and the eval at `stopped`
    assert frame["reward/total/mean"].notna().sum() == stopped
    evals = frame[frame["eval/total"].notna()]
    assert evals.index.tolist() == list(range(0, stopped + 1, 2))  # step 0 (the start), then every 2 steps
    for column in ("eval/total", "eval/reward/pays_for_noise", "eval/reward/psnr", "eval/psnr", "eval/sharpness"):
        assert evals[column].notna().all(), column
    assert evals.loc[stopped, "eval/psnr"] < evals.loc[0, "eval/psnr"]  # the hack costs fidelity...
    assert evals.loc[stopped, "eval/guard_crossed"] == 1.0
    assert report["start"]["psnr"] == evals.loc[0, "eval/psnr"]
    best = report["best"]  # ...so the best checkpoint is one that kept the guard
    assert best["step"] < stopped and best["metric"] == "eval/total"
    assert Path(best["checkpoint"]).is_dir()
    history = json.loads((run_dir / EVAL_HISTORY_FILE).read_text())
    assert [point["step"] for point in history] == evals.index.tolist()
    plots = [path.name for path in plot_run(run_dir)]
    assert "stage2_eval.png" in plots

    # the same command without the guard resumes from the stop: the history and its start are kept
    run_stage2(tiny_config(run_dir, *HACKED, "stage2.steps=8", "stage2.guard.rules=[]"))
    resumed = read_stage2_report(run_dir)
    assert resumed["start"] == report["start"] and resumed["steps_trained"] == 8
    assert not resumed["stopped_by_guard"] and resumed["guard_events"] == report["guard_events"]
    frame = read_metrics(run_dir, "stage2").set_index("step")
    assert frame["eval/total"].dropna().index.tolist() == [*range(0, stopped + 1, 2), 8]
    assert frame["reward/total/mean"].notna().sum() == 8


class RecordingRun(Stage2Run):
    """A Stage 2 run that keeps the learners' v_theta at each evaluation and after each rollback."""

    def __init__(self, config) -> None:
        self.evaluated: dict[int, dict[str, torch.Tensor]] = {}
        self.rolled_back: list[tuple[int, int, dict[str, torch.Tensor]]] = []
        self.checkpointed: dict[int, dict[str, torch.Tensor]] = {}
        super().__init__(config)

    def evaluate_start(self, writer, wandb_run) -> None:
        self.evaluated[0] = self.learners.trained_weights()
        super().evaluate_start(writer, wandb_run)

    def evaluate(self, done, writer, wandb_run) -> str:
        self.evaluated[done] = self.learners.trained_weights()
        return super().evaluate(done, writer, wandb_run)

    def checkpoint(self, step) -> None:
        self.checkpointed[step] = self.learners.trained_weights()
        super().checkpoint(step)

    def roll_back(self, point, step) -> None:
        super().roll_back(point, step)
        self.rolled_back.append((point.step, step, self.learners.trained_weights()))
        v_old = self.learners.rollout_weights()
        for actor in self.rollouts.actors:
            held = ray.get(actor.velocity_state.remote())
            assert all(torch.equal(held[key], v_old[key]) for key in v_old)


def test_the_guard_rolls_back_to_the_best_checkpoint_and_training_continues(
    stage1_run: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "rollback"
    shutil.copytree(stage1_run, run_dir)
    config = tiny_config(
        run_dir, *HACKED, "stage2.steps=8", "stage2.guard.action=rollback", "stage2.guard.max_rollbacks=1"
    )
    run = RecordingRun(config)
    try:
        run.run()
    finally:
        run.report_evaluations(run.done)
        run.shutdown()

    report = read_stage2_report(run_dir)
    assert report["rollbacks"] == 1 and len(run.rolled_back) == 1
    best_step, at, weights = run.rolled_back[0]
    rollback = report["guard_events"][0]
    assert rollback["action"] == "rollback" and rollback["step"] == at and best_step < at
    assert all(torch.equal(weights[key], run.evaluated[best_step][key]) for key in weights)
    assert any(not torch.equal(weights[key], run.evaluated[at][key]) for key in weights)
    # training went on after the rollback: steps `at`.. were trained, from the best weights
    frame = read_metrics(run_dir, "stage2").set_index("step")
    assert frame["reward/total/mean"].notna().sum() > at
    if report["stopped_by_guard"]:  # a second crossing stops it: max_rollbacks=1
        assert report["guard_events"][-1]["action"] == "stop"
        assert "max_rollbacks reached" in report["guard_events"][-1]["detail"]
    kept = [step for step, _ in list_checkpoints(run_dir, "stage2")]
    if report["best"]["step"] > 0:
        assert report["best"]["step"] in kept  # keep_checkpoints=1 never prunes the best one
    # the checkpoint that crossed is set aside; the rolled-back state was checkpointed in its place
    aside = run_dir / "checkpoints" / "stage2" / f"crossed_step_{at:06d}"
    assert aside.is_dir()
    history = {point["step"]: point for point in json.loads((run_dir / EVAL_HISTORY_FILE).read_text())}
    assert history[at]["checkpoint"] == str(aside) and history[at]["crossed"]
    assert all(torch.equal(run.checkpointed[at][key], weights[key]) for key in weights)
