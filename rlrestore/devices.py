"""Which device every role runs on, the refusals before a run starts, and ``devices.json``.

The rule is one for every role: a role runs on CUDA exactly when its Ray resources reserve GPUs
(``ray.gpus_per_worker`` for Stage 1 workers; ``num_gpus`` of ``stage2.rollout_workers``,
``stage2.reward_workers`` / ``stage2.reward_actors.*``, ``stage2.learners`` and ``eval``), on the
GPU Ray assigned to it (Ray sets ``CUDA_VISIBLE_DEVICES`` per actor, so that GPU is ``cuda:0``
inside the actor; Ray Train names its worker's device, fractional GPUs included). ``device: cuda``
refuses a role without GPUs, ``device: cpu`` refuses GPU reservations, and NCCL groups (Stage 1
workers, learner ranks) refuse fractional GPUs: NCCL needs one rank per physical GPU. In-process
commands (``restore``, ``eval`` without actors, ``bench``) use CUDA when ``device`` is ``cuda`` or
``auto`` with a GPU present.

Every run writes ``<run_dir>/devices.json``: one record per actor (stage, role, actor, node,
device, GPU ids, precision, weight dtype) and logs it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from rlrestore.config import DEFAULT_REWARD_ACTOR, RunConfig

DEVICES_FILE = "devices.json"
DeviceName = Literal["auto", "cpu", "cuda"]

log = logging.getLogger(__name__)


class DeviceError(ValueError):
    """A role's device request cannot be met; the message names the config keys to change."""


def check_role(requested: DeviceName, role: str, key: str, num_gpus: float, nccl: bool = False) -> None:
    """Refuse a role's resources before anything starts.

    ``key`` names the config entry that sets the role's GPUs (for the message); ``nccl``: the role
    forms an NCCL group when on CUDA (one rank per physical GPU).
    """
    if requested == "cuda" and num_gpus <= 0:
        raise DeviceError(
            f"device=cuda, but {role} reserve no GPU ({key}=0): Ray would hide every GPU from them. "
            f"Set {key} (e.g. 1) or use device=auto"
        )
    if requested == "cpu" and num_gpus > 0:
        raise DeviceError(
            f"device=cpu, but {role} reserve {num_gpus} GPU each ({key}): the GPUs would sit idle. "
            f"Set {key}=0 or use device=auto"
        )
    if nccl and num_gpus > 0 and num_gpus != int(num_gpus):
        raise DeviceError(
            f"{role} form an NCCL group, which needs one rank per physical GPU, but {key}={num_gpus}: "
            "use a whole number of GPUs per rank (1)"
        )


def actor_device(requested: DeviceName, num_gpus: float, role: str) -> torch.device:
    """The device of a Ray actor that reserved ``num_gpus``: the GPU Ray assigned it, or the CPU."""
    if num_gpus <= 0 and requested != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"{role} reserved {num_gpus} GPU but CUDA is not available in its process on "
            f"{socket.gethostname()} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
            "check the node's driver and the torch build, or reserve no GPUs"
        )
    return torch.device("cuda", 0)  # Ray narrowed CUDA_VISIBLE_DEVICES to this actor's GPU


def local_device(requested: DeviceName) -> torch.device:
    """The device of an in-process command: CUDA for ``cuda``, or ``auto`` when a GPU is present."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device=cuda, but CUDA is not available on this machine; use device=auto or cpu")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _gpu_ids() -> list[str]:
    """The GPUs Ray assigned to this process (none outside a Ray worker)."""
    import ray

    return [str(gpu) for gpu in ray.get_gpu_ids()] if ray.is_initialized() else []


def _node() -> str:
    """This process's node: its Ray address, else the host name."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else socket.gethostname()


@dataclass
class DeviceRecord:
    """Where one actor of a run computes, and in what numerics."""

    stage: str
    role: str
    actor: str
    device: str
    precision: str
    dtype: str  # dtype of the weights the role computes with (trained ones stay float32 masters)
    node: str = field(default_factory=_node)
    gpu_ids: list[str] = field(default_factory=_gpu_ids)
    gpu_name: str | None = None

    @classmethod
    def here(cls, stage: str, role: str, actor: str, device: torch.device, precision: str, dtype: torch.dtype) -> DeviceRecord:
        """The record of the calling process (node, GPU ids and GPU name read from it)."""
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        return cls(stage, role, actor, str(device), precision, str(dtype).removeprefix("torch."), gpu_name=name)


def write_devices(run_dir: str | Path, stage: str, records: list[DeviceRecord]) -> Path:
    """Put ``stage``'s records into ``<run_dir>/devices.json`` (other stages' records are kept) and
    log them, one line per actor."""
    path = Path(run_dir) / DEVICES_FILE
    kept: list[dict] = []
    if path.is_file():
        try:
            kept = [entry for entry in json.loads(path.read_text()) if entry.get("stage") != stage]
        except (ValueError, AttributeError):
            log.warning("%s was unreadable; it is rewritten", path)
    entries = kept + [asdict(record) for record in records]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(entries, indent=2))
    partial.replace(path)
    for record in records:
        gpus = f" gpus {','.join(record.gpu_ids)}" if record.gpu_ids else ""
        log.info(
            "%s %s %s: %s%s on %s, %s (%s)",
            stage, record.role, record.actor, record.device, gpus, record.node, record.precision, record.dtype,
        )
    return path


def check_run_devices(config: RunConfig, stages: list[str]) -> None:
    """Refuse, before Ray starts, any role of ``stages`` whose device request cannot be met.

    ``stages``: Stage 1 names, ``stage2`` and/or ``eval``.
    """
    device = config.device
    for stage in stages:
        if stage in ("autoencoder", "stage1.1", "stage1.2"):
            check_role(
                device, "Stage 1 workers", "ray.gpus_per_worker", config.ray.gpus_per_worker,
                nccl=config.ray.num_workers > 1,
            )
        elif stage == "stage2":
            s2 = config.stage2
            check_role(device, "Stage 2 rollout actors", "stage2.rollout_workers.num_gpus", s2.rollout_workers.num_gpus)
            for group, (resources, _) in s2.reward_actor_groups().items():
                key = (
                    "stage2.reward_workers.num_gpus"
                    if group == DEFAULT_REWARD_ACTOR
                    else f"stage2.reward_actors.{group}.num_gpus"
                )
                check_role(device, f"Stage 2 reward actors ({group})", key, resources.num_gpus)
            check_role(
                device, "Stage 2 learner ranks", "stage2.learners.num_gpus", s2.learners.num_gpus,
                nccl=s2.learners.num_actors > 1,
            )
        elif stage == "eval" and config.eval.num_actors > 0:
            check_role(device, "eval actors", "eval.num_gpus", config.eval.num_gpus)
