"""Image-quality rewards: pyiqa metrics (``musiq``, ``clipiqa+``, ``maniqa``, ``topiq_nr-face``,
``niqe``, ``lpips``, ``ms_ssim``) built only from weight files already on this machine, and
``brisque`` (the ``brisque`` package, which ships its SVM).

pyiqa downloads each metric's files on construction; rlrestore never lets it. Every reward here
lists the files its metric reads (:class:`WeightFile`: what, URL, exact path), reports the absent
ones in ``missing_weights`` (so a run fails before any actor starts) and refuses to build while
any is absent. Two need nothing beyond the installed packages: ``niqe`` reads NIQE's published
pristine-image parameters vendored in this repository (``rewards/assets/niqe_pris_params.npz``,
from the basicsr 1.4.2 sdist, Apache-2.0, see ``rewards/assets/NOTICE.md``), and ``brisque``
reads the SVM shipped inside the ``brisque`` package. Where the other files go, by default
(``TORCH_HOME`` and ``HF_HOME`` move them):

- pyiqa's own weights and the facexlib face models of ``topiq_nr-face``: pyiqa's
  ``DEFAULT_CACHE_DIR``, ``$TORCH_HOME/hub/pyiqa`` (``~/.cache/torch/hub/pyiqa``; read from
  ``torch.hub.get_dir()`` once, when pyiqa is imported);
- torchvision ImageNet backbones: ``$TORCH_HOME/hub/checkpoints``;
- OpenAI CLIP models (pyiqa's copy of the ``clip`` loader, SHA-256 checked):
  ``$TORCH_HOME/hub/clip``;
- timm backbones: the Hugging Face hub cache (``$HF_HOME/hub``), e.g. via ``hf download``.

A reward's optional ``weights`` arg points at a local file to use instead of the metric's own
published weights (same format as the published file); backbone files are still needed. Each
pyiqa metric is one :class:`IqaMetric` row; one :class:`IqaReward` subclass is made per row.
"""

from __future__ import annotations

import hashlib
import importlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

import numpy as np
import torch
from torch import Tensor

from rewards.base import PyiqaReward, Reward, RewardBatch, RewardError, register_reward
from rlrestore.data.images import to_uint8

__all__ = [
    "BRISQUE",
    "LPIPS",
    "MANIQA",
    "MSSSIM",
    "MUSIQ",
    "NIQE",
    "NIQE_PARAMETERS",
    "CLIPIQAPlus",
    "IqaMetric",
    "IqaReward",
    "TOPIQFace",
    "WeightFile",
]

NIQE_PARAMETERS = Path(__file__).resolve().parent / "assets" / "niqe_pris_params.npz"
"""NIQE's published pristine-image model (mean [1, 36] and covariance [36, 36] of the NSS features),
vendored from the basicsr 1.4.2 sdist (``basicsr/metrics/niqe_pris_params.npz``, Apache-2.0)."""
_NIQE_PARAMETERS_SHA256 = "2a7c182a68c9e7f1b2e2e5ec723279d6f65d912b6fcaf37eb2bf03d7367c4296"
_BASICSR_SDIST = (
    "https://files.pythonhosted.org/packages/86/41/00a6b000f222f0fa4c6d9e1d6dcc9811a374cabb8abb9d408b77de39648c/"
    "basicsr-1.4.2.tar.gz"
)

_GPU_MODEL = {"num_cpus": 1.0, "num_gpus": 0.25}  # a network best run on a GPU, four per GPU
_CPU_STATISTIC = {"num_cpus": 0.5, "num_gpus": 0.0}  # hand-crafted statistics, CPU is fine

# facexlib hard-codes these in init_detection_model / init_parsing_model; topiq_nr-face has it
# save them to pyiqa's DEFAULT_CACHE_DIR.
_FACEXLIB_DETECTION_URL = (
    "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth"
)
_FACEXLIB_PARSING_URL = "https://github.com/xinntao/facexlib/releases/download/v0.2.2/parsing_parsenet.pth"


@dataclass(frozen=True)
class WeightFile:
    """A file a metric reads on construction: what it is, where it comes from, where it must be.

    ``path`` is the file itself, except for a file the loader reads through the Hugging Face hub
    cache (``hub_repo`` set): then ``path`` is that cache and the file is ``hub_repo``'s file named
    by the URL (or one of ``hub_alternatives``, which the loader accepts as well). ``sha256``, when
    set, must match: the loader would re-download a file whose hash differs. ``bundled``: the file
    ships with rlrestore (``url`` names where it was taken from), so it is always read from ``path``.
    """

    what: str
    url: str
    path: Path
    sha256: str | None = None
    hub_repo: str | None = None
    hub_alternatives: tuple[str, ...] = ()
    bundled: bool = False

    @property
    def filename(self) -> str:
        return _filename(self.url)

    def present(self) -> bool:
        """Whether the loader will find the file here without a download."""
        if self.hub_repo is not None:
            from huggingface_hub import try_to_load_from_cache

            return any(
                isinstance(try_to_load_from_cache(self.hub_repo, name, cache_dir=self.path), str)
                for name in (self.filename, *self.hub_alternatives)
            )
        if not self.path.is_file():
            return False
        return self.sha256 is None or _sha256(self.path) == self.sha256

    def instructions(self) -> str:
        """What is missing and how to put it in place."""
        if self.hub_repo is not None:
            return (
                f"{self.what}: not in the Hugging Face cache {self.path}; on a machine with internet run "
                f"`hf download {self.hub_repo} {self.filename}` with the same HF_HOME (source: {self.url})"
            )
        wrong = " (the file there has the wrong SHA-256)" if self.path.is_file() else ""
        if self.bundled:
            return (
                f"{self.what}: the file shipped with rlrestore is missing or changed at {self.path}{wrong}; "
                f"restore it from the repository (git checkout -- {self.path}) or reinstall rlrestore "
                f"(it was taken from {self.url})"
            )
        return f"{self.what}: download {self.url} to {self.path}{wrong}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _filename(url: str) -> str:
    return Path(urlparse(url).path).name


def _pyiqa_cache() -> Path:
    from pyiqa.utils import download_util

    return Path(download_util.DEFAULT_CACHE_DIR)


def _pyiqa_url(arch_module: str, key: str) -> str:
    """``default_model_urls[key]`` of ``pyiqa.archs.<arch_module>`` (the URL pyiqa would fetch)."""
    return importlib.import_module(f"pyiqa.archs.{arch_module}").default_model_urls[key]


def _pyiqa_file(what: str, url: str) -> WeightFile:
    """A file pyiqa's ``load_file_from_url`` keeps in its DEFAULT_CACHE_DIR under the URL's name."""
    return WeightFile(what, url, _pyiqa_cache() / _filename(url))


def _pyiqa_weights(what: str, arch_module: str, key: str) -> Callable[[], WeightFile]:
    return lambda: _pyiqa_file(what, _pyiqa_url(arch_module, key))


def _torchvision_alexnet() -> WeightFile:
    from torchvision.models import AlexNet_Weights

    url = AlexNet_Weights.IMAGENET1K_V1.url
    return WeightFile(
        "torchvision AlexNet (ImageNet)", url, Path(torch.hub.get_dir()) / "checkpoints" / _filename(url)
    )


def _clip_rn50() -> WeightFile:
    from pyiqa.archs.clip_model import _MODELS  # the URLs pyiqa's clip loader fetches

    url = _MODELS["RN50"]
    # The URL's parent directory is the file's SHA-256, which the loader checks.
    return WeightFile(
        "OpenAI CLIP RN50",
        url,
        Path(torch.hub.get_dir()) / "clip" / _filename(url),
        sha256=url.split("/")[-2],
    )


def _timm_hub_file(model_name: str) -> WeightFile:
    """The weights ``timm.create_model(model_name, pretrained=True)`` reads from the HF hub."""
    import huggingface_hub.constants
    import timm
    from huggingface_hub import hf_hub_url

    repo = timm.models.get_pretrained_cfg(model_name).hf_hub_id
    return WeightFile(
        f"timm {model_name} backbone",
        hf_hub_url(repo, "model.safetensors"),
        Path(huggingface_hub.constants.HF_HUB_CACHE),
        hub_repo=repo,
        hub_alternatives=("pytorch_model.bin",),
    )


def _load_state_dict(weight_keys: str | None) -> Callable[[Any, str], None]:
    """Load a full state dict into the metric's network, strict, as pyiqa loads the published file."""

    def load(metric: Any, path: str) -> None:
        metric.load_weights(path, weight_keys=weight_keys)

    return load


def _load_clipiqa_prompts(metric: Any, path: str) -> None:
    """CLIP-IQA+'s weights are its learned prompt context tensor (pyiqa sets ``prompt_learner.ctx``)."""
    context = metric.net.prompt_learner.ctx
    context.data.copy_(torch.load(path, map_location="cpu", weights_only=True))


@dataclass(frozen=True)
class IqaMetric:
    """How one pyiqa metric becomes a reward, and which files it reads.

    ``own_weights``: the metric's published weights (what the reward's ``weights`` arg replaces),
    None for a metric without any; ``backbones``: other files it always reads. Both are
    functions, so that pyiqa/timm are imported only when files are checked. ``options``: pyiqa
    metric options always passed. ``load_weights``: how a local ``weights`` file is loaded when
    pyiqa's ``pretrained_model_path`` option would read it differently from the published file
    (the metric is then built with ``pretrained=False`` and this loads the file);
    ``weights_options``: the pyiqa options that make it read a local file in another format;
    None for both passes the file as ``pretrained_model_path``. A ``bundled`` own file is passed
    the same way, always. ``min_size``: smallest image side the metric can score.
    """

    name: str
    doc: str
    needs_clean: bool = False
    higher_is_better: bool = True
    resources: dict[str, float] = field(default_factory=lambda: dict(_GPU_MODEL))
    own_weights: Callable[[], WeightFile] | None = None
    backbones: Callable[[], list[WeightFile]] = list
    options: dict[str, Any] = field(default_factory=dict)
    load_weights: Callable[[Any, str], None] | None = None
    weights_options: Callable[[str], dict[str, Any]] | None = None
    min_size: int = 1


class IqaReward(PyiqaReward):
    """A pyiqa metric described by an :class:`IqaMetric`; ``weights``: optional local file
    replacing the metric's own published weights (same format)."""

    metric_spec: ClassVar[IqaMetric]

    def __init__(self, device: torch.device | str = "cpu", weights: str | None = None) -> None:
        spec = self.metric_spec
        if weights is not None and spec.own_weights is None:
            raise ValueError(f"reward {self.name!r} has no weight file; remove 'weights' from its args")
        missing = self.missing_weights(weights=weights)
        if missing:
            raise RewardError(
                f"reward {self.name!r} cannot be built: files are missing (rlrestore never downloads them):\n"
                + "\n".join(f"- {item}" for item in missing)
            )
        if weights is None and spec.own_weights is not None and spec.own_weights().bundled:
            weights = str(spec.own_weights().path)
        options = dict(spec.options)
        if weights is not None:
            if spec.load_weights is not None:
                options["pretrained"] = False
            elif spec.weights_options is not None:
                options.update(spec.weights_options(weights))
            else:
                options["pretrained_model_path"] = weights
        super().__init__(device, **options)
        if weights is not None and spec.load_weights is not None:
            spec.load_weights(self.metric, weights)

    @classmethod
    def weight_files(cls, weights: str | None = None) -> list[WeightFile]:
        """Every file the metric reads (its own weights unless ``weights`` replaces them)."""
        spec = cls.metric_spec
        own = [spec.own_weights()] if spec.own_weights is not None and weights is None else []
        return own + spec.backbones()

    @classmethod
    def missing_weights(cls, **args: Any) -> list[str]:
        weights = args.get("weights")
        missing = [item.instructions() for item in cls.weight_files(weights) if not item.present()]
        if weights is not None and cls.metric_spec.own_weights is not None and not Path(weights).is_file():
            missing.insert(0, f"{cls.name} weights given in args.weights: {weights} does not exist")
        return missing


def _iqa_reward(class_name: str, spec: IqaMetric) -> type[IqaReward]:
    """The registered :class:`IqaReward` subclass of ``spec`` (named ``class_name`` in this module)."""
    attributes = {
        "__doc__": spec.doc,
        "__module__": __name__,
        "__qualname__": class_name,
        "metric_name": spec.name,
        "metric_spec": spec,
        "needs_clean": spec.needs_clean,
        "higher_is_better": spec.higher_is_better,
        "resources": spec.resources,
        "min_size": spec.min_size,
    }
    return register_reward(spec.name)(type(class_name, (IqaReward,), attributes))


MUSIQ = _iqa_reward(
    "MUSIQ",
    IqaMetric(
        name="musiq",
        doc="""MUSIQ (multi-scale image quality transformer) trained on KonIQ-10k; predicted MOS,
        about 0-100, higher is better. Multi-scale: the image is also resized to 224 and 384 px
        on its longer side, so its cost hardly depends on the input size.""",
        own_weights=_pyiqa_weights("MUSIQ KonIQ-10k checkpoint", "musiq_arch", "koniq10k"),
    ),
)

CLIPIQAPlus = _iqa_reward(
    "CLIPIQAPlus",
    IqaMetric(
        name="clipiqa+",
        doc="""CLIP-IQA+: OpenAI CLIP RN50 with learned antonym prompts (good/bad, sharp/blurry,
        ...); probability of the positive prompts, in [0, 1], higher is better. ``weights``: a
        learned prompt context tensor in the format of ``CLIP-IQA+_learned_prompts-*.pth``.""",
        own_weights=_pyiqa_weights("CLIP-IQA+ learned prompts", "clipiqa_arch", "clipiqa+"),
        backbones=lambda: [_clip_rn50()],
        load_weights=_load_clipiqa_prompts,
    ),
)

MANIQA = _iqa_reward(
    "MANIQA",
    IqaMetric(
        name="maniqa",
        doc="""MANIQA (multi-dimension attention on ViT-B/8 features) trained on KonIQ-10k; about
        [0, 1], higher is better. Averages 20 uniformly placed 224 px crops (images of 224 px or
        less are upscaled first): 20 ViT-B/8 passes per image, so run it on a GPU. pyiqa always
        builds the timm ViT-B/8 with ImageNet weights before loading the MANIQA checkpoint over
        them, so both files are needed. ``weights``: a full MANIQA state dict like
        ``ckpt_koniq10k.pt``.""",
        own_weights=_pyiqa_weights("MANIQA KonIQ-10k checkpoint", "maniqa_arch", "koniq"),
        backbones=lambda: [_timm_hub_file("vit_base_patch8_224")],
        load_weights=_load_state_dict(weight_keys=None),
    ),
)

TOPIQFace = _iqa_reward(
    "TOPIQFace",
    IqaMetric(
        name="topiq_nr-face",
        doc="""TOPIQ no-reference face quality (ResNet-50 CFANet trained on the CGFIQA-40k
        faces); about [0, 1], higher is better; images are resized to 512 px. Our faces are
        already aligned crops, so pyiqa's facexlib re-alignment (which takes one image per
        call) is off (``align_crop_face=False``); facexlib's face detector and parser are
        still loaded by pyiqa on construction, so their files are needed. The checkpoint holds
        the ResNet-50 too, so no ImageNet backbone is read (``backbone_pretrain=False``).
        ``weights``: a full CFANet state dict under ``params``, like the published file.""",
        own_weights=_pyiqa_weights("TOPIQ-NR face checkpoint", "topiq_arch", "topiq_nr_cgfiqa_res50"),
        backbones=lambda: [
            _pyiqa_file("facexlib RetinaFace-R50 face detector", _FACEXLIB_DETECTION_URL),
            _pyiqa_file("facexlib ParseNet face parser", _FACEXLIB_PARSING_URL),
        ],
        options={"backbone_pretrain": False, "align_crop_face": False},
        load_weights=_load_state_dict(weight_keys="params"),
    ),
)


def _niqe_parameters() -> WeightFile:
    return WeightFile(
        "NIQE pristine-image parameters (basicsr 1.4.2 basicsr/metrics/niqe_pris_params.npz)",
        _BASICSR_SDIST,
        NIQE_PARAMETERS,
        sha256=_NIQE_PARAMETERS_SHA256,
        bundled=True,
    )


def _niqe_options(path: str) -> dict[str, Any]:
    """pyiqa's NIQE reads its parameters with ``scipy.io.loadmat`` (keys ``mu_prisparam``,
    ``cov_prisparam``): a ``.mat`` file is passed as is; basicsr's ``.npz`` (``mu_pris_param``
    [1, 36], ``cov_pris_param`` [36, 36]) is rewritten as such a file in memory."""
    if Path(path).suffix != ".npz":
        return {"pretrained_model_path": path}
    import scipy.io

    with np.load(path) as stored:
        shapes = {key: stored[key].shape for key in stored.files}
        if shapes.get("mu_pris_param") != (1, 36) or shapes.get("cov_pris_param") != (36, 36):
            raise RewardError(
                f"{path} does not hold NIQE parameters in basicsr's layout: expected mu_pris_param (1, 36) "
                f"and cov_pris_param (36, 36), found {shapes}"
            )
        matlab = {"mu_prisparam": stored["mu_pris_param"], "cov_prisparam": stored["cov_pris_param"]}
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, matlab)
    buffer.seek(0)
    return {"pretrained_model_path": buffer}


NIQE = _iqa_reward(
    "NIQE",
    IqaMetric(
        name="niqe",
        doc="""NIQE (natural image quality evaluator) on the luma: distance of the image's
        natural-scene statistics from a pristine-image model; lower is better, so the reward is
        ``-NIQE``. pyiqa's own ``niqe`` with NIQE's published pristine parameters, vendored
        (:data:`NIQE_PARAMETERS`): it works offline out of the box. Works on 96x96 blocks:
        images need at least 96 px per side, and the score is stable only with several blocks
        (192 px and up; one 96 px block at 128 px makes it noisy). CPU-only statistics, float64.
        ``weights``: another parameter file, pyiqa's ``.mat`` layout or basicsr's ``.npz``.""",
        higher_is_better=False,
        resources=dict(_CPU_STATISTIC),
        own_weights=_niqe_parameters,
        weights_options=_niqe_options,
        min_size=96,
    ),
)


@register_reward("brisque")
class BRISQUE(Reward):
    """BRISQUE (Mittal et al., 2012) as the ``brisque`` 0.2.0 package computes it: 36 natural-scene
    statistics of the grey image at full and half scale, scaled with the package's feature ranges,
    fed to the RBF support-vector regressor it ships (``brisque/models/svm.txt``, libsvm). About
    0-100 (very clean images can go slightly below 0); lower is better, so the reward is
    ``-BRISQUE``. Images are scored as they are saved (8-bit RGB), at least 32 px per side; a flat
    image scores NaN (its statistics are undefined). CPU-only statistics, about 0.4 s at 512 px.

    The package's ``BRISQUE.score`` fails on numpy 2 (it calls ``float`` on one-element arrays among
    its features); this reward calls the same feature and prediction methods and flattens the
    features first, without touching the installed package.
    """

    higher_is_better = False
    # at 24 px and below the features degenerate (a face scores the SVM's constant, 155.8)
    min_size: ClassVar[int] = 32
    resources: ClassVar[dict[str, float]] = dict(_CPU_STATISTIC)

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        try:
            from brisque import BRISQUE as PackageBRISQUE
        except ImportError as exc:
            raise RewardError(
                f"reward 'brisque' needs the brisque package ({exc}); run `pip install brisque==0.2.0`"
            ) from exc
        self.model = PackageBRISQUE(url=False)

    def brisque(self, image: np.ndarray) -> float:
        """BRISQUE of one ``HxWx3`` uint8 image (the steps of the package's ``BRISQUE.score``)."""
        import cv2
        import skimage.color

        grey = skimage.color.rgb2gray(image)
        half = cv2.resize(grey, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
        features = [
            self.model.calculate_brisque_features(level, kernel_size=7, sigma=7 / 6) for level in (grey, half)
        ]
        flat = np.array([np.ravel(value)[0] for value in np.concatenate(features)], dtype=np.float64)
        return float(self.model.calculate_image_quality_score(flat))

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        return torch.tensor([self.brisque(to_uint8(image)) for image in images], dtype=torch.float64)


LPIPS = _iqa_reward(
    "LPIPS",
    IqaMetric(
        name="lpips",
        doc="""LPIPS v0.1 (AlexNet) perceptual distance to the clean face; 0 for identical images,
        lower is better, so the reward is ``-LPIPS``. The published file holds only the linear
        layers; the AlexNet features come from torchvision's ImageNet weights.""",
        needs_clean=True,
        higher_is_better=False,
        resources={"num_cpus": 1.0, "num_gpus": 0.1},
        own_weights=_pyiqa_weights("LPIPS v0.1 AlexNet linear layers", "lpips_arch", "0.1_alex"),
        backbones=lambda: [_torchvision_alexnet()],
    ),
)

MSSSIM = _iqa_reward(
    "MSSSIM",
    IqaMetric(
        name="ms_ssim",
        doc="""Multi-scale SSIM to the clean face on the luma (pyiqa ``ms_ssim``), in [0, 1], higher
        is better; no weights. Five scales, each halving the image, with an 11x11 window at the
        coarsest: images need at least 161 px per side (smaller ones raise a ValueError rather
        than being resized). Very dissimilar images can score NaN (a negative contrast term
        raised to a fractional power); the aggregator drops those samples. float64 on CPU.""",
        needs_clean=True,
        resources=dict(_CPU_STATISTIC),
        min_size=161,
    ),
)
