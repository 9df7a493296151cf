"""DeepSpeed set-up of a learner rank: the process group, the engine config, safe checkpoint loading."""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
from collections.abc import Iterator
from typing import Any

import deepspeed
import deepspeed.ops
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from rlrestore.config import OptimConfig
from rlrestore.models.loading import CheckpointError
from rlrestore.runtime.precision import Precision

LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def skip_shm_comm_build() -> None:
    """Stop DeepSpeed from JIT-compiling its CPU shared-memory comm op.

    On CPU, ``deepspeed.init_distributed`` compiles ``deepspeed_shm_comm`` with ninja/g++ (77 s
    on 2 cores the first time, then cached in ~/.cache/torch_extensions). The op only serves
    ``inference_all_reduce`` (tensor-parallel inference); training collectives go through
    torch.distributed (gloo) either way. DeepSpeed builds the op only if its compatibility table
    lists it, so marking it incompatible skips the build and leaves training unchanged.
    """
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with ``torch.load(weights_only=True)``.

    DeepSpeed's own loader unpickles with ``weights_only=False``, so a tampered checkpoint could
    run code. Its files hold only tensors, containers and three plain DeepSpeed types (the ZeRO
    optimizer's loss scaler, ZeRO stage enum and parameter-fragment addresses), which are the
    only globals this loader accepts; anything else is refused with a :class:`CheckpointError`.
    """

    SAFE_GLOBALS = (LossScaler, ZeroStageEnum, fragment_address)

    def load(self, path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(list(self.SAFE_GLOBALS)):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            first_line = str(exc).strip().splitlines()[-1]
            raise CheckpointError(
                f"{path}: refusing to load, it holds objects other than tensors and DeepSpeed's "
                f"plain state types ({first_line})"
            ) from None


def free_port() -> int:
    """A TCP port that is free on this machine right now (for the rendezvous of rank 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def lone_rank_env(world_size: int) -> Iterator[None]:
    """DeepSpeed reads the launcher's variables (RANK, LOCAL_RANK, ...) from the environment.
    A lone rank sets them for its own set-up only and restores the caller's environment after,
    so they leak neither into later code nor into processes started afterwards (Ray workers)."""
    if world_size > 1:
        yield
        return
    saved = {name: os.environ.get(name) for name in LAUNCH_VARIABLES}
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def init_distributed(rank: int, world_size: int, device: torch.device) -> None:
    """Join the process group (gloo on CPU, nccl on GPU), or check the one already there."""
    if dist.is_initialized() and (dist.get_world_size() != world_size or dist.get_rank() != rank):
        raise RuntimeError(
            f"torch.distributed is already initialised as rank {dist.get_rank()} of "
            f"{dist.get_world_size()}, but this learner is rank {rank} of {world_size}"
        )
    skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def deepspeed_config(
    optim: OptimConfig, micro_batch: int, zero_stage: int, precision: Precision
) -> dict[str, Any]:
    """The engine config: AdamW (torch's, no fused op to JIT-build), clipping, ZeRO, the precision mode."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,  # the step's micro-batch count varies: boundary set by hand
        "gradient_clipping": optim.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": zero_stage},
        **precision.deepspeed(),
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
