"""Stage 2 learner: NFT training direction, invalid samples, the v_old EMA, checkpoints, and a
2-rank ZeRO-2 DeepSpeed group of Ray actors that matches a single learner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlrestore.config import ActorGroupConfig, NFTConfig, OptimConfig, Stage2Config
from rlrestore.models.loading import CheckpointError
from rlrestore.models.policy import PrefRestorePolicy
from rlrestore.nft import ema_update
from tests.conftest import build_tiny_policy
from trainers.nft_learner import LearnerGroup, NFTLearner, split_samples

OPTIM = OptimConfig(lr=1e-3, weight_decay=1e-4, schedule="constant", warmup_ratio=0.0)
LATENT = (32, 8, 8)  # tiny policy: 64 px, DC-AE f8, 32 channels
CONDITION = (129, 64)  # 64 semantic + 1 trigger + 64 texture tokens of caption_channels 64


def make_samples(n: int = 8, r: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "x0": torch.randn(n, *LATENT, generator=gen),
        "encoder_hidden_states": torch.randn(n, *CONDITION, generator=gen),
        "r": torch.full((n,), r),
        "valid": torch.ones(n, dtype=torch.bool),
    }


def make_learner(
    policy: PrefRestorePolicy, zero_stage: int = 0, learner_args: dict | None = None, **nft: object
) -> NFTLearner:
    config = NFTConfig(**{"beta": 1.0, "timesteps_per_sample": 2, **nft})
    return NFTLearner(
        policy, config, OPTIM, micro_batch=4, zero_stage=zero_stage, sampler_steps=8, **(learner_args or {})
    )


@torch.no_grad()
def flow_matching_error(learner: NFTLearner, samples: dict[str, torch.Tensor]) -> float:
    """Mean ||v_theta - (eps - x0)||^2 on the stored samples at fixed noise and timesteps."""
    gen = torch.Generator().manual_seed(123)
    x0, states = samples["x0"], samples["encoder_hidden_states"]
    errors = []
    for t in (0.25, 0.5, 0.75, 1.0):
        eps = torch.randn(x0.shape, generator=gen)
        x_t = (1 - t) * x0 + t * eps
        v = learner.engine.module(x_t, torch.full((len(x0),), t), states)
        errors.append((v - (eps - x0)).square().mean())
    return float(torch.stack(errors).mean())


def weights(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([value.flatten() for value in state.values()])


@pytest.fixture(scope="module")
def policy() -> PrefRestorePolicy:
    return build_tiny_policy(0)


@pytest.mark.parametrize(
    ("form", "r", "direction"),
    [("velocity", 1.0, -1), ("velocity", 0.0, 1), ("adaptive_x0", 1.0, -1), ("adaptive_x0", 0.0, 1)],
)
def test_positive_samples_pull_and_negative_samples_push(
    policy: PrefRestorePolicy, form: str, r: float, direction: int
) -> None:
    learner = make_learner(policy, loss_form=form)
    samples = make_samples(r=r)
    before = flow_matching_error(learner, samples)
    for step in range(4):
        metrics = learner.train_step(samples, step)
        part = "loss_negative" if r == 1.0 else "loss_positive"
        assert metrics[part] == 0.0 and metrics["samples"] == 8
    after = flow_matching_error(learner, samples)
    assert direction * (after - before) > 0.02 * before, (before, after)


def test_zero_stages_make_the_same_update(policy: PrefRestorePolicy) -> None:
    samples = make_samples(r=0.8)
    results = []
    for stage in (0, 1, 2):
        learner = make_learner(policy, zero_stage=stage)
        metrics = learner.train_step(samples, 0)
        results.append((metrics["loss"], metrics["grad_norm"], weights(learner.trained_state_dict())))
    for loss, grad_norm, trained in results[1:]:
        assert loss == results[0][0] and grad_norm == pytest.approx(results[0][1], rel=1e-6)
        assert torch.allclose(trained, results[0][2], atol=1e-7)


def test_invalid_samples_contribute_nothing(policy: PrefRestorePolicy) -> None:
    samples = make_samples(n=6)
    samples["r"] = torch.tensor([1.0, 0.0, 0.3, 0.9, 0.5, 0.1])
    samples["valid"] = torch.tensor([True, False, True, True, False, True])
    samples["x0"][~samples["valid"]] = 1e6  # would blow up the loss if it were used
    with_invalid = make_learner(policy)
    metrics = with_invalid.train_step(samples, 0)
    assert metrics["samples"] == 4 and torch.isfinite(torch.tensor(metrics["loss"]))

    keep = samples["valid"]
    only_valid = {key: value[keep] for key, value in samples.items()} | {"index": torch.arange(6)[keep]}
    reference = make_learner(policy)
    assert reference.train_step(only_valid, 0)["loss"] == pytest.approx(metrics["loss"], rel=1e-6)
    assert torch.allclose(weights(with_invalid.trained_state_dict()), weights(reference.trained_state_dict()))

    before = with_invalid.trained_state_dict(), with_invalid.state_dict_for_rollout()
    samples["valid"][:] = False
    skipped = with_invalid.train_step(samples, 1)
    assert skipped["samples"] == 0 and skipped["skipped"] == 1 and "loss" not in skipped
    assert torch.equal(weights(before[0]), weights(with_invalid.trained_state_dict()))
    assert torch.equal(weights(before[1]), weights(with_invalid.state_dict_for_rollout()))


def test_v_old_is_the_ema_of_the_trained_weights(policy: PrefRestorePolicy) -> None:
    learner = make_learner(policy)
    samples = make_samples(r=0.7)
    first = learner.train_step(samples, 0)
    assert first["old_deviation"] == 0.0 and first["ema_decay"] == 0.0  # v_old starts as v_theta
    assert torch.equal(weights(learner.state_dict_for_rollout()), weights(learner.trained_state_dict()))

    old_before = [p.clone() for p in learner.v_old.parameters()]
    update = learner.train_step(samples, 200)  # linear schedule: d = min(0.001 * 200, 0.5) = 0.2
    assert update["ema_decay"] == pytest.approx(0.2)
    trained = list(learner.engine.module.parameters())
    ema_update(old_before, trained, 0.2)
    for expected, actual in zip(old_before, learner.v_old.parameters(), strict=True):
        assert torch.equal(expected, actual)
    assert not torch.equal(weights(learner.state_dict_for_rollout()), weights(learner.trained_state_dict()))
    assert learner.train_step(samples, 201)["old_deviation"] > 0


def test_save_and_load_restore_the_learner(policy: PrefRestorePolicy, tmp_path: Path) -> None:
    samples = make_samples(r=0.6)
    original = make_learner(policy, zero_stage=2, base_penalty=1e-2)
    for step in range(2):
        metrics = original.train_step(samples, step * 100)
    assert metrics["base_penalty"] > 0
    original.save(tmp_path)

    restored = make_learner(policy, zero_stage=2, base_penalty=1e-2)
    restored.load(tmp_path)
    assert restored.step == original.step == 101
    for name in ("trained_state_dict", "state_dict_for_rollout"):
        assert torch.equal(weights(getattr(restored, name)()), weights(getattr(original, name)()))
    assert torch.equal(
        weights(dict(restored.v_base.state_dict())), weights(dict(original.v_base.state_dict()))
    )
    # The AdamW moments came back too: the next step is the same.
    next_original, next_restored = original.train_step(samples, 101), restored.train_step(samples, 101)
    assert next_restored["loss"] == next_original["loss"]
    assert torch.equal(weights(restored.trained_state_dict()), weights(original.trained_state_dict()))


class _Payload:
    """Unpickling this runs ``Path.touch(marker)``: what a tampered checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_learner_checkpoints_load_without_running_pickled_code(
    policy: PrefRestorePolicy, tmp_path: Path, zero_stage: int
) -> None:
    learner = make_learner(policy, zero_stage=zero_stage)
    learner.train_step(make_samples(), 0)
    learner.save(tmp_path / "ckpt")
    make_learner(policy, zero_stage=zero_stage).load(tmp_path / "ckpt")  # DeepSpeed's own files pass

    files = sorted((tmp_path / "ckpt" / "engine").rglob("*.pt"))
    assert files
    marker = tmp_path / "pwned"
    for file in files:
        state = torch.load(file, weights_only=False)
        state["payload"] = _Payload(marker)
        torch.save(state, file)
    with pytest.raises(CheckpointError, match="refusing to load"):
        make_learner(policy, zero_stage=zero_stage).load(tmp_path / "ckpt")
    assert not marker.exists()
    torch.load(files[0], weights_only=False)  # DeepSpeed's own loader would have run it
    assert marker.exists()


LORA = {"finetune": "lora", "lora_rank": 4, "lora_alpha": 8.0, "lora_targets": ("to_q", "to_v")}


def test_lora_trains_only_adapters_and_rollouts_get_merged_weights(
    policy: PrefRestorePolicy, tmp_path: Path
) -> None:
    learner = make_learner(policy, zero_stage=2, learner_args=LORA)
    trained = [name for name, p in learner.engine.module.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)
    base = policy.transformer.state_dict()
    # B starts at zero: the adapted DiT is the base DiT, under the base DiT's keys.
    start = learner.state_dict_for_rollout()
    assert start.keys() == base.keys()
    assert all(torch.equal(start[key], base[key]) for key in base)

    samples = make_samples(r=1.0)
    before = flow_matching_error(learner, samples)
    for step in range(4):
        learner.train_step(samples, step)
    assert flow_matching_error(learner, samples) < before  # r = 1 pulls toward the target

    merged = learner.trained_state_dict()
    changed = {key for key in base if not torch.equal(merged[key], base[key])}
    assert changed and all(key.endswith(("to_q.weight", "to_v.weight")) for key in changed)
    # The merged weights in a plain DiT give the adapted DiT's velocity.
    plain = build_tiny_policy(0)
    plain.transformer.load_state_dict(merged)
    x, t, states = torch.randn(2, *LATENT), torch.tensor([0.3, 0.9]), torch.randn(2, *CONDITION)
    with torch.no_grad():
        torch.testing.assert_close(plain.velocity(x, t, states), learner.engine.module(x, t, states))

    learner.save(tmp_path)
    restored = make_learner(policy, zero_stage=2, learner_args=LORA)
    restored.load(tmp_path)
    assert torch.equal(weights(restored.trained_state_dict()), weights(merged))
    assert torch.equal(weights(restored.state_dict_for_rollout()), weights(learner.state_dict_for_rollout()))
    with pytest.raises(CheckpointError, match="finetune"):
        make_learner(policy, zero_stage=2).load(tmp_path)


def test_unsupported_setups_fail_clearly(policy: PrefRestorePolicy) -> None:
    with pytest.raises(ValueError, match=r"lora_targets \['to_qkv'\].*attn1.to_q"):
        make_learner(policy, learner_args={**LORA, "lora_targets": ("to_q", "to_qkv")})
    with pytest.raises(ValueError, match="ZeRO-3"):
        NFTLearner(policy, NFTConfig(), OPTIM, zero_stage=3)
    with pytest.raises(KeyError, match="valid"):
        make_learner(policy).train_step({k: v for k, v in make_samples().items() if k != "valid"}, 0)


def test_split_samples_keeps_every_sample_and_its_index() -> None:
    shares = split_samples(make_samples(n=5), 2)
    assert [len(share["x0"]) for share in shares] == [3, 2]
    assert torch.equal(torch.cat([share["index"] for share in shares]), torch.arange(5))


@pytest.mark.slow
def test_two_rank_zero2_group_matches_a_single_learner(ray_cluster: None, tmp_path: Path) -> None:
    policy = build_tiny_policy(0)
    policy.save_pretrained(tmp_path / "policy")
    stage2 = Stage2Config(
        nft=NFTConfig(beta=0.1, timesteps_per_sample=2),
        optim=OPTIM,
        micro_batch=2,
        zero_stage=2,
        sampler_steps=8,
        learners=ActorGroupConfig(num_actors=2, num_cpus=0.5),
    )
    # 5 samples: shares of 3 and 2, so rank 1 runs one zero-weighted micro-batch per timestep.
    samples = make_samples(n=5, seed=1)
    samples["r"] = torch.tensor([0.9, 0.2, 0.5, 0.7, 0.1])
    samples["valid"][2] = False
    single = NFTLearner(tmp_path / "policy", stage2.nft, OPTIM, micro_batch=2, zero_stage=0, sampler_steps=8)
    group = LearnerGroup(tmp_path / "policy", stage2, device="cpu")
    try:
        for step in (0, 1):
            metrics = group.train_step(samples, step)
            expected = single.train_step(split_samples(samples, 1)[0], step)
            assert metrics["samples"] == 4 and torch.isfinite(torch.tensor(metrics["loss"]))
            for key in ("loss", "loss_positive", "loss_negative", "grad_norm"):
                assert metrics[key] == pytest.approx(expected[key], rel=1e-5), key
        checksums = group.check_in_sync()
        assert checksums["trained"] != checksums["v_old"]
        assert torch.allclose(
            weights(group.trained_weights()), weights(single.trained_state_dict()), atol=1e-6
        )
        assert torch.allclose(
            weights(group.rollout_weights()), weights(single.state_dict_for_rollout()), atol=1e-6
        )
        group.save(tmp_path / "learner")
        assert group.load(tmp_path / "learner") == 2
        group.check_in_sync()
    finally:
        group.shutdown()
