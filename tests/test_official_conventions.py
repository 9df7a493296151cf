"""The released model's conventions as policy / sampler options, each checked against how the authors'
code or the library it uses computes it: vocabulary layout, chat prompt, TA-Tok codebook, connectors,
the effective flow shift, the DPM-Solver-2 sampler and the gaussian LoRA init. Defaults keep today's
behaviour (and old policy directories load)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from torch import nn

from rlrestore.config import PolicyConfig, SamplerConfig, load_config
from rlrestore.flow import sample_dpm2, sample_flow, sample_latents, shifted_timesteps
from rlrestore.models.connectors import Connector
from rlrestore.models.lora import add_lora
from rlrestore.models.text_tokenizer import Vocabulary, load_text_tokenizer
from rlrestore.models.visual_tokenizer import SimVQ
from rlrestore.policies.prefrestore import PrefRestorePolicy
from tests.conftest import build_tiny_policy
from tests.official_layout import SANA_SCHEDULER, build_tokenizer, reference_prompt_ids

OFFICIAL = ("policy.vocabulary=blip3o", "policy.prompt_format=chat", "policy.codebook_bias=true",
            "policy.codebook_l2_normalized=true", "policy.vae_connector_gelu=tanh", "policy.connector_norm_eps=1e-5",
            "policy.tokenizer_resolution=16", "policy.vision.arch.image_size=16")  # fmt: skip


# ----------------------------------------------------------------------------- vocabulary
def test_blip3o_layout_ids_follow_the_text_tokens() -> None:
    """<im_start> right after Qwen's text tokens, <I0> = text tokens + 5, with or without the image
    tokens (and a trailing <image>) in the tokenizer."""
    official = build_tokenizer(codes=8)
    text_tokens = official.convert_tokens_to_ids("<|im_end|>") + 1
    vocab = Vocabulary(official, 8, "blip3o")
    assert (vocab.im_start, vocab.im_end, *vocab.scales) == tuple(range(text_tokens, text_tokens + 5))
    assert vocab.first_image_id == text_tokens + 5 == official.convert_tokens_to_ids("<I0>")
    assert vocab.size == official.convert_tokens_to_ids("<I7>") + 1 and vocab.image_placeholder is None


def test_blip3o_layout_built_from_a_plain_tokenizer_and_refused_when_broken() -> None:
    tokenizer = load_text_tokenizer(None, "blip3o", "chat")  # byte-level: chat markers, then the five tokens
    vocab = Vocabulary(tokenizer, 16, "blip3o")
    assert vocab.first_image_id == len(tokenizer) == vocab.im_start + 5
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") < vocab.im_start
    broken = load_text_tokenizer(None, "blip3o")
    broken.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="image tokens must start at"):
        Vocabulary(broken, 16, "blip3o")


def test_rlrestore_layout_is_unchanged() -> None:
    tokenizer = load_text_tokenizer(None)
    vocab = Vocabulary(tokenizer, 16)
    assert vocab.first_image_id == len(tokenizer) and vocab.image_placeholder is not None


# ----------------------------------------------------------------------------- chat prompt
@pytest.mark.parametrize("caption", ["", "a woman with a red scarf"])
def test_chat_prompt_matches_their_chat_template(caption: str) -> None:
    tokenizer = build_tokenizer(codes=8)
    config = PolicyConfig()
    template = config.caption_prompt.replace("{caption}", caption) if caption else config.prompt
    codes = [3, 0, 7, 7, 1]
    vocab = Vocabulary(tokenizer, 8, "blip3o")
    ours = vocab.prompt_ids(template, codes, "chat", config.system_prompt)
    assert ours == reference_prompt_ids(tokenizer, template, vocab.image_ids(codes))
    assert ours[-2:] == [vocab.im_start, vocab.scales[0]]
    assert vocab.im_end not in ours  # the LQ codes are bare, not wrapped in <im_start> .. <im_end>


def test_policy_prompt_uses_the_configured_format() -> None:
    policy = build_tiny_policy(0, *OFFICIAL)
    codes = policy.visual_tokenizer(torch.zeros(1, 3, 16, 16))
    ids, mask = policy.semantic.prompt_batch(codes, [""])
    expected = policy.vocabulary.prompt_ids(
        policy.config.prompt, codes[0].tolist(), "chat", policy.config.system_prompt
    )
    assert ids[0].tolist() == expected and bool(mask.all())


# ----------------------------------------------------------------------------- TA-Tok codebook
def test_codebook_bias_and_l2_lookup() -> None:
    torch.manual_seed(0)
    quantizer = SimVQ(32, 8, bias=True, l2_normalized=True)
    nn.init.normal_(quantizer.proj.bias, std=0.5)
    features = torch.randn(2, 5, 8) * torch.rand(2, 5, 1) * 4
    # TA-Tok's lookup: normalise both, nearest code in Euclidean distance (= largest cosine)
    codes = F.normalize(F.linear(quantizer.basis, quantizer.proj.weight, quantizer.proj.bias), dim=-1)
    expected = (F.normalize(features, dim=-1) @ codes.T).argmax(-1)
    assert torch.equal(quantizer(features), expected)
    assert "proj.bias" in quantizer.state_dict() and "proj.bias" not in SimVQ(32, 8).state_dict()
    plain = SimVQ(32, 8)
    plain.load_state_dict({k: v for k, v in quantizer.state_dict().items() if k != "proj.bias"})
    assert not torch.equal(plain(features), quantizer(features))  # the flags change the codes


def test_official_options_round_trip_through_a_policy_directory(tmp_path) -> None:
    policy = build_tiny_policy(0, *OFFICIAL)
    nn.init.normal_(policy.visual_tokenizer.quantizer.proj.bias)
    policy.save_pretrained(tmp_path / "p")
    loaded = PrefRestorePolicy.from_pretrained(tmp_path / "p")
    assert torch.equal(
        loaded.visual_tokenizer.quantizer.proj.bias, policy.visual_tokenizer.quantizer.proj.bias
    )
    assert loaded.visual_tokenizer.quantizer.l2_normalized and loaded.vocabulary.layout == "blip3o"


def test_old_policy_directories_load_with_todays_defaults(tmp_path) -> None:
    build_tiny_policy(
        0, "policy.tokenizer_resolution=16", "policy.vision.arch.image_size=16"
    ).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "policy_config.json").read_text())
    for key in (
        "vocabulary",
        "prompt_format",
        "system_prompt",
        "codebook_bias",
        "codebook_l2_normalized",
        "vae_connector_gelu",
        "connector_norm_eps",
    ):
        del meta["policy"][key]  # a directory written before these options existed
    (tmp_path / "policy_config.json").write_text(json.dumps(meta))
    loaded = PrefRestorePolicy.from_pretrained(tmp_path)
    assert loaded.config.vocabulary == "rlrestore" and loaded.vae_connector[1].approximate == "none"


# ----------------------------------------------------------------------------- connectors
def test_connector_activation_and_eps() -> None:
    assert Connector(4, 8, eps=1e-5)[3].eps == 1e-5 and Connector(4, 8)[3].eps == 1e-6
    policy = build_tiny_policy(0, *OFFICIAL)
    for connector in (policy.diffusion_connector, policy.vae_connector):
        assert connector[1].approximate == "tanh" and connector[3].eps == 1e-5
    default = build_tiny_policy(0)
    assert default.vae_connector[1].approximate == "none" and default.diffusion_connector[3].eps == 1e-6


# ----------------------------------------------------------------------------- samplers
def test_their_euler_grid_has_flow_shift_one() -> None:
    """Their model builds FlowMatchEulerDiscreteScheduler from SANA's DPM-Solver scheduler config and
    sets sigmas linspace(1, 1/30, 30): the grid is policy.flow_shift = 1.0's, not flow_shift 3.0's."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SANA_SCHEDULER)
    scheduler.set_timesteps(30, sigmas=np.linspace(1.0, 1 / 30, 30))
    assert scheduler.config.shift == 1.0
    torch.testing.assert_close(scheduler.sigmas, shifted_timesteps(30, 1.0), atol=1e-6, rtol=0)
    assert not torch.allclose(scheduler.sigmas, shifted_timesteps(30, 3.0))


def _linear_field(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(6, 6, generator=generator) * 0.3
    return lambda x, t, c: x @ weight.T + c * (1 + t[:, None])


@pytest.mark.parametrize("steps,shift", [(30, 1.0), (10, 3.0), (2, 1.0)])
def test_dpm2_equals_diffusers_dpm_solver_multistep(steps: int, shift: float) -> None:
    velocity = _linear_field()
    noise, condition = torch.randn(3, 6), torch.randn(3, 6)
    scheduler = DPMSolverMultistepScheduler(
        solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", prediction_type="flow_prediction",
        use_flow_sigmas=True, flow_shift=shift, lower_order_final=True, final_sigmas_type="zero",
    )  # fmt: skip
    scheduler.set_timesteps(steps)
    x = noise.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        x = scheduler.step(velocity(x, scheduler.sigmas[i].expand(3), condition), timestep, x).prev_sample
    ours = sample_dpm2(velocity, noise, condition, steps, times=scheduler.sigmas)
    torch.testing.assert_close(ours, x, atol=2e-6, rtol=0)
    # on rlrestore's own grid (starting at t = 1) too
    scheduler.set_timesteps(steps)
    grid = shifted_timesteps(steps, shift)
    scheduler.sigmas, scheduler.timesteps = grid.clone(), grid[:-1] * 1000
    x = noise.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        x = scheduler.step(velocity(x, grid[i].expand(3), condition), timestep, x).prev_sample
    torch.testing.assert_close(
        sample_latents("dpm2", velocity, noise, condition, steps, shift=shift), x, atol=2e-6, rtol=0
    )


def test_dpm2_with_cfg_and_its_refusals() -> None:
    velocity = _linear_field(1)
    noise, condition = torch.randn(2, 6), torch.randn(2, 6)
    guided = sample_dpm2(velocity, noise, condition, 6, shift=1.0, guidance_scale=2.0)

    def by_hand(x, t, c):
        return velocity(x, t, torch.zeros_like(c)) + 2.0 * (
            velocity(x, t, c) - velocity(x, t, torch.zeros_like(c))
        )

    torch.testing.assert_close(guided, sample_dpm2(by_hand, noise, condition, 6, shift=1.0))
    assert sample_flow(velocity, noise, condition, 6).shape == guided.shape
    with pytest.raises(ValueError, match="deterministic"):
        sample_latents("dpm2", velocity, noise, condition, 4, sde_eta=0.5)
    with pytest.raises(ValueError, match="unknown sampler method"):
        sample_latents("heun", velocity, noise, condition, 4)
    with pytest.raises(Exception, match="sde_eta=0"):
        load_config(None, ["sampler.method=dpm2", "sampler.sde_eta=0.3"])


def test_policy_restores_with_dpm2() -> None:
    policy = build_tiny_policy(0, "policy.tokenizer_resolution=16", "policy.vision.arch.image_size=16")
    lq, seeds = torch.rand(1, 3, 64, 64) * 2 - 1, torch.tensor([[3, 4]])
    dpm2 = policy.restore(lq, [""], seeds, SamplerConfig(steps=3, method="dpm2"))
    again = policy.restore(lq, [""], seeds, SamplerConfig(steps=3, method="dpm2"))
    euler = policy.restore(lq, [""], seeds, SamplerConfig(steps=3))
    assert torch.equal(dpm2.latents, again.latents) and not torch.equal(dpm2.latents, euler.latents)


# ----------------------------------------------------------------------------- LoRA init
def test_gaussian_lora_init() -> None:
    torch.manual_seed(0)
    gaussian = add_lora(nn.Sequential(nn.Linear(256, 256)), rank=8, alpha=16, targets=["0"], init="gaussian")
    default = add_lora(nn.Sequential(nn.Linear(256, 256)), rank=8, alpha=16, targets=["0"])
    a_gauss, a_default = gaussian[0].lora_A["default"].weight, default[0].lora_A["default"].weight
    assert abs(a_gauss.std().item() - 1 / 8) < 0.01  # peft's gaussian: normal, std 1 / rank
    assert a_default.abs().max() < 1 / 16 + 1e-6  # Kaiming-uniform(a=sqrt(5)): |A| <= 1 / sqrt(256)
    assert not gaussian[0].lora_B["default"].weight.any()  # the adapted layer starts equal to the base
    with pytest.raises(ValueError, match="lora_init"):
        add_lora(nn.Sequential(nn.Linear(4, 4)), rank=2, alpha=2, targets=["0"], init="orthogonal")
