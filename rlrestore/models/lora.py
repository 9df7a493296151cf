"""LoRA adapters on the DiT (``stage2.learner.finetune=lora``) and the merged weights rollouts sample with.

The adapters are peft's ``LoraLayer`` wrappers injected into the named ``nn.Linear`` layers of the
module (``peft.inject_adapter_in_model``): the base weights stay frozen and only the low-rank
factors A (rank x in) and B (out x rank) train, B starting at zero so the adapted DiT starts equal
to the base one; A starts Kaiming-uniform (peft's default) or normal with std 1 / rank ('gaussian', the
released Pref-Restore recipe). Rollout workers and policy checkpoints never see adapters: they get
:func:`merged_state_dict`, the plain DiT state dict with ``W + (alpha / rank) * B @ A`` folded
into each adapted weight, so the rest of the system treats LoRA and full fine-tuning alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["add_lora", "has_lora", "merged_state_dict"]

_ADAPTER = "default"


def add_lora(
    module: nn.Module, rank: int, alpha: float, targets: Sequence[str], init: str = "default"
) -> nn.Module:
    """Freeze ``module`` and give the Linear layers whose names end with one of ``targets`` a
    trainable LoRA adapter of ``rank`` (scale ``alpha / rank``, A initialised per ``init``: 'default'
    or 'gaussian'); returns ``module`` (changed in place).

    Raises ValueError naming the targets that match no Linear layer, with the names available.
    """
    from peft import LoraConfig, inject_adapter_in_model

    linear_names = [name for name, child in module.named_modules() if isinstance(child, nn.Linear)]
    unmatched = [
        target
        for target in targets
        if not any(name == target or name.endswith("." + target) for name in linear_names)
    ]
    if unmatched:
        layers = sorted({re.sub(r"^.*blocks\.\d+\.", "", name) for name in linear_names})
        raise ValueError(
            f"stage2.learner.lora_targets {unmatched} match no Linear layer of the DiT; "
            f"its Linear layers (per block) are: {', '.join(layers)}"
        )
    if init not in ("default", "gaussian"):
        raise ValueError(f"stage2.learner.lora_init must be 'default' or 'gaussian', got {init!r}")
    module.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=0.0,
        init_lora_weights=True if init == "default" else "gaussian",
    )
    return inject_adapter_in_model(config, module, adapter_name=_ADAPTER)


def has_lora(module: nn.Module) -> bool:
    """Whether ``module`` carries LoRA adapters added by :func:`add_lora`."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(child, LoraLayer) for child in module.modules())


def merged_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The state dict of ``module`` without adapters: each adapted layer's ``base_layer`` weight
    plus its LoRA delta, under the key the un-adapted module uses. Detached CPU copies.

    A module without adapters gives its plain state dict, so callers need not care which it is.
    """
    from peft.tuners.lora import LoraLayer

    deltas: dict[str, Tensor] = {}
    for name, child in module.named_modules():
        if isinstance(child, LoraLayer):
            deltas[f"{name}.base_layer.weight"] = child.get_delta_weight(_ADAPTER)
    merged: dict[str, Tensor] = {}
    for key, value in module.state_dict().items():
        if ".lora_" in key:
            continue
        if key in deltas:
            value = value + deltas[key].to(value.dtype)
        merged[key.replace(".base_layer.", ".")] = value.detach().cpu().clone().contiguous()
    return merged
