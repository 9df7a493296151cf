"""Reward actors: a plain ``RewardWorker`` hosting reward models, and its thin Ray actor wrapper.

``RewardWorker`` builds the configured rewards on one device and scores batches in chunks; a
reward that raises does not take the worker down: its scores for that chunk are NaN (the
aggregator then masks those samples) and the error is kept in ``worker.errors``.

``make_reward_actor`` runs a worker as a Ray actor with the resources the rewards declare (or
the configured ones) and restarts. Images cross the object store as numpy arrays::

    actor = make_reward_actor(stage2.rewards, stage2.reward_workers)
    ref = submit_scores(actor, images, RewardBatch(captions, clean=clean_faces))
    scores = collect_scores(ref)  # {"sharpness": Tensor[N], "psnr": Tensor[N]}
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rewards.base import RESOURCE_KEYS, RewardBatch, build_reward, reward_class
from rlrestore.config import ActorGroupConfig, RewardSpec

__all__ = [
    "RewardActor",
    "RewardWorker",
    "collect_scores",
    "make_reward_actor",
    "reward_resources",
    "submit_scores",
]

log = logging.getLogger(__name__)


class RewardWorker:
    """Score images with every configured reward, ``batch_size`` images per reward call.

    ``errors`` lists the failed calls as dicts ``{"reward", "error", "start", "stop",
    "traceback"}`` (samples ``start:stop`` of that ``score`` call got NaN); ``take_errors``
    returns and clears them.
    """

    def __init__(
        self, specs: Sequence[RewardSpec], device: torch.device | str = "cpu", batch_size: int = 32
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rewards = [build_reward(spec, device) for spec in specs]
        names = [reward.name for reward in self.rewards]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"rewards {duplicates} are configured more than once; each may appear once")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.errors: list[dict[str, Any]] = []

    @property
    def names(self) -> list[str]:
        """Keys of the dict that :meth:`score` returns."""
        return [reward.name for reward in self.rewards]

    def score(self, images: Tensor, batch: RewardBatch) -> dict[str, Tensor]:
        """Scores ``{name: float32 [N]}`` of ``images`` (``[N, 3, H, W]`` in [-1, 1]).

        Raises for a malformed call (shapes, missing clean faces for a fidelity reward);
        failures inside a reward become NaN scores and an entry in ``errors``.
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
                try:
                    chunks.append(reward(images[start:stop], batch.select(start, stop)))
                except Exception as exc:  # noqa: BLE001 - any reward failure becomes NaN, never a crash
                    self._record(reward.name, exc, start, stop)
                    chunks.append(torch.full((stop - start,), torch.nan))
            results[reward.name] = torch.cat(chunks) if chunks else torch.empty(0)
        return results

    def take_errors(self) -> list[dict[str, Any]]:
        """The recorded errors since the last call; clears them."""
        errors, self.errors = self.errors, []
        return errors

    def _record(self, name: str, exc: Exception, start: int, stop: int) -> None:
        message = f"{type(exc).__name__}: {exc}"
        log.warning("reward %r failed on samples %d:%d, scored NaN: %s", name, start, stop, message)
        self.errors.append(
            {
                "reward": name,
                "error": message,
                "start": start,
                "stop": stop,
                "traceback": "".join(traceback.format_exception(exc)),
            }
        )


class RewardActor:
    """What runs inside the Ray actor: a :class:`RewardWorker` taking and returning numpy arrays."""

    def __init__(self, specs: Sequence[RewardSpec], device: str, batch_size: int) -> None:
        self.worker = RewardWorker(specs, device=device, batch_size=batch_size)

    def names(self) -> list[str]:
        return self.worker.names

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

    def take_errors(self) -> list[dict[str, Any]]:
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
    device: str | None = None,
    batch_size: int = 32,
    max_restarts: int = 3,
    max_task_retries: int = 1,
    scheduling_strategy=None,
):
    """Start a Ray actor hosting the rewards of ``specs``; returns its ``ActorHandle``.

    ``scheduling_strategy`` places it (e.g. in a bundle of the Stage 2 placement group).

    ``resources`` (an ``ActorGroupConfig`` or a dict with ``num_cpus``/``num_gpus``/``memory``)
    is what the actor reserves; None reserves what the rewards declare
    (:func:`reward_resources`). Reserving less than they declare is allowed (a CPU-only test
    of a GPU reward) and logged. ``device`` defaults to "cuda" when the actor reserves a GPU,
    else "cpu". Scoring is a pure function of its inputs, so a call interrupted by an actor
    restart is retried ``max_task_retries`` times.
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
        log.warning("reward actor reserves %s, less than its rewards declare (%s)", reserved, short)
    device = device or ("cuda" if reserved.get("num_gpus", 0) > 0 else "cpu")
    options = {key: value for key, value in reserved.items() if key != "memory" or value}
    return (
        ray.remote(RewardActor)
        .options(
            max_restarts=max_restarts,
            max_task_retries=max_task_retries,
            scheduling_strategy=scheduling_strategy,
            **options,
        )
        .remote(list(specs), device, batch_size)
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
