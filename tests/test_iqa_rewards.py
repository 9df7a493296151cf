"""pyiqa rewards (rewards.iqa): the weight files each metric reads, the refusal to build without
them, and real pyiqa metrics loaded from random-init files written where pyiqa looks for them.

lpips and musiq are built through the same code as with real weights: the test writes random
weights in the published files' formats and names into a fresh torch hub dir; any download
attempt fails the test. niqe reads its published parameters vendored in rewards/assets (and, here,
a random local file too); brisque, the ``brisque`` package's SVM (tests/test_offline_metrics.py
checks both on real faces). maniqa, clipiqa+ and topiq_nr-face are too large to build here
(and clipiqa+'s CLIP file is SHA-256 checked), so only their file lists and errors are tested.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision
from torchvision.transforms.functional import gaussian_blur

from rewards import (
    IqaReward,
    Reward,
    RewardBatch,
    RewardError,
    WeightFile,
    build_reward,
    check_reward_weights,
    reward_class,
)
from rewards.iqa import NIQE_PARAMETERS
from rlrestore.config import RewardSpec
from rlrestore.data import embedded_faces_dir, iter_image_files, load_image, square_resize, to_tensor

ROOT = Path(__file__).resolve().parent.parent
SIZE = 128
FACES = 3
IQA_NAMES = ["musiq", "clipiqa+", "maniqa", "topiq_nr-face", "niqe", "lpips", "ms_ssim"]
TIMM_VIT = "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k"

# What pyiqa 0.1.16 reads on construction, relative to the torch hub dir ($TORCH_HOME/hub);
# "hf:" marks a Hugging Face hub repo read through the HF cache, "rlrestore:" a file shipped in the repository.
EXPECTED_FILES = {
    "musiq": ["pyiqa/musiq_koniq_ckpt-e95806b9.pth"],
    "clipiqa+": ["pyiqa/CLIP-IQA%2B_learned_prompts-603f3273.pth", "clip/RN50.pt"],
    "maniqa": ["pyiqa/ckpt_koniq10k.pt", f"hf:{TIMM_VIT}"],
    "topiq_nr-face": [
        "pyiqa/topiq_nr_cgfiqa_res50-0a8b8e4f.pth",
        "pyiqa/detection_Resnet50_Final.pth",
        "pyiqa/parsing_parsenet.pth",
    ],
    "niqe": ["rlrestore:rewards/assets/niqe_pris_params.npz"],
    "lpips": ["pyiqa/LPIPS_v0.1_alex-df73285e.pth", "checkpoints/alexnet-owt-7be5be79.pth"],
    "ms_ssim": [],
}


@contextmanager
def _caches_at(hub: Path) -> Iterator[Path]:
    """Point the torch hub dir (torchvision, CLIP) and pyiqa's cache at ``hub``.

    pyiqa's DEFAULT_CACHE_DIR is ``torch.hub.get_dir()/pyiqa`` (so ``$TORCH_HOME/hub/pyiqa``),
    computed once when pyiqa is imported; it is repointed along with the hub dir.
    """
    from pyiqa.utils import download_util

    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(download_util, "DEFAULT_CACHE_DIR", str(hub / "pyiqa"))
            yield hub
    finally:
        torch.hub.set_dir(previous)


def _refuse_download(url: str, *args: object, **kwargs: object) -> None:
    raise AssertionError(f"tried to download {url}")


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any download by pyiqa or torchvision fails the test."""
    from pyiqa.utils import download_util

    monkeypatch.setattr(torch.hub, "download_url_to_file", _refuse_download)
    monkeypatch.setattr(download_util, "download_url_to_file", _refuse_download)


@pytest.fixture
def empty_hub(tmp_path: Path) -> Iterator[Path]:
    with _caches_at(tmp_path / "hub") as hub:
        yield hub


def _write_lpips(hub: Path) -> None:
    """torchvision's AlexNet file (a plain state dict) and pyiqa's LPIPS file (the five linear
    layers only, non-negative like the trained ones), random."""
    from pyiqa.archs.lpips_arch import LPIPS as LPIPSNet

    torch.manual_seed(0)
    alexnet = hub / "checkpoints" / "alexnet-owt-7be5be79.pth"
    alexnet.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.alexnet().state_dict(), alexnet)
    net = LPIPSNet(pretrained=False)  # its AlexNet comes from the file just written
    lins = {key: value.abs() for key, value in net.state_dict().items() if re.match(r"lin\d\.", key)}
    torch.save(lins, hub / "pyiqa" / "LPIPS_v0.1_alex-df73285e.pth")


def _write_musiq(hub: Path) -> None:
    from pyiqa.archs.musiq_arch import MUSIQ as MUSIQNet

    torch.manual_seed(0)
    torch.save(MUSIQNet(pretrained=False).state_dict(), hub / "pyiqa" / "musiq_koniq_ckpt-e95806b9.pth")


def _write_niqe(path: Path, seed: int = 0) -> None:
    """A pristine NIQE model: mean [1, 36] and an SPD covariance [36, 36] of the 36 NSS features."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((36, 36))
    params = {
        "mu_prisparam": rng.standard_normal((1, 36)),
        "cov_prisparam": basis @ basis.T / 36 + np.eye(36),
    }
    scipy.io.savemat(path, params)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A torch hub dir holding random-init files for lpips and musiq."""
    with _caches_at(tmp_path_factory.mktemp("hub")) as hub:
        (hub / "pyiqa").mkdir(parents=True)
        _write_lpips(hub)
        _write_musiq(hub)
        yield hub


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    files = iter_image_files(embedded_faces_dir())[:FACES]
    return torch.stack([to_tensor(square_resize(load_image(path), SIZE)) for path in files])


def _corrupt(faces: torch.Tensor) -> torch.Tensor:
    noise = torch.randn(faces.shape, generator=torch.Generator().manual_seed(0))
    return (gaussian_blur(faces, [7, 7], [1.5, 1.5]) + 0.1 * noise).clamp(-1, 1)


def _batch(clean: torch.Tensor | None, n: int) -> RewardBatch:
    return RewardBatch([""] * n, clean=clean)


def _scores(
    name: str, images: torch.Tensor, clean: torch.Tensor | None = None, **args: object
) -> torch.Tensor:
    return build_reward(RewardSpec(name=name, args=dict(args)))(images, _batch(clean, images.shape[0]))


def _check_batching(reward: Reward, images: torch.Tensor, clean: torch.Tensor | None) -> torch.Tensor:
    """Scores of the batch, after checking shape, finiteness and equality with one-by-one calls."""
    scores = reward(images, _batch(clean, images.shape[0]))
    assert scores.shape == (images.shape[0],) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    one_by_one = torch.cat(
        [
            reward(images[i : i + 1], _batch(None if clean is None else clean[i : i + 1], 1))
            for i in range(images.shape[0])
        ]
    )
    torch.testing.assert_close(scores, one_by_one, rtol=1e-4, atol=1e-4)
    return scores


# ---------------------------------------------------------------- the table and the files


def test_rewards_match_pyiqa_metric_properties() -> None:
    """Name, orientation and reference mode agree with pyiqa's own table; the options the rewards
    pass are arguments of the metric's network class."""
    from pyiqa.default_model_configs import DEFAULT_CONFIGS
    from pyiqa.utils.registry import ARCH_REGISTRY

    for module in ("musiq", "clipiqa", "maniqa", "topiq", "niqe", "lpips", "ssim"):
        importlib.import_module(f"pyiqa.archs.{module}_arch")
    for name in IQA_NAMES:
        cls = reward_class(name)
        assert issubclass(cls, IqaReward) and cls.metric_name == name
        config = DEFAULT_CONFIGS[name]
        assert cls.needs_clean == (config["metric_mode"] == "FR"), name
        assert cls.higher_is_better == (not config.get("lower_better", False)), name
        spec = cls.metric_spec
        options = set(spec.options)
        if spec.own_weights is not None:
            options.add("pretrained" if spec.load_weights else "pretrained_model_path")
        network = ARCH_REGISTRY.get(config["metric_opts"]["type"])
        assert options <= set(inspect.signature(network.__init__).parameters), name


def _place(file: WeightFile, hub: Path) -> str:
    if file.hub_repo:
        return f"hf:{file.hub_repo}"
    if file.bundled:
        return f"rlrestore:{file.path.relative_to(ROOT).as_posix()}"
    return file.path.relative_to(hub).as_posix()


@pytest.mark.parametrize("name", IQA_NAMES)
def test_missing_weights_name_every_file_its_url_and_place(name: str, empty_hub: Path) -> None:
    from huggingface_hub.constants import HF_HUB_CACHE

    cls = reward_class(name)
    files = cls.weight_files()
    assert [_place(file, empty_hub) for file in files] == EXPECTED_FILES[name]
    downloaded = [file for file in files if not file.bundled]
    missing = cls.missing_weights()
    assert len(missing) == len(downloaded)
    for item, file in zip(missing, downloaded, strict=True):
        assert file.url.startswith("https://") and file.url in item
        assert str(file.path) in item
        if file.hub_repo:
            assert file.path == Path(HF_HUB_CACHE) and f"hf download {file.hub_repo}" in item


def test_a_local_weights_file_replaces_only_the_metrics_own_file(empty_hub: Path, tmp_path: Path) -> None:
    local = tmp_path / "maniqa.pt"
    local.write_bytes(b"")
    missing = reward_class("maniqa").missing_weights(weights=str(local))
    assert len(missing) == 1 and TIMM_VIT in missing[0]
    missing = reward_class("lpips").missing_weights(weights=str(tmp_path / "nope.pth"))
    assert "nope.pth does not exist" in missing[0] and "alexnet-owt-7be5be79.pth" in missing[1]
    with pytest.raises(RewardError, match="'ms_ssim' has no weight file"):
        build_reward(RewardSpec(name="ms_ssim", args={"weights": str(local)}))


def test_clip_file_with_the_wrong_hash_counts_as_missing(empty_hub: Path) -> None:
    """pyiqa's CLIP loader re-downloads a file whose SHA-256 differs, so that is a missing file too."""
    clip = empty_hub / "clip" / "RN50.pt"
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"not CLIP")
    missing = reward_class("clipiqa+").missing_weights()
    assert any("RN50.pt (the file there has the wrong SHA-256)" in item for item in missing)


def test_a_changed_bundled_file_counts_as_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The vendored NIQE parameters are SHA-256 checked; a changed copy is reported with how to restore it."""
    import rewards.iqa

    changed = tmp_path / "niqe_pris_params.npz"
    changed.write_bytes(NIQE_PARAMETERS.read_bytes()[:-1])
    monkeypatch.setattr(rewards.iqa, "NIQE_PARAMETERS", changed)
    (item,) = reward_class("niqe").missing_weights()
    assert "shipped with rlrestore is missing or changed" in item and "wrong SHA-256" in item
    assert f"git checkout -- {changed}" in item


@pytest.mark.parametrize("name", [name for name in IQA_NAMES if EXPECTED_FILES[name] and name != "niqe"])
def test_building_without_the_files_fails_naming_them_and_downloads_nothing(
    name: str, empty_hub: Path
) -> None:
    with pytest.raises(RewardError) as error:
        build_reward(RewardSpec(name=name))
    message = str(error.value)
    assert f"reward {name!r} cannot be built" in message and "never downloads" in message
    for place in EXPECTED_FILES[name]:
        assert place.removeprefix("hf:").split("/")[-1] in message
    with pytest.raises(RewardError, match=rf"(?s)reward weights are missing.*- reward '{re.escape(name)}'"):
        check_reward_weights([RewardSpec(name=name)])


# ---------------------------------------------------------------- real metrics, random weights


def test_lpips_is_zero_for_the_clean_face_and_worse_for_a_corrupted_copy(
    installed: Path, faces: torch.Tensor
) -> None:
    assert reward_class("lpips").missing_weights() == []
    reward = build_reward(RewardSpec(name="lpips"))
    corrupted = _corrupt(faces)
    scores = _check_batching(reward, corrupted, faces)
    same = reward(faces, _batch(faces, FACES))  # -LPIPS: 0 is the best possible
    torch.testing.assert_close(same, torch.zeros(FACES), atol=1e-6, rtol=0)
    assert (scores < -1e-4).all()


def test_lpips_reads_a_local_weights_file(installed: Path, faces: torch.Tensor, tmp_path: Path) -> None:
    """LPIPS is linear in its linear layers: a local copy with doubled weights doubles every score."""
    published = torch.load(installed / "pyiqa" / "LPIPS_v0.1_alex-df73285e.pth", weights_only=True)
    local = tmp_path / "lpips_doubled.pth"
    torch.save({key: 2 * value for key, value in published.items()}, local)
    corrupted = _corrupt(faces)
    default = _scores("lpips", corrupted, faces)
    doubled = _scores("lpips", corrupted, faces, weights=str(local))
    torch.testing.assert_close(doubled, 2 * default, rtol=1e-4, atol=1e-6)


def test_musiq_scores_each_image_independently_of_its_batch(installed: Path, faces: torch.Tensor) -> None:
    _check_batching(build_reward(RewardSpec(name="musiq")), faces[:2], None)


def test_full_state_dict_loader_loads_strictly(installed: Path, tmp_path: Path) -> None:
    """The loader maniqa and topiq_nr-face use for a local ``weights`` file, on a real pyiqa metric."""
    from rewards.iqa import MANIQA, TOPIQFace

    reward = build_reward(RewardSpec(name="musiq"))
    state = {key: torch.zeros_like(value) for key, value in reward.metric.net.state_dict().items()}
    torch.save(state, tmp_path / "zeros.pth")
    MANIQA.metric_spec.load_weights(reward.metric, str(tmp_path / "zeros.pth"))
    assert all(not value.any() for value in reward.metric.net.state_dict().values())
    torch.save({"params": {"head.weight": state["head.weight"]}}, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match="Missing key"):
        TOPIQFace.metric_spec.load_weights(reward.metric, str(tmp_path / "partial.pth"))


@pytest.mark.parametrize("name", ["niqe", "brisque"])
def test_niqe_and_brisque_score_each_image_with_no_file_in_the_caches(
    name: str, empty_hub: Path, faces: torch.Tensor
) -> None:
    assert reward_class(name).missing_weights() == []
    reward = build_reward(RewardSpec(name=name))
    assert not reward.higher_is_better
    _check_batching(reward, faces, None)


def test_niqe_reads_a_local_parameter_file(faces: torch.Tensor, tmp_path: Path) -> None:
    _write_niqe(tmp_path / "niqe.mat", seed=1)
    default = _scores("niqe", faces)
    local = _scores("niqe", faces, weights=str(tmp_path / "niqe.mat"))
    assert torch.isfinite(local).all() and not torch.allclose(local, default)


def test_niqe_refuses_images_smaller_than_its_block(faces: torch.Tensor) -> None:
    small = torch.nn.functional.interpolate(faces, size=64, mode="bilinear", antialias=True)
    with pytest.raises(ValueError, match=r"'niqe' needs images of at least 96 px per side, got \(64, 64\)"):
        _scores("niqe", small)


def test_ms_ssim_needs_no_files_prefers_the_clean_face_and_refuses_small_images(faces: torch.Tensor) -> None:
    reward = build_reward(RewardSpec(name="ms_ssim"))
    with pytest.raises(ValueError, match=r"at least 161 px per side, got \(128, 128\)"):
        reward(faces, _batch(faces, FACES))
    large = torch.nn.functional.interpolate(faces[:2], size=168, mode="bilinear")
    torch.testing.assert_close(reward(large, _batch(large, 2)), torch.ones(2))
    scores = _check_batching(reward, _corrupt(large), large)
    assert (scores < 0.99).all() and not any(math.isnan(s) for s in scores.tolist())


def test_clipiqa_weights_loader_sets_the_learned_prompt_context(tmp_path: Path) -> None:
    """On pyiqa's real PromptLearner (built on a stand-in token embedding, as CLIP's is only read there)."""
    from types import SimpleNamespace

    from pyiqa.archs.clipiqa_arch import PromptLearner

    from rewards.iqa import CLIPIQAPlus

    learner = PromptLearner(SimpleNamespace(token_embedding=torch.nn.Embedding(49408, 8)))
    context = torch.randn(learner.ctx.shape, generator=torch.Generator().manual_seed(0))
    torch.save(context, tmp_path / "prompts.pth")
    CLIPIQAPlus.metric_spec.load_weights(
        SimpleNamespace(net=SimpleNamespace(prompt_learner=learner)), str(tmp_path / "prompts.pth")
    )
    torch.testing.assert_close(learner.ctx.data, context)
