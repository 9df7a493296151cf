"""The policy sections (one per restoration model, told apart by ``type``) and the sampler."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from rlrestore.config.base import ComponentSpec, _Section


class PolicyBaseConfig(_Section):
    """What every restoration policy's section has; ``type`` names the policy (``rlrestore.policies``).

    ``runtime_keys`` name the keys that say how the policy runs, not what it is (e.g. Pref-Restore's
    ``ar_backend``): a policy directory does not keep them (they are written at their defaults), and a
    run applies its own config's values to the policy it loads (``rlrestore.policies.load_policy``).
    """

    runtime_keys: ClassVar[tuple[str, ...]] = ()
    type: str
    resolution: int = Field(512, gt=0, description="Generation resolution in pixels (square).")
    flow_shift: float = Field(3.0, gt=0, description="Timestep shift of the flow sampler (SANA uses 3.0).")
    checkpoint: str | None = Field(
        None,
        description="A policy directory to start from instead of building the networks from the component "
        "specs: one written by `rlrestore convert` (e.g. the released Pref-Restore model) or the `policy/` of "
        "any rlrestore checkpoint. Stage 1.1 starts from it (unless the run has its own checkpoints), and "
        "Stage 1.2 / Stage 2 start from it when the run directory holds no earlier stage.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="Deprecated, kept so older configs and checkpoints load: weights are always held in "
        "float32 where they train and in the compute dtype where they only infer; set the top-level "
        "`precision` instead (bfloat16 here means precision=bf16-mixed).",
    )

    def runtime_options(self) -> dict[str, Any]:
        """``type`` and the runtime keys of this section, as JSON (what a run hands a loaded policy)."""
        dumped = self.model_dump(mode="json", include={"type", *self.runtime_keys})
        return {"type": self.type, **dumped}

    def without_runtime_options(self) -> PolicyBaseConfig:
        """A copy with every runtime key at its default (what a policy directory stores)."""
        defaults = {key: type(self).model_fields[key].get_default(call_default_factory=True) for key in self.runtime_keys}
        return self.model_copy(update=defaults, deep=True)


class VLLMOptions(_Section):
    """How the integrator runs under vLLM (``policy.ar_backend: vllm``)."""

    fallback: Literal["error", "hf"] = Field(
        "error",
        description="Where vLLM cannot run (not installed, no CUDA device): 'error' stops with a message naming "
        "policy.ar_backend and what to install; 'hf' decodes with the transformers loop instead, with a warning "
        "(the codes then come from other kernels and, when sampled, from another random stream).",
    )
    gpu_memory_utilization: float = Field(
        0.3,
        gt=0,
        le=1,
        description="Fraction of the GPU's memory vLLM may take (weights + KV cache); the rest is left to the "
        "policy's other networks on the same GPU (vLLM's own default, 0.9, would leave the DiT nothing).",
    )
    max_model_len: int | None = Field(
        None,
        gt=0,
        description="Longest prompt + generated codes vLLM plans its KV cache for; None: the integrator's "
        "max_position_embeddings.",
    )
    enforce_eager: bool = Field(
        False, description="Run vLLM without CUDA graphs (slower decode, faster start, less memory)."
    )
    export_dir: str | None = Field(
        None,
        description="Where the integrator is written as a Hugging Face folder for vLLM to load, one subfolder "
        "per weights fingerprint (reused by every actor on the node); None: <tmp>/rlrestore-vllm.",
    )


class PolicyConfig(PolicyBaseConfig):
    """The Pref-Restore policy (``type: prefrestore``, the default): visual tokenizer, AR integrator,
    connectors, SANA DiT, DC-AE."""

    runtime_keys: ClassVar[tuple[str, ...]] = ("ar_backend", "vllm")
    type: Literal["prefrestore"] = Field("prefrestore", description="The policy: Pref-Restore.")
    ar_backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="What generates the semantic codes S. 'hf': the integrator's own KV-cached transformers loop. "
        "'vllm': vLLM (the `vllm` extra, CUDA only) from token-id prompts, restricted to the image tokens, "
        "exactly N codes, greedy or top-k/top-p as sampler.ar_* says, a seed per input; the hidden states then "
        "come from the same teacher-forced pass as with 'hf'. vLLM loads the integrator written once as a "
        "Hugging Face folder (policy.vllm.export_dir), so it needs a frozen integrator (Stage 2 rollouts, "
        "Stage 1.2 generated codes); a change of its weights after that is refused. A run key: Stage 1 workers "
        "and Stage 2 rollout actors apply the run config's value to the policy they load; policy directories do "
        "not keep it, so `restore` and `eval` decode with 'hf'.",
    )
    vllm: VLLMOptions = Field(
        default_factory=VLLMOptions, description="vLLM settings of policy.ar_backend=vllm."
    )
    tokenizer_resolution: int = Field(384, gt=0, description="Input size of the SigLIP2 tower.")
    vision: ComponentSpec = Field(
        default_factory=ComponentSpec, description="SigLIP2 vision tower (transformers SiglipVisionModel)."
    )
    vision_feature_layer: int = Field(
        -2, description="Hidden layer of the vision tower fed to the quantiser."
    )
    codebook_size: int = Field(
        65536, gt=1, description="Number of visual codes V (image tokens <I0>..<I{V-1}>)."
    )
    codebook_dim: int = Field(64, gt=0, description="Dimension of the vector-quantised code space.")
    integrator: ComponentSpec = Field(
        default_factory=ComponentSpec, description="Qwen3 causal LM (transformers Qwen3ForCausalLM)."
    )
    text_tokenizer: str | None = Field(
        None,
        description="Directory or HF id of the integrator's text tokenizer; None builds a byte-level "
        "tokenizer (for tiny random-init models).",
    )
    transformer: ComponentSpec = Field(
        default_factory=ComponentSpec, description="SANA DiT (diffusers SanaTransformer2DModel)."
    )
    vae: ComponentSpec = Field(default_factory=ComponentSpec, description="DC-AE (diffusers AutoencoderDC).")
    prompt: str = Field(
        "<image>\nPlease reconstruct the given image.",
        description="AR prompt when the sample has no caption.",
    )
    caption_prompt: str = Field(
        "<image>\nPlease reconstruct the given image based on the image content: {caption}",
        description="AR prompt when the sample has a caption; `{caption}` is replaced by it.",
    )
    connector_norm_init: float = Field(
        5.5**0.5, gt=0, description="Initial RMSNorm weight of the diffusion connector (sqrt(5.5))."
    )
    vocabulary: Literal["rlrestore", "blip3o"] = Field(
        "rlrestore",
        description="Layout of the integrator's vocabulary. 'rlrestore': the text tokenizer's tokens, then "
        "<image>, <im_start>, <im_end>, <S0>..<S2> (added where missing), then the V image tokens. 'blip3o' "
        "(BLIP3o-NEXT and the released Pref-Restore model): the text tokens, then <im_start>, <im_end>, "
        "<S0>..<S2> (five consecutive ids), then <I0>..<I{V-1}>; <image> has no embedding row.",
    )
    prompt_format: Literal["plain", "chat"] = Field(
        "plain",
        description="'plain': text before <image> | <im_start><S0> LQ codes <im_end> | text after | "
        "<im_start><S0>. 'chat' (the released model): the Qwen chat layout '<|im_start|>system\\n"
        "{system_prompt}<|im_end|>\\n<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n"
        "<im_start><S0>' with the LQ codes in place of <image>, bare (not wrapped).",
    )
    system_prompt: str = Field(
        "You are a helpful assistant.", description="System message of prompt_format=chat."
    )
    codebook_bias: bool = Field(
        False, description="The SimVQ codebook projection has a bias (TA-Tok's embedding_proj does)."
    )
    codebook_l2_normalized: bool = Field(
        False,
        description="Nearest-code lookup on l2-normalised features and codes (cosine), as TA-Tok does when "
        "its file says l2_normalized.",
    )
    vae_connector_gelu: Literal["none", "tanh"] = Field(
        "none",
        description="GELU of the vae connector: exact ('none') or the tanh approximation (released model).",
    )
    connector_norm_eps: float = Field(
        1e-6, gt=0, description="Epsilon of both connectors' RMSNorm (1e-5 in the released model)."
    )
    z_low_injection: Literal["cross_attention", "aligned"] = Field(
        "cross_attention",
        description="How z_low reaches the DiT. 'cross_attention' (the paper, the released model): its texture "
        "tokens vae_connector(patch_embed(z_low)) only join the cross-attention tokens. 'aligned' (an rlrestore "
        "option): they also pass a zero-initialised Linear(caption_channels -> DiT inner dim) (`z_low_projection`, "
        "trained with the vae_connector component; Stage 2 keeps it frozen) and are added position by position to "
        "the DiT's patch tokens, which the texture tokens are aligned with.",
    )
    flow_source: Literal["noise", "z_low"] = Field(
        "noise",
        description="Where the flow path ends (t = 1) and sampling starts. 'noise' (the paper, the released "
        "model): pure noise eps. 'z_low' (an rlrestore option): the LQ encoder's latent of the degraded face "
        "plus noise, z_low + source_noise * eps, as a posterior-mean rectified flow starts from an estimate of "
        "the clean image; the DiT then moves an aligned estimate towards the clean latent instead of drawing "
        "the face from noise.",
    )
    source_noise: float = Field(
        1.0,
        gt=0,
        description="With flow_source=z_low: the noise scale of the path's far end z_low + source_noise * eps "
        "(the K candidates of an input differ by it).",
    )

    @field_validator("caption_prompt")
    @classmethod
    def _caption_slot(cls, value: str) -> str:
        if "{caption}" not in value:
            raise ValueError("must contain the placeholder '{caption}'")
        return value


class FlowUNetConfig(PolicyBaseConfig):
    """A small conditional UNet flow in pixel space (``type: flow_unet``), written only against the
    policy interface: the path runs from the clean face (t = 0) to the degraded one plus noise,
    ``y + source_noise * eps`` (t = 1, a posterior-mean-flow-style source), and a diffusers
    UNet2DModel sees x_t next to y. Stage 1 trains it in ``stage1_2`` (trainable: [unet])."""

    type: Literal["flow_unet"] = Field("flow_unet", description="The policy: the conditional UNet flow.")
    resolution: int = Field(32, gt=0, description="Generation resolution in pixels (square).")
    flow_shift: float = Field(1.0, gt=0, description="Timestep shift of the flow sampler.")
    source_noise: float = Field(
        1.0, gt=0, description="Noise scale of the path's far end y + source_noise * eps (candidates differ by it)."
    )
    unet: ComponentSpec = Field(
        default_factory=ComponentSpec,
        description="diffusers UNet2DModel; in_channels is 6 (x_t and the degraded image), out_channels 3.",
    )


def _policy_type(data: Any) -> str:
    return data.get("type", "prefrestore") if isinstance(data, dict) else getattr(data, "type", "prefrestore")


# Every policy section, told apart by `type` (a section without one is Pref-Restore's, as before).
AnyPolicyConfig = Annotated[
    Annotated[PolicyConfig, Tag("prefrestore")] | Annotated[FlowUNetConfig, Tag("flow_unet")],
    Discriminator(_policy_type),
]


class SamplerConfig(_Section):
    """Flow-matching sampler (integrates from t=1, noise, to t=0) and AR token sampling."""

    steps: int = Field(
        20, ge=1, le=1000, description="Number of sampler steps (network evaluations per branch)."
    )
    method: Literal["euler", "dpm2"] = Field(
        "euler",
        description="'euler': Euler steps (with optional SDE noise). 'dpm2': deterministic 2nd-order multistep "
        "DPM-Solver++ in flow form (first-order first and last step), as diffusers' DPMSolverMultistepScheduler "
        "computes it; the rollout sampler of the released model's Stage 2.",
    )
    guidance_scale: float = Field(1.0, ge=0, description="Classifier-free guidance scale; 1.0 turns CFG off.")
    sde_eta: float = Field(
        0.0, ge=0, description="Noise level of the SDE sampler; 0 is the deterministic ODE."
    )
    ar_sampling: Literal["greedy", "sample"] = Field(
        "greedy", description="How the AR integrator picks tokens."
    )
    ar_top_k: int = Field(1200, ge=1, description="Top-k of AR sampling (ar_sampling=sample).")
    ar_top_p: float = Field(0.95, gt=0, le=1, description="Top-p of AR sampling (ar_sampling=sample).")
    ar_temperature: float = Field(1.0, gt=0, description="Temperature of AR sampling.")

    @model_validator(mode="after")
    def _deterministic_dpm2(self) -> SamplerConfig:
        if self.method == "dpm2" and self.sde_eta > 0:
            raise ValueError(f"method=dpm2 is a deterministic ODE solver; set sde_eta=0 (got {self.sde_eta})")
        return self
