"""DiffusionNFT math: golden vectors (float64, 1e-9), gradient properties, normalisation, EMA.

``tests/data/nft_golden.json`` is a verbatim copy of the golden vectors supplied with the
project's design notes: inputs and float64 results of both loss forms (beta 1.0 and 0.1) and of
the group normalisation, computed independently of this code; its ``conventions`` field states
the equations they follow.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlrestore.nft import (
    ema_decay,
    ema_update,
    eq12_normalize,
    group_normalize,
    interpolate,
    nft_loss,
    target_velocity,
)

GOLDEN = json.loads((Path(__file__).parent / "data" / "nft_golden.json").read_text())
F64 = torch.float64
FORMS = ("velocity", "adaptive_x0")


def _golden_inputs() -> dict[str, torch.Tensor]:
    return {name: torch.tensor(value, dtype=F64) for name, value in GOLDEN["inputs"].items()}


def _batch(seed: int = 0, deviation: float = 0.1, batch: int = 16) -> dict[str, torch.Tensor]:
    """Random float64 batch; v_old sits near v_theta as it does for an EMA rollout policy."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 4, 6, 6, generator=gen, dtype=F64)
    v_theta = torch.randn(x0.shape, generator=gen, dtype=F64)
    return {
        "x0": x0,
        "eps": torch.randn(x0.shape, generator=gen, dtype=F64),
        "t": 0.05 + 0.9 * torch.rand(batch, generator=gen, dtype=F64),
        "v_theta": v_theta,
        "v_old": v_theta + deviation * torch.randn(x0.shape, generator=gen, dtype=F64),
    }


def _grad(form: str, r: torch.Tensor, beta: float, b: dict[str, torch.Tensor]) -> torch.Tensor:
    v_theta = b["v_theta"].clone().requires_grad_(True)
    loss, _ = nft_loss(v_theta, b["v_old"], b["x0"], b["eps"], b["t"], r, beta, form=form)
    loss.backward()
    return v_theta.grad


def test_interpolation_follows_the_flow_convention() -> None:
    x0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    eps = torch.tensor([[-1.0, 0.0], [1.0, 1.0]], dtype=F64)
    t = torch.tensor([0.25, 1.0], dtype=F64)
    x_t = interpolate(x0, eps, t)
    torch.testing.assert_close(x_t, torch.tensor([[0.5, 1.5], [1.0, 1.0]], dtype=F64))
    u = target_velocity(x0, eps)
    torch.testing.assert_close(x_t - t[:, None] * u, x0)  # x0_pred = x_t - t v with the true v


def test_golden_conventions_are_the_ones_implemented() -> None:
    conventions = GOLDEN["conventions"]
    for phrase in (
        "x_t=(1-t)x0+t*eps",
        "u=eps-x0",
        "v_plus=beta*v_theta+(1-beta)*v_old",
        "v_minus=(1+beta)*v_old-beta*v_theta",
        "population std (ddof=0), +1e-4",
    ):
        assert phrase in conventions


@pytest.mark.parametrize("case", GOLDEN["loss_cases"], ids=lambda c: f"beta{c['beta']}")
@pytest.mark.parametrize("form", FORMS)
def test_loss_matches_golden(case: dict, form: str) -> None:
    g = _golden_inputs()
    loss, stats = nft_loss(
        g["v_theta"], g["v_old"], g["x0"], g["eps"], g["t"], g["r"],
        beta=case["beta"], form=form, adaptive_scale=case["adaptive_scale"],
    )  # fmt: skip
    expected = case["velocity_form_loss" if form == "velocity" else "adaptive_x0_form_loss"]
    assert loss.dtype == F64
    assert loss.item() == pytest.approx(expected, abs=1e-9, rel=0)
    assert (stats["loss_positive"] + stats["loss_negative"]).item() == pytest.approx(loss.item(), abs=1e-12)
    assert stats["old_deviation"].item() == pytest.approx((g["v_theta"] - g["v_old"]).abs().mean().item())


def test_group_normalize_matches_golden() -> None:
    gn = GOLDEN["group_norm"]
    rewards = torch.tensor(gn["rewards"], dtype=F64)
    result = group_normalize(rewards, clip=gn["clip"])
    assert result.std_all == pytest.approx(gn["std_all"], abs=1e-9, rel=0)
    torch.testing.assert_close(result.r, torch.tensor(gn["r"], dtype=F64), atol=1e-9, rtol=0)
    assert result.valid_group.tolist() == [True, True, False]  # the third group is flat
    assert result.dropped == 1 and result.nonfinite == 0
    eq12 = eq12_normalize(rewards, z=1.0)
    torch.testing.assert_close(eq12.r, torch.tensor(gn["eq12_Z1_r"], dtype=F64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_positive_sample_pulls_v_theta_to_the_target_and_negative_pushes_it_away(
    form: str, beta: float
) -> None:
    b = _batch()
    u = target_velocity(b["x0"], b["eps"])
    before = (b["v_theta"] - u).norm()
    for r_value, closer in ((1.0, True), (0.0, False)):
        grad = _grad(form, torch.full((16,), r_value, dtype=F64), beta, b)
        after = (b["v_theta"] - 1e-3 * grad / grad.norm() - u).norm()
        assert (after < before) == closer, f"r={r_value}: |v-u| {before.item():.6f} -> {after.item():.6f}"


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_both_forms_push_the_same_way(beta: float) -> None:
    """Per sample, both gradients are positive combinations of (v_plus - u) and -(v_minus - u);
    for r in {0, 1} only one term is left, so they agree in sign element by element, and with
    v_old near v_theta they point the same way for any r."""
    b = _batch(seed=1)
    r_binary = torch.tensor([0.0, 1.0] * 8, dtype=F64)
    g_velocity, g_adaptive = _grad("velocity", r_binary, beta, b), _grad("adaptive_x0", r_binary, beta, b)
    assert torch.equal(torch.sign(g_velocity), torch.sign(g_adaptive))

    r_soft = torch.rand(16, generator=torch.Generator().manual_seed(2), dtype=F64)
    g_velocity, g_adaptive = _grad("velocity", r_soft, beta, b), _grad("adaptive_x0", r_soft, beta, b)
    cosine = F.cosine_similarity(g_velocity.flatten(1), g_adaptive.flatten(1), dim=1)
    assert cosine.min() > 0.9


def test_v_old_carries_no_gradient_and_collapse_is_visible() -> None:
    b = _batch()
    v_old = b["v_theta"].clone().requires_grad_(True)
    v_theta = b["v_theta"].clone().requires_grad_(True)
    r = torch.full((16,), 0.75, dtype=F64)
    loss, stats = nft_loss(v_theta, v_old, b["x0"], b["eps"], b["t"], r, beta=1.0)
    loss.backward()
    assert v_old.grad is None and v_theta.grad is not None
    assert stats["old_deviation"].item() == 0.0  # v_old == v_theta: the pitfall the stat exposes
    # with v+ = v- = v_theta the gradient is that of a (2r - 1)-weighted flow-matching loss
    u = target_velocity(b["x0"], b["eps"])
    weight = (2 * r - 1)[:, None, None, None]
    torch.testing.assert_close(v_theta.grad, 2 * weight * (b["v_theta"] - u) / b["x0"].numel())


def test_loss_rejects_bad_inputs() -> None:
    b = _batch()
    r = torch.full((16,), 0.5, dtype=F64)
    with pytest.raises(ValueError, match="unknown NFT loss form"):
        nft_loss(b["v_theta"], b["v_old"], b["x0"], b["eps"], b["t"], r, 1.0, form="x0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="r must have shape"):
        nft_loss(b["v_theta"], b["v_old"], b["x0"], b["eps"], b["t"], r[:3], 1.0)
    with pytest.raises(ValueError, match="one shape"):
        nft_loss(b["v_theta"][:, :2], b["v_old"], b["x0"], b["eps"], b["t"], r, 1.0)
    with pytest.raises(ValueError, match="beta"):
        nft_loss(b["v_theta"], b["v_old"], b["x0"], b["eps"], b["t"], r, 0.0)


def test_equal_rewards_are_dropped_with_neutral_r() -> None:
    result = group_normalize(torch.tensor([[0.3, 0.3, 0.3], [0.1, 0.2, 0.6]]))
    assert result.valid_group.tolist() == [False, True]
    assert result.r[0].tolist() == [0.5, 0.5, 0.5]
    assert not result.valid[0].any() and result.valid[1].all()
    assert result.dropped == 1


def test_nonfinite_rewards_are_excluded_not_propagated() -> None:
    rewards = torch.tensor(
        [
            [1.0, math.nan, 3.0, 5.0],  # kept: mean and spread over the 3 finite members
            [math.inf, 2.0, math.nan, -math.inf],  # one finite member: dropped
            [0.0, 1.0, 2.0, 3.0],
        ],
        dtype=F64,
    )
    result = group_normalize(rewards)
    assert torch.isfinite(result.r).all() and torch.isfinite(result.advantages).all()
    assert result.nonfinite == 4 and result.dropped == 1
    assert result.valid_group.tolist() == [True, False, True]
    assert result.valid[0].tolist() == [True, False, True, True]
    assert result.r[0, 1].item() == 0.5 and result.advantages[0, 1].item() == 0.0
    finite = rewards[torch.isfinite(rewards)]
    expected_a = (torch.tensor([1.0, 3.0, 5.0], dtype=F64) - 3.0) / (finite.std(correction=0) + 1e-4)
    torch.testing.assert_close(result.advantages[0, [0, 2, 3]], expected_a)
    assert result.std_all == pytest.approx(finite.std(correction=0).item())


def test_single_candidate_groups_carry_no_signal() -> None:
    result = group_normalize(torch.tensor([[1.0], [7.0], [-2.0]]))
    assert result.dropped == 3 and not result.valid.any()
    assert result.r.tolist() == [[0.5], [0.5], [0.5]]


def test_all_flat_step_does_not_divide_by_zero() -> None:
    for normalize in (group_normalize, lambda x: eq12_normalize(x, z=1.0)):
        result = normalize(torch.full((3, 4), 2.0))
        assert result.std_all == 0.0 and result.dropped == 3
        assert torch.equal(result.r, torch.full((3, 4), 0.5))
    all_nan = group_normalize(torch.full((2, 3), math.nan))
    assert all_nan.nonfinite == 6 and all_nan.dropped == 2 and torch.isfinite(all_nan.r).all()


def test_extreme_advantages_are_clipped_into_unit_interval() -> None:
    rewards = torch.tensor([[0.0] * 20 + [100.0], [0.0] * 20 + [-100.0]], dtype=F64)
    result = group_normalize(rewards, clip=1.0)
    assert result.r.min().item() == 0.0 and result.r.max().item() == 1.0
    with pytest.raises(ValueError, match="groups, candidates"):
        group_normalize(torch.zeros(4))


def test_ema_schedules() -> None:
    assert [ema_decay(s) for s in (0, 1, 100, 500, 10_000)] == pytest.approx([0.0, 0.001, 0.1, 0.5, 0.5])
    assert [ema_decay(s, "delayed") for s in (0, 74, 75, 76, 175, 1_000)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.0075, 0.75, 0.999]
    )
    assert ema_decay(30, "linear", rate=0.01, cap=0.2) == pytest.approx(0.2)
    assert ema_decay(12, "delayed", delay=10, rate=0.1) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="unknown EMA schedule"):
        ema_decay(1, "cosine")  # type: ignore[arg-type]


def test_ema_update_in_place() -> None:
    old = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    new = [torch.tensor([3.0, -2.0], requires_grad=True), torch.tensor([[4.0]])]
    ids = [id(p) for p in old]
    ema_update(old, new, decay=0.25)
    assert [id(p) for p in old] == ids
    torch.testing.assert_close(old[0], torch.tensor([2.5, -1.0]))  # 0.25 * old + 0.75 * new
    torch.testing.assert_close(old[1], torch.tensor([[3.0]]))
    assert not old[0].requires_grad
    ema_update(old, new, decay=0.0)
    torch.testing.assert_close(old[0], new[0].detach())
    with pytest.raises(ValueError, match="shape"):
        ema_update([torch.zeros(2)], [torch.zeros(3)], 0.5)
    with pytest.raises(ValueError, match="matching parameter lists"):
        ema_update([torch.zeros(2)], [], 0.5)
