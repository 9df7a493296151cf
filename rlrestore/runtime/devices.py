"""Which device every role runs on, the refusals before a run starts, and ``devices.json``.

The rule is one for every role: a role runs on CUDA exactly when its Ray resources reserve GPUs
(``num_gpus`` of ``ray.train_workers`` for Stage 1 workers, of ``stage2.resources.*`` for the
Stage 2 actors and of ``eval.actors``: one ``ActorGroupConfig`` each), on the
GPU Ray assigned to it (Ray sets ``CUDA_VISIBLE_DEVICES`` per actor, so that GPU is ``cuda:0``
inside the actor; Ray Train names its worker's device, fractional GPUs included:
:func:`train_worker_device`). ``device: cuda`` refuses a role without GPUs, ``device: cpu``
refuses GPU reservations, and NCCL groups (Stage 1 workers, learner ranks) refuse fractional
GPUs: NCCL needs one rank per physical GPU. A role that reserved GPUs but finds no CUDA in its
process is refused too. In-process commands (``restore``, ``eval`` without actors, ``bench``) use
CUDA when ``device`` is ``cuda`` or ``auto`` with a GPU present (:func:`local_device`).

Every run writes ``devices.json`` (into ``<run_dir>``, or the output folder of ``eval`` and
``restore``): one record per actor (stage, role, actor, node, device, GPU ids, precision, weight
dtype, autocast dtype) and logs it.
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

from rlrestore.config import RunConfig, reward_group_key
from rlrestore.runtime.console import FILE_ONLY

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


def _require_cuda(role: str, num_gpus: float, key: str) -> None:
    """Refuse a role that reserved GPUs but sees no CUDA in its own process."""
    if not torch.cuda.is_available():
        raise DeviceError(
            f"{role} reserved {num_gpus:g} GPU ({key}) but CUDA is not available in its process on "
            f"{socket.gethostname()} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
            f"check the node's driver and the torch build, or set {key}=0"
        )


def actor_device(requested: DeviceName, num_gpus: float, role: str, key: str = "num_gpus") -> torch.device:
    """The device of a Ray actor that reserved ``num_gpus``: the GPU Ray assigned it, or the CPU.

    ``key`` names the config entry of ``num_gpus`` in the messages of a refusal.
    """
    check_role(requested, role, key, num_gpus)
    if num_gpus <= 0:
        return torch.device("cpu")
    _require_cuda(role, num_gpus, key)
    return torch.device("cuda", 0)  # Ray narrowed CUDA_VISIBLE_DEVICES to this actor's GPU


def train_worker_device(requested: DeviceName, gpus_per_worker: float, nccl: bool) -> torch.device:
    """The device of a Ray Train worker (Stage 1): ``ray.train.torch.get_device()`` when the workers
    reserve GPUs (right with fractional GPUs and whatever ``CUDA_VISIBLE_DEVICES`` Ray Train set),
    else the CPU. ``nccl``: the workers form an NCCL group (more than one)."""
    key = "ray.train_workers.num_gpus"
    check_role(requested, "Stage 1 workers", key, gpus_per_worker, nccl=nccl)
    if gpus_per_worker <= 0:
        return torch.device("cpu")
    _require_cuda("a Stage 1 worker", gpus_per_worker, key)
    from ray.train.torch import get_device

    device = get_device()
    if device.type != "cuda":
        raise DeviceError(f"a Stage 1 worker reserved {gpus_per_worker:g} GPU ({key}) but Ray Train gave it {device}")
    return device


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
    autocast: str | None = None  # dtype of torch.autocast around its forward passes, if any

    @classmethod
    def here(
        cls,
        stage: str,
        role: str,
        actor: str,
        device: torch.device,
        precision: str,
        dtype: torch.dtype | str,
        autocast: torch.dtype | None = None,
    ) -> DeviceRecord:
        """The record of the calling process (node, GPU ids and GPU name read from it)."""
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        return cls(
            stage, role, actor, str(device), precision, _dtype_name(dtype), gpu_name=name,
            autocast=None if autocast is None else _dtype_name(autocast),
        )  # fmt: skip


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


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
        autocast = f", autocast {record.autocast}" if record.autocast else ""
        log.info(
            "%s %s %s: %s%s on %s, %s (weights %s%s)",
            stage, record.role, record.actor, record.device, gpus, record.node, record.precision,
            record.dtype, autocast, extra=FILE_ONLY,
        )  # fmt: skip
    return path


def check_run_devices(config: RunConfig, stages: list[str]) -> None:
    """Refuse, before Ray starts, any role of ``stages`` whose device request cannot be met.

    ``stages``: Stage 1 names, ``stage2`` and/or ``eval``.
    """
    device = config.device
    for stage in stages:
        if stage in ("autoencoder", "stage1.1", "stage1.2"):
            workers = config.ray.train_workers
            check_role(
                device, "Stage 1 workers", "ray.train_workers.num_gpus", workers.num_gpus,
                nccl=workers.num_actors > 1,
            )
        elif stage == "stage2":
            resources = config.stage2.resources
            check_role(device, "Stage 2 rollout actors", "stage2.resources.rollout.num_gpus", resources.rollout.num_gpus)
            for group, (reserved, _) in config.stage2.reward_actor_groups().items():
                key = f"{reward_group_key(group)}.num_gpus"
                check_role(device, f"Stage 2 reward actors ({group})", key, reserved.num_gpus)
            check_role(
                device, "Stage 2 learner ranks", "stage2.resources.learner.num_gpus", resources.learner.num_gpus,
                nccl=resources.learner.num_actors > 1,
            )
        elif stage == "eval" and config.eval.actors.num_actors > 0:
            check_role(device, "eval actors", "eval.actors.num_gpus", config.eval.actors.num_gpus)
        elif stage == "eval":
            local_device(device)  # eval.actors.num_actors=0: restores and scores in this process


def _gpus_at_once(config: RunConfig, stage: str) -> tuple[float, str]:
    """GPUs ``stage`` must hold at the same time to start, and the keys that set them."""
    if stage in ("autoencoder", "stage1.1", "stage1.2"):
        workers = config.ray.train_workers
        return workers.num_actors * workers.num_gpus, "ray.train_workers.num_actors x num_gpus"
    if stage == "stage2":
        s2 = config.stage2
        groups = [s2.resources.rollout, s2.resources.learner, *(r for r, _ in s2.reward_actor_groups().values())]
        return sum(g.num_actors * g.num_gpus for g in groups), "stage2.resources.*.num_actors x num_gpus"
    if stage == "eval" and config.eval.actors.num_actors > 0:
        return config.eval.actors.num_gpus, "eval.actors.num_gpus"
    return 0.0, ""


def check_cluster_gpus(config: RunConfig, stages: list[str]) -> None:
    """Once connected to Ray: refuse (a local cluster) or warn about (a cluster named by
    ``ray.address`` or ``RAY_ADDRESS``: an autoscaler may add GPU nodes) stages that reserve more
    GPUs than the cluster has, instead of waiting for them forever."""
    import ray

    have = float(ray.cluster_resources().get("GPU", 0.0))
    local = config.ray.address is None and not os.environ.get("RAY_ADDRESS")
    for stage in stages:
        needed, keys = _gpus_at_once(config, stage)
        if needed <= have + 1e-9:
            continue
        message = f"{stage} reserves {needed:g} GPUs at once ({keys}), but the Ray cluster has {have:g}"
        if local:
            raise DeviceError(
                f"{message}: the local cluster started here cannot run it. Lower those keys (0 GPUs runs on "
                "the CPU), or connect to a cluster with GPUs (ray.address)"
            )
        log.warning("%s; the job waits until nodes with GPUs join", message)
