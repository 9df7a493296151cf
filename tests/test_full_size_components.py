"""The full-size networks of configs/prefrestore.yaml, built from their `arch` on the meta device.

No weights are downloaded or allocated: each component is built with the real diffusers /
transformers class and its parameter count is compared with the published model's.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Read by huggingface_hub when it is imported, so set before the imports below.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import AutoencoderDC, SanaTransformer2DModel
from transformers import (
    PreTrainedConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from rlrestore.config import RunConfig, load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "prefrestore.yaml"

# Millions of parameters of the public models, each counted on the meta device with
# diffusers 0.42.1 / transformers 5.23.0 (tied embeddings counted once).
EXPECTED_MILLIONS = {
    "vision": 428.2,  # google/siglip2-so400m-patch14-384, vision tower with its pooling head
    "integrator": 596.0,  # Qwen/Qwen3-0.6B
    "transformer": 1604.6,  # Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers
    "vae": 312.3,  # DC-AE f32c32 (SANA)
}
TOLERANCE_MILLIONS = 0.1

BUILDERS: dict[str, Callable[[dict[str, Any]], torch.nn.Module]] = {
    "vision": lambda arch: SiglipVisionModel(SiglipVisionConfig(**arch)),
    "integrator": lambda arch: Qwen3ForCausalLM(Qwen3Config(**arch)),
    "transformer": lambda arch: SanaTransformer2DModel(**arch),
    "vae": lambda arch: AutoencoderDC(**arch),
}


def _architecture_keys(name: str) -> set[str]:
    """Every keyword of the component's config class that describes the network.

    diffusers models take their config as __init__ arguments; transformers configs are dataclasses
    whose fields beyond PreTrainedConfig's (bookkeeping such as dtype, id2label) are the model's.
    transformers keeps an unknown key silently, so a misspelt one is only caught by this list.
    """
    diffusers_classes = {"transformer": SanaTransformer2DModel, "vae": AutoencoderDC}
    if name in diffusers_classes:
        return set(inspect.signature(diffusers_classes[name].__init__).parameters) - {"self"}
    config_cls = {"vision": SiglipVisionConfig, "integrator": Qwen3Config}[name]
    common = {field.name for field in dataclasses.fields(PreTrainedConfig)}
    return {field.name for field in dataclasses.fields(config_cls)} - common


@pytest.fixture(scope="module")
def config() -> RunConfig:
    return load_config(CONFIG)


def _build_on_meta(config: RunConfig, name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return BUILDERS[name](getattr(config.policy, name).arch)


def _millions(model: torch.nn.Module) -> float:
    # Module.parameters() yields a tensor shared by several modules (tied weights) once.
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize("name", sorted(EXPECTED_MILLIONS))
def test_parameter_count_matches_published_model(config: RunConfig, name: str) -> None:
    model = _build_on_meta(config, name)
    assert all(p.device.type == "meta" for p in model.parameters())
    measured = _millions(model)
    assert abs(measured - EXPECTED_MILLIONS[name]) <= TOLERANCE_MILLIONS, (
        f"{name}: {measured:.3f} M parameters, expected {EXPECTED_MILLIONS[name]} M"
    )


@pytest.mark.parametrize("name", sorted(EXPECTED_MILLIONS))
def test_arch_lists_exactly_the_config_class_keys(config: RunConfig, name: str) -> None:
    arch_keys, expected = set(getattr(config.policy, name).arch), _architecture_keys(name)
    assert arch_keys == expected, (
        f"{name}: unknown {sorted(arch_keys - expected)}, missing {sorted(expected - arch_keys)}"
    )


def test_integrator_lm_head_is_tied(config: RunConfig) -> None:
    model = _build_on_meta(config, "integrator")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_component_shapes_agree(config: RunConfig) -> None:
    policy = config.policy
    vae, dit = policy.vae.arch, policy.transformer.arch
    downsampling = 2 ** (len(vae["encoder_block_out_channels"]) - 1)
    assert downsampling == 32
    assert dit["sample_size"] * dit["patch_size"] == policy.resolution // downsampling
    assert dit["in_channels"] == dit["out_channels"] == vae["latent_channels"]
    assert policy.vision.arch["image_size"] == policy.tokenizer_resolution
    assert config.data.image_size == policy.resolution


def test_sana_forward_shapes_at_512px(config: RunConfig) -> None:
    """A 512-px latent (32 channels, 512 / 32 = 16 per side) and 986 condition tokens of width 2304."""
    model = _build_on_meta(config, "transformer")
    with torch.device("meta"), torch.no_grad():
        latents = torch.empty(1, 32, 16, 16)
        conditions = torch.empty(1, 986, 2304)
        out = model(latents, conditions, torch.empty(1), return_dict=False)[0]
    assert out.shape == latents.shape
    assert out.device.type == "meta"
