"""Numerics of every role from one config key, ``precision`` (fp32 | bf16-mixed | fp16-mixed).

What mixed precision means here:

* Trained weights are float32 masters. Stage 1 (DDP) keeps float32 parameters and runs the
  forward under ``torch.autocast``; the Stage 2 learners use DeepSpeed's bf16 / fp16 mode, which
  keeps float32 masters in the optimizer (fp16 with dynamic loss scaling).
* EMAs (v_old, the export EMA) accumulate in float32: a bf16 ``lerp`` at decay 0.999 drops most
  updates (bf16 has 8 bits of mantissa).
* Inference copies (rollouts, eval, restore) hold their weights in the compute dtype; the sampler
  state x and the flow time t stay float32 and only the network input is cast. Stage 1's frozen
  components stay float32 too and compute under autocast: every checkpoint saves them, and a
  later stage trains them, so rounding them to bf16 would lose information for good.
* Reward models keep the weights they are built with; a reward whose class sets
  ``autocast = True`` (the CLIP-based preference rewards) is scored under ``autocast`` to the
  compute dtype, the others (pixel metrics, pyiqa IQA models, ArcFace, landmarks) in float32.
  Evaluation metrics always run in float32.

A plain ``float32`` run is the ``fp32`` mode: every context below is then a no-op.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

PrecisionName = Literal["fp32", "bf16-mixed", "fp16-mixed"]
_COMPUTE = {"fp32": torch.float32, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The numerics of one run (``RunConfig.precision``)."""

    name: PrecisionName = "fp32"

    def __post_init__(self) -> None:
        if self.name not in _COMPUTE:
            raise ValueError(f"precision must be one of {sorted(_COMPUTE)}, got {self.name!r}")

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype of matmuls, of inference weights and of frozen components."""
        return _COMPUTE[self.name]

    @property
    def mixed(self) -> bool:
        return self.name != "fp32"

    def autocast(self, device: torch.device | str) -> contextlib.AbstractContextManager:
        """``torch.autocast`` to the compute dtype on ``device`` (a no-op under fp32)."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.compute_dtype)

    def grad_scaler(self, device: torch.device | str) -> torch.amp.GradScaler | None:
        """A dynamic loss scaler for fp16-mixed training outside DeepSpeed (Stage 1), else None."""
        if self.name != "fp16-mixed":
            return None
        return torch.amp.GradScaler(torch.device(device).type)

    def deepspeed(self) -> dict[str, Any]:
        """DeepSpeed's ``bf16`` / ``fp16`` sections: bf16 / fp16 module weights with float32
        masters in the optimizer; fp16 with dynamic loss scaling (``loss_scale: 0``)."""
        return {
            "bf16": {"enabled": self.name == "bf16-mixed"},
            "fp16": (
                {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1}
                if self.name == "fp16-mixed"
                else {"enabled": False}
            ),
        }

    def for_inference(self, module: nn.Module) -> nn.Module:
        """Cast a module that only infers (an inference copy) to the compute dtype, in place."""
        return module.to(self.compute_dtype)


def network_input(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``x`` in the dtype of ``module``'s weights (the sampler state stays float32 outside)."""
    dtype = next(module.parameters()).dtype
    return x if x.dtype == dtype else x.to(dtype)
