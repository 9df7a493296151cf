"""Which codes should Stage 1.2 condition the DiT on? ``target``, ``generated`` or ``mix``.

Stage 1.2 teacher-forces the clean face's codes (the released recipe), while inference conditions
on codes the integrator generates from the degraded input. This script trains the autoencoder and
Stage 1.1 once, then Stage 1.2 from that same Stage 1.1 checkpoint once per variant
(``stage1_2.semantic_codes`` = target, generated, mix at ``--fraction``) with the same steps and
seeds, restores the held-back faces (``data.holdout`` of them, each under ``--draws`` Eq. 16
degradations) with every model and the same sampler seeds through ``rlrestore eval``, and reports
per variant:

- PSNR and SSIM against the clean face (mean ± std over inputs), and the paired PSNR difference to
  ``target`` on the same inputs (mean ± standard error);
- the degraded input's own PSNR/SSIM (the baseline) and the Stage 1.1 model before Stage 1.2;
- the flow-matching loss on the held-out pairs at a few t, conditioned on generated codes (what
  inference sees) and, for contrast, on the clean face's codes;
- the wall time of the Stage 1.2 job, the summed time of its steps, and the cost of one step
  (forward + backward of one worker's batch, fastest of several) measured in one process.

Every stage resumes from its checkpoints and ``rlrestore eval`` from its chunks, so rerunning the
same command after an interruption continues. Writes ``OUT/report.md`` and ``OUT/report.json``.
Run from the repository root (Ray workers import the package from there)::

    PYTHONPATH=$PWD nice -n 10 python scripts/compare_semantic_codes.py --out runs/semantic-codes

Options: a config file (default: the embedded tiny config), ``--holdout``, ``--draws``,
``--fraction``, ``--train-seeds`` (several Stage 1.2 seeds per variant) and ``key=value``
overrides applied to every run (e.g. ``stage1_2.steps=200``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from rlrestore.checkpoints import checkpoint_root, latest_checkpoint
from rlrestore.config import RunConfig, SamplerConfig, TextureAlignmentConfig, load_config
from rlrestore.data import (
    FaceDataset,
    collate_faces,
    load_image,
    read_shards,
    save_image,
    split_holdout,
    square_resize,
    to_tensor,
)
from rlrestore.flow import interpolate, target_velocity
from rlrestore.orchestration.cli_tools import default_config_path
from rlrestore.orchestration.evaluation import INPUT_MODEL, EvalReport, run_evaluation
from rlrestore.orchestration.jobs import prepare_shards, ray_session, run_stage1
from rlrestore.policies.prefrestore import PrefRestorePolicy
from rlrestore.tracking import read_metrics

FLOW_TIMES = (0.25, 0.5, 0.75, 0.95)
FLOW_NOISE_DRAWS = 4
STEP_REPEATS = 15
METRICS = ("psnr", "ssim")
BASELINE = "degraded input"
STAGE1_1 = "stage1.1"  # the shared Stage 1.1 checkpoint, before any Stage 1.2


@dataclass(frozen=True)
class Variant:
    """One Stage 1.2 run: its name, the codes it conditions on and its training seed."""

    name: str
    semantic_codes: str
    seed: int

    @property
    def model(self) -> str:
        """The checkpoint's name in the evaluation (one per variant and seed)."""
        return f"{self.name}-s{self.seed}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "config", nargs="?", type=Path, default=None, help="config file (default: the tiny config)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    parser.add_argument("--out", type=Path, required=True, help="directory of the runs and the report")
    parser.add_argument("--holdout", type=int, default=8, help="held-back faces (data.holdout)")
    parser.add_argument("--draws", type=int, default=4, help="Eq. 16 degradations per held-back face")
    parser.add_argument("--fraction", type=float, default=0.5, help="stage1_2.generated_fraction of the mix")
    parser.add_argument(
        "--train-seeds", type=int, nargs="+", default=[0], help="Stage 1.2 seeds (`seed`) per variant"
    )
    args = parser.parse_args(argv)
    if args.config is not None and "=" in str(args.config):  # only overrides were given
        args.overrides.insert(0, str(args.config))
        args.config = None
    if args.draws < 1:
        parser.error(f"--draws must be >= 1, got {args.draws}")
    if args.holdout < 1:
        parser.error(f"--holdout must be >= 1, got {args.holdout}")
    return args


def variants(fraction: float, seeds: list[int]) -> list[Variant]:
    """target, generated and mix (named after its fraction) for every training seed."""
    kinds = [("target", "target"), ("generated", "generated"), (f"mix{fraction:g}", "mix")]
    return [Variant(name, codes, seed) for seed in seeds for name, codes in kinds]


def train_base(config: RunConfig) -> Path:
    """Autoencoder and Stage 1.1 in ``config.run_dir``; the final Stage 1.1 checkpoint."""
    for stage in ("autoencoder", "stage1.1"):
        run_stage1(config, stage)
    checkpoint = latest_checkpoint(config.run_dir, "stage1.1")
    if checkpoint is None:
        raise RuntimeError(f"stage1.1 wrote no checkpoint under {config.run_dir}")
    return checkpoint


def train_variant(config: RunConfig, handoff: Path) -> dict[str, float]:
    """Stage 1.2 from the shared Stage 1.1 ``handoff``; its wall time and summed step time (s).

    The wall time is measured once, when the job trains, and kept in ``train_time.json`` (a job
    resumed after an interruption records the step it resumed from: its wall time is partial).
    """
    run_dir = Path(config.run_dir)
    timing_file = run_dir / "train_time.json"
    start_dir = checkpoint_root(run_dir, "stage1.1") / handoff.name
    if not start_dir.is_dir():
        shutil.copytree(handoff, start_dir)
    done = latest_checkpoint(run_dir, "stage1.2")
    if done is None or done.name != f"step_{config.stage1_2.steps:06d}" or not timing_file.is_file():
        resumed_from = 0 if done is None else int(done.name.removeprefix("step_"))
        began = time.perf_counter()
        run_stage1(config, "stage1.2")
        wall = time.perf_counter() - began
        steps = read_metrics(run_dir, "stage1.2")
        timing = {
            "wall_s": wall,
            "step_s": float(steps["step_time"].sum()),
            "resumed_from_step": resumed_from,
        }
        timing_file.write_text(json.dumps(timing, indent=2) + "\n")
    return json.loads(timing_file.read_text())


def step_cost(
    config: RunConfig, handoff: Path, stages: dict[str, TextureAlignmentConfig]
) -> dict[str, float]:
    """Fastest of ``STEP_REPEATS`` Stage 1.2 forward + backward passes per variant on the same
    per-worker batch, in this process, the variants taking turns (so a busy machine slows them
    alike): the cost of the codes without Ray's overhead or other jobs' load."""
    train, _ = split_holdout(read_shards(prepare_shards(config)), config.data.holdout)
    dataset = FaceDataset(train, config.policy.resolution, config.degradation, config.data.seed)
    per_worker = max(1, config.stage1_2.batch_size // config.ray.train_workers.num_actors)
    batch = collate_faces([dataset[i] for i in range(per_worker)])
    policy = PrefRestorePolicy.from_pretrained(handoff / "policy")
    params = policy.set_trainable(list(config.stage1_2.trainable))
    times: dict[str, list[float]] = {name: [] for name in stages}
    for repeat in range(STEP_REPEATS):
        for name, stage in stages.items():
            began = time.perf_counter()
            policy.stage1_losses("stage1.2", batch, stage, torch.Generator().manual_seed(repeat))["loss"].backward()
            times[name].append(time.perf_counter() - began)
            for param in params:
                param.grad = None
    return {name: min(values) for name, values in times.items()}


def held_back_faces(config: RunConfig, folder: Path, draws: int) -> Path:
    """The held-back clean faces, each saved ``draws`` times under its own id (``<id>_d<k>``), so
    ``rlrestore eval`` degrades every copy with its own Eq. 16 draw."""
    _, holdout = split_holdout(read_shards(prepare_shards(config)), config.data.holdout)
    for record in holdout:
        for draw in range(draws):
            path = folder / f"{record.id.replace('/', '_')}_d{draw}.png"
            if not path.is_file():
                save_image(record.image, path)
    return folder


@torch.no_grad()
def held_out_flow_losses(
    policy_dir: Path, report: EvalReport, sampler: SamplerConfig, seed: int
) -> dict[str, dict[str, list[float]]]:
    """Per-input flow-matching loss at each t of ``FLOW_TIMES`` on the held-out (LQ, clean) pairs,
    conditioned on generated codes (as at inference) and on the clean face's codes.

    The same noise (``FLOW_NOISE_DRAWS`` draws per input and t, seeded by ``seed``) for every model.
    """
    policy = PrefRestorePolicy.from_pretrained(policy_dir).eval()
    side = policy.config.resolution
    lq_dir, gt_dir = report.out / "inputs" / "lq", report.out / "inputs" / "gt"
    ids = sorted(report.per_image["image"].unique())
    lq = torch.stack([to_tensor(square_resize(load_image(lq_dir / f"{i}.png"), side)) for i in ids])
    hq = torch.stack([to_tensor(square_resize(load_image(gt_dir / f"{i}.png"), side)) for i in ids])
    captions = [""] * len(ids)
    x0 = policy.encode(hq)
    conditions = {
        "generated": policy.conditioning(
            lq, captions, sampler=sampler, generator=torch.Generator().manual_seed(seed)
        ).encoder_hidden_states,
        "target": policy.conditioning(
            lq, captions, target_codes=policy.target_codes(hq)
        ).encoder_hidden_states,
    }
    losses: dict[str, dict[str, list[float]]] = {codes: {} for codes in conditions}
    for t_value in FLOW_TIMES:
        generator = torch.Generator().manual_seed(seed + int(t_value * 1000))
        noise = [torch.randn(x0.shape, generator=generator) for _ in range(FLOW_NOISE_DRAWS)]
        t = torch.full((x0.shape[0],), t_value)
        for codes, states in conditions.items():
            per_input = torch.stack(
                [
                    F.mse_loss(
                        policy.velocity(interpolate(x0, eps, t), t, states).float(),
                        target_velocity(x0, eps).float(),
                        reduction="none",
                    )
                    .flatten(1)
                    .mean(1)
                    for eps in noise
                ]
            ).mean(0)
            losses[codes][f"{t_value:g}"] = per_input.tolist()
    return losses


def mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and sample std (ddof 1; 0 for a single value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(
    per_image: pd.DataFrame,
    flow: dict[str, dict[str, dict[str, list[float]]]],
    timing: dict[str, list[dict[str, float]]],
    groups: dict[str, list[str]],
) -> dict[str, dict]:
    """One entry per row of the table: metrics averaged over a group's models (training seeds) per
    input, then mean ± std over inputs; the paired PSNR difference to ``target``; flow losses; times."""
    table: dict[str, dict] = {}
    wide = {
        metric: per_image.pivot_table(index="image", columns="model", values=metric, aggfunc="mean")
        for metric in METRICS
    }
    for name, models in groups.items():
        entry: dict = {"models": models}
        for metric in METRICS:
            values = wide[metric][models].mean(axis=1).to_numpy()
            entry[metric] = dict(zip(("mean", "std"), mean_std(values), strict=True))
            if len(models) > 1:
                entry[metric]["seed_std"] = float(
                    np.std(wide[metric][models].mean(axis=0).to_numpy(), ddof=1)
                )
        if "target" in groups and name not in (BASELINE, "target"):
            psnr = wide["psnr"]
            diff = (psnr[models].mean(axis=1) - psnr[groups["target"]].mean(axis=1)).to_numpy()
            mean, std = mean_std(diff)
            entry["psnr_vs_target"] = {"mean": mean, "std": std, "sem": std / np.sqrt(len(diff))}
        if all(model in flow for model in models):
            entry["flow_loss"] = {
                codes: {
                    t: dict(
                        zip(
                            ("mean", "std"),
                            mean_std(np.mean([flow[model][codes][t] for model in models], axis=0)),
                            strict=True,
                        )
                    )
                    for t in flow[models[0]][codes]
                }
                for codes in ("generated", "target")
            }
        if name in timing:
            entry["train_wall_s"] = float(np.mean([item["wall_s"] for item in timing[name]]))
            entry["train_step_s"] = float(np.mean([item["step_s"] for item in timing[name]]))
        table[name] = entry
    return table


def markdown(table: dict[str, dict], inputs: int, command: str) -> str:
    """The report table: one row per variant (and the baseline rows), then how it was made."""
    times = [f"{t:g}" for t in FLOW_TIMES]
    lines = [
        "| variant | PSNR dB ↑ | ΔPSNR vs target dB | SSIM ↑ | "
        + " | ".join(f"flow loss t={t} ↓" for t in times)
        + " | Stage 1.2 wall s | steps s | step cost s |",
        "|---|---:|---:|---:|" + "---:|" * len(times) + "---:|---:|---:|",
    ]
    for name, entry in table.items():
        psnr, ssim = entry["psnr"], entry["ssim"]
        diff = entry.get("psnr_vs_target")
        cells = [
            f"{psnr['mean']:.2f} ± {psnr['std']:.2f}",
            f"{diff['mean']:+.2f} ± {diff['sem']:.2f}" if diff else "",
            f"{ssim['mean']:.3f} ± {ssim['std']:.3f}",
        ]
        flow = entry.get("flow_loss", {}).get("generated")
        cells += [f"{flow[t]['mean']:.3f} ± {flow[t]['std']:.3f}" if flow else "" for t in times]
        cells += [f"{entry[key]:.0f}" if key in entry else "" for key in ("train_wall_s", "train_step_s")]
        cells.append(f"{entry['step_cost_s']:.3f}" if "step_cost_s" in entry else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        (
            f"{inputs} held-out inputs (faces x Eq. 16 draws); PSNR/SSIM mean ± std over inputs; ΔPSNR: paired "
            "difference to `target` on the same inputs, mean ± standard error; flow loss: "
            "||v(x_t, c, t) - (eps - x0)||² with c from codes the integrator generates from the LQ input "
            f"(as at inference), mean ± std over inputs of the mean over {FLOW_NOISE_DRAWS} noise draws; "
            "Stage 1.2 wall: the Ray Train job; steps: the sum of its step times (both on a shared machine); "
            f"step cost: fastest of {STEP_REPEATS} forward + backward passes of one worker's batch in one process."
        ),
        "",
        f"Command: `{command}`",
    ]
    return "\n".join(lines) + "\n"


def git_commit() -> str | None:
    """The checkout's commit, when there is one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def variant_config(
    config_path: Path, overrides: list[str], out: Path, shards: str | Path, run: Variant
) -> RunConfig:
    """The config of one Stage 1.2 variant: its own run folder and seed, the shared shards."""
    return load_config(
        config_path,
        [
            *overrides,
            f"run_dir={out / run.model}",
            f"data.shards={shards}",
            f"seed={run.seed}",
            f"stage1_2.semantic_codes={run.semantic_codes}",
        ],
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    config_path = args.config or default_config_path()
    overrides = [
        *args.overrides,
        f"data.holdout={args.holdout}",
        f"stage1_2.generated_fraction={args.fraction}",
        "logging.progress=false",
    ]
    base = load_config(config_path, [*overrides, f"run_dir={out / 'base'}"])
    runs = variants(args.fraction, args.train_seeds)
    shards = out / "base" / "data" if base.data.shards is None else base.data.shards
    configs = {run: variant_config(config_path, overrides, out, shards, run) for run in runs}
    torch.set_num_threads(1)  # tiny models run fastest on one thread on a busy machine
    timing: dict[str, list[dict[str, float]]] = {}
    with ray_session(base.ray):
        handoff = train_base(base)
        for run, config in configs.items():
            print(f"== Stage 1.2 {run.model} (semantic_codes={run.semantic_codes})", flush=True)
            timing.setdefault(run.name, []).append(train_variant(config, handoff))

    costs = step_cost(base, handoff, {run.name: config.stage1_2 for run, config in configs.items()})
    faces = held_back_faces(base, out / "held_back_faces", args.draws)
    eval_config = base.eval.model_copy(update={"metrics": list(METRICS), "samples": 1})
    checkpoints = {STAGE1_1: handoff}
    checkpoints.update(
        {run.model: latest_checkpoint(config.run_dir, "stage1.2") for run, config in configs.items()}
    )
    report = run_evaluation(
        base.model_copy(update={"eval": eval_config}),
        [f"{name}={path}" for name, path in checkpoints.items()],
        faces,
        out / "eval",
        progress=False,
    )
    # the eval's own `input` row scores each degraded input against its clean face (the baseline)
    per_image = report.per_image[["model", "image", *METRICS]].replace({"model": {INPUT_MODEL: BASELINE}})
    flow = {
        name: held_out_flow_losses(path / "policy", report, base.sampler, base.eval.seed)
        for name, path in checkpoints.items()
    }
    groups = {BASELINE: [BASELINE], STAGE1_1: [STAGE1_1]}
    for run in runs:
        groups.setdefault(run.name, []).append(run.model)
    table = summarize(per_image, flow, timing, groups)
    for name, cost in costs.items():
        table[name]["step_cost_s"] = cost
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python scripts/compare_semantic_codes.py", *given])
    text = markdown(table, per_image["image"].nunique(), command)
    (out / "report.md").write_text(text)
    payload = {
        "command": command,
        "commit": git_commit(),
        "config": str(config_path),
        "overrides": overrides,
        "stage1_2_steps": base.stage1_2.steps,
        "held_back_faces": args.holdout,
        "draws_per_face": args.draws,
        "train_seeds": args.train_seeds,
        "flow_times": list(FLOW_TIMES),
        "eval_dir": str(report.out),
        "table": table,
        "per_input": per_image.to_dict("records"),
        "flow_loss_per_input": flow,
    }
    (out / "report.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(text)
    print(f"report: {out / 'report.md'}, {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
