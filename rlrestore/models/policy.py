"""The Pref-Restore policy: AR semantic integrator + SANA DiT conditioned on semantic tokens and z_low.

Data flow (design.md section 2):

    y --SigLIP2+SimVQ--> codes(y) --Qwen3 prompt--> generated codes S --Qwen3 hidden (730)--> diffusion_connector --+
    y --DC-AE encoder (lq_encoder)--> z_low --DiT patch_embed--> vae_connector -----------------------------------+--> DiT
                                                                                    encoder_hidden_states (concat)

A checkpoint is a directory a user can inspect: ``policy_config.json`` plus one subfolder per
network (``vision/``, ``integrator/``, ``transformer/``, ``vae/`` load with transformers/diffusers
directly) and safetensors files for the small rlrestore-own parts.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderDC, SanaTransformer2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from rlrestore.config import PolicyConfig, SamplerConfig
from rlrestore.flow import sample_flow
from rlrestore.models.connectors import Connector
from rlrestore.models.loading import (
    CheckpointError,
    check_arch_keys,
    init_signature_keys,
    load_component,
    require_available,
)
from rlrestore.models.text_tokenizer import Vocabulary, load_text_tokenizer
from rlrestore.models.visual_tokenizer import VisualTokenizer

POLICY_CONFIG = "policy_config.json"
FORMAT_VERSION = 1
TRAINABLE_COMPONENTS = ("integrator", "diffusion_connector", "vae_connector", "transformer", "lq_encoder", "vae")


@dataclass
class Condition:
    """What the DiT is conditioned on, one per degraded input (shared by its K candidates).

    Kept in two parts because the second passes through the DiT's own ``patch_embed``, which
    Stage 2 may train: whoever evaluates a DiT composes the tokens with *that* DiT
    (:func:`encoder_states`), so the learner's v_theta and the rollouts' v_old each see their own.
    """

    semantic: torch.Tensor  # [B, N + 1, caption_channels] diffusion_connector(AR hidden states of <S0> + S)
    z_low: torch.Tensor  # [B, C, h, w] scaled latent of the degraded input from the LQ encoder

    def __len__(self) -> int:
        return self.semantic.shape[0]

    def select(self, index: torch.Tensor) -> Condition:
        """The conditions of the inputs ``index`` (e.g. each candidate's input)."""
        return Condition(self.semantic[index], self.z_low[index])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Condition:
        return Condition(self.semantic.to(device, dtype), self.z_low.to(device, dtype))


@dataclass
class Conditioning:
    """The DiT condition of a batch and, when teacher-forced, the AR logits over the target codes."""

    condition: Condition
    encoder_hidden_states: torch.Tensor  # [B, (N + 1) + h*w, caption_channels], composed with the policy's DiT
    codes: torch.Tensor  # [B, N] semantic codes S (targets or generated)
    logits: torch.Tensor  # [B, N, vocab] next-token logits predicting `codes`


@dataclass
class RestoreOutput:
    """K candidates per input: clean latents x0, decoded images in [-1, 1], and their seeds."""

    latents: torch.Tensor  # [B, K, C, h, w]
    images: torch.Tensor  # [B, K, 3, R, R]
    seeds: torch.Tensor  # [B, K]
    codes: torch.Tensor  # [B, N]
    condition: Condition  # of each input (shared by its K candidates)


def texture_tokens(transformer: SanaTransformer2DModel, vae_connector: nn.Module, z_low: torch.Tensor) -> torch.Tensor:
    """z_low -> the DiT's patch embedding -> vae_connector: [B, h*w, caption_channels]."""
    patches = transformer.patch_embed(z_low.to(transformer.dtype))
    return vae_connector(patches.to(next(vae_connector.parameters()).dtype))


def encoder_states(
    transformer: SanaTransformer2DModel, vae_connector: nn.Module, condition: Condition
) -> torch.Tensor:
    """The DiT's ``encoder_hidden_states``: the semantic tokens, then the texture tokens of z_low
    composed with ``transformer``'s own patch embedding."""
    texture = texture_tokens(transformer, vae_connector, condition.z_low)
    return torch.cat([condition.semantic.to(texture.dtype), texture], dim=1)


def dit_velocity(
    transformer: SanaTransformer2DModel, x_t: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor
) -> torch.Tensor:
    """v(x_t, c, t) of a SANA DiT; t in [0, 1] (1 = noise) is passed as t * 1000 in float32 (a
    bf16 time would round 999 to 1000); x_t and c are cast to the DiT's weight dtype."""
    dtype = transformer.dtype
    timestep = (t.float() * 1000.0).expand(x_t.shape[0])
    return transformer(
        hidden_states=x_t.to(dtype),
        encoder_hidden_states=encoder_hidden_states.to(dtype),
        timestep=timestep,
        return_dict=False,
    )[0]


def _build_vision(arch: dict[str, Any]) -> SiglipVisionModel:
    check_arch_keys("vision", arch, set(SiglipVisionConfig().to_dict()))
    return SiglipVisionModel(SiglipVisionConfig(**arch))


def _build_integrator(arch: dict[str, Any]) -> Qwen3ForCausalLM:
    check_arch_keys("integrator", arch, set(Qwen3Config().to_dict()))
    return Qwen3ForCausalLM(Qwen3Config(**arch))


def _build_transformer(arch: dict[str, Any]) -> SanaTransformer2DModel:
    check_arch_keys("transformer", arch, init_signature_keys(SanaTransformer2DModel))
    return SanaTransformer2DModel(**arch)


def _build_vae(arch: dict[str, Any]) -> AutoencoderDC:
    check_arch_keys("vae", arch, init_signature_keys(AutoencoderDC))
    return AutoencoderDC(**arch)


def build_vae_connector(config: PolicyConfig, transformer: SanaTransformer2DModel) -> Connector:
    """The connector from the DiT's patch tokens of z_low to its caption channels (also built by
    the Stage 2 learners, which load only the DiT and this connector)."""
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    return Connector(inner, transformer.config.caption_channels, gelu="none")


class PrefRestorePolicy(nn.Module):
    """All networks of the policy and the operations the training stages and rollouts compose."""

    def __init__(
        self,
        config: PolicyConfig,
        vocabulary: Vocabulary,
        visual_tokenizer: VisualTokenizer,
        integrator: Qwen3ForCausalLM,
        transformer: SanaTransformer2DModel,
        vae: AutoencoderDC,
    ) -> None:
        super().__init__()
        self.config = config
        self.vocabulary = vocabulary
        self.visual_tokenizer = visual_tokenizer
        self.integrator = integrator
        self.transformer = transformer
        self.vae = vae
        self.lq_encoder = copy.deepcopy(vae.encoder)
        self.diffusion_connector = Connector(
            integrator.config.hidden_size,
            transformer.config.caption_channels,
            gelu="tanh",
            norm_init=config.connector_norm_init,
        )
        self.vae_connector = build_vae_connector(config, transformer)
        self.set_trainable([])

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: PolicyConfig) -> PrefRestorePolicy:
        """Build every network: random-init from `arch`, or weights from `pretrained` (local only)."""
        require_available(
            [
                (f"policy.{name}.pretrained", spec.pretrained, "config.json", spec.subfolder)
                for name, spec in (
                    ("vision", config.vision),
                    ("integrator", config.integrator),
                    ("transformer", config.transformer),
                    ("vae", config.vae),
                )
                if spec.pretrained is not None
            ]
            + ([("policy.text_tokenizer", config.text_tokenizer, "tokenizer_config.json", None)]
               if config.text_tokenizer else [])
        )
        tokenizer = load_text_tokenizer(config.text_tokenizer)
        vocabulary = Vocabulary(tokenizer, config.codebook_size)
        tower = load_component("vision", config.vision, _build_vision, SiglipVisionModel.from_pretrained)
        if tower.config.image_size != config.tokenizer_resolution:
            raise ValueError(
                f"policy.tokenizer_resolution={config.tokenizer_resolution} differs from the vision tower's "
                f"image_size={tower.config.image_size}"
            )
        visual = VisualTokenizer(tower, config.codebook_size, config.codebook_dim, config.vision_feature_layer)
        integrator = load_component(
            "integrator", config.integrator, _build_integrator, Qwen3ForCausalLM.from_pretrained
        )
        if integrator.get_input_embeddings().num_embeddings != vocabulary.size:
            integrator.resize_token_embeddings(vocabulary.size)
        transformer = load_component(
            "transformer", config.transformer, _build_transformer, SanaTransformer2DModel.from_pretrained
        )
        vae = load_component("vae", config.vae, _build_vae, AutoencoderDC.from_pretrained)
        if vae.config.latent_channels != transformer.config.in_channels:
            raise ValueError(
                f"policy.vae latent_channels={vae.config.latent_channels} must equal "
                f"policy.transformer in_channels={transformer.config.in_channels}"
            )
        # float32 whatever the files hold: roles cast inference copies to their compute dtype
        return cls(config, vocabulary, visual, integrator, transformer, vae).float()

    def save_pretrained(self, path: str | Path) -> None:
        """Write the policy as a directory of component subfolders plus ``policy_config.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.visual_tokenizer.tower.save_pretrained(path / "vision")
        self.integrator.save_pretrained(path / "integrator")
        self.vocabulary.tokenizer.save_pretrained(path / "integrator")
        self.transformer.save_pretrained(path / "transformer")
        self.vae.save_pretrained(path / "vae")
        own = {
            **{f"quantizer.{k}": v for k, v in self.visual_tokenizer.pre_quant.state_dict().items()},
            **{f"codebook.{k}": v for k, v in self.visual_tokenizer.quantizer.state_dict().items()},
            **{f"diffusion_connector.{k}": v for k, v in self.diffusion_connector.state_dict().items()},
            **{f"vae_connector.{k}": v for k, v in self.vae_connector.state_dict().items()},
            **{f"lq_encoder.{k}": v for k, v in self.lq_encoder.state_dict().items()},
        }
        save_file({k: v.contiguous() for k, v in own.items()}, str(path / "rlrestore_modules.safetensors"))
        meta = {
            "format_version": FORMAT_VERSION,
            "first_image_id": self.vocabulary.first_image_id,
            "policy": self.config.model_dump(mode="json"),
        }
        (path / POLICY_CONFIG).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> PrefRestorePolicy:
        """Load a directory written by :meth:`save_pretrained` (safetensors only, no pickle)."""
        path = Path(path)
        meta_file = path / POLICY_CONFIG
        if not meta_file.is_file():
            raise CheckpointError(f"{path} is not a policy checkpoint: {POLICY_CONFIG} is missing")
        try:
            meta = json.loads(meta_file.read_text())
            config = PolicyConfig.model_validate(meta["policy"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{meta_file} is unreadable or invalid: {exc}") from None
        local = config.model_copy(deep=True)
        for name in ("vision", "integrator", "transformer", "vae"):
            getattr(local, name).pretrained = str(path / name)
            getattr(local, name).subfolder = None
        local.text_tokenizer = str(path / "integrator")
        policy = cls.from_config(local)
        if policy.vocabulary.first_image_id != meta.get("first_image_id"):
            raise CheckpointError(
                f"{path}: tokenizer gives first image id {policy.vocabulary.first_image_id}, "
                f"checkpoint expects {meta.get('first_image_id')}"
            )
        own_file = path / "rlrestore_modules.safetensors"
        if not own_file.is_file():
            raise CheckpointError(f"{path}: rlrestore_modules.safetensors is missing")
        try:
            tensors = load_file(str(own_file))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{own_file} is corrupt: {exc}") from None
        for prefix, module in (
            ("quantizer.", policy.visual_tokenizer.pre_quant),
            ("codebook.", policy.visual_tokenizer.quantizer),
            ("diffusion_connector.", policy.diffusion_connector),
            ("vae_connector.", policy.vae_connector),
            ("lq_encoder.", policy.lq_encoder),
        ):
            part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                module.load_state_dict(part)
            except RuntimeError as exc:
                raise CheckpointError(f"{own_file}: weights of {prefix.rstrip('.')} do not fit: {exc}") from None
        policy.config = config
        return policy

    # ----------------------------------------------------------------------------- training helpers
    def component(self, name: str) -> nn.Module:
        """A trainable component by its config name."""
        if name not in TRAINABLE_COMPONENTS:
            raise KeyError(f"unknown component {name!r}; choose from {TRAINABLE_COMPONENTS}")
        return getattr(self, name)

    def set_trainable(self, names: list[str]) -> list[nn.Parameter]:
        """Freeze everything but the named components; return their parameters."""
        self.requires_grad_(False)
        params: list[nn.Parameter] = []
        for name in names:
            module = self.component(name)
            module.requires_grad_(True)
            params.extend(module.parameters())
        return params

    @torch.no_grad()
    def adopt_fitted_vae(self, clean_images: torch.Tensor) -> float:
        """After fitting the DC-AE from scratch: copy its encoder into E_theta and set the latent
        scaling factor to 1 / std of the clean faces' latents (unit-variance flow targets, as SANA's
        0.41407 was chosen). Returns the new scaling factor."""
        self.lq_encoder.load_state_dict(self.vae.encoder.state_dict())
        latents = self.vae.encode(clean_images.to(self.device, self.vae.dtype)).latent.float()
        scale = float(1.0 / latents.std().clamp(min=1e-6))
        self.vae.register_to_config(scaling_factor=scale)
        return scale

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def num_semantic_tokens(self) -> int:
        return self.visual_tokenizer.num_tokens

    def to_tokenizer_size(self, images: torch.Tensor) -> torch.Tensor:
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
    def encode_clean(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen DC-AE latent of clean faces: the flow-matching target x0."""
        return self.vae.encode(images.to(self.vae.dtype)).latent * self.scaling_factor

    def encode_lq(self, images: torch.Tensor) -> torch.Tensor:
        """z_low: latent of degraded faces from the (Stage 1.2 trainable) LQ encoder."""
        return self.lq_encoder(images.to(self.vae.dtype)) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> float32 images in [-1, 1]."""
        return self.vae.decode((latents / self.scaling_factor).to(self.vae.dtype)).sample.float().clamp(-1, 1)

    # ----------------------------------------------------------------------------- AR integrator
    def prompt_batch(self, lq_codes: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and attention mask, one prompt per input (captioned or not)."""
        prompts = []
        for codes, caption in zip(lq_codes.tolist(), captions, strict=True):
            template = self.config.caption_prompt.replace("{caption}", caption) if caption else self.config.prompt
            prompts.append(self.vocabulary.prompt_ids(template, codes))
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.vocabulary.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, length - len(prompt):] = torch.tensor(prompt)
            mask[row, length - len(prompt):] = 1
        return ids.to(self.device), mask.to(self.device)

    def semantic_states(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, codes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass over prompt + image tokens.

        Returns the last-layer hidden states of the trigger ``<S0>`` and the N image positions
        ([B, N + 1, H]) and the logits predicting the N codes ([B, N, vocab]).
        """
        n = codes.shape[1]
        ids = torch.cat([prompt_ids, codes + self.vocabulary.first_image_id], dim=1)
        mask = torch.cat([prompt_mask, torch.ones_like(codes)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.integrator(
            input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True, logits_to_keep=n + 1
        )
        hidden = out.hidden_states[-1][:, -(n + 1):]
        return hidden, out.logits[:, :n]

    @torch.no_grad()
    def generate_codes(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampler: SamplerConfig, generator: torch.Generator
    ) -> torch.Tensor:
        """Autoregressively generate N image codes (restricted to the image-token range)."""
        vocab = self.vocabulary
        cache = DynamicCache()
        mask = prompt_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.integrator(
            input_ids=prompt_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
            use_cache=True, logits_to_keep=1,
        )
        codes = []
        for _ in range(self.num_semantic_tokens):
            logits = out.logits[:, -1, vocab.first_image_id: vocab.size].float()
            code = _pick_token(logits, sampler, generator)
            codes.append(code)
            mask = torch.cat([mask, torch.ones_like(code[:, None])], dim=1)
            positions = positions[:, -1:] + 1
            out = self.integrator(
                input_ids=code[:, None] + vocab.first_image_id, attention_mask=mask, position_ids=positions,
                past_key_values=out.past_key_values, use_cache=True,
            )
        return torch.stack(codes, dim=1)

    # ----------------------------------------------------------------------------- conditions
    def texture_tokens(self, lq: torch.Tensor) -> torch.Tensor:
        """z_low of degraded faces -> DiT patch embedding -> vae_connector: [B, h*w, caption_channels]."""
        return texture_tokens(self.transformer, self.vae_connector, self.encode_lq(lq))

    def encoder_states(self, condition: Condition) -> torch.Tensor:
        """The DiT input ``encoder_hidden_states`` of ``condition`` with this policy's DiT."""
        return encoder_states(self.transformer, self.vae_connector, condition)

    def condition(
        self,
        lq: torch.Tensor,
        captions: list[str],
        target_codes: torch.Tensor | None = None,
        sampler: SamplerConfig | None = None,
        generator: torch.Generator | None = None,
    ) -> Conditioning:
        """Condition c = (S, z_low) of degraded faces ``lq`` ([-1, 1], generation size).

        With ``target_codes`` (training) the AR pass is teacher-forced; otherwise the integrator
        generates S first (inference), then runs once more over the full sequence.
        """
        with torch.no_grad():
            lq_codes = self.visual_tokenizer(self.to_tokenizer_size(lq))
        prompt_ids, prompt_mask = self.prompt_batch(lq_codes, captions)
        if target_codes is None:
            if sampler is None or generator is None:
                raise ValueError("condition() without target codes needs a sampler config and a generator")
            target_codes = self.generate_codes(prompt_ids, prompt_mask, sampler, generator)
        # A frozen integrator (Stage 1.2, rollouts) keeps no activations for backward.
        integrator_trains = any(p.requires_grad for p in self.integrator.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and integrator_trains):
            hidden, logits = self.semantic_states(prompt_ids, prompt_mask, target_codes)
        semantic = self.diffusion_connector(hidden.to(self.diffusion_connector[0].weight.dtype))
        condition = Condition(semantic=semantic, z_low=self.encode_lq(lq))
        return Conditioning(condition, self.encoder_states(condition), codes=target_codes, logits=logits)

    @torch.no_grad()
    def target_codes(self, hq: torch.Tensor) -> torch.Tensor:
        """Semantic codes of clean faces (Stage 1.1 CE targets)."""
        return self.visual_tokenizer(self.to_tokenizer_size(hq))

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """v_theta(x_t, c, t) (see :func:`dit_velocity`)."""
        return dit_velocity(self.transformer, x_t, t, encoder_hidden_states)

    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the DiT latent at the generation resolution."""
        side = self.config.resolution // self.vae.spatial_compression_ratio
        return self.vae.config.latent_channels, side, side

    # ----------------------------------------------------------------------------- restoration
    @torch.no_grad()
    def restore(
        self,
        lq: torch.Tensor,
        captions: list[str],
        seeds: torch.Tensor,
        sampler: SamplerConfig,
    ) -> RestoreOutput:
        """K candidate restorations per degraded face in one batched sampler call.

        ``seeds`` is [B, K]: candidate (b, k) starts from noise seeded with seeds[b, k] (and its
        SDE noise, if any, too), so any candidate can be reproduced alone. AR sampling (when
        ``sampler.ar_sampling == "sample"``) draws the batch's codes with seed seeds[0, 0].
        """
        batch, k = seeds.shape
        ar_generator = torch.Generator(device="cpu").manual_seed(int(seeds[0, 0]))
        cond = self.condition(lq, captions, sampler=sampler, generator=ar_generator)
        states = cond.encoder_hidden_states.repeat_interleave(k, dim=0)
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds.flatten().tolist()]
        shape = self.latent_shape()
        # the sampler state stays float32 whatever the weights' dtype; only the DiT input is cast
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device, torch.float32)
        latents = sample_flow(
            lambda x, t, c: self.velocity(x, t, c).float(),
            noise,
            states,
            steps=sampler.steps,
            shift=self.config.flow_shift,
            guidance_scale=sampler.guidance_scale,
            sde_eta=sampler.sde_eta,
            generators=generators,
        )
        images = self.decode(latents)
        return RestoreOutput(
            latents=latents.view(batch, k, *shape),
            images=images.view(batch, k, *images.shape[1:]),
            seeds=seeds,
            codes=cond.codes,
            condition=cond.condition,
        )


def _pick_token(logits: torch.Tensor, sampler: SamplerConfig, generator: torch.Generator) -> torch.Tensor:
    """Greedy or top-k / top-p sampling over image-token logits [B, V]."""
    if sampler.ar_sampling == "greedy":
        return logits.argmax(-1)
    logits = logits / sampler.ar_temperature
    top_k = min(sampler.ar_top_k, logits.shape[-1])
    values, indices = logits.topk(top_k, dim=-1)
    probs = values.softmax(-1)
    cumulative = probs.cumsum(-1)
    probs = probs.masked_fill(cumulative - probs > sampler.ar_top_p, 0.0)
    choice = torch.multinomial(probs.cpu() / probs.sum(-1, keepdim=True).cpu(), 1, generator=generator)
    return indices.gather(-1, choice.to(indices.device)).squeeze(-1)
