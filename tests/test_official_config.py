"""configs/prefrestore_official.yaml: it validates, and every network of the released model builds from
its `arch` on the meta device with the expected parameter counts (diffusers 0.42.1, transformers 5.23.0)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import AutoencoderDC, SanaTransformer2DModel
from transformers import Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from rlrestore.config import RunConfig, load_config
from rlrestore.models.connectors import Connector
from rlrestore.models.visual_tokenizer import VisualTokenizer
from tests.test_full_size_components import TOLERANCE_MILLIONS, _architecture_keys

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "prefrestore_official.yaml"

# Millions of parameters, counted on the meta device (tied embeddings once).
EXPECTED_MILLIONS = {
    "vision": 428.2,  # SigLIP2 so400m-patch14-384 vision tower with its pooling head (TA-Tok's encoder)
    "integrator": 1854.3,  # Qwen3-1.7B layers over 217,210 embedding rows, LM head tied
    "transformer": 1604.6,  # SANA-1.5 1.6B
    "vae": 312.3,  # DC-AE f32c32
}
BUILDERS = {
    "vision": lambda arch: SiglipVisionModel(SiglipVisionConfig(**arch)),
    "integrator": lambda arch: Qwen3ForCausalLM(Qwen3Config(**arch)),
    "transformer": lambda arch: SanaTransformer2DModel(**arch),
    "vae": lambda arch: AutoencoderDC(**arch),
}


@pytest.fixture(scope="module")
def config() -> RunConfig:
    return load_config(CONFIG)


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_config_validates_with_the_released_conventions(config: RunConfig) -> None:
    policy, stage2 = config.policy, config.stage2
    assert (policy.vocabulary, policy.prompt_format, policy.flow_shift) == ("blip3o", "chat", 1.0)
    assert policy.codebook_bias and policy.codebook_l2_normalized and policy.connector_norm_eps == 1e-5
    assert policy.checkpoint and config.precision == "bf16-mixed"
    assert (config.sampler.method, config.sampler.steps, config.sampler.guidance_scale) == ("euler", 30, 2.0)
    assert (stage2.rollout.sampler_method, stage2.rollout.sampler_steps, stage2.candidates, stage2.inputs_per_step) == (
        "dpm2",
        30,
        24,
        48,
    )
    assert (stage2.learner.finetune, stage2.learner.lora_rank, stage2.learner.lora_alpha, stage2.learner.lora_init) == (
        "lora",
        32,
        64.0,
        "gaussian",
    )
    assert (stage2.nft.loss_form, stage2.nft.beta, stage2.nft.clip, stage2.nft.base_penalty) == (
        "adaptive_x0",
        0.1,
        5.0,
        1e-4,
    )
    weights = {spec.name: spec.weight for spec in stage2.rewards}
    assert weights == {"pickscore": 1, "hpsv2": 1, "clipscore": 1, "lmd": 0.5, "identity": 0.5, "lpips": 0.5}
    assert (
        stage2.resources.learner.num_gpus == 1
        and stage2.resources.rollout.num_gpus > 0
        and config.ray.train_workers.num_gpus == 1
    )


def test_rewards_resolve(config: RunConfig) -> None:
    from rewards import reward_class

    for spec in config.stage2.rewards:
        assert reward_class(spec.name) is not None


@pytest.mark.parametrize("name", sorted(EXPECTED_MILLIONS))
def test_component_parameter_counts(config: RunConfig, name: str) -> None:
    arch = getattr(config.policy, name).arch
    assert set(arch) == _architecture_keys(name)
    with torch.device("meta"):
        model = BUILDERS[name](arch)
    assert abs(_params(model) / 1e6 - EXPECTED_MILLIONS[name]) <= TOLERANCE_MILLIONS


def test_rlrestore_modules_on_meta(config: RunConfig) -> None:
    """TA-Tok's projection + codebook map and both connectors at full size."""
    policy = config.policy
    with torch.device("meta"):
        tower = BUILDERS["vision"](policy.vision.arch)
        visual = VisualTokenizer(
            tower,
            policy.codebook_size,
            policy.codebook_dim,
            policy.vision_feature_layer,
            codebook_bias=True,
            l2_normalized=True,
        )
        semantic = Connector(2048, 2304, gelu="tanh", eps=policy.connector_norm_eps)
        texture = Connector(70 * 32, 2304, gelu=policy.vae_connector_gelu, eps=policy.connector_norm_eps)
    hidden, dim = 1152, policy.codebook_dim
    assert _params(visual.pre_quant) == hidden * hidden + hidden + hidden * dim + dim
    assert _params(visual.quantizer) == dim * dim + dim  # the codebook basis is a buffer
    assert visual.quantizer.basis.shape == (65536, dim)
    assert _params(semantic) == 2048 * 2304 + 2304 + 2304 * 2304 + 2304 + 2304
    assert _params(texture) == 2240 * 2304 + 2304 + 2304 * 2304 + 2304 + 2304
    assert texture[1].approximate == "tanh" and texture[3].eps == 1e-5
