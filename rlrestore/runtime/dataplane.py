"""What a Stage 2 step moves between actors, and how many bytes it moves.

A rollout call produces three parts (:class:`RolloutParts`), each its own object in the Ray
object store, so every consumer fetches only what it reads and none of it passes through the
driver:

- :class:`RolloutMeta`, for the driver: ids, captions, seeds, the policy version and the sizes of
  the other two parts (a few hundred bytes, whatever the resolution);
- :class:`RewardInputs`, for the reward actors: the K candidates of each input and its clean and
  degraded faces as uint8 images (they are images: a quarter of float32);
- :class:`LearnerInputs`, for the learner ranks: the candidates' clean latents x0 (float32) and one
  condition per input (never one per candidate).

Weight sync sends a :class:`WeightUpdate`: the LoRA adapters when only adapters train, else the
trained weights, in the rollout's compute dtype; the learners put it in the object store once per
version and every rollout actor reads that one copy.

:func:`payload_bytes` is the byte count the driver logs (``driver/bytes_in``, ``driver/bytes_out``,
``sync/bytes``): the data of tensors and arrays, strings, 8 bytes per number and 28 per object
reference (Ray's id), not Ray's serialised size. :func:`resolve` lets the same code take an object
or a reference to it (in-process benchmark workers pass objects, Ray actors references).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from rlrestore.policies.base import Condition

OBJECT_REF_BYTES = 28
"""Bytes counted for an object reference (its id)."""


def to_uint8_images(images: Tensor) -> Tensor:
    """Images in [-1, 1] (any leading dims, ``[..., 3, H, W]``) -> uint8 in [0, 255], rounded."""
    return ((images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).cpu()


def from_uint8_images(images: Tensor) -> Tensor:
    """uint8 images -> float32 in [-1, 1] (the inverse of :func:`to_uint8_images` up to rounding)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    return images.float().div(127.5).sub(1.0)


@dataclass
class RolloutMeta:
    """What the driver reads of a rollout call: small, independent of the image resolution."""

    ids: list[str]
    captions: list[str]
    seeds: Tensor  # [B, K] int64
    policy_version: int
    cached_conditions: int = 0  # inputs whose condition came from the actor's cache
    nbytes: dict[str, int] = field(default_factory=dict)  # payload bytes of the reward / learner parts

    @property
    def inputs(self) -> int:
        return self.seeds.shape[0]

    @property
    def candidates(self) -> int:
        """K, candidates per input."""
        return self.seeds.shape[1]


@dataclass
class RewardInputs:
    """What the reward actors read: candidates and faces as uint8 ``[..., 3, R, R]`` images."""

    images: Tensor  # [B, K, 3, R, R] uint8
    clean: Tensor  # [B, 3, R, R] uint8
    lq: Tensor  # [B, 3, R, R] uint8

    def candidate_rows(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Candidates ``start:stop`` of the flattened [B * K] rows as float32 in [-1, 1], with the
        clean face of each one's input."""
        k = self.images.shape[1]
        rows = torch.arange(start, stop)
        images = self.images.flatten(0, 1)[start:stop]
        return from_uint8_images(images), from_uint8_images(self.clean[rows // k])


@dataclass
class LearnerInputs:
    """What the learner ranks read: every candidate's clean latent and each input's condition."""

    x0: Tensor  # [B, K, C, h, w] float32
    condition: Condition  # B conditions, one per input


@dataclass
class RolloutParts:
    """One rollout call's three parts (objects in process, or references to them on Ray)."""

    meta: RolloutMeta
    reward: RewardInputs | Any
    learner: LearnerInputs | Any

    @classmethod
    def of(cls, meta: RolloutMeta, reward: RewardInputs, learner: LearnerInputs) -> RolloutParts:
        """The parts of a call, with the sizes of the reward and learner parts recorded in ``meta``."""
        meta.nbytes = {"reward": payload_bytes(reward), "learner": payload_bytes(learner)}
        return cls(meta, reward, learner)


LORA: Literal["lora"] = "lora"
FULL: Literal["full"] = "full"


@dataclass
class WeightUpdate:
    """New rollout weights: ``tensors`` are LoRA adapter factors (``kind`` lora; ``lora`` holds the
    adapters' rank, alpha and targets so a rollout actor can add them) or the trained weights
    (``kind`` full; the frozen rest is what the actor loaded), keyed as the velocity model names them."""

    kind: Literal["lora", "full"]
    tensors: dict[str, Tensor]
    lora: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in self.tensors.values())


def save_weight_update(update: WeightUpdate, path: Path) -> None:
    """Write ``update`` as safetensors, its kind and LoRA settings in the file's metadata."""
    tensors = {key: value.contiguous() for key, value in update.tensors.items()}
    save_file(tensors, str(path), metadata={"kind": update.kind, "lora": json.dumps(update.lora)})


def load_weight_update(path: Path) -> WeightUpdate:
    """Read a :func:`save_weight_update` file (a file without metadata, written by an earlier
    release, holds whole rollout weights: kind ``full``)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__
    kind = metadata.get("kind", FULL)
    if kind not in (LORA, FULL):
        raise ValueError(f"{path}: weight update kind {kind!r} is neither {LORA!r} nor {FULL!r}")
    return WeightUpdate(kind, tensors, json.loads(metadata.get("lora", "{}")))


def resolve(value: Any) -> Any:
    """``value``, or the object it references when it is a Ray ``ObjectRef``."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return value
    if isinstance(value, ray.ObjectRef):
        return ray.get(value)
    return value


def payload_bytes(value: Any) -> int:
    """Bytes of data in ``value``: tensor and array data, UTF-8 strings, 8 per number, 28 per
    object reference, summed through lists, tuples, dicts and dataclasses."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (str, bytes)):
        return len(value.encode() if isinstance(value, str) else value)
    if isinstance(value, (bool, int, float)) or value is None:
        return 8
    if isinstance(value, dict):
        return sum(payload_bytes(key) + payload_bytes(item) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return sum(payload_bytes(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(payload_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if type(value).__name__ == "ObjectRef":
        return OBJECT_REF_BYTES
    if hasattr(value, "model_dump"):  # a config section
        return payload_bytes(value.model_dump())
    raise TypeError(f"payload_bytes cannot size a {type(value).__name__}")


class Traffic:
    """Bytes the driver sends (``out``) and receives (``in``) during one step."""

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0

    def sent(self, *values: Any) -> None:
        self.bytes_out += sum(payload_bytes(value) for value in values)

    def received(self, *values: Any) -> None:
        self.bytes_in += sum(payload_bytes(value) for value in values)

    def metrics(self) -> dict[str, float]:
        return {"driver/bytes_in": float(self.bytes_in), "driver/bytes_out": float(self.bytes_out)}
