"""The Pref-Restore policy: AR semantic integrator + SANA DiT conditioned on semantic tokens and z_low.

Data flow (Pref-Restore section IV):

    y --SigLIP2+SimVQ--> codes(y) --Qwen3 prompt--> generated codes S --Qwen3 hidden (N+1)--> diffusion_connector --+
    y --DC-AE encoder (lq_encoder)--> z_low --DiT patch_embed--> vae_connector -------------------------------------+--> DiT
                                                                                      encoder_hidden_states (concat)

The networks come from ``networks``, prompting and decoding from ``integrator``, the directory
format from ``serialization``, the Stage 1 losses from ``training``; the velocity model (the DiT
and the z_low connector) from ``velocity``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlrestore.config import PolicyConfig, SamplerConfig
from rlrestore.policies.base import RestorationPolicy
from rlrestore.policies.prefrestore import serialization, training
from rlrestore.policies.prefrestore.integrator import SemanticIntegrator
from rlrestore.policies.prefrestore.networks import (
    PrefRestoreNetworks,
    build_diffusion_connector,
    build_networks,
    build_vae_connector,
)
from rlrestore.policies.prefrestore.velocity import (
    PrefRestoreCondition,
    PrefRestoreVelocity,
    build_z_low_projection,
    z_low_source_noise,
)
from rlrestore.policies.registry import register_policy


@dataclass
class Conditioning:
    """A batch's condition, the DiT input it composes to with the policy's DiT, and (teacher-forced
    or not) the AR logits over the codes S: what the Stage 1 losses need."""

    condition: PrefRestoreCondition
    encoder_hidden_states: Tensor  # [B, (N + 1) + h*w, caption_channels]
    logits: Tensor  # [B, N, vocab] next-token logits predicting `condition.codes`

    @property
    def codes(self) -> Tensor:
        return self.condition.codes


@register_policy
class PrefRestorePolicy(RestorationPolicy):
    """All networks of Pref-Restore and the operations the stages and roles compose."""

    policy_type = "prefrestore"
    components = (
        "integrator", "diffusion_connector", "vae_connector", "z_low_projection", "transformer", "lq_encoder", "vae"
    )
    stages = ("autoencoder", "stage1.1", "stage1.2")

    def __init__(self, config: PolicyConfig, networks: PrefRestoreNetworks) -> None:
        super().__init__()
        self.config = config
        self.vocabulary = networks.vocabulary
        self.visual_tokenizer = networks.visual_tokenizer
        self.integrator = networks.integrator
        self.vae = networks.vae
        self.lq_encoder = copy.deepcopy(networks.vae.encoder)
        self.diffusion_connector = build_diffusion_connector(
            config, networks.integrator.config.hidden_size, networks.transformer
        )
        vae_connector = build_vae_connector(config, networks.transformer)
        # built last: the other networks draw the same random init with either z_low injection
        projection = build_z_low_projection(networks.transformer) if config.z_low_injection == "aligned" else None
        self.velocity_model = PrefRestoreVelocity(
            networks.transformer, vae_connector, config.flow_shift, projection,
            z_low_source_noise(config.flow_source, config.source_noise),
        )
        self.semantic = SemanticIntegrator(self.integrator, self.vocabulary, config, self.visual_tokenizer.num_tokens)
        self.set_trainable([])

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: PolicyConfig) -> PrefRestorePolicy:
        """Build every network: random-init from `arch`, or weights from `pretrained` (local only),
        in float32 whatever the files hold (roles cast inference copies to their compute dtype)."""
        return cls(config, build_networks(config)).float()

    def save_pretrained(self, path: str | Path) -> None:
        serialization.save_policy(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> PrefRestorePolicy:
        return serialization.load_policy(cls, path)

    def apply_runtime_options(self, options: dict[str, Any]) -> None:
        """The run's ``ar_backend`` and ``vllm`` settings (checked here: vLLM must be able to run)."""
        super().apply_runtime_options(options)
        self.semantic.use_config(self.config)

    @classmethod
    def velocity_from_pretrained(cls, path: str | Path) -> PrefRestoreVelocity:
        return serialization.load_velocity(path)

    @classmethod
    def write_velocity(cls, base: Path, state: dict[str, Tensor], out: Path) -> None:
        serialization.write_velocity(base, state, out)

    # ----------------------------------------------------------------------------- networks
    @property
    def transformer(self) -> nn.Module:
        """The SANA DiT (part of the velocity model)."""
        return self.velocity_model.transformer

    @property
    def vae_connector(self) -> nn.Module:
        """The z_low connector (part of the velocity model)."""
        return self.velocity_model.vae_connector

    def component(self, name: str) -> nn.Module:
        if name == "z_low_projection" and self.velocity_model.z_low_projection is None:
            raise KeyError("z_low_projection exists only with policy.z_low_injection=aligned")
        if name in ("transformer", "vae_connector", "z_low_projection"):
            return getattr(self.velocity_model, name)
        return super().component(name)

    def set_trainable(self, names: Sequence[str]) -> list[nn.Parameter]:
        """As the base class; with the aligned z_low injection, training the vae_connector (the z_low
        path) also trains ``z_low_projection``."""
        names = list(names)
        aligned = self.velocity_model.z_low_projection is not None
        if aligned and "vae_connector" in names and "z_low_projection" not in names:
            names.append("z_low_projection")
        return super().set_trainable(names)

    @property
    def num_semantic_tokens(self) -> int:
        return self.visual_tokenizer.num_tokens

    def to_tokenizer_size(self, images: Tensor) -> Tensor:
        """Resize images in [-1, 1] to the vision tower's input size."""
        size = self.config.tokenizer_resolution
        if images.shape[-1] == size and images.shape[-2] == size:
            return images
        return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)

    # ----------------------------------------------------------------------------- latents
    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Frozen DC-AE latent of clean faces: the flow-matching target x0 (float32)."""
        return (self.vae.encode(images.to(self.vae.dtype)).latent * self.scaling_factor).float()

    def encode_lq(self, images: Tensor) -> Tensor:
        """z_low: latent of degraded faces from the (Stage 1.2 trainable) LQ encoder."""
        return self.lq_encoder(images.to(self.vae.dtype)) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> float32 images in [-1, 1]."""
        return self.vae.decode((latents / self.scaling_factor).to(self.vae.dtype)).sample.float().clamp(-1, 1)

    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the DiT latent at the generation resolution."""
        side = self.config.resolution // self.vae.spatial_compression_ratio
        return self.vae.config.latent_channels, side, side

    @torch.no_grad()
    def adopt_fitted_vae(self, clean_images: Tensor) -> float:
        """After fitting the DC-AE from scratch: copy its encoder into E_theta and set the latent
        scaling factor to 1 / std of the clean faces' latents (unit-variance flow targets, as SANA's
        0.41407 was chosen). Returns the new scaling factor."""
        self.lq_encoder.load_state_dict(self.vae.encoder.state_dict())
        latents = self.vae.encode(clean_images.to(self.device, self.vae.dtype)).latent.float()
        scale = float(1.0 / latents.std().clamp(min=1e-6))
        self.vae.register_to_config(scaling_factor=scale)
        return scale

    def after_handoff(self, previous_stage: str, clean_images: Tensor) -> None:
        if previous_stage == "autoencoder":
            self.adopt_fitted_vae(clean_images)

    # ----------------------------------------------------------------------------- conditions
    def conditioning(
        self,
        lq: Tensor,
        captions: list[str],
        target_codes: Tensor | None = None,
        sampler: SamplerConfig | None = None,
        generator: torch.Generator | None = None,
    ) -> Conditioning:
        """Condition c = (S, z_low) of degraded faces ``lq`` ([-1, 1], generation size), its DiT input
        and the AR logits. With ``target_codes`` (training) the AR pass is teacher-forced; otherwise the
        integrator generates S first (inference), then runs once more over the full sequence."""
        with torch.no_grad():
            lq_codes = self.visual_tokenizer(self.to_tokenizer_size(lq))
        prompt_ids, prompt_mask = self.semantic.prompt_batch(lq_codes, captions)
        if target_codes is None:
            if sampler is None or generator is None:
                raise ValueError("conditioning() without target codes needs a sampler config and a generator")
            target_codes = self.semantic.generate_codes(prompt_ids, prompt_mask, sampler, generator)
        # A frozen integrator (Stage 1.2, rollouts) keeps no activations for backward.
        integrator_trains = any(p.requires_grad for p in self.integrator.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and integrator_trains):
            hidden, logits = self.semantic.semantic_states(prompt_ids, prompt_mask, target_codes)
        semantic = self.diffusion_connector(hidden.to(self.diffusion_connector[0].weight.dtype))
        condition = PrefRestoreCondition(semantic=semantic, z_low=self.encode_lq(lq), codes=target_codes)
        return Conditioning(condition, self.velocity_model.prepare(condition), logits=logits)

    @torch.no_grad()
    def condition(
        self, lq: Tensor, captions: list[str], sampler: SamplerConfig, generator: torch.Generator
    ) -> PrefRestoreCondition:
        """The inference condition: S generated by the integrator from the degraded faces."""
        return self.conditioning(lq, captions, sampler=sampler, generator=generator).condition

    def deterministic_condition(self, sampler: SamplerConfig) -> bool:
        """Greedy AR decoding makes the same codes for the same input (the integrator and the
        encoders are frozen in Stage 2; it trains the velocity model only)."""
        return sampler.ar_sampling == "greedy"

    @torch.no_grad()
    def target_codes(self, hq: Tensor) -> Tensor:
        """Semantic codes of clean faces (Stage 1.1 CE targets)."""
        return self.visual_tokenizer(self.to_tokenizer_size(hq))

    def velocity(self, x_t: Tensor, t: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        """v_theta(x_t, c, t) for a composed DiT input (see :meth:`PrefRestoreVelocity.velocity`)."""
        return self.velocity_model.velocity(x_t, t, encoder_hidden_states)

    # ----------------------------------------------------------------------------- Stage 1
    def stage1_losses(self, stage: str, batch: dict, config: Any, generator: torch.Generator) -> dict[str, Tensor]:
        return training.stage1_losses(self, stage, batch, config, generator)
