"""Real-weight metrics that work offline: ``dlib_identity``, ``dlib_lmd``, ``niqe`` and ``brisque``.

Real faces from the embedded face pack (``rlrestore/assets/faces``, attribution in its SOURCES.md;
four different people, 128 px) and copies degraded by Eq. 16 (``rlrestore.data.degradation``,
fixed parameters: blur sigma 3 px at 512 px, downsampling x3, noise 8, JPEG 70). The weights are
the real ones: dlib's models from ``face_recognition_models``, NIQE's published parameters
vendored in ``rewards/assets``, the SVM shipped in the ``brisque`` package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from rewards import (
    Reward,
    RewardBatch,
    RewardError,
    RewardWorker,
    build_reward,
    check_reward_weights,
    reward_class,
)
from rewards.iqa import NIQE_PARAMETERS
from rlrestore.config import ConfigError, EvalConfig, RewardSpec
from rlrestore.data import embedded_faces_dir, load_image, to_tensor
from rlrestore.data.degradation import DegradationParams, degrade
from rlrestore.orchestration.evaluation.metrics import plan_metrics

PEOPLE = [
    "celebahq_ddnm_00234",
    "celebahq_stargan2_ref_female_015248",
    "celebahq_stargan2_ref_male_012712",
    "celebahq_stargan2_ref_male_094805",
]
# r = 3 applied as is at 128 px (the size scaling would make it max(1, 3 * 128 / 512) = 1)
DEGRADATION = DegradationParams(sigma=3.0, scale=3.0, noise=8.0, quality=70, scale_downsample=False)
OFFLINE = ["dlib_identity", "dlib_lmd", "niqe", "brisque"]


def _tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.stack([to_tensor(image) for image in images])


@pytest.fixture(scope="module")
def clean() -> torch.Tensor:
    return _tensor([load_image(embedded_faces_dir() / f"{name}.png") for name in PEOPLE])


@pytest.fixture(scope="module")
def degraded(clean: torch.Tensor) -> torch.Tensor:
    from rlrestore.data.images import to_uint8

    faces = [to_uint8(face) for face in clean]
    return _tensor([degrade(face, DEGRADATION, np.random.default_rng(i)) for i, face in enumerate(faces)])


@pytest.fixture(scope="module")
def dlib_rewards() -> dict[str, Reward]:
    """The two dlib rewards, built once (reading dlib's model files takes a few seconds)."""
    return {name: build_reward(RewardSpec(name=name)) for name in ("dlib_identity", "dlib_lmd")}


@pytest.fixture(scope="module")
def face_scores(
    dlib_rewards: dict[str, Reward], clean: torch.Tensor, degraded: torch.Tensor
) -> dict[str, dict[str, torch.Tensor]]:
    """One call per dlib reward: each clean face against itself, its degraded copy and every other person."""
    n = len(PEOPLE)
    others = [(i, j) for i in range(n) for j in range(n) if i != j]
    images = torch.cat([clean, degraded, clean[[j for _, j in others]]])
    references = torch.cat([clean, clean, clean[[i for i, _ in others]]])
    results = {}
    for name, reward in dlib_rewards.items():
        scores = -reward(images, RewardBatch([""] * len(images), clean=references))  # raw distances
        results[name] = {
            "self": scores[:n],
            "degraded": scores[n : 2 * n],
            "others": scores[2 * n :].reshape(n, n - 1),  # row i: person i against the others
        }
    return results


def test_dlib_distances_are_zero_for_the_clean_face_itself(face_scores) -> None:
    for name in ("dlib_identity", "dlib_lmd"):
        torch.testing.assert_close(face_scores[name]["self"], torch.zeros(len(PEOPLE)), atol=1e-6, rtol=0)


def test_degraded_copy_scores_worse_than_the_clean_face(face_scores) -> None:
    for name in ("dlib_identity", "dlib_lmd"):
        assert (face_scores[name]["degraded"] > 1e-3).all(), (name, face_scores[name]["degraded"])


def test_other_people_are_further_apart_than_a_face_and_its_degraded_copy(face_scores) -> None:
    identity = face_scores["dlib_identity"]
    nearest_other = identity["others"].min(dim=1).values
    assert (identity["degraded"] < nearest_other).all(), (identity["degraded"], nearest_other)
    assert (nearest_other > 0.6).all()  # dlib's own same-person threshold


@pytest.mark.parametrize("name", ["niqe", "brisque"])
def test_no_reference_quality_is_worse_for_the_degraded_copy(
    name: str, clean: torch.Tensor, degraded: torch.Tensor
) -> None:
    reward = build_reward(RewardSpec(name=name))
    assert not reward.higher_is_better
    batch = RewardBatch([""] * len(PEOPLE))
    clean_scores, degraded_scores = reward(clean, batch), reward(degraded, batch)
    assert torch.isfinite(clean_scores).all() and torch.isfinite(degraded_scores).all()
    assert (degraded_scores < clean_scores).all(), (clean_scores, degraded_scores)  # rewards: -metric
    one_by_one = torch.cat([reward(clean[i : i + 1], RewardBatch([""])) for i in range(len(PEOPLE))])
    torch.testing.assert_close(clean_scores, one_by_one)


def test_niqe_matches_pyiqa_reference_function_with_the_published_parameters(clean: torch.Tensor) -> None:
    """The reward (vendored .npz rewritten for pyiqa's loader) against pyiqa's calculate_niqe fed the
    arrays of the file directly."""
    from pyiqa.archs.niqe_arch import calculate_niqe

    with np.load(NIQE_PARAMETERS) as stored:
        mu = torch.from_numpy(np.ravel(stored["mu_pris_param"]))
        cov = torch.from_numpy(stored["cov_pris_param"])
    expected = calculate_niqe(clean.clamp(-1, 1).add(1).div(2), 0, True, "yiq", mu, cov).reshape(-1)
    scores = -build_reward(RewardSpec(name="niqe"))(clean, RewardBatch([""] * len(PEOPLE)))
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)
    explicit = build_reward(RewardSpec(name="niqe", args={"weights": str(NIQE_PARAMETERS)}))
    torch.testing.assert_close(-explicit(clean, RewardBatch([""] * len(PEOPLE))), scores)


def test_niqe_refuses_an_npz_without_its_parameters(tmp_path: Path) -> None:
    bad = tmp_path / "params.npz"
    np.savez(bad, mu=np.zeros((1, 36)))
    with pytest.raises(
        RewardError, match=r"params\.npz does not hold NIQE parameters.*mu_pris_param \(1, 36\)"
    ):
        build_reward(RewardSpec(name="niqe", args={"weights": str(bad)}))


def test_offline_metrics_need_no_download_and_pass_the_stage2_checks(clean, degraded) -> None:
    specs = [RewardSpec(name=name) for name in OFFLINE]
    check_reward_weights(specs)  # raises listing any missing file
    worker = RewardWorker(specs)
    scores = worker.score(degraded[:2], RewardBatch(["", ""], clean=clean[:2]))
    assert set(scores) == set(OFFLINE)
    assert all(
        value.shape == (2,) and torch.isfinite(value).all() and (value < 0).all() for value in scores.values()
    )
    assert worker.take_errors() == []


def test_eval_plans_the_offline_metrics_and_reports_raw_values() -> None:
    metrics, skipped = plan_metrics(EvalConfig(metrics=OFFLINE), has_gt=True, has_reference=False)
    assert skipped == {} and [metric.key for metric in metrics] == OFFLINE
    for metric in metrics:
        assert metric.negate and not metric.higher_is_better and metric.heading.endswith("↓")
        torch.testing.assert_close(metric.values(torch.tensor([-0.5])), torch.tensor([0.5]))
    assert {metric.key: metric.needs_gt for metric in metrics} == {
        "dlib_identity": True,
        "dlib_lmd": True,
        "niqe": False,
        "brisque": False,
    }
    assert {metric.key: metric.min_size for metric in metrics}["dlib_identity"] == 64
    real, skipped = plan_metrics(EvalConfig(metrics=OFFLINE), has_gt=False, has_reference=False)
    assert [metric.key for metric in real] == ["niqe", "brisque"]
    assert all("full-reference" in skipped[key] for key in ("dlib_identity", "dlib_lmd"))
    with pytest.raises(ConfigError, match="eval.metric_args.dlib_lmd"):
        plan_metrics(
            EvalConfig(metrics=["dlib_lmd"], metric_args={"dlib_lmd": {"points": 5}}),
            has_gt=True,
            has_reference=False,
        )


def test_dlib_errors_say_what_is_wrong(dlib_rewards: dict[str, Reward], clean: torch.Tensor) -> None:
    reward = dlib_rewards["dlib_identity"]
    small = torch.nn.functional.interpolate(clean[:1], size=48, mode="bilinear", antialias=True)
    with pytest.raises(
        ValueError, match=r"'dlib_identity' needs images of at least 64 px per side, got \(48, 48\)"
    ):
        reward(small, RewardBatch([""], clean=small))
    with pytest.raises(ValueError, match=r"compares each image with its clean face, but batch.clean is None"):
        reward(clean[:1], RewardBatch([""]))
    wide = torch.nn.functional.pad(clean[:1], (0, 8))
    with pytest.raises(ValueError, match=r"clean faces \(1, 3, 128, 128\) and images \(1, 3, 128, 136\)"):
        reward(wide, RewardBatch([""], clean=clean[:1]))
    with pytest.raises(RewardError, match=r"box must be one of \('detect', 'frame'\), got 'face'"):
        build_reward(RewardSpec(name="dlib_lmd", args={"box": "face"}))


def test_a_clean_image_without_a_face_scores_nan_unless_the_box_is_the_frame(
    dlib_rewards: dict[str, Reward], clean: torch.Tensor
) -> None:
    grey = torch.zeros_like(clean[:1])
    batch = RewardBatch([""], clean=grey)
    assert torch.isnan(dlib_rewards["dlib_lmd"](clean[:1], batch)).all()
    framed = build_reward(RewardSpec(name="dlib_lmd", args={"box": "frame"}))
    assert torch.isfinite(framed(clean[:1], RewardBatch([""], clean=clean[:1]))).all()


def test_missing_dlib_models_name_the_package_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def without_models(name: str, *args: object) -> object:
        return None if name == "face_recognition_models" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_models)
    missing = reward_class("dlib_identity").missing_weights()
    assert missing and all("pip install face_recognition_models==0.3.0" in item for item in missing)
    with pytest.raises(RewardError, match=r"'dlib_lmd' cannot be built: .*not installed"):
        build_reward(RewardSpec(name="dlib_lmd"))


def test_brisque_refuses_images_too_small_for_its_statistics() -> None:
    reward = build_reward(RewardSpec(name="brisque"))
    with pytest.raises(
        ValueError, match=r"'brisque' needs images of at least 32 px per side, got \(24, 24\)"
    ):
        reward(torch.zeros(1, 3, 24, 24), RewardBatch([""]))
