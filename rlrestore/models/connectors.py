"""Connectors that map the AR hidden states and the z_low patch tokens into the DiT's caption space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Float32RMSNorm(nn.RMSNorm):
    """RMSNorm computed in float32 whatever the input dtype (under autocast, or in a bf16 inference
    copy); the output keeps the input's dtype. Same parameters and state dict as ``nn.RMSNorm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        return F.rms_norm(x.float(), self.normalized_shape, weight, self.eps).to(x.dtype)


class Connector(nn.Sequential):
    """Linear(in, out) -> GELU -> Linear(out, out) -> RMSNorm(out).

    The diffusion connector (AR hidden states -> caption channels) uses the tanh GELU and starts its
    norm weight at sqrt(5.5), as BLIP3o-NEXT does; the vae connector (DiT patch tokens of z_low ->
    caption channels) uses the exact GELU and a unit norm. The released Pref-Restore model uses the tanh
    GELU in both and RMSNorm eps 1e-5 (``policy.vae_connector_gelu``, ``policy.connector_norm_eps``).
    """

    def __init__(
        self, in_dim: int, out_dim: int, gelu: str = "tanh", norm_init: float = 1.0, eps: float = 1e-6
    ) -> None:
        norm = Float32RMSNorm(out_dim, eps=eps)
        nn.init.constant_(norm.weight, norm_init)
        super().__init__(
            nn.Linear(in_dim, out_dim), nn.GELU(approximate=gelu), nn.Linear(out_dim, out_dim), norm
        )
