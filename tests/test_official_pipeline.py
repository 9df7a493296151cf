"""The released model's path end to end at tiny size: convert a checkpoint in its layout, then
`train stage1.2`, `train stage2` (its recipe: LoRA with gaussian init on attn1/attn2, DPM-Solver-2
rollouts, adaptive x0 loss, base penalty) and `eval` on the converted directory, all through the CLI
with `configs/prefrestore_official.yaml` in bf16-mixed (on the CPU here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rlrestore.checkpoints import latest_checkpoint
from rlrestore.orchestration.cli import main
from rlrestore.tracking import read_metrics
from tests.official_layout import write_official_checkpoint

pytestmark = pytest.mark.slow

OFFICIAL = Path(__file__).resolve().parents[1] / "configs" / "prefrestore_official.yaml"
FACES = Path(__file__).resolve().parents[1] / "rlrestore" / "assets" / "faces"
# The official recipe at a size 2 CPUs run in a minute; what the test changes is resources and sizes only.
TINY_RUN = (
    "logging.progress=false", "logging.wandb_mode=disabled", "data.image_size=64", "data.shard_size=64",
    "ray.train_workers.num_actors=1", "ray.train_workers.num_cpus=0.5", "ray.train_workers.num_gpus=0",
    "stage1_2.steps=2", "stage1_2.batch_size=2", "stage1_2.checkpoint_every=2",
    "stage2.steps=2", "stage2.inputs_per_step=2", "stage2.candidates=2", "stage2.rollout.sampler_steps=3",
    "stage2.learner.micro_batch=4", "stage2.nft.timesteps_per_sample=2", "stage2.outputs.checkpoint_every=2",
    "stage2.rewards=[{name: sharpness, weight: 1.0}, {name: psnr, weight: 0.0}]", "stage2.resources.reward_groups={}",
    "stage2.resources.rollout={num_actors: 1, num_cpus: 0.25, num_gpus: 0}",
    "stage2.resources.reward={num_actors: 1, num_cpus: 0.25, num_gpus: 0}",
    "stage2.resources.learner={num_actors: 1, num_cpus: 0.25, num_gpus: 0}",
    "sampler.steps=3", "eval.resolution=64",
)  # fmt: skip


def test_convert_then_train_and_evaluate_on_the_converted_model(tmp_path: Path, ray_cluster) -> None:
    layout = write_official_checkpoint(tmp_path / "released")
    converted = tmp_path / "converted"
    assert main(["convert", "pref-restore", str(layout.checkpoint), "--out", str(converted)]) == 0

    run_dir = tmp_path / "run"
    keys = [f"run_dir={run_dir}", f"policy.checkpoint={converted}", *TINY_RUN]
    assert main(["train", "stage1.2", str(OFFICIAL), *keys]) == 0  # starts from policy.checkpoint
    assert main(["train", "stage2", str(OFFICIAL), *keys]) == 0
    stage2 = read_metrics(run_dir, "stage2")
    assert stage2["step"].tolist() == [0, 1] and stage2["learn/loss"].notna().all()
    devices = json.loads((run_dir / "devices.json").read_text())
    assert {entry["precision"] for entry in devices} == {"bf16-mixed"}
    learner = next(entry for entry in devices if entry["role"] == "learner")
    assert learner["dtype"] == "bfloat16"  # DeepSpeed's bf16 module weights, float32 masters

    ckpts = [f"--ckpt=F={latest_checkpoint(run_dir, 'stage1.2')}", f"--ckpt=Q={run_dir}", f"--ckpt=released={converted}"]
    faces = tmp_path / "faces"
    faces.mkdir()
    for face in sorted(FACES.glob("*.png"))[:3]:
        shutil.copy(face, faces / face.name)
    out = tmp_path / "eval"
    evaluate = ["eval", str(OFFICIAL), *ckpts, "--data", str(faces), "--out", str(out), "--quiet"]
    assert main([*evaluate, *keys, "eval.metrics=[psnr,sharpness]", "eval.chunk_size=4", "eval.grid_images=0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(row["model"] for row in summary["summary"]) == ["F", "Q", "input", "released"]
    assert all(row["psnr"] > 0 and row["sharpness"] > 0 for row in summary["summary"])
