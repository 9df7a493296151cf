"""Pref-Restore's condition and its velocity model: the SANA DiT plus the z_low connector.

The condition of a degraded face is c = (S, z_low): the diffusion connector's projection of the
AR integrator's hidden states (the trigger ``<S0>`` and the N semantic codes) and the LQ encoder's
latent of the face. The DiT sees ``encoder_hidden_states = [semantic ; vae_connector(patch_embed(z_low))]``:
z_low passes through the DiT's own ``patch_embed``, which full fine-tuning trains, so whoever
evaluates a DiT composes the texture tokens with *that* DiT (the learner's v_theta, the rollouts' v_old).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import SanaTransformer2DModel
from torch import Tensor, nn

from rlrestore.policies.base import Condition, VelocityModel


@dataclass
class PrefRestoreCondition(Condition):
    """c = (S, z_low) of each degraded face, and the codes S came from."""

    semantic: Tensor  # [B, N + 1, caption_channels] diffusion_connector(hidden states of <S0> and S)
    z_low: Tensor  # [B, C, h, w] scaled latent of the degraded face from the LQ encoder
    codes: Tensor  # [B, N] semantic codes S (long)


class PrefRestoreVelocity(VelocityModel):
    """v(x_t, t, c) of Pref-Restore: what Stage 2 trains (the DiT; the connector stays frozen)."""

    def __init__(self, transformer: SanaTransformer2DModel, vae_connector: nn.Module, flow_shift: float) -> None:
        super().__init__()
        self.transformer = transformer
        self.vae_connector = vae_connector
        self.flow_shift = flow_shift

    def stage2_modules(self) -> list[nn.Module]:
        """Stage 2 trains the DiT (Table I); the connector stays as Stage 1 left it."""
        return [self.transformer]

    def texture_tokens(self, z_low: Tensor) -> Tensor:
        """z_low -> the DiT's patch embedding -> vae_connector: [B, h*w, caption_channels]."""
        patches = self.transformer.patch_embed(z_low.to(self.transformer.dtype))
        return self.vae_connector(patches.to(next(self.vae_connector.parameters()).dtype))

    def prepare(self, condition: PrefRestoreCondition) -> Tensor:
        """The DiT's ``encoder_hidden_states``: the semantic tokens, then the texture tokens."""
        texture = self.texture_tokens(condition.z_low)
        return torch.cat([condition.semantic.to(texture.dtype), texture], dim=1)

    def velocity(self, x_t: Tensor, t: Tensor, prepared: Tensor) -> Tensor:
        """v(x_t, c, t) of the DiT; t in [0, 1] is passed as t * 1000 in float32 (a bf16 time would
        round 999 to 1000); x_t and c are cast to the DiT's weight dtype."""
        dtype = self.transformer.dtype
        timestep = (t.float() * 1000.0).expand(x_t.shape[0])
        return self.transformer(
            hidden_states=x_t.to(dtype), encoder_hidden_states=prepared.to(dtype), timestep=timestep, return_dict=False
        )[0]
