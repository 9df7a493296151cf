"""``rlrestore demo``: the whole pipeline on the embedded faces with tiny models.

Data build -> (autoencoder) -> Stage 1.1 -> Stage 1.2 -> Stage 2 on a local Ray cluster, then the
held-back faces are restored by the Stage-1 policy F and the Stage-2 policy Q through
``rlrestore restore``'s code path: a LQ | F | Q | GT grid, the reward curves, and the mean total
reward (and each component, PSNR included) of F and Q with its change. Then ``rlrestore eval``
scores F and Q on those faces (the eval metrics plus the Stage 2 rewards; metrics without weights
are listed as skipped) and ``rlrestore analyze determinism`` measures how much each varies over
``DEMO_SEEDS`` seeds per face.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rewards import RewardBatch, RewardWorker
from rlrestore.checkpoints import latest_checkpoint
from rlrestore.config import RunConfig
from rlrestore.data import (
    degrade_seeded,
    image_grid,
    read_shards,
    save_image,
    split_holdout,
    square_resize,
    to_tensor,
)
from rlrestore.orchestration.analysis import DeterminismReport, run_determinism
from rlrestore.orchestration.evaluation import EvalReport, run_evaluation
from rlrestore.orchestration.jobs import prepare_shards, ray_session, run_stage1
from rlrestore.orchestration.plotting import plot_run
from rlrestore.orchestration.restore import restore_files
from rlrestore.runtime.seeds import sample_seed

DEMO_STAGES = ("autoencoder", "stage1.1", "stage1.2")
DEMO_SEEDS = 4  # restorations per held-back face in the determinism analysis (the paper uses 16)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def score_restorations(config: RunConfig, restored: list[np.ndarray], clean: list[np.ndarray]) -> dict[str, float]:
    """Mean of each Stage 2 reward component and of the weighted total over restored faces."""
    worker = RewardWorker(config.stage2.rewards)
    images = torch.stack([to_tensor(image) for image in restored])
    batch = RewardBatch(captions=[""] * len(restored), clean=torch.stack([to_tensor(image) for image in clean]))
    scores = worker.score(images, batch)
    total = sum(spec.weight * scores[name] for spec, name in zip(config.stage2.rewards, worker.names, strict=True))
    return {**{name: float(values.mean()) for name, values in scores.items()}, "total": float(total.mean())}


def evaluate_variants(
    config: RunConfig, variants: dict[str, Path], faces: Path, demo_dir: Path
) -> tuple[EvalReport, DeterminismReport]:
    """``rlrestore eval`` of the variants on the clean ``faces`` (synthetic set) into ``demo_dir/eval``
    and their determinism over ``DEMO_SEEDS`` seeds into ``demo_dir/determinism``; the Stage 2
    rewards are added to ``eval.metrics``."""
    extra = [spec for spec in config.stage2.rewards if spec.name not in config.eval.metrics]
    extra_args = {spec.name: spec.args for spec in extra if spec.args}
    eval_config = config.eval.model_copy(
        update={
            "metrics": [*config.eval.metrics, *(spec.name for spec in extra)],
            "metric_args": {**config.eval.metric_args, **extra_args},
        }
    )
    config = config.model_copy(update={"eval": eval_config})
    checkpoints = [f"{name}={path}" for name, path in variants.items()]
    progress = config.logging.progress
    evaluation = run_evaluation(config, checkpoints, faces, demo_dir / "eval", progress=progress)
    determinism = run_determinism(
        config, checkpoints, faces, demo_dir / "determinism", seeds=DEMO_SEEDS, progress=progress
    )
    return evaluation, determinism


def run_demo(config: RunConfig) -> dict:
    """Train every stage on the embedded faces, restore the held-back ones with F and Q, report."""
    from rlrestore.orchestration.stage2 import run_stage2

    run_dir = Path(config.run_dir)
    with ray_session(config.ray):
        for stage in DEMO_STAGES:
            run_stage1(config, stage)
        run_stage2(config)
    _, holdout = split_holdout(read_shards(prepare_shards(config)), config.data.holdout)
    demo_dir = run_dir / "demo"
    size = config.policy.resolution
    lq_dir, gt_dir, gt = demo_dir / "lq", demo_dir / "gt", {}
    for record in holdout:
        clean = square_resize(record.image, size)
        degraded, _ = degrade_seeded(clean, config.degradation, sample_seed(config.data.seed, record.id, 0))
        save_image(degraded, lq_dir / f"{record.id}.png")
        save_image(clean, gt_dir / f"{record.id}.png")
        gt[record.id] = clean
    variants = {"F": latest_checkpoint(run_dir, "stage1.2"), "Q": latest_checkpoint(run_dir, "stage2")}
    outputs: dict[str, list[np.ndarray]] = {}
    for name, checkpoint in variants.items():
        out_dir = demo_dir / f"restored_{name}"
        restore_files(checkpoint, [lq_dir], out_dir, config.sampler, seed=config.seed, progress=False)
        outputs[name] = [np.asarray(Image.open(out_dir / f"{face_id}.png").convert("RGB")) for face_id in gt]
    lqs = [np.asarray(Image.open(lq_dir / f"{face_id}.png").convert("RGB")) for face_id in gt]
    rows = [[lq, f, q, clean] for lq, f, q, clean in zip(lqs, outputs["F"], outputs["Q"], gt.values(), strict=True)]
    grid_path = save_image(image_grid(rows), demo_dir / "grid_lq_F_Q_gt.png")
    rewards = {name: score_restorations(config, images, list(gt.values())) for name, images in outputs.items()}
    evaluation, determinism = evaluate_variants(config, variants, gt_dir, demo_dir)
    plots = plot_run(run_dir)
    change = rewards["Q"]["total"] - rewards["F"]["total"]
    report = {
        "run_dir": str(run_dir),
        "grid": str(grid_path),
        "plots": [str(p) for p in plots],
        "held_back_faces": list(gt),
        "rewards": rewards,
        "total_reward_change": change,
        "psnr_degraded": float(np.mean([psnr(lq, clean) for lq, clean in zip(lqs, gt.values(), strict=True)])),
        "eval": {
            "summary": json.loads(evaluation.summary.to_json(orient="records")),
            "best": evaluation.best,
            "skipped_metrics": evaluation.skipped_metrics,
            "dir": str(evaluation.out),
        },
        "determinism": {
            "seeds": determinism.seeds,
            "median_std": json.loads(determinism.medians.to_json(orient="records")),
            "verdicts": determinism.verdicts,
            "plot": str(determinism.plot),
        },
    }
    (demo_dir / "report.json").write_text(json.dumps(report, indent=2))
    components = ", ".join(f"{key} {rewards['F'][key]:.3f} -> {rewards['Q'][key]:.3f}" for key in rewards["F"])
    print("\n== rlrestore demo finished ==")
    print(f"run directory        : {run_dir}")
    print(f"checkpoints          : {run_dir / 'checkpoints'} (F = stage1.2, Q = stage2)")
    print(f"metrics (Parquet)    : {run_dir / 'metrics'}")
    print(f"curves (PNG)         : {', '.join(str(p) for p in plots)}")
    print(f"stage 2 sample grids : {run_dir / 'samples'}")
    print(f"grid LQ | F | Q | GT : {grid_path}")
    print(f"held-back faces      : {len(gt)} ({lq_dir})")
    print(f"reward F -> Q        : {components}")
    print(f"mean total reward    : F {rewards['F']['total']:.4f}, Q {rewards['Q']['total']:.4f}, change {change:+.4f}")
    skipped = len(evaluation.skipped_metrics)
    print(f"eval (F vs Q)        : {evaluation.out / 'summary.md'} ({skipped} metric(s) skipped: see there)")
    print(evaluation.markdown().split("\n\n## ")[0])
    print(f"determinism ({DEMO_SEEDS} seeds): {determinism.plot}")
    for line in determinism.verdicts:
        print(f"  {line}")
    print(f"report               : {demo_dir / 'report.json'}")
    return report
