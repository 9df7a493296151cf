"""``rlrestore demo``: Stage 2 on the embedded faces from the pretrained tiny policy, then every report.

The Stage 1 policy F is the pretrained tiny policy shipped in ``rlrestore/assets/demo_policy``
(``scripts/pretrain_demo_policy.py`` reproduces it), unless the config names another in
``policy.checkpoint``. The demo builds the training shards, runs Stage 2 on a local Ray cluster
(rollout, reward and learner actors; held-out evaluation every ``stage2.eval_every`` steps with the
reward-hacking guard) and ``rlrestore compare-control`` (Stage 1.2 from F for Stage 2's time, then
input, F, Q and the control C scored on the held-out faces). Then the held-back faces are restored
by F and Q through ``rlrestore restore``'s code path (an LQ | F | Q | GT grid), the fidelity-quality
dial is swept (``rlrestore eval --quality``), ``rlrestore analyze determinism`` measures how much F
and Q vary over ``DEMO_SEEDS`` seeds, and the curves are drawn. ``demo/report.json`` holds it all,
with the checks a reader wants first (``demo_report``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rewards import RewardBatch, RewardWorker
from rlrestore.config import RunConfig
from rlrestore.data import (
    degrade_seeded,
    image_grid,
    save_image,
    to_tensor,
)
from rlrestore.orchestration.analysis import DeterminismReport, run_determinism
from rlrestore.orchestration.control import run_control
from rlrestore.orchestration.demo_report import DemoOutputs, print_summary, write_report
from rlrestore.orchestration.evaluation import EvalReport, run_evaluation, with_stage2_rewards
from rlrestore.orchestration.jobs import held_back_faces, ray_session
from rlrestore.orchestration.plotting import plot_run
from rlrestore.orchestration.restore import restore_files
from rlrestore.orchestration.stage2 import run_stage2
from rlrestore.runtime.seeds import sample_seed

DEMO_POLICY = Path(__file__).resolve().parents[1] / "assets" / "demo_policy"
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
DEMO_SEEDS = 4  # restorations per held-back face in the determinism analysis (the paper uses 16)
DIAL = (0.0, 0.25, 0.5, 0.75, 1.0)  # the fidelity-quality dial settings the demo sweeps
DIAL_METRICS = ("psnr", "dlib_identity")  # scored at each dial setting besides the Stage 2 rewards
DIAL_SAMPLES = 4  # restorations per held-out face and dial setting (seeds eval.seed + k): a steadier trend


def score_restorations(
    config: RunConfig, restored: list[np.ndarray], clean: list[np.ndarray]
) -> dict[str, float]:
    """Mean of each Stage 2 reward component and of the weighted total over restored faces."""
    worker = RewardWorker(config.stage2.rewards)
    images = torch.stack([to_tensor(image) for image in restored])
    batch = RewardBatch(
        captions=[""] * len(restored), clean=torch.stack([to_tensor(image) for image in clean])
    )
    scores = worker.score(images, batch)
    total = sum(
        spec.weight * scores[name] for spec, name in zip(config.stage2.rewards, worker.names, strict=True)
    )
    return {**{name: float(values.mean()) for name, values in scores.items()}, "total": float(total.mean())}


def with_demo_policy(config: RunConfig) -> RunConfig:
    """The config with ``policy.checkpoint`` defaulting to the shipped pretrained tiny policy."""
    if config.policy.checkpoint is not None:
        return config
    if not (DEMO_POLICY / "policy_config.json").is_file():
        raise FileNotFoundError(
            f"the pretrained demo policy {DEMO_POLICY} is missing: restore it from git, run "
            "scripts/pretrain_demo_policy.py, or set policy.checkpoint to a Stage 1 policy directory"
        )
    policy = config.policy.model_copy(update={"checkpoint": str(DEMO_POLICY)})
    return config.model_copy(update={"policy": policy})


def held_back_pairs(config: RunConfig, demo_dir: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Degrade the held-back faces once (seed ``sample_seed(data.seed, id, 0)``, as the pretraining
    script measures them) into ``demo_dir/lq``; returns that folder and the clean faces by id."""
    lq_dir, clean = demo_dir / "lq", held_back_faces(config)
    for face_id, face in clean.items():
        degraded, _ = degrade_seeded(face, config.degradation, sample_seed(config.data.seed, face_id, 0))
        save_image(degraded, lq_dir / f"{face_id}.png")
        save_image(face, demo_dir / "gt" / f"{face_id}.png")
    return lq_dir, clean


def restore_grid(
    config: RunConfig, variants: dict[str, Path], lq_dir: Path, clean: dict[str, np.ndarray], demo_dir: Path
) -> tuple[Path, dict[str, dict[str, float]]]:
    """Restore the held-back faces with each variant (``rlrestore restore``'s path), draw an
    LQ | variants | GT grid and score each variant with the Stage 2 rewards."""
    outputs: dict[str, list[np.ndarray]] = {}
    for name, policy_dir in variants.items():
        out_dir = demo_dir / f"restored_{name}"
        restore_files(policy_dir, [lq_dir], out_dir, config.sampler, seed=config.seed, progress=False)
        outputs[name] = [
            np.asarray(Image.open(out_dir / f"{face_id}.png").convert("RGB")) for face_id in clean
        ]
    lqs = [np.asarray(Image.open(lq_dir / f"{face_id}.png").convert("RGB")) for face_id in clean]
    rows = [
        [lq, *(outputs[name][i] for name in variants), gt]
        for i, (lq, gt) in enumerate(zip(lqs, clean.values()))
    ]
    grid = save_image(image_grid(rows), demo_dir / f"grid_lq_{'_'.join(variants)}_gt.png")
    return grid, {
        name: score_restorations(config, images, list(clean.values())) for name, images in outputs.items()
    }


def sweep_dial(config: RunConfig, f_policy: Path, q_policy: Path, faces: Path, demo_dir: Path) -> EvalReport:
    """``rlrestore eval --quality`` of Q (weights F + s (Q - F), s in ``DIAL``) on the held-out faces,
    scored by the Stage 2 rewards and ``DIAL_METRICS`` over ``DIAL_SAMPLES`` restorations per face."""
    dial_eval = config.eval.model_copy(
        update={"metrics": list(DIAL_METRICS), "metric_args": {}, "samples": DIAL_SAMPLES}
    )
    dial_config = config.model_copy(update={"eval": with_stage2_rewards(dial_eval, config.stage2)})
    return run_evaluation(
        dial_config, [f"Q={q_policy}"], faces, demo_dir / "dial", progress=config.logging.progress,
        qualities=DIAL, base=f_policy, baseline=False,
    )  # fmt: skip


def measure_determinism(
    config: RunConfig, variants: dict[str, Path], faces: Path, demo_dir: Path
) -> DeterminismReport:
    """``rlrestore analyze determinism`` of the variants over ``DEMO_SEEDS`` seeds per face."""
    checkpoints = [f"{name}={path}" for name, path in variants.items()]
    return run_determinism(
        config,
        checkpoints,
        faces,
        demo_dir / "determinism",
        seeds=DEMO_SEEDS,
        progress=config.logging.progress,
    )


def run_demo(config: RunConfig) -> dict:
    """Stage 2 from the pretrained policy, the control, the grid, the dial and the determinism analysis."""
    config = with_demo_policy(config)
    run_dir, demo_dir = Path(config.run_dir), Path(config.run_dir) / "demo"
    with ray_session(config.ray):
        run_stage2(config)
        control = run_control(config)
    q_policy = control.stage2.best or control.stage2.checkpoint / "policy"
    variants = {"F": control.start, "Q": q_policy}
    lq_dir, clean = held_back_pairs(config, demo_dir)
    grid, rewards = restore_grid(config, variants, lq_dir, clean, demo_dir)
    dial = sweep_dial(config, control.start, q_policy, demo_dir / "gt", demo_dir)
    determinism = measure_determinism(config, variants, demo_dir / "gt", demo_dir)
    outputs = DemoOutputs(
        run_dir=run_dir, lq_dir=lq_dir, variants=variants, grid=grid, rewards=rewards, control=control,
        dial=dial, determinism=determinism, plots=plot_run(run_dir),
    )  # fmt: skip
    report = write_report(config, outputs)
    print_summary(config, outputs, report)
    return report
