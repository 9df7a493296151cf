"""Benchmarks: each figure is a ratio against a plain baseline measured in the same run.

    rollout  candidates/s of ``PrefRestorePolicy.restore`` (B inputs x K candidates in one call,
             as the rollout worker samples) vs plain ``diffusers`` sampling of the same model one
             input and one candidate at a time (``FlowMatchEulerDiscreteScheduler`` stepping the DiT)
    learner  seconds per ``NFTLearner.train_step`` (DeepSpeed, one rank) vs a plain PyTorch loop
             with ``torch.optim.AdamW`` and the same NFT loss, micro-batches and forward/backward count
    stage2   (``bench_stage2``) seconds per Stage 2 step (the driver's ``Stage2Step.run_step``) on Ray (rollout, reward
             and learner actors, weight sync) vs the same method on the plain classes in one process;
             also ``stage2_driver_bytes``, bytes through the driver per step on the data plane vs the
             driver relaying every rollout part (with the rollout and sync bytes), and
             ``stage2_async``, asynchronous vs synchronous rollouts seconds per step
    rewards  images/s of each reward scored as a reward actor scores it (``RewardWorker.score``,
             batched) vs its model called directly one image at a time; model rewards get tiny
             random weights (``rewards.tiny``)

Every timing is the median of ``repeats`` runs after one warm-up run (``time.perf_counter``).
The policy is random-initialised from the config, so everything runs offline. The benchmarks run
in this process on ``device`` (``auto``: CUDA when there is a GPU); the rollout figure samples with
an inference copy in ``precision``'s compute dtype. The report and ``devices.json`` next to it
record both.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rewards import RewardWorker
from rewards.base import Reward, RewardBatch
from rlrestore.config import RewardErrorConfig, RewardSpec, RunConfig, SamplerConfig, Stage2Config
from rlrestore.flow import shifted_timesteps
from rlrestore.nft import ema_decay, ema_update, interpolate, nft_loss
from rlrestore.policies.prefrestore import PrefRestoreCondition, PrefRestorePolicy
from rlrestore.runtime.devices import DeviceRecord, local_device, write_devices
from rlrestore.runtime.precision import Precision
from trainers.nft_learner import NFTLearner, NFTSamples

FIGURE_PARTS = ("rollout", "learner", "stage2")
"""The benchmarks that report figures (and need the policy)."""
FIGURES = ("rollout", "learner", "stage2", "stage2_driver_bytes", "stage2_async")
"""The figures they report (``stage2`` reports three)."""
PARTS = (*FIGURE_PARTS, "rewards")
REWARD_BENCH_DEFAULT = (
    "sharpness",
    "psnr",
    "ssim",
    "piqe",
    "hpsv2",
    "pickscore",
    "clipscore",
    "clipscore_image",
    "identity",
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run: Callable[[int], Any], repeats: int, device: torch.device) -> float:
    """Median wall time of ``run(i)`` for i = 1..repeats, after a warm-up ``run(0)``."""
    run(0)
    _sync(device)
    times = []
    for i in range(1, repeats + 1):
        began = time.perf_counter()
        run(i)
        _sync(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


SIZES: dict[str, tuple[str, ...]] = {
    "tiny": (),
    "medium": (
        "policy.resolution=128",
        "policy.transformer.arch.sample_size=16",
        "policy.transformer.arch.num_layers=8",
        "policy.transformer.arch.num_attention_heads=8",
        "policy.transformer.arch.attention_head_dim=64",
        "policy.transformer.arch.num_cross_attention_heads=8",
        "policy.transformer.arch.cross_attention_head_dim=64",
        "policy.transformer.arch.cross_attention_dim=512",
    ),
}
"""``rlrestore bench --size``: overrides on the config. ``medium`` is a DiT of about 33M parameters
(8 layers, width 512) at 128 px (256 latent tokens), where compute dominates the orchestration."""


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024) -> float:
    """This machine's matmul rate: 2 n^3 FLOPs per ``n x n`` product, the fastest of 10 after a
    warm-up (the rate the machine reaches when nothing else slows it: a busy machine lowers the
    median, not the best)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(10):
        began = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - began)
    return 2 * n**3 / min(times)


def count_flops(run: Callable[[], Any]) -> int:
    """FLOPs of ``run()`` as torch's FLOP counter counts them (matmuls, convolutions, attention;
    forward and backward), with ``rlrestore plan``'s correction of grouped-convolution backward
    (``plan_measure.flop_counter``)."""
    from rlrestore.orchestration.plan_measure import flop_counter

    with flop_counter() as counter:
        run()
    return int(counter.get_total_flops())


def flop_settings(flops: int, seconds: float, matmul_rate: float) -> dict[str, float]:
    """A phase's achieved FLOP/s and its fraction of the machine's matmul rate."""
    achieved = flops / seconds
    return {"flops": float(flops), "achieved_gflops": achieved / 1e9, "matmul_fraction": achieved / matmul_rate}


def make_figure(
    unit: str, ours: float, baseline: float, ratio_means: str, settings: dict[str, Any]
) -> dict[str, Any]:
    return {
        "unit": unit,
        "ours": ours,
        "baseline": baseline,
        "ratio": ours / baseline,
        "ratio_means": ratio_means,
        "settings": settings,
    }


# --------------------------------------------------------------------------------- rollout
@torch.no_grad()
def sample_one_at_a_time(
    policy: PrefRestorePolicy,
    lq: torch.Tensor,
    captions: list[str],
    seeds: torch.Tensor,
    sampler: SamplerConfig,
) -> torch.Tensor:
    """The baseline: per input its condition, per candidate a diffusers Euler loop on the DiT and
    a decode, one sample per call. Same noise, grid and conditions as ``restore``: [B, K, C, h, w]."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=policy.config.flow_shift)
    # restore's grid: linspace(1, 0, steps + 1) shifted; diffusers shifts the sigmas and appends the final 0.
    sigmas = torch.linspace(1.0, 0.0, sampler.steps + 1, dtype=torch.float64)[:-1].tolist()
    shape = policy.latent_shape()
    rows = []
    for b in range(lq.shape[0]):
        generator = torch.Generator(device="cpu").manual_seed(int(seeds[0, 0]))
        states = policy.conditioning(lq[b : b + 1], captions[b : b + 1], sampler=sampler, generator=generator)
        states = states.encoder_hidden_states
        row = []
        for seed in seeds[b].tolist():
            noise = torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(int(seed)))
            x = noise[None].to(policy.device, torch.float32)
            scheduler.set_timesteps(sigmas=sigmas, device=policy.device)
            for t in scheduler.timesteps:
                v = policy.transformer(
                    hidden_states=x.to(states.dtype),
                    encoder_hidden_states=states,
                    timestep=t.expand(1).float(),
                    return_dict=False,
                )[0]
                x = scheduler.step(v.float(), t, x, return_dict=False)[0]
            policy.decode(x)
            row.append(x[0])
        rows.append(torch.stack(row))
    return torch.stack(rows)


def bench_rollout(
    policy: PrefRestorePolicy, inputs: int, candidates: int, steps: int, repeats: int
) -> dict[str, Any]:
    """Candidates/s of one batched ``restore`` call vs the one-at-a-time diffusers baseline."""
    sampler = SamplerConfig(steps=steps)  # Stage 2 rollouts: deterministic ODE, CFG off
    generator = torch.Generator().manual_seed(0)
    size = policy.config.resolution
    lq = (torch.rand(inputs, 3, size, size, generator=generator) * 2 - 1).to(policy.device)
    captions = [""] * inputs
    seeds = torch.arange(inputs * candidates).view(inputs, candidates)
    outputs: dict[str, torch.Tensor] = {}

    def batched(_: int) -> None:
        outputs["batched"] = policy.restore(lq, captions, seeds, sampler).latents

    def baseline(_: int) -> None:
        outputs["baseline"] = sample_one_at_a_time(policy, lq, captions, seeds, sampler)

    count = inputs * candidates
    seconds = median_seconds(batched, repeats, policy.device)
    ours = count / seconds
    base = count / median_seconds(baseline, repeats, policy.device)
    difference = float((outputs["batched"].float() - outputs["baseline"].float()).abs().max())
    flops = count_flops(lambda: batched(0))
    rate = matmul_flops_per_second(policy.device, policy.transformer.dtype)
    return make_figure(
        "candidates/s",
        ours,
        base,
        "batched restore / one-at-a-time diffusers throughput (>1: batching is faster)",
        {
            "inputs": inputs,
            "candidates": candidates,
            "steps": steps,
            "max_abs_latent_difference": difference,
            "dit_parameters": sum(p.numel() for p in policy.transformer.parameters()),
            **flop_settings(flops, seconds, rate),
        },
    )


# --------------------------------------------------------------------------------- learner
def random_samples(policy: PrefRestorePolicy, count: int, seed: int = 0) -> NFTSamples:
    """A learner batch shaped like a rollout's: x0, one condition per sample, r in [0, 1], all valid."""
    generator = torch.Generator().manual_seed(seed)
    channels = policy.transformer.config.caption_channels
    semantic = torch.randn(count, policy.num_semantic_tokens + 1, channels, generator=generator)
    z_low = torch.randn(count, *policy.latent_shape(), generator=generator)
    codes = torch.zeros(count, policy.num_semantic_tokens, dtype=torch.long)
    return NFTSamples(
        x0=torch.randn(count, *policy.latent_shape(), generator=generator),
        group=torch.arange(count),
        condition=PrefRestoreCondition(semantic, z_low, codes),
        r=torch.rand(count, generator=generator),
        valid=torch.ones(count, dtype=torch.bool),
    )


class PlainNFTStep:
    """The baseline learner: the DiT, a frozen v_old copy and ``torch.optim.AdamW``; per step the
    same micro-batches x timesteps forward/backward passes, gradient clipping and v_old EMA."""

    def __init__(self, policy: PrefRestorePolicy, stage2: Stage2Config, device: torch.device) -> None:
        self.stage2 = stage2
        self.model = copy.deepcopy(policy.velocity_model).to(device).train().requires_grad_(False)
        self.model.transformer.requires_grad_(True)  # Stage 2 trains the DiT
        self.v_old = copy.deepcopy(self.model).eval().requires_grad_(False)
        optim = stage2.optim
        self.optimizer = torch.optim.AdamW(
            self.model.transformer.parameters(),
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
        self.grid = shifted_timesteps(stage2.rollout.sampler_steps, policy.config.flow_shift)[:-1].to(device)
        self.device = device

    def train_step(self, samples: NFTSamples, step: int) -> None:
        x0 = samples.x0.to(self.device)
        condition = samples.condition.select(samples.group).to(self.device)
        r = samples.r.to(self.device)
        count, timesteps, micro = (
            len(x0),
            self.stage2.nft.timesteps_per_sample,
            self.stage2.learner.micro_batch,
        )
        generator = torch.Generator().manual_seed(step)
        picks = torch.stack(
            [torch.randperm(len(self.grid), generator=generator)[:timesteps] for _ in range(count)]
        )
        t = self.grid[picks.to(self.device)]
        eps = torch.randn((count, timesteps, *x0.shape[1:]), generator=generator).to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        for start in range(0, count, micro):
            part = slice(start, start + micro)
            for j in range(timesteps):
                x_t = interpolate(x0[part], eps[part, j], t[part, j])
                cond = condition.select(torch.arange(count, device=self.device)[part])
                v_theta = self.model(x_t, t[part, j], cond)
                with torch.no_grad():
                    v_old = self.v_old(x_t, t[part, j], cond)
                loss, _ = nft_loss(
                    v_theta, v_old, x0[part], eps[part, j], t[part, j], r[part], beta=self.stage2.nft.beta
                )
                (loss * (len(r[part]) / (count * timesteps))).backward()
        torch.nn.utils.clip_grad_norm_(self.model.transformer.parameters(), self.stage2.optim.grad_clip)
        self.optimizer.step()
        ema_update(
            self.v_old.transformer.parameters(),
            self.model.transformer.parameters(),
            ema_decay(step, self.stage2.nft.ema_schedule),
        )


def bench_learner(
    policy: PrefRestorePolicy, stage2: Stage2Config, samples: int, repeats: int, device: torch.device
) -> dict[str, Any]:
    """Seconds per ``NFTLearner.train_step`` (one rank) vs the plain AdamW loop, same batch."""
    if stage2.nft.loss_form != "velocity" or stage2.nft.base_penalty > 0:
        raise ValueError("the learner benchmark compares the velocity-form NFT loss without a base penalty")
    batch = random_samples(policy, samples)
    micro_batch, zero_stage = stage2.learner.micro_batch, stage2.learner.zero_stage
    learner = NFTLearner(
        policy,
        stage2.nft,
        stage2.optim,
        micro_batch=micro_batch,
        zero_stage=zero_stage,
        device=device,
        sampler_steps=stage2.rollout.sampler_steps,
        total_steps=repeats + 1,
    )
    plain = PlainNFTStep(policy, stage2, device)
    ours = median_seconds(lambda i: learner.train_step(batch, i), repeats, device)
    base = median_seconds(lambda i: plain.train_step(batch, i), repeats, device)
    flops = count_flops(lambda: plain.train_step(batch, repeats + 1))  # the same passes as a learner step
    rate = matmul_flops_per_second(device)
    return make_figure(
        "s/step",
        ours,
        base,
        "NFTLearner (DeepSpeed) / plain AdamW seconds per step (>1: overhead)",
        {
            "samples": samples,
            "micro_batch": micro_batch,
            "timesteps_per_sample": stage2.nft.timesteps_per_sample,
            "forward_backward_passes": math.ceil(samples / micro_batch) * stage2.nft.timesteps_per_sample,
            "zero_stage": zero_stage,
            "world_size": 1,
            "dit_parameters": sum(p.numel() for p in policy.transformer.parameters()),
            **flop_settings(flops, ours, rate),
        },
    )


# --------------------------------------------------------------------------------- rewards
def reward_inputs(count: int, size: int, group: int, seed: int = 0) -> tuple[torch.Tensor, RewardBatch]:
    """``count`` candidates of ``size`` px as a Stage 2 step scores them: groups of ``group`` noisy
    copies of one embedded face, sharing its caption and (as ``clean``) the face itself."""
    from rlrestore.data import embedded_faces_dir, iter_image_files, load_image, square_resize, to_tensor

    files = iter_image_files(embedded_faces_dir())
    inputs = math.ceil(count / group)
    faces = [to_tensor(square_resize(load_image(files[i % len(files)]), size)) for i in range(inputs)]
    clean = torch.stack(faces).repeat_interleave(group, dim=0)[:count]
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    captions = [f"a photo of face {index // group}" for index in range(count)]
    return (clean + 0.1 * noise).clamp(-1.0, 1.0), RewardBatch(captions, clean=clean)


def per_image_model_calls(reward: Reward) -> Callable[[torch.Tensor, RewardBatch], None]:
    """The baseline of ``reward``: its underlying model called directly, one image at a time, with
    the model's preprocessing (pyiqa ``metric(image)``; open_clip ``encode_image``/``encode_text``;
    transformers ``get_image_features``/``get_text_features``; the ArcFace IResNet forward).

    Raises TypeError for a reward of a kind without such a baseline.
    """
    from rewards import HPSv2, Identity, PyiqaReward, Sharpness, mean_gradient_magnitude, to_unit_range
    from rewards.identity import arcface_input
    from rewards.preference import TransformersCLIPReward, texts_for

    if isinstance(reward, Sharpness):

        def call(image: torch.Tensor, sample: RewardBatch) -> None:
            mean_gradient_magnitude(image)

    elif isinstance(reward, PyiqaReward):

        def call(image: torch.Tensor, sample: RewardBatch) -> None:
            pair = (image, sample.clean) if reward.needs_clean else (image,)
            reward.metric(*(to_unit_range(x) for x in pair))

    elif isinstance(reward, HPSv2):

        def call(image: torch.Tensor, sample: RewardBatch) -> None:
            reward.model.encode_image(reward.transform(image).to(reward.dtype), normalize=True)
            tokens = reward.tokenizer(texts_for(sample, reward.prompt)).to(reward.device)
            reward.model.encode_text(tokens, normalize=True)

    elif isinstance(reward, TransformersCLIPReward):

        def call(image: torch.Tensor, sample: RewardBatch) -> None:
            reward.model.get_image_features(pixel_values=reward.transform(image).to(reward.dtype))
            if reward.needs_clean:
                reward.model.get_image_features(pixel_values=reward.transform(sample.clean).to(reward.dtype))
                return
            tokens = reward.tokenizer(
                texts_for(sample, reward.prompt),
                padding=True,
                truncation=True,
                max_length=reward.max_length,
                return_tensors="pt",
            ).to(reward.device)
            reward.model.get_text_features(**tokens)

    elif isinstance(reward, Identity):

        def call(image: torch.Tensor, sample: RewardBatch) -> None:
            reward.model(arcface_input(image, reward.crop))
            reward.model(arcface_input(sample.clean, reward.crop))

    else:
        raise TypeError(f"no per-image baseline for reward {reward.name!r} ({type(reward).__name__})")

    def run(images: torch.Tensor, batch: RewardBatch) -> None:
        with torch.no_grad():
            for index in range(images.shape[0]):
                call(images[index : index + 1], batch.select(index, index + 1))

    return run


def bench_reward(
    spec: RewardSpec, images: torch.Tensor, batch: RewardBatch, repeats: int, device: torch.device
) -> dict[str, Any]:
    """Images/s of ``RewardWorker.score`` (the reward actors' call, chunks of the worker's batch
    size) vs :func:`per_image_model_calls` of the same reward on the same images."""
    worker = RewardWorker([spec], device=device, errors=RewardErrorConfig(policy="fail"))
    loop = per_image_model_calls(worker.rewards[0])
    count = images.shape[0]
    ours = count / median_seconds(lambda _: worker.score(images, batch), repeats, device)
    base = count / median_seconds(lambda _: loop(images, batch), repeats, device)
    return make_figure(
        "images/s",
        ours,
        base,
        "batched reward / per-image model calls throughput (>1: the batched reward is faster)",
        {"batch_size": worker.batch_size, "weights": "tiny random" if spec.args else "none"},
    )


def bench_rewards(
    names: Sequence[str], count: int, size: int, group: int, repeats: int, device: torch.device
) -> dict[str, Any]:
    """:func:`bench_reward` for each reward of ``names`` (model rewards with ``rewards.tiny`` weights)
    on the same :func:`reward_inputs`; a reward that cannot be built or scored is skipped, with why."""
    from rewards.tiny import tiny_reward_args

    images, batch = reward_inputs(count, size, group)
    images, batch = images.to(device), batch.to(device)
    figures: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="rlrestore-bench-rewards-") as tmp:
        for name in names:
            try:
                spec = RewardSpec(name=name, args=tiny_reward_args(name, Path(tmp) / name))
                figures[name] = bench_reward(spec, images, batch, repeats, device)
            except Exception as exc:  # noqa: BLE001 - whatever stops one reward is reported, the rest run
                skipped[name] = f"{type(exc).__name__}: {exc}"
    return {
        "settings": {"images": count, "size": size, "candidates_per_caption": group},
        "figures": figures,
        "skipped": skipped,
    }


def format_reward_table(section: dict[str, Any]) -> str:
    """The rewards section as a table: reward, batched and per-image images/s, their ratio."""
    header = f"{'reward':<16} {'batched img/s':>13} {'loop img/s':>11} {'ratio':>7}"
    settings = ", ".join(f"{key}={value}" for key, value in section["settings"].items())
    lines = [f"rewards ({settings}; ratio >1: the batched reward is faster)", header, "-" * len(header)]
    for name, figure in section["figures"].items():
        lines.append(
            f"{name:<16} {figure['ours']:>13.4g} {figure['baseline']:>11.4g} {figure['ratio']:>7.3f}"
        )
    lines += [f"{name:<16} skipped: {reason}" for name, reason in section["skipped"].items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------- driver
def run_bench(
    config: RunConfig,
    out: str | Path,
    repeats: int = 3,
    parts: Sequence[str] | None = None,
    threads: int = 1,
    rewards: Sequence[str] = REWARD_BENCH_DEFAULT,
    reward_images: int = 32,
    reward_size: int = 64,
) -> dict[str, Any]:
    """Run the chosen benchmarks with a random-init policy from ``config``; write and return the report.

    ``rewards``, ``reward_images`` and ``reward_size``: the rewards of the ``rewards`` part and the
    images (count, side in px) each scores.
    """
    from rlrestore.checkpoints import save_checkpoint
    from rlrestore.orchestration.jobs import prepare_shards, ray_session

    parts = PARTS if parts is None else tuple(parts)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or repeats < 1:
        raise ValueError(
            f"parts must be among {PARTS} (got unknown {unknown}) and repeats >= 1 (got {repeats})"
        )
    torch.set_num_threads(threads)
    device = local_device(config.device)
    precision = Precision(config.precision)
    record = DeviceRecord.here("bench", "bench", "local", device, precision.name, precision.compute_dtype)
    stage = config.stage2
    torch.manual_seed(config.seed)
    policy = PrefRestorePolicy.from_config(config.policy).eval() if set(parts) & set(FIGURE_PARTS) else None
    report: dict[str, Any] = {
        "device": str(device),
        "precision": precision.name,
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "statistic": "median after one warm-up",
    }
    if "rollout" in parts:
        # Rollouts sample with an inference copy in the compute dtype; the policy stays float32.
        rollout_policy = precision.for_inference(copy.deepcopy(policy)) if precision.mixed else policy
        report["rollout"] = bench_rollout(
            rollout_policy.to(device),
            stage.rollout.batch_size,
            stage.candidates,
            stage.rollout.sampler_steps,
            repeats,
        )
    if "learner" in parts:
        report["learner"] = bench_learner(
            policy, stage, stage.inputs_per_step * stage.candidates, repeats, device
        )
    if "stage2" in parts:
        with tempfile.TemporaryDirectory(prefix="rlrestore-bench-") as tmp:
            run_config = config.model_copy(update={"run_dir": tmp})
            save_checkpoint(tmp, "stage1.2", 1, policy.to("cpu"), {"step": 1}, keep=1)
            prepare_shards(run_config)
            with ray_session(config.ray):
                from rlrestore.orchestration.bench_stage2 import bench_stage2

                report.update(bench_stage2(run_config, repeats))
    if "rewards" in parts:
        report["rewards"] = bench_rewards(
            rewards, reward_images, reward_size, stage.candidates, repeats, device
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    write_devices(out.parent, "bench", [record])
    return report


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of the report's figures."""
    header = f"{'figure':<19} {'unit':<10} {'ours':>10} {'baseline':>10} {'ratio':>7}  ratio means"
    title = (
        f"device {report['device']}, torch threads {report['torch_threads']}, "
        f"median of {report['repeats']} after one warm-up"
    )
    lines = [title]
    if any(name in report for name in FIGURES):
        lines += [header, "-" * len(header)]
    for name in FIGURES:
        if name in report:
            f = report[name]
            lines.append(
                f"{name:<19} {f['unit']:<10} {f['ours']:>10.4g} {f['baseline']:>10.4g} {f['ratio']:>7.3f}  {f['ratio_means']}"
            )
            lines.append(
                " " * 20
                + ", ".join(
                    f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in f["settings"].items()
                )
            )
    if "rewards" in report:
        lines.append(format_reward_table(report["rewards"]))
    return "\n".join(lines)
