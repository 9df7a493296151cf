"""Stage 1 (1.1 and 1.2) training loop, run by every Ray Train worker.

Each worker builds the policy, wraps the stage objective in DistributedDataParallel over the
process group Ray Train set up (gloo on CPU, nccl on GPU), reads its share of every batch from the
Parquet shards, and steps AdamW with warm-up + cosine/constant schedule and gradient clipping.
Rank 0 writes metrics (Parquet + W&B), the progress bar and atomic checkpoints.

Resume is driven by the run directory: a worker starts from the stage's newest complete
checkpoint (policy, optimizer, scheduler, step), whether the job was restarted by Ray Train after
a worker died or the user ran the same command again. Batches and noise are pure functions of
(seed, step, rank), so a resumed run neither repeats nor skips data.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from rlrestore.checkpoints import latest_checkpoint, load_trainer_state, save_checkpoint
from rlrestore.config import RunConfig, SemanticAlignmentConfig, TextureAlignmentConfig
from rlrestore.data import FaceDataset, collate_faces, read_shards, split_holdout
from rlrestore.losses import stage1_losses
from rlrestore.models.policy import PrefRestorePolicy
from rlrestore.tracking import MetricsWriter, WandbRun

PREVIOUS_STAGE = {"stage1.1": "autoencoder", "stage1.2": "stage1.1"}
CALIBRATION_FACES = 32  # clean faces used to set the latent scale after the autoencoder stage


class Stage1Objective(nn.Module):
    """The stage's loss as a module, so DDP can synchronise the trainable parameters' gradients."""

    def __init__(self, policy: PrefRestorePolicy, stage: SemanticAlignmentConfig | TextureAlignmentConfig) -> None:
        super().__init__()
        self.policy = policy
        self.stage = stage

    def forward(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return stage1_losses(self.policy, batch, self.stage, generator)


def lr_lambda(step: int, total: int, warmup_ratio: float, schedule: str) -> float:
    """Linear warm-up over ceil(warmup_ratio * total) steps, then cosine decay to 0 or constant."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def derived_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (same across processes and machines)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpochBatches:
    """Which samples rank r uses at step s: epoch-wise permutations split across ranks."""

    def __init__(self, num_samples: int, per_rank: int, rank: int, world: int, seed: int) -> None:
        self.steps_per_epoch = (num_samples // world) // per_rank
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{num_samples} training faces cannot fill a batch of {per_rank} on each of {world} workers; "
                "lower the stage's batch_size or add data"
            )
        self.num_samples, self.per_rank, self.rank, self.world, self.seed = num_samples, per_rank, rank, world, seed

    def at(self, step: int) -> tuple[int, list[int]]:
        """(epoch, sample indices) of this rank at ``step``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(derived_seed(self.seed, epoch)))
        mine = order[self.rank :: self.world].tolist()
        return epoch, mine[position * self.per_rank : (position + 1) * self.per_rank]


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", ray.train.get_context().get_local_rank())
    return torch.device("cpu")


def initial_policy(config: RunConfig, stage: str, dataset: FaceDataset) -> tuple[PrefRestorePolicy, Path | None]:
    """The stage's newest checkpoint, else the previous stage's final policy, else the config's."""
    resume = latest_checkpoint(config.run_dir, stage)
    if resume is not None:
        return PrefRestorePolicy.from_pretrained(resume / "policy"), resume
    previous = PREVIOUS_STAGE.get(stage)
    handoff = latest_checkpoint(config.run_dir, previous) if previous else None
    if handoff is not None:
        policy = PrefRestorePolicy.from_pretrained(handoff / "policy")
        if previous == "autoencoder":
            calibration = torch.stack([dataset[i]["hq"] for i in range(min(len(dataset), CALIBRATION_FACES))])
            policy.adopt_fitted_vae(calibration)
        return policy, None
    if stage == "stage1.2":
        raise FileNotFoundError(
            f"stage1.2 starts from the end of stage1.1, but {config.run_dir}/checkpoints/stage1.1 has no "
            "checkpoint: run `rlrestore train stage1.1` first (or `rlrestore train stage1`)"
        )
    torch.manual_seed(config.seed)
    return PrefRestorePolicy.from_config(config.policy), None


def train_stage1_worker(payload: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the Stage 1 TorchTrainer."""
    config = RunConfig.model_validate(payload["config"])
    stage_name: str = payload["stage"]
    stage = config.stage(stage_name)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = pick_device(config.device)

    train, _ = split_holdout(read_shards(Path(payload["shards"])), config.data.holdout)
    dataset = FaceDataset(train, config.policy.resolution, config.degradation, config.data.seed)
    policy, resume = initial_policy(config, stage_name, dataset)
    batches = EpochBatches(len(dataset), stage.batch_size // world, rank, world, derived_seed(config.seed, stage_name))
    params = policy.set_trainable(list(stage.trainable))
    policy.to(device)
    objective = Stage1Objective(policy, stage)
    model = DistributedDataParallel(objective, broadcast_buffers=False) if world > 1 else objective
    optimizer = torch.optim.AdamW(
        params, lr=stage.optim.lr, betas=stage.optim.betas, eps=stage.optim.eps, weight_decay=stage.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, stage.steps, stage.optim.warmup_ratio, stage.optim.schedule)
    )
    start = 0
    if resume is not None:
        state = load_trainer_state(resume)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["step"])

    writer = wandb_run = bar = None
    if rank == 0:
        writer = MetricsWriter(Path(config.run_dir), stage_name)
        wandb_run = WandbRun(
            run_dir=Path(config.run_dir) / "logs" / stage_name,
            mode=config.logging.wandb_mode,
            project=config.logging.wandb_project,
            entity=config.logging.wandb_entity,
            name=f"{Path(config.run_dir).name}-{stage_name}",
            config=config.model_dump(mode="json"),
        )
        bar = tqdm(
            total=stage.steps, initial=start, desc=stage_name, disable=not config.logging.progress, mininterval=2.0
        )

    model.train()
    for step in range(start, stage.steps):
        began = time.perf_counter()
        epoch, indices = batches.at(step)
        dataset.set_epoch(epoch)
        batch = collate_faces([dataset[i] for i in indices])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        generator = torch.Generator().manual_seed(derived_seed(config.seed, stage_name, rank, step))
        losses = model(batch, generator)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, stage.optim.grad_clip)
        optimizer.step()
        scheduler.step()

        values = torch.stack([v.detach().float() for v in losses.values()] + [grad_norm.detach().float()])
        if world > 1:
            dist.all_reduce(values)
            values /= world
        metrics = dict(zip([*losses.keys(), "grad_norm"], values.tolist()))
        metrics.update(lr=scheduler.get_last_lr()[0], epoch=epoch, step_time=time.perf_counter() - began)
        done = step + 1
        if rank == 0:
            if done % stage.log_every == 0 or done == stage.steps:
                writer.log(metrics, step=step)
                wandb_run.log(metrics, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if done % stage.checkpoint_every == 0 or done == stage.steps:
            if rank == 0:
                writer.flush()
                state = {"step": done, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                save_checkpoint(config.run_dir, stage_name, done, policy, state, stage.keep_checkpoints)
            if world > 1:
                dist.barrier()
            ray.train.report({**metrics, "step": done})
    if rank == 0:
        bar.close()
        writer.close()
        wandb_run.finish()
