"""The run: Ray, serving, logging and eval sections and :class:`RunConfig`, which holds them all."""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import Field, model_validator

from rlrestore.config.base import _Section
from rlrestore.config.data import DataConfig, DegradationConfig
from rlrestore.config.policy import AnyPolicyConfig, PolicyConfig, SamplerConfig
from rlrestore.config.renames import move_renamed_keys
from rlrestore.config.stage1 import (
    ActorGroupConfig,
    AutoencoderConfig,
    EvalActorsConfig,
    SemanticAlignmentConfig,
    StageName,
    TextureAlignmentConfig,
)
from rlrestore.config.stage2 import Stage2Config


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
