"""Landmark distance (LMD): do the restoration's facial landmarks sit where the clean face's do?

``lmd`` detects the 98 WFLW landmarks of each restoration and of its clean face with facexlib's
AWing FAN (:mod:`rewards.networks.awing`; the detector of face-restoration papers' LMD, e.g. VQFR's
``scripts/metrics/calculate_landmark_distance.py``) and
scores the mean over landmarks of the Euclidean distance between corresponding points, in pixels
of the images as given (the eval images are 512x512, the scale the papers report LMD at; a
256 px face gives half the distance for the same misplacement). Lower is better, so the reward's
scores are the negated distances (``Reward.__call__``) and ``rlrestore eval`` reports the raw
distance. Each face goes through facexlib's preprocessing (8-bit, resized to 256x256, RGB / 255:
:func:`rewards.networks.awing.fan_input`, identical to OpenCV's resize for 256, 512 and 1024 px
faces), so the numbers are those of that script on the saved PNGs.

Weights: facexlib's ``alignment_WFLW_4HG.pth`` (:data:`AWING_URL`; facexlib's own loader reads
``torch.load(path)['state_dict']``; a bare state dict is accepted too). ``args.checkpoint`` names
the file; by default it is ``$TORCH_HOME/hub/checkpoints/alignment_WFLW_4HG.pth``
(``torch.hub.get_dir()``, i.e. ``~/.cache/torch/hub/checkpoints`` unless ``TORCH_HOME`` is set),
where ``torch.hub.download_url_to_file(AWING_URL, path)`` on a machine with internet puts it; a copy
facexlib downloaded (``facexlib/weights/alignment_WFLW_4HG.pth``) works as ``args.checkpoint``.
Nothing is downloaded at run time. The file is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from rewards.base import Reward, RewardBatch, RewardError, register_reward, to_unit_range
from rewards.networks.awing import FAN

__all__ = ["AWING_FILENAME", "AWING_URL", "LandmarkDistance", "default_awing_path", "load_awing_fan"]

AWING_URL = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/alignment_WFLW_4HG.pth"
"""facexlib's AWing FAN weights (98 WFLW landmarks, 4 hourglasses), as ``init_alignment_model`` fetches them."""
AWING_FILENAME = "alignment_WFLW_4HG.pth"


def default_awing_path() -> Path:
    """Where ``lmd`` looks without ``args.checkpoint``: ``torch.hub.get_dir()/checkpoints/alignment_WFLW_4HG.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / AWING_FILENAME


def load_awing_fan(checkpoint: str | Path) -> FAN:
    """The AWing FAN stored at ``checkpoint``, in eval mode on CPU (keys loaded with ``strict=True``).

    The file holds ``{'state_dict': ...}`` (facexlib's layout) or the state dict itself. The
    architecture (hourglasses, their depth, width, landmark count) is read from the keys and shapes,
    so the published file builds the 4-hourglass 98-landmark network and a test's tiny file its own.
    """
    try:
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{checkpoint} holds objects other than tensors and plain containers, which rlrestore does "
            f"not unpickle (torch.load weights_only=True): {exc}"
        ) from exc
    state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    required = ("m0.coordconv.conv.weight", "l0.weight")
    if not isinstance(state_dict, dict) or not all(key in state_dict for key in required):
        raise ValueError(
            f"{checkpoint} is not an AWing FAN checkpoint (no {' / '.join(required)} in it or in its "
            f"'state_dict'); expected facexlib's {AWING_FILENAME} from {AWING_URL}"
        )
    modules = {int(m.group(1)) for key in state_dict if (m := re.match(r"m(\d+)\.coordconv\.", key))}
    depths = {int(m.group(1)) for key in state_dict if (m := re.match(r"m0\.b1_(\d+)\.", key))}
    model = FAN(
        num_modules=max(modules) + 1,
        num_landmarks=state_dict["l0.weight"].shape[0] - 1,
        hourglass_depth=max(depths, default=4),
        width=state_dict["m0.coordconv.conv.weight"].shape[0],
    )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{checkpoint} does not match the AWing FAN architecture: {exc}") from exc
    return model.eval()


@register_reward("lmd")
class LandmarkDistance(Reward):
    """Mean Euclidean distance in pixels between the 98 AWing FAN landmarks of each image and of its
    clean face (the LMD metric); lower is better (scores are negated by ``Reward.__call__``).

    Args: ``checkpoint``: path of facexlib's ``alignment_WFLW_4HG.pth`` (default
    :func:`default_awing_path`). Images and clean faces must have the same size; any size works
    (each is resized to 256x256 for the network, its landmarks are scaled back). The network takes
    about 25 GMACs per face and each pair costs two faces.
    """

    needs_clean = True
    higher_is_better = False
    resources: ClassVar[dict[str, float]] = {"num_cpus": 1.0, "num_gpus": 0.1}

    def __init__(self, device: torch.device | str = "cpu", *, checkpoint: str | None = None) -> None:
        super().__init__(device)
        missing = self.missing_weights(checkpoint=checkpoint)
        if missing:
            raise RewardError(f"reward {self.name!r}: " + "; ".join(missing))
        self.checkpoint = _checkpoint_path(checkpoint)
        self.model = load_awing_fan(self.checkpoint).to(self.device)

    @classmethod
    def missing_weights(cls, *, checkpoint: str | None = None) -> list[str]:
        path = _checkpoint_path(checkpoint)
        if path.is_file():
            return []
        what = f"AWing FAN face-landmark model ({AWING_FILENAME})"
        if checkpoint is None:
            return [
                (
                    f"{what}: not at its default location {path}; download {AWING_URL} to {path}, "
                    "or set args.checkpoint to a local copy"
                )
            ]
        return [f"{what}: args.checkpoint {path} does not exist; download {AWING_URL} to {path}"]

    def landmarks(self, images: Tensor) -> Tensor:
        """Landmarks ``[N, 98, 2]`` (x, y in pixels of the image) of faces ``[N, 3, H, W]`` in [-1, 1]."""
        with torch.no_grad():
            return self.model.get_landmarks(to_unit_range(images.to(self.device)))

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        if batch.clean.shape != images.shape:
            raise ValueError(
                f"reward {self.name!r}: clean faces {tuple(batch.clean.shape)} and images "
                f"{tuple(images.shape)} must have the same shape"
            )
        points = self.landmarks(torch.cat([images, batch.clean]))
        restored, clean = points.split(images.shape[0])
        return torch.linalg.vector_norm(restored - clean, dim=-1).mean(dim=-1)


def _checkpoint_path(checkpoint: str | Path | None) -> Path:
    return default_awing_path() if checkpoint is None else Path(checkpoint).expanduser()
