"""Identity reward: does the restoration still look like the same person as its clean face?

``identity`` embeds each restoration and its clean face with an ArcFace backbone (insightface
arcface_torch IResNet, :mod:`rewards.networks.arcface`) and scores the cosine of the two
L2-normalised embeddings, in [-1, 1] (1: same embedding). The evaluation metric "Deg" of
face-restoration papers is the angle between the two embeddings in degrees
(:func:`embedding_angle_degrees`, lower is better).

The backbone's weights are a local file (``checkpoint``): an arcface_torch ``backbone.pth`` state
dict, e.g. ``ms1mv3_arcface_r50_fp16/backbone.pth`` (arch ``iresnet50``) from the arcface_torch
model zoo (non-commercial research use only). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from rewards.base import Reward, RewardBatch, RewardError, register_reward
from rewards.networks.arcface import load_iresnet

__all__ = ["ARCFACE_MODEL_ZOO", "ARCFACE_SIZE", "Identity", "arcface_input", "embedding_angle_degrees"]

ARCFACE_SIZE = 112
"""Side of the aligned face an arcface_torch backbone takes."""
ARCFACE_MODEL_ZOO = (
    "https://github.com/deepinsight/insightface/tree/master/recognition/arcface_torch#model-zoo"
)


def _check_crop(crop: float) -> None:
    if not 0.0 < crop <= 1.0:
        raise ValueError(f"crop must be in (0, 1], got {crop}")


def arcface_input(images: Tensor, crop: float = 1.0) -> Tensor:
    """``[N, 3, H, W]`` faces in [-1, 1] -> the ``[N, 3, 112, 112]`` input of an arcface_torch IResNet.

    Clamps to [-1, 1] (arcface_torch's ``(x / 255 - 0.5) / 0.5`` range, RGB), keeps the centred
    ``crop`` fraction of each side, and resizes to 112x112 (bilinear, antialiased: restorations
    are usually 512 px). With ``crop=1`` the whole face is used; about 0.78 brings an FFHQ-aligned
    face (eyes 126 px apart at 512 px) to the insightface 112 px template's scale (eyes 35 px apart).
    """
    _check_crop(crop)
    height, width = images.shape[-2:]
    crop_h, crop_w = max(1, round(height * crop)), max(1, round(width * crop))
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    faces = images.clamp(-1.0, 1.0)[..., top : top + crop_h, left : left + crop_w]
    return F.interpolate(
        faces.float(), size=(ARCFACE_SIZE, ARCFACE_SIZE), mode="bilinear", align_corners=False, antialias=True
    )


def embedding_angle_degrees(a: Tensor, b: Tensor) -> Tensor:
    """Angle in degrees between embeddings ``a`` and ``b`` (``[N, D]``, any norm) -> ``[N]`` in [0, 180].

    The "Deg" identity metric, ``arccos(cos(a, b))`` in degrees (0: same direction), computed as
    ``2 atan2(|a' - b'|, |a' + b'|)`` of the unit vectors, which stays accurate near 0 and 180
    degrees where float32 ``arccos`` loses about 0.02 degrees.
    """
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    return torch.rad2deg(
        2 * torch.atan2(torch.linalg.vector_norm(a - b, dim=-1), torch.linalg.vector_norm(a + b, dim=-1))
    )


@register_reward("identity")
class Identity(Reward):
    """Cosine similarity of ArcFace embeddings of each restoration and its clean face, in [-1, 1].

    Args: ``checkpoint`` (required): path of an arcface_torch ``backbone.pth`` state dict;
    ``arch``: its IResNet (``iresnet18``/``34``/``50``/``100``/``200``, default ``iresnet50``);
    ``crop``: centred fraction of each side kept before resizing to 112 px (:func:`arcface_input`).
    The images are assumed aligned faces (both images of a pair go through the same crop, so a
    misalignment affects both alike). iresnet50 takes about 6.3 GFLOPs per face.
    """

    needs_clean = True
    resources: ClassVar[dict[str, float]] = {"num_cpus": 1.0, "num_gpus": 0.1}

    def __init__(
        self,
        device: torch.device | str = "cpu",
        *,
        checkpoint: str,
        arch: str = "iresnet50",
        crop: float = 1.0,
    ) -> None:
        super().__init__(device)
        _check_crop(crop)
        missing = self.missing_weights(checkpoint=checkpoint)
        if missing:
            raise RewardError(f"reward {self.name!r}: " + "; ".join(missing))
        self.crop = crop
        self.model = load_iresnet(checkpoint, arch).to(self.device)

    @classmethod
    def missing_weights(cls, **args: Any) -> list[str]:
        checkpoint = args.get("checkpoint")
        if checkpoint is not None and Path(checkpoint).expanduser().is_file():
            return []
        where = (
            "args.checkpoint is not set" if checkpoint is None else f"checkpoint {checkpoint} does not exist"
        )
        return [
            (
                f"ArcFace backbone: {where}; download an arcface_torch backbone.pth (e.g. "
                f"ms1mv3_arcface_r50_fp16/backbone.pth for arch iresnet50) from {ARCFACE_MODEL_ZOO}, "
                "put it on this machine and set args.checkpoint to its path"
            )
        ]

    def embed(self, images: Tensor) -> Tensor:
        """L2-normalised embeddings ``[N, D]`` of faces ``[N, 3, H, W]`` in [-1, 1] (on ``self.device``)."""
        with torch.no_grad():
            return F.normalize(self.model(arcface_input(images.to(self.device), self.crop)), dim=-1)

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        return (self.embed(images) * self.embed(batch.clean)).sum(dim=-1)

    def degrees(self, images: Tensor, clean: Tensor) -> Tensor:
        """The "Deg" metric ``[N]``: angle in degrees between the embeddings of ``images`` and ``clean``."""
        return embedding_angle_degrees(self.embed(images), self.embed(clean))
