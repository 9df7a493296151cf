"""Stage 2 on a local Ray cluster: 2 rollout actors, 1 reward actor, 2 ZeRO-2 LoRA learner ranks; then a resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlrestore.checkpoints import list_checkpoints
from rlrestore.jobs import run_stage1
from rlrestore.stage2 import run_stage2
from rlrestore.tracking import read_metrics
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow

STAGE2 = (
    "stage1_1.steps=2",
    "stage1_2.steps=2",
    "stage2.inputs_per_step=2",
    "stage2.candidates=3",
    "stage2.rollout_batch=1",
    "stage2.sampler_steps=2",
    "stage2.checkpoint_every=2",
    "stage2.sample_grid_every=2",
    "stage2.learners.num_actors=2",
    "stage2.zero_stage=2",
    # LoRA here; full fine-tuning runs on Ray in test_nft_learner's 2-rank group and test_bench
    "stage2.finetune=lora",
    "stage2.lora_rank=4",
)


def test_three_stage2_steps_then_resume(tmp_path: Path, ray_cluster) -> None:
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, *STAGE2, "stage2.steps=3")
    for stage in ("stage1.1", "stage1.2"):
        run_stage1(config, stage)
    run_stage2(config)

    frame = read_metrics(run_dir, "stage2")
    assert frame["step"].tolist() == [0, 1, 2]
    for column in (
        "reward/total/mean", "reward/sharpness/mean", "reward/psnr/mean", "reward/r_mean",
        "reward/dropped_groups", "learn/loss", "learn/old_deviation", "policy_lag",
        "timing/rollout", "timing/reward", "timing/learn", "timing/sync", "throughput/candidates_per_s",
    ):  # fmt: skip
        assert column in frame.columns, column
        assert frame[column].notna().all(), column
    assert (frame["policy_lag"] == 0).all()
    assert [step for step, _ in list_checkpoints(run_dir, "stage2")] == [2, 3]
    step3 = run_dir / "checkpoints" / "stage2" / "step_000003"
    assert (step3 / "learner").is_dir()
    assert '"finetune": "lora"' in (step3 / "learner" / "learner_state.json").read_text()
    assert sorted(p.name for p in (run_dir / "samples").glob("stage2_step_*.png")) == [
        "stage2_step_000002.png",
        "stage2_step_000003.png",
    ]

    resumed = tiny_config(run_dir, *STAGE2, "stage2.steps=5", "stage2.async_rollouts=true")
    run_stage2(resumed)
    frame = read_metrics(run_dir, "stage2")
    assert frame["step"].tolist() == [0, 1, 2, 3, 4]
    assert list_checkpoints(run_dir, "stage2")[-1][0] == 5
    assert frame.set_index("step").loc[4, "policy_lag"] == 1.0  # async: rolled out during step 3


def test_a_placement_group_the_cluster_cannot_fit_fails_clearly(tmp_path: Path, ray_cluster) -> None:
    from rlrestore.stage2 import reserve_placement_group

    config = tiny_config(tmp_path, "stage2.learners.num_cpus=8", "stage2.placement_timeout_s=2")
    with pytest.raises(RuntimeError, match=r"could not fit them within 2.0 s.*stage2\.rollout_workers"):
        reserve_placement_group(config.stage2)
