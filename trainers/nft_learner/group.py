"""The learner ranks as Ray actors in one torch.distributed group, and what the driver calls on them."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import ray
import torch
from torch import Tensor

from rlrestore.config import Stage2Config
from rlrestore.runtime.dataplane import Traffic, WeightUpdate
from rlrestore.runtime.devices import DeviceName, DeviceRecord, actor_device
from rlrestore.runtime.precision import PrecisionName
from trainers.nft_learner.engine import free_port
from trainers.nft_learner.learner import NFTLearner
from trainers.nft_learner.samples import StepSamples, StepShare


class LearnerActor:
    """Thin Ray actor around :class:`NFTLearner`: it joins the group in :meth:`setup`, once rank 0's
    address is known, and otherwise forwards calls. It runs on the device its resources give it."""

    def __init__(self, num_cpus: float, num_gpus: float, device: DeviceName) -> None:
        torch.set_num_threads(max(1, int(num_cpus)))
        self.device = actor_device(
            device, num_gpus, "Stage 2 learner ranks", "stage2.resources.learner.num_gpus"
        )
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

    def train_step(self, share: StepShare, step: int) -> dict[str, float]:
        """Train on this rank's share (its rollout parts are fetched here, not by the driver)."""
        return self.learner.train_step(share.samples(), step)

    def skip_step(self, step: int) -> None:
        self.learner.skip_step(step)

    def optimizer_state_numel(self) -> int:
        return self.learner.optimizer_state_numel()

    def device_record(self, actor: str) -> DeviceRecord:
        return self.learner.device_record(actor)

    def state_dict_for_rollout(self) -> dict[str, Tensor]:
        return self.learner.state_dict_for_rollout()

    def rollout_update(self) -> tuple[WeightUpdate, int]:
        """The rollout weights as a :class:`WeightUpdate`, and its size in bytes (for the driver;
        call with ``num_returns=2``)."""
        update = self.learner.rollout_update()
        return update, update.nbytes

    def trained_update(self) -> WeightUpdate:
        return self.learner.trained_update()

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


DEAD_RANK_WAIT_S = 60.0  # how long a failed collective waits to learn whether a peer rank died


def gather(refs: list[ray.ObjectRef]) -> list[Any]:
    """``ray.get`` that raises as soon as any rank fails, instead of waiting on ranks that are
    blocked in a collective with the failed one. A dead rank raises :class:`LearnerLost`, also when
    a surviving rank's broken collective (a gloo/NCCL error) is reported before the death is."""
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)
        return ray.get(refs)
    except ray.exceptions.RayActorError as exc:
        raise LearnerLost(f"a learner rank died: {type(exc).__name__}: {exc}") from exc
    except ray.exceptions.RayTaskError as exc:
        death = _dead_rank(pending)
        if death is None:
            raise
        raise LearnerLost(f"a learner rank died: {type(death).__name__}: {death}") from exc


def _dead_rank(refs: list[ray.ObjectRef]) -> ray.exceptions.RayActorError | None:
    """The death of a rank among ``refs`` (still running calls), if Ray reports one in time."""
    deadline = time.monotonic() + DEAD_RANK_WAIT_S
    for ref in refs:
        try:
            ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
        except ray.exceptions.RayActorError as exc:
            return exc
        except (ray.exceptions.RayTaskError, ray.exceptions.GetTimeoutError):
            continue
    return None


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

    def train_step(self, samples: StepSamples, step: int, traffic: Traffic | None = None) -> dict[str, float]:
        """Split the step's samples over the ranks (each fetches the rollout parts of its share),
        train, and return the group's metrics (rank 0's, which are all-reduced over the group;
        ``step_time`` is the slowest rank's). ``traffic`` counts what passes through the caller."""
        traffic = traffic or Traffic()
        shares = samples.shares(self.world_size)
        traffic.sent(shares)
        results = gather(
            [actor.train_step.remote(share, step) for actor, share in zip(self.actors, shares, strict=True)]
        )
        traffic.received(results)
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

    def rollout_update_refs(self) -> tuple[ray.ObjectRef, ray.ObjectRef]:
        """Object refs of rank 0's :class:`WeightUpdate` (put in the object store once; rollout
        actors read it without a copy here) and of its size in bytes. A dead rank 0 surfaces as
        :class:`LearnerLost` where the refs are waited on."""
        update, nbytes = self.actors[0].rollout_update.options(num_returns=2).remote()
        return update, nbytes

    def trained_update_ref(self) -> ray.ObjectRef:
        """Object ref of rank 0's v_theta as a :class:`WeightUpdate` (for the held-out evaluation)."""
        return self.actors[0].trained_update.remote()

    def rollout_weights(self) -> dict[str, Tensor]:
        """Rank 0's v_old DiT weights (see :meth:`NFTLearner.state_dict_for_rollout`)."""
        return gather([self.actors[0].state_dict_for_rollout.remote()])[0]

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
