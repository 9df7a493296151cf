"""Stage 1 objectives as named functions of tensors (Pref-Restore section IV-C.1).

Stage 1.1, Semantic-to-Diffusion Alignment (Eq. 10):  L = L_CE + alpha * L_diff
    L_CE: next-token prediction of the clean face's codes (:func:`code_prediction_loss`);
    L_diff: flow matching through the frozen DiT, whose gradient reaches the connectors and the
    AR integrator (:func:`flow_matching_loss`).
Stage 1.2, Texture-to-Diffusion Alignment (Eq. 11):   L = L_diff + beta * ||E_theta(y) - E_frozen(x)||^2
    (:func:`latent_consistency_loss`).
Autoencoder stage (tiny models only): L1 + MSE reconstruction (:func:`reconstruction_losses`).

Which networks produce the tensors is each policy's business (``rlrestore.policies``); here x0,
the noise, t and every loss are float32 (under mixed precision only the network inputs are cast).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from rlrestore.flow import interpolate, target_velocity


def flow_noise(x0: Tensor, generator: torch.Generator, t_max: float = 1.0) -> tuple[Tensor, Tensor]:
    """Fresh noise eps ~ N(0, I) like x0 and one t ~ U(0, t_max) per sample (drawn in that order)."""
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    t = torch.rand(x0.shape[0], generator=generator).to(x0.device) * t_max
    return eps, t


def flow_matching_loss(velocity: Callable[[Tensor, Tensor], Tensor], x0: Tensor, endpoint: Tensor, t: Tensor) -> Tensor:
    """|| v_theta(x_t, t) - (endpoint - x0) ||^2 with x_t = (1 - t) x0 + t endpoint (L_diff)."""
    x0, endpoint = x0.float(), endpoint.float()
    v = velocity(interpolate(x0, endpoint, t), t)
    return F.mse_loss(v.float(), target_velocity(x0, endpoint))


def drop_conditions(states: Tensor, probability: float, generator: torch.Generator) -> Tensor:
    """Zero the whole condition of a sample with the given probability (CFG training)."""
    keep = (torch.rand(states.shape[0], generator=generator) >= probability).to(states.device, states.dtype)
    return states * keep.view(-1, *([1] * (states.ndim - 1)))


def code_prediction_loss(logits: Tensor, target_ids: Tensor) -> tuple[Tensor, Tensor]:
    """L_CE: cross-entropy of next-token logits [B, N, V] against token ids [B, N], and the accuracy."""
    logits = logits.float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target_ids.reshape(-1))
    accuracy = (logits.argmax(-1) == target_ids).float().mean().detach()
    return ce, accuracy


def latent_consistency_loss(lq_latent: Tensor, clean_latent: Tensor) -> Tensor:
    """||E_theta(y) - E_frozen(x)||^2 of Eq. 11 (mean squared error)."""
    return F.mse_loss(lq_latent.float(), clean_latent.float())


def reconstruction_losses(reconstruction: Tensor, target: Tensor) -> dict[str, Tensor]:
    """L1 + MSE of an autoencoder's reconstruction; ``loss`` is their sum."""
    reconstruction = reconstruction.float()
    l1, mse = F.l1_loss(reconstruction, target), F.mse_loss(reconstruction, target)
    return {"loss": l1 + mse, "l1": l1, "mse": mse}
