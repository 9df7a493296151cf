"""A small conditional UNet flow, written only against the policy interface (``policy.type: flow_unet``).

It restores in pixel space with a diffusers ``UNet2DModel`` that sees x_t next to the degraded
image y (6 input channels). Its path does not end at pure noise: like a posterior-mean rectified
flow it runs from the clean face (t = 0) to ``y + source_noise * eps`` (t = 1), so sampling starts
from the degraded face plus noise and the NFT loss interpolates towards that endpoint. Stage 1 fits
it by flow matching in the ``stage1_2`` section (trainable: [unet]); Stage 2 post-trains it like any
policy. The directory holds ``policy_config.json`` and ``unet/`` (a diffusers directory).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from safetensors.torch import save_file
from torch import Tensor

from rlrestore.config import FlowUNetConfig, SamplerConfig
from rlrestore.losses import drop_conditions, flow_matching_loss, flow_noise
from rlrestore.models.loading import CheckpointError, check_arch_keys, init_signature_keys, load_component
from rlrestore.policies.base import (
    POLICY_CONFIG,
    Condition,
    RestorationPolicy,
    VelocityModel,
    read_policy_config,
)
from rlrestore.policies.registry import register_policy

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass
class FlowUNetCondition(Condition):
    """The degraded image itself, at the generation size."""

    lq: Tensor  # [B, 3, R, R] in [-1, 1]


class FlowUNetVelocity(VelocityModel):
    """v(x_t, t, y) of the UNet; the path's endpoint is y + source_noise * eps."""

    def __init__(self, unet: UNet2DModel, source_noise: float, flow_shift: float) -> None:
        super().__init__()
        self.unet = unet
        self.source_noise = source_noise
        self.flow_shift = flow_shift

    def prepare(self, condition: FlowUNetCondition) -> Tensor:
        return condition.lq

    def velocity(self, x_t: Tensor, t: Tensor, prepared: Tensor) -> Tensor:
        dtype = self.unet.dtype
        inputs = torch.cat([x_t.to(dtype), prepared.to(dtype)], dim=1)
        return self.unet(inputs, (t.float() * 1000.0).expand(x_t.shape[0])).sample

    def endpoint(self, condition: FlowUNetCondition, noise: Tensor) -> Tensor:
        return condition.lq.float() + self.source_noise * noise


def _build_unet(arch: dict[str, Any]) -> UNet2DModel:
    check_arch_keys("unet", arch, init_signature_keys(UNet2DModel))
    return UNet2DModel(**arch)


@register_policy
class FlowUNetPolicy(RestorationPolicy):
    """The UNet flow: condition = y, x0 = the clean image, no autoencoder (pixel space)."""

    policy_type = "flow_unet"
    components = ("unet",)
    stages = ("stage1.2",)

    def __init__(self, config: FlowUNetConfig, unet: UNet2DModel) -> None:
        super().__init__()
        self.config = config
        self.velocity_model = FlowUNetVelocity(unet, config.source_noise, config.flow_shift)

    @property
    def unet(self) -> UNet2DModel:
        return self.velocity_model.unet

    def component(self, name: str) -> torch.nn.Module:
        super().component(name)  # checks the name
        return self.unet

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: FlowUNetConfig) -> FlowUNetPolicy:
        unet = load_component("unet", config.unet, _build_unet, UNet2DModel.from_pretrained)
        if unet.config.in_channels != 6 or unet.config.out_channels != 3:
            raise ValueError(
                f"policy.unet needs in_channels 6 (x_t and the degraded image) and out_channels 3, got "
                f"{unet.config.in_channels} and {unet.config.out_channels}"
            )
        return cls(config, unet).float()

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / "unet")
        meta = {"format_version": 1, "policy": self.config.model_dump(mode="json")}
        (path / POLICY_CONFIG).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> FlowUNetPolicy:
        _, config = read_policy_config(path, FlowUNetConfig)
        local = config.model_copy(deep=True)
        local.unet.pretrained, local.unet.subfolder = str(Path(path) / "unet"), None
        policy = cls.from_config(local)
        policy.config = config
        return policy

    @classmethod
    def velocity_from_pretrained(cls, path: str | Path) -> FlowUNetVelocity:
        return cls.from_pretrained(path).velocity_model  # the UNet is the whole policy

    @classmethod
    def write_velocity(cls, base: Path, state: dict[str, Tensor], out: Path) -> None:
        read_policy_config(base, FlowUNetConfig)
        weights = {key.removeprefix("unet."): value.contiguous() for key, value in state.items()}
        if not weights:
            raise CheckpointError("the velocity weights are empty")
        shutil.copytree(base, out, ignore=shutil.ignore_patterns(UNET_WEIGHTS))
        save_file(weights, str(Path(out) / "unet" / UNET_WEIGHTS), metadata={"format": "pt"})

    # ----------------------------------------------------------------------------- inference
    def condition(
        self, lq: Tensor, captions: list[str], sampler: SamplerConfig, generator: torch.Generator
    ) -> FlowUNetCondition:
        return FlowUNetCondition(lq=lq.float())

    def deterministic_condition(self, sampler: SamplerConfig) -> bool:
        return True  # the condition is the degraded image itself

    def encode(self, images: Tensor) -> Tensor:
        return images.float()

    def decode(self, latents: Tensor) -> Tensor:
        return latents.float().clamp(-1, 1)

    def latent_shape(self) -> tuple[int, int, int]:
        return 3, self.config.resolution, self.config.resolution

    # ----------------------------------------------------------------------------- Stage 1
    def stage1_losses(self, stage: str, batch: dict, config: Any, generator: torch.Generator) -> dict[str, Tensor]:
        """Flow matching of the UNet on (degraded, clean) pairs, with condition dropout (CFG)."""
        if stage not in self.stages:
            raise ValueError(f"the flow_unet policy trains only in {list(self.stages)}, not {stage}")
        model = self.velocity_model
        x0, condition = self.encode(batch["hq"]), FlowUNetCondition(lq=batch["lq"].float())
        prepared = drop_conditions(model.prepare(condition), config.condition_dropout, generator)
        eps, t = flow_noise(x0, generator)
        loss = flow_matching_loss(lambda x_t, t_: model.velocity(x_t, t_, prepared), x0, model.endpoint(condition, eps), t)
        return {"loss": loss, "diff_loss": loss.detach()}
