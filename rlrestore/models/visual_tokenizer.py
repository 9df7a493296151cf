"""TA-Tok-style visual tokenizer: SigLIP2 tower -> Linear+Tanh -> projection -> SimVQ codebook.

It turns an image into a grid of discrete codes: the degraded input y becomes the AR input and
the clean face x the Stage 1.1 next-token targets. The tokenizer is pretrained and stays frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipVisionModel


class SimVQ(nn.Module):
    """Vector quantiser whose codebook is a fixed random basis times a learned linear map (SimVQ).

    ``bias`` gives the map a bias and ``l2_normalized`` looks codes up by cosine (features and codes
    l2-normalised), as TA-Tok's SimVQ does with the flags of its weight file.
    """

    def __init__(self, codebook_size: int, dim: int, bias: bool = False, l2_normalized: bool = False) -> None:
        super().__init__()
        self.l2_normalized = l2_normalized
        self.register_buffer("basis", torch.randn(codebook_size, dim) * dim**-0.5)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def codebook(self) -> torch.Tensor:
        """The effective code vectors [V, dim]."""
        codes = self.proj(self.basis)
        return F.normalize(codes, dim=-1) if self.l2_normalized else codes

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Nearest code index of each feature vector ([B, N, dim] -> [B, N])."""
        codes = self.codebook()
        features = features.to(codes.dtype)
        if self.l2_normalized:
            features = F.normalize(features, dim=-1)
        distances = (
            features.pow(2).sum(-1, keepdim=True)
            - 2 * features @ codes.t()
            + codes.pow(2).sum(-1)[None, None, :]
        )
        return distances.argmin(dim=-1)


class VisualTokenizer(nn.Module):
    """Images in [-1, 1] at the tower's resolution -> code indices [B, grid*grid]."""

    def __init__(
        self,
        tower: SiglipVisionModel,
        codebook_size: int,
        codebook_dim: int,
        feature_layer: int,
        codebook_bias: bool = False,
        l2_normalized: bool = False,
    ) -> None:
        super().__init__()
        hidden = tower.config.hidden_size
        self.tower = tower
        self.feature_layer = feature_layer
        self.pre_quant = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, codebook_dim))
        self.quantizer = SimVQ(codebook_size, codebook_dim, bias=codebook_bias, l2_normalized=l2_normalized)

    @property
    def num_tokens(self) -> int:
        """Codes per image: (image_size / patch_size)^2 (729 for so400m-patch14-384)."""
        config = self.tower.config
        return (config.image_size // config.patch_size) ** 2

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # SigLIP normalises with mean = std = 0.5, i.e. exactly the [-1, 1] range our images use.
        out = self.tower(pixel_values=images.to(self.tower.dtype), output_hidden_states=True)
        features = out.hidden_states[self.feature_layer]
        return self.quantizer(self.pre_quant(features))
