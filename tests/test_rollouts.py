"""Rollout worker: shapes, determinism across workers, weight versions, and the Ray actor."""

from __future__ import annotations

import pytest
import ray
import torch

from rlrestore.config import DegradationConfig, SamplerConfig
from rlrestore.data import build_shards, embedded_faces_dir
from rlrestore.models.lora import add_lora, merged_state_dict
from rlrestore.runtime.dataplane import WeightUpdate, from_uint8_images, payload_bytes
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
    assert batch.x0.shape == (2, 3, 32, 8, 8) and batch.x0.dtype == torch.float32
    assert batch.images.shape == (2, 3, 3, 64, 64) and batch.images.dtype == torch.uint8
    assert batch.reward.lq.shape == batch.reward.clean.shape == (2, 3, 64, 64)
    # one condition per input (not per candidate): 64 codes + the trigger, and z_low
    assert batch.condition.semantic.shape == (2, 64 + 1, 64)
    assert batch.condition.z_low.shape == (2, 32, 8, 8)
    assert batch.policy_version == 0 and len(batch.ids) == 2
    assert not torch.allclose(batch.x0[0, 0], batch.x0[0, 1])
    assert not torch.equal(batch.reward.lq, batch.reward.clean)
    # the driver's part is small and records the sizes of the other two
    assert batch.meta.nbytes == {"reward": 5 * 2 * 3 * 64 * 64, "learner": payload_bytes(batch.learner)}
    assert payload_bytes(batch.meta) < 500 < batch.meta.nbytes["learner"]


def test_two_workers_agree_and_epochs_change_the_degradation(setup: dict) -> None:
    first, second = RolloutWorker(**setup), RolloutWorker(**setup)
    seeds = torch.tensor([[11, 12]])
    a = first.rollout([7], epoch=2, seeds=seeds, sampler=SAMPLER)
    b = second.rollout([7], epoch=2, seeds=seeds, sampler=SAMPLER)
    assert torch.equal(a.reward.lq, b.reward.lq) and torch.equal(a.x0, b.x0)
    c = first.rollout([7], epoch=3, seeds=seeds, sampler=SAMPLER)
    assert not torch.equal(a.reward.lq, c.reward.lq)


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
    assert b.x0.dtype == torch.float32 and b.images.dtype == torch.uint8
    # same restoration up to bf16 rounding of the networks
    assert (from_uint8_images(a.images) - from_uint8_images(b.images)).abs().mean() < 0.05


def test_a_fixed_degradation_caches_each_inputs_condition_across_epochs(setup: dict) -> None:
    greedy = SamplerConfig(steps=2, ar_sampling="greedy")
    cached = RolloutWorker(**setup, fixed_degradation=True, condition_cache=8)
    plain = RolloutWorker(**setup, fixed_degradation=True)
    seeds = torch.tensor([[1, 2], [3, 4]])
    first = cached.rollout([4, 9], epoch=0, seeds=seeds, sampler=greedy)
    assert first.meta.cached_conditions == 0
    again = cached.rollout([9, 4], epoch=5, seeds=seeds, sampler=greedy)  # another epoch, same LQ
    assert again.meta.cached_conditions == 2
    assert torch.equal(again.reward.lq[0], first.reward.lq[1])
    fresh = plain.rollout([9, 4], epoch=5, seeds=seeds, sampler=greedy)
    assert fresh.meta.cached_conditions == 0
    assert torch.allclose(again.condition.semantic, fresh.condition.semantic, atol=1e-5)
    assert torch.allclose(again.x0, fresh.x0, atol=1e-4)
    # AR sampling is not deterministic: nothing is cached
    sampled = cached.rollout([4], epoch=1, seeds=seeds[:1], sampler=SamplerConfig(steps=2, ar_sampling="sample"))
    assert sampled.meta.cached_conditions == 0
    # the least recently used condition is dropped beyond the capacity
    small = RolloutWorker(**setup, fixed_degradation=True, condition_cache=1)
    small.rollout([4, 9], epoch=0, seeds=seeds, sampler=greedy)
    assert list(small.conditions.items) == [9]


def test_weight_updates_carry_lora_adapters_or_the_trained_weights(setup: dict) -> None:
    learner_side = build_tiny_policy(0).velocity_model
    add_lora(learner_side, rank=2, alpha=4.0, targets=["to_q", "to_v"])
    for name, param in learner_side.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    adapters = {key: value for key, value in learner_side.state_dict().items() if ".lora_" in key}
    update = WeightUpdate("lora", adapters, {"rank": 2, "alpha": 4.0, "targets": ["to_q", "to_v"]})
    worker = RolloutWorker(**setup)
    assert update.nbytes < sum(v.numel() * 4 for v in worker.velocity_state().values()) / 5
    worker.load_weights(1, update)
    expected = merged_state_dict(learner_side)
    held = worker.velocity_state()
    assert held.keys() == expected.keys()
    assert all(torch.allclose(held[key], expected[key], atol=1e-6) for key in held)
    full = RolloutWorker(**setup)
    trained = {key: value + 0.5 for key, value in full.velocity_state().items() if "proj_out" in key}
    full.load_weights(1, WeightUpdate("full", trained))
    assert all(torch.equal(full.velocity_state()[key], value) for key, value in trained.items())
    with pytest.raises(ValueError, match="tensors the rollout policy lacks"):
        full.load_weights(2, WeightUpdate("full", {"no.such.weight": torch.zeros(1)}))
