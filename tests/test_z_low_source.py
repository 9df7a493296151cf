"""``policy.flow_source: z_low``: Pref-Restore's path ends at ``z_low + source_noise * eps`` instead of
pure noise, so sampling starts from the degraded face's latent, Stage 1 and the NFT loss interpolate
towards it, and the option survives a policy directory's round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlrestore.config import SamplerConfig, SemanticAlignmentConfig
from rlrestore.losses import drop_conditions, flow_matching_loss, flow_noise
from rlrestore.policies.prefrestore import PrefRestoreCondition, PrefRestorePolicy
from tests.conftest import build_tiny_policy, make_learner, tiny_config
from trainers.nft_learner import NFTSamples

Z_LOW = ("policy.flow_source=z_low", "policy.source_noise=0.25")


def faces(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hq = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    return hq, (hq + 0.3 * torch.randn(hq.shape, generator=gen)).clamp(-1, 1)


def test_the_path_ends_at_z_low_plus_scaled_noise_and_the_papers_at_noise() -> None:
    paper, source = build_tiny_policy(0), build_tiny_policy(0, *Z_LOW)
    _, lq = faces()
    condition = source.condition(lq, ["", ""], SamplerConfig(steps=2), torch.Generator().manual_seed(0))
    noise = torch.randn(condition.z_low.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(paper.velocity_model.endpoint(condition, noise), noise)
    expected = condition.z_low + 0.25 * noise
    torch.testing.assert_close(source.velocity_model.endpoint(condition, noise), expected)
    torch.testing.assert_close(source.velocity_model.start(condition, noise), expected)


def test_sampling_starts_from_the_degraded_latent() -> None:
    """With the DiT's output layer zeroed the velocity is 0: the sample is its start, z_low + sigma * eps."""
    policy = build_tiny_policy(0, "policy.flow_source=z_low", "policy.source_noise=1e-4")
    with torch.no_grad():
        policy.transformer.proj_out.weight.zero_()
        policy.transformer.proj_out.bias.zero_()
    _, lq = faces()
    out = policy.restore(lq, ["", ""], torch.tensor([[3, 4], [5, 6]]), SamplerConfig(steps=3))
    z_low = policy.encode_lq(lq).detach()
    for k in range(2):
        torch.testing.assert_close(out.latents[:, k], z_low, atol=1e-3, rtol=0)
    assert not torch.allclose(out.latents[:, 0], out.latents[:, 1], atol=1e-7)  # candidates differ by eps


def test_stage1_flow_loss_interpolates_towards_z_low_without_training_the_encoder_through_it() -> None:
    hq, lq = faces(1)
    config = SemanticAlignmentConfig(condition_dropout=0.0)
    batch = {"hq": hq, "lq": lq, "caption": ["", ""]}
    losses = {}
    for name, overrides in (("paper", ()), ("z_low", Z_LOW)):
        policy = build_tiny_policy(0, *overrides)
        losses[name] = policy.stage1_losses("stage1.1", batch, config, torch.Generator().manual_seed(0))["diff_loss"]
    # the same draws by hand, with the z_low endpoint
    policy = build_tiny_policy(0, *Z_LOW)
    policy.set_trainable(["lq_encoder"])
    gen = torch.Generator().manual_seed(0)
    x0, codes = policy.encode(hq), policy.target_codes(hq)
    cond = policy.conditioning(lq, ["", ""], target_codes=codes)
    states = drop_conditions(cond.encoder_hidden_states.detach(), 0.0, gen)
    eps, t = flow_noise(x0, gen)
    endpoint = policy.velocity_model.endpoint(cond.condition, eps)
    manual = flow_matching_loss(lambda x_t, t_: policy.velocity(x_t, t_, states), x0, endpoint, t)
    torch.testing.assert_close(losses["z_low"], manual)
    assert not torch.allclose(losses["z_low"], losses["paper"])
    assert not endpoint.requires_grad  # only the latent-consistency loss trains E_theta


def test_the_option_round_trips_through_a_policy_directory(tmp_path: Path) -> None:
    policy = build_tiny_policy(0, *Z_LOW)
    policy.save_pretrained(tmp_path / "p")
    loaded = PrefRestorePolicy.from_pretrained(tmp_path / "p")
    assert (loaded.config.flow_source, loaded.config.source_noise) == ("z_low", 0.25)
    velocity = PrefRestorePolicy.velocity_from_pretrained(tmp_path / "p")
    condition = PrefRestoreCondition(torch.zeros(1, 65, 64), torch.ones(1, 32, 8, 8), torch.zeros(1, 64).long())
    noise = torch.ones(1, 32, 8, 8)
    torch.testing.assert_close(velocity.endpoint(condition, noise), torch.full((1, 32, 8, 8), 1.25))


def test_a_bad_flow_source_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="flow_source"):
        tiny_config("unused", "policy.flow_source=pixels")
    with pytest.raises(ValueError, match="source_noise"):
        tiny_config("unused", "policy.flow_source=z_low", "policy.source_noise=0")


def test_the_nft_loss_interpolates_towards_the_condition_s_z_low() -> None:
    """The learner's x_t lies between x0 and z_low + sigma * eps: with x0 = z_low and sigma tiny the
    path is (nearly) constant, so the DiT sees x_t = x0 at every t (a pure-noise endpoint would not)."""
    policy = build_tiny_policy(0, "policy.flow_source=z_low", "policy.source_noise=1e-6")
    learner = make_learner(policy)
    gen = torch.Generator().manual_seed(0)
    z_low = torch.randn(2, 32, 8, 8, generator=gen)
    condition = PrefRestoreCondition(torch.randn(2, 65, 64, generator=gen), z_low, torch.zeros(2, 64).long())
    seen: list[torch.Tensor] = []
    hook = learner.v_old.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"].detach().clone()), with_kwargs=True
    )
    samples = NFTSamples(
        x0=z_low.repeat_interleave(2, 0),
        group=torch.arange(4) // 2,
        condition=condition,  # one per group
        r=torch.tensor([1.0, 0.0, 1.0, 0.0]),
        valid=torch.ones(4, dtype=torch.bool),
    )
    metrics = learner.train_step(samples, 0)
    hook.remove()
    assert metrics["samples"] == 4 and seen
    for x_t in torch.cat(seen):  # the learner may order the samples its own way
        assert min(float((x_t - row).abs().max()) for row in z_low) < 1e-4
