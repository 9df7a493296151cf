"""One learner rank: DeepSpeed minimising the DiffusionNFT loss (Eq. 13-15) on a policy's velocity model.

Each rank holds three copies of the velocity model (``rlrestore.policies.VelocityModel``, for
Pref-Restore the SANA DiT with its z_low connector):

* ``engine``: the trained v_theta, a DeepSpeed engine (ZeRO stage 0, 1 or 2; AdamW with the
  ``OptimConfig`` lr / betas / eps / weight decay, warm-up + cosine or constant schedule, gradient
  clipping by DeepSpeed's ``gradient_clipping``); only the model's ``stage2_modules`` train (or
  their LoRA adapters);
* ``v_old``: the frozen rollout policy, an EMA of v_theta refreshed after every optimizer step with
  the reference decay schedules (``rlrestore.nft.ema_decay``); rollout workers sample with it;
* ``v_base`` (only when ``nft.base_penalty > 0``): the frozen starting model of the optional penalty
  ``base_penalty * ||v_theta - v_base||^2``.

One :meth:`NFTLearner.train_step` is one optimizer step over the rank's share of a rollout step.
Every stored clean latent x0 with ``valid`` set is trained at ``nft.timesteps_per_sample``
timesteps, each with fresh noise and a separate forward/backward, in micro-batches; gradients
accumulate until the last micro-step. x_t interpolates between x0 and the path's endpoint that the
velocity model names (fresh noise for Pref-Restore). The timesteps are drawn per sample without
replacement from the rollout sampler's own grid (``rlrestore.flow.sampling_times``, up to the
model's ``t_max``), as the reference trains the sampler's timesteps; with more timesteps than grid
points they are drawn with replacement. Noise and timesteps of a sample are a pure function of
(seed, step, the sample's global index), and every loss term is weighted by
``world_size / (valid samples of all ranks x timesteps)``, so the update is the mean over the whole
step's valid (sample, timestep) pairs whatever the number of ranks and however the samples were
split. Ranks with fewer micro-batches run zero-weighted ones so that all ranks run the same
collectives.

Precision (``rlrestore.runtime.precision``): under bf16-/fp16-mixed DeepSpeed keeps bf16/fp16 module
weights with float32 masters in the optimizer (fp16 with dynamic loss scaling); v_old stays a
float32 copy (its EMA accumulates in float32) and, like v_base, runs under autocast.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import deepspeed
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rlrestore.config import NFTConfig, OptimConfig
from rlrestore.flow import interpolate, sampling_times
from rlrestore.models.loading import CheckpointError
from rlrestore.models.lora import add_lora, merged_state_dict
from rlrestore.nft import ema_decay, ema_update, nft_loss
from rlrestore.policies import Condition, RestorationPolicy, VelocityModel, load_velocity_model
from rlrestore.runtime.dataplane import FULL, LORA, WeightUpdate
from rlrestore.runtime.devices import DeviceRecord
from rlrestore.runtime.precision import Precision, PrecisionName
from rlrestore.runtime.schedules import lr_lambda
from rlrestore.runtime.seeds import derived_seed
from trainers.nft_learner.engine import (
    WeightsOnlyCheckpointEngine,
    deepspeed_config,
    init_distributed,
    lone_rank_env,
)
from trainers.nft_learner.samples import NFTSamples

LEARNER_STATE = "learner_state.json"
ENGINE_DIR = "engine"
ENGINE_TAG = "learner"
V_OLD_FILE = "v_old.safetensors"
V_BASE_FILE = "v_base.safetensors"
# Loss-term sums all-reduced at the end of a step, in this order.
_STAT_NAMES = ("loss", "loss_positive", "loss_negative", "old_deviation", "base_penalty")


def _module_checksum(module: nn.Module) -> float:
    """Position-weighted sum of every parameter and its square, in float64: equal on identical ranks."""
    total = torch.zeros((), dtype=torch.float64)
    for position, param in enumerate(module.parameters(), start=1):
        values = param.detach().double()
        total += position * (values.sum() + values.square().sum()).cpu()
    return float(total)


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {key: value.detach().cpu().clone().contiguous() for key, value in module.state_dict().items()}


def _load_weights(module: nn.Module, path: Path) -> None:
    """Strictly load a safetensors state into ``module``; a file of an older learner layout is refused."""
    try:
        module.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} does not fit this learner's velocity model (a learner state of an older rlrestore "
            f"release cannot be resumed; restart Stage 2 from the policy): {str(exc).splitlines()[0]}"
        ) from None


class NFTLearner:
    """One DeepSpeed rank of the Stage 2 learner (plain class: runs and tests without Ray).

    ``policy`` is a policy directory (only its velocity model is loaded,
    ``rlrestore.policies.load_velocity_model``) or a policy, whose velocity model is copied. With ``world_size > 1`` the caller sets
    MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK (``LearnerGroup`` does); a single
    rank sets them itself. ``total_steps`` shapes a cosine schedule, ``sampler_steps`` the timestep
    grid, ``seed`` the noise and timesteps.
    """

    def __init__(
        self,
        policy: str | Path | RestorationPolicy,
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
        self.lora_alpha, self.lora_targets = lora_alpha, list(lora_targets)
        self.device = torch.device(device)
        self.precision = Precision(precision)
        self.step = 0  # index of the next update (the last train_step's step + 1)

        if isinstance(policy, RestorationPolicy):
            field = copy.deepcopy(policy.velocity_model).float()
        else:
            field = load_velocity_model(policy)
        # the rollout sampler's grid: the times at which it evaluates the velocity (up to t_max)
        self.timestep_grid = sampling_times(sampler_steps, field.flow_shift, field.t_max)[:-1]
        field = field.to(self.device).requires_grad_(False)
        for module in field.stage2_modules():
            if finetune == "lora":
                add_lora(module, lora_rank, lora_alpha, lora_targets, init=lora_init)
            else:
                module.requires_grad_(True)
        # float32 copies made before DeepSpeed casts the trained one: v_old's EMA accumulates in float32
        self.v_old = self._frozen_copy(field)
        self.v_base = self.precision.for_inference(self._frozen_copy(field)) if nft.base_penalty > 0 else None

        with lone_rank_env(world_size):
            init_distributed(rank, world_size, self.device)
            self.engine, *_ = deepspeed.initialize(
                model=field.train(),
                model_parameters=[p for p in field.parameters() if p.requires_grad],
                config=deepspeed_config(optim, micro_batch, zero_stage, self.precision),
                lr_scheduler=functools.partial(self._schedule, total_steps=total_steps),
            )
        self.engine.checkpoint_engine = WeightsOnlyCheckpointEngine(self.engine._config)

    # ----------------------------------------------------------------------------- setup
    @staticmethod
    def _frozen_copy(field: VelocityModel) -> VelocityModel:
        frozen = copy.deepcopy(field).eval()
        frozen.requires_grad_(False)
        return frozen

    def _trained(self, field: nn.Module) -> list[Tensor]:
        """The parameters the optimizer updates (all of them, or the LoRA factors), in module
        order: the EMA of v_old only needs these, the frozen base weights are equal in both."""
        names = {name for name, param in self.engine.module.named_parameters() if param.requires_grad}
        return [param for name, param in field.named_parameters() if name in names]

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
                    loss, stats = self._loss(
                        valid.x0[part], condition, valid.r[part], t[part, j], eps[part, j]
                    )
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

    def _loss(
        self, x0: Tensor, condition: Condition, r: Tensor, t: Tensor, eps: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Mean NFT loss (+ base penalty) of one micro-batch at one timestep per sample, and its stats.

        x_t, t and the loss stay float32; the networks cast their inputs to their weight dtype."""
        endpoint = self.v_old.endpoint(condition, eps)  # where the path ends (pure noise for most flows)
        x_t = interpolate(x0, endpoint, t)
        v_theta = self.engine(x_t, t, condition).float()
        with torch.no_grad(), self.precision.autocast(self.device):
            v_old = self.v_old(x_t, t, condition).float()
        loss, stats = nft_loss(
            v_theta,
            v_old,
            x0,
            endpoint,
            t,
            r,
            beta=self.nft.beta,
            form=self.nft.loss_form,
            adaptive_scale=self.nft.adaptive_scale,
        )
        penalty = torch.zeros((), device=loss.device)
        if self.v_base is not None:
            with torch.no_grad(), self.precision.autocast(self.device):
                v_base = self.v_base(x_t, t, condition).float()
            penalty = (v_theta - v_base).square().mean()
            loss = loss + self.nft.base_penalty * penalty
        values = [loss, stats["loss_positive"], stats["loss_negative"], stats["old_deviation"], penalty]
        return loss, torch.stack([v.detach().double().cpu() for v in values])

    def _idle_loss(self, samples: NFTSamples) -> Tensor:
        """A zero-weighted forward of one blank sample shaped like ``samples``."""
        condition = samples.condition.select(torch.zeros(1, dtype=torch.long)).zeros().to(self.device)
        x = torch.zeros(1, *samples.x0.shape[1:], device=self.device)
        v = self.engine(x, torch.ones(1, device=self.device), condition)
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
        reference samples with its old (EMA) policy. Keys of ``policy.velocity_model.state_dict()``
        (LoRA adapters merged into their layers)."""
        return merged_state_dict(self.v_old)

    def rollout_update(self) -> WeightUpdate:
        """What the rollout actors need of v_old, in their compute dtype: the LoRA factors when only
        adapters train (with their rank, alpha and targets), else the trained weights; the frozen
        rest is what the actors loaded from the policy directory."""
        return self._update_of(self.v_old)

    def trained_update(self) -> WeightUpdate:
        """v_theta (what a checkpoint's policy holds) as a :meth:`rollout_update`-shaped update: a
        rollout actor restores the held-out faces with it (``stage2.eval_every``)."""
        return self._update_of(self.engine.module)

    def _update_of(self, field: nn.Module) -> WeightUpdate:
        names = {name for name, param in self.engine.module.named_parameters() if param.requires_grad}
        dtype = self.precision.compute_dtype
        tensors = {
            name: param.detach().to("cpu", dtype).contiguous()
            for name, param in field.named_parameters()
            if name in names
        }
        if self.finetune == "lora":
            lora = {"rank": self.lora_rank, "alpha": self.lora_alpha, "targets": self.lora_targets}
            return WeightUpdate(LORA, tensors, lora)
        return WeightUpdate(FULL, tensors)

    def trained_state_dict(self) -> dict[str, Tensor]:
        """The trained weights v_theta (keys of ``policy.velocity_model.state_dict()``, LoRA merged)."""
        return merged_state_dict(self.engine.module)

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
            save_file(_cpu_state(self.v_old), str(directory / V_OLD_FILE))
            if self.v_base is not None:
                save_file(_cpu_state(self.v_base), str(directory / V_BASE_FILE))
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
        _load_weights(self.v_old, directory / V_OLD_FILE)
        if self.v_base is not None:
            base_file = directory / V_BASE_FILE
            if not base_file.is_file():
                raise CheckpointError(f"{directory}: {V_BASE_FILE} is missing but nft.base_penalty > 0")
            _load_weights(self.v_base, base_file)
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
