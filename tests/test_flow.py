"""Flow-matching conventions (x_t = (1 - t) x0 + t eps, v = eps - x0) and the Euler / CFG / SDE sampler."""

from __future__ import annotations

import pytest
import torch

from rlrestore.flow import interpolate, sample_flow, shifted_timesteps, target_velocity


def _generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def _toward_condition(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The exact rectified-flow velocity toward the target x0 = c: v = (x_t - x0) / t = eps - x0."""
    return (x - c) / t.view(-1, *([1] * (x.ndim - 1)))


def _nonlinear(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """A velocity that depends on x, t and the condition in a non-affine way."""
    t = t.view(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x * c + t) - 0.5 * x * t + c**2


# ----------------------------------------------------------------------------- interpolation
def test_interpolate_endpoints_and_midpoint() -> None:
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    assert torch.equal(interpolate(x0, eps, torch.zeros(3)), x0)
    assert torch.equal(interpolate(x0, eps, torch.ones(3)), eps)
    t = torch.tensor([0.0, 0.25, 1.0])
    x_t = interpolate(x0, eps, t)
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * eps[1])
    # x0_pred = x_t - t v recovers x0 with v = eps - x0.
    torch.testing.assert_close(x_t - t.view(-1, 1, 1, 1) * target_velocity(x0, eps), x0)


def test_shifted_timesteps() -> None:
    for shift in (1.0, 3.0, 0.5):
        times = shifted_timesteps(10, shift)
        assert times.shape == (11,) and times.dtype == torch.float32
        assert times[0].item() == 1.0 and times[-1].item() == 0.0
        assert torch.all(times[1:] < times[:-1])
    torch.testing.assert_close(shifted_timesteps(4, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    # shift > 1 spends more of the grid at high noise: t' = 3 * 0.5 / (1 + 2 * 0.5) = 0.75.
    assert shifted_timesteps(2, 3.0)[1].item() == pytest.approx(0.75)
    assert torch.all(shifted_timesteps(10, 3.0)[1:-1] > shifted_timesteps(10, 1.0)[1:-1])


# ----------------------------------------------------------------------------- ODE
@pytest.mark.parametrize(("steps", "shift"), [(1, 3.0), (4, 3.0), (7, 1.0)])
def test_euler_with_the_exact_velocity_recovers_the_target(steps: int, shift: float) -> None:
    g = torch.Generator().manual_seed(1)
    target, noise = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    out = sample_flow(_toward_condition, noise, target, steps=steps, shift=shift)
    assert (out - target).abs().max().item() < 1e-5
    assert (noise - target).abs().max().item() > 1.0  # the test starts far from the answer


def test_euler_matches_a_manual_loop() -> None:
    g = torch.Generator().manual_seed(2)
    cond, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    times = shifted_timesteps(5, 3.0)
    x = noise
    for i in range(5):
        x = x + _nonlinear(x, times[i].expand(3), cond) * (times[i + 1] - times[i])
    out = sample_flow(_nonlinear, noise, cond, steps=5, shift=3.0)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- CFG
def test_guidance_scale_one_is_no_cfg() -> None:
    calls: list[torch.Tensor] = []

    def velocity(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        calls.append(c)
        return _nonlinear(x, t, c)

    g = torch.Generator().manual_seed(3)
    cond, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    with_cfg_off = sample_flow(velocity, noise, cond, steps=4, guidance_scale=1.0)
    assert all(c.shape[0] == 2 for c in calls)  # no unconditional branch was evaluated
    manual = sample_flow(lambda x, t, c: _nonlinear(x, t, c), noise, cond, steps=4)
    torch.testing.assert_close(with_cfg_off, manual, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [0.0, 2.5, 4.0])
def test_cfg_combines_branches_against_a_zero_condition(scale: float) -> None:
    g = torch.Generator().manual_seed(4)
    cond, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    times = shifted_timesteps(6, 3.0)
    x = noise
    for i in range(6):
        t = times[i].expand(2)
        v_c, v_u = _nonlinear(x, t, cond), _nonlinear(x, t, torch.zeros_like(cond))
        x = x + (v_u + scale * (v_c - v_u)) * (times[i + 1] - times[i])
    out = sample_flow(_nonlinear, noise, cond, steps=6, guidance_scale=scale)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
    unguided = sample_flow(_nonlinear, noise, cond, steps=6)
    assert (out - unguided).abs().max().item() > 1e-2


def test_cfg_with_the_exact_velocity_extrapolates_the_target() -> None:
    # v_u + w (v_c - v_u) = (x - w c) / t: the guided ODE lands on w * c exactly.
    g = torch.Generator().manual_seed(5)
    cond, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    out = sample_flow(_toward_condition, noise, cond, steps=3, guidance_scale=2.0)
    torch.testing.assert_close(out, 2.0 * cond, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- SDE
def test_sde_is_reproducible_per_sample_and_differs_from_the_ode() -> None:
    g = torch.Generator().manual_seed(6)
    cond, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    seeds = [11, 12, 13]
    a = sample_flow(_nonlinear, noise, cond, steps=6, sde_eta=0.5, generators=_generators(seeds))
    b = sample_flow(_nonlinear, noise, cond, steps=6, sde_eta=0.5, generators=_generators(seeds))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    ode = sample_flow(_nonlinear, noise, cond, steps=6)
    assert (a - ode).abs().min(dim=0).values.mean().item() > 1e-3
    other = sample_flow(_nonlinear, noise, cond, steps=6, sde_eta=0.5, generators=_generators([11, 99, 13]))
    torch.testing.assert_close(other[[0, 2]], a[[0, 2]], rtol=0, atol=0)  # sample noise is per generator
    assert (other[1] - a[1]).abs().max().item() > 1e-3
    alone = sample_flow(_nonlinear, noise[1:2], cond[1:2], steps=6, sde_eta=0.5, generators=_generators([12]))
    torch.testing.assert_close(alone, a[1:2], rtol=1e-6, atol=1e-6)


def test_sde_needs_one_generator_per_sample() -> None:
    noise, cond = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="one generator per sample"):
        sample_flow(_nonlinear, noise, cond, steps=2, sde_eta=0.3)
    with pytest.raises(ValueError, match="one generator per sample"):
        sample_flow(_nonlinear, noise, cond, steps=2, sde_eta=0.3, generators=_generators([1]))


def test_sde_keeps_the_marginals_of_the_straight_path() -> None:
    """For a point mass at x0 the exact velocity is (x - x0) / t and x_t ~ N((1 - t) x0, t^2).

    The SDE (same marginals as the ODE) must keep that law at every grid time, up to Euler-Maruyama
    error, and its last step is a plain Euler step that lands on x0.
    """
    n, dim, x0_value = 1000, 32, 0.7
    seen: dict[float, torch.Tensor] = {}

    def velocity(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        seen[float(t[0])] = x.clone()
        return _toward_condition(x, t, c)

    noise = torch.randn(n, dim, generator=torch.Generator().manual_seed(7))
    target = torch.full((n, dim), x0_value)
    out = sample_flow(velocity, noise, target, steps=10, sde_eta=0.3, generators=_generators(list(range(n))))
    assert (out - target).abs().max().item() < 1e-5
    assert len(seen) == 10
    for t, x in seen.items():
        assert x.mean().item() == pytest.approx((1 - t) * x0_value, abs=0.03), t
        # Euler-Maruyama error grows as the steps get longer towards t = 0 (about 2% by t = 0.43, 6% at 0.25).
        assert x.std().item() == pytest.approx(t, rel=0.04 if t > 0.4 else 0.1), t
