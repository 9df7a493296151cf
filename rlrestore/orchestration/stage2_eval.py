"""Stage 2's held-out evaluation: the current policy restores the held-back faces, every
``stage2.eval_every`` steps, at step 0 and at the end.

The policy evaluated is v_theta, what a checkpoint written at that step holds (a checkpoint is
written at every evaluation; step 0 evaluates the starting policy). Rollout actor 0 restores the
first ``stage2.eval.faces`` faces of ``data.holdout`` (degraded with their fixed seeds, as the demo
does) ``stage2.eval.seeds`` times each with fixed noise seeds and the deterministic rollout sampler,
lending its DiT the learners' v_theta for the call. The images stay in the object store: the
reward actors score them with the trained rewards (``eval/reward/<name>`` and the weighted
``eval/total``, as in training), and the guard metrics that are not trained rewards are scored in
this process on the CPU (``eval/<name>``, raw: psnr in dB, dlib distances). The values go to the
Parquet metrics and W&B at the step the evaluated checkpoint is named by, and to
:class:`~rlrestore.orchestration.guard.EvalHistory`, which checks the guard and names the best
checkpoint.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import ray
import torch

from rewards import RewardAggregator, RewardBatch, RewardWorker, reward_class
from rewards.pool import RewardActorPool
from rlrestore.checkpoints import checkpoint_root
from rlrestore.config import EVAL_TOTAL, RewardSpec, RunConfig, SamplerConfig, Stage2Config
from rlrestore.orchestration.guard import Crossing, EvalHistory, EvalPoint, GuardEvent
from rlrestore.runtime.console import FILE_ONLY
from rlrestore.runtime.dataplane import RewardInputs, RolloutMeta
from rlrestore.runtime.seeds import derived_seed
from rlrestore.tracking import MetricsWriter, WandbRun

log = logging.getLogger(__name__)

EVAL_PREFIX = "eval/"
EVAL_SEED_TAG = "stage2-eval"


def eval_seeds(seed: int, faces: int, per_face: int) -> torch.Tensor:
    """Fixed noise seeds ``[faces, per_face]`` of the held-out restorations (the same at every
    evaluation, so curves compare policies, not noise)."""
    return torch.tensor(
        [[derived_seed(seed, EVAL_SEED_TAG, face, k) for k in range(per_face)] for face in range(faces)]
    )


def eval_face_count(config: RunConfig) -> int:
    """Held-out faces each evaluation restores; raises ValueError naming the keys when there are none."""
    wanted, held = config.stage2.eval.faces, config.data.holdout
    if held == 0:
        raise ValueError(
            f"stage2.eval_every={config.stage2.eval_every} evaluates on the held-back faces, but "
            "data.holdout=0: "
            "hold some faces back (data.holdout) or set stage2.eval_every=0"
        )
    if wanted > held:
        raise ValueError(f"stage2.eval.faces={wanted} is more than data.holdout={held} held-back faces")
    return wanted or held


class HeldOutEval:
    """Restores and scores the held-out faces with the run's rollout actor 0 and reward actors;
    records every evaluation in an :class:`EvalHistory` and logs it as ``eval/*``."""

    def __init__(
        self,
        config: RunConfig,
        rewards: RewardActorPool,
        aggregator: RewardAggregator,
        resume: bool,
    ) -> None:
        stage = config.stage2
        self.rewards, self.aggregator = rewards, aggregator
        self.seeds = eval_seeds(config.seed, eval_face_count(config), stage.eval.seeds)
        self.sampler = SamplerConfig(steps=stage.rollout.sampler_steps, method=stage.rollout.sampler_method)
        self.batch_size = stage.rollout.batch_size
        self.history = EvalHistory(Path(config.run_dir), stage, resume)
        self.guard_metrics = list(stage.eval.guard_metrics)
        driver_side = [name for name in self.guard_metrics if name not in aggregator.weights]
        specs = [RewardSpec(name=name) for name in driver_side]
        self.scorer = RewardWorker(specs, errors=stage.faults.reward_errors) if specs else None

    def evaluate(self, actor: ray.actor.ActorHandle, weights: ray.ObjectRef) -> dict[str, float]:
        """``eval/*`` values of the policy ``weights`` (a v_theta ``WeightUpdate``) restored by ``actor``."""
        meta_ref, inputs_ref = actor.restore_holdout.options(num_returns=2).remote(
            weights, self.seeds, self.sampler, self.batch_size
        )
        meta: RolloutMeta = ray.get(meta_ref)
        outcome = self.rewards.score_rollouts([inputs_ref], [meta])
        for failure in outcome.errors:
            log.warning("held-out evaluation: reward %r failed (%s)", failure.reward, failure.error)
        scores = dict(outcome.scores)
        if self.scorer is not None:
            inputs: RewardInputs = ray.get(inputs_ref)
            images, clean = inputs.candidate_rows(0, meta.inputs * meta.candidates)
            scores.update(self.scorer.score(images, RewardBatch([""] * len(images), clean)))
            for failure in self.scorer.take_errors():
                log.warning("held-out evaluation: metric %r failed (%s)", failure.reward, failure.error)
        return self.values(scores)

    def values(self, scores: dict[str, torch.Tensor]) -> dict[str, float]:
        """Means over the restorations: the weighted total and each trained reward (higher is
        better, as in training), and each guard metric raw (a lower-is-better one negated back)."""
        weights = self.aggregator.weights
        total = sum(weight * scores[name].double() for name, weight in weights.items() if weight)
        values = {EVAL_TOTAL: finite_mean(total)}
        values.update({f"reward/{name}": finite_mean(scores[name]) for name in self.aggregator.weights})
        for name in self.guard_metrics:
            oriented = finite_mean(scores[name])
            values[name] = oriented if reward_class(name).higher_is_better else -oriented
        return values

    def record(
        self,
        step: int,
        checkpoint: Path,
        values: dict[str, float],
        writer: MetricsWriter,
        wandb_run: WandbRun,
    ) -> list[Crossing]:
        """Keep and log the evaluation after ``step`` steps; returns the guard rules it crosses."""
        crossed = self.history.add(step, checkpoint, values)
        self.log(step, writer, wandb_run)
        summary = ", ".join(f"{name} {value:.4g}" for name, value in values.items())
        log.info("stage2 held-out evaluation at step %d (%s): %s", step, checkpoint, summary, extra=FILE_ONLY)
        return crossed

    def log(self, step: int, writer: MetricsWriter, wandb_run: WandbRun) -> None:
        """Log the evaluation of ``step`` as ``eval/*`` (again after a resume: a redone step's row
        replaces the earlier session's whole row)."""
        point = self.history.at(step)
        if point is None:
            return
        metrics: dict[str, Any] = {f"{EVAL_PREFIX}{name}": value for name, value in point.values.items()}
        metrics[f"{EVAL_PREFIX}guard_crossed"] = float(len(point.crossed))
        writer.log(metrics, step=step)
        wandb_run.log(metrics, step=step)


def finite_mean(values: torch.Tensor) -> float:
    """Mean of the finite entries (a reward returns NaN for an image it cannot score); NaN if none."""
    values = torch.as_tensor(values, dtype=torch.float64)
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else math.nan


class GuardedRun(ABC):
    """The held-out evaluation, guard and rollback of a Stage 2 run (:class:`Stage2Run` is one):
    what the training loop calls at the start, after each step and at the end."""

    stage: Stage2Config
    run_dir: Path
    policy_dir: Path
    start: int
    held_out: HeldOutEval | None
    learners: Any
    rollouts: Any

    @abstractmethod
    def start_learners(self) -> Any: ...

    @abstractmethod
    def sync_weights(self, version: int, rewind: bool = False) -> int: ...

    @abstractmethod
    def checkpoint(self, step: int) -> None: ...

    def evaluation_due(self, done: int) -> bool:
        """Whether the policy after ``done`` steps is evaluated (and checkpointed)."""
        every = self.stage.eval_every
        return self.held_out is not None and (done % every == 0 or done == self.stage.steps)

    def evaluate_start(self, writer: MetricsWriter, wandb_run: WandbRun) -> None:
        """Evaluate the starting policy (step 0), or log again the evaluation of the step this
        session starts from (its row is redone)."""
        if self.held_out is None:
            return
        if self.start == 0 and self.held_out.history.at(0) is None:
            values = self.held_out.evaluate(self.rollouts.actors[0], self.learners.trained_update_ref())
            self.held_out.record(0, self.policy_dir, values, writer, wandb_run)
            self.held_out.history.write_report(0)
            return
        if self.held_out.history.at(0) is None:
            log.warning(
                "stage2 guard: this run has no step-0 held-out evaluation (stage2.eval_every was 0 when it "
                "started), so the guard has no reference and checks nothing; evaluations are still logged"
            )
        self.held_out.log(self.start, writer, wandb_run)

    def evaluate(self, done: int, writer: MetricsWriter, wandb_run: WandbRun) -> str:
        """Evaluate the policy after ``done`` steps (its checkpoint is written) and apply the guard:
        'continue', 'rollback' (learners and rollout actors are back at the best checkpoint and the
        run continues at step ``done``) or 'stop'."""
        assert self.held_out is not None
        history = self.held_out.history
        values = self.held_out.evaluate(self.rollouts.actors[0], self.learners.trained_update_ref())
        checkpoint = checkpoint_root(self.run_dir, "stage2") / f"step_{done:06d}"
        crossed = self.held_out.record(done, checkpoint, values, writer, wandb_run)
        action = "continue"
        if crossed:
            event = self.guard_event(done, crossed)
            history.events.append(event)
            action = event.action
            log.warning("stage2 guard at step %d: %s; %s", done, "; ".join(event.crossed), event.detail)
            if action == "rollback":
                history.rollbacks += 1
                self.roll_back(history.best(), done)
            elif action == "stop":
                history.stopped_at = done
        history.write_report(done)
        return action

    def guard_event(self, done: int, crossed: list[Crossing]) -> GuardEvent:
        """What the guard does about ``crossed`` at step ``done`` (``stage2.guard``)."""
        guard, history = self.stage.guard, self.held_out.history
        best, sentences = history.best(), [crossing.sentence() for crossing in crossed]
        if done == self.stage.steps:
            return GuardEvent(done, sentences, "none", "the run ends here")
        if guard.action == "rollback" and history.rollbacks < guard.max_rollbacks and best is not None:
            detail = (
                f"rolling back to the best checkpoint {best.checkpoint} (step {best.step}), rollback "
                f"{history.rollbacks + 1} of stage2.guard.max_rollbacks={guard.max_rollbacks}; "
                "training continues"
            )
            return GuardEvent(done, sentences, "rollback", detail)
        reason = " (stage2.guard.max_rollbacks reached)" if guard.action == "rollback" else ""
        detail = f"stopping the run after step {done} of {self.stage.steps}{reason}"
        return GuardEvent(done, sentences, "stop", detail)

    def roll_back(self, point: EvalPoint, step: int) -> None:
        """Load the learners from ``point`` (its checkpoint's learner state; a fresh group at step 0,
        the starting policy), give the rollout actors its weights, and continue at ``step``. The
        checkpoint that crossed the guard is set aside as ``crossed_step_*`` and the rolled-back
        state checkpointed as step ``step``, so a resume or a learner rebuild starts from it."""
        if point.step == 0:
            self.learners.shutdown()
            self.learners = self.start_learners()
        else:
            self.learners.load(Path(point.checkpoint) / "learner")
        self.learners.skip_step(step - 1)  # the learners' step counter (a resume's start) goes on at `step`
        self.rollouts.weights.clear()
        self.start = step
        self.sync_weights(step, rewind=True)
        crossed = checkpoint_root(self.run_dir, "stage2") / f"step_{step:06d}"
        if crossed.is_dir():
            aside = crossed.rename(crossed.with_name(f"crossed_{crossed.name}"))
            self.held_out.history.move_checkpoint(step, aside)
        self.checkpoint(step)

    def protected_checkpoints(self) -> list[Path]:
        """Checkpoints pruning keeps besides the newest: the best one."""
        best = self.held_out.history.best() if self.held_out is not None else None
        return [] if best is None else [Path(best.checkpoint)]

    def report_evaluations(self, steps_trained: int) -> None:
        """Write the run report and print where the best checkpoint is."""
        if self.held_out is None:
            return
        history = self.held_out.history
        path = history.write_report(steps_trained)
        best, metric = history.best(), self.stage.select.metric
        named = (
            "none"
            if best is None
            else f"{best.checkpoint} (step {best.step}, eval/{metric} {best.values[metric]:.4g})"
        )
        print(f"stage2 best checkpoint: {named}; report: {path}", flush=True)
