"""The Stage 2 figures of ``rlrestore bench``: the driver's own step and loop on Ray actors, against
the same step on plain classes in one process, with the driver relaying every rollout part, and
with synchronous rollouts (see ``rlrestore.orchestration.bench``)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from rewards import RewardAggregator, RewardErrorLog, RewardWorker
from rewards.base import RewardBatch
from rewards.pool import RewardOutcome, candidate_labels, reward_actor_count, rows_of_range
from rlrestore.config import RunConfig, Stage2Config
from rlrestore.orchestration.bench import make_figure, median_seconds
from rlrestore.orchestration.stage2 import Stage2Run
from rlrestore.orchestration.stage2_step import RolloutCall, RolloutPlan, Stage2Step, StepRecord, StepRollouts
from rlrestore.runtime.dataplane import RewardInputs, RolloutMeta, Traffic
from rlrestore.runtime.devices import local_device
from rollouts import RolloutWorker
from trainers.nft_learner import NFTLearner, StepSamples


class InProcessRollouts:
    """One plain ``RolloutWorker`` in this process behind the driver's ``Rollouts`` interface: the
    same chunks, seeds and sampler as the rollout actors, rolled out one after another."""

    def __init__(self, worker: RolloutWorker, stage: Stage2Config, seed: int) -> None:
        self.worker = worker
        self.plan = RolloutPlan(stage, seed, worker.num_samples())

    def launch(self, step: int) -> list[RolloutCall]:
        return self.plan.calls(step, 1, self.worker.version)

    def collect(self, calls: list[RolloutCall], step: int, traffic: Traffic) -> StepRollouts:
        sampler = self.plan.sampler
        parts = [self.worker.rollout_parts(c.chunk, c.epoch, c.seeds, sampler) for c in calls]
        metas, rewards, learners = (list(column) for column in zip(*parts, strict=True))
        return StepRollouts(metas, rewards, learners)


class InProcessRewards:
    """A plain ``RewardWorker`` behind the driver's ``Scorer`` interface."""

    def __init__(self, worker: RewardWorker) -> None:
        self.worker = worker

    def score_rollouts(
        self, parts: list[RewardInputs], metas: list[RolloutMeta], traffic: Traffic
    ) -> RewardOutcome:
        captions, metadata = candidate_labels(metas)
        _, rows = rows_of_range([meta.inputs * meta.candidates for meta in metas], 0, len(captions))
        scores = self.worker.score_rows(parts, rows, RewardBatch(captions, None, metadata))
        return RewardOutcome(scores, self.worker.take_errors())


class InProcessLearner:
    """One ``NFTLearner`` rank behind the driver's ``Learner`` interface."""

    def __init__(self, learner: NFTLearner) -> None:
        self.learner = learner

    def train_step(self, samples: StepSamples, step: int, traffic: Traffic) -> dict[str, float]:
        return self.learner.train_step(samples.local(), step)

    def skip_step(self, step: int) -> None:
        self.learner.skip_step(step)


class SequentialStage2(Stage2Step):
    """The driver's Stage 2 step (:meth:`Stage2Step.run_step`) on plain classes in this process: a
    rollout worker, a reward worker and one ``NFTLearner`` rank, one after another."""

    def __init__(self, config: RunConfig, policy_dir: str | Path) -> None:
        stage, learner = config.stage2, config.stage2.learner
        worker = RolloutWorker(
            policy_dir,
            Path(config.run_dir) / "data",
            config.degradation.model_dump(mode="json"),
            config.data.seed,
            config.data.holdout,
            threads=torch.get_num_threads(),
            policy_runtime=config.policy.runtime_options(),
        )
        self.rollouts = InProcessRollouts(worker, stage, config.seed)
        self.rewards = InProcessRewards(RewardWorker(stage.rewards, errors=stage.faults.reward_errors))
        self.learners = InProcessLearner(
            NFTLearner(
                policy_dir,
                stage.nft,
                stage.optim,
                micro_batch=learner.micro_batch,
                zero_stage=learner.zero_stage,
                device=local_device(config.device),
                sampler_steps=stage.rollout.sampler_steps,
                total_steps=stage.steps,
                seed=config.seed,
            )
        )
        self.aggregator = RewardAggregator.from_config(stage)
        self.reward_errors = RewardErrorLog(stage.rewards)

    def sync_weights(self, version: int) -> int:
        update = self.learners.learner.rollout_update()
        self.rollouts.worker.load_weights(version, update)
        return update.nbytes


class DriverRelay:
    """The driver's old data plane, for comparison: the driver fetches every rollout part and
    passes the objects on to the reward actors and the learners (everything else delegates to the
    run's ``RolloutActors``)."""

    def __init__(self, rollouts: Any) -> None:
        self.inner = rollouts

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def collect(self, calls: list[RolloutCall], step: int, traffic: Traffic) -> StepRollouts:
        import ray

        rollouts = self.inner.collect(calls, step, traffic)
        reward, learner = ray.get(rollouts.reward), ray.get(rollouts.learner)
        traffic.received(reward, learner)
        return StepRollouts(rollouts.metas, reward, learner)


def timed_steps(run: Stage2Run, start: int, count: int) -> tuple[float, list[StepRecord]]:
    """Median seconds per step of ``count`` steps from ``start`` (the driver's loop,
    ``Stage2Run.records``; the first step is a warm-up), and the records of the timed steps."""
    times, records = [], []
    began = time.perf_counter()
    for record in run.records(start, start + count + 1):
        now = time.perf_counter()
        if record.step > start:
            times.append(now - began)
            records.append(record)
        began = now
    return statistics.median(times), records


def step_bytes(records: list[StepRecord]) -> dict[str, float]:
    """Median per-step bytes through the driver (in + out), produced by the rollouts, and synced."""
    rows = [record.metrics() for record in records]
    keys = ("driver/bytes_in", "driver/bytes_out", "rollout/bytes", "sync/bytes")
    return {key: statistics.median(row[key] for row in rows) for key in keys}


def bench_stage2(config: RunConfig, repeats: int) -> dict[str, dict[str, Any]]:
    """Stage 2 step figures, each measured in this run:

    - ``stage2``: seconds per step (the driver's loop) on the Ray actors of a ``Stage2Run`` vs the
      same ``Stage2Step.run_step`` on the plain classes in one process (:class:`SequentialStage2`);
    - ``stage2_driver_bytes``: bytes through the driver per step on the data plane vs the driver
      relaying every rollout part (:class:`DriverRelay`), with the rollout and sync bytes;
    - ``stage2_async``: seconds per step with asynchronous rollouts vs synchronous ones.

    Needs a connected Ray session, and a run directory with a Stage 1.2 checkpoint and the shards.
    """
    stage = config.stage2
    settings = {
        "inputs_per_step": stage.inputs_per_step,
        "candidates": stage.candidates,
        "rollout_batch": stage.rollout.batch_size,
        "sampler_steps": stage.rollout.sampler_steps,
        "rollout_actors": stage.resources.rollout.num_actors,
        "reward_actors": reward_actor_count(stage),
        "learner_ranks": stage.resources.learner.num_actors,
        "zero_stage": stage.learner.zero_stage,
        "finetune": stage.learner.finetune,
    }
    figures: dict[str, dict[str, Any]] = {}
    timings: dict[bool, float] = {}
    for asynchronous in (False, True):
        rollout = stage.rollout.model_copy(update={"asynchronous": asynchronous, "max_policy_lag": 1})
        run = Stage2Run(config.model_copy(update={"stage2": stage.model_copy(update={"rollout": rollout})}))
        try:
            timings[asynchronous], records = timed_steps(run, 0, repeats)
            if not asynchronous:
                run.rollouts = DriverRelay(run.rollouts)
                _, relayed = timed_steps(run, repeats + 1, repeats)
                direct, relay = step_bytes(records), step_bytes(relayed)
        finally:
            run.shutdown()
    sequential = SequentialStage2(config, run.policy_dir)
    sequential_seconds = median_seconds(
        lambda step: sequential.run_step(step, sequential.rollouts.launch(step)), repeats, torch.device("cpu")
    )
    figures["stage2"] = make_figure(
        "s/step",
        timings[False],
        sequential_seconds,
        "Ray actors / sequential plain classes seconds per step (>1: orchestration overhead)",
        settings,
    )
    through = {
        name: values["driver/bytes_in"] + values["driver/bytes_out"]
        for name, values in (("direct", direct), ("relay", relay))
    }
    figures["stage2_driver_bytes"] = make_figure(
        "bytes/step",
        through["direct"],
        through["relay"],
        "bytes through the driver (in + out) on the data plane / with the driver relaying every rollout part",
        {**settings, "data_plane": direct, "driver_relay": relay},
    )
    figures["stage2_async"] = make_figure(
        "s/step",
        timings[True],
        timings[False],
        "asynchronous / synchronous rollouts seconds per step (<1: rollouts overlap the learners)",
        settings,
    )
    return figures
