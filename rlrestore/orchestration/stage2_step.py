"""The Stage 2 step as one unit: what it works on and what it produces.

``Stage2Step.run_step`` is rollout -> reward -> learn -> sync on any workers that fit the small
:class:`Rollouts`, :class:`Scorer` and :class:`Learner` interfaces: the Ray actors of the driver
(``rlrestore.orchestration.stage2.Stage2Run``) or plain in-process objects (``rlrestore bench``).
:class:`RolloutPlan` says what each step rolls out, :class:`StepRecord` what it produced.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import ray
import torch

from rewards import AggregateResult, RewardAggregator
from rewards.pool import RewardErrorLog, RewardOutcome, StepErrors
from rlrestore.config import SamplerConfig, Stage2Config
from rlrestore.runtime.batches import EpochBatches
from rlrestore.runtime.dataplane import RolloutMeta, Traffic
from rlrestore.runtime.seeds import derived_seed
from trainers.nft_learner import StepSamples

STAGE = "stage2"


@dataclass
class RolloutCall:
    """One chunk of a step's inputs sent to one rollout actor (kept so it can be redone), and the
    policy version the actor held when it was sent (a redo must use the same weights)."""

    actor: int  # index into the run's rollout actors
    chunk: list[int]
    epoch: int
    seeds: torch.Tensor
    version: int
    handle: ray.actor.ActorHandle | None = None  # the actor it was last sent to
    refs: tuple[Any, ...] = ()  # its RolloutParts: (meta, reward, learner) object refs
    sent_bytes: int = 0  # what the driver sent for it (every attempt)


@dataclass
class StepRollouts:
    """A step's rollouts as the driver holds them: each call's metadata, and its reward and learner
    parts (object references on Ray, the objects themselves in process)."""

    metas: list[RolloutMeta]
    reward: list[Any]
    learner: list[Any]

    @property
    def inputs(self) -> int:
        return sum(meta.inputs for meta in self.metas)

    @property
    def candidates(self) -> int:
        """K (the same in every call)."""
        return self.metas[0].candidates

    @property
    def sizes(self) -> list[int]:
        """Candidates per call."""
        return [meta.inputs * meta.candidates for meta in self.metas]

    @property
    def policy_version(self) -> int:
        """The oldest policy version the step's rollouts were made with."""
        return min(meta.policy_version for meta in self.metas)

    def metrics(self) -> dict[str, float]:
        return {
            "rollout/bytes": float(sum(sum(meta.nbytes.values()) for meta in self.metas)),
            "rollout/cached_conditions": float(sum(meta.cached_conditions for meta in self.metas)),
        }


def stale_parts(metas: list[RolloutMeta], step: int, max_lag: int) -> list[int]:
    """Indices of the rollout chunks of ``step`` made more than ``max_lag`` versions ago."""
    return [index for index, meta in enumerate(metas) if step - meta.policy_version > max_lag]


def candidate_seeds(seed: int, step: int, indices: list[int], candidates: int) -> torch.Tensor:
    """Per-candidate noise seeds [B, K], a pure function of (seed, step, sample, k)."""
    return torch.tensor(
        [[derived_seed(seed, STAGE, step, index, k) for k in range(candidates)] for index in indices]
    )


class RolloutPlan:
    """What each step rolls out: its inputs (epoch-wise permutations of the training faces) in chunks
    of ``stage2.rollout.batch_size``, each candidate's seed, and the rollout sampler."""

    def __init__(self, stage: Stage2Config, seed: int, num_samples: int) -> None:
        self.stage, self.seed = stage, seed
        self.batches = EpochBatches(num_samples, stage.inputs_per_step, 0, 1, derived_seed(seed, STAGE))
        self.sampler = SamplerConfig(steps=stage.rollout.sampler_steps, method=stage.rollout.sampler_method)

    def calls(self, step: int, actors: int, version: int) -> list[RolloutCall]:
        """The chunks of ``step``, round-robin over ``actors`` actors that hold policy ``version``."""
        epoch, indices = self.batches.at(step)
        size = self.stage.rollout.batch_size
        chunks = [indices[i : i + size] for i in range(0, len(indices), size)]
        return [
            RolloutCall(
                n % actors,
                chunk,
                epoch,
                candidate_seeds(self.seed, step, chunk, self.stage.candidates),
                version,
            )
            for n, chunk in enumerate(chunks)
        ]


@contextmanager
def phase(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Time the block as phase ``name`` of a step: its seconds go to ``timings[name]``."""
    began = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - began


@dataclass
class StepRecord:
    """What one Stage 2 step produced: its rollouts, rewards, reward failures, the learners'
    metrics (empty when the step was skipped), seconds per phase (rollout, reward, learn, sync),
    the bytes through the driver and the size of the weight sync."""

    step: int
    rollouts: StepRollouts
    rewards: AggregateResult
    errors: StepErrors
    learned: dict[str, float]
    timings: dict[str, float]
    traffic: Traffic
    sync_bytes: int

    def metrics(self) -> dict[str, float]:
        """The step's row of metrics."""
        return {
            **self.rewards.metrics,
            **self.errors.metrics,
            **{f"learn/{key}": value for key, value in self.learned.items()},
            "policy_lag": float(self.step - self.rollouts.policy_version),
            **{f"timing/{name}": seconds for name, seconds in self.timings.items()},
            "throughput/candidates_per_s": sum(self.rollouts.sizes) / max(sum(self.timings.values()), 1e-9),
            **self.traffic.metrics(),
            **self.rollouts.metrics(),
            "sync/bytes": float(self.sync_bytes),
            "sync/seconds": self.timings.get("sync", 0.0),
        }


class Rollouts(Protocol):
    """Where a step's candidates come from: the run's rollout actors or a worker in this process."""

    def launch(self, step: int) -> list[RolloutCall]:
        """Start the rollouts of ``step`` (with the weights held now)."""
        ...

    def collect(self, calls: list[RolloutCall], step: int, traffic: Traffic) -> StepRollouts:
        """The rollouts of ``calls`` (counting in ``traffic`` what reaches the caller)."""
        ...


class Scorer(Protocol):
    """Scores candidates: the run's reward actors or a ``RewardWorker`` in this process."""

    def score_rollouts(
        self, parts: list[Any], metas: list[RolloutMeta], traffic: Traffic
    ) -> RewardOutcome: ...


class Learner(Protocol):
    """Trains on a step's samples: the run's learner group or one ``NFTLearner`` in this process."""

    def train_step(self, samples: StepSamples, step: int, traffic: Traffic) -> dict[str, float]: ...

    def skip_step(self, step: int) -> None: ...


class Stage2Step(ABC):
    """The Stage 2 step as one method, on any workers that fit :class:`Rollouts`, :class:`Scorer`
    and :class:`Learner`: the Ray actors of :class:`Stage2Run`, or plain in-process objects (the
    sequential baseline of ``rlrestore bench``)."""

    rollouts: Rollouts
    rewards: Scorer
    learners: Learner
    aggregator: RewardAggregator
    reward_errors: RewardErrorLog

    def run_step(self, step: int, calls: list[RolloutCall]) -> StepRecord:
        """rollout -> reward -> learn -> sync for ``step``, whose rollouts ``calls`` were launched."""
        timings: dict[str, float] = {}
        traffic = Traffic()
        with phase("rollout", timings):
            rollouts = self.rollouts.collect(calls, step, traffic)
        with phase("reward", timings):
            outcome = self.rewards.score_rollouts(rollouts.reward, rollouts.metas, traffic)
            result = self.aggregator.combine(outcome.scores, rollouts.inputs, rollouts.candidates)
            errors = self.reward_errors.record(step, outcome.errors)
        with phase("learn", timings):  # a skipped step still counts and syncs: versions keep counting steps
            if errors.skip:
                self.learners.skip_step(step)
                learned = {}
            else:
                samples = StepSamples(
                    rollouts.learner, rollouts.sizes, result.r.flatten(), result.valid.flatten()
                )
                learned = self.learners.train_step(samples, step, traffic)
        with phase("sync", timings):
            sync_bytes = self.sync_weights(step + 1)
        return StepRecord(step, rollouts, result, errors, learned, timings, traffic, sync_bytes)

    @abstractmethod
    def sync_weights(self, version: int) -> int:
        """Give the rollouts the learners' new rollout weights (v_old) as policy ``version``;
        returns the bytes of the update."""
