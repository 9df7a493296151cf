"""Synthetic face degradation, Eq. 16 of Pref-Restore.

    y = { [ (x * k_sigma) downsample_r + n_delta ]_JPEG_q } upsample_r

x: HQ image, k_sigma: Gaussian blur kernel, r: downsampling factor, n_delta: Gaussian noise of
std delta (0-255 scale), JPEG_q: JPEG compression at quality q. All four are drawn uniformly per
image (q as an integer) from the ranges of ``DegradationConfig``.

Sizes: the ranges refer to ``reference_size`` (512 px), so at that size Eq. 16 is applied as the
paper states it; at another size ``s`` each parameter follows one rule:

- sigma: a length in pixels, scaled by ``s / reference_size`` (the same blur relative to the face).
- r: ``r_eff = max(1, r * s / reference_size)``: the downsampled side ``s / r_eff`` keeps the
  pixels it has at the reference size, ``reference_size / r`` (capped at ``s``), so a 64 px face
  keeps the information a 512 px face keeps (used as is, r = 30 would leave a 64 px face 2 px wide).
- delta: unchanged; a per-pixel std on the 0-255 scale, added to a downsampled image of the
  same pixel size as at the reference (r_eff > 1) or to the image itself.
- q: unchanged; JPEG's 8x8 blocks act on that same-size downsampled image.

``degradation.scale_downsample: false`` uses r as is at every size (the earlier behaviour: only
sigma scales). The downsampled side is rounded and clamped to at least 1 pixel. Resizing is
bilinear both ways (as in the GFPGAN degradation the paper follows).

Determinism: the only randomness is the numpy ``Generator`` passed in (parameters and noise),
seeded per sample by ``rlrestore.runtime.seeds.sample_seed``, a blake2b hash, so the same (sample, seed, epoch) gives
the same LQ bytes in every process and on every machine with the same library versions.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from rlrestore.config import DegradationConfig


@dataclass(frozen=True)
class DegradationParams:
    """One draw of Eq. 16; ``sigma`` is in pixels at ``reference_size``, ``noise`` on the 0-255 scale."""

    sigma: float
    scale: float
    noise: float
    quality: int
    reference_size: int = 512
    scale_downsample: bool = True


def sample_params(cfg: DegradationConfig, rng: np.random.Generator) -> DegradationParams:
    """Draw sigma, r, delta uniformly and q as a uniform integer from the configured ranges."""
    q_low, q_high = math.ceil(cfg.jpeg_quality[0]), math.floor(cfg.jpeg_quality[1])
    if q_low > q_high:
        raise ValueError(f"degradation.jpeg_quality = {cfg.jpeg_quality} contains no integer quality")
    return DegradationParams(
        sigma=float(rng.uniform(*cfg.blur_sigma)),
        scale=float(rng.uniform(*cfg.downsample)),
        noise=float(rng.uniform(*cfg.noise)),
        quality=int(rng.integers(q_low, q_high + 1)),
        reference_size=cfg.reference_size,
        scale_downsample=cfg.scale_downsample,
    )


def scaled_sigma(sigma: float, size: int, reference_size: int) -> float:
    """Blur sigma for an image of side ``size`` given sigma at ``reference_size``."""
    return sigma * size / reference_size


def scaled_downsample(scale: float, size: int, reference_size: int) -> float:
    """Downsampling factor for an image of side ``size`` given r at ``reference_size``:
    ``max(1, r * size / reference_size)``, so the downsampled side stays ``reference_size / r``."""
    return max(1.0, scale * size / reference_size)


def downsampled_side(side: int, scale: float) -> int:
    """Side after downsampling by ``scale``: ``round(side / scale)``, at least 1 pixel."""
    return max(1, round(side / scale))


def degrade(hq: np.ndarray, params: DegradationParams, rng: np.random.Generator) -> np.ndarray:
    """Apply Eq. 16 to an ``HxWx3`` uint8 image; returns a uint8 image of the same shape.

    ``rng`` supplies the noise. Non-square images scale sigma and r by their shorter side.
    """
    if hq.dtype != np.uint8 or hq.ndim != 3 or hq.shape[2] != 3:
        raise ValueError(f"degrade expects an HxWx3 uint8 image, got shape {hq.shape} dtype {hq.dtype}")
    height, width = hq.shape[:2]
    image = hq.astype(np.float32)

    side = min(height, width)
    sigma = scaled_sigma(params.sigma, side, params.reference_size)
    if sigma > 0:
        ksize = 2 * math.ceil(3 * sigma) + 1
        image = cv2.GaussianBlur(image, (ksize, ksize), sigmaX=sigma, borderType=cv2.BORDER_REFLECT_101)

    scale = scaled_downsample(params.scale, side, params.reference_size) if params.scale_downsample else params.scale
    small = (downsampled_side(width, scale), downsampled_side(height, scale))
    if small != (width, height):
        image = cv2.resize(image, small, interpolation=cv2.INTER_LINEAR)

    if params.noise > 0:
        image = image + rng.normal(0.0, params.noise, size=image.shape).astype(np.float32)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    image = _jpeg(image, params.quality)

    if small != (width, height):
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return image


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.array(decoded.convert("RGB"), dtype=np.uint8)


def degrade_seeded(hq: np.ndarray, cfg: DegradationConfig, seed: int) -> tuple[np.ndarray, DegradationParams]:
    """Draw parameters and noise from ``np.random.default_rng(seed)`` and degrade ``hq``."""
    rng = np.random.default_rng(seed)
    params = sample_params(cfg, rng)
    return degrade(hq, params, rng), params
