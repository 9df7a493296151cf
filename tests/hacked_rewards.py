"""A reward hacked on purpose, named by its ``tests.hacked_rewards:Class`` path: it pays for noise."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from rewards import Reward, RewardBatch


class PaysForNoise(Reward):
    """Mean absolute high-frequency energy (the image minus its 3x3 box blur): noise maximises it,
    so a policy trained on it drifts away from the clean face (PSNR falls)."""

    name = "pays_for_noise"

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        blurred = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
        return (images - blurred).abs().mean(dim=(1, 2, 3))
