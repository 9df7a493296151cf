"""LMD reward (rewards.landmarks) and the AWing FAN landmark network (rewards.networks.awing).

A tiny FAN (2 hourglasses of depth 1 on 32 channels) with random weights is saved in facexlib's
file layout (``{'state_dict': ...}``) and loaded through the reward's own code path
(``torch.load(weights_only=True)``, ``strict=True``). The full published network is only built on
the meta device, to check its parameter names and count. Where facexlib is installed (pyiqa pulls
it in; rlrestore does not depend on it) its ``awing_arch.py`` is loaded as a file and used as an
oracle: same state-dict keys and shapes, bit-identical forward pass, same landmark decoding.
"""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from rewards import LandmarkDistance, RewardBatch, RewardError, build_reward, reward_class
from rewards.landmarks import AWING_URL, default_awing_path, load_awing_fan
from rewards.networks.awing import FAN, AddCoordsTh, fan_input, heatmap_points
from rlrestore.config import EvalConfig, RewardSpec
from rlrestore.data import embedded_faces_dir, iter_image_files, load_image, square_resize, to_tensor
from rlrestore.orchestration.evaluation import plan_metrics

PUBLISHED_PARAMETERS = 24_153_036  # FAN(num_modules=4, num_landmarks=98), see _reference_parameter_count
TINY = {"num_modules": 2, "hourglass_depth": 1, "width": 32}


def _conv_block_parameters(inp: int, out: int) -> int:
    """Parameters of facexlib's ConvBlock(inp, out): three BN + conv3x3 (no bias) steps, 1x1 shortcut."""
    half, quarter = out // 2, out // 4
    count = 2 * inp + 9 * inp * half + 2 * half + 9 * half * quarter + 2 * quarter + 9 * quarter * quarter
    return count + (2 * inp + inp * out if inp != out else 0)


def _reference_parameter_count(modules: int = 4, depth: int = 4, landmarks: int = 98) -> int:
    """The published FAN's parameter count, from the reference definition (not from our class)."""
    heat = landmarks + 1
    stem = (64 * (3 + 3) * 49 + 64) + 2 * 64  # conv1: CoordConv (rgb + xx, yy, r) 7x7 with bias; bn1
    stem += (
        _conv_block_parameters(64, 128) + _conv_block_parameters(128, 128) + _conv_block_parameters(128, 256)
    )
    total = stem
    for i in range(modules):
        coord_in = 256 + 3 + (0 if i == 0 else 2)  # boundary xx, yy from the second hourglass on
        total += 256 * coord_in + 256  # m{i}.coordconv.conv (1x1, bias)
        total += (3 * depth + 1) * _conv_block_parameters(256, 256)  # b1_k, b2_k, b3_k, b2_plus_1
        total += _conv_block_parameters(256, 256)  # top_m_{i}
        total += (256 * 256 + 256) + 2 * 256 + (256 * heat + heat)  # conv_last, bn_end, l
        if i < modules - 1:
            total += (256 * 256 + 256) + (heat * 256 + 256)  # bl, al
    return total


def _facexlib_awing() -> types.ModuleType:
    """facexlib's awing_arch.py loaded as a file (the package __init__ imports far more), or skip."""
    spec = importlib.util.find_spec("facexlib")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("facexlib is not installed (it is only an oracle for these checks)")
    path = Path(spec.submodule_search_locations[0]) / "alignment" / "awing_arch.py"
    module_spec = importlib.util.spec_from_file_location("facexlib_awing_arch_oracle", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    # facexlib 0.3.0's calculate_points uses np.float, gone in NumPy 2: give it the float64 it meant.
    shim = types.ModuleType("numpy_shim")
    shim.__dict__.update(vars(np))
    shim.float = np.float64
    module.np = shim
    return module


def _randomise_batchnorm(model: torch.nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            size = module.num_features
            module.weight.data = torch.rand(size, generator=generator) + 0.5
            module.bias.data = torch.randn(size, generator=generator) * 0.1
            module.running_mean = torch.randn(size, generator=generator) * 0.1
            module.running_var = torch.rand(size, generator=generator) + 0.5


def _write_tiny_awing(path: Path, seed: int = 0) -> Path:
    """A random tiny FAN saved as facexlib's alignment_WFLW_4HG.pth is (``{'state_dict': ...}``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FAN(**TINY)
    _randomise_batchnorm(model, torch.Generator().manual_seed(seed))
    torch.save({"state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tiny_awing(tmp_path_factory.mktemp("awing") / "alignment_WFLW_4HG.pth")


@pytest.fixture(scope="module")
def reward(checkpoint: Path) -> LandmarkDistance:
    return build_reward(RewardSpec(name="lmd", args={"checkpoint": str(checkpoint)}))


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    files = iter_image_files(embedded_faces_dir())[:3]
    return torch.stack([to_tensor(square_resize(load_image(path), 128)) for path in files])


# ------------------------------------------------------------------------------------ architecture
def test_full_size_fan_has_the_published_names_and_parameter_count() -> None:
    with torch.device("meta"):
        model = FAN()
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS == _reference_parameter_count()
    assert len(state) == 1137  # 184 BatchNorms x 5 entries + 217 conv weights / biases
    assert state["conv1.conv.weight"].shape == (64, 6, 7, 7)
    assert state["m0.coordconv.conv.weight"].shape == (256, 259, 1, 1)  # first hourglass: no boundary
    assert state["m3.coordconv.conv.weight"].shape == (256, 261, 1, 1)
    assert state["m2.b2_plus_1.conv3.weight"].shape == (64, 64, 3, 3)
    assert state["conv4.downsample.2.weight"].shape == (256, 128, 1, 1)
    assert state["l3.weight"].shape == (99, 256, 1, 1) and "al2.weight" in state and "bl3.weight" not in state
    reference = _facexlib_awing()
    with torch.device("meta"):
        expected = reference.FAN(num_modules=4, num_landmarks=98).state_dict()
    assert list(state) == list(expected)
    assert all(state[key].shape == expected[key].shape for key in expected)


def test_forward_is_bit_identical_to_facexlib() -> None:
    reference = _facexlib_awing()
    generator = torch.Generator().manual_seed(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        theirs = reference.FAN(num_modules=2, num_landmarks=98).eval()
    _randomise_batchnorm(theirs, generator)
    ours = FAN(num_modules=2).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    image = torch.rand(1, 3, 256, 256, generator=generator)
    with torch.no_grad():
        (expected, expected_boundary), (got, got_boundary) = theirs(image), ours(image)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(got_boundary, expected_boundary, strict=True))
    # the boundary channels: a heatmap whose last map is partly above 0.05, partly below
    features = torch.randn(2, 8, 64, 64, generator=generator)
    heatmap = torch.rand(2, 99, 64, 64, generator=generator) * 0.1
    mine = AddCoordsTh(64, 64, with_r=True, with_boundary=True)(features, heatmap)
    assert mine.shape == (2, 8 + 5, 64, 64) and 0 < (mine[:, -1] != 0).float().mean() < 1
    assert torch.equal(mine, reference.AddCoordsTh(64, 64, True, True)(features, heatmap))


# ---------------------------------------------------------------------------------------- decoding
def test_heatmap_points_decode_a_known_peak_by_arithmetic() -> None:
    heatmaps = torch.zeros(2, 3, 64, 64)
    heatmaps[0, 0, 30, 20] = 1.0  # landmark 0: row 30, column 20
    heatmaps[0, 0, 30, 21] = 0.6  # right neighbour larger than the left (0): x + 0.25
    heatmaps[0, 0, 29, 20] = 0.5  # the cell above larger than the one below: y - 0.25
    heatmaps[0, 1, 10, 40] = 1.0  # isolated peak: no sub-cell move
    heatmaps[0, 2, 50, 5] = 1.0
    heatmaps[0, 2, 50, 4] = 0.2  # left larger: x - 0.25
    heatmaps[0, 2, 51, 5] = 0.3  # below larger: y + 0.25
    heatmaps[1] = heatmaps[0].flip(-1)  # the mirror image: x -> 63 - x
    points = heatmap_points(heatmaps)
    expected = torch.tensor([[20.75, 30.25], [40.5, 10.5], [5.25, 50.75]], dtype=torch.float64)
    assert points.dtype == torch.float64 and points.shape == (2, 3, 2)
    assert torch.equal(points[0], expected)
    mirrored = expected.clone()
    mirrored[:, 0] = torch.tensor([63 - 20 - 0.25 + 0.5, 63 - 40 + 0.5, 63 - 5 + 0.25 + 0.5])
    assert torch.equal(points[1], mirrored)

    # a 512 px face: pixel coordinates are cell coordinates times 512 / 64
    model = FAN(**TINY).eval()
    model.forward = lambda x: ([torch.cat([heatmaps, torch.zeros(2, 1, 64, 64)], 1)], [])
    landmarks = model.get_landmarks(torch.zeros(2, 3, 512, 512))
    assert torch.equal(landmarks[0], expected * 8)
    assert landmarks.shape == (2, 3, 2)
    wide = model.get_landmarks(torch.zeros(2, 3, 128, 256))  # x scales by W / 64, y by H / 64
    assert torch.equal(wide[0], expected * torch.tensor([4.0, 2.0], dtype=torch.float64))


def test_heatmap_points_agree_with_facexlib_image_by_image() -> None:
    reference = _facexlib_awing()
    generator = torch.Generator().manual_seed(2)
    heatmaps = torch.rand(7, 98, 64, 64, generator=generator)
    heatmaps[..., -1, -1] = -1.0  # facexlib fails (index error) for a peak in the last cell
    # a peak in the top row, the first cell, the first cell of row 1 (the "<= 0" rule), the bottom
    # row, the left and right edges (neighbours wrap across rows), an inner cell
    corners = [(0, 10), (0, 0), (1, 0), (63, 10), (10, 0), (10, 63), (30, 30)]
    for image, (row, col) in enumerate(corners):
        heatmaps[image, 7, row, col] = 2.0
    points = heatmap_points(heatmaps).numpy()
    for image in range(len(heatmaps)):
        expected = reference.calculate_points(heatmaps[image : image + 1].numpy())
        np.testing.assert_array_equal(points[image : image + 1], expected)


def test_fan_input_matches_opencv_resize() -> None:
    cv2 = pytest.importorskip("cv2")
    generator = np.random.default_rng(3)
    for height, width in [(512, 512), (256, 256), (300, 200)]:
        image = generator.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        expected = cv2.resize(image, (256, 256)).astype(np.float32) / 255.0  # what facexlib feeds
        got = fan_input(to_tensor(image)[None].add(1).div(2))[0].permute(1, 2, 0).numpy()
        tolerance = 0 if height in (256, 512) else 1 / 255 + 1e-6  # OpenCV's fixed-point weights
        np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance)


# ------------------------------------------------------------------------------------------ reward
def test_tiny_checkpoint_loads_strictly_through_the_reward(
    reward: LandmarkDistance, checkpoint: Path
) -> None:
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    loaded = reward.model.state_dict()
    assert list(loaded) == list(saved) and all(torch.equal(loaded[key], saved[key]) for key in saved)
    assert (reward.model.num_modules, reward.model.m0.depth, reward.model.m0.features) == (2, 1, 32)
    assert not reward.model.training
    assert reward_class("lmd") is LandmarkDistance
    assert LandmarkDistance.needs_clean and not LandmarkDistance.higher_is_better


def test_other_layouts_and_wrong_files(checkpoint: Path, tmp_path: Path) -> None:
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    torch.save(state, tmp_path / "bare.pth")  # a bare state dict is accepted too
    assert load_awing_fan(tmp_path / "bare.pth").num_modules == 2
    torch.save({"state_dict": {**state, "extra.weight": torch.zeros(1)}}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"(?s)does not match the AWing FAN.*extra\.weight"):
        load_awing_fan(tmp_path / "extra.pth")
    torch.save({"model": state}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an AWing FAN checkpoint"):
        load_awing_fan(tmp_path / "other.pth")


def test_lmd_is_zero_for_the_same_face_and_positive_for_another(
    reward: LandmarkDistance, faces: torch.Tensor
) -> None:
    captions = [""] * len(faces)
    same = reward(faces, RewardBatch(captions, clean=faces.clone()))
    assert same.shape == (len(faces),) and same.dtype == torch.float32
    assert torch.equal(same, torch.zeros(len(faces)))
    other = faces.roll(1, dims=0)  # each face against another person's face
    distance = -reward(faces, RewardBatch(captions, clean=other))  # the reward negates: lower is better
    assert distance.shape == (len(faces),) and (distance > 0).all() and distance.isfinite().all()
    # the score is the mean over the 98 landmarks of the pixel distance
    points = reward.landmarks(torch.cat([faces, other]))
    assert points.shape == (2 * len(faces), 98, 2) and points.min() >= 0 and points.max() <= 128
    expected = (points[: len(faces)] - points[len(faces) :]).norm(dim=-1).mean(dim=-1).float()
    torch.testing.assert_close(distance, expected)
    one_by_one = torch.cat(
        [reward(faces[i : i + 1], RewardBatch([""], clean=other[i : i + 1])) for i in range(len(faces))]
    )
    torch.testing.assert_close(one_by_one, -distance, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="must have the same shape"):
        reward(faces, RewardBatch(captions, clean=faces[..., :64, :64]))


# ------------------------------------------------------------------------------- weights and eval
def test_missing_weights_name_the_url_and_the_path(tmp_path: Path) -> None:
    default = default_awing_path()
    assert default == Path(torch.hub.get_dir()) / "checkpoints" / "alignment_WFLW_4HG.pth"
    (message,) = LandmarkDistance.missing_weights()
    assert AWING_URL in message and str(default) in message and "landmark" in message
    absent = tmp_path / "nowhere" / "alignment_WFLW_4HG.pth"
    (message,) = LandmarkDistance.missing_weights(checkpoint=str(absent))
    assert AWING_URL in message and str(absent) in message
    with pytest.raises(RewardError, match="AWing FAN") as error:
        build_reward(RewardSpec(name="lmd", args={"checkpoint": str(absent)}))
    assert AWING_URL in str(error.value) and str(absent) in str(error.value)


def test_eval_plans_lmd_when_its_weights_exist(checkpoint: Path, tmp_path: Path) -> None:
    _, skipped = plan_metrics(EvalConfig(metrics=["lmd"]), has_gt=True, has_reference=False)
    assert skipped["lmd"].startswith("weights missing: AWing FAN face-landmark model")
    assert AWING_URL in skipped["lmd"] and str(default_awing_path()) in skipped["lmd"]
    config = EvalConfig(metrics=["lmd"], metric_args={"lmd": {"checkpoint": str(checkpoint)}})
    (metric,), skipped = plan_metrics(config, has_gt=True, has_reference=False)
    assert not skipped and metric.needs_gt and metric.negate and not metric.higher_is_better
    assert metric.values(torch.tensor([-1.5, -0.0])).tolist() == [1.5, 0.0]  # raw distances reported
    _, skipped = plan_metrics(config, has_gt=False, has_reference=False)
    assert "full-reference" in skipped["lmd"]
