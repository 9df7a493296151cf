"""Rollout worker: K candidate restorations per degraded training face, tagged with a policy version.

The worker holds an inference copy of the policy and the training shards. Given sample indices
and an epoch it degrades the clean faces itself (Eq. 16, seeded per (sample, epoch), or per sample
with ``data.fixed_degradation``, so every worker produces the same LQ image for the same sample),
samples K candidates per input in one batched call with per-candidate seeds, and returns what
Stage 2 needs as three parts (``rlrestore.runtime.dataplane``; three objects on Ray, so the driver
reads only the small first one): metadata for the driver (ids, seeds, the policy version), uint8
images for the reward actors (candidates, clean and degraded faces), and for the learners the
clean latents x0 of the candidates with one condition per input (the AR decode runs once per
input, never per candidate; with a fixed degradation and a deterministic condition it runs once
per input for the whole run, kept in the actor's condition cache).

For Stage 2's held-out evaluation (``stage2.eval_every``) the worker also restores the held-back
faces (``data.holdout``, degraded with fixed seeds) with the trained weights v_theta it is lent for
that call, and returns the images for the reward actors.

Weights arrive as a ``WeightUpdate``: LoRA adapters (added to the actor's DiT on first use) or
the trained weights, in the actor's compute dtype.

The worker runs on the device its Ray resources give it (``rlrestore.runtime.devices``) and holds its
weights in the run's compute dtype (``rlrestore.runtime.precision``; the sampler state stays float32).
``make_rollout_actor`` is the thin Ray wrapper.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from rlrestore.config import DegradationConfig, SamplerConfig
from rlrestore.data import FaceDataset, collate_faces, read_shards, split_holdout
from rlrestore.models.lora import add_lora, has_lora, merged_state_dict
from rlrestore.policies import Condition, VelocityModel, load_policy
from rlrestore.runtime.dataplane import (
    LORA,
    LearnerInputs,
    RewardInputs,
    RolloutMeta,
    RolloutParts,
    WeightUpdate,
    to_uint8_images,
)
from rlrestore.runtime.devices import DeviceName, DeviceRecord, actor_device
from rlrestore.runtime.precision import Precision, PrecisionName


@dataclass
class RolloutBatch:
    """One rollout call in this process: B inputs x K candidates, as its three parts (on Ray the
    parts stay in the object store, see ``rlrestore.runtime.dataplane``)."""

    meta: RolloutMeta
    reward: RewardInputs
    learner: LearnerInputs

    @property
    def ids(self) -> list[str]:
        return self.meta.ids

    @property
    def policy_version(self) -> int:
        return self.meta.policy_version

    @property
    def x0(self) -> torch.Tensor:
        """[B, K, C, h, w] clean latents of the candidates (float32)."""
        return self.learner.x0

    @property
    def condition(self) -> Condition:
        """The condition of each input, shared by its K candidates."""
        return self.learner.condition

    @property
    def images(self) -> torch.Tensor:
        """[B, K, 3, R, R] decoded candidates (uint8)."""
        return self.reward.images


class RolloutWorker:
    """Samples candidates from the current rollout policy (plain class; no Ray needed to test it).

    ``condition_cache``: how many inputs' conditions it keeps when they cannot change (a fixed
    degradation per sample and a deterministic condition, see ``RestorationPolicy.deterministic_condition``).
    """

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
        fixed_degradation: bool = False,
        condition_cache: int = 0,
        policy_runtime: dict | None = None,
    ) -> None:
        torch.set_num_threads(threads)
        self.device = actor_device(
            device, num_gpus, "Stage 2 rollout actors", "stage2.resources.rollout.num_gpus"
        )
        self.precision = Precision(precision)
        policy = load_policy(policy_dir, policy_runtime).eval().to(self.device)
        self.policy = self.precision.for_inference(policy)
        train, held = split_holdout(read_shards(Path(shards)), holdout)
        resolution = self.policy.config.resolution
        degradations = DegradationConfig.model_validate(degradation)
        self.dataset = FaceDataset(train, resolution, degradations, data_seed, fixed_degradation)
        self.holdout = FaceDataset(held, resolution, degradations, data_seed)  # epoch 0, as the demo
        self.conditions = ConditionCache(condition_cache if fixed_degradation else 0)
        self.version = 0

    def num_samples(self) -> int:
        return len(self.dataset)

    def device_record(self, actor: str) -> DeviceRecord:
        """Where this worker computes (for ``devices.json``)."""
        return DeviceRecord.here(
            "stage2", "rollout", actor, self.device, self.precision.name, self.precision.compute_dtype
        )

    def velocity_state(self) -> dict[str, torch.Tensor]:
        """The velocity model's weights this worker samples with (CPU copies, its compute dtype;
        LoRA adapters merged in)."""
        return merged_state_dict(self.policy.velocity_model)

    def load_weights(
        self, version: int, weights: WeightUpdate | dict[str, torch.Tensor], rewind: bool = False
    ) -> int:
        """Adopt new velocity-model weights (from the learners) as policy ``version``; returns it.
        ``weights``: a :class:`WeightUpdate` (adapters or trained weights) or a whole state dict.

        Versions only move forward, unless ``rewind`` (the driver went back to a checkpoint)."""
        if version < self.version and not rewind:
            raise ValueError(f"weights version {version} is older than the worker's {self.version}")
        model = self.policy.velocity_model
        if isinstance(weights, WeightUpdate):
            apply_weight_update(model, weights)
        else:
            model.load_state_dict(weights)
        self.version = version
        return version

    @torch.no_grad()
    def rollout_parts(
        self, indices: list[int], epoch: int, seeds: torch.Tensor, sampler: SamplerConfig
    ) -> tuple[RolloutMeta, RewardInputs, LearnerInputs]:
        """K = seeds.shape[1] candidates for each training sample in ``indices`` at ``epoch``, as
        three parts (on Ray call it with ``num_returns=3``: three objects, the driver reads only the first)."""
        if seeds.shape[0] != len(indices):
            raise ValueError(f"seeds has {seeds.shape[0]} rows for {len(indices)} inputs")
        self.dataset.set_epoch(epoch)
        batch = collate_faces([self.dataset[i] for i in indices])
        lq = batch["lq"].to(self.device)
        cached, hits = self.cached_condition(indices, lq, batch["caption"], seeds, sampler)
        out = self.policy.restore(lq, batch["caption"], seeds, sampler, condition=cached)
        meta = RolloutMeta(batch["id"], batch["caption"], seeds, self.version, cached_conditions=hits)
        reward = RewardInputs(
            to_uint8_images(out.images), to_uint8_images(batch["hq"]), to_uint8_images(batch["lq"])
        )
        learner = LearnerInputs(out.latents.cpu(), out.condition.to("cpu"))
        parts = RolloutParts.of(meta, reward, learner)
        return parts.meta, parts.reward, parts.learner

    @torch.no_grad()
    def restore_holdout(
        self, update: WeightUpdate, seeds: torch.Tensor, sampler: SamplerConfig, batch_size: int
    ) -> tuple[RolloutMeta, RewardInputs]:
        """The first ``seeds.shape[0]`` held-back faces (degraded with their fixed epoch-0 seeds)
        restored ``seeds.shape[1]`` times each by the policy of ``update`` (v_theta, held only for
        this call: the rollout weights come back after it), ``batch_size`` faces per sampler call.
        Two parts (on Ray call it with ``num_returns=2``): metadata, and the images to score."""
        count = seeds.shape[0]
        if not 0 < count <= len(self.holdout):
            raise ValueError(f"{count} held-out faces asked for; data.holdout keeps {len(self.holdout)}")
        model = self.policy.velocity_model
        rollout_weights = held_weights(model, update)
        apply_weight_update(model, update)
        try:
            batch = collate_faces([self.holdout[index] for index in range(count)])
            images = []
            for start in range(0, count, batch_size):
                rows = slice(start, start + batch_size)
                lq, captions = batch["lq"][rows].to(self.device), batch["caption"][rows]
                out = self.policy.restore(lq, captions, seeds[rows], sampler)
                images.append(to_uint8_images(out.images))
        finally:
            apply_weight_update(model, rollout_weights)
        meta = RolloutMeta(batch["id"], batch["caption"], seeds, self.version)
        reward = RewardInputs(torch.cat(images), to_uint8_images(batch["hq"]), to_uint8_images(batch["lq"]))
        return meta, reward

    def rollout(
        self, indices: list[int], epoch: int, seeds: torch.Tensor, sampler: SamplerConfig
    ) -> RolloutBatch:
        """:meth:`rollout_parts` as one batch, in this process."""
        return RolloutBatch(*self.rollout_parts(indices, epoch, seeds, sampler))

    def cached_condition(
        self,
        indices: list[int],
        lq: torch.Tensor,
        captions: list[str],
        seeds: torch.Tensor,
        sampler: SamplerConfig,
    ) -> tuple[Condition | None, int]:
        """The inputs' conditions from the cache (computing the missing ones) and how many were
        cached, or (None, 0) when the cache is off or the condition is not deterministic (the
        pipeline then computes it)."""
        if not self.conditions.enabled or not self.policy.deterministic_condition(sampler):
            return None, 0
        found = {index: self.conditions.items[index] for index in indices if index in self.conditions}
        missing = [row for row, index in enumerate(indices) if index not in found]
        if missing:
            generator = torch.Generator().manual_seed(int(seeds[missing[0], 0]))
            rows = torch.tensor(missing, device=lq.device)
            fresh = self.policy.condition(
                lq[rows], [captions[row] for row in missing], sampler, generator
            ).to("cpu")
            for position, row in enumerate(missing):
                found[indices[row]] = fresh.select(torch.tensor([position]))
        conditions = [found[index] for index in indices]
        for index in indices:
            self.conditions.put(index, found[index])
        return type(conditions[0]).cat(conditions).to(self.device), len(indices) - len(missing)


class ConditionCache:
    """Conditions by training-sample index, least recently used dropped beyond ``capacity``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[int, Condition] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __contains__(self, index: int) -> bool:
        return index in self.items

    def put(self, index: int, condition: Condition) -> None:
        """Keep ``condition`` as the most recently used."""
        self.items[index] = condition
        self.items.move_to_end(index)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)


def add_adapters(model: VelocityModel, update: WeightUpdate) -> None:
    """Add the LoRA adapters of a LoRA ``update`` to the velocity model if it has none yet."""
    if update.kind == LORA and not has_lora(model):
        for module in model.stage2_modules():  # where the learners add them
            add_lora(module, update.lora["rank"], update.lora["alpha"], update.lora["targets"])


def held_weights(model: VelocityModel, update: WeightUpdate) -> WeightUpdate:
    """Copies of the model's tensors that ``update`` would overwrite (to put them back after it)."""
    add_adapters(model, update)
    own = model.state_dict()
    tensors = {key: own[key].clone() for key in update.tensors if key in own}
    return WeightUpdate(update.kind, tensors, update.lora)


def apply_weight_update(model: VelocityModel, update: WeightUpdate) -> None:
    """Load ``update`` into the velocity model: LoRA factors (adding the adapters the first time)
    or the trained weights; the keys must be exactly ones the model has."""
    add_adapters(model, update)
    own = model.state_dict()
    unknown = sorted(set(update.tensors) - set(own))
    if unknown:
        raise ValueError(
            f"weight update names {len(unknown)} tensors the rollout policy lacks, e.g. {unknown[:3]}"
        )
    with torch.no_grad():
        for key, value in update.tensors.items():
            own[key].copy_(value)


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
