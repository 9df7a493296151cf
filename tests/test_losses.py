"""Stage 1 objectives on the tiny policy: values, weighting, where gradients go, and that they train."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlrestore.config import (
    AutoencoderConfig,
    ConfigError,
    RunConfig,
    SamplerConfig,
    SemanticAlignmentConfig,
    load_config,
)
from rlrestore.losses import drop_conditions, flow_matching_loss, flow_noise
from rlrestore.policies.prefrestore import PrefRestorePolicy
from rlrestore.policies.prefrestore.training import conditioning_codes, generated_rows
from tests.conftest import build_tiny_policy, tiny_config


def stage1_losses(policy: PrefRestorePolicy, batch: dict, stage, generator: torch.Generator) -> dict:
    """The policy's Stage 1 losses for a stage's config section."""
    name = {AutoencoderConfig: "autoencoder", SemanticAlignmentConfig: "stage1.1"}.get(type(stage), "stage1.2")
    return policy.stage1_losses(name, batch, stage, generator)


def expected_diff_loss(policy: PrefRestorePolicy, hq: torch.Tensor, states: torch.Tensor, generator) -> torch.Tensor:
    """L_diff by hand: fresh noise and t from ``generator``, the DiT on the composed condition."""
    x0 = policy.encode(hq)
    eps, t = flow_noise(x0, generator)
    return flow_matching_loss(lambda x_t, t_: policy.velocity(x_t, t_, states), x0, eps, t)


def _faces(batch: int, seed: int) -> torch.Tensor:
    """Smooth random 'faces' in [-1, 1] at the tiny generation size (64 px)."""
    low = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return torch.tanh(F.interpolate(low, size=(64, 64), mode="bilinear"))


def _batch() -> dict:
    hq = _faces(4, 0)
    lq = (hq + 0.3 * torch.randn(hq.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    return {"hq": hq, "lq": lq, "caption": ["", "a man", "", "an old woman with glasses"]}


@pytest.fixture
def config(tmp_path: Path) -> RunConfig:
    return tiny_config(
        tmp_path,
        "stage1_1.condition_dropout=0",
        "stage1_2.condition_dropout=0",
        "stage1_1.ce_weight=0.7",
        "stage1_1.diff_weight=0.3",
        "stage1_2.diff_weight=0.6",
        "stage1_2.latent_weight=2.0",
    )


def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(sum(g.pow(2).sum() for g in grads)) ** 0.5 if grads else 0.0


def _has_no_grad(module: torch.nn.Module) -> bool:
    return all(p.grad is None for p in module.parameters())


# ----------------------------------------------------------------------------- values and weighting
def test_stage1_1_losses(tiny_policy: PrefRestorePolicy, config: RunConfig) -> None:
    stage = config.stage1_1
    tiny_policy.set_trainable(stage.trainable)
    losses = stage1_losses(tiny_policy, _batch(), stage, torch.Generator().manual_seed(0))
    assert set(losses) == {"loss", "ce_loss", "diff_loss", "code_accuracy"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    # At random init the CE over the whole extended vocabulary is about log(vocab size).
    assert losses["ce_loss"].item() == pytest.approx(math.log(tiny_policy.vocabulary.size), abs=0.5)
    assert 0 <= losses["code_accuracy"].item() <= 1 and not losses["code_accuracy"].requires_grad
    assert losses["diff_loss"].item() > 0
    torch.testing.assert_close(losses["loss"], 0.7 * losses["ce_loss"] + 0.3 * losses["diff_loss"])


def test_losses_are_deterministic_given_the_generator(
    tiny_policy: PrefRestorePolicy, config: RunConfig
) -> None:
    first = stage1_losses(tiny_policy, _batch(), config.stage1_1, torch.Generator().manual_seed(5))
    again = stage1_losses(tiny_policy, _batch(), config.stage1_1, torch.Generator().manual_seed(5))
    other = stage1_losses(tiny_policy, _batch(), config.stage1_1, torch.Generator().manual_seed(6))
    assert torch.equal(first["loss"], again["loss"])
    assert torch.equal(first["ce_loss"], other["ce_loss"])  # CE does not depend on the noise draw
    assert not torch.equal(first["diff_loss"], other["diff_loss"])


def test_stage1_2_losses(tiny_policy: PrefRestorePolicy, config: RunConfig) -> None:
    stage = config.stage1_2
    tiny_policy.set_trainable(stage.trainable)
    batch = _batch()
    losses = stage1_losses(tiny_policy, batch, stage, torch.Generator().manual_seed(0))
    assert set(losses) == {"loss", "diff_loss", "latent_loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(losses["loss"], 0.6 * losses["diff_loss"] + 2.0 * losses["latent_loss"])
    expected = F.mse_loss(tiny_policy.encode_lq(batch["lq"]), tiny_policy.encode(batch["hq"]))
    torch.testing.assert_close(losses["latent_loss"], expected)
    assert losses["latent_loss"].item() > 0  # the LQ and HQ latents differ


def test_autoencoder_losses(tiny_policy: PrefRestorePolicy, config: RunConfig) -> None:
    hq = _faces(2, 3)
    losses = stage1_losses(tiny_policy, {"hq": hq}, config.autoencoder, torch.Generator())
    assert set(losses) == {"loss", "l1", "mse"}
    with torch.no_grad():
        recon = tiny_policy.vae.decode(tiny_policy.vae.encode(hq).latent).sample
    torch.testing.assert_close(losses["l1"], (recon - hq).abs().mean())
    torch.testing.assert_close(losses["mse"], (recon - hq).pow(2).mean())
    torch.testing.assert_close(losses["loss"], losses["l1"] + losses["mse"])


# ----------------------------------------------------------------------------- gradient flow
def test_stage1_1_gradients_pass_through_the_frozen_dit(
    tiny_policy: PrefRestorePolicy, config: RunConfig
) -> None:
    stage = config.stage1_1
    tiny_policy.set_trainable(stage.trainable)
    losses = stage1_losses(tiny_policy, _batch(), stage, torch.Generator().manual_seed(0))
    losses["loss"].backward()
    assert _grad_norm(tiny_policy.integrator) > 0
    assert _grad_norm(tiny_policy.diffusion_connector) > 0
    assert _grad_norm(tiny_policy.vae_connector) > 0
    for frozen in (
        tiny_policy.transformer,
        tiny_policy.lq_encoder,
        tiny_policy.vae,
        tiny_policy.visual_tokenizer,
    ):
        assert _has_no_grad(frozen)


def test_stage1_1_diffusion_loss_alone_reaches_the_integrator(
    tiny_policy: PrefRestorePolicy, config: RunConfig
) -> None:
    """L_diff back-propagates through the frozen DiT and the connector into the AR integrator."""
    tiny_policy.set_trainable(config.stage1_1.trainable)
    losses = stage1_losses(tiny_policy, _batch(), config.stage1_1, torch.Generator().manual_seed(0))
    losses["diff_loss"].backward()
    assert _grad_norm(tiny_policy.integrator.model.layers) > 0
    assert _has_no_grad(tiny_policy.transformer)


def test_stage1_2_gradients(tiny_policy: PrefRestorePolicy, config: RunConfig) -> None:
    stage = config.stage1_2
    tiny_policy.set_trainable(stage.trainable)
    losses = stage1_losses(tiny_policy, _batch(), stage, torch.Generator().manual_seed(0))
    losses["loss"].backward()
    assert _grad_norm(tiny_policy.lq_encoder) > 0
    assert _grad_norm(tiny_policy.transformer) > 0
    assert _grad_norm(tiny_policy.vae_connector) > 0
    for frozen in (tiny_policy.integrator, tiny_policy.diffusion_connector, tiny_policy.vae):
        assert _has_no_grad(frozen)


def test_stage1_2_with_generated_codes(tiny_policy: PrefRestorePolicy, config: RunConfig) -> None:
    """semantic_codes=generated conditions the DiT on the integrator's own greedy codes of the LQ prompt."""
    stage = config.stage1_2.model_copy(update={"semantic_codes": "generated"})
    tiny_policy.set_trainable(stage.trainable)
    batch = _batch()
    losses = stage1_losses(tiny_policy, batch, stage, torch.Generator().manual_seed(0))
    target = stage1_losses(tiny_policy, batch, config.stage1_2, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    cond = tiny_policy.conditioning(batch["lq"], batch["caption"], sampler=SamplerConfig(), generator=generator)
    states = drop_conditions(cond.encoder_hidden_states, 0.0, generator)
    expected = expected_diff_loss(tiny_policy, batch["hq"], states, generator)
    torch.testing.assert_close(losses["diff_loss"], expected)
    assert not torch.equal(cond.codes, tiny_policy.target_codes(batch["hq"]))
    assert abs(losses["diff_loss"].item() - target["diff_loss"].item()) > 1e-4
    torch.testing.assert_close(losses["latent_loss"], target["latent_loss"])
    losses["loss"].backward()
    assert _grad_norm(tiny_policy.transformer) > 0 and _has_no_grad(tiny_policy.integrator)


def _mix(config: RunConfig, fraction: float):
    return config.stage1_2.model_copy(update={"semantic_codes": "mix", "generated_fraction": fraction})


@pytest.mark.parametrize(("fraction", "equivalent"), [(0.0, "target"), (1.0, "generated")])
def test_mix_at_the_ends_equals_target_or_generated(
    tiny_policy: PrefRestorePolicy, config: RunConfig, fraction: float, equivalent: str
) -> None:
    batch = _batch()
    mixed = stage1_losses(tiny_policy, batch, _mix(config, fraction), torch.Generator().manual_seed(3))
    stage = config.stage1_2.model_copy(update={"semantic_codes": equivalent})
    expected = stage1_losses(tiny_policy, batch, stage, torch.Generator().manual_seed(3))
    assert mixed.keys() == expected.keys()
    assert all(torch.equal(mixed[key], expected[key]) for key in expected)


def test_mix_generates_codes_per_sample_and_only_for_those(
    tiny_policy: PrefRestorePolicy, config: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = _mix(config, 0.5)
    hq = _faces(8, 4)
    lq = (hq + 0.3 * torch.randn(hq.shape, generator=torch.Generator().manual_seed(5))).clamp(-1, 1)
    batch = {"hq": hq, "lq": lq, "caption": ["", "a man"] * 4}
    rows = generated_rows(stage, 8, torch.Generator().manual_seed(2))
    assert 0 < int(rows.sum()) < 8  # this seed picks some of each
    assert torch.equal(rows, generated_rows(stage, 8, torch.Generator().manual_seed(2)))
    assert 2 < int(generated_rows(stage, 4000, torch.Generator().manual_seed(2)).sum()) / 40 < 52

    target = tiny_policy.target_codes(hq)
    every_row = torch.ones(8, dtype=torch.bool)
    everyone = conditioning_codes(tiny_policy, lq, batch["caption"], target, every_row, torch.Generator())
    batch_sizes: list[int] = []
    generate = tiny_policy.semantic.generate_codes

    def counting(prompt_ids: torch.Tensor, *args: object) -> torch.Tensor:
        batch_sizes.append(prompt_ids.shape[0])
        return generate(prompt_ids, *args)

    monkeypatch.setattr(tiny_policy.semantic, "generate_codes", counting)
    codes = conditioning_codes(tiny_policy, lq, batch["caption"], target, rows, torch.Generator())
    assert batch_sizes == [int(rows.sum())]  # the AR pass runs over the picked samples only
    assert torch.equal(codes[rows], everyone[rows]) and torch.equal(codes[~rows], target[~rows])
    assert not torch.equal(everyone, target)

    # The loss conditions on exactly those codes; the same generator gives the same losses.
    generator = torch.Generator().manual_seed(2)
    losses = stage1_losses(tiny_policy, batch, stage, generator)
    generator = torch.Generator().manual_seed(2)
    assert torch.equal(generated_rows(stage, 8, generator), rows)
    states = tiny_policy.conditioning(lq, batch["caption"], target_codes=codes).encoder_hidden_states
    states = drop_conditions(states, 0.0, generator)
    expected = expected_diff_loss(tiny_policy, hq, states, generator)
    torch.testing.assert_close(losses["diff_loss"], expected)
    again = stage1_losses(tiny_policy, batch, stage, torch.Generator().manual_seed(2))
    assert all(torch.equal(losses[key], again[key]) for key in losses)


def test_generated_fraction_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"run_dir={tmp_path}", "stage1_2.generated_fraction=1.5"])
    assert "stage1_2.generated_fraction" in str(info.value) and "1.5" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"run_dir={tmp_path}", "stage1_2.semantic_codes=mixed"])
    assert "stage1_2.semantic_codes" in str(info.value) and "mix" in str(info.value)


# ----------------------------------------------------------------------------- training
def _train(config: RunConfig, name: str, key: str, steps: int = 15) -> tuple[float, float]:
    policy = build_tiny_policy(0)
    stage = config.stage(name)
    optimizer = torch.optim.AdamW(policy.set_trainable(stage.trainable), lr=3e-3)
    batch = _batch()
    values = []
    for _ in range(steps + 1):
        losses = stage1_losses(policy, batch, stage, torch.Generator().manual_seed(0))
        values.append(losses[key].item())
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    return values[0], values[-1]


def test_adamw_lowers_the_stage1_1_ce_loss(config: RunConfig) -> None:
    first, last = _train(config, "stage1.1", "ce_loss")
    assert last < 0.8 * first, (first, last)


def test_adamw_lowers_the_stage1_2_loss(config: RunConfig) -> None:
    first, last = _train(config, "stage1.2", "loss")
    assert last < 0.8 * first, (first, last)


# ----------------------------------------------------------------------------- helpers
def test_drop_conditions() -> None:
    states = torch.randn(64, 5, 3, generator=torch.Generator().manual_seed(0)) + 3.0
    assert torch.equal(drop_conditions(states, 0.0, torch.Generator().manual_seed(1)), states)
    assert torch.equal(
        drop_conditions(states, 1.0, torch.Generator().manual_seed(1)), torch.zeros_like(states)
    )
    half = drop_conditions(states, 0.5, torch.Generator().manual_seed(1))
    dropped = (half == 0).flatten(1).all(1)
    kept = (half == states).flatten(1).all(1)
    assert torch.all(dropped ^ kept)  # whole samples are dropped, never parts of one
    assert 16 < int(dropped.sum()) < 48
    again = drop_conditions(states, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(half, again)


def test_adopt_fitted_vae(tiny_policy: PrefRestorePolicy) -> None:
    with torch.no_grad():  # stand-in for the autoencoder stage having changed the encoder
        for param in tiny_policy.vae.encoder.parameters():
            param.add_(
                0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel()))
            )
    assert any(
        not torch.equal(a, b)
        for a, b in zip(
            tiny_policy.vae.encoder.state_dict().values(), tiny_policy.lq_encoder.state_dict().values()
        )
    )
    clean = _faces(4, 7)
    with torch.no_grad():
        std = tiny_policy.vae.encode(clean).latent.std().item()
    scale = tiny_policy.adopt_fitted_vae(clean)
    assert scale == pytest.approx(1.0 / std, rel=1e-5)
    assert tiny_policy.vae.config.scaling_factor == pytest.approx(scale)
    assert tiny_policy.scaling_factor == pytest.approx(scale)
    encoder, lq_encoder = tiny_policy.vae.encoder.state_dict(), tiny_policy.lq_encoder.state_dict()
    assert encoder.keys() == lq_encoder.keys()
    assert all(torch.equal(encoder[k], lq_encoder[k]) for k in encoder)
    assert tiny_policy.lq_encoder.conv_in.weight is not tiny_policy.vae.encoder.conv_in.weight  # a copy
    assert tiny_policy.encode(clean).std().item() == pytest.approx(1.0, rel=1e-4)
    torch.testing.assert_close(tiny_policy.encode_lq(clean), tiny_policy.encode(clean))
