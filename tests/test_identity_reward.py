"""Identity reward (rewards.identity) and the arcface_torch IResNet (rewards.networks.arcface).

A tiny IResNet (one block per stage, 64-d embeddings) with random weights is saved as a plain
state dict (``rewards.tiny.write_tiny_arcface``) and loaded through the reward's own code
(``torch.load(weights_only=True)``, ``strict=True``), as a published ``backbone.pth`` would be. The full iresnet50 is only built on
the meta device, to check its parameter names and count against the published model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rewards import Identity, RewardBatch, RewardError, build_reward, check_reward_weights
from rewards.identity import arcface_input, embedding_angle_degrees
from rewards.networks.arcface import IRESNET_LAYERS, iresnet, load_iresnet
from rewards.tiny import write_tiny_arcface
from rlrestore.config import RewardSpec
from rlrestore.data import embedded_faces_dir, iter_image_files, load_image, square_resize, to_tensor

TINY = "iresnet_tiny"
FACES = 4


@pytest.fixture
def tiny_arch(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(IRESNET_LAYERS, TINY, (1, 1, 1, 1))
    return TINY


@pytest.fixture
def checkpoint(tiny_arch: str, tmp_path: Path) -> Path:
    """A random tiny IResNet state dict, with non-trivial BatchNorm statistics, saved like backbone.pth."""
    return Path(write_tiny_arcface(tmp_path / "backbone.pth", arch=tiny_arch)["checkpoint"])


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    files = iter_image_files(embedded_faces_dir())[:FACES]
    return torch.stack([to_tensor(square_resize(load_image(path), 128)) for path in files])


def _identity(checkpoint: Path, **args: object) -> Identity:
    return build_reward(
        RewardSpec(name="identity", args={"checkpoint": str(checkpoint), "arch": TINY, **args})
    )


def test_checkpoint_loads_with_strict_keys_through_the_reward(checkpoint: Path) -> None:
    reward = _identity(checkpoint)
    saved = torch.load(checkpoint, weights_only=True)
    loaded = reward.model.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[key], saved[key]) for key in saved)
    assert not reward.model.training


def test_mismatched_state_dicts_are_refused(checkpoint: Path, tmp_path: Path) -> None:
    state = torch.load(checkpoint, weights_only=True)
    with pytest.raises(ValueError, match=r"(?s)does not match arch 'iresnet18'.*Missing key"):
        load_iresnet(checkpoint, "iresnet18")
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"(?s)Unexpected key.*extra\.weight"):
        load_iresnet(tmp_path / "extra.pth", TINY)
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    with pytest.raises(ValueError, match="not an arcface_torch IResNet state dict"):
        load_iresnet(tmp_path / "wrapped.pth", TINY)
    with pytest.raises(ValueError, match="unknown ArcFace arch 'r50'"):
        iresnet("r50")


def _reference_forward(
    state: dict[str, torch.Tensor], layers: tuple[int, ...], x: torch.Tensor
) -> torch.Tensor:
    """arcface_torch's IResNet forward written out with torch.nn.functional on the state dict."""
    F = torch.nn.functional

    def bn(prefix: str, h: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            h,
            state[f"{prefix}.running_mean"],
            state[f"{prefix}.running_var"],
            state[f"{prefix}.weight"],
            state[f"{prefix}.bias"],
            training=False,
            eps=1e-5,
        )

    h = F.prelu(bn("bn1", F.conv2d(x, state["conv1.weight"], padding=1)), state["prelu.weight"])
    for stage, blocks in enumerate(layers, start=1):
        for index in range(blocks):
            p = f"layer{stage}.{index}"
            stride = 2 if index == 0 else 1
            out = F.conv2d(bn(f"{p}.bn1", h), state[f"{p}.conv1.weight"], padding=1)
            out = F.prelu(bn(f"{p}.bn2", out), state[f"{p}.prelu.weight"])
            out = bn(f"{p}.bn3", F.conv2d(out, state[f"{p}.conv2.weight"], stride=stride, padding=1))
            if index == 0:
                h = bn(f"{p}.downsample.1", F.conv2d(h, state[f"{p}.downsample.0.weight"], stride=2))
            h = out + h
    h = torch.flatten(bn("bn2", h), 1)
    return bn("features", F.linear(h, state["fc.weight"], state["fc.bias"]))


def test_forward_matches_the_reference_computation(checkpoint: Path, faces: torch.Tensor) -> None:
    reward = _identity(checkpoint)
    x = arcface_input(faces)
    expected = _reference_forward(torch.load(checkpoint, weights_only=True), IRESNET_LAYERS[TINY], x)
    torch.testing.assert_close(reward.model(x), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reward.embed(faces), torch.nn.functional.normalize(expected, dim=-1))


def test_iresnet50_has_the_published_parameters() -> None:
    """arcface_torch r50: 43.59 M parameters; 112 px in, 512-d embedding out."""
    with torch.device("meta"):
        model = iresnet("iresnet50")
    assert sum(p.numel() for p in model.parameters()) == 43_590_848
    keys = model.state_dict().keys()
    assert {
        "conv1.weight",
        "prelu.weight",
        "layer3.13.bn3.running_var",
        "layer1.0.downsample.1.weight",
    } <= keys
    assert {"features.weight", "features.num_batches_tracked", "bn2.bias"} <= keys
    assert "layer3.14.conv1.weight" not in keys and "layer2.1.downsample.0.weight" not in keys
    assert model.fc.weight.shape == (512, 512 * 7 * 7)
    assert model(torch.empty(2, 3, 112, 112, device="meta")).shape == (2, 512)


def test_identity_is_one_for_the_same_face_and_lower_for_another(
    checkpoint: Path, faces: torch.Tensor
) -> None:
    reward = _identity(checkpoint)
    same = reward(faces, RewardBatch([""] * FACES, clean=faces))
    torch.testing.assert_close(same, torch.ones(FACES), atol=1e-5, rtol=0)
    others = faces.roll(1, dims=0)
    different = reward(faces, RewardBatch([""] * FACES, clean=others))
    assert different.shape == (FACES,) and (different < 0.999).all() and (different >= -1).all()


def test_batching_equals_one_by_one(checkpoint: Path, faces: torch.Tensor) -> None:
    reward = _identity(checkpoint)
    noisy = (faces + 0.2 * torch.randn(faces.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    batch = reward(noisy, RewardBatch([""] * FACES, clean=faces))
    single = torch.cat(
        [reward(noisy[i : i + 1], RewardBatch([""], clean=faces[i : i + 1])) for i in range(FACES)]
    )
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)
    assert (batch < 1).all()


def test_deg_is_the_angle_between_embeddings(checkpoint: Path, faces: torch.Tensor) -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 2.0]])
    b = torch.tensor([[0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(
        embedding_angle_degrees(a, b), torch.tensor([90.0, 180.0, 0.0]), atol=1e-3, rtol=0
    )
    reward = _identity(checkpoint)
    others = faces.roll(1, dims=0)
    cosine = reward(faces, RewardBatch([""] * FACES, clean=others))
    degrees = reward.degrees(faces, others)
    torch.testing.assert_close(degrees, torch.rad2deg(torch.arccos(cosine)), atol=1e-2, rtol=0)
    torch.testing.assert_close(reward.degrees(faces, faces), torch.zeros(FACES), atol=1e-4, rtol=0)


def test_arcface_input_is_a_112px_crop_in_minus_one_one(faces: torch.Tensor) -> None:
    bright = faces * 3.0  # out of range: clamped like a saved image
    whole = arcface_input(bright)
    assert whole.shape == (FACES, 3, 112, 112) and whole.abs().max() <= 1 + 1e-6
    cropped = arcface_input(faces, crop=0.5)
    centre = torch.nn.functional.interpolate(
        faces[..., 32:96, 32:96], size=(112, 112), mode="bilinear", antialias=True
    )
    torch.testing.assert_close(cropped, centre)
    with pytest.raises(ValueError, match=r"crop must be in \(0, 1\]"):
        arcface_input(faces, crop=1.5)


def test_crop_changes_the_embedding(checkpoint: Path, faces: torch.Tensor) -> None:
    whole, cropped = _identity(checkpoint), _identity(checkpoint, crop=0.78)
    cosine = (whole.embed(faces) * cropped.embed(faces)).sum(dim=-1)
    assert (cosine < 0.999).all()


def test_missing_checkpoint_is_reported_with_where_to_get_it(tmp_path: Path) -> None:
    (unset,) = Identity.missing_weights()
    assert "args.checkpoint is not set" in unset and "ms1mv3_arcface_r50_fp16/backbone.pth" in unset
    assert "insightface" in unset
    absent = str(tmp_path / "backbone.pth")
    (missing,) = Identity.missing_weights(checkpoint=absent)
    assert f"checkpoint {absent} does not exist" in missing
    with pytest.raises(RewardError, match=rf"reward 'identity'.*checkpoint {absent} does not exist"):
        build_reward(RewardSpec(name="identity", args={"checkpoint": absent}))
    with pytest.raises(RewardError, match="missing a required argument: 'checkpoint'"):
        build_reward(RewardSpec(name="identity"))
    with pytest.raises(
        RewardError, match=r"reward weights are missing.*\n- reward 'identity': ArcFace backbone"
    ):
        check_reward_weights([RewardSpec(name="identity")])


def test_the_reward_refuses_a_batch_without_clean_faces(checkpoint: Path, faces: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="batch.clean is None"):
        _identity(checkpoint)(faces, RewardBatch([""] * FACES))
