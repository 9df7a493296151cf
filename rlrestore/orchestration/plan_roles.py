"""What each role of a run computes and holds, measured on the ``meta`` device for ``rlrestore plan``.

The policy is built from the config through the registry (``rlrestore.policies.build_policy``) with
every ``pretrained`` / ``checkpoint`` source dropped, so the networks come from their ``arch`` with
no file and no memory. Each role's passes run on that policy in the run's compute dtype
(``precision``) with the role's micro-batch: FLOPs and activation bytes come from
``plan_measure``; the bytes of weights, gradients and optimizer state from ``plan_costs``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from rlrestore.config import PolicyConfig, RewardSpec, RunConfig
from rlrestore.models.loading import CheckpointError, count_parameters
from rlrestore.models.lora import add_lora
from rlrestore.models.text_tokenizer import load_text_tokenizer
from rlrestore.orchestration.plan_costs import COMPUTE_BYTES, StateBytes, ddp_state, deepspeed_state
from rlrestore.orchestration.plan_measure import PassCost, measure_inference, measure_training
from rlrestore.policies import Condition, build_policy
from rlrestore.runtime.precision import Precision

if TYPE_CHECKING:
    from rlrestore.policies.prefrestore import PrefRestorePolicy

META = torch.device("meta")
# Rewards that score pixels with no network (nothing to hold on a GPU).
PIXEL_REWARDS = {"sharpness", "psnr", "psnry", "ssim", "ssimc", "ms_ssim", "piqe", "niqe", "brisque"}


@dataclass
class MetaPolicy:
    """The config's policy on the meta device, in the compute dtype, and how it was built."""

    policy: PrefRestorePolicy
    dtype: torch.dtype
    prompt_tokens: int  # integrator tokens of one input's prompt (before the N codes)
    notes: list[str] = field(default_factory=list)


def _meta_policy_config(config: RunConfig) -> tuple[PolicyConfig, list[str]]:
    """The policy section with every file source dropped; the text tokenizer kept if it is local."""
    policy = config.policy
    if policy.type != "prefrestore":
        raise ValueError(
            f"rlrestore plan models the prefrestore policy (its condition, AR integrator and DiT); "
            f"policy.type={policy.type!r} is not modelled"
        )
    notes = []
    if policy.checkpoint:
        notes.append(f"networks built from policy.*.arch; policy.checkpoint {policy.checkpoint} is not read")
    parts = {n: getattr(policy, n).model_copy(update={"pretrained": None}) for n in ("vision", "integrator", "transformer", "vae")}
    tokenizer = policy.text_tokenizer
    if tokenizer is not None:
        try:
            load_text_tokenizer(tokenizer, policy.vocabulary, policy.prompt_format)
        except CheckpointError:
            notes.append(
                f"integrator embedding: policy.integrator.arch.vocab_size rows; policy.text_tokenizer {tokenizer} "
                "is not in the local cache (a run sizes the embedding to its tokens + the codebook)"
            )
            tokenizer = None
    return policy.model_copy(update={**parts, "text_tokenizer": tokenizer, "checkpoint": None}), notes


def build_meta_policy(config: RunConfig) -> MetaPolicy:
    """The run's policy on the meta device (registry build, arch only), cast to the compute dtype."""
    section, notes = _meta_policy_config(config)
    with META:
        policy = build_policy(section)
        if section.text_tokenizer is None:  # keep the arch's rows, not the byte-level stand-in's
            rows = config.policy.integrator.arch.get("vocab_size")
            if rows and policy.integrator.get_input_embeddings().num_embeddings != rows:
                policy.integrator.resize_token_embeddings(rows, mean_resizing=False)
    dtype = Precision(config.precision).compute_dtype
    policy = policy.to(dtype)
    n = policy.num_semantic_tokens
    prompt, _ = policy.semantic.prompt_batch(torch.zeros(1, n, dtype=torch.long), [""])
    return MetaPolicy(policy, dtype, prompt.shape[1], notes)


def _empty(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.empty(*shape, device=META, dtype=dtype)


def _condition(meta: MetaPolicy, batch: int, lq: Tensor) -> tuple[Condition, Tensor]:
    """(condition, integrator logits) of ``batch`` inputs: tokenizer, teacher-forced AR pass,
    connector, LQ encoder, each as the policy runs them."""
    from rlrestore.policies.prefrestore.velocity import PrefRestoreCondition

    policy, n = meta.policy, meta.policy.num_semantic_tokens
    with torch.no_grad():
        codes = policy.visual_tokenizer(policy.to_tokenizer_size(lq))
    ids = _empty(batch, meta.prompt_tokens + n, dtype=torch.long)
    out = policy.integrator(input_ids=ids, output_hidden_states=True, logits_to_keep=n + 1)
    semantic = policy.diffusion_connector(out.hidden_states[-1][:, -(n + 1):])
    return PrefRestoreCondition(semantic=semantic, z_low=policy.encode_lq(lq), codes=codes), out.logits


@dataclass(frozen=True)
class RolloutCost:
    """One rollout call of ``inputs`` inputs x K candidates."""

    inputs: int
    flops: int
    activation_bytes: int
    condition_bytes: int  # one input's condition
    latent_bytes: int  # one candidate's x0, float32


def rollout_cost(meta: MetaPolicy, config: RunConfig) -> RolloutCost:
    """One rollout call (``stage2.rollout.batch_size`` inputs): the condition once per input (the AR
    decode counted as one more integrator pass over the sequence), ``sampler_steps`` velocity
    evaluations of the K candidates, the decode of every candidate."""
    policy, stage2 = meta.policy, config.stage2
    b, k = stage2.rollout.batch_size, stage2.candidates
    lq = _empty(b, 3, policy.resolution, policy.resolution, dtype=meta.dtype)
    modules = [policy]
    held: dict[str, Any] = {}

    def condition() -> None:  # once per input, then composed for the K candidates once per sampling
        held["condition"], _ = _condition(meta, b, lq)
        per_candidate = held["condition"].select(torch.arange(b).repeat_interleave(k))
        held["prepared"] = policy.velocity_model.prepare(per_candidate)

    cond = measure_inference(condition, modules, [lq])
    generate = measure_inference(
        lambda: policy.integrator(input_ids=_empty(b, meta.prompt_tokens + policy.num_semantic_tokens, dtype=torch.long)),
        modules,
    )
    prepared = held["prepared"]
    x, t = _empty(b * k, *policy.latent_shape()), _empty(b * k)
    step = measure_inference(lambda: policy.velocity_model.velocity(x, t, prepared), modules, [x, t, prepared])
    decode = measure_inference(lambda: policy.vae.decode(x.to(meta.dtype)).sample, modules, [x])
    flops = cond.flops + generate.flops + stage2.rollout.sampler_steps * step.flops + decode.flops
    c, h, w = policy.latent_shape()
    per_input = sum(value.nbytes for value in vars(held["condition"]).values()) // b
    return RolloutCost(b, flops, max(cond.activation_bytes, step.activation_bytes, decode.activation_bytes),
                       per_input, c * h * w * 4)


@dataclass(frozen=True)
class LearnerModel:
    """The learner's velocity model: parameter counts and the cost of one micro-batch."""

    trained: int
    frozen: int
    sync_params: int  # parameters a weight sync sends (the adapters, or the trained DiT)
    train: PassCost  # forward + backward of v_theta; its forward is what v_old (and v_base) cost


def learner_model(meta: MetaPolicy, config: RunConfig) -> LearnerModel:
    """v_theta as the learner builds it (full DiT or LoRA adapters) and one micro-batch through it."""
    learner = config.stage2.learner
    field = copy.deepcopy(meta.policy.velocity_model).requires_grad_(False)
    for module in field.stage2_modules():
        if learner.finetune == "lora":
            with META:
                add_lora(module, learner.lora_rank, learner.lora_alpha, learner.lora_targets, init=learner.lora_init)
            module.to(meta.dtype)
        else:
            module.requires_grad_(True)
    trained = sum(p.numel() for p in field.parameters() if p.requires_grad)
    total = count_parameters(field)
    m = learner.micro_batch
    condition = _learner_condition(meta, m)
    x, t = _empty(m, *meta.policy.latent_shape()), _empty(m)
    train = measure_training(lambda: field(x, t, condition).float().square().mean(), [field])
    return LearnerModel(trained, total - trained, trained, train)


def _learner_condition(meta: MetaPolicy, count: int) -> Condition:
    """``count`` conditions as the learners receive them (one per candidate's input, at most)."""
    from rlrestore.policies.prefrestore.velocity import PrefRestoreCondition

    policy, n = meta.policy, meta.policy.num_semantic_tokens
    channels = policy.velocity_model.transformer.config.caption_channels
    return PrefRestoreCondition(
        semantic=_empty(count, n + 1, channels, dtype=meta.dtype),
        z_low=_empty(count, *policy.latent_shape(), dtype=meta.dtype),
        codes=_empty(count, n, dtype=torch.long),
    )


def learner_state(model: LearnerModel, config: RunConfig) -> tuple[StateBytes, int]:
    """A learner rank's DeepSpeed state and its other copies: v_old in float32 (EMA) and, with
    ``nft.base_penalty > 0``, v_base in the compute dtype."""
    stage2, total = config.stage2, model.trained + model.frozen
    state = deepspeed_state(
        model.trained, model.frozen, config.precision, stage2.learner.zero_stage, stage2.resources.learner.num_actors
    )
    copies = total * 4 + (total * COMPUTE_BYTES[config.precision] if stage2.nft.base_penalty > 0 else 0)
    return state, copies


@dataclass(frozen=True)
class Stage1Cost:
    """A Stage 1 worker: parameters, its state, one micro-batch's FLOPs and activations."""

    trained: int
    frozen: int
    state: StateBytes
    micro_batch: int
    step: PassCost


def stage1_cost(meta: MetaPolicy, config: RunConfig, stage: str) -> Stage1Cost:
    """One DDP step of ``stage`` (stage1.1 or stage1.2) on ``batch_size / workers`` faces: clean
    latent and target codes (frozen), teacher-forced condition, flow-matching forward, backward
    into the stage's trainable components."""
    policy = meta.policy
    section = config.stage(stage)
    m = max(1, section.batch_size // config.ray.train_workers.num_actors)
    params = policy.set_trainable(section.trainable)
    trained = sum(p.numel() for p in params)
    hq = _empty(m, 3, policy.resolution, policy.resolution, dtype=meta.dtype)

    def loss() -> Tensor:
        x0 = policy.encode(hq)
        condition, logits = _condition(meta, m, hq)
        v = policy.velocity_model(x0, _empty(m), condition)
        return v.float().square().mean() + logits.float().mean() + condition.z_low.float().square().mean()

    step = measure_training(loss, [policy])
    policy.set_trainable([])
    total = count_parameters(policy)
    return Stage1Cost(trained, total - trained, ddp_state(trained, total - trained), m, step)


@dataclass(frozen=True)
class RewardCost:
    """One reward's network: parameters and cost per image, or why it was not built."""

    name: str
    params: int = 0
    flops_per_image: float = 0.0
    activation_bytes: int = 0
    unmodelled: str = ""


def _open_clip_image(args: dict) -> tuple[nn.Module, int, Callable[[nn.Module, Tensor], Tensor]]:
    import open_clip

    model = open_clip.create_model(args.get("model_name", "ViT-H-14"), pretrained=None, device="meta", **args.get("model_config", {}))
    size = model.visual.image_size
    return model, size[0] if isinstance(size, tuple) else size, lambda net, x: net.encode_image(x)


def _iresnet(args: dict) -> tuple[nn.Module, int, Callable[[nn.Module, Tensor], Tensor]]:
    from rewards.networks.arcface import iresnet

    return iresnet(args.get("arch", "iresnet50")), 112, lambda net, x: net(torch.cat([x, x]))


def _awing(args: dict) -> tuple[nn.Module, int, Callable[[nn.Module, Tensor], Tensor]]:
    from rewards.networks.awing import FAN

    return FAN(), 256, lambda net, x: net(torch.cat([x, x]))


# Rewards whose full-size network is known from code alone: (network, input side, scoring pass).
# identity and lmd run each image and its clean face.
REWARD_NETWORKS = {"hpsv2": _open_clip_image, "identity": _iresnet, "lmd": _awing}


def reward_cost(spec: RewardSpec, chunk: int) -> RewardCost:
    """Parameters and FLOPs per image of a reward's network on meta, scoring ``chunk`` images."""
    from rewards.base import reward_class

    reward_class(spec.name)  # an unknown reward fails here, naming the known ones
    if spec.name in PIXEL_REWARDS:
        return RewardCost(spec.name)
    if spec.name not in REWARD_NETWORKS:
        return RewardCost(spec.name, unmodelled=(
            "network not built on meta: its architecture comes from its weight/config files"))
    with META:
        network, side, score = REWARD_NETWORKS[spec.name](dict(spec.args))
    network.eval().requires_grad_(False)
    images = _empty(chunk, 3, side, side)
    cost = measure_inference(lambda: score(network, images), [network], [images])
    return RewardCost(spec.name, count_parameters(network), cost.flops / chunk, cost.activation_bytes)
