"""The reward actors of a Stage 2 run, and the run's record of reward failures.

The config decides how rewards share actors: every reward belongs to a reward-actor group
(``RewardSpec.actor``; ``default`` is sized by ``stage2.resources.reward``, other groups by
``stage2.resources.reward_groups``), and each group runs its own ``num_actors`` actors, each in its own
bundle of the Stage 2 placement group, reserving the group's CPUs/GPUs. Several rewards in one
group share its actors; a group per reward gives each its own resources::

    stage2:
      rewards:
        - {name: sharpness, weight: 1.0}                  # default group
        - {name: my_pkg:Aesthetic, weight: 0.5, actor: gpu}
      resources:
        reward: {num_actors: 1, num_cpus: 0.25}          # the default group
        reward_groups:
          gpu: {num_actors: 2, num_cpus: 1, num_gpus: 0.5}

:class:`RewardActorPool` gives every group all of a step's candidates, split evenly over the
group's actors, as references to the rollout actors' outputs (each actor fetches the images it
scores; they never pass through the driver), and merges the per-group score dicts. :class:`RewardErrorLog` turns the
:class:`~rewards.worker.RewardFailure` records the actors report into per-step metrics and skip
decisions, and writes the end-of-run summary ``<run_dir>/reward_errors.json`` (one
:class:`RewardErrorCounts` per reward).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rewards.base import RewardError, reward_name
from rewards.worker import CandidateRows, ErrorHandling, RewardFailure, collect_scores, make_reward_actor
from rlrestore.config import ActorGroupConfig, RewardSpec, Stage2Config
from rlrestore.runtime.dataplane import RolloutMeta, Traffic
from rlrestore.runtime.devices import DeviceName, DeviceRecord
from rlrestore.runtime.precision import PrecisionName

__all__ = [
    "RewardActorPool",
    "RewardErrorCounts",
    "RewardErrorLog",
    "RewardOutcome",
    "StepErrors",
    "reward_actor_count",
]

log = logging.getLogger(__name__)

FIRST_ERRORS = 5
"""Error messages kept per reward in the summary."""


def reward_actor_count(stage: Stage2Config) -> int:
    """Number of reward actors (placement bundles) of ``stage``: the sum over its used groups."""
    return sum(resources.num_actors for resources, _ in stage.reward_actor_groups().values())


@dataclass
class RewardOutcome:
    """Scores ``{name: float32 [N]}`` of one call, and the failed calls behind any NaN in them."""

    scores: dict[str, Tensor]
    errors: list[RewardFailure]


@dataclass
class _Group:
    name: str
    resources: ActorGroupConfig
    specs: list[RewardSpec]
    strategies: list[Any]
    actors: list[Any] = field(default_factory=list)


class RewardActorPool:
    """One set of reward actors per reward-actor group of ``stage``.

    ``scheduling_strategies`` places the actors, one per actor in group order (what
    :func:`reward_actor_count` counts), e.g. bundles of the Stage 2 placement group; None lets
    Ray place them. ``device`` (the config's request, auto | cpu | cuda) and ``precision`` (the
    run's) decide where and in what numerics each actor scores (``rewards.worker``).
    """

    def __init__(
        self,
        stage: Stage2Config,
        scheduling_strategies: Sequence[Any] | None = None,
        device: DeviceName = "auto",
        precision: PrecisionName = "fp32",
    ) -> None:
        self.stage = stage
        self.device = device
        self.precision = precision
        count = reward_actor_count(stage)
        strategies = list(scheduling_strategies) if scheduling_strategies is not None else [None] * count
        if len(strategies) != count:
            raise ValueError(
                f"{count} reward actors need as many scheduling strategies, got {len(strategies)}"
            )
        self.groups: list[_Group] = []
        for name, (resources, specs) in stage.reward_actor_groups().items():
            group = _Group(name, resources, specs, strategies[: resources.num_actors])
            del strategies[: resources.num_actors]
            group.actors = [self._start(group, index) for index in range(resources.num_actors)]
            self.groups.append(group)

    def _start(self, group: _Group, index: int):
        return make_reward_actor(
            group.specs,
            group.resources,
            device=self.device,
            precision=self.precision,
            group=group.name,
            errors=self.stage.faults.reward_errors,
            scheduling_strategy=group.strategies[index],
        )

    def device_records(self, stage: str = "stage2") -> list[DeviceRecord]:
        """Every reward actor's :class:`DeviceRecord` (actors named ``<group> <index>``), for
        ``write_devices(run_dir, stage, ...)``."""
        import ray

        return ray.get(
            [
                actor.device_record.remote(f"{group.name} {index}", stage)
                for group in self.groups
                for index, actor in enumerate(group.actors)
            ]
        )

    @property
    def actors(self) -> list[Any]:
        """Every reward actor's handle, in group order."""
        return [actor for group in self.groups for actor in group.actors]

    def score_rollouts(
        self, parts: Sequence[Any], metas: Sequence[RolloutMeta], traffic: Traffic | None = None
    ) -> RewardOutcome:
        """Scores of every candidate of a step's rollout ``parts`` (references to ``RewardInputs``;
        ``metas`` their ``RolloutMeta``), each group splitting the candidates evenly over its actors.
        The actors fetch the parts they score: the images never pass through this process
        (``traffic`` counts what does: captions, metadata, references and the scores).

        A reward whose policy is ``fail`` raises :class:`RewardError`. An actor that died (and
        stayed dead through Ray's restarts and task retries) counts as a failed call of each of
        its rewards; such actors, and actors that abandoned a timed-out call, are replaced.
        """
        import ray

        traffic = traffic or Traffic()
        captions, metadata = candidate_labels(metas)
        sizes = [meta.inputs * meta.candidates for meta in metas]
        calls = []
        for group in self.groups:
            bounds = np.linspace(0, len(captions), len(group.actors) + 1).astype(int)
            for index, (start, stop) in enumerate(pairwise(bounds.tolist())):
                if stop > start:
                    actor = group.actors[index]
                    used, rows = rows_of_range(sizes, start, stop)
                    args = ([parts[i] for i in used], rows, captions[start:stop], metadata[start:stop])
                    traffic.sent(*args)
                    calls.append(
                        (
                            group,
                            index,
                            start,
                            stop,
                            actor.score_rows.remote(*args),
                            actor.take_errors.remote(),
                        )
                    )
        parts_of: dict[str, list[Tensor]] = {}
        errors: list[RewardFailure] = []
        for group, index, start, stop, ref, errors_ref in calls:
            try:
                scores = collect_scores(ref)
                found = [failure.shifted(start) for failure in ray.get(errors_ref)]
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, RewardError):  # a reward with on_error=fail
                    raise RewardError(str(exc.cause)) from exc
                raise
            except ray.exceptions.RayActorError as exc:
                scores, found = self._lost_call(group, start, stop, exc)
            traffic.received(scores, found)
            for name, values in scores.items():
                parts_of.setdefault(name, []).append(values)
            errors.extend(found)
            if any(failure.timed_out or failure.actor_lost for failure in found):
                self._replace(group, index)
        return RewardOutcome({name: torch.cat(values) for name, values in parts_of.items()}, errors)

    def _lost_call(
        self, group: _Group, start: int, stop: int, exc: Exception
    ) -> tuple[dict[str, Tensor], list[RewardFailure]]:
        """NaN scores and one failure per reward of ``group`` for a call its actor could not answer."""
        message = f"reward actor of group {group.name!r} died: {type(exc).__name__}: {exc}"
        scores, errors = {}, []
        for spec in group.specs:
            name = reward_name(spec)
            policy = ErrorHandling.of(spec, self.stage.faults.reward_errors).policy
            if policy == "fail":
                raise RewardError(
                    f"reward {name!r} failed on samples {start}:{stop} (on_error=fail): {message}"
                )
            log.warning("reward %r: %s", name, message)
            scores[name] = torch.full((stop - start,), torch.nan)
            errors.append(
                RewardFailure.of(name, (start, stop), [exc], policy, actor_lost=True, error=message)
            )
        return scores, errors

    def _replace(self, group: _Group, index: int) -> None:
        """Kill actor ``index`` of ``group`` (ending any abandoned call); start a fresh one in its bundle."""
        import ray

        log.warning(
            "replacing reward actor %d of group %r (a call timed out or the actor died)", index, group.name
        )
        ray.kill(group.actors[index])
        group.actors[index] = self._start(group, index)

    def shutdown(self) -> None:
        """Kill every reward actor."""
        import ray

        for actor in self.actors:
            ray.kill(actor)


def candidate_labels(metas: Sequence[RolloutMeta]) -> tuple[list[str], list[dict[str, Any]]]:
    """Caption and metadata (input id, input row) of every candidate of a step, in order."""
    captions: list[str] = []
    metadata: list[dict[str, Any]] = []
    row = 0
    for meta in metas:
        for caption, sample_id in zip(meta.captions, meta.ids, strict=True):
            captions += [caption] * meta.candidates
            metadata += [{"id": sample_id, "input": row}] * meta.candidates
            row += 1
    return captions, metadata


def rows_of_range(sizes: Sequence[int], start: int, stop: int) -> tuple[list[int], list[CandidateRows]]:
    """The parts (indices into ``sizes``, candidates per part) that candidates ``start:stop`` of the
    whole step lie in, and the rows to take from each, numbered among those parts."""
    used: list[int] = []
    rows: list[CandidateRows] = []
    offset = 0
    for part, size in enumerate(sizes):
        low, high = max(start, offset), min(stop, offset + size)
        if high > low:
            rows.append(CandidateRows(len(used), low - offset, high - offset))
            used.append(part)
        offset += size
    return used, rows


@dataclass
class StepErrors:
    """What the failures of one step mean: metrics to log, and the rewards that void its training."""

    metrics: dict[str, float]
    skipped_by: list[str]

    @property
    def skip(self) -> bool:
        """True when the step must not train (a weighted reward failed for good)."""
        return bool(self.skipped_by)


@dataclass
class FirstError:
    """One of the first failures of a reward, as the summary lists them."""

    step: int
    samples: str  # "start:stop"
    error: str


@dataclass
class RewardErrorCounts:
    """One reward's failures over a run: its entry of ``reward_errors.json``."""

    failed_calls: int = 0  # chunks left unscored
    failed_attempts: int = 0  # every failed call, retried ones included
    retried_calls: int = 0
    recovered_calls: int = 0  # a retry succeeded
    timeouts: int = 0
    skipped_steps: int = 0  # steps not trained because of this reward
    first_errors: list[FirstError] = field(default_factory=list)  # the first FIRST_ERRORS

    def add(self, step: int, failure: RewardFailure) -> None:
        """Count one failed chunk of ``step``."""
        self.failed_attempts += failure.failed
        self.retried_calls += failure.attempts > 1
        self.recovered_calls += failure.recovered
        self.timeouts += failure.timed_out
        self.failed_calls += not failure.recovered
        if len(self.first_errors) < FIRST_ERRORS:
            self.first_errors.append(FirstError(step, failure.samples, failure.error))

    def merge_earlier(self, earlier: RewardErrorCounts) -> None:
        """Add the counts of an earlier session of the run (its errors come first)."""
        for name in (
            "failed_calls",
            "failed_attempts",
            "retried_calls",
            "recovered_calls",
            "timeouts",
            "skipped_steps",
        ):
            setattr(self, name, getattr(earlier, name) + getattr(self, name))
        self.first_errors = [*earlier.first_errors, *self.first_errors][:FIRST_ERRORS]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RewardErrorCounts:
        """Counts read back from a ``reward_errors.json`` entry."""
        first = [FirstError(**entry) for entry in data.get("first_errors", [])]
        return cls(**{**data, "first_errors": first})


class RewardErrorLog:
    """Per-reward failure counts of a run: per-step metrics, skip decisions and a summary.

    ``specs`` are the configured rewards (a failure of a weight-0 reward is counted but never
    skips a step). The summary holds a :class:`RewardErrorCounts` per reward and lists the steps
    not trained (``skipped_steps``).
    """

    def __init__(self, specs: Sequence[RewardSpec]) -> None:
        self.weights = {reward_name(spec): spec.weight for spec in specs}
        self.counts = {name: RewardErrorCounts() for name in self.weights}
        self.skipped_steps: list[int] = []

    def record(self, step: int, errors: Sequence[RewardFailure]) -> StepErrors:
        """Count the failed calls of ``step``; says whether the step trains."""
        metrics = {f"reward/errors/{name}": 0.0 for name in self.weights}
        lost: dict[str, RewardFailure] = {}
        for failure in errors:
            name = failure.reward
            self.counts.setdefault(name, RewardErrorCounts()).add(step, failure)
            metrics[f"reward/errors/{name}"] = metrics.get(f"reward/errors/{name}", 0.0) + failure.failed
            if not failure.recovered:
                lost.setdefault(name, failure)
        skipped_by = sorted(name for name in lost if self.weights.get(name, 0.0) != 0)
        for name in skipped_by:
            self.counts[name].skipped_steps += 1
        if skipped_by:
            self.skipped_steps.append(step)
            log.warning(
                "step %d is not trained: %s",
                step,
                "; ".join(f"reward {name!r} failed on samples {lost[name].samples}: {lost[name].error}"
                          for name in skipped_by),
            )  # fmt: skip
        metrics["reward/skipped_step"] = float(bool(skipped_by))
        return StepErrors(metrics, skipped_by)

    def summary(self) -> dict[str, Any]:
        """Counts per reward and the skipped steps: the JSON of ``reward_errors.json``."""
        rewards = {name: asdict(counts) for name, counts in self.counts.items()}
        return {"skipped_steps": list(self.skipped_steps), "rewards": rewards}

    def load(self, path: Path) -> None:
        """Add the counts of an earlier session's summary at ``path`` (a resumed run), if there is one."""
        if not path.is_file():
            return
        earlier = json.loads(path.read_text())
        self.skipped_steps = [*earlier.get("skipped_steps", []), *self.skipped_steps]
        for name, counts in earlier.get("rewards", {}).items():
            self.counts.setdefault(name, RewardErrorCounts()).merge_earlier(
                RewardErrorCounts.from_json(counts)
            )

    def write(self, path: Path) -> None:
        """Write :meth:`summary` as JSON to ``path``."""
        path.write_text(json.dumps(self.summary(), indent=2))

    def format(self) -> str:
        """The summary as a few lines of text."""
        failing = {name: counts for name, counts in self.counts.items() if counts.failed_attempts}
        if not failing:
            return "reward errors: none"
        lines = [f"reward errors ({len(self.skipped_steps)} steps not trained):"]
        for name, c in failing.items():
            first = c.first_errors[0]
            lines.append(
                f"  {name}: {c.failed_attempts} failed attempts, {c.failed_calls} chunks unscored "
                f"({c.retried_calls} retried, {c.recovered_calls} recovered, {c.timeouts} timed out), "
                f"{c.skipped_steps} steps not trained; first (step {first.step}, samples {first.samples}): "
                f"{first.error}"
            )
        return "\n".join(lines)
