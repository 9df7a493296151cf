"""Building Pref-Restore's networks from the config: random init from ``arch`` or local weights.

Every component is the real class (transformers SigLIP and Qwen3, diffusers SANA and DC-AE) built
through one code path (``rlrestore.models.loading``) whether the weights are tiny and random or
read from a local directory / the Hugging Face cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffusers import AutoencoderDC, SanaTransformer2DModel
from transformers import Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from rlrestore.config import PolicyConfig
from rlrestore.models.connectors import Connector
from rlrestore.models.loading import check_arch_keys, init_signature_keys, load_component, require_available
from rlrestore.models.text_tokenizer import Vocabulary, load_text_tokenizer
from rlrestore.models.visual_tokenizer import VisualTokenizer


def build_vision(arch: dict[str, Any]) -> SiglipVisionModel:
    check_arch_keys("vision", arch, set(SiglipVisionConfig().to_dict()))
    return SiglipVisionModel(SiglipVisionConfig(**arch))


def build_integrator(arch: dict[str, Any]) -> Qwen3ForCausalLM:
    check_arch_keys("integrator", arch, set(Qwen3Config().to_dict()))
    return Qwen3ForCausalLM(Qwen3Config(**arch))


def build_transformer(arch: dict[str, Any]) -> SanaTransformer2DModel:
    check_arch_keys("transformer", arch, init_signature_keys(SanaTransformer2DModel))
    return SanaTransformer2DModel(**arch)


def build_vae(arch: dict[str, Any]) -> AutoencoderDC:
    check_arch_keys("vae", arch, init_signature_keys(AutoencoderDC))
    return AutoencoderDC(**arch)


def build_vae_connector(config: PolicyConfig, transformer: SanaTransformer2DModel) -> Connector:
    """The connector from the DiT's patch tokens of z_low to its caption channels (also built by
    the Stage 2 learners, which load only the velocity model)."""
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    channels = transformer.config.caption_channels
    return Connector(inner, channels, gelu=config.vae_connector_gelu, eps=config.connector_norm_eps)


def build_diffusion_connector(config: PolicyConfig, hidden: int, transformer: SanaTransformer2DModel) -> Connector:
    """The connector from the integrator's hidden states to the DiT's caption channels (tanh GELU,
    norm weight starting at ``connector_norm_init``)."""
    channels = transformer.config.caption_channels
    return Connector(hidden, channels, gelu="tanh", norm_init=config.connector_norm_init, eps=config.connector_norm_eps)


@dataclass
class PrefRestoreNetworks:
    """The pretrained (or arch-built) networks of a policy, before the policy adds its own parts."""

    vocabulary: Vocabulary
    visual_tokenizer: VisualTokenizer
    integrator: Qwen3ForCausalLM
    transformer: SanaTransformer2DModel
    vae: AutoencoderDC


def _require_weights(config: PolicyConfig) -> None:
    """Fail early, listing every missing weight source of the config at once."""
    sources = [
        (f"policy.{name}.pretrained", spec.pretrained, "config.json", spec.subfolder)
        for name, spec in (
            ("vision", config.vision),
            ("integrator", config.integrator),
            ("transformer", config.transformer),
            ("vae", config.vae),
        )
        if spec.pretrained is not None
    ]
    if config.text_tokenizer:
        sources.append(("policy.text_tokenizer", config.text_tokenizer, "tokenizer_config.json", None))
    require_available(sources)


def build_networks(config: PolicyConfig) -> PrefRestoreNetworks:
    """Every network of the config: random-init from ``arch``, or weights from ``pretrained`` (local only)."""
    _require_weights(config)
    tokenizer = load_text_tokenizer(config.text_tokenizer, config.vocabulary, config.prompt_format)
    vocabulary = Vocabulary(tokenizer, config.codebook_size, config.vocabulary)
    tower = load_component("vision", config.vision, build_vision, SiglipVisionModel.from_pretrained)
    if tower.config.image_size != config.tokenizer_resolution:
        raise ValueError(
            f"policy.tokenizer_resolution={config.tokenizer_resolution} differs from the vision tower's "
            f"image_size={tower.config.image_size}"
        )
    visual = VisualTokenizer(
        tower,
        config.codebook_size,
        config.codebook_dim,
        config.vision_feature_layer,
        codebook_bias=config.codebook_bias,
        l2_normalized=config.codebook_l2_normalized,
    )
    integrator = load_component("integrator", config.integrator, build_integrator, Qwen3ForCausalLM.from_pretrained)
    if integrator.get_input_embeddings().num_embeddings != vocabulary.size:
        integrator.resize_token_embeddings(vocabulary.size)
    transformer = load_component(
        "transformer", config.transformer, build_transformer, SanaTransformer2DModel.from_pretrained
    )
    vae = load_component("vae", config.vae, build_vae, AutoencoderDC.from_pretrained)
    if vae.config.latent_channels != transformer.config.in_channels:
        raise ValueError(
            f"policy.vae latent_channels={vae.config.latent_channels} must equal "
            f"policy.transformer in_channels={transformer.config.in_channels}"
        )
    return PrefRestoreNetworks(vocabulary, visual, integrator, transformer, vae)
