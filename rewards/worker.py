"""Reward actors: a plain ``RewardWorker`` hosting reward models, and its thin Ray actor wrapper.

``RewardWorker`` builds the configured rewards on one device and scores batches in chunks of
``batch_size`` images. A reward that raises, returns a malformed result or hangs does not take
the worker down; per reward, its error policy (``RewardSpec.on_error``, default
``stage2.faults.reward_errors``) decides:

- ``retry``: the failed chunk is called again up to ``retries`` times; if every attempt fails,
  the chunk scores NaN and the failure is reported (the Stage 2 driver then skips the step);
- ``skip_step``: the chunk scores NaN at once and the failure is reported;
- ``fail``: :class:`~rewards.base.RewardError` is raised, naming the reward and the error.

Every failed chunk is kept in ``worker.errors`` as a :class:`RewardFailure`. Timeouts: each
call runs in a daemon thread that the worker waits on for at most ``timeout_s``; Python cannot
stop a thread, so a call past its timeout is abandoned (left running), counts as failed, and the
reward's remaining chunks of that ``score`` call are not attempted. In Stage 2 the actor of a
worker that abandoned a call is then replaced (``rewards.pool``), which ends the stuck thread and
frees what it holds.

``make_reward_actor`` runs a worker as a Ray actor with the resources the rewards declare (or
the configured ones) and restarts. Images cross the object store as numpy arrays::

    actor = make_reward_actor(stage2.rewards, stage2.resources.reward, errors=stage2.faults.reward_errors)
    ref = submit_scores(actor, images, RewardBatch(captions, clean=clean_faces))
    scores = collect_scores(ref)  # {"sharpness": Tensor[N], "psnr": Tensor[N]}

Devices and numerics: the actor runs its rewards on the GPU Ray assigned it when it reserves GPUs
(``num_gpus``), else on the CPU (``rlrestore.runtime.devices.actor_device``; ``device`` is the config's
request, auto | cpu | cuda). Under a mixed ``precision`` a reward whose class sets ``autocast``
(the CLIP-based preference rewards) is scored inside ``torch.autocast``; every other reward in
float32. ``RewardActor.device_record`` reports both for ``devices.json``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from rewards.base import RESOURCE_KEYS, Reward, RewardBatch, RewardError, build_reward, reward_class
from rlrestore.config import (
    DEFAULT_REWARD_ACTOR,
    ActorGroupConfig,
    ErrorPolicy,
    RewardErrorConfig,
    RewardSpec,
    reward_group_key,
)
from rlrestore.runtime.console import FILE_ONLY
from rlrestore.runtime.dataplane import resolve
from rlrestore.runtime.devices import DeviceName, DeviceRecord, actor_device
from rlrestore.runtime.precision import Precision, PrecisionName

__all__ = [
    "ErrorHandling",
    "RewardActor",
    "RewardFailure",
    "RewardTimeout",
    "RewardWorker",
    "call_with_timeout",
    "collect_scores",
    "make_reward_actor",
    "reward_resources",
    "submit_scores",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


class RewardTimeout(TimeoutError):
    """A reward call did not return within its timeout (its thread was abandoned, still running)."""


def call_with_timeout(function: Callable[[], T], timeout_s: float, name: str = "reward call") -> T:
    """``function()`` run in a daemon thread, waited on for at most ``timeout_s`` seconds.

    Returns its result or re-raises its exception; raises :class:`RewardTimeout` when it is still
    running at the deadline (the thread keeps running: Python cannot interrupt it, and a daemon
    thread does not keep the process alive).
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RewardTimeout(f"no result within {timeout_s:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@dataclass(frozen=True)
class RewardFailure:
    """One chunk of samples whose reward calls failed at least once: what the reward actors report
    to the driver and ``reward_errors.json`` counts (built by :meth:`of`)."""

    reward: str
    start: int  # the chunk's samples in the scored batch: start:stop
    stop: int
    attempts: int  # calls made
    failed: int  # of them failed
    recovered: bool  # a retry succeeded: the scores are real (else they are NaN)
    timed_out: bool  # an attempt was abandoned at its timeout
    policy: ErrorPolicy
    error: str  # the last failure, "Type: message"
    traceback: str = ""
    actor_lost: bool = False  # the reward actor died and never answered

    @classmethod
    def of(
        cls,
        reward: str,
        samples: tuple[int, int],
        failures: Sequence[BaseException],
        policy: ErrorPolicy,
        *,
        recovered: bool = False,
        actor_lost: bool = False,
        error: str | None = None,
    ) -> RewardFailure:
        """The record of a chunk's failed ``failures`` (in call order; the last one is reported,
        as ``error`` when given); ``recovered``: a further call succeeded."""
        last = failures[-1]
        return cls(
            reward=reward,
            start=samples[0],
            stop=samples[1],
            attempts=len(failures) + recovered,
            failed=len(failures),
            recovered=recovered,
            timed_out=any(isinstance(exc, RewardTimeout) for exc in failures),
            policy=policy,
            error=error or f"{type(last).__name__}: {last}",
            traceback="" if actor_lost else "".join(traceback.format_exception(last)),
            actor_lost=actor_lost,
        )

    @property
    def samples(self) -> str:
        """``start:stop``, as messages and the summary name the chunk."""
        return f"{self.start}:{self.stop}"

    def shifted(self, offset: int) -> RewardFailure:
        """The same failure with its samples counted from ``offset`` (a part of a larger batch)."""
        return replace(self, start=self.start + offset, stop=self.stop + offset)


@dataclass(frozen=True)
class ErrorHandling:
    """The error policy of one reward, resolved from its spec and the run-wide defaults."""

    policy: ErrorPolicy
    retries: int
    timeout_s: float

    @classmethod
    def of(cls, spec: RewardSpec, errors: RewardErrorConfig) -> ErrorHandling:
        policy = spec.on_error or errors.policy
        return cls(
            policy=policy,
            retries=errors.retries if policy == "retry" else 0,
            timeout_s=spec.timeout_s or errors.timeout_s,
        )


@dataclass(frozen=True)
class CandidateRows:
    """Candidates ``start:stop`` (flattened [B * K] rows) of rollout part ``part`` of a call."""

    part: int
    start: int
    stop: int


class RewardWorker:
    """Score images with every configured reward, ``batch_size`` images per reward call.

    ``errors`` (the run-wide policy, retries and timeout; each spec's ``on_error`` and
    ``timeout_s`` override it) says how failures are handled; see the module docstring.
    ``precision``: rewards with ``autocast`` run under its autocast (a no-op under fp32).

    ``errors`` after a call lists each chunk whose calls failed at least once, as a
    :class:`RewardFailure`; ``take_errors`` returns and clears them.
    """

    def __init__(
        self,
        specs: Sequence[RewardSpec],
        device: torch.device | str = "cpu",
        batch_size: int = 32,
        errors: RewardErrorConfig | None = None,
        precision: PrecisionName = "fp32",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.precision = Precision(precision)
        errors = errors or RewardErrorConfig()
        self.rewards = [build_reward(spec, device) for spec in specs]
        names = [reward.name for reward in self.rewards]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"rewards {duplicates} are configured more than once; each may appear once")
        self.handling = {
            reward.name: ErrorHandling.of(spec, errors)
            for reward, spec in zip(self.rewards, specs, strict=True)
        }
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.errors: list[RewardFailure] = []

    @property
    def names(self) -> list[str]:
        """Keys of the dict that :meth:`score` returns."""
        return [reward.name for reward in self.rewards]

    def score(self, images: Tensor, batch: RewardBatch) -> dict[str, Tensor]:
        """Scores ``{name: float32 [N]}`` of ``images`` (``[N, 3, H, W]`` in [-1, 1]).

        Raises for a malformed call (shapes, missing clean faces for a fidelity reward) and for
        a failed reward whose policy is ``fail``; other failures become NaN scores and entries
        in ``errors``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(images.shape)}")
        if len(batch) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but a RewardBatch of {len(batch)}")
        if batch.clean is None and any(reward.needs_clean for reward in self.rewards):
            needing = [reward.name for reward in self.rewards if reward.needs_clean]
            raise ValueError(f"rewards {needing} compare with the clean faces; pass RewardBatch(clean=...)")
        count = images.shape[0]
        results: dict[str, Tensor] = {}
        for reward in self.rewards:
            chunks = []
            for start in range(0, count, self.batch_size):
                stop = min(start + self.batch_size, count)
                scores, error = self._score_chunk(
                    reward, images[start:stop], batch.select(start, stop), start
                )
                if error is not None:
                    if error.timed_out and not error.recovered:  # the reward hangs: skip its remaining chunks
                        stop = count
                        error = replace(
                            error, stop=count, error=f"{error.error}; samples {start}:{count} not scored"
                        )
                    self.errors.append(error)
                chunks.append(torch.full((stop - start,), torch.nan) if scores is None else scores)
                if stop == count:
                    break
            results[reward.name] = torch.cat(chunks) if chunks else torch.empty(0)
        return results

    def score_rows(
        self, parts: Sequence[Any], rows: Sequence[CandidateRows], batch: RewardBatch
    ) -> dict[str, Tensor]:
        """Scores of the candidate ``rows`` of rollout ``parts`` (``RewardInputs``, or references
        to them, which are fetched here: the images never pass through the caller). ``batch``
        holds the captions and metadata of those candidates; the clean faces come from the parts."""
        resolved = [resolve(part) for part in parts]
        pieces = [resolved[row.part].candidate_rows(row.start, row.stop) for row in rows]
        images = torch.cat([images for images, _ in pieces])
        clean = torch.cat([clean for _, clean in pieces])
        return self.score(images, RewardBatch(batch.captions, clean, batch.metadata))

    def take_errors(self) -> list[RewardFailure]:
        """The recorded failures since the last call; clears them."""
        errors, self.errors = self.errors, []
        return errors

    def autocast_dtype(self, reward: Reward) -> torch.dtype | None:
        """The dtype ``reward`` is scored under autocast in, or None (float32)."""
        return self.precision.compute_dtype if reward.autocast and self.precision.mixed else None

    def _call(self, reward: Reward, images: Tensor, batch: RewardBatch) -> Tensor:
        # Autocast state is per thread: entered here, inside the thread that scores.
        context = (
            self.precision.autocast(self.device) if self.autocast_dtype(reward) else contextlib.nullcontext()
        )
        with context:
            return reward(images, batch)

    def _score_chunk(
        self, reward: Reward, images: Tensor, batch: RewardBatch, start: int
    ) -> tuple[Tensor | None, RewardFailure | None]:
        """(scores, or None when every attempt failed; the failure, or None when none failed)."""
        handling = self.handling[reward.name]
        span = f"samples {start}:{start + len(batch)}"
        failures: list[Exception] = []
        scores = None
        for _ in range(1 + handling.retries):
            try:
                scores = call_with_timeout(
                    lambda: self._call(reward, images, batch),
                    handling.timeout_s,
                    name=f"reward {reward.name}",
                )
                break
            except Exception as exc:  # any reward failure is handled by its policy
                failures.append(exc)
                message = f"{type(exc).__name__}: {exc}"
                if handling.policy == "fail":
                    raise RewardError(
                        f"reward {reward.name!r} failed on {span} (on_error=fail): {message}"
                    ) from exc
                log.warning(
                    "reward %r failed on %s (attempt %d of %d, on_error=%s): %s",
                    reward.name, span, len(failures), 1 + handling.retries, handling.policy, message,
                )  # fmt: skip
        if not failures:
            return scores, None
        samples = (start, start + len(batch))
        return scores, RewardFailure.of(
            reward.name, samples, failures, handling.policy, recovered=scores is not None
        )


class RewardActor:
    """What runs inside the Ray actor: a :class:`RewardWorker` taking and returning numpy arrays.

    ``device`` is the config's request (auto | cpu | cuda) and ``num_gpus`` what the actor
    reserved: the worker runs on the GPU Ray assigned it, or on the CPU (``actor_device``).
    ``group``: its reward-actor group (for messages).
    """

    def __init__(
        self,
        specs: Sequence[RewardSpec],
        device: DeviceName,
        num_gpus: float,
        batch_size: int,
        errors: RewardErrorConfig | None,
        precision: PrecisionName = "fp32",
        group: str = DEFAULT_REWARD_ACTOR,
    ) -> None:
        key = f"{reward_group_key(group)}.num_gpus"
        resolved = actor_device(device, num_gpus, f"reward actors ({group})", key)
        self.worker = RewardWorker(
            specs, device=resolved, batch_size=batch_size, errors=errors, precision=precision
        )

    def names(self) -> list[str]:
        return self.worker.names

    def device_record(self, actor: str, stage: str = "stage2") -> DeviceRecord:
        """Where this actor scores (role ``reward``, named ``actor``): its device, the run's
        precision, its rewards' weight dtype(s) and, if any reward runs under autocast, its dtype."""
        worker = self.worker
        weights = sorted(
            {str(getattr(reward, "dtype", torch.float32)).removeprefix("torch.") for reward in worker.rewards}
        )
        autocast = next((d for d in map(worker.autocast_dtype, worker.rewards) if d is not None), None)
        return DeviceRecord.here(
            stage, "reward", actor, worker.device, worker.precision.name, ",".join(weights), autocast=autocast
        )

    def score(
        self,
        images: np.ndarray,
        clean: np.ndarray | None,
        captions: list[str],
        metadata: list[dict[str, Any]],
    ) -> dict[str, np.ndarray]:
        # Arrays from the object store are read-only views; torch wants writable memory.
        batch = RewardBatch(captions, None if clean is None else torch.from_numpy(np.array(clean)), metadata)
        scores = self.worker.score(torch.from_numpy(np.array(images)), batch)
        return {name: values.numpy() for name, values in scores.items()}

    def score_rows(
        self, parts: list[Any], rows: list[CandidateRows], captions: list[str], metadata: list[dict[str, Any]]
    ) -> dict[str, np.ndarray]:
        """:meth:`RewardWorker.score_rows` on references to rollout parts (fetched by this actor)."""
        scores = self.worker.score_rows(parts, rows, RewardBatch(captions, None, metadata))
        return {name: values.numpy() for name, values in scores.items()}

    def take_errors(self) -> list[RewardFailure]:
        return self.worker.take_errors()


def reward_resources(specs: Sequence[RewardSpec]) -> dict[str, float]:
    """Sum of the ``resources`` the rewards of ``specs`` declare (their classes; none is built)."""
    total = dict.fromkeys(RESOURCE_KEYS[:2], 0.0)
    for spec in specs:
        for key, value in reward_class(spec.name).resources.items():
            total[key] = total.get(key, 0.0) + float(value)
    return total


def make_reward_actor(
    specs: Sequence[RewardSpec],
    resources: ActorGroupConfig | Mapping[str, float] | None = None,
    *,
    device: DeviceName = "auto",
    precision: PrecisionName = "fp32",
    group: str = DEFAULT_REWARD_ACTOR,
    batch_size: int = 32,
    errors: RewardErrorConfig | None = None,
    max_restarts: int = 3,
    max_task_retries: int = 1,
    scheduling_strategy=None,
):
    """Start a Ray actor hosting the rewards of ``specs``; returns its ``ActorHandle``.

    ``scheduling_strategy`` places it (e.g. in a bundle of the Stage 2 placement group);
    ``errors`` is the error policy of its :class:`RewardWorker`.

    ``resources`` (an ``ActorGroupConfig`` or a dict with ``num_cpus``/``num_gpus``/``memory``)
    is what the actor reserves; None reserves what the rewards declare
    (:func:`reward_resources`). Reserving less than they declare is allowed (a CPU-only test
    of a GPU reward, a 2-CPU demo) and noted in the run's log file, not on the terminal: the config
    asked for it. ``device`` is the config's request (auto | cpu | cuda): the
    actor runs on its assigned GPU when it reserves one, else on the CPU (``device=cuda`` without
    GPUs or ``device=cpu`` with GPUs is refused when the actor starts). ``precision`` is the
    run's (autocast for rewards that allow it); ``group`` names the actor's reward-actor group
    in messages. Scoring is a pure function of its inputs, so a
    call interrupted by an actor restart is retried ``max_task_retries`` times.
    """
    import ray

    declared = reward_resources(specs)
    if resources is None:
        reserved = declared
    elif isinstance(resources, ActorGroupConfig):
        reserved = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus}
    else:
        reserved = dict(resources)
    unknown = set(reserved) - set(RESOURCE_KEYS)
    if unknown:
        raise ValueError(f"unknown actor resources {sorted(unknown)}; use {RESOURCE_KEYS}")
    short = {key: value for key, value in declared.items() if reserved.get(key, 0.0) < value}
    if short:
        log.info("reward actor reserves %s, less than its rewards declare (%s)", reserved, short, extra=FILE_ONLY)
    options = {key: value for key, value in reserved.items() if key != "memory" or value}
    return (
        ray.remote(RewardActor)
        .options(
            max_restarts=max_restarts,
            max_task_retries=max_task_retries,
            scheduling_strategy=scheduling_strategy,
            **options,
        )
        .remote(
            list(specs), device, float(reserved.get("num_gpus", 0.0)), batch_size, errors, precision, group
        )
    )


def submit_scores(actor, images: Tensor, batch: RewardBatch):
    """Ask ``actor`` to score ``images``; returns an ``ObjectRef`` (see :func:`collect_scores`).

    The images and clean faces go into the object store as float32 numpy arrays.
    """
    import ray

    clean = None if batch.clean is None else ray.put(_to_numpy(batch.clean))
    return actor.score.remote(ray.put(_to_numpy(images)), clean, batch.captions, batch.metadata)


def collect_scores(ref) -> dict[str, Tensor]:
    """Wait for a :func:`submit_scores` call; ``{name: float32 [N]}``."""
    import ray

    return {name: torch.from_numpy(np.array(values)) for name, values in ray.get(ref).items()}


def _to_numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy()
