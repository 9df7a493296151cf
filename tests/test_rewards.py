"""Rewards: registry and plugins, pyiqa fidelity, sharpness and PIQE on real faces, Eq. 12
aggregation with NaN handling, the fault-tolerant worker and its Ray actor."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from rewards import (
    PSNR,
    Reward,
    RewardAggregator,
    RewardBatch,
    RewardError,
    RewardWorker,
    build_reward,
    collect_scores,
    make_reward_actor,
    registered_rewards,
    reward_class,
    reward_resources,
    submit_scores,
)
from rlrestore.config import RewardSpec, Stage2Config
from rlrestore.data import embedded_faces_dir, iter_image_files, load_image, square_resize, to_tensor
from rlrestore.nft import group_normalize

SIZE = 64
FACES = 6
THIS = __name__  # "tests.test_rewards": plugin rewards below are named by module:Class path


class Brightness(Reward):
    """A plugin reward: mean pixel value plus an offset."""

    def __init__(self, device: torch.device | str = "cpu", offset: float = 0.0) -> None:
        super().__init__(device)
        self.offset = offset

    def score(self, images: torch.Tensor, batch: RewardBatch) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3)) + self.offset


class FailOnFlag(Reward):
    """Raises for a chunk holding a sample whose metadata says ``fail``; else scores 1."""

    name = "flaky"

    def score(self, images: torch.Tensor, batch: RewardBatch) -> torch.Tensor:
        if any(meta.get("fail") for meta in batch.metadata):
            raise RuntimeError("scorer exploded")
        return torch.ones(images.shape[0])


class AutocastProbe(Reward):
    """Scores 1 if it runs under CPU autocast to bf16, else 0 (a reward that allows autocast)."""

    name = "probe_autocast"
    autocast = True

    def score(self, images: torch.Tensor, batch: RewardBatch) -> torch.Tensor:
        bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        return torch.full((images.shape[0],), float(bf16))


class Float32Probe(AutocastProbe):
    """The same probe in a reward that keeps the float32 default."""

    name = "probe_float32"
    autocast = False


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    files = iter_image_files(embedded_faces_dir())[:FACES]
    return torch.stack([to_tensor(square_resize(load_image(path), SIZE)) for path in files])


def _noisy(faces: torch.Tensor, std: float = 0.1) -> torch.Tensor:
    noise = torch.randn(faces.shape, generator=torch.Generator().manual_seed(0))
    return (faces + std * noise).clamp(-1, 1)


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    size = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur(images, [size, size], [sigma, sigma])


def _captions(n: int) -> list[str]:
    return [""] * n


# ---------------------------------------------------------------- registry


def test_registry_resolves_names_and_module_class_paths(faces: torch.Tensor) -> None:
    assert {"psnr", "ssim", "sharpness", "piqe"} <= set(registered_rewards())
    assert reward_class("psnr") is PSNR
    assert reward_class(f"{THIS}:Brightness") is Brightness

    reward = build_reward(RewardSpec(name=f"{THIS}:Brightness", args={"offset": 0.5}))
    assert reward.name == "Brightness"
    scores = reward(faces, RewardBatch(_captions(FACES)))
    assert scores.dtype == torch.float32 and scores.shape == (FACES,)
    torch.testing.assert_close(scores, faces.mean(dim=(1, 2, 3)) + 0.5)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nope", r"unknown reward 'nope'; registered rewards: .*psnr, serve, sharpness, ssim"),
        (f"{THIS}:Missing", "has no attribute 'Missing'"),
        ("tests.no_such_module:Reward", "cannot import module 'tests.no_such_module'"),
        ("torch:Tensor", "not a concrete subclass of rewards.Reward"),
        ("rewards:Reward", "not a concrete subclass"),
        (":Brightness", "must look like 'package.module:Class'"),
    ],
)
def test_unresolvable_rewards_say_why(name: str, message: str) -> None:
    with pytest.raises(RewardError, match=message):
        reward_class(name)


def test_bad_constructor_args_name_the_reward_and_the_arg() -> None:
    with pytest.raises(RewardError, match=r"reward 'psnr': bad args .*'gamma'.*accepts \['test_y_channel'"):
        build_reward(RewardSpec(name="psnr", args={"gamma": 2.0}))
    with pytest.raises(RewardError, match="'device' is set by the reward actor"):
        build_reward(RewardSpec(name="sharpness", args={"device": "cuda"}))
    with pytest.raises(RewardError, match=r"reward 'ssim' with args .*color_space must be one of"):
        build_reward(RewardSpec(name="ssim", args={"color_space": "no-such-space"}))


def test_reward_output_is_checked() -> None:
    class WrongShape(Reward):
        def score(self, images: torch.Tensor, batch: RewardBatch) -> torch.Tensor:
            return torch.zeros(images.shape[0], 2)

    with pytest.raises(ValueError, match=r"'WrongShape' must return one score per image \(2,\)"):
        WrongShape()(torch.zeros(2, 3, 8, 8), RewardBatch(_captions(2)))
    with pytest.raises(ValueError, match="2 images but a batch of 3"):
        WrongShape()(torch.zeros(2, 3, 8, 8), RewardBatch(_captions(3)))
    with pytest.raises(ValueError, match="one clean face per caption"):
        RewardBatch(_captions(2), clean=torch.zeros(3, 3, 8, 8))


# ---------------------------------------------------------------- fidelity and quality


@pytest.mark.parametrize("name", ["psnr", "ssim"])
def test_fidelity_prefers_the_clean_face_and_matches_pyiqa(faces: torch.Tensor, name: str) -> None:
    import pyiqa

    reward = build_reward(RewardSpec(name=name))
    batch = RewardBatch(_captions(FACES), clean=faces)
    noisy = _noisy(faces)
    clean_scores, noisy_scores = reward(faces, batch), reward(noisy, batch)
    assert (clean_scores > noisy_scores).all()

    direct = pyiqa.create_metric(name, device="cpu", as_loss=False)((noisy + 1) / 2, (faces + 1) / 2)
    torch.testing.assert_close(noisy_scores, direct.float(), rtol=1e-6, atol=1e-6)


def test_fidelity_requires_clean_faces(faces: torch.Tensor) -> None:
    with pytest.raises(
        ValueError, match=r"'psnr' compares each image with its clean face.*batch.clean is None"
    ):
        build_reward(RewardSpec(name="psnr"))(faces, RewardBatch(_captions(FACES)))
    with pytest.raises(ValueError, match="must have the same shape"):
        build_reward(RewardSpec(name="ssim"))(
            faces, RewardBatch(_captions(FACES), clean=faces[..., :32, :32])
        )


def test_sharpness_prefers_sharp_faces_and_falls_with_blur(faces: torch.Tensor) -> None:
    sharpness = build_reward(RewardSpec(name="sharpness"))
    batch = RewardBatch(_captions(FACES))
    scores = torch.stack([sharpness(_blur(faces, sigma), batch) for sigma in (0.5, 1.0, 2.0, 4.0)])
    scores = torch.cat([sharpness(faces, batch)[None], scores])
    assert (scores[:-1] > scores[1:]).all(), scores  # strictly decreasing in sigma, for every face
    assert (scores[0] > 5).all() and (scores[0] < 30).all()  # grey levels per pixel at 64 px
    assert sharpness(torch.zeros(2, 3, SIZE, SIZE), RewardBatch(_captions(2))).eq(0).all()


def test_piqe_is_negated_and_prefers_sharp_faces(faces: torch.Tensor) -> None:
    import pyiqa

    piqe = build_reward(RewardSpec(name="piqe"))
    batch = RewardBatch(_captions(FACES))
    scores = piqe(faces, batch)
    direct = pyiqa.create_metric("piqe", device="cpu")((faces + 1) / 2)
    torch.testing.assert_close(scores, -direct.float())
    assert (scores > piqe(_blur(faces, 2.0), batch)).all()


def test_batched_scoring_equals_one_by_one(faces: torch.Tensor) -> None:
    names = ["psnr", "ssim", "sharpness", "piqe"]
    worker = RewardWorker([RewardSpec(name=name) for name in names], batch_size=4)
    images = _noisy(faces)
    batched = worker.score(images, RewardBatch(_captions(FACES), clean=faces))
    assert list(batched) == names
    for reward in worker.rewards:
        single = torch.cat(
            [
                reward(images[i : i + 1], RewardBatch(_captions(1), clean=faces[i : i + 1]))
                for i in range(FACES)
            ]
        )
        torch.testing.assert_close(batched[reward.name], single, rtol=1e-5, atol=1e-5)
    assert worker.errors == []


# ---------------------------------------------------------------- aggregation


def _aggregator(**kwargs) -> RewardAggregator:
    specs = [RewardSpec(name="sharpness", weight=2.0), RewardSpec(name="psnr", weight=-0.5),
             RewardSpec(name="ssim", weight=0.0)]  # fmt: skip
    return RewardAggregator(specs, **kwargs)


def _scores(groups: int = 3, candidates: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {name: torch.randn(groups * candidates, generator=gen) for name in ("sharpness", "psnr", "ssim")}


def test_aggregator_weights_and_eq12(faces: torch.Tensor) -> None:
    scores = _scores()
    result = _aggregator(clip=3.0, eps=1e-3).combine(scores, groups=3, candidates=4)
    expected_total = (2.0 * scores["sharpness"] - 0.5 * scores["psnr"]).reshape(3, 4).double()
    torch.testing.assert_close(result.total, expected_total)
    reference = group_normalize(expected_total, clip=3.0, eps=1e-3)
    torch.testing.assert_close(result.r, reference.r.float())
    assert result.valid.all() and result.valid_group.all()

    metrics = result.metrics
    for name in ("sharpness", "psnr", "ssim", "total"):
        assert f"reward/{name}/mean" in metrics and f"reward/{name}/std" in metrics
        assert metrics[f"reward/nonfinite/{name}"] == 0
    assert metrics["reward/psnr/mean"] == pytest.approx(float(scores["psnr"].double().mean()))
    assert metrics["reward/r_mean"] == pytest.approx(float(reference.r.mean()))
    assert metrics["reward/r_min"] >= 0 and metrics["reward/r_max"] <= 1
    assert metrics["reward/dropped_groups"] == 0 and metrics["reward/valid_fraction"] == 1
    assert metrics["reward/std_all"] == pytest.approx(float(expected_total.std(correction=0)))


def test_aggregator_drops_flat_groups_and_masks_nonfinite() -> None:
    scores = _scores()
    scores["sharpness"][0:4] = 1.0  # group 0: every candidate gets the same total ...
    scores["psnr"][0:4] = 2.0
    scores["sharpness"][6] = math.nan  # group 1, candidate 2: weighted component fails
    scores["psnr"][11] = math.inf  # group 2, candidate 3: weighted component fails
    scores["ssim"][8] = math.nan  # weight 0: reported, does not touch the total
    result = _aggregator().combine(scores, groups=3, candidates=4)

    assert result.valid_group.tolist() == [False, True, True]
    expected_valid = torch.ones(3, 4, dtype=torch.bool)
    expected_valid[0] = False
    expected_valid[1, 2] = expected_valid[2, 3] = False
    assert torch.equal(result.valid, expected_valid)
    assert torch.isfinite(result.r).all() and (result.r[~result.valid] == 0.5).all()
    assert torch.isfinite(result.total[2, 0])  # the ssim NaN did not reach the total
    metrics = result.metrics
    assert metrics["reward/dropped_groups"] == pytest.approx(1 / 3)
    assert metrics["reward/nonfinite/sharpness"] == 1
    assert metrics["reward/nonfinite/psnr"] == 1
    assert metrics["reward/nonfinite/ssim"] == 1
    assert metrics["reward/nonfinite/total"] == 2
    assert metrics["reward/valid_fraction"] == pytest.approx(6 / 12)
    assert all(math.isfinite(value) for value in metrics.values())


def test_aggregator_rejects_bad_setups() -> None:
    with pytest.raises(ValueError, match="every reward weight is 0"):
        RewardAggregator([RewardSpec(name="psnr", weight=0.0)])
    with pytest.raises(ValueError, match="'psnr' is configured twice"):
        RewardAggregator([RewardSpec(name="psnr"), RewardSpec(name="psnr")])
    aggregator = _aggregator()
    scores = _scores()
    with pytest.raises(ValueError, match=r"missing \['ssim'\], unexpected \['extra'\]"):
        aggregator.combine(
            {**{k: v for k, v in scores.items() if k != "ssim"}, "extra": scores["ssim"]}, 3, 4
        )
    with pytest.raises(ValueError, match=r"'sharpness' must have shape \(8,\)"):
        aggregator.combine(scores, groups=2, candidates=4)
    default = RewardAggregator.from_config(Stage2Config())
    assert (default.clip, default.eps) == (5.0, 1e-4)
    assert default.weights == {"sharpness": 1.0, "psnr": 0.0}


# ---------------------------------------------------------------- workers and actors


def test_worker_turns_a_raising_reward_into_nan_and_an_error(faces: torch.Tensor) -> None:
    specs = [RewardSpec(name="sharpness"), RewardSpec(name=f"{THIS}:FailOnFlag")]
    worker = RewardWorker(specs, batch_size=2)
    metadata = [{"fail": i == 3} for i in range(FACES)]
    scores = worker.score(faces, RewardBatch(_captions(FACES), metadata=metadata))

    assert torch.isfinite(scores["sharpness"]).all()
    flaky = scores["flaky"]
    assert torch.isnan(flaky[2:4]).all() and flaky[[0, 1, 4, 5]].eq(1).all()  # only the failing chunk
    assert len(worker.errors) == 1
    error = worker.errors[0]
    assert (error.reward, error.start, error.stop) == ("flaky", 2, 4)
    assert error.error == "RuntimeError: scorer exploded"
    assert "scorer exploded" in error.traceback
    assert worker.take_errors() == [error] and worker.errors == []

    specs = [RewardSpec(name="sharpness"), RewardSpec(name=f"{THIS}:FailOnFlag")]
    result = RewardAggregator(specs).combine(scores, groups=2, candidates=3)
    assert result.valid.tolist() == [[True, True, False], [False, True, True]]
    assert result.metrics["reward/nonfinite/flaky"] == 2


def test_worker_rejects_malformed_calls(faces: torch.Tensor) -> None:
    worker = RewardWorker([RewardSpec(name="psnr")])
    with pytest.raises(ValueError, match=r"rewards \['psnr'\] compare with the clean faces"):
        worker.score(faces, RewardBatch(_captions(FACES)))
    with pytest.raises(ValueError, match="6 images but a RewardBatch of 2"):
        worker.score(faces, RewardBatch(_captions(2)))
    with pytest.raises(ValueError, match=r"\['sharpness'\] are configured more than once"):
        RewardWorker([RewardSpec(name="sharpness"), RewardSpec(name="sharpness")])


@pytest.mark.slow
def test_ray_actor_scores_like_the_plain_worker(faces: torch.Tensor, ray_cluster) -> None:
    import ray

    specs = [RewardSpec(name="sharpness"), RewardSpec(name="psnr"), RewardSpec(name=f"{THIS}:FailOnFlag")]
    assert reward_resources(specs) == {"num_cpus": 0.75, "num_gpus": 0.0}
    images = _noisy(faces)
    metadata = [{"fail": i == 0} for i in range(FACES)]
    batch = RewardBatch(_captions(FACES), clean=faces, metadata=metadata)

    actor = make_reward_actor(specs, {"num_cpus": 0.5}, batch_size=4, precision="bf16-mixed", group="cpu")
    try:
        remote = collect_scores(submit_scores(actor, images, batch))
        remote_errors = ray.get(actor.take_errors.remote())
        record = ray.get(actor.device_record.remote("cpu 0"))
    finally:
        ray.kill(actor)
    # No GPU reserved: the CPU; none of these rewards runs under autocast.
    assert (record.role, record.actor, record.device, record.precision) == ("reward", "cpu 0", "cpu", "bf16-mixed")
    assert (record.dtype, record.autocast, record.gpu_ids) == ("float32", None, [])
    local_worker = RewardWorker(specs, batch_size=4)
    local = local_worker.score(images, batch)

    assert list(remote) == list(local) == ["sharpness", "psnr", "flaky"]
    for name in local:
        torch.testing.assert_close(remote[name], local[name], rtol=1e-6, atol=1e-6, equal_nan=True)
    assert [(e.reward, e.start, e.stop) for e in remote_errors] == [("flaky", 0, 4)]


# ---------------------------------------------------------------- precision
def test_only_autocast_rewards_score_under_mixed_precision_autocast() -> None:
    """bf16-mixed: a reward with ``autocast`` is scored inside autocast (entered in the scoring
    thread), the others in float32; fp32 runs everything in float32."""
    from rewards.worker import RewardActor

    specs = [RewardSpec(name=f"{THIS}:AutocastProbe"), RewardSpec(name=f"{THIS}:Float32Probe")]
    images = torch.zeros(3, 3, 8, 8)
    mixed = RewardWorker(specs, precision="bf16-mixed").score(images, RewardBatch(_captions(3)))
    assert mixed["probe_autocast"].tolist() == [1.0] * 3 and mixed["probe_float32"].tolist() == [0.0] * 3
    plain = RewardWorker(specs).score(images, RewardBatch(_captions(3)))
    assert plain["probe_autocast"].tolist() == [0.0] * 3
    record = RewardActor(specs, "cpu", 0.0, 4, None, "bf16-mixed").device_record("default 0")
    assert (record.device, record.dtype, record.autocast) == ("cpu", "float32", "bfloat16")
    assert RewardActor(specs, "cpu", 0.0, 4, None).device_record("default 0").autocast is None


def test_which_built_in_rewards_autocast() -> None:
    """The CLIP-based preference rewards allow autocast; pixel metrics, pyiqa models, ArcFace and
    the landmark detector stay float32."""
    autocast = {name for name in registered_rewards() if reward_class(name).autocast}
    assert autocast == {"hpsv2", "pickscore", "clipscore", "clipscore_image"}
