"""The restoration pipeline: condition -> start -> sampler -> decode, for any policy.

Only composes the policy interface (``rlrestore.policies.base``) and a sampler
(``rlrestore.flow``); rollouts, ``restore`` and ``eval`` all restore through it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlrestore.config import SamplerConfig
from rlrestore.flow import sample_latents, sampling_times
from rlrestore.policies.base import Condition, RestorationPolicy, RestoreOutput


@torch.no_grad()
def restore_candidates(
    policy: RestorationPolicy,
    lq: Tensor,
    captions: list[str],
    seeds: Tensor,
    sampler: SamplerConfig,
    condition: Condition | None = None,
) -> RestoreOutput:
    """K candidate restorations per degraded image in one batched sampler call.

    ``seeds`` is [B, K]: candidate (b, k) starts from noise seeded with seeds[b, k] (and its SDE
    noise, if any, too), so any candidate can be reproduced alone. Stochastic conditioning (AR
    sampling) draws the batch's condition with seed seeds[0, 0]; the condition is computed once per
    input, never per candidate; ``condition`` passes one computed earlier (a rollout actor's cache).
    The sampler state and t stay float32 whatever the weights' dtype.
    """
    batch, k = seeds.shape
    if condition is None:
        generator = torch.Generator(device="cpu").manual_seed(int(seeds[0, 0]))
        condition = policy.condition(lq, captions, sampler=sampler, generator=generator)
    per_candidate = condition.select(torch.arange(batch, device=lq.device).repeat_interleave(k))
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds.flatten().tolist()]
    shape = policy.latent_shape()
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(policy.device, torch.float32)
    model = policy.velocity_model
    latents = sample_latents(
        sampler.method,
        lambda x, t, prepared: model.velocity(x, t, prepared).float(),
        model.start(per_candidate, noise).float(),
        model.prepare(per_candidate),
        times=sampling_times(sampler.steps, model.flow_shift, model.t_max).to(policy.device),
        guidance_scale=sampler.guidance_scale,
        sde_eta=sampler.sde_eta,
        generators=generators,
    )
    images = policy.decode(latents)
    return RestoreOutput(
        latents=latents.view(batch, k, *shape),
        images=images.view(batch, k, *images.shape[1:]),
        seeds=seeds,
        condition=condition,
    )
