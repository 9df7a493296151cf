"""The data sections: the Eq. 16 degradation and the training shards."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from rlrestore.config.base import _Section

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
