"""Rewards served by Ray Serve: any reward as a deployment, and the ``serve`` reward that calls one.

``RewardDeployment`` hosts one reward (built by :func:`~rewards.base.build_reward` from a
``RewardSpec``, as the reward actors build theirs) in every replica of a Ray Serve deployment.
Requests come through two doors and meet in one ``serve.batch`` queue, so concurrent requests
are scored by one call of the reward (requests whose images differ in size are scored in one
call per size):

- HTTP: ``POST`` the wire format of the ``http`` reward (``rewards.http``) to the application's
  route; the answer is ``{"scores": [...]}`` (``null`` for a non-finite score), 400 with
  ``{"error": ...}`` for a malformed request, 500 for a failing reward, 405 for another method;
- a deployment handle: ``handle.score.remote(ScoreRequest(...))`` answers a float32 numpy array
  of N scores. The ``serve`` reward (:class:`ServeReward`) calls it so from Stage 2's reward
  actors, on the same Ray cluster, without an HTTP hop: several runs share one set of replicas.

:func:`reward_application` binds the deployment with its replicas, resources and batching
(``rlrestore.config.ServeConfig``); ``rlrestore serve-reward NAME`` deploys it::

    rlrestore serve-reward sharpness --app sharpness          # HTTP route /sharpness on 127.0.0.1:8000
    stage2:
      rewards:
        - {name: serve, weight: 1.0, args: {app: sharpness, timeout_s: 60}}

Scores are keyed by :class:`ServeReward`'s ``name`` (``serve``); a second served reward in one run
is a subclass with another ``name``, named by its ``module:Class`` path. Ray Serve is imported only
where a deployment is built or called, so importing ``rewards`` stays cheap.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from rewards.base import Reward, RewardBatch, RewardError, build_reward, register_reward
from rewards.http import WIRE_VERSION, decode_request, encode_scores
from rlrestore.config import RewardSpec, ServeConfig
from rlrestore.runtime.devices import DeviceName, actor_device
from rlrestore.runtime.precision import Precision, PrecisionName

__all__ = [
    "DEPLOYMENT_NAME",
    "RewardDeployment",
    "ScoreRequest",
    "ServeReward",
    "check_app_name",
    "reward_application",
]

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "RewardDeployment"
_APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_app_name(app: str) -> str:
    """``app`` if it can name a Serve application and its HTTP route ``/<app>``; ValueError otherwise."""
    if not _APP_NAME.fullmatch(app):
        raise ValueError(
            f"Serve application name {app!r} must be letters, digits, '_', '.' or '-' (it is also the route /{app})"
        )
    return app


@dataclass
class ScoreRequest:
    """One call of a deployment handle: ``images`` float32 ``[N, 3, H, W]`` in [-1, 1], one caption
    per image, optionally the clean faces (same shape) and one metadata dict per image."""

    images: np.ndarray
    captions: list[str]
    clean: np.ndarray | None = None
    metadata: list[dict[str, Any]] | None = None

    @classmethod
    def of(cls, images: Tensor, batch: RewardBatch) -> ScoreRequest:
        """The request scoring ``images`` with what ``batch`` knows of them (clean faces when it has them)."""
        clean = None if batch.clean is None else _float32(batch.clean)
        return cls(_float32(images), list(batch.captions), clean, batch.metadata)

    def tensors(self) -> tuple[Tensor, RewardBatch]:
        """(images, batch) as a reward takes them; ValueError naming what is malformed."""
        if not isinstance(self.images, np.ndarray) or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be a float32 numpy array [N, 3, H, W], got {_describe(self.images)}")
        if self.clean is not None and not isinstance(self.clean, np.ndarray):
            raise ValueError(f"clean must be a numpy array or None, got {_describe(self.clean)}")
        # Arrays from the object store are read-only views; torch wants writable memory.
        images = torch.from_numpy(np.array(self.images, dtype=np.float32))
        clean = None if self.clean is None else torch.from_numpy(np.array(self.clean, dtype=np.float32))
        return images, RewardBatch(list(self.captions), clean, self.metadata)


def _float32(tensor: Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy()


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray | Tensor):
        return f"{type(value).__name__} {value.dtype} {tuple(value.shape)}"
    return type(value).__name__


class RewardDeployment:
    """One replica of a served reward (the class ``reward_application`` turns into a deployment).

    ``device`` is the config's request (auto | cpu | cuda) and ``num_gpus`` what the replica
    reserved: the reward runs on the GPU Ray assigned it, or on the CPU. Under a mixed
    ``precision`` a reward whose class sets ``autocast`` is scored inside ``torch.autocast``.
    ``serve.batch`` wraps :meth:`_score_batch` with ``max_batch_size`` and
    ``batch_wait_timeout_s`` when the replica starts. :meth:`stats` counts requests, batches,
    reward calls and images (per replica).
    """

    def __init__(
        self,
        spec: RewardSpec,
        *,
        device: DeviceName = "auto",
        num_gpus: float = 0.0,
        precision: PrecisionName = "fp32",
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.01,
    ) -> None:
        from ray import serve

        resolved = actor_device(device, num_gpus, "serve replicas", "serve.replicas.num_gpus")
        self.reward = build_reward(spec, resolved)
        self.precision = Precision(precision)
        self.counts = {"requests": 0, "batches": 0, "reward_calls": 0, "images": 0}
        self._batched = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)(
            self._score_batch
        )
        log.info("serving reward %r on %s (batches of up to %d requests)", self.reward.name, resolved, max_batch_size)

    def info(self) -> dict[str, Any]:
        """The served reward: name, whether it needs clean faces, device, wire version."""
        return {
            "reward": self.reward.name,
            "needs_clean": self.reward.needs_clean,
            "device": str(self.reward.device),
            "wire_version": WIRE_VERSION,
        }

    def stats(self) -> dict[str, int]:
        """Requests, batches, reward calls and images scored by this replica so far."""
        return dict(self.counts)

    async def score(self, request: ScoreRequest) -> np.ndarray:
        """Scores (float32 ``[N]``, higher is better, NaN where the reward cannot score) of a handle call."""
        images, batch = request.tensors()
        self._check(images, batch)
        return (await self._scored(images, batch)).numpy()

    async def __call__(self, request: Any) -> Any:
        """The HTTP route: a POST in the ``http`` reward's wire format -> ``{"scores": [...]}``."""
        from starlette.responses import JSONResponse

        if request.method != "POST":
            message = f"POST a scoring request (wire format version {WIRE_VERSION}, see rewards/http.py)"
            return JSONResponse({"error": message}, status_code=405, headers={"Allow": "POST"})
        try:
            images, batch = await asyncio.to_thread(decode_request, await request.body())
            self._check(images, batch)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        try:
            scores = await self._scored(images, batch)
        except Exception as exc:  # the reward failed: the client sees a server error
            log.exception("reward %r failed", self.reward.name)
            return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)
        return JSONResponse(encode_scores(scores))

    def _check(self, images: Tensor, batch: RewardBatch) -> None:
        if self.reward.needs_clean and batch.clean is None:
            raise ValueError(
                f"reward {self.reward.name!r} compares each image with its clean face: send the clean faces"
            )
        if len(batch) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(batch)} captions")

    async def _scored(self, images: Tensor, batch: RewardBatch) -> Tensor:
        self.counts["requests"] += 1
        result = await self._batched((images, batch))
        if isinstance(result, Exception):
            raise result
        return result

    async def _score_batch(self, items: list[tuple[Tensor, RewardBatch]]) -> list[Tensor | Exception]:
        """One ``serve.batch`` batch: scores of each item, or the exception of its group."""
        self.counts["batches"] += 1
        return await asyncio.to_thread(self._score_groups, items)

    def _score_groups(self, items: Sequence[tuple[Tensor, RewardBatch]]) -> list[Tensor | Exception]:
        """Score items of one image size (and clean faces or none) with one reward call per group."""
        groups: dict[tuple, list[int]] = {}
        for index, (images, batch) in enumerate(items):
            groups.setdefault((tuple(images.shape[1:]), batch.clean is None), []).append(index)
        results: list[Tensor | Exception] = [RewardError("not scored")] * len(items)
        for indices in groups.values():
            parts = [items[i] for i in indices]
            images = torch.cat([part[0] for part in parts])
            clean = None if parts[0][1].clean is None else torch.cat([part[1].clean for part in parts])
            batch = RewardBatch(
                [c for part in parts for c in part[1].captions], clean, [m for part in parts for m in part[1].metadata]
            )
            self.counts["reward_calls"] += 1
            self.counts["images"] += images.shape[0]
            try:
                scores = self._call(images, batch)
            except Exception as exc:  # handed to every request of the group
                log.exception("reward %r failed on %d images", self.reward.name, images.shape[0])
                scores = exc
            sizes = [part[0].shape[0] for part in parts]
            pieces = [scores] * len(parts) if isinstance(scores, Exception) else scores.split(sizes)
            for index, piece in zip(indices, pieces, strict=True):
                results[index] = piece
        return results

    def _call(self, images: Tensor, batch: RewardBatch) -> Tensor:
        mixed = self.reward.autocast and self.precision.mixed
        if not mixed:
            return self.reward(images, batch)
        with self.precision.autocast(self.reward.device):
            return self.reward(images, batch)


def reward_application(
    spec: RewardSpec,
    serve_config: ServeConfig,
    *,
    device: DeviceName = "auto",
    precision: PrecisionName = "fp32",
) -> Any:
    """The Serve application of the reward of ``spec`` (a bound :class:`RewardDeployment`), with the
    replicas, resources and batching of ``serve_config``; deploy it with ``serve.run``."""
    from ray import serve

    replicas = serve_config.replicas
    deployment = serve.deployment(RewardDeployment, name=DEPLOYMENT_NAME).options(
        num_replicas=replicas.num_actors,
        ray_actor_options={"num_cpus": replicas.num_cpus, "num_gpus": replicas.num_gpus},
        max_ongoing_requests=serve_config.max_ongoing_requests,
    )
    return deployment.bind(
        spec,
        device=device,
        num_gpus=replicas.num_gpus,
        precision=precision,
        max_batch_size=serve_config.max_batch_size,
        batch_wait_timeout_s=serve_config.batch_wait_timeout_s,
    )


@register_reward("serve")
class ServeReward(Reward):
    """A reward computed by a Ray Serve application on this Ray cluster, called by deployment handle.

    ``app``: the application's name (``rlrestore serve-reward NAME --app APP``). ``timeout_s``:
    seconds one call may take (queueing for a batch included). The images, captions, metadata and,
    when the batch has them, the clean faces go to the application's ``score`` method (a
    :class:`ScoreRequest`); it answers N scores, already oriented (higher is better). A missing
    application, a timeout, a failing reward and an answer of the wrong shape raise
    :class:`~rewards.base.RewardError` naming the application; the reward worker's error policy
    then decides (NaN for the chunk, recorded). The handle is looked up on the first call, and
    again after a failure (the application may have been redeployed).
    """

    resources: ClassVar[dict[str, float]] = {"num_cpus": 0.1, "num_gpus": 0.0}

    def __init__(self, device: torch.device | str = "cpu", *, app: str, timeout_s: float = 60.0) -> None:
        super().__init__(device)
        self.app = check_app_name(app)
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._handle: Any = None

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        handle = self._handle if self._handle is not None else self._connect()
        response = handle.score.remote(ScoreRequest.of(images, batch))
        try:
            answer = response.result(timeout_s=self.timeout_s)
        except TimeoutError as exc:
            response.cancel()
            raise RewardError(
                f"Serve application {self.app!r} did not answer within timeout_s={self.timeout_s:g} s"
            ) from exc
        except Exception as exc:  # the reward, the replica or Serve failed: name the application
            self._handle = None
            cause = getattr(exc, "cause", None) or exc
            raise RewardError(f"Serve application {self.app!r} failed: {type(cause).__name__}: {cause}") from exc
        return self._parse(answer, images.shape[0])

    def _connect(self) -> Any:
        """The handle of the application, or RewardError saying why there is none."""
        import ray

        if not ray.is_initialized():
            raise RewardError(
                f"reward 'serve' (application {self.app!r}) calls Ray Serve by handle and needs a Ray session "
                "on the cluster running it (Stage 2's reward actors have one; elsewhere call ray.init first)"
            )
        from ray import serve
        from ray.serve.exceptions import RayServeException

        try:
            self._handle = serve.get_app_handle(self.app)
        except RayServeException as exc:
            raise RewardError(
                f"Serve application {self.app!r} is not running on this Ray cluster ({exc}); deploy it with "
                f"`rlrestore serve-reward REWARD --app {self.app}` on the cluster the run uses (ray.address)"
            ) from exc
        return self._handle

    def _parse(self, answer: Any, count: int) -> Tensor:
        """Scores ``[count]`` of an answer, or RewardError saying what is malformed."""
        if isinstance(answer, Tensor):
            answer = answer.detach().cpu().numpy()
        if not isinstance(answer, np.ndarray | list | tuple):
            raise RewardError(
                f"Serve application {self.app!r} answered a {type(answer).__name__}, not {count} scores"
            )
        try:
            array = np.asarray(answer)
        except ValueError as exc:  # ragged nested lists
            raise RewardError(f"Serve application {self.app!r} answered malformed scores: {exc}") from exc
        if array.dtype.kind not in "iuf":
            raise RewardError(
                f"Serve application {self.app!r} answered non-numeric scores ({array.dtype}); "
                "return numbers (NaN for an image it cannot score)"
            )
        if array.shape != (count,):
            raise RewardError(
                f"Serve application {self.app!r} answered scores of shape {array.shape} for {count} images; "
                f"its score method must return {count} numbers"
            )
        return torch.from_numpy(array.astype(np.float32))
