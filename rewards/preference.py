"""Preference rewards: HPSv2 / HPSv2.1, PickScore, CLIP score and CLIP image similarity.

Each scores faces with a CLIP model: HPSv2 with open_clip (``ViT-H-14`` and the HPS checkpoint),
the others with transformers' ``CLIPModel``. All preprocess on the reward's device, in torch:
[-1, 1] -> [0, 1], resize the short side with the model's interpolation (antialiased, as PIL
does), clamp to [0, 1] (the references see uint8 images), centre-crop, normalise
(:class:`ImageTransform`). The text rewards score each face against its caption, or against
the reward's ``prompt`` when the caption is empty (:func:`texts_for`).

Weights are read from a local path or the Hugging Face cache only; ``missing_weights`` lists
what is absent without building anything, and construction refuses to start without it.
open_clip and transformers are imported on construction, so importing this module is cheap.

Score scales differ (weight them accordingly in ``stage2.rewards``): HPSv2 and cosine CLIP
scores are cosines (about 0.2-0.35 for matching image-text pairs), PickScore is
``logit_scale.exp()`` (100) times a cosine (about 18-23).

Precision: all four set ``autocast = True``. Under ``precision: bf16-mixed`` (or fp16-mixed) the
reward actor runs them inside ``torch.autocast``: the ViT-H/L towers' matmuls in bf16 (most of a
Stage 2 step's reward time), weights, layer norms and softmax in float32 (their ``dtype`` arg,
float32 by default, still sets the weights), and the cosine of the L2-normalised features in
float32. The HPSv2 reference itself scores under (fp16) autocast. As evaluation metrics (``rlrestore
eval``) they always run in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from rewards.base import Reward, RewardBatch, RewardError, register_reward, to_unit_range
from rlrestore.models.loading import is_available, resolve_dtype

if TYPE_CHECKING:
    from torchvision.transforms import InterpolationMode
    from transformers.image_processing_utils import BaseImageProcessor

__all__ = [
    "DEFAULT_PROMPT",
    "HPS_CHECKPOINTS",
    "HPS_REPO",
    "CLIPScore",
    "CLIPScoreImage",
    "HPSv2",
    "ImageTransform",
    "PickScore",
    "TransformersCLIPReward",
    "encode_unique",
    "texts_for",
]

DEFAULT_PROMPT = "a high-quality photo of a human face"
HPS_REPO = "xswu/HPSv2"
HPS_CHECKPOINTS = {"v2": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
_HPS_VERSION = "v2.1"
_HPS_MODEL = "ViT-H-14"
# Files a transformers CLIP directory / hub repo needs; each tuple lists alternatives.
_CLIP_MODEL_FILES = (("config.json",), ("model.safetensors", "pytorch_model.bin"))
_CLIP_PROCESSOR_FILES = (
    ("preprocessor_config.json", "processor_config.json"),
    ("tokenizer.json", "vocab.json"),
)
_GIB = 2**30


def texts_for(batch: RewardBatch, prompt: str) -> list[str]:
    """The text of each sample: its caption, or ``prompt`` when the caption is empty or blank."""
    return [caption if caption.strip() else prompt for caption in batch.captions]


def encode_unique(texts: Sequence[str], encode: Callable[[list[str]], Tensor]) -> Tensor:
    """``encode(texts)`` row for row, encoding each distinct text once (a group's candidates share a caption)."""
    unique = list(dict.fromkeys(texts))
    features = encode(unique)
    index = {text: row for row, text in enumerate(unique)}
    return features[torch.tensor([index[text] for text in texts], device=features.device)]


def _torch_dtype(name: str) -> torch.dtype:
    try:
        return resolve_dtype(name)
    except KeyError:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16, got {name!r}") from None


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _missing_files(key: str, source: str, groups: Sequence[tuple[str, ...]]) -> list[str]:
    """One entry naming the files of ``source`` (local directory or hub id) that no alternative provides."""
    local = Path(source).expanduser()
    if source.startswith((".", "/", "~")) and not local.is_dir():
        return [
            f"args.{key}: directory {source!r} does not exist (a save_pretrained directory or a Hugging Face id)"
        ]
    missing = [
        " or ".join(group) for group in groups if not any(is_available(source, name) for name in group)
    ]
    if not missing:
        return []
    if local.is_dir():
        return [f"args.{key}: {', '.join(missing)} missing in directory {source!r}"]
    hint = (
        f"args.{key}: {', '.join(missing)} of {source!r} not in the Hugging Face cache ({_hub_cache()}); "
        f"on a machine with internet run `hf download {source}` with the same HF_HOME, or set args.{key} "
        "to a local directory holding the files"
    )
    return [hint]


def _require_weights(reward: type[Reward], missing: list[str]) -> None:
    if missing:
        raise RewardError(
            f"reward {reward.name!r} cannot be built, its weights are missing (nothing is downloaded "
            "at run time):\n" + "\n".join(f"- {item}" for item in missing)
        )


@dataclass(frozen=True)
class ImageTransform:
    """A CLIP eval transform on [-1, 1] tensors: resize, clamp, centre-crop, normalise.

    ``resize``: an int resizes the short side to it (long side ``int(resize * long / short)``, as
    torchvision and transformers do), ``(h, w)`` resizes to that size, None keeps the size.
    ``crop``: centre crop ``(h, w)`` (torchvision rounding of the offset), None for none.
    Returns float32 ``[N, 3, crop_h, crop_w]``.
    """

    resize: int | tuple[int, int] | None
    crop: tuple[int, int] | None
    interpolation: InterpolationMode
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: Tensor) -> Tensor:
        from torchvision.transforms.v2 import functional as TF

        pixels = to_unit_range(images).float()
        if self.resize is not None:
            size = [self.resize] if isinstance(self.resize, int) else list(self.resize)
            pixels = TF.resize(pixels, size, interpolation=self.interpolation, antialias=True).clamp(0.0, 1.0)
        if self.crop is not None:
            pixels = TF.center_crop(pixels, list(self.crop))
        return TF.normalize(pixels, list(self.mean), list(self.std))

    @classmethod
    def from_open_clip(cls, config: dict[str, Any]) -> ImageTransform:
        """From an open_clip preprocess config (``open_clip.get_model_preprocess_cfg``): its eval transform.

        Only the ``shortest`` resize mode with a square size (every OpenAI/LAION ViT, HPSv2
        included) is supported: resize the short side to the size, then centre-crop it.
        """
        from torchvision.transforms import InterpolationMode

        size = config["size"]
        height, width = (size, size) if isinstance(size, int) else size
        if config.get("resize_mode", "shortest") != "shortest" or height != width:
            raise ValueError(
                f"open_clip preprocessing {config} is not supported: need resize_mode 'shortest' and a square size"
            )
        interpolation = (
            InterpolationMode.BILINEAR if config["interpolation"] == "bilinear" else InterpolationMode.BICUBIC
        )
        return cls(height, (height, width), interpolation, tuple(config["mean"]), tuple(config["std"]))

    @classmethod
    def from_image_processor(cls, processor: BaseImageProcessor) -> ImageTransform:
        """From a transformers CLIP image processor: its size, crop, resample, mean and std."""
        from transformers.image_utils import PILImageResampling, pil_torch_interpolation_mapping

        size = processor.size
        if not processor.do_resize:
            resize = None
        elif size.shortest_edge and not size.longest_edge:
            resize = size.shortest_edge
        elif size.height and size.width:
            resize = (size.height, size.width)
        else:
            raise ValueError(
                f"image processor size {size} is not supported: need shortest_edge or height and width"
            )
        crop = (processor.crop_size.height, processor.crop_size.width) if processor.do_center_crop else None
        mean, std = (
            (processor.image_mean, processor.image_std)
            if processor.do_normalize
            else ((0.0,) * 3, (1.0,) * 3)
        )
        interpolation = pil_torch_interpolation_mapping[PILImageResampling(processor.resample)]
        return cls(resize, crop, interpolation, tuple(mean), tuple(std))


@register_reward("hpsv2")
class HPSv2(Reward):
    """Human Preference Score v2 / v2.1: cosine of HPS-tuned open_clip ViT-H-14 image and text features.

    Follows the reference ``hpsv2.score`` (github.com/tgxs002/HPSv2, ``img_score.py``): open_clip
    ``ViT-H-14`` loaded with the ``{'state_dict': ...}`` checkpoint of ``version``
    (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` of the hub repo ``xswu/HPSv2``, or the
    file ``checkpoint``), OpenAI mean/std, 224 px bicubic short-side resize and centre crop
    (read from the model's preprocess config), text tokenised by open_clip's own BPE tokenizer
    (shipped with open_clip). The reference returns the diagonal of
    ``image_features @ text_features.T`` of the L2-normalised features, with no logit scale: the
    score is that cosine, about 0.2-0.35. The reference runs under fp16 autocast; ``dtype``
    picks the precision here (float32 by default).

    ``model_config`` (an open_clip model config: ``embed_dim``, ``vision_cfg``, ``text_cfg``)
    replaces the architecture of ``model_name``; tests build a tiny model this way.
    """

    resources: ClassVar[dict[str, float]] = {"num_cpus": 1.0, "num_gpus": 0.25, "memory": 8 * _GIB}
    autocast: ClassVar[bool] = True

    def __init__(
        self,
        device: torch.device | str = "cpu",
        version: Literal["v2", "v2.1"] = _HPS_VERSION,
        checkpoint: str | None = None,
        model_name: str = _HPS_MODEL,
        model_config: dict[str, Any] | None = None,
        prompt: str = DEFAULT_PROMPT,
        dtype: str = "float32",
    ) -> None:
        super().__init__(device)
        _require_weights(type(self), self.missing_weights(version=version, checkpoint=checkpoint))
        self.dtype = _torch_dtype(dtype)
        self.prompt = prompt
        path = self.checkpoint_path(version, checkpoint)
        import open_clip

        try:
            # A file path as `pretrained`: open_clip's own loader (torch.load with weights_only,
            # strict load_state_dict of checkpoint['state_dict']); no tag, so nothing is downloaded.
            model = open_clip.create_model(model_name, pretrained=path, **(model_config or {}))
        except (RuntimeError, OSError, ValueError, TypeError) as exc:
            raise RewardError(
                f"cannot build open_clip {model_name!r} from checkpoint {path!r}: {exc}"
            ) from None
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name, context_length=model.context_length)
        self.transform = ImageTransform.from_open_clip(open_clip.get_model_preprocess_cfg(model))

    @staticmethod
    def checkpoint_path(version: str, checkpoint: str | None) -> str | None:
        """The checkpoint file: ``checkpoint`` if given, else the cached file of ``version`` (None if absent)."""
        if version not in HPS_CHECKPOINTS:
            raise ValueError(f"HPS version must be one of {sorted(HPS_CHECKPOINTS)}, got {version!r}")
        if checkpoint is not None:
            path = Path(checkpoint).expanduser()
            return str(path.resolve()) if path.is_file() else None
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(HPS_REPO, HPS_CHECKPOINTS[version])
        return cached if isinstance(cached, str) else None

    @classmethod
    def missing_weights(
        cls, version: str = _HPS_VERSION, checkpoint: str | None = None, **args: Any
    ) -> list[str]:
        if cls.checkpoint_path(version, checkpoint) is not None:
            return []
        filename = HPS_CHECKPOINTS[version]
        if checkpoint is not None:
            hint = (
                f"args.checkpoint: file {checkpoint!r} does not exist; get it with "
                f"`hf download {HPS_REPO} {filename} --local-dir DIR`"
            )
        else:
            hint = (
                f"{filename} of {HPS_REPO!r} not in the Hugging Face cache ({_hub_cache()}); on a machine "
                f"with internet run `hf download {HPS_REPO} {filename}` with the same HF_HOME, or set "
                "args.checkpoint to a local copy"
            )
        return [hint]

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        image_features = self.model.encode_image(self.transform(images).to(self.dtype), normalize=True)

        def encode(texts: list[str]) -> Tensor:
            return self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True)

        text_features = encode_unique(texts_for(batch, self.prompt), encode)
        return (image_features.float() * text_features.float()).sum(dim=-1)


class TransformersCLIPReward(Reward):
    """Base of the transformers ``CLIPModel`` rewards: loading, preprocessing, normalised features.

    ``model`` (the ``CLIPModel``) and ``processor`` (its ``CLIPImageProcessor`` and
    ``CLIPTokenizer``) are Hugging Face ids (read from the local cache) or local directories,
    loaded with ``local_files_only=True``; ``processor`` defaults to ``model``.
    Images go through the processor's own image config applied to tensors
    (:meth:`ImageTransform.from_image_processor`); text through its tokenizer (padded,
    truncated to the text tower's ``max_position_embeddings``, 77). transformers 5 returns a
    ``BaseModelOutputWithPooling`` from ``get_image_features``/``get_text_features``: the
    projected embedding is its ``pooler_output``.
    """

    default_model: ClassVar[str]
    default_processor: ClassVar[str | None] = None
    autocast: ClassVar[bool] = True

    def __init__(
        self,
        device: torch.device | str = "cpu",
        model: str | None = None,
        processor: str | None = None,
        dtype: str = "float32",
    ) -> None:
        super().__init__(device)
        model_source, processor_source = self.sources(model, processor)
        _require_weights(type(self), self.missing_weights(model=model, processor=processor))
        self.dtype = _torch_dtype(dtype)
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        try:
            clip = CLIPModel.from_pretrained(model_source, local_files_only=True, dtype=self.dtype)
        except (OSError, ValueError) as exc:
            raise RewardError(f"cannot load CLIPModel from {model_source!r}: {exc}") from None
        try:
            # The processor's two parts, loaded directly: AutoTokenizer (inside CLIPProcessor)
            # would also require the processor source to hold a model config.json.
            self.image_processor = CLIPImageProcessor.from_pretrained(processor_source, local_files_only=True)
            self.tokenizer = CLIPTokenizer.from_pretrained(processor_source, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise RewardError(f"cannot load the CLIP processor from {processor_source!r}: {exc}") from None
        self.model = clip.to(self.device).eval().requires_grad_(False)
        self.transform = ImageTransform.from_image_processor(self.image_processor)
        self.max_length = clip.config.text_config.max_position_embeddings

    @classmethod
    def sources(cls, model: str | None, processor: str | None) -> tuple[str, str]:
        """The model and processor sources after defaults (processor: ``default_processor``, else the model)."""
        model_source = model or cls.default_model
        return model_source, processor or cls.default_processor or model_source

    @classmethod
    def missing_weights(
        cls, model: str | None = None, processor: str | None = None, **args: Any
    ) -> list[str]:
        model_source, processor_source = cls.sources(model, processor)
        if processor_source == model_source:
            return _missing_files("model", model_source, _CLIP_MODEL_FILES + _CLIP_PROCESSOR_FILES)
        return _missing_files("model", model_source, _CLIP_MODEL_FILES) + _missing_files(
            "processor", processor_source, _CLIP_PROCESSOR_FILES
        )

    def image_features(self, images: Tensor) -> Tensor:
        """L2-normalised float32 image embeddings ``[N, D]`` of ``[N, 3, H, W]`` images in [-1, 1]."""
        output = self.model.get_image_features(pixel_values=self.transform(images).to(self.dtype))
        return F.normalize(output.pooler_output.float(), dim=-1)

    def text_features(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised float32 text embeddings ``[N, D]``, one per text (each distinct text encoded once)."""

        def encode(unique: list[str]) -> Tensor:
            tokens = self.tokenizer(
                unique, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            return F.normalize(self.model.get_text_features(**tokens).pooler_output.float(), dim=-1)

        return encode_unique(texts, encode)


@register_reward("pickscore")
class PickScore(TransformersCLIPReward):
    """PickScore: ``logit_scale.exp() * cosine`` of PickScore_v1 image and caption embeddings.

    Follows the reference of the model card (huggingface.co/yuvalkirstain/PickScore_v1):
    ``CLIPModel`` ``yuvalkirstain/PickScore_v1`` (a fine-tuned CLIP ViT-H/14) with the processor
    of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (224 px bicubic short side, centre crop,
    OpenAI mean/std); the score is ``logit_scale.exp() * (text_emb @ image_emb)`` of the
    normalised embeddings, about 18-23, divided by ``divisor``. Flow-GRPO's scorer, which
    DiffusionNFT reuses, divides by 26 to bring it to the scale of HPSv2 and CLIP cosines
    (about 0.2-0.35): ``configs/prefrestore.yaml`` sets ``divisor: 26`` so that its 1/1/1 weights
    balance; the default 1 reports the raw PickScore (as evaluation tables do). The text is the
    caption, else ``prompt``.
    """

    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    resources: ClassVar[dict[str, float]] = {"num_cpus": 1.0, "num_gpus": 0.25, "memory": 8 * _GIB}

    def __init__(
        self,
        device: torch.device | str = "cpu",
        model: str | None = None,
        processor: str | None = None,
        prompt: str = DEFAULT_PROMPT,
        divisor: float = 1.0,
        dtype: str = "float32",
    ) -> None:
        if not divisor > 0:
            raise ValueError(f"divisor must be > 0, got {divisor}")
        super().__init__(device, model, processor, dtype)
        self.prompt = prompt
        self.divisor = divisor

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        cosine = (self.image_features(images) * self.text_features(texts_for(batch, self.prompt))).sum(dim=-1)
        return self.model.logit_scale.exp().float() * cosine / self.divisor


@register_reward("clipscore")
class CLIPScore(TransformersCLIPReward):
    """CLIP image-text score of each face and its caption (else ``prompt``), ``openai/clip-vit-large-patch14`` by default.

    ``form="cosine"`` (default) is the cosine of the normalised CLIP embeddings, on the scale of
    HPSv2 (Flow-GRPO's ``ClipScorer`` returns ``logits_per_image / 30``, i.e. 100/30 times it).
    ``form="clip_score"`` is the CLIPScore metric as torchmetrics reports it,
    ``max(100 * cosine, 0)`` (Hessel et al. 2021 with w = 100). Any CLIP id or directory works
    as ``model``; its own processor is used unless ``processor`` is given.
    """

    default_model = "openai/clip-vit-large-patch14"
    resources: ClassVar[dict[str, float]] = {"num_cpus": 1.0, "num_gpus": 0.125, "memory": 4 * _GIB}

    def __init__(
        self,
        device: torch.device | str = "cpu",
        model: str | None = None,
        processor: str | None = None,
        prompt: str = DEFAULT_PROMPT,
        form: Literal["cosine", "clip_score"] = "cosine",
        dtype: str = "float32",
    ) -> None:
        if form not in ("cosine", "clip_score"):
            raise ValueError(f"form must be 'cosine' or 'clip_score', got {form!r}")
        super().__init__(device, model, processor, dtype)
        self.prompt = prompt
        self.form = form

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        cosine = (self.image_features(images) * self.text_features(texts_for(batch, self.prompt))).sum(dim=-1)
        return cosine if self.form == "cosine" else (100.0 * cosine).clamp(min=0.0)


@register_reward("clipscore_image")
class CLIPScoreImage(TransformersCLIPReward):
    """ClipScore-I: cosine of the CLIP image embeddings of each face and its clean face (Table VII).

    Same model and preprocessing as ``clipscore`` (``openai/clip-vit-large-patch14`` by
    default); 1 for an image identical to its clean face, lower the further its content drifts.
    """

    needs_clean = True
    default_model = "openai/clip-vit-large-patch14"
    resources: ClassVar[dict[str, float]] = {"num_cpus": 1.0, "num_gpus": 0.125, "memory": 4 * _GIB}

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        return (self.image_features(images) * self.image_features(batch.clean)).sum(dim=-1)
