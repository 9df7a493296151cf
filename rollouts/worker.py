"""Rollout worker: K candidate restorations per degraded training face, tagged with a policy version.

The worker holds an inference copy of the policy and the training shards. Given sample indices
and an epoch it degrades the clean faces itself (Eq. 16, seeded per (sample, epoch), so every
worker produces the same LQ image for the same sample), samples K candidates per input in one
batched call with per-candidate seeds, and returns what Stage 2 needs: the clean latents x0 of
the candidates, their decoded images, one condition per input (the AR decode runs once per input,
never per candidate), the clean faces, and the version of the weights that produced them.

The worker runs on the device its Ray resources give it (``rlrestore.runtime.devices``) and holds its
weights in the run's compute dtype (``rlrestore.runtime.precision``; the sampler state stays float32).
``make_rollout_actor`` is the thin Ray wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from rlrestore.config import DegradationConfig, SamplerConfig
from rlrestore.data import FaceDataset, collate_faces, read_shards, split_holdout
from rlrestore.policies import Condition, load_policy
from rlrestore.runtime.devices import DeviceName, DeviceRecord, actor_device
from rlrestore.runtime.precision import Precision, PrecisionName


@dataclass
class RolloutBatch:
    """One rollout call: B inputs x K candidates."""

    ids: list[str]
    captions: list[str]
    lq: torch.Tensor  # [B, 3, R, R] degraded inputs in [-1, 1]
    clean: torch.Tensor  # [B, 3, R, R] clean faces in [-1, 1]
    x0: torch.Tensor  # [B, K, C, h, w] clean latents of the candidates (float32)
    images: torch.Tensor  # [B, K, 3, R, R] decoded candidates in [-1, 1] (float32)
    condition: Condition  # the policy's condition of each input, shared by its K candidates
    seeds: torch.Tensor  # [B, K]
    policy_version: int


class RolloutWorker:
    """Samples candidates from the current rollout policy (plain class; no Ray needed to test it)."""

    def __init__(
        self,
        policy_dir: str | Path,
        shards: str | Path,
        degradation: dict,
        data_seed: int,
        holdout: int,
        threads: int = 1,
        device: DeviceName = "auto",
        num_gpus: float = 0.0,
        precision: PrecisionName = "fp32",
        policy_runtime: dict | None = None,
    ) -> None:
        torch.set_num_threads(threads)
        self.device = actor_device(device, num_gpus, "Stage 2 rollout actors", "stage2.resources.rollout.num_gpus")
        self.precision = Precision(precision)
        policy = load_policy(policy_dir, policy_runtime).eval().to(self.device)
        self.policy = self.precision.for_inference(policy)
        train, _ = split_holdout(read_shards(Path(shards)), holdout)
        self.dataset = FaceDataset(
            train, self.policy.config.resolution, DegradationConfig.model_validate(degradation), data_seed
        )
        self.version = 0

    def num_samples(self) -> int:
        return len(self.dataset)

    def device_record(self, actor: str) -> DeviceRecord:
        """Where this worker computes (for ``devices.json``)."""
        return DeviceRecord.here(
            "stage2", "rollout", actor, self.device, self.precision.name, self.precision.compute_dtype
        )

    def velocity_state(self) -> dict[str, torch.Tensor]:
        """The velocity model's weights this worker samples with (CPU copies, its compute dtype)."""
        state = self.policy.velocity_model.state_dict()
        return {key: value.detach().cpu().clone() for key, value in state.items()}

    def load_weights(self, version: int, velocity_state: dict[str, torch.Tensor], rewind: bool = False) -> int:
        """Adopt new velocity-model weights (from the learners) as policy ``version``; returns it.

        Versions only move forward, unless ``rewind`` (the driver went back to a checkpoint)."""
        if version < self.version and not rewind:
            raise ValueError(f"weights version {version} is older than the worker's {self.version}")
        self.policy.velocity_model.load_state_dict(velocity_state)
        self.version = version
        return version

    @torch.no_grad()
    def rollout(
        self, indices: list[int], epoch: int, seeds: torch.Tensor, sampler: SamplerConfig
    ) -> RolloutBatch:
        """K = seeds.shape[1] candidates for each training sample in ``indices`` at ``epoch``."""
        if seeds.shape[0] != len(indices):
            raise ValueError(f"seeds has {seeds.shape[0]} rows for {len(indices)} inputs")
        self.dataset.set_epoch(epoch)
        batch = collate_faces([self.dataset[i] for i in indices])
        out = self.policy.restore(batch["lq"].to(self.device), batch["caption"], seeds, sampler)
        return RolloutBatch(
            ids=batch["id"],
            captions=batch["caption"],
            lq=batch["lq"],
            clean=batch["hq"],
            x0=out.latents.cpu(),
            images=out.images.cpu(),
            condition=out.condition.to("cpu"),
            seeds=seeds,
            policy_version=self.version,
        )


def make_rollout_actor(
    num_cpus: float, num_gpus: float, max_restarts: int = 3, scheduling_strategy=None, **kwargs
) -> ray.actor.ActorHandle:
    """A rollout worker as a restartable Ray actor with the given resources (and placement)."""
    actor_class = ray.remote(RolloutWorker)
    return actor_class.options(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_restarts=max_restarts,
        scheduling_strategy=scheduling_strategy,
    ).remote(num_gpus=num_gpus, **kwargs)
