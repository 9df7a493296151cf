"""Flow matching (rectified flow) conventions and the sampler.

x_t = (1 - t) x0 + t eps, t in [0, 1] with t = 1 pure noise; the network predicts v = eps - x0,
so x0_pred = x_t - t v. Sampling integrates dx/dt = v from t = 1 to t = 0.
"""

from __future__ import annotations

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


def sample_flow(
    velocity: VelocityFn,
    noise: torch.Tensor,
    condition: torch.Tensor,
    steps: int,
    shift: float = 3.0,
    guidance_scale: float = 1.0,
    sde_eta: float = 0.0,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Integrate from noise (t=1) to a clean latent (t=0).

    Euler steps on the ODE; with ``guidance_scale != 1`` classifier-free guidance against an
    all-zero condition (one batched call for both branches); with ``sde_eta > 0`` the Euler-Maruyama
    step of the equivalent SDE (Flow-GRPO form) with per-sample noise drawn from ``generators``.
    """
    if sde_eta > 0 and (generators is None or len(generators) != noise.shape[0]):
        raise ValueError("the SDE sampler needs one generator per sample")
    times = shifted_timesteps(steps, shift).to(noise.device)
    x = noise
    use_cfg = guidance_scale != 1.0
    for i in range(steps):
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
