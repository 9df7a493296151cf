"""Stage 2 driver: DiffusionNFT preference RL on rollout, reward and learner actors.

All actors live in one Ray placement group (a bundle per actor, sized by ``stage2.resources``),
so the same config scales from 2 CPUs to many GPUs and a run never starts half-placed.

One step is one method, :meth:`Stage2Step.run_step` (``rlrestore.orchestration.stage2_step``), each phase timed (``timing/<phase>``):

    rollout  K candidates per degraded input on the rollout actors (tagged with a policy version)
    reward   named scores per candidate on the reward actors -> weighted total -> r (Eq. 12)
    learn    NFT loss (Eq. 13-15) on the DeepSpeed learner ranks; v_old EMA update (skipped when a
             weighted reward failed for good: ``stage2.faults.reward_errors``, ``rewards.pool``)
    sync     the new rollout weights reach every rollout actor through the object store

The step's data bypass the driver (``rlrestore.runtime.dataplane``): each rollout call leaves three
objects in the object store; the driver reads only the small metadata part, the reward actors
fetch the uint8 images they score, the learner ranks the latents and conditions of their share.
The driver logs what does pass through it (``driver/bytes_in``, ``driver/bytes_out``), what the
rollouts produced (``rollout/bytes``) and each weight sync (``sync/bytes``, ``sync/seconds``):
LoRA runs send the adapters only, full fine-tuning the trained weights in the rollout dtype, put
in the object store once per version.

:meth:`Stage2Run.train` loops over it: it launches the rollouts, then logs (Parquet + W&B),
writes sample grids and checkpoints every N steps (``stage2.outputs``). ``rlrestore bench`` runs
the same step on the Ray actors and on plain in-process workers.

With ``stage2.rollout.asynchronous`` the rollouts of step i+1 run while the learners train on step i
(policy lag 1, recorded per step); a rollout lagging more than ``stage2.rollout.max_policy_lag``
versions is rolled out again with the current weights. Resume: the same command continues from the
newest checkpoint (policy, learner state with v_old and optimizer, step).

With ``stage2.eval_every`` the current policy restores the held-back faces at step 0, every N
steps and at the end, a guard stops the run or rolls it back to the best checkpoint when a guard
metric gets worse than allowed, and ``<run_dir>/stage2_report.json`` names the best checkpoint
(``rlrestore.orchestration.stage2_eval``, ``rlrestore.orchestration.guard``).

Every role runs on the device its resources give it (``rlrestore.runtime.devices``) in the run's
``precision``; ``<run_dir>/devices.json`` lists them.

Faults: a rollout actor that dies is replaced in its bundle, given the weights its chunk was
launched with, and its chunk is rolled out again (same seeds, same weights, same result). A reward
actor that dies is restarted by Ray and its call retried (scoring is a pure function of its
inputs). A learner rank that dies breaks the group's collectives, so the group is rebuilt from the
newest checkpoint and the steps after it are redone (their metrics rows are replaced). Each fault
is logged, counted (``faults/*``) and listed in ``<run_dir>/faults.json`` (:class:`Fault`);
``stage2.faults.max_actor_failures`` bounds them. Reward failures are counted per step
(``reward/errors/<name>``) and summarised at the end in ``<run_dir>/reward_errors.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm import tqdm

from rewards import RewardAggregator, RewardError, check_reward_args, check_reward_weights
from rewards.pool import RewardActorPool, RewardErrorLog, reward_actor_count
from rlrestore.checkpoints import latest_checkpoint, save_checkpoint
from rlrestore.config import ConfigError, RewardSpec, RunConfig, Stage2Config, save_config
from rlrestore.data import image_grid, save_image
from rlrestore.orchestration.jobs import prepare_shards
from rlrestore.orchestration.stage2_eval import GuardedRun, HeldOutEval, eval_face_count
from rlrestore.orchestration.stage2_step import (
    STAGE,
    RolloutCall,
    RolloutPlan,
    Stage2Step,
    StepRecord,
    StepRollouts,
    stale_parts,
)
from rlrestore.policies import write_policy_with_velocity
from rlrestore.runtime.dataplane import (
    RewardInputs,
    RolloutMeta,
    Traffic,
    load_weight_update,
    payload_bytes,
    save_weight_update,
)
from rlrestore.runtime.devices import DeviceRecord, write_devices
from rlrestore.tracking import MetricsWriter, WandbRun
from rollouts import make_rollout_actor
from trainers.nft_learner import LearnerGroup, LearnerLost, gather

REWARD_ERRORS_FILE = "reward_errors.json"
PENDING_WEIGHTS = (
    "pending_rollout_weights.safetensors"  # async checkpoints: weights of the rollouts in flight
)
FAULTS_FILE = "faults.json"

log = logging.getLogger(__name__)


def starting_point(config: RunConfig) -> tuple[Path, Path | None]:
    """(policy dir the actors are built from, stage-2 checkpoint to resume or None).

    Actors are built from the end of Stage 1 (a stable directory: Stage 2 rotates only its own
    checkpoints), else from ``policy.checkpoint`` (e.g. the converted released model), and a
    resumed run then loads its learner state and syncs the rollout weights. Stage 2 trains only
    the DiT, so its checkpoints copy every other component from there.
    """
    resume = latest_checkpoint(config.run_dir, STAGE)
    handoff = latest_checkpoint(config.run_dir, "stage1.2")
    if handoff is not None:
        return handoff / "policy", resume
    if config.policy.checkpoint is not None:
        base = Path(config.policy.checkpoint)
        if not (base / "policy_config.json").is_file():
            raise FileNotFoundError(
                f"policy.checkpoint={config.policy.checkpoint!r} is not a policy directory (no policy_config.json); "
                "write one with `rlrestore convert` or point it at a checkpoint's policy/ folder"
            )
        return base, resume
    if resume is not None:  # Stage 1 checkpoints were removed: the resume point is the only base
        return resume / "policy", resume
    raise FileNotFoundError(
        f"stage2 starts from the end of Stage 1, but {config.run_dir}/checkpoints/stage1.2 has no checkpoint "
        "and policy.checkpoint is not set: run `rlrestore train stage1 CONFIG` first, or set policy.checkpoint "
        "to a policy directory (e.g. one written by `rlrestore convert`)"
    )


def check_stage2_inputs(config: RunConfig) -> None:
    """Everything Stage 2 can check before Ray starts: the Stage 1 checkpoint it starts from,
    that every reward resolves and accepts its args, that no reward weight file is missing, and
    the reward weights. Raises with a message naming what is wrong."""
    for spec in config.stage2.rewards:
        check_reward_args(spec)
    RewardAggregator.from_config(config.stage2)
    check_reward_weights(config.stage2.rewards)
    if config.stage2.eval_every:
        eval_face_count(config)
        for name in config.stage2.eval.guard_metrics:
            try:
                check_reward_args(RewardSpec(name=name))
            except RewardError as exc:
                raise ConfigError(f"stage2.eval.guard_metrics: {exc}") from None
    starting_point(config)


@dataclass
class Fault:
    """A failure the run survived: the step it happened in, the role that failed, the error and
    what the driver did about it (an entry of ``faults.json``)."""

    step: int
    role: str
    error: str
    action: str


class FaultLog:
    """The faults of a run: logged, listed in ``<run_dir>/faults.json`` (kept across resumes) and
    bounded by ``stage2.faults.max_actor_failures``."""

    def __init__(self, path: Path, limit: int, resume: bool) -> None:
        self.path, self.limit = path, limit
        earlier = json.loads(path.read_text()) if resume and path.is_file() else []
        self.faults = [Fault(**entry) for entry in earlier]

    def __iter__(self) -> Iterator[Fault]:
        return iter(list(self.faults))

    def __len__(self) -> int:
        return len(self.faults)

    def record(self, step: int, role: str, error: BaseException, action: str) -> None:
        """Log a fault, add it to ``faults.json``, and stop the run once there are too many."""
        fault = Fault(step, role, f"{type(error).__name__}: {error}"[:500], action)
        self.faults.append(fault)
        log.warning("stage2 step %d: %s failed (%s); %s", step, role, fault.error.splitlines()[0], action)
        self.path.write_text(json.dumps([asdict(entry) for entry in self.faults], indent=2))
        if len(self.faults) > self.limit:
            raise RuntimeError(
                f"Stage 2 stopped after {len(self.faults)} actor failures (stage2.faults.max_actor_failures="
                f"{self.limit}); see {self.path}"
            ) from error


def reserve_placement_group(stage: Stage2Config) -> PlacementGroup:
    """One bundle per actor (rollouts, reward-actor groups, learners, in that order), reserved up
    front so the run either gets all its resources or fails with a clear message instead of hanging."""
    resources = stage.resources
    reward_groups = [group for group, _ in stage.reward_actor_groups().values()]
    bundles = [
        group.bundle()
        for group in (resources.rollout, *reward_groups, resources.learner)
        for _ in range(group.num_actors)
    ]
    group_handle = placement_group(bundles, strategy=resources.placement_strategy)
    ready, _ = ray.wait([group_handle.ready()], timeout=resources.placement_timeout_s)
    if not ready:
        remove_placement_group(group_handle)
        wanted = {key: sum(b.get(key, 0.0) for b in bundles) for key in ("CPU", "GPU")}
        raise RuntimeError(
            f"Stage 2 needs {len(bundles)} actors with {wanted['CPU']} CPUs and {wanted['GPU']} GPUs in all "
            f"(placement {resources.placement_strategy}), but the cluster could not fit them within "
            f"{resources.placement_timeout_s} s; it has {ray.cluster_resources()}. Lower the num_cpus/num_gpus "
            "of stage2.resources.rollout / reward / reward_groups / learner or add nodes."
        )
    return group_handle


class RolloutActors:
    """The run's rollout actors, one per placement bundle in ``strategies``: they roll out chunks,
    and take the learners' weights by policy version. A dead actor is replaced (a fault) and its
    chunk redone with the weights it was launched with, which are kept while a pending chunk may
    still need them (``stage2.rollout.max_policy_lag`` versions)."""

    def __init__(
        self,
        stage: Stage2Config,
        seed: int,
        worker_args: dict[str, Any],
        strategies: list[Any],
        faults: FaultLog,
    ) -> None:
        self.stage, self.seed, self.worker_args = stage, seed, worker_args
        self.strategies, self.faults = strategies, faults
        self.actors = [self.start_actor(index) for index in range(len(strategies))]
        self.weights: dict[int, ray.ObjectRef] = {}  # rollout weights by policy version
        self.version = 0  # the newest weights synced from the learners
        self.actor_version = 0  # the weights the actors hold

    @cached_property
    def plan(self) -> RolloutPlan:
        return RolloutPlan(self.stage, self.seed, ray.get(self.actors[0].num_samples.remote()))

    def start_actor(self, index: int) -> ray.actor.ActorHandle:
        """Rollout actor ``index`` in its bundle. Ray does not restart it: :meth:`replace` does, so
        the driver knows which weights it holds."""
        group = self.stage.resources.rollout
        return make_rollout_actor(
            group.num_cpus,
            group.num_gpus,
            max_restarts=0,
            scheduling_strategy=self.strategies[index],
            **self.worker_args,
        )

    def replace(self, index: int, step: int, error: BaseException) -> None:
        """Start a fresh rollout actor ``index`` (the caller gives it the weights it needs)."""
        self.faults.record(step, f"rollout actor {index}", error, "replaced; its chunk is redone")
        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self.start_actor(index)

    def launch(self, step: int) -> list[RolloutCall]:
        """Start the rollouts of ``step`` on the actors, which hold policy ``actor_version``."""
        calls = self.plan.calls(step, len(self.actors), self.actor_version)
        for call in calls:
            self.submit(call)
        return calls

    def submit(self, call: RolloutCall) -> None:
        call.handle = self.actors[call.actor]
        args = (call.chunk, call.epoch, call.seeds, self.plan.sampler)
        call.sent_bytes += payload_bytes(args)
        call.refs = tuple(call.handle.rollout_parts.options(num_returns=3).remote(*args))

    def redo(self, call: RolloutCall) -> None:
        """Roll ``call`` out again on its (replacement) actor with the weights it was launched
        with; the actor then goes back to the current weights (calls on one actor run in order)."""
        actor = self.actors[call.actor]
        actor.load_weights.remote(call.version, self.weights[call.version], True)
        self.submit(call)
        if call.version != self.actor_version:
            actor.load_weights.remote(self.actor_version, self.weights[self.actor_version])

    def collect(self, calls: list[RolloutCall], step: int, traffic: Traffic) -> StepRollouts:
        """The chunks of ``calls``: their metadata fetched here, their images, latents and conditions
        left in the object store. A chunk whose actor died is redone on a replacement with the
        weights it was launched with; a chunk lagging more than ``stage2.rollout.max_policy_lag``
        versions is redone with the current weights."""
        metas = self.collect_metas(calls, step)
        max_lag = self.stage.rollout.max_policy_lag
        for index in stale_parts(metas, step, max_lag):
            log.warning(
                "stage2 step %d: a rollout of policy version %d lags more than stage2.rollout.max_policy_lag=%d; "
                "redone", step, metas[index].policy_version, max_lag,
            )  # fmt: skip
            calls[index].version = self.actor_version
            self.redo(calls[index])
            metas[index] = self.collect_metas([calls[index]], step)[0]
        traffic.bytes_out += sum(call.sent_bytes for call in calls)
        traffic.received(metas)
        return StepRollouts(metas, [call.refs[1] for call in calls], [call.refs[2] for call in calls])

    def collect_metas(self, calls: list[RolloutCall], step: int) -> list[RolloutMeta]:
        """Each call's metadata, redoing a call whose actor died until it answers."""
        metas = []
        for call in calls:
            while True:
                try:
                    metas.append(ray.get(call.refs[0]))
                    break
                except ray.exceptions.RayActorError as exc:
                    if self.actors[call.actor] is call.handle:  # not yet replaced (e.g. at a sync)
                        self.replace(call.actor, step, exc)
                    self.redo(call)
        return metas

    def sync(self, version: int, weights: ray.ObjectRef, rewind: bool = False) -> None:
        """Every actor takes ``weights`` as policy ``version`` (``rewind``: the run went back to a
        checkpoint). The weights of the versions a pending rollout may still need are kept."""
        self.version = version
        self.weights[version] = weights
        oldest = version - (self.stage.rollout.max_policy_lag if self.stage.rollout.asynchronous else 0)
        self.weights = {kept: ref for kept, ref in self.weights.items() if kept >= oldest}
        self.load(version, rewind)

    def load(self, version: int, rewind: bool = False) -> None:
        """Every actor loads the kept weights of ``version``; a dead one is replaced and loads them."""
        weights = self.weights[version]
        loads = [actor.load_weights.remote(version, weights, rewind) for actor in self.actors]
        for index, ref in enumerate(loads):
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                gather([weights])  # the weights never came: a learner died (LearnerLost)
                self.replace(index, self.version, exc)
                ray.get(self.actors[index].load_weights.remote(version, weights, True))
        self.actor_version = version

    def device_records(self) -> list[DeviceRecord]:
        return ray.get(
            [actor.device_record.remote(f"rollout {index}") for index, actor in enumerate(self.actors)]
        )

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


class Stage2Run(Stage2Step, GuardedRun):
    """The actors of one Stage 2 run and the loop that drives them (the held-out evaluation, guard
    and rollback: :class:`GuardedRun`)."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.stage = config.stage2
        self.run_dir = Path(config.run_dir)
        self.policy_dir, self.resume = starting_point(config)
        shards = prepare_shards(config)
        resources = self.stage.resources
        self.faults = FaultLog(
            self.run_dir / FAULTS_FILE, self.stage.faults.max_actor_failures, self.resume is not None
        )
        self.placement = reserve_placement_group(self.stage)
        bundles = (self.bundle(index) for index in range(len(self.placement.bundle_specs)))
        worker_args = {
            "policy_dir": str(self.policy_dir),
            "shards": str(shards),
            "degradation": config.degradation.model_dump(mode="json"),
            "data_seed": config.data.seed,
            "holdout": config.data.holdout,
            "threads": max(1, int(resources.rollout.num_cpus)),
            "device": config.device,
            "precision": config.precision,
            "fixed_degradation": config.data.fixed_degradation,
            "condition_cache": self.stage.rollout.condition_cache,
            "policy_runtime": config.policy.runtime_options(),
        }
        strategies = [next(bundles) for _ in range(resources.rollout.num_actors)]
        self.rollouts = RolloutActors(self.stage, config.seed, worker_args, strategies, self.faults)
        strategies = [next(bundles) for _ in range(reward_actor_count(self.stage))]
        self.rewards = RewardActorPool(
            self.stage, strategies, device=config.device, precision=config.precision
        )
        self.aggregator = RewardAggregator.from_config(self.stage)
        self.reward_errors = RewardErrorLog(self.stage.rewards)
        if self.resume is not None:
            self.reward_errors.load(self.run_dir / REWARD_ERRORS_FILE)
        resumed = self.resume is not None
        self.held_out = HeldOutEval(config, self.rewards, self.aggregator, resumed) if self.stage.eval_every else None
        self.learner_strategies = [next(bundles) for _ in range(resources.learner.num_actors)]
        self.step = 0  # the step being worked on
        self.done = 0  # steps trained
        self.learners = self.start_learners()
        self.restart_from(self.resume)
        self.record_devices()

    def bundle(self, index: int) -> PlacementGroupSchedulingStrategy:
        """Scheduling strategy that puts an actor into bundle ``index`` of the run's placement group."""
        return PlacementGroupSchedulingStrategy(
            placement_group=self.placement, placement_group_bundle_index=index
        )

    def start_learners(self) -> LearnerGroup:
        return LearnerGroup(
            self.policy_dir,
            self.stage,
            seed=self.config.seed,
            device=self.config.device,
            precision=self.config.precision,
            scheduling_strategies=self.learner_strategies,
        )

    def record_devices(self) -> None:
        """Write every actor's device, node and dtype to ``<run_dir>/devices.json`` (and the log)."""
        records = (
            self.rollouts.device_records() + self.rewards.device_records() + self.learners.device_records()
        )
        write_devices(self.run_dir, STAGE, records)

    def sync_weights(self, version: int, rewind: bool = False) -> int:
        """Send the learners' rollout weights (v_old: the adapters, or the trained weights) to every
        rollout actor as policy ``version``; returns their size in bytes."""
        update, nbytes = self.learners.rollout_update_refs()
        self.rollouts.sync(version, update, rewind)
        return gather([nbytes])[0]

    # ----------------------------------------------------------------------------- faults
    def restart_from(self, checkpoint: Path | None) -> None:
        """Load the learners from ``checkpoint`` (None: the starting policy) and give the rollout
        actors the weights the next rollouts use. In async mode an uninterrupted run would roll out
        step ``start`` with the weights of ``start - 1``: they are in the checkpoint, so the resumed
        run rolls out with them too and makes the same updates."""
        self.start = self.learners.load(checkpoint / "learner") if checkpoint is not None else 0
        self.rollouts.weights.clear()
        self.sync_weights(self.start, rewind=True)
        pending = checkpoint / PENDING_WEIGHTS if checkpoint is not None else None
        if self.stage.rollout.asynchronous and pending is not None and pending.is_file():
            self.rollouts.weights[self.start - 1] = ray.put(load_weight_update(pending))
            self.rollouts.load(self.start - 1, rewind=True)

    def rebuild_learners(self, step: int, error: LearnerLost) -> None:
        """Replace the learner group, restored from the newest checkpoint (or the starting policy
        when there is none yet), and rewind the run and the rollout weights to that step."""
        latest = latest_checkpoint(self.run_dir, STAGE)
        self.faults.record(
            step,
            "learner group",
            error,
            f"rebuilt from {latest.name if latest else 'the starting policy'}; later steps are redone",
        )
        self.learners.shutdown()
        self.learners = self.start_learners()
        self.restart_from(latest)

    # ----------------------------------------------------------------------------- the loop
    def run(self) -> None:
        """Train until ``stage2.steps``, rebuilding the learner group after a lost rank."""
        config = self.config
        wandb_run = WandbRun(
            run_dir=self.run_dir / "logs" / STAGE,
            mode=config.logging.wandb_mode,
            project=config.logging.wandb_project,
            entity=config.logging.wandb_entity,
            name=f"{self.run_dir.name}-{STAGE}",
            config=config.model_dump(mode="json"),
        )
        try:
            while True:
                # A new writer session per attempt: rows of redone steps replace the earlier ones.
                writer = MetricsWriter(self.run_dir, STAGE)
                try:
                    self.train(writer, wandb_run)
                    return
                except LearnerLost as exc:
                    self.rebuild_learners(self.step, exc)
                finally:
                    writer.close()
        finally:
            wandb_run.finish()

    def train(self, writer: MetricsWriter, wandb_run: WandbRun) -> None:
        """The steps from ``self.start`` to the end (:meth:`records`), each logged as it completes."""
        steps, self.done = self.stage.steps, self.start
        bar = tqdm(total=steps, initial=self.start, desc=STAGE, disable=not self.config.logging.progress)
        self.evaluate_start(writer, wandb_run)
        while self.start < steps and self.train_steps(writer, wandb_run, bar) == "rollback":
            continue  # the guard rolled back: the steps go on from self.start with the best weights
        bar.close()

    def train_steps(self, writer: MetricsWriter, wandb_run: WandbRun, bar: tqdm) -> str:
        """The steps from ``self.start`` to the end ('continue') or to a guard action at a held-out
        evaluation ('stop', 'rollback'; ``GuardedRun.evaluate``)."""
        for record in self.records(self.start, self.stage.steps):
            metrics = self.log_step(record, writer, wandb_run)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/total/mean']:.4f}")
            self.done = record.step + 1
            action = self.evaluate(self.done, writer, wandb_run) if self.evaluation_due(self.done) else "continue"
            if action != "continue":
                return action
        return "continue"

    def records(self, start: int, stop: int) -> Iterator[StepRecord]:
        """Steps ``start`` to ``stop`` - 1, each :meth:`run_step` on the rollouts launched for it;
        asynchronous rollouts of step i+1 are launched before step i runs (with the weights of
        step i), synchronous ones after its sync."""
        asynchronous = self.stage.rollout.asynchronous
        pending = self.rollouts.launch(start) if start < stop else []
        if self.rollouts.actor_version != start:  # async resume: step `start` rolled out with start - 1
            self.sync_weights(start)
        for step in range(start, stop):
            self.step = step
            last = step + 1 == stop
            ahead = self.rollouts.launch(step + 1) if asynchronous and not last else []  # runs during this step
            record = self.run_step(step, pending)
            pending = ahead if asynchronous or last else self.rollouts.launch(step + 1)
            yield record

    def log_step(self, record: StepRecord, writer: MetricsWriter, wandb_run: WandbRun) -> dict[str, float]:
        """Log a step's metrics, and write its sample grid and checkpoint when they are due (the
        images a grid fetches count in ``driver/bytes_in``)."""
        outputs, step = self.stage.outputs, record.step
        done = step + 1
        if done % outputs.sample_grid_every == 0 or done == self.stage.steps:
            grid = self.sample_grid(record.rollouts, done, record.traffic)
            wandb_run.log_images("samples", [grid], step=step, captions=["LQ | candidates | GT"])
        metrics = {**record.metrics(), "faults/total": float(len(self.faults))}
        writer.log(metrics, step=step)
        wandb_run.log(metrics, step=step)
        if done % outputs.checkpoint_every == 0 or done == self.stage.steps or self.evaluation_due(done):
            writer.flush()
            self.checkpoint(done)
        return metrics

    def sample_grid(self, rollouts: StepRollouts, step: int, traffic: Traffic) -> np.ndarray:
        """LQ | up to 4 candidates | GT for up to 4 inputs, saved to <run_dir>/samples/ (fetching
        the reward parts of the first calls)."""
        rows = []
        for part in rollouts.reward:
            inputs: RewardInputs = ray.get(part)
            traffic.received(inputs)
            for g in range(min(4 - len(rows), inputs.images.shape[0])):
                candidates = [image.permute(1, 2, 0).numpy() for image in inputs.images[g, :4]]
                rows.append(
                    [
                        inputs.lq[g].permute(1, 2, 0).numpy(),
                        *candidates,
                        inputs.clean[g].permute(1, 2, 0).numpy(),
                    ]
                )
            if len(rows) == 4:
                break
        grid = image_grid(rows)
        save_image(grid, self.run_dir / "samples" / f"stage2_step_{step:06d}.png")
        return grid

    def checkpoint(self, step: int) -> None:
        """Policy (trained DiT), learner state (v_theta, v_old, optimizer) and step, atomically; in
        async mode also the weights the rollouts in flight were launched with (see :meth:`restart_from`)."""
        weights = self.learners.trained_weights()
        in_flight = self.stage.rollout.asynchronous and step < self.stage.steps
        pending = self.rollouts.weights.get(step - 1) if in_flight else None

        def extra(directory: Path) -> None:
            self.learners.save(directory / "learner")
            if pending is not None:
                save_weight_update(ray.get(pending), directory / PENDING_WEIGHTS)

        save_checkpoint(
            self.run_dir,
            STAGE,
            step,
            lambda directory: write_policy_with_velocity(self.policy_dir, weights, directory),
            {"step": step},
            self.stage.outputs.keep_checkpoints,
            extra=extra,
            protect=self.protected_checkpoints(),
        )

    def report_reward_errors(self) -> None:
        """Print the reward-failure summary and write it to ``<run_dir>/reward_errors.json``."""
        self.reward_errors.write(self.run_dir / REWARD_ERRORS_FILE)
        print(self.reward_errors.format(), flush=True)

    def shutdown(self) -> None:
        self.learners.shutdown()
        self.rewards.shutdown()
        self.rollouts.shutdown()
        remove_placement_group(self.placement)


def run_stage2(config: RunConfig) -> None:
    """Run (or resume) Stage 2 on the connected Ray cluster."""
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    run = Stage2Run(config)
    try:
        run.run()
    finally:
        run.report_reward_errors()
        run.report_evaluations(run.done)
        run.shutdown()
