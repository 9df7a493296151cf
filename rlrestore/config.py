"""The one typed configuration schema behind every rlrestore command.

A run is described by a YAML file plus ``key=value`` overrides (dotted keys, YAML values)::

    rlrestore train stage1 configs/tiny.yaml stage1_1.steps=50 ray.train_workers.num_actors=2

Every field has a type, a default and a description; unknown keys and bad values are rejected
with a message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ComponentSpec(_Section):
    """One network of the policy: where its weights come from and its architecture."""

    pretrained: str | None = Field(
        None,
        description="Local directory or Hugging Face model id (read from the local HF cache only, "
        "never downloaded) holding this component's weights. None builds it from `arch` with "
        "random initialisation.",
    )
    subfolder: str | None = Field(None, description="Subfolder of `pretrained` holding the component.")
    arch: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of the component's config class (diffusers/transformers); "
        "used when `pretrained` is None and to build the model on the meta device.",
    )


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


Range = tuple[float, float]


class DegradationConfig(_Section):
    """Eq. 16: y = {[(x * k_sigma) downsample_r + n_delta]_JPEG_q} upsample_r, sampled per image."""

    blur_sigma: Range = Field((1.0, 15.0), description="Gaussian blur sigma range (pixels at 512 px).")
    downsample: Range = Field((1.0, 30.0), description="Downsampling factor range r.")
    noise: Range = Field((0.0, 20.0), description="Gaussian noise std range delta (0-255 scale).")
    jpeg_quality: Range = Field((40.0, 100.0), description="JPEG quality range q.")
    reference_size: int = Field(
        512,
        gt=0,
        description="Image size the ranges refer to: at size s, sigma scales by s / reference_size and (with "
        "scale_downsample) r by the same, r_eff = max(1, r * s / reference_size); delta and q stay as drawn.",
    )
    scale_downsample: bool = Field(
        True,
        description="Scale r with the image size as above, so the downsampled side keeps the reference_size / r "
        "pixels it has at the reference (a 64 px face keeps what a 512 px one keeps); false uses r as is at "
        "every size (only sigma scales: r = 30 leaves a 64 px face 2 px wide).",
    )

    @field_validator("blur_sigma", "downsample", "noise", "jpeg_quality")
    @classmethod
    def _ordered(cls, value: Range) -> Range:
        low, high = value
        if low > high:
            raise ValueError(f"range low {low} is above high {high}")
        if low < 0:
            raise ValueError(f"range must be non-negative, got low {low}")
        return value

    @model_validator(mode="after")
    def _limits(self) -> DegradationConfig:
        if self.downsample[0] < 1:
            raise ValueError(f"downsample factors must be >= 1, got {self.downsample}")
        if not (1 <= self.jpeg_quality[0] and self.jpeg_quality[1] <= 100):
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")
        return self


class DataConfig(_Section):
    """Where training faces come from and how they are stored."""

    shards: str | None = Field(
        None,
        description="Directory of Parquet shards from `rlrestore data build`; None builds them from "
        "the embedded face pack into <run_dir>/data.",
    )
    image_size: int = Field(512, gt=0, description="Side of the stored square face images in pixels.")
    shard_size: int = Field(256, gt=0, description="Images per Parquet shard.")
    holdout: int = Field(4, ge=0, description="Faces held back from training (for restoration reports).")
    seed: int = Field(0, description="Base seed of the per-sample degradation.")
    fixed_degradation: bool = Field(
        False,
        description="One degradation per sample for the whole run (the paired-data setting) instead of a new "
        "draw every epoch; lets Stage 2 rollout actors cache each input's condition across epochs.",
    )


class OptimConfig(_Section):
    """AdamW with warm-up and a cosine or constant schedule (Table I)."""

    lr: float = Field(1e-5, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = Field(0.01, ge=0, lt=1, description="Fraction of steps spent in linear warm-up.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clipping threshold.")


class ActorGroupConfig(_Section):
    """The one resource vocabulary of every Ray role (Stage 1 workers, Stage 2 actors, eval actors):
    how many actors run, and what each reserves."""

    num_actors: int = Field(1, ge=1, description="Number of actors (Ray Train workers for Stage 1) of this role.")
    num_cpus: float = Field(0.5, gt=0, description="CPUs reserved per actor (fractions allowed).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per actor (fractions allowed).")

    def bundle(self) -> dict[str, float]:
        """What one actor reserves, as a Ray resource bundle (``GPU`` only when it reserves some)."""
        return {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus else {})}


class EvalActorsConfig(ActorGroupConfig):
    """Eval actors: as every role, but 0 actors restores and scores in this process, without Ray."""

    num_actors: int = Field(
        0, ge=0, description="Ray actors restoring and scoring chunks in parallel; 0 runs in-process without Ray."
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per eval actor (fractions allowed).")


StageName = Literal["autoencoder", "stage1.1", "stage1.2"]
# A stage's trainable components, checked against the policy's own names when it is built.
Component = str


class Stage1Config(_Section):
    """Fields shared by the two supervised alignment stages (each a Ray Train job)."""

    steps: int = Field(1000, ge=1, description="Optimizer steps.")
    batch_size: int = Field(128, ge=1, description="Global batch size (split evenly over workers).")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer and schedule.")
    condition_dropout: float = Field(
        0.1, ge=0, lt=1, description="Probability of zeroing the conditions (CFG)."
    )
    checkpoint_every: int = Field(100, ge=1, description="Write a checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(3, ge=1, description="Newest checkpoints kept on disk.")
    log_every: int = Field(1, ge=1, description="Log metrics every N steps.")
    max_seconds: float | None = Field(
        None,
        gt=0,
        description="Wall-clock limit: stop once the steps have taken this many seconds (rank 0's time of "
        "its steps, summed over resumes; start-up and checkpoint writes not counted), finishing the step in "
        "flight, with a checkpoint there. null: no limit, `steps` alone ends the stage. "
        "`rlrestore compare-control` sets it for the Stage 1.2 control.",
    )
    trainable: list[Component]

    @field_validator("trainable")
    @classmethod
    def _nonempty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one component to train")
        return value


class AutoencoderConfig(Stage1Config):
    """Optional stage before Stage 1: fit the DC-AE as an autoencoder (L1 + MSE reconstruction).

    Only for policies whose VAE is built from scratch (the tiny demo); with a pretrained DC-AE
    leave ``steps`` at 0 and the stage is skipped.
    """

    steps: int = Field(0, ge=0, description="Optimizer steps; 0 skips the stage.")
    trainable: list[Component] = Field(default_factory=lambda: ["vae"], description="Components trained.")


class SemanticAlignmentConfig(Stage1Config):
    """Stage 1.1: train the AR integrator and connectors through the frozen DiT, L_CE + alpha L_diff (Eq. 10)."""

    ce_weight: float = Field(1.0, ge=0, description="Weight of the next-token CE loss over image tokens.")
    diff_weight: float = Field(1.0, ge=0, description="alpha of Eq. 10: weight of the diffusion loss.")
    trainable: list[Component] = Field(
        default_factory=lambda: ["integrator", "diffusion_connector", "vae_connector"],
        description="Policy components trained in this stage.",
    )


class TextureAlignmentConfig(Stage1Config):
    """Stage 1.2: AR frozen, train the DiT and the LQ encoder, L_diff + beta ||E(y) - E_frozen(x)||^2 (Eq. 11)."""

    diff_weight: float = Field(1.0, ge=0, description="Weight of the diffusion loss.")
    latent_weight: float = Field(
        1.0, ge=0, description="beta: weight of the latent consistency loss (Eq. 11)."
    )
    semantic_codes: Literal["target", "generated", "mix"] = Field(
        "target",
        description="Codes S the DiT is conditioned on: 'target' teacher-forces the clean face's codes "
        "(cheap; the released recipe); 'generated' runs the frozen integrator on the LQ prompt (greedy), "
        "i.e. the codes it will see at inference (one AR pass of N tokens per sample per step); 'mix' "
        "generates them for a random `generated_fraction` of the samples and teacher-forces the rest. "
        "Tiny config, 32 held-out inputs: vs target, generated -0.24 dB PSNR and mix -0.02 dB, within the "
        "0.6 dB spread over inputs (scripts/compare_semantic_codes.py), so target stays the default.",
    )
    generated_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="With semantic_codes=mix: probability that a sample's codes are generated rather "
        "than the target's (drawn per sample from the step's generator; 0 = target, 1 = generated).",
    )
    trainable: list[Component] = Field(
        default_factory=lambda: ["transformer", "lq_encoder", "vae_connector"],
        description="Policy components trained in this stage.",
    )


DEFAULT_REWARD_ACTOR = "default"
ErrorPolicy = Literal["retry", "skip_step", "fail"]


def reward_group_key(group: str) -> str:
    """The config section that sizes reward-actor group ``group``."""
    return "stage2.resources.reward" if group == DEFAULT_REWARD_ACTOR else f"stage2.resources.reward_groups.{group}"


class RewardSpec(_Section):
    """One reward model: a registered name (or ``module:Class``), its weight and constructor args."""

    name: str = Field(
        ..., min_length=1, description="Registered reward name or a 'package.module:Class' path."
    )
    weight: float = Field(1.0, description="Weight of this component in the total reward.")
    args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the reward's constructor."
    )
    actor: str = Field(
        DEFAULT_REWARD_ACTOR,
        min_length=1,
        description="Reward-actor group hosting this reward: 'default' (sized by stage2.resources.reward) "
        "or a key of stage2.resources.reward_groups. Rewards of one group share its actors.",
    )
    on_error: ErrorPolicy | None = Field(
        None, description="Error policy of this reward; None uses stage2.faults.reward_errors.policy."
    )
    timeout_s: float | None = Field(
        None,
        gt=0,
        description="Seconds one scoring call (one chunk of images) may take before it counts as failed; "
        "None uses stage2.faults.reward_errors.timeout_s.",
    )


class RewardErrorConfig(_Section):
    """What happens when a reward raises, hangs or returns a malformed result.

    A NaN score is no error: a reward returns it for an image it cannot score, and the aggregator
    masks that sample. Every failure is logged with the reward's name, counted per step in
    ``reward/errors/<name>`` and summarised in ``<run_dir>/reward_errors.json``.
    """

    policy: ErrorPolicy = Field(
        "retry",
        description="'retry': call the failed chunk again up to `retries` times, then as skip_step; "
        "'skip_step': no training on the step (the step counter advances, so nothing repeats); "
        "'fail': stop the run with the reward's name and error. A failure of a weight-0 reward "
        "never skips a step (it only reports).",
    )
    retries: int = Field(2, ge=0, description="Extra attempts of a failed chunk under policy 'retry'.")
    timeout_s: float = Field(
        300.0,
        gt=0,
        description="Seconds one scoring call (one chunk of images) of a reward may take; a call past it "
        "fails as a timeout and its thread is abandoned (the reward actor is replaced after the step).",
    )


class NFTConfig(_Section):
    """DiffusionNFT loss (Eq. 13-15) and the v_old EMA, as the reference implementation does them."""

    beta: float = Field(
        0.1, gt=0, description="beta (the paper's gamma) of v+ / v-: 1.0 single reward, 0.1 multi-reward."
    )
    loss_form: Literal["velocity", "adaptive_x0"] = Field(
        "velocity", description="'velocity': Eq. 15; 'adaptive_x0': the reference's x0-space adaptive form."
    )
    adaptive_scale: float = Field(5.0, gt=0, description="Scale of the adaptive_x0 form.")
    timesteps_per_sample: int = Field(
        4, ge=1, description="Timesteps t (each a forward/backward) per stored x0."
    )
    base_penalty: float = Field(
        0.0, ge=0, description="Weight of ||v_theta - v_base||^2 to the frozen base (1e-4 in the reference)."
    )
    clip: float = Field(5.0, gt=0, description="Clip constant c of the group-normalised advantage.")
    reward_eps: float = Field(1e-4, gt=0, description="Added to the step-wide reward std.")
    ema_schedule: Literal["linear", "delayed"] = Field("linear", description="Decay schedule of v_old.")


class RolloutConfig(_Section):
    """How the rollout actors sample: chunk size, sampler, and rollouts overlapping the learners."""

    batch_size: int = Field(
        4, ge=1, description="Inputs per batched rollout call (one chunk, sent to one rollout actor)."
    )
    sampler_steps: int = Field(
        10, ge=1, description="Sampler steps of rollouts (deterministic ODE, CFG off); also the learners' timestep grid."
    )
    sampler_method: Literal["euler", "dpm2"] = Field(
        "euler",
        description="Rollout sampler: 'euler' or 'dpm2' (the released model's Stage 2), see sampler.method.",
    )
    asynchronous: bool = Field(False, description="Roll out step i+1 while the learners train on step i.")
    max_policy_lag: int = Field(
        1,
        ge=0,
        description="Most policy versions a rollout may lag behind the weights it is trained with; a rollout "
        "lagging more is redone with the current weights. Asynchronous rollouts lag 1 by design (need >= 1); "
        "synchronous rollouts lag 0.",
    )

    condition_cache: int = Field(
        1024,
        ge=0,
        description="Conditions each rollout actor keeps (least recently used dropped) when they cannot change: "
        "data.fixed_degradation=true and a deterministic condition (greedy AR decoding); 0 turns the cache off.",
    )

    @model_validator(mode="after")
    def _async_needs_lag(self) -> RolloutConfig:
        if self.asynchronous and self.max_policy_lag < 1:
            raise ValueError(
                "stage2.rollout.asynchronous=true rolls out step i+1 with the weights of step i (policy lag 1), "
                f"but stage2.rollout.max_policy_lag={self.max_policy_lag}: set max_policy_lag >= 1 or "
                "asynchronous=false"
            )
        return self


class LearnerConfig(_Section):
    """What the DeepSpeed learner ranks train and how: micro-batches, full fine-tuning or LoRA, ZeRO."""

    micro_batch: int = Field(8, ge=1, description="Samples per learner forward/backward.")
    finetune: Literal["full", "lora"] = Field("full", description="Full fine-tuning or LoRA of the DiT.")
    lora_rank: int = Field(32, ge=1, description="LoRA rank (finetune=lora).")
    lora_alpha: float = Field(
        32.0, gt=0, description="LoRA scale numerator: the adapter's update is scaled by alpha / rank."
    )
    lora_init: Literal["default", "gaussian"] = Field(
        "default",
        description="Initialisation of LoRA's A factor (B starts at zero either way): peft's 'default' "
        "(Kaiming-uniform) or 'gaussian' (normal, std 1 / rank; the released model's Stage 2).",
    )
    lora_targets: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        min_length=1,
        description="Names (suffixes) of the DiT's Linear layers that get LoRA adapters (finetune=lora).",
    )
    zero_stage: int = Field(
        2,
        ge=0,
        le=2,
        description="DeepSpeed ZeRO stage of the learners (0-2; ZeRO-3 would split the DiT the EMA reads whole).",
    )


class Stage2Resources(_Section):
    """Ray resources of every Stage 2 role, one ``ActorGroupConfig`` each, reserved up front in one
    placement group (a bundle per actor)."""

    rollout: ActorGroupConfig = Field(
        default_factory=lambda: ActorGroupConfig(num_actors=2), description="Rollout actors."
    )
    reward: ActorGroupConfig = Field(
        default_factory=ActorGroupConfig,
        description="Actors of the 'default' reward-actor group (rewards without `actor`).",
    )
    reward_groups: dict[str, ActorGroupConfig] = Field(
        default_factory=dict,
        description="Further reward-actor groups by name (a reward joins one with `actor: NAME`), each "
        "with its own actors and CPU/GPU reservation; e.g. one GPU group per large model.",
    )
    learner: ActorGroupConfig = Field(
        default_factory=lambda: ActorGroupConfig(num_actors=2), description="DeepSpeed learner ranks."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy of all Stage 2 actors (one bundle per actor)."
    )
    placement_timeout_s: float = Field(
        120.0, gt=0, description="Seconds to wait for the cluster to fit the placement group before failing."
    )

    @model_validator(mode="after")
    def _default_group_is_reward(self) -> Stage2Resources:
        if DEFAULT_REWARD_ACTOR in self.reward_groups:
            raise ValueError(
                f"stage2.resources.reward_groups.{DEFAULT_REWARD_ACTOR}: the default group is sized by "
                "stage2.resources.reward; set that instead or give this group another name"
            )
        return self


class FaultConfig(_Section):
    """What a Stage 2 run survives: actor deaths, and rewards that raise, hang or return garbage."""

    max_actor_failures: int = Field(
        10,
        ge=0,
        description="Rollout-actor deaths and learner-group losses a run survives before it stops (each "
        "dead rollout actor is replaced and its chunk redone; a lost learner rank rebuilds the learner "
        "group from the newest checkpoint and redoes the steps after it).",
    )
    reward_errors: RewardErrorConfig = Field(
        default_factory=RewardErrorConfig, description="Error policy and timeout of reward scoring."
    )


class OutputConfig(_Section):
    """What a Stage 2 run writes besides its metrics, and how often."""

    checkpoint_every: int = Field(10, ge=1, description="Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(3, ge=1, description="Newest checkpoints kept on disk.")
    sample_grid_every: int = Field(10, ge=1, description="Write an LQ | candidates | GT grid every N steps.")


DEFAULT_GUARD_METRICS = ("psnr", "dlib_identity", "dlib_lmd")
DEFAULT_GUARD_THRESHOLDS = {"dlib_identity": 0.1, "dlib_lmd": 0.05, "psnr": 2.0}
"""Default ``max_worse`` of the guard metrics (``stage2.guard.rules`` unset)."""
EVAL_TOTAL = "total"
"""Name of the weighted trained reward among the held-out evaluation's values (``eval/total``)."""


class HeldOutEvalConfig(_Section):
    """What Stage 2's held-out evaluation restores and scores (``stage2.eval_every``): the held-back
    faces (``data.holdout``), degraded with fixed seeds as the demo does, restored by the current
    policy with the deterministic rollout sampler and fixed noise seeds, scored by the trained
    rewards and the guard metrics against their clean faces."""

    faces: int = Field(
        0, ge=0, description="Held-back faces restored at each evaluation (the first N by id); 0: all of data.holdout."
    )
    seeds: int = Field(1, ge=1, description="Restorations per face, each with its own fixed noise seed.")
    guard_metrics: list[str] = Field(
        default_factory=lambda: list(DEFAULT_GUARD_METRICS),
        description="Registered rewards scored besides the trained ones and logged raw as eval/<name> (psnr in dB; "
        "dlib_identity and dlib_lmd are distances, lower is better). Those that are not trained rewards are "
        "scored in the driver process on the CPU.",
    )


class GuardRule(_Section):
    """One threshold of the reward-hacking guard, relative to the metric's value at the start (step 0)."""

    metric: str = Field(
        ...,
        min_length=1,
        description="'total' (the weighted trained reward), 'reward/<name>' (a trained reward) or a name of "
        "stage2.eval.guard_metrics.",
    )
    max_worse: float = Field(
        ...,
        ge=0,
        description="How far the metric may move in its worse direction from its step-0 value, in its own units "
        "(a higher-is-better metric may fall this much, a lower-is-better one rise this much).",
    )


class GuardConfig(_Section):
    """The reward-hacking guard: checked at every held-out evaluation; inert while eval_every is 0."""

    rules: list[GuardRule] | None = Field(
        None,
        description="Thresholds; crossing any one triggers `action`. None: the default threshold of each "
        "evaluated guard metric that has one: dlib_identity +0.1 (distance), dlib_lmd +0.05 (inter-ocular "
        "units), psnr -2 dB (some fidelity is traded for quality by design); [] turns the guard off.",
    )
    action: Literal["stop", "rollback"] = Field(
        "stop",
        description="'stop': end the run cleanly (checkpoint and report written); 'rollback': reload learners and "
        "rollout actors from the best checkpoint (stage2.select) and keep training, up to max_rollbacks times, "
        "then stop.",
    )
    max_rollbacks: int = Field(2, ge=0, description="Rollbacks a run may make before a crossing stops it.")

    def active_rules(self, guard_metrics: list[str]) -> list[GuardRule]:
        """The configured rules, or the defaults of the evaluated ``guard_metrics``."""
        if self.rules is not None:
            return list(self.rules)
        return [
            GuardRule(metric=name, max_worse=DEFAULT_GUARD_THRESHOLDS[name])
            for name in guard_metrics
            if name in DEFAULT_GUARD_THRESHOLDS
        ]


class SelectionConfig(_Section):
    """Which held-out evaluation names the run's best checkpoint (``<run_dir>/stage2_report.json``)."""

    metric: str = Field(
        EVAL_TOTAL,
        min_length=1,
        description="'total' (the weighted trained reward), 'reward/<name>' or a name of stage2.eval.guard_metrics.",
    )
    mode: Literal["max", "min"] | None = Field(
        None, description="'max' or 'min'; None: the metric's own direction (rewards: max; distances: min)."
    )
    guarded_only: bool = Field(
        True, description="Only evaluations that crossed no guard threshold may be the best."
    )


class Stage2Config(_Section):
    """Stage 2: preference RL with DiffusionNFT on rollout, reward and learner actors.

    The recipe (steps, inputs, K, rewards) at the top; then one section per concern: how rollouts
    sample, the NFT loss, the optimizer, what the learners train, the Ray resources of every role,
    what the run survives, and what it writes.
    """

    steps: int = Field(100, ge=1, description="RL steps (rollout -> reward -> learn -> sync).")
    inputs_per_step: int = Field(48, ge=1, description="Degraded inputs per step (groups).")
    candidates: int = Field(24, ge=1, description="K candidates per input.")
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [
            RewardSpec(name="sharpness", weight=1.0),
            RewardSpec(name="psnr", weight=0.0),
        ],
        description="Reward components; a weight of 0 reports a component without training on it.",
    )
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout sampling.")
    nft: NFTConfig = Field(default_factory=NFTConfig, description="NFT loss and v_old EMA.")
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(
            lr=3e-4, weight_decay=1e-4, schedule="constant", warmup_ratio=0.0
        ),
        description="Learner optimizer (Table I: AdamW 3e-4 constant, wd 1e-4).",
    )
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="What the learners train.")
    resources: Stage2Resources = Field(
        default_factory=Stage2Resources, description="Actors and reservations of every role; placement."
    )
    faults: FaultConfig = Field(default_factory=FaultConfig, description="Actor and reward failures.")
    outputs: OutputConfig = Field(default_factory=OutputConfig, description="Checkpoints and sample grids.")
    eval_every: int = Field(
        0,
        ge=0,
        description="Held-out evaluation every N steps, at step 0 and at the end (a checkpoint is written at each); "
        "0 turns it, the guard and best-checkpoint selection off.",
    )
    eval: HeldOutEvalConfig = Field(default_factory=HeldOutEvalConfig, description="Held-out evaluation.")
    guard: GuardConfig = Field(default_factory=GuardConfig, description="Reward-hacking guard.")
    select: SelectionConfig = Field(default_factory=SelectionConfig, description="Best-checkpoint rule.")

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        return move_renamed_keys(data, "stage2")

    @model_validator(mode="after")
    def _reward_groups_exist(self) -> Stage2Config:
        groups = self.resources.reward_groups
        for index, spec in enumerate(self.rewards):
            if spec.actor != DEFAULT_REWARD_ACTOR and spec.actor not in groups:
                defined = ", ".join([DEFAULT_REWARD_ACTOR, *groups])
                raise ValueError(
                    f"stage2.rewards.{index}.actor = {spec.actor!r} (reward {spec.name!r}) names no reward-actor "
                    f"group; define stage2.resources.reward_groups.{spec.actor} or use one of: {defined}"
                )
        return self

    @model_validator(mode="after")
    def _eval_metrics_known(self) -> Stage2Config:
        known = [EVAL_TOTAL, "reward/<name>", *self.eval.guard_metrics]
        rules = self.guard.rules or []
        named = [(f"stage2.guard.rules.{i}.metric", rule.metric) for i, rule in enumerate(rules)]
        for key, metric in [*named, ("stage2.select.metric", self.select.metric)]:
            if metric != EVAL_TOTAL and not metric.startswith("reward/") and metric not in self.eval.guard_metrics:
                raise ValueError(
                    f"{key} = {metric!r} is not evaluated; use one of {known} or add it to "
                    "stage2.eval.guard_metrics"
                )
        return self

    def reward_actor_groups(self) -> dict[str, tuple[ActorGroupConfig, list[RewardSpec]]]:
        """Reward-actor groups that host at least one reward: name -> (resources, rewards).

        In order of first use in ``rewards``; a group no reward names starts no actor.
        """
        groups: dict[str, tuple[ActorGroupConfig, list[RewardSpec]]] = {}
        for spec in self.rewards:
            if spec.actor not in groups:
                resources = self.resources.reward_groups.get(spec.actor, self.resources.reward)
                groups[spec.actor] = (resources, [])
            groups[spec.actor][1].append(spec)
        return groups


class RayConfig(_Section):
    """Where Ray jobs run, and the Ray Train workers of Stage 1."""

    address: str | None = Field(
        None, description="Ray cluster address ('auto', 'ray://host:port'); None starts a local cluster."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster started by rlrestore.")
    train_workers: ActorGroupConfig = Field(
        default_factory=lambda: ActorGroupConfig(num_actors=2),
        description="Ray Train workers of Stage 1 (and the autoencoder stage); the global batch is split over them.",
    )
    max_failures: int = Field(3, ge=0, description="Worker failures a Ray Train job survives (restarts).")
    dashboard_host: str = Field("127.0.0.1", description="Bind address of the dashboard of a local cluster.")
    include_dashboard: bool = Field(False, description="Start the Ray dashboard with a local cluster.")

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        return move_renamed_keys(data, "ray")


class ServeConfig(_Section):
    """``rlrestore serve-reward``: one reward as a Ray Serve application (`rewards/serving.py`).

    Each replica builds the reward once and scores requests from HTTP (the wire format of the
    ``http`` reward) and from deployment handles (the ``serve`` reward) in one ``serve.batch``
    queue. Serve's HTTP proxy is cluster-wide: ``host`` and ``port`` apply when Serve first starts
    on the cluster.
    """

    replicas: ActorGroupConfig = Field(
        default_factory=lambda: ActorGroupConfig(num_actors=1, num_cpus=1.0),
        description="Replicas of the deployment: num_actors replicas, each reserving num_cpus / num_gpus "
        "(a replica with GPUs scores on its GPU, see `device`).",
    )
    max_batch_size: int = Field(
        8, ge=1, description="Requests (each a chunk of images) one reward call may combine (serve.batch)."
    )
    batch_wait_timeout_s: float = Field(
        0.01,
        ge=0,
        description="Seconds the first request of a batch waits for more before the reward is called (serve.batch).",
    )
    max_ongoing_requests: int = Field(
        32,
        ge=1,
        description="Requests one replica holds at once (queued for a batch or being scored); at least "
        "max_batch_size, or batches never fill.",
    )
    host: str = Field(
        "127.0.0.1",
        description="Bind address of Serve's HTTP proxy. 127.0.0.1: this machine only; the proxy has no "
        "authentication, so expose it (0.0.0.0) only on a trusted network.",
    )
    port: int = Field(8000, ge=1, le=65535, description="Port of Serve's HTTP proxy.")

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> ServeConfig:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"serve.max_ongoing_requests={self.max_ongoing_requests} is below serve.max_batch_size="
                f"{self.max_batch_size}: a replica could never gather a full batch; raise it"
            )
        return self


class LoggingConfig(_Section):
    """Weights & Biases and local metrics."""

    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="W&B mode; offline writes to <run_dir>/wandb, sync later with `wandb sync`."
    )
    wandb_project: str = Field("rlrestore", description="W&B project name.")
    wandb_entity: str | None = Field(None, description="W&B entity (team or user).")
    progress: bool = Field(True, description="Show progress bars.")


# The paper's metrics (Table II), the weight-free ones and the dlib face metrics (real weights from the
# package registry); those without weights here are reported as skipped.
DEFAULT_EVAL_METRICS = (
    "psnr", "ssim", "ms_ssim", "lpips", "fid", "musiq", "clipiqa+", "maniqa", "topiq_nr-face",
    "niqe", "brisque", "piqe", "deg", "lmd", "dlib_identity", "dlib_lmd", "hpsv2", "pickscore", "clipscore",
)  # fmt: skip


class EvalConfig(_Section):
    """``rlrestore eval`` and ``rlrestore analyze determinism``: metrics, restorations, parallelism.

    Per-image metrics are rewards of the reward registry, reported as raw values (PIQE, LPIPS, ...
    un-negated); ``deg`` (ArcFace angle from the ``identity`` reward), ``fid`` (set-level) and
    ``lmd`` are metric names of their own. A metric whose weights are missing, that needs ground
    truth on a real set, or whose model is not available is skipped and reported with the reason.
    """

    metrics: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EVAL_METRICS),
        min_length=1,
        description="Metrics, in table order: registered reward names, plus 'deg' (ArcFace angle in degrees, "
        "args of the 'identity' reward), 'fid' (set-level, against the clean set or --reference) and 'lmd' "
        "(landmark distance of AWing FAN landmarks, `rewards.landmarks`). 'dlib_identity', 'dlib_lmd', 'niqe' "
        "and 'brisque' run offline with weights installed from the package registry.",
    )
    metric_args: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Constructor args per metric, e.g. weight files: eval.metric_args.deg.checkpoint=/w/backbone.pth, "
        "eval.metric_args.lpips.weights=/w/lpips.pth.",
    )
    samples: int = Field(1, ge=1, description="Restorations per input; the k-th uses seed `seed + k`.")
    determinism_seeds: int = Field(
        16,
        ge=2,
        description="N of `analyze determinism`: restorations per input, seeds `seed` .. `seed + N - 1`.",
    )
    seed: int = Field(
        0, description="Base seed: a synthetic input is degraded (Eq. 16) with a hash of (seed, its id)."
    )
    noise_seed: int | None = Field(
        None,
        description="None: each restoration starts from noise seeded with its own seed (stochastic sampler). "
        "An int: every restoration starts from the same noise, seeded with it (SDE and AR noise too), so a "
        "restoration is a deterministic function of its input whatever its seed.",
    )
    batch_size: int = Field(4, ge=1, description="Inputs per batched restore call.")
    chunk_size: int = Field(
        16,
        ge=1,
        description="Inputs per chunk: the unit of parallel work and of resuming (saved when complete).",
    )
    actors: EvalActorsConfig = Field(
        default_factory=EvalActorsConfig,
        description="Ray actors restoring and scoring chunks in parallel (num_actors 0: in this process).",
    )
    resolution: int | None = Field(
        512,
        gt=0,
        description="Side of the square every test image is brought to before degradation / restoration "
        "(centre crop, Lanczos resize, as `data build` does; the paper evaluates at 512). null keeps each "
        "image's own size (then a huge input costs memory and time in every metric).",
    )
    upscale_small: bool = Field(
        False,
        description="Metrics with a minimum image side (ms_ssim 161 px, niqe 96 px, dlib_* 64 px): true upscales "
        "smaller images (bicubic, restoration and ground truth alike) to it; false leaves them unscored and reports "
        "how many.",
    )
    grid_images: int = Field(
        8,
        ge=0,
        description="Inputs in the LQ | checkpoints | GT grid (written with 2+ checkpoints); 0: none.",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        return move_renamed_keys(data, "eval")

    @model_validator(mode="after")
    def _metric_names(self) -> EvalConfig:
        repeated = sorted({name for name in self.metrics if self.metrics.count(name) > 1})
        if repeated:
            raise ValueError(f"eval.metrics lists {repeated} more than once")
        unused = sorted(set(self.metric_args) - set(self.metrics))
        if unused:
            raise ValueError(f"eval.metric_args has args for {unused}, which eval.metrics does not list")
        return self


class RunConfig(_Section):
    """Everything a run needs; the YAML file mirrors this structure."""

    run_dir: str = Field("runs/default", description="Directory of checkpoints, metrics, logs and reports.")
    seed: int = Field(0, description="Global seed (weights init, noise, data order).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Device of every role: 'auto' puts a role on CUDA when its Ray resources reserve GPUs "
        "(ray.train_workers, stage2.resources.*, eval.actors: num_gpus; for in-process commands when CUDA is "
        "available) and on the CPU otherwise; 'cuda' refuses any role without GPUs; 'cpu' refuses GPU "
        "reservations (they would sit idle).",
    )
    precision: Literal["fp32", "bf16-mixed", "fp16-mixed"] = Field(
        "fp32",
        description="Numerics of every role. 'fp32': everything in float32. 'bf16-mixed' / 'fp16-mixed': "
        "trained weights stay float32 masters (Stage 1 under torch.autocast, the learners with DeepSpeed's "
        "bf16/fp16 mode, fp16 with loss scaling), EMAs (v_old) accumulate in float32, and inference copies "
        "(rollouts, eval, restore, frozen components) hold weights in bf16/fp16 while the sampler state x "
        "and the time t stay float32.",
    )
    policy: AnyPolicyConfig = Field(
        default_factory=PolicyConfig,
        description="The policy networks; `policy.type` picks the model (prefrestore, the default, or flow_unet).",
    )
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="Restoration sampler.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    degradation: DegradationConfig = Field(default_factory=DegradationConfig, description="Eq. 16 ranges.")
    autoencoder: AutoencoderConfig = Field(
        default_factory=AutoencoderConfig, description="Optional DC-AE fit for from-scratch (tiny) policies."
    )
    stage1_1: SemanticAlignmentConfig = Field(
        default_factory=SemanticAlignmentConfig, description="Stage 1.1, Semantic-to-Diffusion Alignment."
    )
    stage1_2: TextureAlignmentConfig = Field(
        default_factory=TextureAlignmentConfig, description="Stage 1.2, Texture-to-Diffusion Alignment."
    )
    stage2: Stage2Config = Field(
        default_factory=Stage2Config, description="Stage 2, DiffusionNFT preference RL."
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster and resources.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="W&B and progress.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation and determinism analysis.")
    serve: ServeConfig = Field(
        default_factory=ServeConfig, description="`rlrestore serve-reward`: a reward as a Ray Serve application."
    )

    @model_validator(mode="before")
    @classmethod
    def _deprecated_policy_dtype(cls, data: Any) -> Any:
        """``policy.dtype: bfloat16|float16`` (before ``precision`` existed) means the mixed mode."""
        if not isinstance(data, dict):
            return data
        policy = data.get("policy")
        dtype = policy.get("dtype") if isinstance(policy, dict) else None
        if dtype in ("bfloat16", "float16") and "precision" not in data:
            mapped = "bf16-mixed" if dtype == "bfloat16" else "fp16-mixed"
            warnings.warn(
                f"policy.dtype={dtype} is deprecated: it now means precision={mapped} (float32 master "
                "weights); set `precision` instead",
                FutureWarning,
                stacklevel=2,
            )
            data = {**data, "precision": mapped}
        return data

    @model_validator(mode="after")
    def _batch_divides(self) -> RunConfig:
        for name, stage in (
            ("autoencoder", self.autoencoder),
            ("stage1_1", self.stage1_1),
            ("stage1_2", self.stage1_2),
        ):
            workers = self.ray.train_workers.num_actors
            if stage.batch_size % workers:
                raise ValueError(
                    f"{name}.batch_size={stage.batch_size} must be divisible by ray.train_workers.num_actors={workers}"
                )
        return self

    def stage(self, name: StageName) -> AutoencoderConfig | SemanticAlignmentConfig | TextureAlignmentConfig:
        """The section of a supervised stage by its CLI name."""
        return {"autoencoder": self.autoencoder, "stage1.1": self.stage1_1, "stage1.2": self.stage1_2}[name]


RENAMED_KEYS: dict[str, str] = {
    "stage2.rollout_batch": "stage2.rollout.batch_size",
    "stage2.sampler_steps": "stage2.rollout.sampler_steps",
    "stage2.sampler_method": "stage2.rollout.sampler_method",
    "stage2.async_rollouts": "stage2.rollout.asynchronous",
    "stage2.max_policy_lag": "stage2.rollout.max_policy_lag",
    "stage2.micro_batch": "stage2.learner.micro_batch",
    "stage2.finetune": "stage2.learner.finetune",
    "stage2.lora_rank": "stage2.learner.lora_rank",
    "stage2.lora_alpha": "stage2.learner.lora_alpha",
    "stage2.lora_init": "stage2.learner.lora_init",
    "stage2.lora_targets": "stage2.learner.lora_targets",
    "stage2.zero_stage": "stage2.learner.zero_stage",
    "stage2.rollout_workers": "stage2.resources.rollout",
    "stage2.reward_workers": "stage2.resources.reward",
    "stage2.reward_actors": "stage2.resources.reward_groups",
    "stage2.learners": "stage2.resources.learner",
    "stage2.placement_strategy": "stage2.resources.placement_strategy",
    "stage2.placement_timeout_s": "stage2.resources.placement_timeout_s",
    "stage2.max_actor_failures": "stage2.faults.max_actor_failures",
    "stage2.reward_errors": "stage2.faults.reward_errors",
    "stage2.checkpoint_every": "stage2.outputs.checkpoint_every",
    "stage2.keep_checkpoints": "stage2.outputs.keep_checkpoints",
    "stage2.sample_grid_every": "stage2.outputs.sample_grid_every",
    "ray.num_workers": "ray.train_workers.num_actors",
    "ray.cpus_per_worker": "ray.train_workers.num_cpus",
    "ray.gpus_per_worker": "ray.train_workers.num_gpus",
    "eval.num_actors": "eval.actors.num_actors",
    "eval.num_cpus": "eval.actors.num_cpus",
    "eval.num_gpus": "eval.actors.num_gpus",
}
"""Keys of the previous release -> their place now. The old keys are still read (YAML files,
``key=value`` overrides, dicts passed to the config classes), each with a FutureWarning naming
both, until the next release removes them."""

_UNSET = object()


def _warn_renamed(old: str, new: str) -> None:
    warnings.warn(
        f"config key {old} is deprecated and will be removed in the next release: use {new}",
        FutureWarning,
        stacklevel=4,
    )


def _as_dict(node: Any, where: str) -> dict[str, Any]:
    """A copy of a config section given as a dict or as a config object (only its set keys)."""
    if isinstance(node, BaseModel):
        return node.model_dump(exclude_unset=True)
    if not isinstance(node, dict):
        raise ValueError(f"{where} holds the value {node!r}, not a section")  # noqa: TRY004 - a validation error
    return dict(node)


def move_renamed_keys(data: Any, section: str) -> Any:
    """``data`` of config section ``section`` (``stage2``, ``ray``, ``eval``) with each of its
    :data:`RENAMED_KEYS` moved to the new place, with a FutureWarning. Raises ValueError naming
    both keys when a key is set under its old and its new name."""
    if not isinstance(data, dict):
        return data
    moved = dict(data)
    for old, new in RENAMED_KEYS.items():
        head, _, name = old.partition(".")
        if head != section or name not in moved:
            continue
        *parents, leaf = new.split(".")[1:]
        node, where = moved, section
        for part in parents:
            where = f"{where}.{part}"
            node[part] = node = _as_dict(node.get(part, {}), where)
        if node.get(leaf, _UNSET) is not _UNSET:
            raise ValueError(f"{old} and {new} are both set; {old} is the old name of {new}: keep only {new}")
        _warn_renamed(old, new)
        node[leaf] = moved.pop(name)
    return moved


def _renamed_path(path: list[str]) -> list[str]:
    """An override's key path with a renamed key (or section) replaced by its new name."""
    for length in range(len(path), 0, -1):
        new = RENAMED_KEYS.get(".".join(path[:length]))
        if new is not None:
            _warn_renamed(".".join(path[:length]), new)
            return [*new.split("."), *path[length:]]
    return path


def _overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")


POLICY_SECTIONS: dict[str, type[PolicyBaseConfig]] = {"prefrestore": PolicyConfig, "flow_unet": FlowUNetConfig}


def _user_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """An error location as the user writes the key: without pydantic's union tag after ``policy``."""
    if len(loc) > 1 and loc[0] == "policy" and loc[1] in POLICY_SECTIONS:
        return (loc[0], *loc[2:])
    return loc


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in err.errors():
        loc = item["loc"]
        key = ".".join(str(part) for part in _user_loc(loc))
        value = item.get("input")
        if not key or (item["type"] == "value_error" and isinstance(value, dict)):  # the message names the keys
            lines.append(f"  {key + ': ' if key else ''}{item['msg']}")
        elif item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (value {value!r}); {_allowed_keys_hint(loc)}")
        else:
            lines.append(f"  {key} = {value!r}: {item['msg']}")
    return "\n".join(lines)


def _allowed_keys_hint(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = RunConfig
    parts = list(loc[:-1])
    while parts:
        part = str(parts.pop(0))
        if model is RunConfig and part == "policy":
            model = POLICY_SECTIONS[str(parts.pop(0))] if parts and parts[0] in POLICY_SECTIONS else PolicyConfig
            continue
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return "check the spelling"
        model = annotation
    return "allowed keys: " + ", ".join(sorted(model.model_fields))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. stage1_1.steps=10)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict, creating sections as needed. A renamed key
    (:data:`RENAMED_KEYS`) sets its new place; naming a key by both names is an error."""
    renamed: dict[str, str] = {}  # new key -> the override that named it by its old name
    given: dict[str, str] = {}  # keys named by their current name -> the override
    for text in overrides:
        path, value = parse_override(text)
        new_path = _renamed_path(path)
        (renamed if new_path != path else given)[".".join(new_path)] = text
        path = new_path
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} holds a value, not a section")
            node = child
        node[path[-1]] = value
    for key, text in given.items():
        for new_key, old_text in renamed.items():
            if _overlap(key, new_key):
                raise ConfigError(
                    f"overrides {old_text!r} and {text!r} set the same key: {old_text.split('=', 1)[0]} is "
                    f"the old name of {new_key}; keep only {text.split('=', 1)[0]}"
                )
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults when None), apply overrides and validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping at the top, got {type(loaded).__name__}"
            )
        data = loaded or {}
    try:  # renamed keys of the file move first, so that overrides (old or new names) win over them
        data = {key: move_renamed_keys(value, key) for key, value in data.items()}
    except ValueError as exc:
        raise ConfigError(f"invalid configuration ({source}): {exc}") from None
    if overrides:
        source += " + overrides"
        data = apply_overrides(data, overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (what a run actually used)."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def describe_schema(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """One line per config key with its type, default and description (for --help)."""
    lines: list[str] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if model is RunConfig and name == "policy":
            lines.append(f"{key}: {field.description}")
            for tag, section in POLICY_SECTIONS.items():
                lines.append(f"{key} (type: {tag}): {section.__doc__.splitlines()[0]}")
                lines.extend(describe_schema(section, prefix=f"{key}."))
            continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"{key}: {field.description}")
            lines.extend(describe_schema(annotation, prefix=f"{key}."))
            continue
        default = field.get_default(call_default_factory=True)
        lines.append(f"{key} (default {default!r}): {field.description}")
    return lines
