"""Stage 1 objectives (Pref-Restore section IV-C.1).

Stage 1.1, Semantic-to-Diffusion Alignment (Eq. 10):  L = L_CE + alpha * L_diff
    CE: next-token prediction of the clean face's codes; L_diff: flow matching through the frozen
    DiT, whose gradient reaches the connectors and the AR integrator.
Stage 1.2, Texture-to-Diffusion Alignment:            L = L_diff + beta * ||E_theta(y) - E_frozen(x)||^2 (Eq. 11)

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
    generated = isinstance(stage, TextureAlignmentConfig) and stage.semantic_codes == "generated"
    cond = policy.condition(
        lq, batch["caption"], target_codes=None if generated else codes, sampler=SamplerConfig(), generator=generator
    )
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
