"""Restore images of any size with a policy: pad to a square, resize to the policy's resolution,
restore, resize back and crop to the original frame (``restore_arrays``).

Used by ``rlrestore restore`` (``rlrestore.orchestration.restore``), ``rlrestore eval`` and the demo.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from rlrestore.config import SamplerConfig
from rlrestore.data.images import to_tensor, to_uint8
from rlrestore.policies import RestorationPolicy


def to_square(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad HxW to a square by repeating edge pixels; returns the square and (top, left) offsets."""
    h, w = image.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    padded = np.pad(image, ((top, side - h - top), (left, side - w - left), (0, 0)), mode="edge")
    return padded, (top, left)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` resized to ``size`` x ``size`` (Lanczos)."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))


def restore_arrays(
    policy: RestorationPolicy,
    images: list[np.ndarray],
    captions: list[str],
    seeds: torch.Tensor,
    sampler: SamplerConfig,
) -> list[list[np.ndarray]]:
    """Restorations ``[image][k]`` (uint8, each at its input's size) of ``images`` of any size in
    one batched call; ``seeds`` ``[len(images), K]`` seeds each candidate's noise.

    Each image is padded to a square (edge pixels), resized to the policy's resolution,
    restored, resized back and cropped to the original frame.
    """
    squares = [to_square(image) for image in images]
    resolution = policy.resolution
    lq = torch.stack([to_tensor(resize(square, resolution)) for square, _ in squares]).to(policy.device)
    result = policy.restore(lq, captions, seeds, sampler)
    restored = []
    for row, (image, (square, (top, left))) in enumerate(zip(images, squares, strict=True)):
        height, width = image.shape[:2]
        restored.append(
            [
                resize(to_uint8(result.images[row, k].float().cpu()), square.shape[0])[
                    top : top + height, left : left + width
                ]
                for k in range(seeds.shape[1])
            ]
        )
    return restored
