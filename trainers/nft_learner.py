"""Stage 2 learner: DeepSpeed ranks that minimise the DiffusionNFT loss (Eq. 13-15) on the SANA DiT.

Each rank holds three copies of the DiT, wrapped as a velocity field v(x_t, t, c) that composes
its own texture tokens from z_low (``rlrestore.models.policy.encoder_states``: they pass through
the DiT's ``patch_embed``, which full fine-tuning trains, so train and inference agree):

* ``engine``: the trained v_theta, a DeepSpeed engine (ZeRO stage 0, 1 or 2; AdamW with the
  ``OptimConfig`` lr / betas / eps / weight decay, warm-up + cosine or constant schedule, gradient
  clipping by DeepSpeed's ``gradient_clipping``);
* ``v_old``: the frozen rollout policy, an EMA of v_theta refreshed after every optimizer step with
  the reference decay schedules (``rlrestore.nft.ema_decay``); rollout workers sample with it;
* ``v_base`` (only when ``nft.base_penalty > 0``): the frozen starting DiT of the optional penalty
  ``base_penalty * ||v_theta - v_base||^2``.

One :meth:`NFTLearner.train_step` is one optimizer step over the rank's share of a rollout step.
Every stored clean latent x0 with ``valid`` set is trained at ``nft.timesteps_per_sample``
timesteps, each with fresh noise and a separate forward/backward, in micro-batches; gradients
accumulate until the last micro-step. The timesteps are drawn per sample without replacement from
the rollout sampler's own grid (the ``sampler_steps`` times at which the shifted Euler sampler
evaluates the velocity, ``rlrestore.flow.shifted_timesteps``), as the reference trains the
sampler's timesteps; with more timesteps than grid points they are drawn with replacement.
Noise and timesteps of a sample are a pure function of (seed, step, the sample's global index),
and every loss term is weighted by ``world_size / (valid samples of all ranks x timesteps)``, so
the update is the mean over the whole step's valid (sample, timestep) pairs whatever the number of
ranks and however the samples were split. Ranks with fewer micro-batches run zero-weighted ones
so that all ranks run the same collectives.

A step's samples (:class:`NFTSamples`) carry one condition per input and a group index per
candidate, so an input's condition crosses the wire once, not K times.

Precision (``rlrestore.precision``): under bf16-/fp16-mixed DeepSpeed keeps bf16/fp16 module
weights with float32 masters in the optimizer (fp16 with dynamic loss scaling); v_old stays a
float32 copy (its EMA accumulates in float32) and, like v_base, runs under autocast.

``LearnerGroup`` runs N learners as Ray actors forming one torch.distributed group (gloo on CPU,
nccl on GPU) and is what the Stage 2 driver uses.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import json
import math
import os
import pickle
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import deepspeed
import deepspeed.ops
import ray
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from diffusers import SanaTransformer2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rlrestore.config import NFTConfig, OptimConfig, PolicyConfig, Stage2Config
from rlrestore.devices import DeviceName, DeviceRecord, actor_device
from rlrestore.flow import interpolate, shifted_timesteps
from rlrestore.models.loading import CheckpointError
from rlrestore.models.lora import add_lora, merged_state_dict
from rlrestore.models.policy import (
    POLICY_CONFIG,
    Condition,
    PrefRestorePolicy,
    build_vae_connector,
    dit_velocity,
    encoder_states,
)
from rlrestore.nft import ema_decay, ema_update, nft_loss
from rlrestore.precision import Precision, PrecisionName
from trainers.stage1 import derived_seed, lr_lambda

LEARNER_STATE = "learner_state.json"
ENGINE_DIR = "engine"
ENGINE_TAG = "learner"
V_OLD_FILE = "v_old.safetensors"
V_BASE_FILE = "v_base.safetensors"
# Loss-term sums all-reduced at the end of a step, in this order.
_STAT_NAMES = ("loss", "loss_positive", "loss_negative", "old_deviation", "base_penalty")


@dataclass
class NFTSamples:
    """The samples of one learner step: N candidates, each pointing at its input's condition."""

    x0: Tensor  # [N, C, h, w] clean latents of the candidates
    group: Tensor  # [N] long: the row of ``condition`` (the input) each candidate belongs to
    condition: Condition  # G conditions, one per input
    r: Tensor  # [N] optimality probabilities in [0, 1] (``rlrestore.nft.group_normalize``)
    valid: Tensor  # [N] bool; invalid candidates never enter the loss
    index: Tensor | None = None  # [N] global sample ids seeding noise and timesteps

    def __post_init__(self) -> None:
        n = self.x0.shape[0]
        if self.x0.ndim != 4:
            raise ValueError(f"x0 must be [N, C, h, w], got {tuple(self.x0.shape)}")
        for name in ("group", "r", "valid", "index"):
            value = getattr(self, name)
            if value is not None and value.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), one value per candidate; got {tuple(value.shape)}")
        if n and (int(self.group.min()) < 0 or int(self.group.max()) >= len(self.condition)):
            raise ValueError(f"group indices must lie in [0, {len(self.condition)}), the conditions given")

    def __len__(self) -> int:
        return self.x0.shape[0]

    def share(self, rows: slice) -> NFTSamples:
        """The candidates ``rows`` with only the conditions they use (group indices renumbered)."""
        group = self.group[rows]
        used, renumbered = torch.unique(group, return_inverse=True)
        index = None if self.index is None else self.index[rows]
        return NFTSamples(
            self.x0[rows], renumbered.reshape(-1), self.condition.select(used), self.r[rows], self.valid[rows], index
        )


class VelocityField(nn.Module):
    """The DiT as v(x_t, t, c = (semantic, z_low)), the module DeepSpeed wraps (and the frozen
    v_old / v_base copies). The texture tokens are composed with this DiT's own ``patch_embed``
    and the policy's (frozen in Stage 2) ``vae_connector``; the timestep convention is the
    policy's (:func:`rlrestore.models.policy.dit_velocity`)."""

    def __init__(self, transformer: SanaTransformer2DModel, vae_connector: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.vae_connector = vae_connector.requires_grad_(False)

    def forward(self, x_t: Tensor, t: Tensor, semantic: Tensor, z_low: Tensor) -> Tensor:
        states = encoder_states(self.transformer, self.vae_connector, Condition(semantic, z_low))
        return dit_velocity(self.transformer, x_t, t, states)


def load_dit(policy_dir: str | Path) -> tuple[SanaTransformer2DModel, nn.Module, PolicyConfig]:
    """The DiT (``transformer/``), the ``vae_connector`` and the config of a policy checkpoint: the
    learners need nothing else, which spares each rank the AR integrator, the vision tower and the DC-AE."""
    path = Path(policy_dir)
    meta_file = path / POLICY_CONFIG
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a policy checkpoint: {POLICY_CONFIG} is missing")
    try:
        config = PolicyConfig.model_validate(json.loads(meta_file.read_text())["policy"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{meta_file} is unreadable or invalid: {exc}") from None
    try:
        transformer = SanaTransformer2DModel.from_pretrained(
            path / "transformer", local_files_only=True, use_safetensors=True
        )
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}/transformer: cannot load the DiT: {exc}") from None
    return transformer.float(), _load_vae_connector(path, config, transformer), config


def _load_vae_connector(path: Path, config: PolicyConfig, transformer: SanaTransformer2DModel) -> nn.Module:
    own_file = path / "rlrestore_modules.safetensors"
    try:
        tensors = load_file(str(own_file))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{own_file} is missing or corrupt: {exc}") from None
    connector = build_vae_connector(config, transformer)
    prefix = "vae_connector."
    try:
        connector.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    except RuntimeError as exc:
        raise CheckpointError(f"{own_file}: weights of vae_connector do not fit: {exc}") from None
    return connector.float()


def skip_shm_comm_build() -> None:
    """Stop DeepSpeed from JIT-compiling its CPU shared-memory comm op.

    On CPU, ``deepspeed.init_distributed`` compiles ``deepspeed_shm_comm`` with ninja/g++ (77 s
    on 2 cores the first time, then cached in ~/.cache/torch_extensions). The op only serves
    ``inference_all_reduce`` (tensor-parallel inference); training collectives go through
    torch.distributed (gloo) either way. DeepSpeed builds the op only if its compatibility table
    lists it, so marking it incompatible skips the build and leaves training unchanged.
    """
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with ``torch.load(weights_only=True)``.

    DeepSpeed's own loader unpickles with ``weights_only=False``, so a tampered checkpoint could
    run code. Its files hold only tensors, containers and three plain DeepSpeed types (the ZeRO
    optimizer's loss scaler, ZeRO stage enum and parameter-fragment addresses), which are the
    only globals this loader accepts; anything else is refused with a :class:`CheckpointError`.
    """

    SAFE_GLOBALS = (LossScaler, ZeroStageEnum, fragment_address)

    def load(self, path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(list(self.SAFE_GLOBALS)):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            first_line = str(exc).strip().splitlines()[-1]
            raise CheckpointError(
                f"{path}: refusing to load, it holds objects other than tensors and DeepSpeed's "
                f"plain state types ({first_line})"
            ) from None


def free_port() -> int:
    """A TCP port that is free on this machine right now (for the rendezvous of rank 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _module_checksum(module: nn.Module) -> float:
    """Position-weighted sum of every parameter and its square, in float64: equal on identical ranks."""
    total = torch.zeros((), dtype=torch.float64)
    for position, param in enumerate(module.parameters(), start=1):
        values = param.detach().double()
        total += position * (values.sum() + values.square().sum()).cpu()
    return float(total)


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {key: value.detach().cpu().clone().contiguous() for key, value in module.state_dict().items()}


class NFTLearner:
    """One DeepSpeed rank of the Stage 2 learner (plain class: runs and tests without Ray).

    ``policy`` is a policy checkpoint directory (only its DiT is loaded) or a
    :class:`PrefRestorePolicy`, whose DiT is copied. With ``world_size > 1`` the caller sets
    MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK (``LearnerGroup`` does); a single
    rank sets them itself. ``total_steps`` shapes a cosine schedule, ``sampler_steps`` the timestep
    grid, ``seed`` the noise and timesteps.
    """

    def __init__(
        self,
        policy: str | Path | PrefRestorePolicy,
        nft: NFTConfig,
        optim: OptimConfig,
        *,
        micro_batch: int = 8,
        finetune: Literal["full", "lora"] = "full",
        lora_rank: int = 32,
        lora_alpha: float = 32.0,
        lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
        lora_init: Literal["default", "gaussian"] = "default",
        zero_stage: int = 2,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        sampler_steps: int = 10,
        total_steps: int = 100,
        seed: int = 0,
        precision: PrecisionName = "fp32",
    ) -> None:
        if finetune not in ("full", "lora"):
            raise ValueError(f"finetune must be 'full' or 'lora', got {finetune!r}")
        if zero_stage not in (0, 1, 2):
            raise ValueError(
                f"zero_stage={zero_stage} is not supported by the learner: ZeRO-3 partitions the DiT "
                "parameters, which the v_old EMA and the rollout weights read whole; use 0, 1 or 2"
            )
        if micro_batch < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need micro_batch >= 1 and 0 <= rank < world_size; got {micro_batch=}, {rank=}, {world_size=}"
            )
        self.nft, self.optim = nft, optim
        self.micro_batch, self.zero_stage = micro_batch, zero_stage
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.finetune, self.lora_rank = finetune, lora_rank
        self.device = torch.device(device)
        self.precision = Precision(precision)
        self.step = 0  # index of the next update (the last train_step's step + 1)

        if isinstance(policy, PrefRestorePolicy):
            transformer, policy_config = copy.deepcopy(policy.transformer).float(), policy.config
            vae_connector = copy.deepcopy(policy.vae_connector).float()
        else:
            transformer, vae_connector, policy_config = load_dit(policy)
        self.timestep_grid = shifted_timesteps(sampler_steps, policy_config.flow_shift)[:-1]
        field = VelocityField(transformer, vae_connector).to(self.device)
        if finetune == "lora":
            add_lora(transformer, lora_rank, lora_alpha, lora_targets, init=lora_init)
        else:
            transformer.requires_grad_(True)
        # float32 copies made before DeepSpeed casts the trained one: v_old's EMA accumulates in float32
        self.v_old = self._frozen_copy(field)
        self.v_base = self.precision.for_inference(self._frozen_copy(field)) if nft.base_penalty > 0 else None

        with self._lone_rank_env():
            self._init_distributed()
            self.engine, *_ = deepspeed.initialize(
                model=field.train(),
                model_parameters=[p for p in field.parameters() if p.requires_grad],
                config=self._deepspeed_config(),
                lr_scheduler=functools.partial(self._schedule, total_steps=total_steps),
            )
        self.engine.checkpoint_engine = WeightsOnlyCheckpointEngine(self.engine._config)

    # ----------------------------------------------------------------------------- setup
    @staticmethod
    def _frozen_copy(field: VelocityField) -> VelocityField:
        frozen = copy.deepcopy(field).eval()
        frozen.requires_grad_(False)
        return frozen

    def _trained(self, field: nn.Module) -> list[Tensor]:
        """The parameters the optimizer updates (all of them, or the LoRA factors), in module
        order: the EMA of v_old only needs these, the frozen base weights are equal in both."""
        names = {name for name, param in self.engine.module.named_parameters() if param.requires_grad}
        return [param for name, param in field.named_parameters() if name in names]

    @contextlib.contextmanager
    def _lone_rank_env(self) -> Iterator[None]:
        """DeepSpeed reads the launcher's variables (RANK, LOCAL_RANK, ...) from the environment.
        A lone rank sets them for its own set-up only and restores the caller's environment after,
        so they leak neither into later code nor into processes started afterwards (Ray workers)."""
        if self.world_size > 1:
            yield
            return
        names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
        saved = {name: os.environ.get(name) for name in names}
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def _init_distributed(self) -> None:
        """Join the process group (gloo on CPU, nccl on GPU), or check the one already there."""
        if dist.is_initialized() and (
            dist.get_world_size() != self.world_size or dist.get_rank() != self.rank
        ):
            raise RuntimeError(
                f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, but this learner is rank {self.rank} of {self.world_size}"
            )
        skip_shm_comm_build()
        deepspeed.init_distributed(
            dist_backend="nccl" if self.device.type == "cuda" else "gloo", verbose=False
        )

    def _deepspeed_config(self) -> dict[str, Any]:
        optim = self.optim
        return {
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": 1,  # the step's micro-batch count varies: boundary set by hand
            "gradient_clipping": optim.grad_clip,
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": optim.lr,
                    "betas": list(optim.betas),
                    "eps": optim.eps,
                    "weight_decay": optim.weight_decay,
                    "torch_adam": True,  # torch.optim.AdamW: no fused-Adam op to JIT-build
                },
            },
            "zero_optimization": {"stage": self.zero_stage},
            **self.precision.deepspeed(),
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }

    def _schedule(
        self, optimizer: torch.optim.Optimizer, total_steps: int
    ) -> torch.optim.lr_scheduler.LambdaLR:
        optim = self.optim
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_lambda(s, total_steps, optim.warmup_ratio, optim.schedule)
        )

    # ----------------------------------------------------------------------------- training
    def train_step(self, samples: NFTSamples, step: int) -> dict[str, float]:
        """One optimizer step on this rank's samples; every rank of the group must call it.

        Candidates without ``valid`` never enter the loss; ``index`` (default
        ``rank * N + arange(N)``) seeds each candidate's noise and timesteps.

        Returns metrics of the whole group (identical on every rank but ``step_time``). If no rank
        has a valid sample, nothing is updated (no optimizer step, no EMA) and the metrics say
        ``samples = 0``, ``skipped = 1``.
        """
        began = time.perf_counter()
        valid = self._valid_samples(samples)
        counts = torch.tensor([len(valid), math.ceil(len(valid) / self.micro_batch)], dtype=torch.float64)
        total_samples = int(self._all_reduce(counts[:1], dist.ReduceOp.SUM))
        micro_steps = int(self._all_reduce(counts[1:], dist.ReduceOp.MAX))
        lr = float(self.engine.get_lr()[0])
        if total_samples == 0:
            self.step = step + 1
            return {"samples": 0.0, "skipped": 1.0, "lr": lr, "step_time": time.perf_counter() - began}

        timesteps = self.nft.timesteps_per_sample
        t, eps = self._noise_and_timesteps(valid.index, step, valid.x0.shape[1:])
        weight = self.world_size / (total_samples * timesteps)
        sums = torch.zeros(len(_STAT_NAMES), dtype=torch.float64)
        for micro in range(micro_steps):
            part = slice(micro * self.micro_batch, (micro + 1) * self.micro_batch)
            for j in range(timesteps):
                self.engine.set_gradient_accumulation_boundary(
                    micro == micro_steps - 1 and j == timesteps - 1
                )
                if part.start < len(valid):
                    condition = valid.condition.select(valid.group[part])
                    loss, stats = self._loss(valid.x0[part], condition, valid.r[part], t[part, j], eps[part, j])
                    count = len(valid.r[part])
                    self.engine.backward(loss * (count * weight))
                    sums += count * stats
                else:  # this rank is out of samples: a zero-weighted pass keeps the collectives in step
                    self.engine.backward(self._idle_loss(samples))

        grad_norm = self._grad_norm_before_step()
        self.engine.step()
        if grad_norm is None:
            grad_norm = float(self.engine.get_global_grad_norm())
        decay = ema_decay(step, self.nft.ema_schedule)
        ema_update(self._trained(self.v_old), self._trained(self.engine.module), decay)
        self.step = step + 1

        sums = self._all_reduce(sums, dist.ReduceOp.SUM) / (total_samples * timesteps)
        metrics = dict(zip(_STAT_NAMES, sums.tolist(), strict=True))
        if self.v_base is None:
            del metrics["base_penalty"]
        metrics.update(
            grad_norm=grad_norm,
            lr=lr,
            ema_decay=decay,
            samples=float(total_samples),
            skipped=0.0,
            step_time=time.perf_counter() - began,
        )
        return metrics

    def skip_step(self, step: int) -> None:
        """A step the driver skipped (its rewards failed): nothing trains, but the step counts, so a
        checkpoint written after it resumes at the next step."""
        self.step = step + 1

    def _valid_samples(self, samples: NFTSamples) -> NFTSamples:
        """The valid candidates of ``samples`` (with their global ``index``) on the learner's device."""
        if not isinstance(samples, NFTSamples):
            raise TypeError(f"a learner step takes NFTSamples, got {type(samples).__name__}")
        n = len(samples)
        index = samples.index if samples.index is not None else self.rank * n + torch.arange(n)
        valid = samples.valid.bool()
        if valid.any() and not bool(((samples.r[valid] >= 0) & (samples.r[valid] <= 1)).all()):
            raise ValueError("r must lie in [0, 1] for valid samples (see rlrestore.nft.group_normalize)")
        keep = valid.nonzero().squeeze(1)
        return NFTSamples(
            x0=samples.x0[keep].to(self.device, torch.float32),
            group=samples.group[keep].to(self.device),
            condition=samples.condition.to(self.device),
            r=samples.r[keep].to(self.device, torch.float32),
            valid=torch.ones(len(keep), dtype=torch.bool),
            index=index[keep].long(),
        )

    def _noise_and_timesteps(self, index: Tensor, step: int, shape: torch.Size) -> tuple[Tensor, Tensor]:
        """[n, T] timesteps from the sampler grid and [n, T, C, h, w] noise (float32), seeded per sample."""
        grid, count = self.timestep_grid, self.nft.timesteps_per_sample
        times, noise = [], []
        for sample in index.tolist():
            generator = torch.Generator().manual_seed(derived_seed(self.seed, "nft", step, sample))
            if count <= len(grid):
                picks = torch.randperm(len(grid), generator=generator)[:count]
            else:
                picks = torch.randint(len(grid), (count,), generator=generator)
            times.append(grid[picks])
            noise.append(torch.randn((count, *shape), generator=generator))
        if not times:  # no valid sample on this rank: it only runs zero-weighted passes
            return torch.empty(0, count), torch.empty(0, count, *shape)
        return torch.stack(times).to(self.device), torch.stack(noise).to(self.device)

    def _loss(self, x0: Tensor, condition: Condition, r: Tensor, t: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """Mean NFT loss (+ base penalty) of one micro-batch at one timestep per sample, and its stats.

        x_t, t and the loss stay float32; the networks cast their inputs to their weight dtype."""
        x_t = interpolate(x0, eps, t)
        v_theta = self.engine(x_t, t, condition.semantic, condition.z_low).float()
        with torch.no_grad(), self.precision.autocast(self.device):
            v_old = self.v_old(x_t, t, condition.semantic, condition.z_low).float()
        loss, stats = nft_loss(
            v_theta, v_old, x0, eps, t, r,
            beta=self.nft.beta,
            form=self.nft.loss_form,
            adaptive_scale=self.nft.adaptive_scale,
        )
        penalty = torch.zeros((), device=loss.device)
        if self.v_base is not None:
            with torch.no_grad(), self.precision.autocast(self.device):
                v_base = self.v_base(x_t, t, condition.semantic, condition.z_low).float()
            penalty = (v_theta - v_base).square().mean()
            loss = loss + self.nft.base_penalty * penalty
        values = [loss, stats["loss_positive"], stats["loss_negative"], stats["old_deviation"], penalty]
        return loss, torch.stack([v.detach().double().cpu() for v in values])

    def _idle_loss(self, samples: NFTSamples) -> Tensor:
        """A zero-weighted forward of one blank sample shaped like ``samples``."""
        condition = samples.condition.select(torch.zeros(1, dtype=torch.long)).to(self.device)
        x = torch.zeros(1, *samples.x0.shape[1:], device=self.device)
        v = self.engine(x, torch.ones(1, device=self.device), condition.semantic * 0, condition.z_low * 0)
        return v.float().sum() * 0.0

    def _grad_norm_before_step(self) -> float | None:
        """ZeRO-1/2 report the pre-clipping norm themselves; ZeRO-0 (plain fp32) does not."""
        if self.zero_stage > 0:
            return None
        grads = [p.grad.detach().double() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0

    def _all_reduce(self, values: Tensor, op: dist.ReduceOp) -> Tensor:
        if self.world_size == 1:
            return values
        # gloo reduces CPU tensors, nccl device tensors
        moved = values.to(self.device)
        dist.all_reduce(moved, op=op)
        return moved.cpu()

    # ----------------------------------------------------------------------------- weights
    def state_dict_for_rollout(self) -> dict[str, Tensor]:
        """The DiT weights rollout workers sample with: v_old, the EMA of the trained weights, as the
        reference samples with its old (EMA) policy. Keys of ``policy.transformer.state_dict()``
        (LoRA adapters merged into their layers)."""
        return merged_state_dict(self.v_old.transformer)

    def trained_state_dict(self) -> dict[str, Tensor]:
        """The trained DiT weights v_theta (keys of ``policy.transformer.state_dict()``, LoRA merged)."""
        return merged_state_dict(self.engine.module.transformer)

    def checksums(self) -> dict[str, float]:
        """Cheap fingerprints of v_theta and v_old; ranks of one group must agree exactly."""
        return {"trained": _module_checksum(self.engine.module), "v_old": _module_checksum(self.v_old)}

    def optimizer_state_numel(self) -> int:
        """Elements of optimizer state this rank holds: AdamW's moments plus the float32 master
        copies it steps on when those are not the module's own parameters (ZeRO-1/2 partitions,
        mixed precision). ZeRO-1/2 split all of it over the ranks."""
        optimizer = self.engine.optimizer
        inner = getattr(optimizer, "optimizer", optimizer)
        own = {id(param) for param in self.engine.module.parameters()}
        stepped = [param for group in inner.param_groups for param in group["params"]]
        masters = sum(param.numel() for param in stepped if id(param) not in own)
        moments = sum(
            value.numel()
            for state in inner.state.values()
            for value in state.values()
            if torch.is_tensor(value) and value.ndim > 0
        )
        return masters + moments

    def device_record(self, actor: str) -> DeviceRecord:
        """Where this rank computes (for ``devices.json``); its weights' dtype is DeepSpeed's module dtype."""
        dtype = next(self.engine.module.parameters()).dtype
        return DeviceRecord.here("stage2", "learner", actor, self.device, self.precision.name, dtype)

    # ----------------------------------------------------------------------------- checkpoints
    def save(self, directory: str | Path) -> None:
        """Write the learner state; every rank calls it with the same (shared) directory.

        ``engine/`` is DeepSpeed's checkpoint (v_theta, the ZeRO-partitioned AdamW state and the
        schedule, one file per rank); rank 0 adds ``v_old.safetensors``, ``v_base.safetensors``
        (with a base penalty) and ``learner_state.json`` (step, world size, ZeRO stage).
        """
        directory = Path(directory)
        self.engine.save_checkpoint(str(directory / ENGINE_DIR), tag=ENGINE_TAG, save_latest=False)
        if self.rank == 0:
            save_file(_cpu_state(self.v_old.transformer), str(directory / V_OLD_FILE))
            if self.v_base is not None:
                save_file(_cpu_state(self.v_base.transformer), str(directory / V_BASE_FILE))
            state = {"step": self.step, **self._layout()}
            (directory / LEARNER_STATE).write_text(json.dumps(state, indent=2))
        self._barrier()

    def load(self, directory: str | Path) -> None:
        """Restore a state written by :meth:`save` with the same world size, ZeRO stage and
        fine-tuning mode. Every file is read without executing pickled code (safetensors, and
        :class:`WeightsOnlyCheckpointEngine` for DeepSpeed's engine files)."""
        directory = Path(directory)
        state_file = directory / LEARNER_STATE
        if not state_file.is_file():
            raise CheckpointError(f"{directory} is not a learner checkpoint: {LEARNER_STATE} is missing")
        state = json.loads(state_file.read_text())
        ours = self._layout()
        saved = {key: state.get(key, "full" if key == "finetune" else None) for key in ours}
        if saved != ours:
            raise CheckpointError(
                f"{directory} was written by learners with {saved}; these run with {ours}: "
                "start the same number of learners with the same zero_stage and finetune settings to resume"
            )
        path, _ = self.engine.load_checkpoint(str(directory / ENGINE_DIR), tag=ENGINE_TAG)
        if path is None:
            raise CheckpointError(
                f"{directory / ENGINE_DIR}: DeepSpeed found no checkpoint tagged {ENGINE_TAG!r}"
            )
        self.v_old.transformer.load_state_dict(load_file(str(directory / V_OLD_FILE)))
        if self.v_base is not None:
            base_file = directory / V_BASE_FILE
            if not base_file.is_file():
                raise CheckpointError(f"{directory}: {V_BASE_FILE} is missing but nft.base_penalty > 0")
            self.v_base.transformer.load_state_dict(load_file(str(base_file)))
        self.step = int(state["step"])

    def _layout(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed by this learner (state shapes and partitions)."""
        layout: dict[str, Any] = {
            "world_size": self.world_size,
            "zero_stage": self.zero_stage,
            "finetune": self.finetune,
        }
        if self.finetune == "lora":
            layout["lora_rank"] = self.lora_rank
        return layout

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


class LearnerActor:
    """Thin Ray actor around :class:`NFTLearner`: it joins the group in :meth:`setup`, once rank 0's
    address is known, and otherwise forwards calls. It runs on the device its resources give it."""

    def __init__(self, num_cpus: float, num_gpus: float, device: DeviceName) -> None:
        torch.set_num_threads(max(1, int(num_cpus)))
        self.device = actor_device(device, num_gpus, "Stage 2 learner ranks", "stage2.resources.learner.num_gpus")
        self.learner: NFTLearner | None = None

    def address(self) -> tuple[str, str, int]:
        """(node id, node IP, a free port there)."""
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), free_port()

    def setup(
        self, rank: int, world_size: int, local_rank: int, master: tuple[str, int], **kwargs: Any
    ) -> None:
        os.environ.update(
            MASTER_ADDR=master[0],
            MASTER_PORT=str(master[1]),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(local_rank),
        )
        self.learner = NFTLearner(rank=rank, world_size=world_size, device=self.device, **kwargs)

    def uses_cuda(self) -> bool:
        return self.device.type == "cuda"

    def train_step(self, samples: NFTSamples, step: int) -> dict[str, float]:
        return self.learner.train_step(samples, step)

    def skip_step(self, step: int) -> None:
        self.learner.skip_step(step)

    def optimizer_state_numel(self) -> int:
        return self.learner.optimizer_state_numel()

    def device_record(self, actor: str) -> DeviceRecord:
        return self.learner.device_record(actor)

    def state_dict_for_rollout(self) -> dict[str, Tensor]:
        return self.learner.state_dict_for_rollout()

    def trained_state_dict(self) -> dict[str, Tensor]:
        return self.learner.trained_state_dict()

    def checksums(self) -> dict[str, float]:
        return self.learner.checksums()

    def save(self, directory: str) -> None:
        self.learner.save(directory)

    def load(self, directory: str) -> int:
        self.learner.load(directory)
        return self.learner.step


class LearnerLost(RuntimeError):
    """A learner rank died (its process or node was lost): the group cannot go on and must be rebuilt."""


def gather(refs: list[ray.ObjectRef]) -> list[Any]:
    """``ray.get`` that raises as soon as any rank fails, instead of waiting on ranks that are
    blocked in a collective with the failed one. A dead rank raises :class:`LearnerLost`."""
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)
        return ray.get(refs)
    except ray.exceptions.RayActorError as exc:
        raise LearnerLost(f"a learner rank died: {type(exc).__name__}: {exc}") from exc


def split_samples(samples: NFTSamples, world_size: int) -> list[NFTSamples]:
    """Contiguous near-equal shares, one per rank (sizes differ by at most one; the first
    ``N % world_size`` ranks get the extra sample), each with only the conditions its candidates
    use. Nothing is dropped or padded: the learners weight the loss by the step's global sample
    count, and each sample keeps its global ``index``."""
    n = len(samples)
    if samples.index is None:
        samples = replace(samples, index=torch.arange(n))
    sizes = [len(part) for part in torch.tensor_split(torch.arange(n), world_size)]
    edges = [0, *itertools.accumulate(sizes)]
    return [samples.share(slice(edges[rank], edges[rank + 1])) for rank in range(world_size)]


class LearnerGroup:
    """``stage2.resources.learner.num_actors`` learner ranks as Ray actors in one torch.distributed group.

    Rank 0 picks the rendezvous address on its node; every rank learns it before joining. A rank
    that dies breaks the group's collectives, so learners are not restarted: resume the run from a
    checkpoint (:meth:`save` / :meth:`load`; the directory must be visible to every rank's node).
    When a call raises, the other ranks may be stuck in a collective: :meth:`shutdown` the group.
    A dead rank raises :class:`LearnerLost` from any call; the Stage 2 driver then rebuilds the
    group from the newest checkpoint.
    On GPUs each actor sees its own device (Ray sets CUDA_VISIBLE_DEVICES), so LOCAL_RANK is 0.
    """

    def __init__(
        self,
        policy_dir: str | Path,
        stage2: Stage2Config,
        *,
        seed: int = 0,
        device: DeviceName = "auto",
        precision: PrecisionName = "fp32",
        scheduling_strategies: list | None = None,
    ) -> None:
        resources, learner = stage2.resources.learner, stage2.learner
        strategies = scheduling_strategies or [None] * resources.num_actors
        actor_class = ray.remote(LearnerActor)
        self.actors = [
            actor_class.options(
                num_cpus=resources.num_cpus,
                num_gpus=resources.num_gpus,
                max_restarts=0,
                scheduling_strategy=strategy,
            ).remote(resources.num_cpus, resources.num_gpus, device)
            for strategy in strategies
        ]
        self.world_size = len(self.actors)
        try:
            addresses = gather([actor.address.remote() for actor in self.actors])
            use_cuda = gather([self.actors[0].uses_cuda.remote()])[0]
        except Exception:
            self.shutdown()
            raise
        master = (addresses[0][1], addresses[0][2])
        nodes = [node for node, _, _ in addresses]
        learner_args = {
            "policy": str(policy_dir),
            "nft": stage2.nft,
            "optim": stage2.optim,
            "micro_batch": learner.micro_batch,
            "finetune": learner.finetune,
            "lora_rank": learner.lora_rank,
            "lora_alpha": learner.lora_alpha,
            "lora_targets": tuple(learner.lora_targets),
            "lora_init": learner.lora_init,
            "zero_stage": learner.zero_stage,
            "sampler_steps": stage2.rollout.sampler_steps,
            "total_steps": stage2.steps,
            "seed": seed,
            "precision": precision,
        }
        setups = [
            actor.setup.remote(
                rank=rank,
                world_size=self.world_size,
                local_rank=0 if use_cuda else nodes[:rank].count(nodes[rank]),
                master=master,
                **learner_args,
            )
            for rank, actor in enumerate(self.actors)
        ]
        try:
            gather(setups)
        except Exception:
            self.shutdown()
            raise

    def train_step(self, samples: NFTSamples, step: int) -> dict[str, float]:
        """Split the step's samples over the ranks, train, and return the group's metrics
        (rank 0's, which are all-reduced over the group; ``step_time`` is the slowest rank's)."""
        shares = split_samples(samples, self.world_size)
        results = gather(
            [actor.train_step.remote(share, step) for actor, share in zip(self.actors, shares, strict=True)]
        )
        metrics = dict(results[0])
        metrics["step_time"] = max(result["step_time"] for result in results)
        return metrics

    def skip_step(self, step: int) -> None:
        """Count ``step`` on every rank without training (see :meth:`NFTLearner.skip_step`)."""
        gather([actor.skip_step.remote(step) for actor in self.actors])

    def optimizer_state_numel(self) -> list[int]:
        """Optimizer-state elements held by each rank (ZeRO-1/2 split them)."""
        return gather([actor.optimizer_state_numel.remote() for actor in self.actors])

    def device_records(self) -> list[DeviceRecord]:
        return gather([actor.device_record.remote(f"rank {rank}") for rank, actor in enumerate(self.actors)])

    def rollout_weights_ref(self) -> ray.ObjectRef:
        """Object ref of rank 0's v_old DiT weights: pass it to rollout actors without a copy here
        (a dead rank 0 surfaces as :class:`LearnerLost` where the ref is waited on)."""
        return self.actors[0].state_dict_for_rollout.remote()

    def rollout_weights(self) -> dict[str, Tensor]:
        """Rank 0's v_old DiT weights (see :meth:`NFTLearner.state_dict_for_rollout`)."""
        return gather([self.rollout_weights_ref()])[0]

    def trained_weights(self) -> dict[str, Tensor]:
        return gather([self.actors[0].trained_state_dict.remote()])[0]

    def check_in_sync(self) -> dict[str, float]:
        """Rank 0's checksums, after checking that every rank holds the same v_theta and v_old."""
        sums = gather([actor.checksums.remote() for actor in self.actors])
        differing = [rank for rank, value in enumerate(sums) if value != sums[0]]
        if differing:
            raise RuntimeError(f"learner ranks {differing} differ from rank 0: {sums}")
        return sums[0]

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        gather([actor.save.remote(str(directory)) for actor in self.actors])

    def load(self, directory: str | Path) -> int:
        """Restore every rank; returns the step to resume from."""
        return gather([actor.load.remote(str(directory)) for actor in self.actors])[0]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
