"""Stage 1 objectives (Pref-Restore section IV-C.1).

Stage 1.1, Semantic-to-Diffusion Alignment (Eq. 10):  L = L_CE + alpha * L_diff
    CE: next-token prediction of the clean face's codes; L_diff: flow matching through the frozen
    DiT, whose gradient reaches the connectors and the AR integrator.
Stage 1.2, Texture-to-Diffusion Alignment:            L = L_diff + beta * ||E_theta(y) - E_frozen(x)||^2 (Eq. 11)
    The DiT is conditioned on the clean face's codes (teacher forcing, the released recipe), on
    codes the frozen integrator generates from the LQ prompt (what inference sees), or on a
    per-sample mix of both (``stage1_2.semantic_codes``).

Under mixed precision the networks run inside ``torch.autocast``; x0, the noise, t and every loss
stay float32 (only the network inputs are cast, by autocast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlrestore.config import AutoencoderConfig, SamplerConfig, SemanticAlignmentConfig, TextureAlignmentConfig
from rlrestore.flow import interpolate, target_velocity
from rlrestore.models.policy import PrefRestorePolicy


def flow_matching_loss(
    policy: PrefRestorePolicy,
    x0: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """|| v_theta(x_t, c, t) - (eps - x0) ||^2 with t ~ U(0, 1) and fresh noise (all float32)."""
    x0 = x0.float()
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    t = torch.rand(x0.shape[0], generator=generator).to(x0.device)
    v = policy.velocity(interpolate(x0, eps, t), t, encoder_hidden_states)
    return F.mse_loss(v.float(), target_velocity(x0, eps))


def drop_conditions(states: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Zero the whole condition of a sample with the given probability (CFG training)."""
    keep = (torch.rand(states.shape[0], generator=generator) >= probability).to(states.device, states.dtype)
    return states * keep.view(-1, 1, 1)


def autoencoder_losses(policy: PrefRestorePolicy, hq: torch.Tensor) -> dict[str, torch.Tensor]:
    """L1 + MSE reconstruction of clean faces through the DC-AE (the optional autoencoder stage)."""
    latents = policy.vae.encode(hq).latent
    recon = policy.vae.decode(latents).sample.float()
    l1, mse = F.l1_loss(recon, hq), F.mse_loss(recon, hq)
    return {"loss": l1 + mse, "l1": l1, "mse": mse}


def generated_rows(stage: TextureAlignmentConfig, batch_size: int, generator: torch.Generator) -> torch.Tensor:
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
    policy: PrefRestorePolicy,
    lq: torch.Tensor,
    captions: list[str],
    target: torch.Tensor,
    rows: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """``target`` codes with the ``rows`` replaced by the integrator's greedy codes of their LQ prompts.

    The AR pass runs only over the selected rows.
    """
    if not bool(rows.any()):
        return target
    index = rows.nonzero().flatten().tolist()
    with torch.no_grad():
        lq_codes = policy.visual_tokenizer(policy.to_tokenizer_size(lq[index]))
    prompt_ids, prompt_mask = policy.prompt_batch(lq_codes, [captions[i] for i in index])
    codes = target.clone()
    codes[index] = policy.generate_codes(prompt_ids, prompt_mask, SamplerConfig(), generator)
    return codes


def stage1_losses(
    policy: PrefRestorePolicy,
    batch: dict,
    stage: AutoencoderConfig | SemanticAlignmentConfig | TextureAlignmentConfig,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The losses of one supervised step; ``loss`` is the weighted total to back-propagate."""
    if isinstance(stage, AutoencoderConfig):
        return autoencoder_losses(policy, batch["hq"])
    hq, lq = batch["hq"], batch["lq"]
    x0 = policy.encode_clean(hq).float()
    codes = policy.target_codes(hq)
    semantic_alignment = isinstance(stage, SemanticAlignmentConfig)
    condition_codes = codes
    if isinstance(stage, TextureAlignmentConfig):
        rows = generated_rows(stage, hq.shape[0], generator)
        condition_codes = conditioning_codes(policy, lq, batch["caption"], codes, rows, generator)
    cond = policy.condition(lq, batch["caption"], target_codes=condition_codes)
    states = drop_conditions(cond.encoder_hidden_states, stage.condition_dropout, generator)
    losses = {"diff_loss": flow_matching_loss(policy, x0, states, generator)}
    if semantic_alignment:
        logits = cond.logits.float()
        target = codes + policy.vocabulary.first_image_id
        losses["ce_loss"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        losses["code_accuracy"] = (logits.argmax(-1) == target).float().mean().detach()
        losses["loss"] = stage.ce_weight * losses["ce_loss"] + stage.diff_weight * losses["diff_loss"]
    else:
        losses["latent_loss"] = F.mse_loss(policy.encode_lq(lq).float(), x0.float())
        losses["loss"] = stage.diff_weight * losses["diff_loss"] + stage.latent_weight * losses["latent_loss"]
    return losses
