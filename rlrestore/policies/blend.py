"""The fidelity-quality dial: a policy whose Stage 2 tensors are ``F + s (Q - F)``.

F is the Stage 1 policy a Stage 2 run started from, Q a Stage 2 policy of that run. Stage 2 trains
only the velocity model's ``stage2_modules()`` (the DiT), so every other tensor of F and Q is
identical; ``s`` = 0 gives F, 1 gives Q, and values in between move along the straight line from
one to the other. For a LoRA run, Q holds the merged weights F + delta (delta = the adapters'
scaled product), so the dial is the LoRA scale. Nothing is written: the blend lives in memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from rlrestore.policies.base import RestorationPolicy
from rlrestore.policies.registry import load_policy


def check_quality(value: float | str) -> float:
    """``value`` as a dial setting s in [0, 1]; anything else raises ``ValueError`` naming it."""
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--quality {value!r} is not a number: give s in [0, 1] (0 = F, 1 = Q)") from None
    if not (math.isfinite(s) and 0.0 <= s <= 1.0):
        raise ValueError(f"--quality {value!r} is outside [0, 1]: give s in [0, 1] (0 = F, 1 = Q)")
    return s


def parse_qualities(text: str) -> list[float]:
    """A comma-separated list of dial settings (``0,0.25,0.5``), each checked; repeats are refused."""
    values = [check_quality(item.strip()) for item in text.split(",") if item.strip()]
    if not values:
        raise ValueError(f"--quality {text!r} names no value: give e.g. 0,0.5,1")
    if len(set(values)) != len(values):
        raise ValueError(f"--quality {text!r} repeats a value")
    return values


def stage2_tensor_names(policy: RestorationPolicy) -> set[str]:
    """Names in ``policy.state_dict()`` of the tensors Stage 2 trains (its velocity model's
    ``stage2_modules()``)."""
    prefixes = {id(module): name for name, module in policy.named_modules()}
    names: set[str] = set()
    for module in policy.velocity_model.stage2_modules():
        prefix = prefixes[id(module)]
        names.update(f"{prefix}.{key}" for key in module.state_dict())
    return names


def blend_velocity(policy_f: RestorationPolicy, policy_q: RestorationPolicy, s: float) -> RestorationPolicy:
    """``policy_q`` with its Stage 2 tensors set to ``F + s (Q - F)`` (``torch.lerp``: exactly F at
    s = 0, exactly Q at s = 1), in place; returned.

    Every other tensor must be identical in F and Q (Stage 2 changes nothing else); a differing one,
    or a different set of tensors, raises ``ValueError`` naming it (F is not Q's starting point).
    """
    s = check_quality(s)
    state_f, state_q = policy_f.state_dict(), policy_q.state_dict()
    if state_f.keys() != state_q.keys():
        extra = sorted(state_f.keys() ^ state_q.keys())
        raise ValueError(
            f"F and Q are different models: {len(extra)} tensor(s) exist in only one, e.g. {extra[0]!r}"
        )
    trained = stage2_tensor_names(policy_q)
    blended: dict[str, Tensor] = {}
    for name, q in state_q.items():
        f = state_f[name]
        if f.shape != q.shape:
            raise ValueError(f"F and Q are different models: {name!r} has shape {tuple(f.shape)} in F, {tuple(q.shape)} in Q")
        if name not in trained or not q.is_floating_point():
            if not torch.equal(f.to(q.device), q):
                raise ValueError(
                    f"F and Q differ in {name!r}, a tensor Stage 2 does not train: F is not the policy this "
                    "Stage 2 run started from (pass its Stage 1.2 policy with --base)"
                )
            continue
        blended[name] = torch.lerp(f.to(device=q.device, dtype=q.dtype), q, s)
    policy_q.load_state_dict(blended, strict=False)
    return policy_q


def load_dialled_policy(policy_dir: str | Path, base_dir: str | Path | None, s: float) -> RestorationPolicy:
    """The policy of ``policy_dir`` (Q) dialled to ``s`` towards ``base_dir`` (F), in float32.

    ``s`` = 1 is Q as saved (no F needed); otherwise ``base_dir`` is required.
    """
    s = check_quality(s)
    policy_q = load_policy(policy_dir)
    if s == 1.0:
        return policy_q
    if base_dir is None:
        raise ValueError(f"--quality {s:g} blends Q ({policy_dir}) with its Stage 1 policy F, but no F was given")
    return blend_velocity(load_policy(base_dir), policy_q, s)


def quality_names(name: str, qualities: Sequence[float]) -> list[str]:
    """Model names of a sweep: ``Q@s=0``, ``Q@s=0.5``, ..."""
    return [f"{name}@s={s:g}" for s in qualities]
