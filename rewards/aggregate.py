"""From per-reward scores to the training signal: weighted total, Eq. 12 r, and reward metrics.

``R = sum_i w_i * s_i`` over the reward components with a non-zero weight (a weight of 0 only
reports the component), then ``rlrestore.nft.group_normalize`` (the reference form of Eq. 12:
group mean, step-wide std, clip constant c) gives r per sample. A NaN/inf score in a weighted
component makes that sample's total non-finite, so it never reaches training: it is masked out
(``valid`` False, r 0.5) and counted in the metrics; groups without reward spread are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rewards.base import reward_name
from rlrestore.config import RewardSpec, Stage2Config
from rlrestore.nft import group_normalize

__all__ = ["AggregateResult", "RewardAggregator"]

_RESERVED_NAMES = frozenset({"total", "nonfinite"})


@dataclass(frozen=True)
class AggregateResult:
    """One step's rewards, laid out ``[G, K]`` (G degraded inputs, K candidates each)."""

    total: Tensor  # [G, K] float64 weighted reward; non-finite where a weighted component was
    r: Tensor  # [G, K] float32 optimality probability in [0, 1] (Eq. 12); 0.5 where not valid
    valid: Tensor  # [G, K] bool: finite total in a group with reward spread; train on these only
    valid_group: Tensor  # [G] bool
    metrics: dict[str, float]  # flat, e.g. reward/psnr/mean, reward/r_mean, reward/dropped_groups


class RewardAggregator:
    """Combine named reward scores into the total reward and r (Eq. 12, reference form).

    ``specs`` are the configured components (their names resolve to reward classes, whose
    ``name`` keys the scores); ``clip`` is the clip constant c, ``eps`` is added to the
    step-wide reward std.
    """

    def __init__(self, specs: Sequence[RewardSpec], clip: float = 5.0, eps: float = 1e-4) -> None:
        if not specs:
            raise ValueError("RewardAggregator needs at least one reward spec")
        self.weights: dict[str, float] = {}
        for spec in specs:
            name = reward_name(spec)
            if name in self.weights:
                raise ValueError(f"reward {name!r} is configured twice; each reward may appear once")
            if name in _RESERVED_NAMES:
                raise ValueError(f"reward name {name!r} is reserved for aggregate metrics; rename the reward")
            self.weights[name] = float(spec.weight)
        if not any(self.weights.values()):
            raise ValueError(
                f"every reward weight is 0 ({self.weights}); give at least one a non-zero weight"
            )
        if clip <= 0 or eps <= 0:
            raise ValueError(f"clip and eps must be > 0, got {clip=}, {eps=}")
        self.clip = clip
        self.eps = eps

    @classmethod
    def from_config(cls, stage2: Stage2Config) -> RewardAggregator:
        """The aggregator of a Stage 2 config (``stage2.rewards``, ``nft.clip``, ``nft.reward_eps``)."""
        return cls(stage2.rewards, clip=stage2.nft.clip, eps=stage2.nft.reward_eps)

    def combine(self, scores: Mapping[str, Tensor], groups: int, candidates: int) -> AggregateResult:
        """Total, r and metrics from ``scores[name]``, each ``[groups * candidates]`` group-major."""
        if groups < 1 or candidates < 1:
            raise ValueError(f"groups and candidates must be >= 1, got {groups=}, {candidates=}")
        missing = sorted(set(self.weights) - set(scores))
        extra = sorted(set(scores) - set(self.weights))
        if missing or extra:
            raise ValueError(
                f"reward scores do not match the configured rewards {sorted(self.weights)}: "
                f"missing {missing}, unexpected {extra}"
            )
        count = groups * candidates
        grids: dict[str, Tensor] = {}
        for name in self.weights:
            values = torch.as_tensor(scores[name]).detach().cpu().to(torch.float64)
            if values.shape != (count,):
                raise ValueError(
                    f"scores of reward {name!r} must have shape ({count},) = groups {groups} x "
                    f"candidates {candidates}, got {tuple(values.shape)}"
                )
            grids[name] = values.reshape(groups, candidates)

        total = torch.zeros(groups, candidates, dtype=torch.float64)
        for name, weight in self.weights.items():
            if weight != 0:  # 0 * inf would turn a report-only component's failure into NaN
                total = total + weight * grids[name]
        norm = group_normalize(total, clip=self.clip, eps=self.eps)

        metrics: dict[str, float] = {}
        for name, values in [*grids.items(), ("total", total)]:
            finite = values[torch.isfinite(values)]
            summary = _summary(finite)
            metrics[f"reward/{name}/mean"] = summary["mean"]
            metrics[f"reward/{name}/std"] = summary["std"]
            metrics[f"reward/nonfinite/{name}"] = float(values.numel() - finite.numel())
        metrics.update({f"reward/r_{key}": value for key, value in _summary(norm.r[norm.valid]).items()})
        metrics.update(
            {
                "reward/std_all": norm.std_all,
                "reward/dropped_groups": norm.dropped / groups,
                "reward/valid_fraction": float(norm.valid.sum()) / count,
            }
        )
        return AggregateResult(
            total=total,
            r=norm.r.to(torch.float32),
            valid=norm.valid,
            valid_group=norm.valid_group,
            metrics=metrics,
        )


def _summary(values: Tensor) -> dict[str, float]:
    """Mean, population std, min and max of a 1-D tensor; NaN for each when it is empty."""
    if values.numel() == 0:
        return dict.fromkeys(("mean", "std", "min", "max"), math.nan)
    values = values.to(torch.float64)
    return {
        "mean": float(values.mean()),
        "std": float(values.std(correction=0)),
        "min": float(values.min()),
        "max": float(values.max()),
    }
