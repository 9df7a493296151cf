"""Colourfulness of restored faces: an example rlrestore reward plugin.

Restoration policies trained on sharpness or fidelity rewards tend to drift in colour: washed-out,
greyish skin or, the other way, over-saturated faces. This reward measures the colourfulness M of
Hasler & Suesstrunk (2003, "Measuring colourfulness in natural images"), on 8-bit sRGB values::

    rg = R - G,   yb = (R + G) / 2 - B
    M  = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2)

M is 0 for a grey image and grows with saturation and colour variety (the paper rates 15 "slightly",
33 "moderately" and 45 "averagely" colourful). Without ``target`` the score is M (more colour is
better); with ``target`` it is ``-|M - target|``, a prior that keeps faces near a natural
colourfulness (the 67 embedded training faces score 26 to 100, median 42).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from rewards.base import Reward, RewardBatch, to_unit_range

__all__ = ["Colourfulness", "colourfulness"]


def colourfulness(images: Tensor) -> Tensor:
    """Hasler-Suesstrunk colourfulness ``[N]`` of RGB images ``[N, 3, H, W]`` in [-1, 1] (clamped)."""
    red, green, blue = (to_unit_range(images).float() * 255.0).unbind(dim=1)
    rg = (red - green).flatten(1)
    yb = (0.5 * (red + green) - blue).flatten(1)
    spread = torch.sqrt(rg.var(dim=1, correction=0) + yb.var(dim=1, correction=0))
    offset = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
    return spread + 0.3 * offset


class Colourfulness(Reward):
    """Colourfulness M of each face, or ``-|M - target|`` when ``target`` is given."""

    name = "colourfulness"
    resources: ClassVar[dict[str, float]] = {"num_cpus": 0.1, "num_gpus": 0.0}

    def __init__(self, device: torch.device | str = "cpu", target: float | None = None) -> None:
        super().__init__(device)
        if target is not None and target < 0:
            raise ValueError(f"target colourfulness must be >= 0, got {target}")
        self.target = target

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        value = colourfulness(images)
        return value if self.target is None else -(value - self.target).abs()
