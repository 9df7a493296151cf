"""Stage 1 (1.1 and 1.2) training loop, run by every Ray Train worker.

Each worker builds the policy on the device Ray Train gave it (``rlrestore.runtime.devices``), wraps the
stage objective in DistributedDataParallel over the process group Ray Train set up (gloo on CPU,
nccl on GPU), reads its share of every batch from the Parquet shards, and steps AdamW with
warm-up + cosine/constant schedule and gradient clipping. Rank 0 writes metrics (Parquet + W&B),
the step the driver's progress bar follows, atomic checkpoints and every worker's record in ``<run_dir>/devices.json``.

Numerics (``precision``): parameters stay float32 (AdamW's master weights: at lr 1e-5 an update to
bf16 weights rounds to zero), the forward runs under ``torch.autocast`` to bf16/fp16, losses are
float32; fp16-mixed scales the loss (``GradScaler``: unscaled before clipping, a step with
overflowed gradients is skipped, logged and counted in the ``skipped_step`` metric).

A wall-clock limit (``max_seconds``) is rank 0's: it sums the seconds of its steps and, after each
step, broadcasts whether the limit is reached, so every rank stops after the same step; that step
is checkpointed, and the summed seconds are kept in the trainer state so a resumed stage keeps its
budget.

Resume is driven by the run directory: a worker starts from the stage's newest complete
checkpoint (policy, optimizer, scheduler, step), whether the job was restarted by Ray Train after
a worker died or the user ran the same command again. Batches and noise are pure functions of
(seed, step, rank), so a resumed run neither repeats nor skips data.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rlrestore.checkpoints import (
    STEP_SUMMARY,
    configured_policy_dir,
    latest_checkpoint,
    load_trainer_state,
    save_checkpoint,
)
from rlrestore.config import (
    AutoencoderConfig,
    RunConfig,
    SemanticAlignmentConfig,
    Stage1Config,
    TextureAlignmentConfig,
)
from rlrestore.data import FaceDataset, collate_faces, read_shards, split_holdout
from rlrestore.policies import RestorationPolicy, build_policy, load_policy, policy_class
from rlrestore.runtime.batches import EpochBatches
from rlrestore.runtime.console import ProgressFile, progress_path
from rlrestore.runtime.devices import DeviceRecord, train_worker_device, write_devices
from rlrestore.runtime.precision import Precision
from rlrestore.runtime.schedules import lr_lambda
from rlrestore.runtime.seeds import derived_seed
from rlrestore.tracking import MetricsWriter, WandbRun

log = logging.getLogger(__name__)

CALIBRATION_FACES = 32  # clean faces used to set the latent scale after the autoencoder stage


class Stage1Objective(nn.Module):
    """The stage's loss as a module, so DDP can synchronise the trainable parameters' gradients."""

    def __init__(
        self,
        policy: RestorationPolicy,
        stage_name: str,
        stage: AutoencoderConfig | SemanticAlignmentConfig | TextureAlignmentConfig,
    ) -> None:
        super().__init__()
        self.policy = policy
        self.stage_name = stage_name
        self.stage = stage

    def forward(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.policy.stage1_losses(self.stage_name, batch, self.stage, generator)


def previous_stage(policy_type: str, stage: str) -> str | None:
    """The Stage 1 stage before ``stage`` in the policy's own sequence (None for its first)."""
    stages = policy_class(policy_type).stages
    index = stages.index(stage)
    return stages[index - 1] if index > 0 else None


def initial_policy(config: RunConfig, stage: str, dataset: FaceDataset) -> tuple[RestorationPolicy, Path | None]:
    """Where a stage starts, first found: its newest checkpoint (resume), the previous stage's
    final policy, ``policy.checkpoint``, else the networks built from the config (only for a
    policy's first stage, or one after the optional autoencoder stage)."""
    resume = latest_checkpoint(config.run_dir, stage)
    if resume is not None:
        return load_policy(resume / "policy", config.policy.runtime_options()), resume
    previous = previous_stage(config.policy.type, stage)
    handoff = latest_checkpoint(config.run_dir, previous) if previous else None
    if handoff is not None:
        policy = load_policy(handoff / "policy", config.policy.runtime_options())
        calibration = torch.stack([dataset[i]["hq"] for i in range(min(len(dataset), CALIBRATION_FACES))])
        policy.after_handoff(previous, calibration)
        return policy, None
    start = configured_policy_dir(config.policy.checkpoint)
    if start is not None:
        return load_policy(start, config.policy.runtime_options()), None
    if previous not in (None, "autoencoder"):
        raise FileNotFoundError(
            f"{stage} starts from the end of {previous}, but {config.run_dir}/checkpoints/{previous} has no "
            f"checkpoint: run `rlrestore train {previous}` first (or `rlrestore train stage1`), or set "
            "policy.checkpoint to the policy to start from"
        )
    torch.manual_seed(config.seed)
    return build_policy(config.policy), None


def optimizer_step(
    model: nn.Module,
    batch: dict,
    generator: torch.Generator,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    device: torch.device,
    grad_clip: float,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
    """One supervised step: forward under ``precision``'s autocast, backward, clip, AdamW.

    With ``scaler`` (fp16-mixed) the loss is scaled, the gradients unscaled before clipping and
    the step skipped when they overflowed. Returns (losses, gradient norm, skipped).
    """
    with precision.autocast(device):
        losses = model(batch, generator)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        losses["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        return losses, grad_norm, False
    scale = scaler.get_scale()
    scaler.scale(losses["loss"]).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)  # skipped when the unscaled gradients hold inf/NaN
    scaler.update()
    return losses, grad_norm, scaler.get_scale() < scale


def gather_device_records(record: DeviceRecord, world: int) -> list[DeviceRecord]:
    """Every worker's record, in rank order (a collective: every rank calls it)."""
    if world == 1:
        return [record]
    records: list[Any] = [None] * world
    dist.all_gather_object(records, record)
    return records


def _build_optimizer(
    stage: Stage1Config, params: list[nn.Parameter], resume: Path | None, scaler: torch.amp.GradScaler | None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, int, float]:
    """AdamW and its schedule, restored (with the loss scale) from ``resume``; the first step and
    the seconds of the steps before it."""
    optim = stage.optim
    optimizer = torch.optim.AdamW(
        params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, stage.steps, optim.warmup_ratio, optim.schedule)
    )
    if resume is None:
        return optimizer, scheduler, 0, 0.0
    state = load_trainer_state(resume)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return optimizer, scheduler, int(state["step"]), float(state.get("train_seconds", 0.0))


class TimeLimit:
    """``max_seconds`` of a stage, decided by rank 0: its summed step seconds, broadcast as a stop
    flag after each step so that every rank stops after the same step (a collective: every rank
    calls :meth:`reached`)."""

    def __init__(self, max_seconds: float | None, seconds: float, world: int, device: torch.device) -> None:
        self.max_seconds, self.seconds = max_seconds, seconds
        self.world, self.device = world, device

    def add(self, seconds: float) -> None:
        self.seconds += seconds

    def reached(self) -> bool:
        """Whether rank 0's seconds reached the limit (False without one)."""
        if self.max_seconds is None:
            return False
        flag = torch.tensor([float(self.seconds >= self.max_seconds)], device=self.device)
        if self.world > 1:
            dist.broadcast(flag, src=0)
        return bool(flag.item())


def _record_devices(
    config: RunConfig, stage_name: str, rank: int, world: int, device: torch.device, precision: Precision
) -> None:
    """Every worker's device record, written by rank 0 to ``<run_dir>/devices.json`` (a collective)."""
    record = DeviceRecord.here(
        stage_name, "worker", f"rank {rank}", device, precision.name, torch.float32,
        autocast=precision.compute_dtype if precision.mixed else None,
    )  # fmt: skip
    records = gather_device_records(record, world)
    if rank == 0:
        write_devices(config.run_dir, stage_name, records)


def _info_logs_to_stderr() -> None:
    """A Ray worker has no log handler (only WARNING and up reach the driver, through Python's
    last-resort handler): send rlrestore's INFO lines (the devices.json summary) to its stderr."""
    package = logging.getLogger("rlrestore")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)


def train_stage1_worker(payload: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the Stage 1 TorchTrainer."""
    _info_logs_to_stderr()
    config = RunConfig.model_validate(payload["config"])
    stage_name: str = payload["stage"]
    stage = config.stage(stage_name)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = train_worker_device(config.device, config.ray.train_workers.num_gpus, nccl=world > 1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = Precision(config.precision)
    _record_devices(config, stage_name, rank, world, device, precision)

    train, _ = split_holdout(read_shards(Path(payload["shards"])), config.data.holdout)
    dataset = FaceDataset(
        train, config.policy.resolution, config.degradation, config.data.seed, config.data.fixed_degradation
    )
    policy, resume = initial_policy(config, stage_name, dataset)
    batches = EpochBatches(len(dataset), stage.batch_size // world, rank, world, derived_seed(config.seed, stage_name))
    policy.float().to(device)  # float32 master weights whatever the checkpoint held
    params = policy.set_trainable(list(stage.trainable))
    objective = Stage1Objective(policy, stage_name, stage)
    model = objective
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(objective, device_ids=device_ids, broadcast_buffers=False)
    scaler = precision.grad_scaler(device)
    optimizer, scheduler, start, seconds = _build_optimizer(stage, params, resume, scaler)
    progress = _Progress(config, stage_name, stage) if rank == 0 else None
    limit = TimeLimit(stage.max_seconds, seconds, world, device)
    stop = stage.steps if start == stage.steps or not limit.reached() else start  # resumed after the limit
    timed_out = False

    model.train()
    for step in range(start, stop):
        began = time.perf_counter()
        epoch, indices = batches.at(step)
        dataset.set_epoch(epoch)
        batch = collate_faces([dataset[i] for i in indices])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        generator = torch.Generator().manual_seed(derived_seed(config.seed, stage_name, rank, step))
        losses, grad_norm, skipped = optimizer_step(
            model, batch, generator, params, optimizer, precision, device, stage.optim.grad_clip, scaler
        )
        scheduler.step()
        if skipped and rank == 0:
            log.warning(
                "%s step %d: fp16 gradients overflowed, step skipped (loss scale now %g)",
                stage_name, step, scaler.get_scale(),
            )  # fmt: skip

        metrics = _mean_over_ranks({**losses, "grad_norm": grad_norm}, world)
        metrics.update(lr=scheduler.get_last_lr()[0], epoch=epoch, step_time=time.perf_counter() - began)
        if scaler is not None:
            metrics.update(skipped_step=float(skipped), loss_scale=scaler.get_scale())
        limit.add(metrics["step_time"])
        done = step + 1
        timed_out = done < stage.steps and limit.reached()
        last = done == stage.steps or timed_out
        if progress is not None:
            progress.log(metrics, step, force=last, every=stage.log_every, seconds=limit.seconds)
        if done % stage.checkpoint_every == 0 or last:
            if progress is not None:
                progress.flush()
                state = {"step": done, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                state.update(train_seconds=limit.seconds, **({"scaler": scaler.state_dict()} if scaler else {}))
                _save(config, stage_name, policy, state, timed_out)
            if world > 1:
                dist.barrier()
            ray.train.report({**metrics, "step": done, "train_seconds": limit.seconds})
        if timed_out:
            break
    if progress is not None:
        _log_end(stage_name, limit, skipped=stop == start < stage.steps, timed_out=timed_out)
        progress.close()


def _save(config: RunConfig, stage_name: str, policy: RestorationPolicy, state: dict, timed_out: bool) -> None:
    """Rank 0's checkpoint of ``state["step"]``, with its ``step_summary.json`` (what the driver reports)."""
    stage = config.stage(stage_name)
    summary = {
        "step": state["step"], "steps": stage.steps, "train_seconds": state["train_seconds"],
        "max_seconds": stage.max_seconds, "timed_out": timed_out,
    }  # fmt: skip
    save_checkpoint(
        config.run_dir, stage_name, state["step"], policy, state, stage.keep_checkpoints,
        extra=lambda directory: (directory / STEP_SUMMARY).write_text(json.dumps(summary)),
    )  # fmt: skip


def _mean_over_ranks(values: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """The step's losses and gradient norm, averaged over the ranks (a collective when world > 1)."""
    stacked = torch.stack([value.detach().float() for value in values.values()])
    if world > 1:
        dist.all_reduce(stacked)
        stacked /= world
    return dict(zip(values, stacked.tolist()))


def _log_end(stage_name: str, limit: TimeLimit, skipped: bool, timed_out: bool) -> None:
    """Rank 0's line when ``max_seconds`` ended the stage (its log reaches the run's log file)."""
    if skipped:
        log.info("%s: max_seconds=%g was reached earlier (%.1f s of steps); no step run", stage_name,
                 limit.max_seconds, limit.seconds)  # fmt: skip
    elif timed_out:
        log.info("%s: stopped by max_seconds=%g after %.1f s of steps", stage_name, limit.max_seconds, limit.seconds)


class _Progress:
    """Rank 0's metrics (Parquet + W&B) and its step (and, with ``max_seconds``, its step seconds)
    for the driver's progress bar."""

    def __init__(self, config: RunConfig, stage_name: str, stage: Stage1Config) -> None:
        self.writer = MetricsWriter(Path(config.run_dir), stage_name)
        self.wandb = WandbRun(
            run_dir=Path(config.run_dir) / "logs" / stage_name,
            mode=config.logging.wandb_mode,
            project=config.logging.wandb_project,
            entity=config.logging.wandb_entity,
            name=f"{Path(config.run_dir).name}-{stage_name}",
            config=config.model_dump(mode="json"),
        )
        self.progress = ProgressFile(progress_path(config.run_dir, stage_name), stage.steps)

    def log(self, metrics: dict[str, float], step: int, force: bool, every: int, seconds: float) -> None:
        if (step + 1) % every == 0 or force:
            self.writer.log(metrics, step=step)
            self.wandb.log(metrics, step=step)
        self.progress.update(step + 1, metrics["loss"], seconds=seconds, force=force)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        self.wandb.finish()
