"""Stage 2 learner: NFT training direction, invalid samples, the v_old EMA, checkpoints, and a
2-rank ZeRO-2 DeepSpeed group of Ray actors that matches a single learner."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import ray
import torch

from rlrestore.config import (
    ActorGroupConfig,
    LearnerConfig,
    NFTConfig,
    RolloutConfig,
    Stage2Config,
    Stage2Resources,
)
from rlrestore.models.loading import CheckpointError
from rlrestore.nft import ema_update
from rlrestore.policies.prefrestore import PrefRestoreCondition, PrefRestorePolicy
from rlrestore.runtime.dataplane import LearnerInputs
from tests.conftest import LEARNER_OPTIM, build_tiny_policy, make_learner
from trainers.nft_learner import LearnerGroup, NFTLearner, NFTSamples, StepSamples, split_samples

OPTIM = LEARNER_OPTIM
LATENT = (32, 8, 8)  # tiny policy: 64 px, DC-AE f8, 32 channels
SEMANTIC = (65, 64)  # 64 semantic tokens + 1 trigger, caption_channels 64


def make_samples(n: int = 8, r: float = 1.0, seed: int = 0, per_group: int = 2) -> NFTSamples:
    """n candidates in groups of ``per_group`` sharing their input's condition."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-n // per_group)
    condition = PrefRestoreCondition(
        torch.randn(groups, *SEMANTIC, generator=gen),
        torch.randn(groups, *LATENT, generator=gen),
        torch.randint(0, 1024, (groups, SEMANTIC[0] - 1), generator=gen),
    )
    return NFTSamples(
        x0=torch.randn(n, *LATENT, generator=gen),
        group=torch.arange(n) // per_group,
        condition=condition,
        r=torch.full((n,), r),
        valid=torch.ones(n, dtype=torch.bool),
    )


def field_velocity(
    field: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: PrefRestoreCondition
) -> torch.Tensor:
    return field(x_t, t, cond)


@torch.no_grad()
def flow_matching_error(learner: NFTLearner, samples: dict[str, torch.Tensor]) -> float:
    """Mean ||v_theta - (eps - x0)||^2 on the stored samples at fixed noise and timesteps."""
    gen = torch.Generator().manual_seed(123)
    x0, cond = samples.x0, samples.condition.select(samples.group)
    errors = []
    for t in (0.25, 0.5, 0.75, 1.0):
        eps = torch.randn(x0.shape, generator=gen)
        x_t = (1 - t) * x0 + t * eps
        v = field_velocity(learner.engine.module, x_t, torch.full((len(x0),), t), cond)
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
    samples = replace(
        samples,
        r=torch.tensor([1.0, 0.0, 0.3, 0.9, 0.5, 0.1]),
        valid=torch.tensor([True, False, True, True, False, True]),
    )
    samples.x0[~samples.valid] = 1e6  # would blow up the loss if it were used
    with_invalid = make_learner(policy)
    metrics = with_invalid.train_step(samples, 0)
    assert metrics["samples"] == 4 and torch.isfinite(torch.tensor(metrics["loss"]))

    keep = samples.valid
    only_valid = NFTSamples(
        samples.x0[keep], samples.group[keep], samples.condition, samples.r[keep], samples.valid[keep],
        index=torch.arange(6)[keep],
    )
    reference = make_learner(policy)
    assert reference.train_step(only_valid, 0)["loss"] == pytest.approx(metrics["loss"], rel=1e-6)
    assert torch.allclose(weights(with_invalid.trained_state_dict()), weights(reference.trained_state_dict()))

    before = with_invalid.trained_state_dict(), with_invalid.state_dict_for_rollout()
    samples.valid[:] = False
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
    base = policy.velocity_model.state_dict()
    # B starts at zero: the adapted DiT is the base DiT, under the base model's keys.
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
    plain.velocity_model.load_state_dict(merged)
    x, t = torch.randn(2, *LATENT), torch.tensor([0.3, 0.9])
    cond = PrefRestoreCondition(torch.randn(2, *SEMANTIC), torch.randn(2, *LATENT), torch.zeros(2, 64, dtype=torch.long))
    with torch.no_grad():
        torch.testing.assert_close(
            plain.velocity_model(x, t, cond), field_velocity(learner.engine.module, x, t, cond)
        )

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
    with pytest.raises(TypeError, match="NFTSamples"):
        make_learner(policy).train_step({"x0": torch.zeros(1, *LATENT)}, 0)
    samples = make_samples(n=4)
    with pytest.raises(ValueError, match="group indices"):
        replace(samples, group=torch.tensor([0, 1, 2, 9]))
    with pytest.raises(ValueError, match=r"r must have shape \(4,\)"):
        replace(samples, r=torch.ones(3))


def test_split_samples_keeps_every_sample_its_index_and_only_the_conditions_it_uses() -> None:
    samples = make_samples(n=5, per_group=2)  # groups 0 0 1 1 2
    shares = split_samples(samples, 2)
    assert [len(share) for share in shares] == [3, 2]
    assert torch.equal(torch.cat([share.index for share in shares]), torch.arange(5))
    assert [len(share.condition) for share in shares] == [2, 2]  # rows 0-2 use groups 0, 1; rows 3-4 use 1, 2
    for share, rows in zip(shares, (slice(0, 3), slice(3, 5)), strict=True):
        mine = share.condition.select(share.group)
        theirs = samples.condition.select(samples.group[rows])
        assert torch.equal(mine.semantic, theirs.semantic) and torch.equal(mine.z_low, theirs.z_low)


def as_step_samples(samples: NFTSamples, inputs_per_call: list[int], put=lambda part: part) -> StepSamples:
    """``samples`` (K = 2 candidates per input, in input order) as rollout calls of
    ``inputs_per_call`` inputs each, every call's learner part passed through ``put``."""
    parts, sizes, first = [], [], 0
    for inputs in inputs_per_call:
        rows = slice(2 * first, 2 * (first + inputs))
        x0 = samples.x0[rows].reshape(inputs, 2, *samples.x0.shape[1:])
        parts.append(put(LearnerInputs(x0, samples.condition.select(torch.arange(first, first + inputs)))))
        sizes.append(2 * inputs)
        first += inputs
    return StepSamples(parts, sizes, samples.r, samples.valid)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_shares_by_reference_equal_the_split_of_the_whole_batch(world_size: int) -> None:
    samples = make_samples(n=10, seed=3)
    step = as_step_samples(samples, [2, 1, 2])
    for share, expected in zip(step.shares(world_size), split_samples(samples, world_size), strict=True):
        got = share.samples()
        assert torch.equal(got.x0, expected.x0) and torch.equal(got.group, expected.group)
        assert torch.equal(got.index, expected.index) and torch.equal(got.r, expected.r)
        assert torch.equal(got.condition.semantic, expected.condition.semantic)
        assert world_size == 1 or len(share.parts) <= 2  # a share references only the calls its rows lie in
    with pytest.raises(ValueError, match="StepSamples"):
        StepSamples(step.parts, [4, 2], samples.r, samples.valid)


@pytest.mark.slow
def test_two_rank_zero2_group_matches_a_single_learner(ray_cluster: None, tmp_path: Path) -> None:
    policy = build_tiny_policy(0)
    policy.save_pretrained(tmp_path / "policy")
    stage2 = Stage2Config(
        nft=NFTConfig(beta=0.1, timesteps_per_sample=2),
        optim=OPTIM,
        learner=LearnerConfig(micro_batch=2, zero_stage=2),
        rollout=RolloutConfig(sampler_steps=8),
        resources=Stage2Resources(learner=ActorGroupConfig(num_actors=2, num_cpus=0.5)),
    )
    # 6 samples from two rollout calls (2 and 1 inputs x K = 2), held in the object store: shares of
    # 3 and 3, rank 1's spanning both calls; with sample 2 invalid rank 0 runs one zero-weighted
    # micro-batch per timestep.
    samples = make_samples(n=6, seed=1)
    samples = replace(samples, r=torch.tensor([0.9, 0.2, 0.5, 0.7, 0.1, 0.6]))
    samples.valid[2] = False
    step_samples = as_step_samples(samples, [2, 1], put=ray.put)
    single = NFTLearner(tmp_path / "policy", stage2.nft, OPTIM, micro_batch=2, zero_stage=0, sampler_steps=8)
    group = LearnerGroup(tmp_path / "policy", stage2, device="cpu")
    try:
        for step in (0, 1):
            metrics = group.train_step(step_samples, step)
            expected = single.train_step(split_samples(samples, 1)[0], step)
            assert metrics["samples"] == 5 and torch.isfinite(torch.tensor(metrics["loss"]))
            for key in ("loss", "loss_positive", "loss_negative", "grad_norm"):
                assert metrics[key] == pytest.approx(expected[key], rel=1e-5), key
        checksums = group.check_in_sync()
        assert checksums["trained"] != checksums["v_old"]
        # ZeRO-2 splits the optimizer state: AdamW's two moments and the float32 master partition
        # (3 numbers per trained weight in all) are held about half by each of the 2 ranks.
        trained = sum(p.numel() for p in single.engine.module.parameters() if p.requires_grad)
        held = group.optimizer_state_numel()
        assert sum(held) == pytest.approx(3 * trained, rel=0.01)
        assert all(count == pytest.approx(1.5 * trained, rel=0.02) for count in held), (held, trained)
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


def test_one_condition_per_group_trains_like_a_condition_per_candidate(policy: PrefRestorePolicy) -> None:
    grouped = make_samples(n=6, r=0.7, per_group=3)
    repeated = replace(grouped, group=torch.arange(6), condition=grouped.condition.select(grouped.group))
    first, second = make_learner(policy), make_learner(policy)
    assert first.train_step(grouped, 0)["loss"] == second.train_step(repeated, 0)["loss"]
    assert torch.equal(weights(first.trained_state_dict()), weights(second.trained_state_dict()))


def test_the_learner_composes_texture_tokens_with_its_own_patch_embed(policy: PrefRestorePolicy) -> None:
    """Full fine-tuning trains patch_embed, which z_low passes through: the learner's v_theta must
    equal the velocity a policy with the trained DiT computes at inference, not one built on the
    rollout policy's (stale) texture tokens."""
    learner = make_learner(policy)
    samples = make_samples(r=1.0)
    for step in range(3):
        learner.train_step(samples, step)
    trained = learner.trained_state_dict()
    patch = "transformer.patch_embed.proj.weight"
    assert not torch.equal(trained[patch], policy.velocity_model.state_dict()[patch])

    inference = build_tiny_policy(0)
    inference.velocity_model.load_state_dict(trained)
    cond = samples.condition.select(samples.group[:2])
    x, t = torch.randn(2, *LATENT), torch.tensor([0.4, 0.8])
    with torch.no_grad():
        learned = field_velocity(learner.engine.module, x, t, cond)
        torch.testing.assert_close(learned, inference.velocity_model(x, t, cond))
        stale = inference.velocity(x, t, policy.velocity_model.prepare(cond))  # texture tokens of the old DiT
    assert not torch.allclose(learned, stale, atol=1e-5)


def test_a_skipped_step_still_counts(policy: PrefRestorePolicy, tmp_path: Path) -> None:
    learner = make_learner(policy)
    learner.train_step(make_samples(), 0)
    learner.skip_step(1)
    assert learner.step == 2
    learner.save(tmp_path)
    restored = make_learner(policy)
    restored.load(tmp_path)
    assert restored.step == 2  # a checkpoint after the skipped step resumes at step 2, not 1


def test_bf16_mixed_keeps_float32_masters_and_a_float32_v_old(policy: PrefRestorePolicy) -> None:
    fp32 = make_learner(policy)
    mixed = make_learner(policy, learner_args={"precision": "bf16-mixed"})
    assert next(mixed.engine.module.parameters()).dtype == torch.bfloat16
    assert all(param.dtype == torch.float32 for param in mixed.v_old.parameters())
    # the optimizer steps float32 masters besides AdamW's moments: 3 numbers per trained weight
    trained = sum(param.numel() for param in mixed.engine.module.parameters() if param.requires_grad)
    assert mixed.optimizer_state_numel() == 3 * trained
    samples = make_samples(r=0.6)
    loss_fp32, loss_mixed = fp32.train_step(samples, 0)["loss"], mixed.train_step(samples, 0)["loss"]
    assert loss_mixed == pytest.approx(loss_fp32, rel=2e-2)


def test_v_old_moves_at_decay_0999_under_bf16_mixed(policy: PrefRestorePolicy) -> None:
    """An EMA kept in bf16 drops most updates at decay 0.999 (8 bits of mantissa); v_old is float32."""
    learner = make_learner(policy, learner_args={"precision": "bf16-mixed"}, ema_schedule="delayed")
    samples = make_samples(r=0.9)
    learner.train_step(samples, 0)  # delayed schedule: decay 0 at first, v_old = v_theta
    names = {name for name, param in learner.engine.module.named_parameters() if param.requires_grad}
    old = [param for name, param in learner.v_old.named_parameters() if name in names]
    before = torch.cat([param.detach().flatten().clone() for param in old])
    bf16_copy = [param.detach().to(torch.bfloat16) for param in old]
    metrics = learner.train_step(samples, 400)
    assert metrics["ema_decay"] == pytest.approx(0.999)
    after = torch.cat([param.detach().flatten() for param in old])
    trained = [param for name, param in learner.engine.module.named_parameters() if name in names]
    target = torch.cat([param.detach().float().flatten() for param in trained]) != before  # what should move
    ema_update(bf16_copy, trained, 0.999)
    in_bf16 = torch.cat([param.float().flatten() for param in bf16_copy])
    moved_fp32 = float((after != before)[target].float().mean())
    moved_bf16 = float((in_bf16 != before.bfloat16().float())[target].float().mean())
    assert moved_fp32 > 0.99, moved_fp32
    assert moved_bf16 < 0.2, moved_bf16  # what a bf16 EMA would have done
