"""Preference rewards (HPSv2, PickScore, CLIP score, ClipScore-I) on tiny random models.

Each model is the real library class built from a tiny config and saved in the real checkpoint
format by ``rewards.tiny`` (open_clip ``{'state_dict': ...}`` named like the HPS files; transformers
``save_pretrained``), and loaded through the same code path as real weights: from a faked
Hugging Face cache (``models--org--name/snapshots/<40-hex>``) and from plain local paths.
Scores are compared with the references' own pipelines (PIL preprocessing) on real faces.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from PIL import Image

from rewards import Reward, RewardBatch, RewardError, build_reward, check_reward_weights, reward_class
from rewards.preference import (
    DEFAULT_PROMPT,
    HPS_CHECKPOINTS,
    HPS_REPO,
    CLIPScore,
    CLIPScoreImage,
    HPSv2,
    ImageTransform,
    PickScore,
    texts_for,
)
from rewards.tiny import TINY_OPEN_CLIP, tiny_clip, write_tiny_clip, write_tiny_hpsv2
from rlrestore.config import RewardSpec, load_config
from rlrestore.data import embedded_faces_dir, iter_image_files, load_image, square_resize, to_tensor
from rlrestore.data.images import to_uint8

FULL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "prefrestore.yaml"
COMMIT = "0123456789abcdef" * 2 + "01234567"  # refs/main holds a full 40-hex commit id
CLIP_REPO = "rlrestore-test/tiny-pickscore"  # the model repo (like yuvalkirstain/PickScore_v1)
PROCESSOR_REPO = "rlrestore-test/tiny-clip-processor"  # the processor repo (like laion/CLIP-ViT-H-14-...)
CAPTIONS = ["smiling woman with red hair", "", "old man with a grey beard"]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch):
    """Refuse every socket connection; a test that attempted one fails."""
    attempts: list = []

    def refuse(self: socket.socket, address: object, *args: object) -> None:
        attempts.append(address)
        raise OSError(f"test tried to connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield
    assert attempts == []


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    """Three real faces, 64 x 56 (not square, so the centre crop matters), in [-1, 1]."""
    files = iter_image_files(embedded_faces_dir())[:3]
    return torch.stack([to_tensor(square_resize(load_image(path), 64)) for path in files])[..., 4:60]


def _snapshot(hub: Path, repo: str) -> Path:
    """The snapshot folder of ``repo`` in the HF cache layout at ``hub`` (refs/main -> COMMIT)."""
    root = hub / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny weights in a faked HF cache (``hub``) and as plain local files and directories."""
    root = tmp_path_factory.mktemp("preference")
    hub = root / "hub"
    cached_hps = _snapshot(hub, HPS_REPO)
    hps: dict[str, Path] = {}
    for seed, (version, filename) in enumerate(HPS_CHECKPOINTS.items()):  # other weights per version
        hps[version] = Path(write_tiny_hpsv2(root / filename, seed=seed)["checkpoint"])
        (cached_hps / filename).write_bytes(hps[version].read_bytes())
    clip, processor = tiny_clip()
    # The hub layout of the real repos: model files in one repo, preprocessor_config.json and the
    # tokenizer files in the processor repo.
    clip.save_pretrained(_snapshot(hub, CLIP_REPO))
    processor_snapshot = _snapshot(hub, PROCESSOR_REPO)
    processor.image_processor.save_pretrained(processor_snapshot)
    processor.tokenizer.save_pretrained(processor_snapshot)
    # A plain directory holding the same model and its processor (transformers 5's processor_config.json).
    write_tiny_clip(root / "clip")
    return {"hub": hub, "clip": root / "clip", **{f"hps-{v}": path for v, path in hps.items()}}


@pytest.fixture(scope="module", autouse=True)
def hub_cache(stores: dict[str, Path]):
    """Point the Hugging Face cache (huggingface_hub and transformers read it per call) at the fake one."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(stores["hub"]))
        yield stores["hub"]


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def hps(hub_cache: Path) -> HPSv2:
    return HPSv2(model_config=TINY_OPEN_CLIP)  # v2.1 from the (faked) HF cache


@pytest.fixture(scope="module")
def pickscore(hub_cache: Path) -> PickScore:
    return PickScore(model=CLIP_REPO, processor=PROCESSOR_REPO)


def _pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(to_uint8(image)) for image in images]


def _check_batching(reward: Reward, faces: torch.Tensor, batch: RewardBatch) -> torch.Tensor:
    """Scores of the batch: [N], finite, equal to scoring each sample alone."""
    scores = reward(faces, batch)
    assert scores.shape == (len(batch),) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    alone = torch.cat([reward(faces[i : i + 1], batch.select(i, i + 1)) for i in range(len(batch))])
    torch.testing.assert_close(scores, alone, rtol=1e-4, atol=1e-5)
    return scores


def _check_prompt_fallback(reward: Reward, faces: torch.Tensor) -> None:
    """An empty caption scores as the prompt does; a caption scores differently."""
    n = faces.shape[0]
    empty = reward(faces, RewardBatch([""] * n))
    torch.testing.assert_close(empty, reward(faces, RewardBatch([reward.prompt] * n)))
    assert not torch.allclose(empty, reward(faces, RewardBatch(["the and the"] * n)), atol=1e-4)


# ----------------------------------------------------------------------------- shared pieces
def test_texts_for_uses_the_caption_else_the_prompt() -> None:
    assert texts_for(RewardBatch(["a face", "", "  "]), "fallback") == ["a face", "fallback", "fallback"]


def test_image_transform_matches_the_clip_image_processor(faces: torch.Tensor) -> None:
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ours = ImageTransform.from_image_processor(processor)(faces)
    uint8 = torch.stack([torch.from_numpy(to_uint8(face)).permute(2, 0, 1) for face in faces])
    reference = processor(images=list(uint8), return_tensors="pt").pixel_values
    assert ours.shape == reference.shape == (3, 3, 32, 32)
    # The processor resizes uint8 images and rounds: one grey level over the smallest std.
    torch.testing.assert_close(ours, reference, rtol=0, atol=1.01 / 255 / min(processor.image_std))


def test_unsupported_open_clip_preprocessing_is_refused() -> None:
    config = {"size": (224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3}
    assert ImageTransform.from_open_clip({**config, "resize_mode": "shortest"}).crop == (224, 224)
    with pytest.raises(ValueError, match="need resize_mode 'shortest' and a square size"):
        ImageTransform.from_open_clip({**config, "resize_mode": "longest"})


# ----------------------------------------------------------------------------- HPSv2
def test_hpsv2_matches_the_reference_pipeline(
    hps: HPSv2, stores: dict[str, Path], faces: torch.Tensor
) -> None:
    import open_clip

    batch = RewardBatch(CAPTIONS)
    scores = _check_batching(hps, faces, batch)
    # hpsv2.score: open_clip's eval preprocessing of PIL images, model(image, text) with
    # output_dict, diagonal of image_features @ text_features.T.
    model, _, preprocess_val = open_clip.create_model_and_transforms(
        "ViT-H-14", pretrained=str(stores["hps-v2.1"]), output_dict=True, **TINY_OPEN_CLIP
    )
    tokenizer = open_clip.get_tokenizer("ViT-H-14")
    with torch.no_grad():
        images = torch.stack([preprocess_val(image) for image in _pil(faces)])
        outputs = model.eval()(images, tokenizer(texts_for(batch, DEFAULT_PROMPT)))
        reference = torch.diagonal(outputs["image_features"] @ outputs["text_features"].T)
    torch.testing.assert_close(scores, reference, rtol=0, atol=2e-3)
    _check_prompt_fallback(hps, faces)


def test_hpsv2_versions_and_explicit_checkpoints(
    hps: HPSv2, stores: dict[str, Path], faces: torch.Tensor
) -> None:
    batch = RewardBatch(CAPTIONS)
    same = build_reward(
        RewardSpec(name="hpsv2", args={"checkpoint": str(stores["hps-v2.1"]), "model_config": TINY_OPEN_CLIP})
    )
    torch.testing.assert_close(same(faces, batch), hps(faces, batch))
    # v2 is a different checkpoint file (other random weights here).
    v2 = HPSv2(version="v2", model_config=TINY_OPEN_CLIP)
    assert not torch.allclose(v2(faces, batch), hps(faces, batch))
    with pytest.raises(ValueError, match=r"HPS version must be one of \['v2', 'v2.1'\], got 'v3'"):
        HPSv2.missing_weights(version="v3")


def test_hpsv2_missing_checkpoints_are_listed_and_refused(empty_cache: Path, tmp_path: Path) -> None:
    [message] = HPSv2.missing_weights()
    assert "HPS_v2.1_compressed.pt of 'xswu/HPSv2' not in the Hugging Face cache" in message
    assert "hf download xswu/HPSv2 HPS_v2.1_compressed.pt" in message
    with pytest.raises(RewardError, match=r"'hpsv2' cannot be built.*\n- HPS_v2\.1_compressed\.pt"):
        HPSv2(model_config=TINY_OPEN_CLIP)
    missing = tmp_path / "HPS_v2_compressed.pt"
    with pytest.raises(RewardError, match=rf"args\.checkpoint: file '{missing}' does not exist"):
        build_reward(RewardSpec(name="hpsv2", args={"version": "v2", "checkpoint": str(missing)}))


def test_hpsv2_missing_weights_is_empty_once_the_files_are_there(stores: dict[str, Path]) -> None:
    assert HPSv2.missing_weights() == HPSv2.missing_weights(version="v2") == []
    assert HPSv2.missing_weights(checkpoint=str(stores["hps-v2"])) == []


def test_a_checkpoint_that_does_not_fit_the_architecture_is_a_clear_error(stores: dict[str, Path]) -> None:
    wider = {**TINY_OPEN_CLIP, "embed_dim": 24}
    with pytest.raises(RewardError, match=r"cannot build open_clip 'ViT-H-14' from checkpoint .*HPS_v2\.1"):
        HPSv2(model_config=wider)


# ----------------------------------------------------------------------------- transformers CLIP
def test_pickscore_matches_the_reference_pipeline(pickscore: PickScore, faces: torch.Tensor) -> None:
    batch = RewardBatch(CAPTIONS)
    scores = _check_batching(pickscore, faces, batch)
    # The PickScore model card: processor on PIL images and on the text, normalised
    # get_*_features, logit_scale.exp() * text @ image.T.
    model, texts = pickscore.model, texts_for(batch, DEFAULT_PROMPT)
    pixels = pickscore.image_processor(images=_pil(faces), return_tensors="pt")
    text = pickscore.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embs = model.get_image_features(**pixels).pooler_output
        text_embs = model.get_text_features(**text).pooler_output
    image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
    text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
    reference = model.logit_scale.exp() * (text_embs * image_embs).sum(dim=-1)
    torch.testing.assert_close(scores, reference, rtol=0, atol=0.02)  # logit scale x cosine
    _check_prompt_fallback(pickscore, faces)
    # divisor=26 (the DiffusionNFT reference, configs/prefrestore.yaml) only rescales.
    scaled = PickScore(model=CLIP_REPO, processor=PROCESSOR_REPO, divisor=26.0)(faces, batch)
    torch.testing.assert_close(scaled * 26.0, scores, rtol=1e-5, atol=1e-5)


def test_clip_rewards_load_from_the_cache_and_from_local_directories(
    pickscore: PickScore, stores: dict[str, Path], faces: torch.Tensor
) -> None:
    batch = RewardBatch(CAPTIONS)
    local = build_reward(
        RewardSpec(name="pickscore", args={"model": str(stores["clip"]), "processor": str(stores["clip"])})
    )
    torch.testing.assert_close(local(faces, batch), pickscore(faces, batch))
    clipscore = CLIPScore(model=str(stores["clip"]))  # its own processor, from the same directory
    cosine = clipscore(faces, batch)
    # Same tiny weights: PickScore is the logit scale times this cosine.
    torch.testing.assert_close(pickscore(faces, batch), pickscore.model.logit_scale.exp() * cosine)
    metric = CLIPScore(model=CLIP_REPO, processor=PROCESSOR_REPO, form="clip_score")(faces, batch)
    torch.testing.assert_close(metric, (100.0 * cosine).clamp(min=0.0))
    _check_prompt_fallback(clipscore, faces)


def test_clipscore_image_prefers_the_image_itself(stores: dict[str, Path], faces: torch.Tensor) -> None:
    reward = build_reward(RewardSpec(name="clipscore_image", args={"model": str(stores["clip"])}))
    assert reward.needs_clean
    same = _check_batching(reward, faces, RewardBatch([""] * 3, clean=faces))
    torch.testing.assert_close(same, torch.ones(3))
    others = reward(faces, RewardBatch([""] * 3, clean=faces.roll(1, dims=0)))
    assert (others < same - 1e-4).all()
    with pytest.raises(ValueError, match="batch.clean is None"):
        reward(faces, RewardBatch([""] * 3))


def test_half_precision_scores_close_to_float32(
    hps: HPSv2, stores: dict[str, Path], faces: torch.Tensor
) -> None:
    batch = RewardBatch(CAPTIONS)
    half_hps = HPSv2(model_config=TINY_OPEN_CLIP, dtype="bfloat16")
    torch.testing.assert_close(half_hps(faces, batch), hps(faces, batch), rtol=0, atol=0.03)
    full = CLIPScore(model=str(stores["clip"]))(faces, batch)
    half = CLIPScore(model=str(stores["clip"]), dtype="bfloat16")(faces, batch)
    torch.testing.assert_close(half, full, rtol=0, atol=0.03)
    with pytest.raises(RewardError, match="dtype must be one of float32, bfloat16, float16, got 'fp8'"):
        build_reward(RewardSpec(name="clipscore", args={"model": str(stores["clip"]), "dtype": "fp8"}))


def test_clip_missing_files_are_listed_per_source(stores: dict[str, Path], tmp_path: Path) -> None:
    assert PickScore.missing_weights(model=CLIP_REPO, processor=PROCESSOR_REPO) == []
    assert CLIPScoreImage.missing_weights(model=str(stores["clip"])) == []
    model_only = tmp_path / "model-only"
    model_only.mkdir()
    (model_only / "config.json").write_text(json.dumps({"model_type": "clip"}))
    [message] = CLIPScore.missing_weights(model=str(model_only))
    assert message == (
        f"args.model: model.safetensors or pytorch_model.bin, preprocessor_config.json or "
        f"processor_config.json, tokenizer.json or vocab.json missing in directory '{model_only}'"
    )
    with pytest.raises(
        RewardError, match=r"'clipscore' cannot be built.*\n- args\.model: model\.safetensors"
    ):
        CLIPScore(model=str(model_only))
    assert PickScore.missing_weights(model="./no/such/dir", processor=PROCESSOR_REPO) == [
        "args.model: directory './no/such/dir' does not exist (a save_pretrained directory or a Hugging Face id)"
    ]


def test_default_sources_are_listed_with_an_empty_cache(empty_cache: Path) -> None:
    [model, processor] = PickScore.missing_weights()
    assert model.startswith(
        "args.model: config.json, model.safetensors or pytorch_model.bin of 'yuvalkirstain/PickScore_v1'"
    )
    assert "`hf download yuvalkirstain/PickScore_v1`" in model and str(empty_cache) in model
    assert processor.startswith(
        "args.processor: preprocessor_config.json or processor_config.json, tokenizer.json or vocab.json "
        "of 'laion/CLIP-ViT-H-14-laion2B-s32B-b79K'"
    )
    [clip] = CLIPScoreImage.missing_weights()
    assert "of 'openai/clip-vit-large-patch14' not in the Hugging Face cache" in clip
    with pytest.raises(RewardError, match=r"'pickscore' cannot be built"):
        PickScore()


def test_full_size_config_lists_every_missing_reward_file(empty_cache: Path) -> None:
    specs = load_config(FULL_CONFIG).stage2.rewards
    assert [(spec.name, spec.weight) for spec in specs] == [
        ("hpsv2", 1.0),
        ("clipscore", 1.0),
        ("pickscore", 1.0),
    ]
    assert all(reward_class(spec.name).resources["num_gpus"] > 0 for spec in specs)
    with pytest.raises(RewardError) as info:
        check_reward_weights(specs)
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == 4
    assert lines[0].startswith("- reward 'hpsv2': HPS_v2.1_compressed.pt of 'xswu/HPSv2'")
    assert lines[1].startswith(
        "- reward 'clipscore': args.model: config.json, model.safetensors or pytorch_model.bin"
    )
    assert "'openai/clip-vit-large-patch14'" in lines[1]
    assert (
        "'yuvalkirstain/PickScore_v1'" in lines[2] and "'laion/CLIP-ViT-H-14-laion2B-s32B-b79K'" in lines[3]
    )
