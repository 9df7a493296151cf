"""Train the pretrained tiny demo policy and measure it on the demo's held-back faces.

Runs the normal Stage 1 pipeline on a local Ray session (``autoencoder`` -> ``stage1.1`` ->
``stage1.2``, each resuming from the run directory's checkpoints) with
``rlrestore/configs/demo_pretrain.yaml``, copies the final Stage 1.2 ``policy/`` directory to
``--out`` (default ``rlrestore/assets/demo_policy``) and writes ``<out>_figures.json`` next to it
(outside the policy directory, which Stage 2 checkpoints copy):

- on the ``data.holdout`` faces the demo holds back (same shards, ``split_holdout`` and degradation
  seed ``sample_seed(data.seed, id, 0)``; none of them is trained on), under that degradation draw
  and a second one (``sample_seed(data.seed + 1, id, 0)``): mean PSNR and dlib identity distance
  (``dlib_identity``, lower is better) of the degraded input and of the Stage 1 restoration F
  (``rlrestore restore``'s code path, the config's sampler, seed ``seed``);
- the DC-AE's reconstruction PSNR of the clean held-back faces (the cap of any restoration);
- the wall time of each stage.

Run from the repository root (Ray workers import the package from there)::

    PYTHONPATH=$PWD python scripts/pretrain_demo_policy.py

Options: ``--config``, ``--run-dir``, ``--out``, ``--stages`` (a comma-separated subset, e.g. for pilots),
``--measure-only`` (measure ``--out`` again; the stage times come from the run directory) and
``key=value`` config overrides.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rewards.base import RewardBatch, reward_class
from rlrestore.checkpoints import latest_checkpoint
from rlrestore.config import RunConfig, load_config
from rlrestore.data import degrade_seeded, save_image, to_tensor
from rlrestore.orchestration.jobs import held_back_faces, ray_session, run_stage1
from rlrestore.orchestration.restore import restore_files
from rlrestore.policies.prefrestore import PrefRestorePolicy
from rlrestore.runtime.seeds import sample_seed

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "rlrestore" / "configs" / "demo_pretrain.yaml"
DEFAULT_OUT = ROOT / "rlrestore" / "assets" / "demo_policy"
STAGES = ("autoencoder", "stage1.1", "stage1.2")
FIGURES = "_figures.json"  # <out>_figures.json
TIMES = "pretrain_seconds.json"  # wall seconds per stage, in the run directory


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def identity_distances(images: list[np.ndarray], clean: list[np.ndarray]) -> list[float]:
    """dlib identity distance of each image to its clean face (NaN where no face is found)."""
    metric = reward_class("dlib_identity")(device="cpu")
    batch = RewardBatch(captions=[""] * len(clean), clean=torch.stack([to_tensor(face) for face in clean]))
    return metric.score(torch.stack([to_tensor(image) for image in images]), batch).tolist()


def measure_draw(config: RunConfig, policy_dir: Path, faces: dict[str, np.ndarray], data_seed: int, work: Path) -> dict:
    """Degrade ``faces`` with ``sample_seed(data_seed, id, 0)``, restore them with F, score both."""
    lq_dir, out_dir = work / f"lq_seed{data_seed}", work / f"F_seed{data_seed}"
    lqs = {}
    for face_id, clean in faces.items():
        lqs[face_id], _ = degrade_seeded(clean, config.degradation, sample_seed(data_seed, face_id, 0))
        save_image(lqs[face_id], lq_dir / f"{face_id}.png")
    restore_files(policy_dir, [lq_dir], out_dir, config.sampler, seed=config.seed, progress=False, device="cpu")
    restored = {i: np.asarray(Image.open(out_dir / f"{i}.png").convert("RGB")) for i in faces}
    clean = list(faces.values())
    figures = {"data_seed": data_seed, "faces": list(faces)}
    for name, images in (("input", [lqs[i] for i in faces]), ("F", [restored[i] for i in faces])):
        psnrs = [psnr(image, face) for image, face in zip(images, clean, strict=True)]
        identity = identity_distances(images, clean)
        figures[name] = {
            "psnr": float(np.mean(psnrs)),
            "dlib_identity": float(np.nanmean(identity)),
            "psnr_per_face": psnrs,
            "dlib_identity_per_face": identity,
        }
    return figures


@torch.no_grad()
def autoencoder_cap(policy_dir: Path, faces: dict[str, np.ndarray]) -> float:
    """Mean PSNR of the DC-AE's reconstruction of the clean faces: no restoration decodes better."""
    policy = PrefRestorePolicy.from_pretrained(policy_dir).eval()
    clean = torch.stack([to_tensor(face) for face in faces.values()])
    decoded = policy.decode(policy.encode(clean))
    images = ((decoded + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return float(np.mean([psnr(image, face) for image, face in zip(images, faces.values(), strict=True)]))


def measure(config: RunConfig, policy_dir: Path, work: Path) -> dict:
    """Every figure of ``<out>_figures.json`` except the training times."""
    faces = held_back_faces(config)
    draws = [measure_draw(config, policy_dir, faces, seed, work) for seed in (config.data.seed, config.data.seed + 1)]
    size = sum(f.stat().st_size for f in policy_dir.rglob("*") if f.is_file())
    return {"draws": draws, "autoencoder_cap_psnr": autoencoder_cap(policy_dir, faces), "policy_bytes": size}


def train(config: RunConfig, stages: list[str]) -> dict[str, float]:
    """Run ``stages`` in order on a local Ray session; wall seconds per stage of the run directory
    (kept in ``TIMES`` there, so a run resumed or continued in several invocations adds up)."""
    times = Path(config.run_dir) / TIMES
    seconds = json.loads(times.read_text()) if times.is_file() else {}
    with ray_session(config.ray):
        for stage in stages:
            start = time.monotonic()
            run_stage1(config, stage)
            seconds[stage] = seconds.get(stage, 0.0) + time.monotonic() - start
            times.write_text(json.dumps(seconds, indent=2))
            print(f"{stage}: {seconds[stage]:.0f} s", flush=True)
    return seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="run config (demo_pretrain.yaml)")
    parser.add_argument("--run-dir", type=Path, default=None, help="run directory (default: the config's run_dir)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the policy directory is copied")
    parser.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated stages to run, in order (default {','.join(STAGES)})"
    )
    parser.add_argument("--measure-only", action="store_true", help="only measure the policy in --out")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    args.stages = args.stages.split(",")
    unknown = [stage for stage in args.stages if stage not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown stage(s) {unknown}; choose from {list(STAGES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    overrides = [*([f"run_dir={args.run_dir}"] if args.run_dir else []), "logging.progress=false", *args.overrides]
    config = load_config(args.config, overrides)
    times = Path(config.run_dir) / TIMES
    seconds: dict[str, float] = json.loads(times.read_text()) if times.is_file() else {}
    if not args.measure_only:
        seconds = train(config, args.stages)
        final = latest_checkpoint(config.run_dir, "stage1.2")
        if final is None:
            print("no Stage 1.2 checkpoint yet: nothing to copy or measure", file=sys.stderr)
            return
        shutil.rmtree(args.out, ignore_errors=True)
        shutil.copytree(final / "policy", args.out)
    source = args.config.resolve()
    shown = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source
    figures = {"config": str(shown), "overrides": args.overrides, "train_seconds": seconds}
    figures.update(measure(config, args.out, Path(config.run_dir) / "pretrain_measure"))
    figures_file = args.out.with_name(args.out.name + FIGURES)
    figures_file.write_text(json.dumps(figures, indent=2))
    du = subprocess.run(["du", "-sh", str(args.out)], capture_output=True, text=True, check=False).stdout.strip()
    for draw in figures["draws"]:
        i, f = draw["input"], draw["F"]
        print(f"data seed {draw['data_seed']}: PSNR input {i['psnr']:.2f} dB -> F {f['psnr']:.2f} dB; "
              f"dlib identity input {i['dlib_identity']:.3f} -> F {f['dlib_identity']:.3f}")  # fmt: skip
    print(f"DC-AE cap {figures['autoencoder_cap_psnr']:.2f} dB; policy {du}; train {sum(seconds.values()):.0f} s")


if __name__ == "__main__":
    main()
