"""The Stage 1 sections: the optimizer, actor groups and the three supervised stages."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from rlrestore.config.base import _Section


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
