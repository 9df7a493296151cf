"""Stage 2 driver: DiffusionNFT preference RL on rollout, reward and learner actors.

All actors live in one Ray placement group (a bundle per actor, ``stage2.placement_strategy``),
so the same config scales from 2 CPUs to many GPUs and a run never starts half-placed.

One readable loop per step:

    rollout  K candidates per degraded input on the rollout actors (tagged with a policy version)
    reward   named scores per candidate on the reward actors -> weighted total -> r (Eq. 12)
    learn    NFT loss (Eq. 13-15) on the DeepSpeed learner ranks; v_old EMA update (skipped when a
             weighted reward failed for good: ``stage2.reward_errors``, ``rewards.pool``)
    sync     the new rollout weights reach every rollout actor through the object store
    log      Parquet + W&B metrics, sample grids; checkpoint every N steps

With ``stage2.async_rollouts`` the rollouts of step i+1 run while the learners train on step i
(policy lag 1, recorded per step); a rollout lagging more than ``stage2.max_policy_lag`` versions
is rolled out again with the current weights. Resume: the same command continues from the newest
checkpoint (policy, learner state with v_old and optimizer, step).

Every role runs on the device its resources give it (``rlrestore.runtime.devices``) in the run's
``precision``; ``<run_dir>/devices.json`` lists them.

Faults: a rollout actor that dies is replaced in its bundle, given the weights its chunk was
launched with, and its chunk is rolled out again (same seeds, same weights, same result). A reward actor that dies is restarted by Ray
and its call retried (scoring is a pure function of its inputs). A learner rank that dies breaks
the group's collectives, so the group is rebuilt from the newest checkpoint and the steps after
it are redone (their metrics rows are replaced). Each fault is logged, counted
(``faults/*``) and listed in ``<run_dir>/faults.json``; ``stage2.max_actor_failures`` bounds them. Reward failures are counted per
step (``reward/errors/<name>``) and summarised at the end in ``<run_dir>/reward_errors.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from rewards import AggregateResult, RewardAggregator, RewardBatch, check_reward_args, check_reward_weights
from rewards.pool import RewardActorPool, RewardErrorLog, RewardOutcome, reward_actor_count
from rlrestore.checkpoints import latest_checkpoint, save_checkpoint
from rlrestore.config import RunConfig, SamplerConfig, Stage2Config, save_config
from rlrestore.data import image_grid, save_image, to_uint8
from rlrestore.orchestration.jobs import prepare_shards
from rlrestore.policies import write_policy_with_velocity
from rlrestore.runtime.batches import EpochBatches
from rlrestore.runtime.devices import DeviceRecord, write_devices
from rlrestore.runtime.seeds import derived_seed
from rlrestore.tracking import MetricsWriter, WandbRun
from rollouts import RolloutBatch, make_rollout_actor
from trainers.nft_learner import LearnerGroup, LearnerLost, NFTSamples, gather

STAGE = "stage2"
REWARD_ERRORS_FILE = "reward_errors.json"
PENDING_WEIGHTS = "pending_rollout_weights.safetensors"  # async checkpoints: weights of the rollouts in flight
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
    starting_point(config)


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
    ref: ray.ObjectRef | None = None


def stale_parts(parts: list[RolloutBatch], step: int, max_lag: int) -> list[int]:
    """Indices of the rollout chunks of ``step`` made more than ``max_lag`` versions ago."""
    return [index for index, part in enumerate(parts) if step - part.policy_version > max_lag]


def candidate_seeds(seed: int, step: int, indices: list[int], candidates: int) -> torch.Tensor:
    """Per-candidate noise seeds [B, K], a pure function of (seed, step, sample, k)."""
    return torch.tensor(
        [[derived_seed(seed, STAGE, step, index, k) for k in range(candidates)] for index in indices]
    )


def reserve_placement_group(stage: Stage2Config) -> PlacementGroup:
    """One bundle per actor (rollouts, reward-actor groups, learners, in that order), reserved up
    front so the run either gets all its resources or fails with a clear message instead of hanging."""
    reward_groups = [resources for resources, _ in stage.reward_actor_groups().values()]
    bundles = []
    for group in (stage.rollout_workers, *reward_groups, stage.learners):
        bundle = {"CPU": group.num_cpus, **({"GPU": group.num_gpus} if group.num_gpus else {})}
        bundles.extend(dict(bundle) for _ in range(group.num_actors))
    group_handle = placement_group(bundles, strategy=stage.placement_strategy)
    ready, _ = ray.wait([group_handle.ready()], timeout=stage.placement_timeout_s)
    if not ready:
        remove_placement_group(group_handle)
        wanted = {key: sum(b.get(key, 0.0) for b in bundles) for key in ("CPU", "GPU")}
        raise RuntimeError(
            f"Stage 2 needs {len(bundles)} actors with {wanted['CPU']} CPUs and {wanted['GPU']} GPUs in all "
            f"(placement {stage.placement_strategy}), but the cluster could not fit them within "
            f"{stage.placement_timeout_s} s; it has {ray.cluster_resources()}. Lower the num_cpus/num_gpus "
            "of stage2.rollout_workers / reward_workers / reward_actors / learners or add nodes."
        )
    return group_handle


class Stage2Run:
    """The actors of one Stage 2 run and the loop that drives them."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.stage = config.stage2
        self.run_dir = Path(config.run_dir)
        policy_dir, self.resume = starting_point(config)
        self.policy_dir = policy_dir
        shards = prepare_shards(config)
        self.worker_args = {
            "policy_dir": str(policy_dir),
            "shards": str(shards),
            "degradation": config.degradation.model_dump(mode="json"),
            "data_seed": config.data.seed,
            "holdout": config.data.holdout,
            "threads": max(1, int(self.stage.rollout_workers.num_cpus)),
            "device": config.device,
            "precision": config.precision,
        }
        self.placement = reserve_placement_group(self.stage)
        bundles = iter(range(len(self.placement.bundle_specs)))
        self.rollout_bundles = [next(bundles) for _ in range(self.stage.rollout_workers.num_actors)]
        self.rollouts = [self.start_rollout_actor(index) for index in range(len(self.rollout_bundles))]
        self.rewards = RewardActorPool(
            self.stage,
            [self.bundle(next(bundles)) for _ in range(reward_actor_count(self.stage))],
            device=config.device,
            precision=config.precision,
        )
        self.aggregator = RewardAggregator.from_config(self.stage)
        self.reward_errors = RewardErrorLog(self.stage.rewards)
        if self.resume is not None:
            self.reward_errors.load(self.run_dir / REWARD_ERRORS_FILE)
        self.learner_bundles = [next(bundles) for _ in range(self.stage.learners.num_actors)]
        faults_file = self.run_dir / FAULTS_FILE
        self.faults: list[dict] = (
            json.loads(faults_file.read_text()) if self.resume is not None and faults_file.is_file() else []
        )
        self.step = 0  # the step being worked on
        self.learners = self.start_learners()
        # rollout weights by policy version, kept while a pending rollout may need them for a redo
        self.weights: dict[int, ray.ObjectRef] = {}
        self.restart_from(self.resume)
        self.record_devices()
        num_samples = ray.get(self.rollouts[0].num_samples.remote())
        self.batches = EpochBatches(
            num_samples, self.stage.inputs_per_step, 0, 1, derived_seed(config.seed, STAGE)
        )
        self.sampler = SamplerConfig(steps=self.stage.sampler_steps, method=self.stage.sampler_method)

    def bundle(self, index: int) -> PlacementGroupSchedulingStrategy:
        """Scheduling strategy that puts an actor into bundle ``index`` of the run's placement group."""
        return PlacementGroupSchedulingStrategy(
            placement_group=self.placement, placement_group_bundle_index=index
        )

    def start_rollout_actor(self, index: int) -> ray.actor.ActorHandle:
        """Rollout actor ``index`` in its bundle. Ray does not restart it: the driver replaces a
        dead one itself (:meth:`replace_rollout_actor`), so it knows which weights it holds."""
        group = self.stage.rollout_workers
        return make_rollout_actor(
            group.num_cpus,
            group.num_gpus,
            max_restarts=0,
            scheduling_strategy=self.bundle(self.rollout_bundles[index]),
            **self.worker_args,
        )

    def start_learners(self) -> LearnerGroup:
        return LearnerGroup(
            self.policy_dir,
            self.stage,
            seed=self.config.seed,
            device=self.config.device,
            precision=self.config.precision,
            scheduling_strategies=[self.bundle(index) for index in self.learner_bundles],
        )

    def record_devices(self) -> None:
        """Write every actor's device, node and dtype to ``<run_dir>/devices.json`` (and the log)."""
        records: list[DeviceRecord] = ray.get(
            [actor.device_record.remote(f"rollout {index}") for index, actor in enumerate(self.rollouts)]
        )
        records += self.rewards.device_records()
        records += self.learners.device_records()
        write_devices(self.run_dir, STAGE, records)

    # ----------------------------------------------------------------------------- faults
    def record_fault(self, step: int, role: str, error: BaseException, action: str) -> None:
        """Log a fault, add it to ``faults.json``, and stop the run once there are too many."""
        entry = {
            "step": step,
            "role": role,
            "error": f"{type(error).__name__}: {error}"[:500],
            "action": action,
        }
        self.faults.append(entry)
        log.warning("stage2 step %d: %s failed (%s); %s", step, role, entry["error"].splitlines()[0], action)
        (self.run_dir / FAULTS_FILE).write_text(json.dumps(self.faults, indent=2))
        if len(self.faults) > self.stage.max_actor_failures:
            raise RuntimeError(
                f"Stage 2 stopped after {len(self.faults)} actor failures (stage2.max_actor_failures="
                f"{self.stage.max_actor_failures}); see {self.run_dir / FAULTS_FILE}"
            ) from error

    def replace_rollout_actor(self, index: int, step: int, error: BaseException) -> None:
        """Start a fresh rollout actor ``index`` (the caller gives it the weights it needs)."""
        self.record_fault(step, f"rollout actor {index}", error, "replaced; its chunk is redone")
        ray.kill(self.rollouts[index], no_restart=True)
        self.rollouts[index] = self.start_rollout_actor(index)

    def restart_from(self, checkpoint: Path | None) -> None:
        """Load the learners from ``checkpoint`` (None: the starting policy) and give the rollout
        actors the weights the next rollouts use. In async mode an uninterrupted run would roll out
        step ``start`` with the weights of ``start - 1``: they are in the checkpoint, so the resumed
        run rolls out with them too and makes the same updates."""
        self.start = self.learners.load(checkpoint / "learner") if checkpoint is not None else 0
        self.version = self.start
        self.weights.clear()
        self.sync_weights(rewind=True)
        pending = checkpoint / PENDING_WEIGHTS if checkpoint is not None else None
        if self.stage.async_rollouts and pending is not None and pending.is_file():
            self.weights[self.start - 1] = ray.put(load_file(str(pending)))
            self.load_actor_weights(self.start - 1, rewind=True)

    def rebuild_learners(self, step: int, error: LearnerLost) -> None:
        """Replace the learner group, restored from the newest checkpoint (or the starting policy
        when there is none yet), and rewind the run and the rollout weights to that step."""
        latest = latest_checkpoint(self.run_dir, STAGE)
        self.record_fault(
            step,
            "learner group",
            error,
            f"rebuilt from {latest.name if latest else 'the starting policy'}; later steps are redone",
        )
        self.learners.shutdown()
        self.learners = self.start_learners()
        self.restart_from(latest)

    # ----------------------------------------------------------------------------- phases
    def rollout_chunks(self, step: int) -> tuple[int, list[list[int]]]:
        """(epoch, sample indices per rollout call) of ``step``."""
        epoch, indices = self.batches.at(step)
        size = self.stage.rollout_batch
        return epoch, [indices[i : i + size] for i in range(0, len(indices), size)]

    def launch_rollouts(self, step: int) -> list[RolloutCall]:
        """Start the rollouts of ``step``: chunks of inputs round-robin over the rollout actors,
        which hold policy ``self.actor_version``."""
        epoch, chunks = self.rollout_chunks(step)
        calls = []
        for n, chunk in enumerate(chunks):
            seeds = candidate_seeds(self.config.seed, step, chunk, self.stage.candidates)
            call = RolloutCall(n % len(self.rollouts), chunk, epoch, seeds, self.actor_version)
            self.submit(call)
            calls.append(call)
        return calls

    def submit(self, call: RolloutCall) -> None:
        call.handle = self.rollouts[call.actor]
        call.ref = call.handle.rollout.remote(call.chunk, call.epoch, call.seeds, self.sampler)

    def redo(self, call: RolloutCall) -> None:
        """Roll ``call`` out again on its (replacement) actor with the weights it was launched
        with; the actor then goes back to the current weights (calls on one actor run in order)."""
        actor = self.rollouts[call.actor]
        actor.load_weights.remote(call.version, self.weights[call.version], True)
        self.submit(call)
        if call.version != self.actor_version:
            actor.load_weights.remote(self.actor_version, self.weights[self.actor_version])

    def collect_rollouts(self, calls: list[RolloutCall], step: int) -> list[RolloutBatch]:
        """The chunks of ``calls``. A chunk whose actor died is redone on a replacement with the
        weights it was launched with; a chunk lagging more than ``stage2.max_policy_lag`` versions
        is redone with the current weights."""
        parts = []
        for call in calls:
            while True:
                try:
                    parts.append(ray.get(call.ref))
                    break
                except ray.exceptions.RayActorError as exc:
                    if self.rollouts[call.actor] is call.handle:  # not yet replaced (e.g. at a sync)
                        self.replace_rollout_actor(call.actor, step, exc)
                    self.redo(call)
        for index in stale_parts(parts, step, self.stage.max_policy_lag):
            log.warning(
                "stage2 step %d: a rollout of policy version %d lags more than stage2.max_policy_lag=%d; redone",
                step, parts[index].policy_version, self.stage.max_policy_lag,
            )
            calls[index].version = self.actor_version
            self.redo(calls[index])
            parts[index] = self.collect_rollouts([calls[index]], step)[0]
        return parts

    def score(self, batch: RolloutBatch) -> RewardOutcome:
        """Scores of every candidate (flattened [G*K]) from the reward actors, and their failed calls."""
        return self.rewards.score(batch.images.flatten(0, 1), candidate_reward_batch(batch))

    def sync_weights(self, rewind: bool = False) -> None:
        """Send the learners' rollout weights (v_old) to every rollout actor as policy ``version``
        (``rewind``: the run went back to a checkpoint). The weights of the versions a pending
        rollout may still need (``max_policy_lag`` back) are kept for redos."""
        self.weights[self.version] = self.learners.rollout_weights_ref()
        oldest = self.version - (self.stage.max_policy_lag if self.stage.async_rollouts else 0)
        self.weights = {version: ref for version, ref in self.weights.items() if version >= oldest}
        self.load_actor_weights(self.version, rewind)

    def load_actor_weights(self, version: int, rewind: bool = False) -> None:
        """Every rollout actor loads the weights of ``version``; a dead one is replaced and loads them."""
        weights = self.weights[version]
        loads = [actor.load_weights.remote(version, weights, rewind) for actor in self.rollouts]
        for index, ref in enumerate(loads):
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                gather([weights])  # the weights never came: a learner died (LearnerLost)
                self.replace_rollout_actor(index, self.version, exc)
                ray.get(self.rollouts[index].load_weights.remote(version, weights, True))
        self.actor_version = version

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
        """The steps from ``self.start`` to the end: rollout -> reward -> learn -> sync -> log."""
        stage, config = self.stage, self.config
        bar = tqdm(total=stage.steps, initial=self.start, desc=STAGE, disable=not config.logging.progress)
        pending = self.launch_rollouts(self.start) if self.start < stage.steps else []
        if self.actor_version != self.version:  # async resume: step `start` rolled out with start - 1
            self.sync_weights()
        for step in range(self.start, stage.steps):
            self.step = step
            began = time.perf_counter()
            batch = concat_rollouts(self.collect_rollouts(pending, step))
            rollout_time = time.perf_counter() - began
            if stage.async_rollouts and step + 1 < stage.steps:
                pending = self.launch_rollouts(step + 1)  # runs while this step scores and learns

            began = time.perf_counter()
            outcome = self.score(batch)
            result = self.aggregator.combine(outcome.scores, *batch.images.shape[:2])
            failures = self.reward_errors.record(step, outcome.errors)
            reward_time = time.perf_counter() - began

            began = time.perf_counter()  # a skipped step still counts and syncs: versions keep counting steps
            if failures.skip:
                self.learners.skip_step(step)
                learned = {}
            else:
                learned = self.learners.train_step(learner_samples(batch, result), step)
            learn_time = time.perf_counter() - began

            began = time.perf_counter()
            self.version = step + 1
            self.sync_weights()
            sync_time = time.perf_counter() - began
            if not stage.async_rollouts and step + 1 < stage.steps:
                pending = self.launch_rollouts(step + 1)

            total_time = rollout_time + reward_time + learn_time + sync_time
            metrics = {
                **result.metrics,
                **failures.metrics,
                **{f"learn/{key}": value for key, value in learned.items()},
                "policy_lag": float(step - batch.policy_version),
                "timing/rollout": rollout_time,
                "timing/reward": reward_time,
                "timing/learn": learn_time,
                "timing/sync": sync_time,
                "throughput/candidates_per_s": batch.x0.shape[0] * batch.x0.shape[1] / max(total_time, 1e-9),
                "faults/total": float(len(self.faults)),
            }
            writer.log(metrics, step=step)
            wandb_run.log(metrics, step=step)
            done = step + 1
            if done % stage.sample_grid_every == 0 or done == stage.steps:
                grid = self.sample_grid(batch, done)
                wandb_run.log_images("samples", [grid], step=step, captions=["LQ | candidates | GT"])
            if done % stage.checkpoint_every == 0 or done == stage.steps:
                writer.flush()
                self.checkpoint(done)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/total/mean']:.4f}")
        bar.close()

    def sample_grid(self, batch: RolloutBatch, step: int) -> np.ndarray:
        """LQ | up to 4 candidates | GT for up to 4 inputs, saved to <run_dir>/samples/."""
        rows = []
        for g in range(min(4, batch.images.shape[0])):
            candidates = [to_uint8(image) for image in batch.images[g, :4]]
            rows.append([to_uint8(batch.lq[g]), *candidates, to_uint8(batch.clean[g])])
        grid = image_grid(rows)
        save_image(grid, self.run_dir / "samples" / f"stage2_step_{step:06d}.png")
        return grid

    def checkpoint(self, step: int) -> None:
        """Policy (trained DiT), learner state (v_theta, v_old, optimizer) and step, atomically; in
        async mode also the weights the rollouts in flight were launched with (see :meth:`restart_from`)."""
        weights = self.learners.trained_weights()
        pending = self.weights.get(step - 1) if self.stage.async_rollouts and step < self.stage.steps else None

        def extra(directory: Path) -> None:
            self.learners.save(directory / "learner")
            if pending is not None:
                state = {key: value.contiguous() for key, value in ray.get(pending).items()}
                save_file(state, str(directory / PENDING_WEIGHTS))

        save_checkpoint(
            self.run_dir,
            STAGE,
            step,
            lambda directory: write_policy_with_velocity(self.policy_dir, weights, directory),
            {"step": step},
            self.stage.keep_checkpoints,
            extra=extra,
        )

    def report_reward_errors(self) -> None:
        """Print the reward-failure summary and write it to ``<run_dir>/reward_errors.json``."""
        self.reward_errors.write(self.run_dir / REWARD_ERRORS_FILE)
        print(self.reward_errors.format(), flush=True)

    def shutdown(self) -> None:
        self.learners.shutdown()
        self.rewards.shutdown()
        for actor in self.rollouts:
            ray.kill(actor)
        remove_placement_group(self.placement)


def concat_rollouts(parts: list[RolloutBatch]) -> RolloutBatch:
    """One RolloutBatch from the per-actor chunks of a step."""
    return RolloutBatch(
        ids=[i for part in parts for i in part.ids],
        captions=[c for part in parts for c in part.captions],
        lq=torch.cat([part.lq for part in parts]),
        clean=torch.cat([part.clean for part in parts]),
        x0=torch.cat([part.x0 for part in parts]),
        images=torch.cat([part.images for part in parts]),
        condition=type(parts[0].condition).cat([part.condition for part in parts]),
        seeds=torch.cat([part.seeds for part in parts]),
        policy_version=min(part.policy_version for part in parts),
    )


def candidate_reward_batch(batch: RolloutBatch) -> RewardBatch:
    """What the rewards see of each candidate: its input's caption, clean face and id."""
    k = batch.images.shape[1]
    return RewardBatch(
        captions=[caption for caption in batch.captions for _ in range(k)],
        clean=batch.clean.repeat_interleave(k, dim=0),
        metadata=[{"id": sample_id, "input": g} for g, sample_id in enumerate(batch.ids) for _ in range(k)],
    )


def learner_samples(batch: RolloutBatch, result: AggregateResult) -> NFTSamples:
    """The learner batch of a step: every candidate's x0, r and validity, and the index of its
    input's condition (each condition travels once, not once per candidate)."""
    groups, k = batch.x0.shape[:2]
    return NFTSamples(
        x0=batch.x0.flatten(0, 1),
        group=torch.arange(groups).repeat_interleave(k),
        condition=batch.condition,
        r=result.r.flatten(),
        valid=result.valid.flatten(),
    )


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
        run.shutdown()
