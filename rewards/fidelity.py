"""Fidelity rewards: how close a restoration is to its clean face (pyiqa PSNR and SSIM, no weights).

Both compare each image with ``batch.clean`` (same shape), after mapping [-1, 1] to [0, 1]
with clamping. They guard against the policy drifting from the face while a no-reference term
is optimised (weight the preference/quality term, report fidelity).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from rewards.base import PyiqaReward, register_reward

__all__ = ["COLOR_SPACES", "PSNR", "SSIM"]

COLOR_SPACES = ("yiq", "ycbcr", "lhm")  # the luma pyiqa's test_y_channel can use


def _check_color_space(color_space: str) -> str:
    # pyiqa silently uses the red channel for an unknown name; refuse it instead.
    if color_space not in COLOR_SPACES:
        raise ValueError(f"color_space must be one of {COLOR_SPACES}, got {color_space!r}")
    return color_space


@register_reward("psnr")
class PSNR(PyiqaReward):
    """Peak signal-to-noise ratio in dB, pyiqa ``psnr``: ``10 log10(1 / (MSE + 1e-8))``.

    pyiqa's defaults, kept here: the MSE is over all three RGB channels in [0, 1]
    (``test_y_channel=False``; True uses the luminance of ``color_space`` instead, which is
    pyiqa's ``psnry``), no border crop. An exact copy scores 80 dB (the 1e-8 floor); typical
    restorations score 20-35 dB.
    """

    needs_clean = True
    metric_name = "psnr"
    resources: ClassVar[dict[str, float]] = {"num_cpus": 0.25, "num_gpus": 0.0}

    def __init__(
        self,
        device: torch.device | str = "cpu",
        test_y_channel: bool = False,
        color_space: str = "yiq",
        crop_border: int = 0,
    ) -> None:
        super().__init__(
            device,
            test_y_channel=test_y_channel,
            color_space=_check_color_space(color_space),
            crop_border=crop_border,
        )


@register_reward("ssim")
class SSIM(PyiqaReward):
    """Structural similarity in [0, 1], pyiqa ``ssim`` (the official MATLAB SSIM).

    pyiqa's defaults, kept here: computed on the luminance Y of the YIQ colour space
    (``test_y_channel=True``, ``color_space="yiq"``, i.e. Y = 0.299 R + 0.587 G + 0.114 B),
    scaled to 0-255 and rounded, in float64; 11x11 Gaussian window (sigma 1.5) with 'valid'
    borders, so images need at least 11 px per side; no MATLAB-style downsampling
    (``downsample=False``), no border crop. ``test_y_channel=False`` averages over RGB
    (pyiqa's ``ssimc``). pyiqa's float64 convolutions are slow on CPU (one thread: about
    9 ms per 64 px image, 50 ms at 128 px, 2 s at 512 px); at full size run it on a GPU or
    set ``downsample=True`` (average-pools by round(min(H, W) / 256) first).
    """

    needs_clean = True
    metric_name = "ssim"
    resources: ClassVar[dict[str, float]] = {"num_cpus": 0.5, "num_gpus": 0.0}

    def __init__(
        self,
        device: torch.device | str = "cpu",
        test_y_channel: bool = True,
        color_space: str = "yiq",
        crop_border: int = 0,
        downsample: bool = False,
    ) -> None:
        super().__init__(
            device,
            test_y_channel=test_y_channel,
            color_space=_check_color_space(color_space),
            crop_border=crop_border,
            downsample=downsample,
        )
