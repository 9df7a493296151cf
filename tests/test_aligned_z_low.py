"""``policy.z_low_injection: aligned``: zero-initialised it is the paper's path exactly, it trains with
the vae_connector in Stage 1, survives every way a policy directory is written and read, and a
Stage 2 learner step works with it (keeping it frozen)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlrestore.config import SamplerConfig
from rlrestore.losses import flow_matching_loss, flow_noise
from rlrestore.policies import write_policy_with_velocity
from rlrestore.policies.prefrestore import PrefRestoreCondition, PrefRestorePolicy
from rlrestore.policies.prefrestore.serialization import OWN_MODULES
from tests.conftest import build_tiny_policy, make_learner
from trainers.nft_learner import NFTSamples

ALIGNED = "policy.z_low_injection=aligned"


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lq = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    return lq, torch.randn(2, 32, 8, 8, generator=gen), torch.tensor([0.3, 0.8])


def velocity_of(policy: PrefRestorePolicy, seed: int = 0) -> torch.Tensor:
    lq, x_t, t = inputs(seed)
    with torch.no_grad():
        states = policy.conditioning(lq, ["", ""], target_codes=policy.target_codes(lq)).encoder_hidden_states
        return policy.velocity(x_t, t, states)


def randomise_projection(policy: PrefRestorePolicy) -> None:
    with torch.no_grad():
        for param in policy.velocity_model.z_low_projection.parameters():
            param.normal_(0, 0.5)


def test_zero_init_is_the_papers_path_and_the_paper_path_has_no_projection() -> None:
    paper, aligned = build_tiny_policy(0), build_tiny_policy(0, ALIGNED)
    assert paper.velocity_model.z_low_projection is None
    assert torch.equal(velocity_of(paper), velocity_of(aligned))
    with pytest.raises(KeyError, match="aligned"):
        paper.component("z_low_projection")
    randomise_projection(aligned)
    assert not torch.allclose(velocity_of(paper), velocity_of(aligned), atol=1e-3)
    # the hook lives for one DiT call only: the texture tokens are composed as before
    lq = inputs()[0]
    torch.testing.assert_close(aligned.encode_lq(lq), paper.encode_lq(lq))
    assert not aligned.transformer.patch_embed._forward_hooks


def test_a_stage1_step_trains_the_projection_with_the_vae_connector() -> None:
    policy = build_tiny_policy(0, ALIGNED)
    params = policy.set_trainable(["vae_connector"])
    projection = policy.velocity_model.z_low_projection
    assert all(p.requires_grad for p in projection.parameters())
    assert {id(p) for p in projection.parameters()} <= {id(p) for p in params}
    before = velocity_of(policy)
    lq, _, _ = inputs(1)
    x0 = policy.encode(lq)
    states = policy.conditioning(lq, ["", ""], target_codes=policy.target_codes(lq)).encoder_hidden_states
    eps, t = flow_noise(x0, torch.Generator().manual_seed(0))
    loss = flow_matching_loss(lambda x_t, t_: policy.velocity(x_t, t_, states), x0, eps, t)
    loss.backward()
    torch.optim.SGD(params, lr=0.5).step()
    assert projection.weight.abs().sum() > 0
    assert not torch.allclose(before, velocity_of(policy), atol=1e-4)


def test_save_load_round_trips_and_the_velocity_alone_loads(tmp_path: Path) -> None:
    policy = build_tiny_policy(0, ALIGNED)
    randomise_projection(policy)
    policy.save_pretrained(tmp_path / "p")
    loaded = PrefRestorePolicy.from_pretrained(tmp_path / "p")
    assert loaded.config.z_low_injection == "aligned"
    assert torch.equal(velocity_of(loaded), velocity_of(policy))

    velocity = PrefRestorePolicy.velocity_from_pretrained(tmp_path / "p")
    assert velocity.state_dict().keys() == policy.velocity_model.state_dict().keys()
    lq, x_t, t = inputs(2)
    with torch.no_grad():
        condition = policy.condition(lq, ["", ""], SamplerConfig(steps=2), torch.Generator().manual_seed(0))
        torch.testing.assert_close(velocity(x_t, t, condition), policy.velocity_model(x_t, t, condition))

    trained = {key: value + 0.25 for key, value in policy.velocity_model.state_dict().items()}
    write_policy_with_velocity(tmp_path / "p", trained, tmp_path / "q")
    rewritten = PrefRestorePolicy.from_pretrained(tmp_path / "q")
    for key, value in rewritten.velocity_model.state_dict().items():
        assert torch.equal(value, trained[key]), key


def test_the_papers_directory_holds_no_projection(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    build_tiny_policy(0).save_pretrained(tmp_path / "paper")
    assert not any(key.startswith("z_low_projection.") for key in load_file(str(tmp_path / "paper" / OWN_MODULES)))


def test_a_stage2_learner_step_trains_the_dit_and_keeps_the_projection() -> None:
    policy = build_tiny_policy(0, ALIGNED)
    randomise_projection(policy)
    learner = make_learner(policy)
    trained = {n for n, p in learner.engine.module.named_parameters() if p.requires_grad}
    assert trained and all(name.startswith("transformer.") for name in trained)
    gen = torch.Generator().manual_seed(0)
    condition = PrefRestoreCondition(
        torch.randn(2, 65, 64, generator=gen), torch.randn(2, 32, 8, 8, generator=gen), torch.zeros(2, 64).long()
    )
    samples = NFTSamples(
        x0=torch.randn(4, 32, 8, 8, generator=gen),
        group=torch.arange(4) // 2,
        condition=condition,
        r=torch.ones(4),
        valid=torch.ones(4, dtype=torch.bool),
    )
    metrics = learner.train_step(samples, 0)
    assert metrics["samples"] == 4
    after = learner.trained_state_dict()
    base = policy.velocity_model.state_dict()
    assert after.keys() == base.keys()
    assert any(not torch.equal(after[k], base[k]) for k in base if k.startswith("transformer."))
    assert all(torch.equal(after[k], base[k]) for k in base if k.startswith("z_low_projection."))
