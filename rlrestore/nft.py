"""DiffusionNFT math for Stage 2: flow interpolation, NFT loss, reward normalisation, EMA of v_old.

Pure torch, no Ray: the learner and the rollout workers call these functions; tests check them
against float64 golden vectors (``tests/data/nft_golden.json``). Equation numbers refer to the
Pref-Restore paper; the paper's gamma is our ``beta``.

Flow convention (``rlrestore.flow``, whose ``interpolate`` and
``target_velocity`` are re-exported here): ``x_t = (1 - t) x0 + t eps``, t = 1 is pure noise,
the network predicts the velocity ``u = eps - x0`` and ``x0_pred = x_t - t v``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rlrestore.flow import interpolate, target_velocity

__all__ = [
    "EMA_SCHEDULES",
    "EmaSchedule",
    "GroupNormResult",
    "ema_decay",
    "ema_update",
    "eq12_normalize",
    "group_normalize",
    "interpolate",
    "nft_loss",
    "target_velocity",
]

LossForm = Literal["velocity", "adaptive_x0"]
EmaScheduleName = Literal["linear", "delayed"]

_ADAPTIVE_WEIGHT_MIN = 1e-5


def _batch_values(values: Tensor, like: Tensor, name: str) -> Tensor:
    """Check that ``values`` holds one number per sample of ``like`` and cast it to its dtype."""
    if values.shape != like.shape[:1]:
        raise ValueError(
            f"{name} must have shape ({like.shape[0]},), one value per sample; got {tuple(values.shape)}"
        )
    return values.to(like.dtype)


def _per_sample(values: Tensor, like: Tensor, name: str) -> Tensor:
    """Reshape a [B] tensor so it broadcasts over the trailing dims of ``like`` ([B, C, H, W])."""
    return _batch_values(values, like, name).reshape(-1, *([1] * (like.ndim - 1)))


def _sample_mean(x: Tensor) -> Tensor:
    """Mean over every dim but the batch dim: [B, C, H, W] -> [B]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def nft_loss(
    v_theta: Tensor,
    v_old: Tensor,
    x0: Tensor,
    eps: Tensor,
    t: Tensor,
    r: Tensor,
    beta: float,
    form: LossForm = "velocity",
    adaptive_scale: float = 5.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT loss (Eq. 13-15) for one batch; returns the scalar loss and detached stats.

    ``v_theta`` is the trained prediction (with gradient), ``v_old`` the rollout (EMA) policy's
    prediction at the same (x_t, c, t) and is detached here, ``r`` the optimality probability of
    each sample in [0, 1] (see :func:`group_normalize`), ``t`` its timestep; all per-sample
    tensors are [B], the rest [B, ...].

    ``form="velocity"`` is the paper's Eq. 15. ``form="adaptive_x0"`` is the reference
    implementation's variant: both proxies are mapped to x0 predictions, each squared error is
    divided by its own detached per-sample mean absolute error (clamped at 1e-5), and the result
    is scaled by ``adaptive_scale / beta`` (the reference uses its advantage clip, 5).

    Stats: ``old_deviation`` = mean |v_theta - v_old| (0 means the loss has collapsed to a
    (2r - 1)-weighted flow-matching loss: v_old equals v_theta), ``loss_positive`` and ``loss_negative``
    (the r and 1 - r parts; they sum to the loss).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    shapes = {
        name: tuple(x.shape) for name, x in (("v_theta", v_theta), ("v_old", v_old), ("x0", x0), ("eps", eps))
    }
    if len(set(shapes.values())) != 1:
        raise ValueError(f"v_theta, v_old, x0 and eps must have one shape, got {shapes}")
    v_old = v_old.detach()
    r = _batch_values(r, x0, "r")
    u = target_velocity(x0, eps)

    v_plus = (1 - beta) * v_old + beta * v_theta  # Eq. 13
    v_minus = (1 + beta) * v_old - beta * v_theta  # Eq. 14

    if form == "velocity":
        positive = _sample_mean((v_plus - u) ** 2)
        negative = _sample_mean((v_minus - u) ** 2)
        scale = 1.0
    elif form == "adaptive_x0":
        t = _batch_values(t, x0, "t")
        x_t = interpolate(x0, eps, t)
        t_b = _per_sample(t, x0, "t")
        positive = _adaptive_x0_error(x_t - t_b * v_plus, x0)
        negative = _adaptive_x0_error(x_t - t_b * v_minus, x0)
        scale = adaptive_scale / beta
    else:
        raise ValueError(f"unknown NFT loss form {form!r}; expected 'velocity' or 'adaptive_x0'")

    positive_part = (scale * r * positive).mean()  # Eq. 15, r-weighted term
    negative_part = (scale * (1 - r) * negative).mean()  # Eq. 15, (1 - r)-weighted term
    stats = {
        "old_deviation": (v_theta.detach() - v_old).abs().mean(),
        "loss_positive": positive_part.detach(),
        "loss_negative": negative_part.detach(),
    }
    return positive_part + negative_part, stats


def _adaptive_x0_error(x0_pred: Tensor, x0: Tensor) -> Tensor:
    """Per-sample squared x0 error divided by its own detached mean absolute error."""
    error = x0_pred - x0
    with torch.no_grad():
        weight = _sample_mean(error.abs()).clamp(min=_ADAPTIVE_WEIGHT_MIN)
    return _sample_mean(error**2) / weight


@dataclass(frozen=True)
class GroupNormResult:
    """Per-sample training signal of one step's rewards, grouped [G, K] by degraded input.

    ``valid`` marks samples that carry signal: a finite reward in a kept group. Elsewhere
    ``advantages`` is 0 and ``r`` is 0.5; the learner should leave those samples out.
    """

    r: Tensor  # [G, K] optimality probability in [0, 1] (Eq. 12)
    advantages: Tensor  # [G, K] (R - group mean) / (std_all + eps), or / Z for Eq. 12; unclipped
    valid: Tensor  # [G, K] bool
    valid_group: Tensor  # [G] bool: >= 2 finite rewards that are not all equal
    std_all: float  # population std of every finite reward of the step
    dropped: int  # groups without signal
    nonfinite: int  # NaN / inf rewards


def group_normalize(rewards: Tensor, clip: float = 5.0, eps: float = 1e-4) -> GroupNormResult:
    """Reference DiffusionNFT normalisation: A = (R - mean_group) / (std_all + eps) and
    r = clamp(0.5 + 0.5 * clip(A, -c, c) / c, 0, 1), i.e. Eq. 12 with Z = c * (std_all + eps).

    ``std_all`` is the population std (ddof 0) over every finite reward of the step, so groups
    keep their relative scale. Non-finite rewards (a failed scorer) never propagate: such a
    sample is invalid, its group's mean uses only the finite members, ``std_all`` ignores it,
    and a group with fewer than two finite rewards, or whose finite rewards are all equal
    (including K = 1), is dropped.
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    rewards, finite, std_all = _finite_groups(rewards)
    return _normalize(rewards, finite, std_all, denominator=std_all + eps, clip=clip)


def eq12_normalize(rewards: Tensor, z: float) -> GroupNormResult:
    """The paper's plain Eq. 12 with a fixed scale: r = 0.5 + 0.5 * clip((R - mean_group) / Z, -1, 1).

    Non-finite rewards and flat groups are handled as in :func:`group_normalize`.
    """
    if z <= 0:
        raise ValueError(f"Z must be > 0, got {z}")
    rewards, finite, std_all = _finite_groups(rewards)
    return _normalize(rewards, finite, std_all, denominator=rewards.new_tensor(z), clip=1.0)


def _finite_groups(rewards: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Check the [G, K] layout; return float rewards, the finite mask and std over finite rewards."""
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [groups, candidates], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    finite = torch.isfinite(rewards)
    values = rewards[finite]
    std_all = values.std(correction=0) if values.numel() else rewards.new_zeros(())
    return rewards, finite, std_all


def _normalize(
    rewards: Tensor, finite: Tensor, std_all: Tensor, denominator: Tensor, clip: float
) -> GroupNormResult:
    """Centre finite rewards on their group mean, scale, clip and map to r (Eq. 12); mask the rest."""
    filled = torch.where(finite, rewards, torch.zeros_like(rewards))
    count = finite.sum(dim=1)
    mean = filled.sum(dim=1) / count.clamp(min=1)
    high = torch.where(finite, rewards, -torch.inf).amax(dim=1)
    low = torch.where(finite, rewards, torch.inf).amin(dim=1)
    valid_group = (count >= 2) & (high > low)
    valid = finite & valid_group[:, None]

    advantages = torch.where(valid, (filled - mean[:, None]) / denominator, 0.0)
    r = (0.5 + 0.5 * advantages.clamp(-clip, clip) / clip).clamp(0, 1)  # Eq. 12
    return GroupNormResult(
        r=r,
        advantages=advantages,
        valid=valid,
        valid_group=valid_group,
        std_all=float(std_all),
        dropped=int((~valid_group).sum()),
        nonfinite=int((~finite).sum()),
    )


@dataclass(frozen=True)
class EmaSchedule:
    """Decay of the EMA that defines v_old: 0 for ``delay`` steps, then ``rate`` per step up to ``cap``."""

    delay: int
    rate: float
    cap: float


EMA_SCHEDULES: dict[str, EmaSchedule] = {
    # reference default: d = min(0.001 * step, 0.5); v_old follows v_theta closely early on
    "linear": EmaSchedule(delay=0, rate=0.001, cap=0.5),
    # reference alternative: v_old = v_theta for 75 steps, then a faster ramp to a slow EMA
    "delayed": EmaSchedule(delay=75, rate=0.0075, cap=0.999),
}


def ema_decay(
    step: int,
    schedule: EmaScheduleName = "linear",
    *,
    rate: float | None = None,
    cap: float | None = None,
    delay: int | None = None,
) -> float:
    """EMA decay d at ``step``: 0 before ``delay``, then min(rate * (step - delay), cap).

    ``schedule`` picks the reference presets in :data:`EMA_SCHEDULES`; ``rate``, ``cap`` and
    ``delay`` override single values of it.
    """
    if schedule not in EMA_SCHEDULES:
        raise ValueError(f"unknown EMA schedule {schedule!r}; expected one of {sorted(EMA_SCHEDULES)}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    preset = EMA_SCHEDULES[schedule]
    rate = preset.rate if rate is None else rate
    cap = preset.cap if cap is None else cap
    delay = preset.delay if delay is None else delay
    if not 0 <= cap < 1 or rate < 0 or delay < 0:
        raise ValueError(
            f"EMA schedule needs 0 <= cap < 1, rate >= 0, delay >= 0; got {cap=}, {rate=}, {delay=}"
        )
    if step < delay:
        return 0.0
    return min(rate * (step - delay), cap)


@torch.no_grad()
def ema_update(old_params: Iterable[Tensor], new_params: Iterable[Tensor], decay: float) -> None:
    """Refresh the rollout policy in place: old = d * old + (1 - d) * new, tensor by tensor."""
    if not 0 <= decay <= 1:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    old_list, new_list = list(old_params), list(new_params)
    if len(old_list) != len(new_list):
        raise ValueError(
            f"EMA needs matching parameter lists, got {len(old_list)} old and {len(new_list)} new"
        )
    for index, (old, new) in enumerate(zip(old_list, new_list, strict=True)):
        if old.shape != new.shape:
            raise ValueError(
                f"EMA parameter {index}: old shape {tuple(old.shape)} != new shape {tuple(new.shape)}"
            )
        old.mul_(decay).add_(new.to(device=old.device, dtype=old.dtype), alpha=1 - decay)
