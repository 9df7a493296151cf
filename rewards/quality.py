"""No-reference quality rewards that need no weights: Sobel sharpness and pyiqa PIQE.

Both reward high-frequency content, including noise and artefacts a sharpening policy may
invent; train on them next to a fidelity reward (``psnr``/``ssim``) that at least reports the
drift (the paper's quality/fidelity trade-off).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from rewards.base import PyiqaReward, Reward, RewardBatch, register_reward, to_unit_range

__all__ = ["PIQE", "Sharpness", "luminance", "mean_gradient_magnitude"]

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, the Y of pyiqa's YIQ
# Sobel kernels divided by 8, so a ramp of slope s grey levels per pixel responds with s.
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0


def luminance(images: Tensor) -> Tensor:
    """Luma ``[N, 1, H, W]`` of RGB ``[N, 3, H, W]`` (same range): 0.299 R + 0.587 G + 0.114 B."""
    weights = images.new_tensor(_LUMA).reshape(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def mean_gradient_magnitude(images: Tensor) -> Tensor:
    """Sharpness ``[N]`` of ``[N, 3, H, W]`` images in [-1, 1] (clamped), in grey levels per pixel.

    ``S = mean_{x,y} sqrt(Gx^2 + Gy^2)`` with ``Gx = (Sobel_x / 8) * Y``, ``Gy = (Sobel_y / 8) * Y``
    over the interior pixels ('valid' borders, so padding adds no edges), where ``Y`` is the
    luma in 0-255. A flat image scores 0; sharp faces score about 7-12 at 128 px and 11-18 at 64 px; Gaussian blur only
    lowers it (blurring is an average of shifted copies, which cannot raise the mean gradient
    norm). Per-pixel gradients grow as the same face is drawn smaller, so compare images of one
    size only (within a Stage 2 step they are).
    """
    if images.shape[-1] < 3 or images.shape[-2] < 3:
        raise ValueError(f"sharpness needs images of at least 3x3 pixels, got {tuple(images.shape)}")
    y = luminance(to_unit_range(images).float()) * 255.0
    kernel_x = _SOBEL_X.to(y.device)
    kernels = torch.stack([kernel_x, kernel_x.T]).unsqueeze(1)  # [2, 1, 3, 3]: Gx, Gy
    gradients = F.conv2d(y, kernels)
    return torch.linalg.vector_norm(gradients, dim=1).mean(dim=(1, 2))


@register_reward("sharpness")
class Sharpness(Reward):
    """Mean Sobel gradient magnitude of the luma (see :func:`mean_gradient_magnitude`); higher is sharper."""

    resources: ClassVar[dict[str, float]] = {"num_cpus": 0.25, "num_gpus": 0.0}

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        return mean_gradient_magnitude(images)


@register_reward("piqe")
class PIQE(PyiqaReward):
    """Negated PIQE (pyiqa ``piqe``, MATLAB's blind Perception-based Image Quality Evaluator).

    PIQE is 0-100, lower is better; the reward reports ``-PIQE`` (higher is better), in
    [-100, 0]. Computed on the YIQ luma in 16x16 blocks; strongly blurred or flat images
    saturate at -100, an all-black image gives NaN (PIQE divides by the image's maximum). About
    1-3 ms per 64-128 px image on one CPU thread.
    """

    metric_name = "piqe"
    higher_is_better = False
    resources: ClassVar[dict[str, float]] = {"num_cpus": 0.25, "num_gpus": 0.0}

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
