"""The Stage 2 section: rewards, NFT, rollouts, learners, resources, faults, held-out eval and guard."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rlrestore.config.base import _Section
from rlrestore.config.renames import move_renamed_keys
from rlrestore.config.stage1 import ActorGroupConfig, OptimConfig

DEFAULT_REWARD_ACTOR = "default"
ErrorPolicy = Literal["retry", "skip_step", "fail"]


def reward_group_key(group: str) -> str:
    """The config section that sizes reward-actor group ``group``."""
    return "stage2.resources.reward" if group == DEFAULT_REWARD_ACTOR else f"stage2.resources.reward_groups.{group}"


class RewardSpec(_Section):
    """One reward model: a registered name (or ``module:Class``), its weight and constructor args."""

    name: str = Field(
        ..., min_length=1, description="Registered reward name or a 'package.module:Class' path."
    )
    weight: float = Field(1.0, description="Weight of this component in the total reward.")
    args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the reward's constructor."
    )
    actor: str = Field(
        DEFAULT_REWARD_ACTOR,
        min_length=1,
        description="Reward-actor group hosting this reward: 'default' (sized by stage2.resources.reward) "
        "or a key of stage2.resources.reward_groups. Rewards of one group share its actors.",
    )
    on_error: ErrorPolicy | None = Field(
        None, description="Error policy of this reward; None uses stage2.faults.reward_errors.policy."
    )
    timeout_s: float | None = Field(
        None,
        gt=0,
        description="Seconds one scoring call (one chunk of images) may take before it counts as failed; "
        "None uses stage2.faults.reward_errors.timeout_s.",
    )


class RewardErrorConfig(_Section):
    """What happens when a reward raises, hangs or returns a malformed result.

    A NaN score is no error: a reward returns it for an image it cannot score, and the aggregator
    masks that sample. Every failure is logged with the reward's name, counted per step in
    ``reward/errors/<name>`` and summarised in ``<run_dir>/reward_errors.json``.
    """

    policy: ErrorPolicy = Field(
        "retry",
        description="'retry': call the failed chunk again up to `retries` times, then as skip_step; "
        "'skip_step': no training on the step (the step counter advances, so nothing repeats); "
        "'fail': stop the run with the reward's name and error. A failure of a weight-0 reward "
        "never skips a step (it only reports).",
    )
    retries: int = Field(2, ge=0, description="Extra attempts of a failed chunk under policy 'retry'.")
    timeout_s: float = Field(
        300.0,
        gt=0,
        description="Seconds one scoring call (one chunk of images) of a reward may take; a call past it "
        "fails as a timeout and its thread is abandoned (the reward actor is replaced after the step).",
    )


class NFTConfig(_Section):
    """DiffusionNFT loss (Eq. 13-15) and the v_old EMA, as the reference implementation does them."""

    beta: float = Field(
        0.1, gt=0, description="beta (the paper's gamma) of v+ / v-: 1.0 single reward, 0.1 multi-reward."
    )
    loss_form: Literal["velocity", "adaptive_x0"] = Field(
        "velocity", description="'velocity': Eq. 15; 'adaptive_x0': the reference's x0-space adaptive form."
    )
    adaptive_scale: float = Field(5.0, gt=0, description="Scale of the adaptive_x0 form.")
    timesteps_per_sample: int = Field(
        4, ge=1, description="Timesteps t (each a forward/backward) per stored x0."
    )
    base_penalty: float = Field(
        0.0, ge=0, description="Weight of ||v_theta - v_base||^2 to the frozen base (1e-4 in the reference)."
    )
    clip: float = Field(5.0, gt=0, description="Clip constant c of the group-normalised advantage.")
    reward_eps: float = Field(1e-4, gt=0, description="Added to the step-wide reward std.")
    ema_schedule: Literal["linear", "delayed"] = Field("linear", description="Decay schedule of v_old.")


class RolloutConfig(_Section):
    """How the rollout actors sample: chunk size, sampler, and rollouts overlapping the learners."""

    batch_size: int = Field(
        4, ge=1, description="Inputs per batched rollout call (one chunk, sent to one rollout actor)."
    )
    sampler_steps: int = Field(
        10, ge=1, description="Sampler steps of rollouts (deterministic ODE, CFG off); also the learners' timestep grid."
    )
    sampler_method: Literal["euler", "dpm2"] = Field(
        "euler",
        description="Rollout sampler: 'euler' or 'dpm2' (the released model's Stage 2), see sampler.method.",
    )
    asynchronous: bool = Field(False, description="Roll out step i+1 while the learners train on step i.")
    max_policy_lag: int = Field(
        1,
        ge=0,
        description="Most policy versions a rollout may lag behind the weights it is trained with; a rollout "
        "lagging more is redone with the current weights. Asynchronous rollouts lag 1 by design (need >= 1); "
        "synchronous rollouts lag 0.",
    )

    condition_cache: int = Field(
        1024,
        ge=0,
        description="Conditions each rollout actor keeps (least recently used dropped) when they cannot change: "
        "data.fixed_degradation=true and a deterministic condition (greedy AR decoding); 0 turns the cache off.",
    )

    @model_validator(mode="after")
    def _async_needs_lag(self) -> RolloutConfig:
        if self.asynchronous and self.max_policy_lag < 1:
            raise ValueError(
                "stage2.rollout.asynchronous=true rolls out step i+1 with the weights of step i (policy lag 1), "
                f"but stage2.rollout.max_policy_lag={self.max_policy_lag}: set max_policy_lag >= 1 or "
                "asynchronous=false"
            )
        return self


class LearnerConfig(_Section):
    """What the DeepSpeed learner ranks train and how: micro-batches, full fine-tuning or LoRA, ZeRO."""

    micro_batch: int = Field(8, ge=1, description="Samples per learner forward/backward.")
    finetune: Literal["full", "lora"] = Field("full", description="Full fine-tuning or LoRA of the DiT.")
    lora_rank: int = Field(32, ge=1, description="LoRA rank (finetune=lora).")
    lora_alpha: float = Field(
        32.0, gt=0, description="LoRA scale numerator: the adapter's update is scaled by alpha / rank."
    )
    lora_init: Literal["default", "gaussian"] = Field(
        "default",
        description="Initialisation of LoRA's A factor (B starts at zero either way): peft's 'default' "
        "(Kaiming-uniform) or 'gaussian' (normal, std 1 / rank; the released model's Stage 2).",
    )
    lora_targets: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        min_length=1,
        description="Names (suffixes) of the DiT's Linear layers that get LoRA adapters (finetune=lora).",
    )
    zero_stage: int = Field(
        2,
        ge=0,
        le=2,
        description="DeepSpeed ZeRO stage of the learners (0-2; ZeRO-3 would split the DiT the EMA reads whole).",
    )


class Stage2Resources(_Section):
    """Ray resources of every Stage 2 role, one ``ActorGroupConfig`` each, reserved up front in one
    placement group (a bundle per actor)."""

    rollout: ActorGroupConfig = Field(
        default_factory=lambda: ActorGroupConfig(num_actors=2), description="Rollout actors."
    )
    reward: ActorGroupConfig = Field(
        default_factory=ActorGroupConfig,
        description="Actors of the 'default' reward-actor group (rewards without `actor`).",
    )
    reward_groups: dict[str, ActorGroupConfig] = Field(
        default_factory=dict,
        description="Further reward-actor groups by name (a reward joins one with `actor: NAME`), each "
        "with its own actors and CPU/GPU reservation; e.g. one GPU group per large model.",
    )
    learner: ActorGroupConfig = Field(
        default_factory=lambda: ActorGroupConfig(num_actors=2), description="DeepSpeed learner ranks."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy of all Stage 2 actors (one bundle per actor)."
    )
    placement_timeout_s: float = Field(
        120.0, gt=0, description="Seconds to wait for the cluster to fit the placement group before failing."
    )

    @model_validator(mode="after")
    def _default_group_is_reward(self) -> Stage2Resources:
        if DEFAULT_REWARD_ACTOR in self.reward_groups:
            raise ValueError(
                f"stage2.resources.reward_groups.{DEFAULT_REWARD_ACTOR}: the default group is sized by "
                "stage2.resources.reward; set that instead or give this group another name"
            )
        return self


class FaultConfig(_Section):
    """What a Stage 2 run survives: actor deaths, and rewards that raise, hang or return garbage."""

    max_actor_failures: int = Field(
        10,
        ge=0,
        description="Rollout-actor deaths and learner-group losses a run survives before it stops (each "
        "dead rollout actor is replaced and its chunk redone; a lost learner rank rebuilds the learner "
        "group from the newest checkpoint and redoes the steps after it).",
    )
    reward_errors: RewardErrorConfig = Field(
        default_factory=RewardErrorConfig, description="Error policy and timeout of reward scoring."
    )


class OutputConfig(_Section):
    """What a Stage 2 run writes besides its metrics, and how often."""

    checkpoint_every: int = Field(10, ge=1, description="Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(3, ge=1, description="Newest checkpoints kept on disk.")
    sample_grid_every: int = Field(10, ge=1, description="Write an LQ | candidates | GT grid every N steps.")


DEFAULT_GUARD_METRICS = ("psnr", "dlib_identity", "dlib_lmd")
DEFAULT_GUARD_THRESHOLDS = {"dlib_identity": 0.1, "dlib_lmd": 0.05, "psnr": 2.0}
"""Default ``max_worse`` of the guard metrics (``stage2.guard.rules`` unset)."""
EVAL_TOTAL = "total"
"""Name of the weighted trained reward among the held-out evaluation's values (``eval/total``)."""


class HeldOutEvalConfig(_Section):
    """What Stage 2's held-out evaluation restores and scores (``stage2.eval_every``): the held-back
    faces (``data.holdout``), degraded with fixed seeds as the demo does, restored by the current
    policy with the deterministic rollout sampler and fixed noise seeds, scored by the trained
    rewards and the guard metrics against their clean faces."""

    faces: int = Field(
        0, ge=0, description="Held-back faces restored at each evaluation (the first N by id); 0: all of data.holdout."
    )
    seeds: int = Field(1, ge=1, description="Restorations per face, each with its own fixed noise seed.")
    guard_metrics: list[str] = Field(
        default_factory=lambda: list(DEFAULT_GUARD_METRICS),
        description="Registered rewards scored besides the trained ones and logged raw as eval/<name> (psnr in dB; "
        "dlib_identity and dlib_lmd are distances, lower is better). Those that are not trained rewards are "
        "scored in the driver process on the CPU.",
    )


class GuardRule(_Section):
    """One threshold of the reward-hacking guard, relative to the metric's value at the start (step 0)."""

    metric: str = Field(
        ...,
        min_length=1,
        description="'total' (the weighted trained reward), 'reward/<name>' (a trained reward) or a name of "
        "stage2.eval.guard_metrics.",
    )
    max_worse: float = Field(
        ...,
        ge=0,
        description="How far the metric may move in its worse direction from its step-0 value, in its own units "
        "(a higher-is-better metric may fall this much, a lower-is-better one rise this much).",
    )


class GuardConfig(_Section):
    """The reward-hacking guard: checked at every held-out evaluation; inert while eval_every is 0."""

    rules: list[GuardRule] | None = Field(
        None,
        description="Thresholds; crossing any one triggers `action`. None: the default threshold of each "
        "evaluated guard metric that has one: dlib_identity +0.1 (distance), dlib_lmd +0.05 (inter-ocular "
        "units), psnr -2 dB (some fidelity is traded for quality by design); [] turns the guard off.",
    )
    action: Literal["stop", "rollback"] = Field(
        "stop",
        description="'stop': end the run cleanly (checkpoint and report written); 'rollback': reload learners and "
        "rollout actors from the best checkpoint (stage2.select) and keep training, up to max_rollbacks times, "
        "then stop.",
    )
    max_rollbacks: int = Field(2, ge=0, description="Rollbacks a run may make before a crossing stops it.")

    def active_rules(self, guard_metrics: list[str]) -> list[GuardRule]:
        """The configured rules, or the defaults of the evaluated ``guard_metrics``."""
        if self.rules is not None:
            return list(self.rules)
        return [
            GuardRule(metric=name, max_worse=DEFAULT_GUARD_THRESHOLDS[name])
            for name in guard_metrics
            if name in DEFAULT_GUARD_THRESHOLDS
        ]


class SelectionConfig(_Section):
    """Which held-out evaluation names the run's best checkpoint (``<run_dir>/stage2_report.json``)."""

    metric: str = Field(
        EVAL_TOTAL,
        min_length=1,
        description="'total' (the weighted trained reward), 'reward/<name>' or a name of stage2.eval.guard_metrics.",
    )
    mode: Literal["max", "min"] | None = Field(
        None, description="'max' or 'min'; None: the metric's own direction (rewards: max; distances: min)."
    )
    guarded_only: bool = Field(
        True, description="Only evaluations that crossed no guard threshold may be the best."
    )


class Stage2Config(_Section):
    """Stage 2: preference RL with DiffusionNFT on rollout, reward and learner actors.

    The recipe (steps, inputs, K, rewards) at the top; then one section per concern: how rollouts
    sample, the NFT loss, the optimizer, what the learners train, the Ray resources of every role,
    what the run survives, and what it writes.
    """

    steps: int = Field(100, ge=1, description="RL steps (rollout -> reward -> learn -> sync).")
    inputs_per_step: int = Field(48, ge=1, description="Degraded inputs per step (groups).")
    candidates: int = Field(24, ge=1, description="K candidates per input.")
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [
            RewardSpec(name="sharpness", weight=1.0),
            RewardSpec(name="psnr", weight=0.0),
        ],
        description="Reward components; a weight of 0 reports a component without training on it.",
    )
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout sampling.")
    nft: NFTConfig = Field(default_factory=NFTConfig, description="NFT loss and v_old EMA.")
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(
            lr=3e-4, weight_decay=1e-4, schedule="constant", warmup_ratio=0.0
        ),
        description="Learner optimizer (Table I: AdamW 3e-4 constant, wd 1e-4).",
    )
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="What the learners train.")
    resources: Stage2Resources = Field(
        default_factory=Stage2Resources, description="Actors and reservations of every role; placement."
    )
    faults: FaultConfig = Field(default_factory=FaultConfig, description="Actor and reward failures.")
    outputs: OutputConfig = Field(default_factory=OutputConfig, description="Checkpoints and sample grids.")
    eval_every: int = Field(
        0,
        ge=0,
        description="Held-out evaluation every N steps, at step 0 and at the end (a checkpoint is written at each); "
        "0 turns it, the guard and best-checkpoint selection off.",
    )
    eval: HeldOutEvalConfig = Field(default_factory=HeldOutEvalConfig, description="Held-out evaluation.")
    guard: GuardConfig = Field(default_factory=GuardConfig, description="Reward-hacking guard.")
    select: SelectionConfig = Field(default_factory=SelectionConfig, description="Best-checkpoint rule.")

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        return move_renamed_keys(data, "stage2")

    @model_validator(mode="after")
    def _reward_groups_exist(self) -> Stage2Config:
        groups = self.resources.reward_groups
        for index, spec in enumerate(self.rewards):
            if spec.actor != DEFAULT_REWARD_ACTOR and spec.actor not in groups:
                defined = ", ".join([DEFAULT_REWARD_ACTOR, *groups])
                raise ValueError(
                    f"stage2.rewards.{index}.actor = {spec.actor!r} (reward {spec.name!r}) names no reward-actor "
                    f"group; define stage2.resources.reward_groups.{spec.actor} or use one of: {defined}"
                )
        return self

    @model_validator(mode="after")
    def _eval_metrics_known(self) -> Stage2Config:
        known = [EVAL_TOTAL, "reward/<name>", *self.eval.guard_metrics]
        rules = self.guard.rules or []
        named = [(f"stage2.guard.rules.{i}.metric", rule.metric) for i, rule in enumerate(rules)]
        for key, metric in [*named, ("stage2.select.metric", self.select.metric)]:
            if metric != EVAL_TOTAL and not metric.startswith("reward/") and metric not in self.eval.guard_metrics:
                raise ValueError(
                    f"{key} = {metric!r} is not evaluated; use one of {known} or add it to "
                    "stage2.eval.guard_metrics"
                )
        return self

    def reward_actor_groups(self) -> dict[str, tuple[ActorGroupConfig, list[RewardSpec]]]:
        """Reward-actor groups that host at least one reward: name -> (resources, rewards).

        In order of first use in ``rewards``; a group no reward names starts no actor.
        """
        groups: dict[str, tuple[ActorGroupConfig, list[RewardSpec]]] = {}
        for spec in self.rewards:
            if spec.actor not in groups:
                resources = self.resources.reward_groups.get(spec.actor, self.resources.reward)
                groups[spec.actor] = (resources, [])
            groups[spec.actor][1].append(spec)
        return groups
