"""Flow matching (rectified flow) conventions and the sampler.

x_t = (1 - t) x0 + t eps, t in [0, 1] with t = 1 pure noise; the network predicts v = eps - x0,
so x0_pred = x_t - t v. Sampling integrates dx/dt = v from t = 1 to t = 0: Euler (optionally the
equivalent SDE) or a deterministic 2nd-order DPM-Solver++ (``sampler.method``, :func:`sample_latents`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps with one t per sample."""
    t = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * eps


def target_velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """u = eps - x0, the velocity of the straight path from data to noise."""
    return eps - x0


def shifted_timesteps(steps: int, shift: float) -> torch.Tensor:
    """steps + 1 times from 1 to 0, warped by t' = shift t / (1 + (shift - 1) t) (SANA's flow shift)."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


def sampling_times(steps: int, shift: float, t_max: float = 1.0) -> torch.Tensor:
    """The sampler grid of a model that starts at ``t_max``: ``t_max`` x the shifted grid from 1 to 0
    (the grid itself when ``t_max`` is 1, as for every model that starts from the path's end)."""
    times = shifted_timesteps(steps, shift)
    return times if t_max == 1.0 else times * t_max


def sample_flow(
    velocity: VelocityFn,
    noise: torch.Tensor,
    condition: torch.Tensor,
    steps: int | None = None,
    shift: float = 3.0,
    guidance_scale: float = 1.0,
    sde_eta: float = 0.0,
    generators: list[torch.Generator] | None = None,
    times: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate from the start ``noise`` (at t = 1, or ``times[0]``) to a clean latent (t = 0).

    Euler steps on the ODE over ``shifted_timesteps(steps, shift)`` or the given ``times``; with
    ``guidance_scale != 1`` classifier-free guidance against an all-zero condition (one batched call
    for both branches); with ``sde_eta > 0`` the Euler-Maruyama step of the equivalent SDE
    (Flow-GRPO form) with per-sample noise drawn from ``generators``.
    """
    if sde_eta > 0 and (generators is None or len(generators) != noise.shape[0]):
        raise ValueError("the SDE sampler needs one generator per sample")
    times = (shifted_timesteps(steps, shift) if times is None else times).to(noise.device)
    x = noise
    use_cfg = guidance_scale != 1.0
    for i in range(len(times) - 1):
        t, t_next = times[i], times[i + 1]
        t_batch = t.expand(x.shape[0])
        if use_cfg:
            v_both = velocity(
                torch.cat([x, x]), torch.cat([t_batch, t_batch]), torch.cat([condition, torch.zeros_like(condition)])
            )
            v_cond, v_uncond = v_both.chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        else:
            v = velocity(x, t_batch, condition)
        dt = t_next - t  # negative
        if sde_eta > 0 and t_next > 0:
            # sigma_t = eta sqrt(t / (1 - t)) is infinite at t = 1; Flow-GRPO uses the next grid time there.
            std = sde_eta * torch.sqrt(t / (1 - torch.where(t == 1, times[1], t)))
            mean = x * (1 + std**2 / (2 * t) * dt) + v * (1 + std**2 * (1 - t) / (2 * t)) * dt
            step_noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])
            x = mean + std * torch.sqrt(-dt) * step_noise.to(x.device, x.dtype)
        else:
            x = x + v * dt
    return x


def _log_snr(t: float) -> float:
    """lambda(t) = log(alpha_t / sigma_t) with alpha_t = 1 - t, sigma_t = t (-inf at t = 1, +inf at t = 0)."""
    if t >= 1.0:
        return -math.inf
    if t <= 0.0:
        return math.inf
    return math.log((1.0 - t) / t)


def _guided_velocity(
    velocity: VelocityFn, x: torch.Tensor, t: float, condition: torch.Tensor, guidance_scale: float
) -> torch.Tensor:
    """v(x, t, c) in float32; with ``guidance_scale != 1`` CFG against the all-zero condition (one batched
    call). x and t go in as float32: the velocity function casts what its network needs."""
    t_batch = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
    if guidance_scale == 1.0:
        return velocity(x, t_batch, condition).float()
    both = velocity(
        torch.cat([x, x]),
        torch.cat([t_batch, t_batch]),
        torch.cat([condition, torch.zeros_like(condition)]),
    )
    v_cond, v_uncond = both.float().chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def sample_dpm2(
    velocity: VelocityFn,
    noise: torch.Tensor,
    condition: torch.Tensor,
    steps: int | None = None,
    shift: float = 3.0,
    guidance_scale: float = 1.0,
    times: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deterministic 2nd-order multistep DPM-Solver++ (midpoint form) from t = 1 to t = 0.

    In flow form alpha_t = 1 - t, sigma_t = t, lambda = log(alpha / sigma) and x0 = x - t v. Each step
    from t_i to t_{i+1}, with h_i = lambda_{i+1} - lambda_i (paper notation of DPM-Solver++, Lu et al.):

        first order (first, last step):  x <- (t_{i+1} / t_i) x + alpha_{i+1} (1 - e^{-h_i}) x0_i
        second order (the others):       x <- (t_{i+1} / t_i) x + alpha_{i+1} (1 - e^{-h_i}) (x0_i + D1 / 2)
                                         with D1 = (h_i / h_{i-1}) (x0_i - x0_{i-1})

    which is what diffusers' DPMSolverMultistepScheduler (solver_order=2, dpmsolver++, midpoint,
    prediction_type=flow_prediction, final_sigmas_type=zero) computes on the same grid. The grid is
    ``shifted_timesteps(steps, shift)`` unless ``times`` (from 1 down to 0) is given. The state x and the
    time t stay float32.
    """
    grid = (shifted_timesteps(steps, shift) if times is None else times).double().tolist()
    x = noise.float()
    previous_x0: torch.Tensor | None = None
    last = len(grid) - 2
    for i in range(len(grid) - 1):
        t, t_next = grid[i], grid[i + 1]
        x0 = x - t * _guided_velocity(velocity, x, t, condition, guidance_scale)
        h = _log_snr(t_next) - _log_snr(t)
        scale = (1.0 - t_next) * -math.expm1(-h)  # alpha_{i+1} (1 - e^{-h})
        target = x0
        if previous_x0 is not None and i != last:
            ratio = h / (_log_snr(t) - _log_snr(grid[i - 1]))  # 1 / r0 = h_i / h_{i-1} (0 after t = 1)
            target = x0 + 0.5 * ratio * (x0 - previous_x0)
        x = (t_next / t) * x + scale * target
        previous_x0 = x0
    return x.to(noise.dtype)


def sample_latents(
    method: str,
    velocity: VelocityFn,
    noise: torch.Tensor,
    condition: torch.Tensor,
    steps: int | None = None,
    shift: float = 3.0,
    guidance_scale: float = 1.0,
    sde_eta: float = 0.0,
    generators: list[torch.Generator] | None = None,
    times: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sampler ``method`` names (``sampler.method``): 'euler' (:func:`sample_flow`) or 'dpm2'
    (:func:`sample_dpm2`, deterministic: no SDE noise), over ``shifted_timesteps(steps, shift)`` or
    the given ``times`` (e.g. :func:`sampling_times` of a model starting below t = 1)."""
    if method == "euler":
        return sample_flow(
            velocity,
            noise,
            condition,
            steps,
            shift=shift,
            guidance_scale=guidance_scale,
            sde_eta=sde_eta,
            generators=generators,
            times=times,
        )
    if method == "dpm2":
        if sde_eta > 0:
            raise ValueError(f"sampler method dpm2 is deterministic; sde_eta must be 0, got {sde_eta}")
        return sample_dpm2(velocity, noise, condition, steps, shift=shift, guidance_scale=guidance_scale, times=times)
    raise ValueError(f"unknown sampler method {method!r}; choose 'euler' or 'dpm2'")
