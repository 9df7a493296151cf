"""Pref-Restore's condition and its velocity model: the SANA DiT plus the z_low connector.

The condition of a degraded face is c = (S, z_low): the diffusion connector's projection of the
AR integrator's hidden states (the trigger ``<S0>`` and the N semantic codes) and the LQ encoder's
latent of the face. The DiT sees ``encoder_hidden_states = [semantic ; vae_connector(patch_embed(z_low))]``:
z_low passes through the DiT's own ``patch_embed``, which full fine-tuning trains, so whoever
evaluates a DiT composes the texture tokens with *that* DiT (the learner's v_theta, the rollouts' v_old).

``policy.z_low_injection: aligned`` (an rlrestore option, not the paper's) also adds the texture
tokens, which sit position by position on the DiT's patch grid, to the DiT's patch tokens through a
zero-initialised ``Linear(caption_channels -> inner dim)`` (``z_low_projection``): a forward hook on
``transformer.patch_embed`` for the duration of one DiT call, so every caller keeps passing the same
``prepared`` tensor. Zero-initialised, it starts as the paper's path exactly.

``policy.flow_source: z_low`` (an rlrestore option) ends the path at ``z_low + source_noise * eps``
instead of pure noise: sampling starts from the degraded face's latent plus noise, and Stage 1 and
the NFT loss interpolate towards that endpoint (z_low taken as a constant, without gradient).
"""

from __future__ import annotations

from collections.abc import Callable
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

    def __init__(
        self,
        transformer: SanaTransformer2DModel,
        vae_connector: nn.Module,
        flow_shift: float,
        z_low_projection: nn.Linear | None = None,
        z_low_source_noise: float | None = None,
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.vae_connector = vae_connector
        self.flow_shift = flow_shift
        self.z_low_projection = z_low_projection
        self.z_low_source_noise = z_low_source_noise  # None: the path ends at pure noise (the paper)

    def endpoint(self, condition: PrefRestoreCondition, noise: Tensor) -> Tensor:
        """Pure noise (the paper), or ``z_low + source_noise * eps`` with ``flow_source: z_low``."""
        if self.z_low_source_noise is None:
            return noise
        return condition.z_low.detach().to(noise.device, noise.dtype) + self.z_low_source_noise * noise

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
        hook = None
        if self.z_low_projection is not None:
            hook = self.transformer.patch_embed.register_forward_hook(self._aligned_hook(prepared))
        try:
            return self.transformer(
                hidden_states=x_t.to(dtype), encoder_hidden_states=prepared.to(dtype), timestep=timestep,
                return_dict=False,
            )[0]
        finally:
            if hook is not None:
                hook.remove()

    def _aligned_hook(self, prepared: Tensor) -> Callable[[nn.Module, tuple, Tensor], Tensor]:
        """patch_embed's output plus the projected texture tokens (the last ones of ``prepared``)."""
        projection = self.z_low_projection

        def add_texture(module: nn.Module, inputs: tuple, patches: Tensor) -> Tensor:
            texture = prepared[:, -patches.shape[1] :].to(projection.weight.dtype)
            return patches + projection(texture).to(patches.dtype)

        return add_texture


def z_low_source_noise(flow_source: str, source_noise: float) -> float | None:
    """The velocity model's ``z_low_source_noise`` for a policy config's ``flow_source``."""
    return source_noise if flow_source == "z_low" else None


def build_z_low_projection(transformer: SanaTransformer2DModel) -> nn.Linear:
    """The aligned injection's Linear(caption_channels -> DiT inner dim), zero-initialised."""
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    projection = nn.Linear(transformer.config.caption_channels, inner)
    nn.init.zeros_(projection.weight)
    nn.init.zeros_(projection.bias)
    return projection
