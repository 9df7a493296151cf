"""Rollout worker: shapes, determinism across workers, weight versions, and the Ray actor."""

from __future__ import annotations

import pytest
import ray
import torch

from rlrestore.config import DegradationConfig, SamplerConfig
from rlrestore.data import build_shards, embedded_faces_dir
from rollouts import RolloutWorker, make_rollout_actor
from tests.conftest import build_tiny_policy

SAMPLER = SamplerConfig(steps=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("rollouts")
    build_tiny_policy(0).save_pretrained(root / "policy")
    build_shards(embedded_faces_dir(), root / "shards", image_size=64, shard_size=32, progress=False)
    return {
        "policy_dir": str(root / "policy"),
        "shards": str(root / "shards"),
        "degradation": DegradationConfig().model_dump(mode="json"),
        "data_seed": 3,
        "holdout": 4,
    }


def test_rollout_shapes_and_candidates(setup: dict) -> None:
    worker = RolloutWorker(**setup)
    assert worker.num_samples() == 67 - 4
    seeds = torch.tensor([[1, 2, 3], [4, 5, 6]])
    batch = worker.rollout([0, 5], epoch=0, seeds=seeds, sampler=SAMPLER)
    assert batch.x0.shape == (2, 3, 32, 8, 8)
    assert batch.images.shape == (2, 3, 3, 64, 64)
    assert batch.lq.shape == batch.clean.shape == (2, 3, 64, 64)
    # one condition per input (not per candidate): 64 codes + the trigger, and z_low
    assert batch.condition.semantic.shape == (2, 64 + 1, 64)
    assert batch.condition.z_low.shape == (2, 32, 8, 8)
    assert batch.policy_version == 0 and len(batch.ids) == 2
    assert not torch.allclose(batch.x0[0, 0], batch.x0[0, 1])
    assert not torch.equal(batch.lq, batch.clean)


def test_two_workers_agree_and_epochs_change_the_degradation(setup: dict) -> None:
    first, second = RolloutWorker(**setup), RolloutWorker(**setup)
    seeds = torch.tensor([[11, 12]])
    a = first.rollout([7], epoch=2, seeds=seeds, sampler=SAMPLER)
    b = second.rollout([7], epoch=2, seeds=seeds, sampler=SAMPLER)
    assert torch.equal(a.lq, b.lq) and torch.equal(a.x0, b.x0)
    c = first.rollout([7], epoch=3, seeds=seeds, sampler=SAMPLER)
    assert not torch.equal(a.lq, c.lq)


def test_new_weights_change_the_policy_and_versions_only_move_forward(setup: dict) -> None:
    worker = RolloutWorker(**setup)
    seeds = torch.tensor([[5]])
    before = worker.rollout([1], epoch=0, seeds=seeds, sampler=SAMPLER)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in worker.velocity_state().items()}
    assert worker.load_weights(1, state) == 1
    after = worker.rollout([1], epoch=0, seeds=seeds, sampler=SAMPLER)
    assert after.policy_version == 1
    assert not torch.allclose(before.x0, after.x0)
    with pytest.raises(ValueError, match="older"):
        worker.load_weights(0, state)
    with pytest.raises(ValueError, match="rows"):
        worker.rollout([1, 2], epoch=0, seeds=seeds, sampler=SAMPLER)


@pytest.mark.slow
def test_rollout_actor_matches_the_plain_worker(setup: dict, ray_cluster) -> None:
    actor = make_rollout_actor(num_cpus=0.5, num_gpus=0, **setup)
    seeds = torch.tensor([[21, 22]])
    remote = ray.get(actor.rollout.remote([3], 1, seeds, SAMPLER))
    local = RolloutWorker(**setup).rollout([3], epoch=1, seeds=seeds, sampler=SAMPLER)
    assert torch.allclose(remote.x0, local.x0, atol=1e-5)
    assert remote.ids == local.ids
    ray.kill(actor)


def test_rollout_workers_take_the_device_their_resources_give(setup: dict, monkeypatch) -> None:
    from rlrestore.runtime.devices import DeviceError, actor_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"rollout actors reserved 1 GPU \(stage2.resources.rollout.num_gpus\) but CUDA"):
        RolloutWorker(**setup, num_gpus=1)
    with pytest.raises(DeviceError, match="device=cuda, but Stage 2 rollout actors reserve no GPU"):
        RolloutWorker(**setup, device="cuda")
    assert RolloutWorker(**setup, num_gpus=0).device == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # inside a Ray actor the GPU Ray assigned is cuda:0 (CUDA_VISIBLE_DEVICES names only it)
    assert actor_device("auto", 0.25, "Stage 2 rollout actors") == torch.device("cuda", 0)
    assert actor_device("auto", 0, "Stage 2 rollout actors") == torch.device("cpu")


def test_bf16_rollouts_keep_a_float32_sampler_state(setup: dict) -> None:
    fp32 = RolloutWorker(**setup)
    mixed = RolloutWorker(**setup, precision="bf16-mixed")
    assert mixed.policy.transformer.dtype == torch.bfloat16
    seeds = torch.tensor([[7, 8]])
    a = fp32.rollout([2], epoch=0, seeds=seeds, sampler=SAMPLER)
    b = mixed.rollout([2], epoch=0, seeds=seeds, sampler=SAMPLER)
    assert b.x0.dtype == b.images.dtype == torch.float32
    # same restoration up to bf16 rounding of the networks
    assert (a.images - b.images).abs().mean() < 0.05
