"""Pref-Restore's Stage 1 steps: which networks produce the tensors of each Stage 1 loss.

The losses themselves are the named functions of ``rlrestore.losses``. Stage 1.2 conditions the
DiT on the clean face's codes (teacher forcing, the released recipe), on codes the frozen
integrator generates from the LQ prompt (what inference sees), or on a per-sample mix of both
(``stage1_2.semantic_codes``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rlrestore.config import SamplerConfig, TextureAlignmentConfig
from rlrestore.losses import (
    code_prediction_loss,
    drop_conditions,
    flow_matching_loss,
    flow_noise,
    latent_consistency_loss,
    reconstruction_losses,
)

if TYPE_CHECKING:
    from rlrestore.policies.prefrestore.policy import PrefRestorePolicy


def generated_rows(stage: TextureAlignmentConfig, batch_size: int, generator: torch.Generator) -> Tensor:
    """Boolean mask [B] of the samples whose Stage 1.2 codes are generated rather than the target's.

    ``mix`` draws one uniform per sample from ``generator`` only for a fraction strictly between 0
    and 1, so a fraction of 0 (1) reproduces ``target`` (``generated``) exactly.
    """
    if stage.semantic_codes == "target":
        return torch.zeros(batch_size, dtype=torch.bool)
    if stage.semantic_codes == "generated" or stage.generated_fraction >= 1.0:
        return torch.ones(batch_size, dtype=torch.bool)
    if stage.generated_fraction <= 0.0:
        return torch.zeros(batch_size, dtype=torch.bool)
    return torch.rand(batch_size, generator=generator) < stage.generated_fraction


def conditioning_codes(
    policy: PrefRestorePolicy, lq: Tensor, captions: list[str], target: Tensor, rows: Tensor, generator: torch.Generator
) -> Tensor:
    """``target`` codes with the ``rows`` replaced by the integrator's greedy codes of their LQ
    prompts; the AR pass runs only over the selected rows."""
    if not bool(rows.any()):
        return target
    index = rows.nonzero().flatten().tolist()
    with torch.no_grad():
        lq_codes = policy.visual_tokenizer(policy.to_tokenizer_size(lq[index]))
    prompt_ids, prompt_mask = policy.semantic.prompt_batch(lq_codes, [captions[i] for i in index])
    codes = target.clone()
    codes[index] = policy.semantic.generate_codes(prompt_ids, prompt_mask, SamplerConfig(), generator)
    return codes


def stage1_losses(
    policy: PrefRestorePolicy, stage: str, batch: dict, config: Any, generator: torch.Generator
) -> dict[str, Tensor]:
    """The losses of one supervised step of ``stage``; ``loss`` is the weighted total."""
    if stage == "autoencoder":
        hq = batch["hq"]
        return reconstruction_losses(policy.vae.decode(policy.vae.encode(hq).latent).sample, hq)
    hq, lq = batch["hq"], batch["lq"]
    x0 = policy.encode(hq)
    codes = policy.target_codes(hq)
    condition_codes = codes
    if stage == "stage1.2":
        rows = generated_rows(config, hq.shape[0], generator)
        condition_codes = conditioning_codes(policy, lq, batch["caption"], codes, rows, generator)
    cond = policy.conditioning(lq, batch["caption"], target_codes=condition_codes)
    states = drop_conditions(cond.encoder_hidden_states, config.condition_dropout, generator)
    eps, t = flow_noise(x0, generator)
    endpoint = policy.velocity_model.endpoint(cond.condition, eps)
    losses = {"diff_loss": flow_matching_loss(lambda x_t, t_: policy.velocity(x_t, t_, states), x0, endpoint, t)}
    if stage == "stage1.1":
        ce, accuracy = code_prediction_loss(cond.logits, codes + policy.vocabulary.first_image_id)
        losses.update(ce_loss=ce, code_accuracy=accuracy)
        losses["loss"] = config.ce_weight * ce + config.diff_weight * losses["diff_loss"]
    else:
        losses["latent_loss"] = latent_consistency_loss(cond.condition.z_low, x0)
        losses["loss"] = config.diff_weight * losses["diff_loss"] + config.latent_weight * losses["latent_loss"]
    return losses
