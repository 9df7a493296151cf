"""``rlrestore plan``: will a config fit, and how long will a step take, before renting the nodes.

For each role (Stage 1 worker per sub-stage, rollout actor, reward actor per group, learner rank)
the plan gives the parameters it holds, weights / gradients / optimizer state (ZeRO stage and
``precision``), other copies (v_old, v_base), an activation estimate for its micro-batch, the FLOPs
per step (``torch.utils.flop_counter`` on the meta device), and a predicted time at a stated
fraction of the peak FLOP rate; then the bytes per step on every Stage 2 link
(``plan_costs.link_bytes``) and their time at a given bandwidth, the predicted step time, whether
``--gpus`` cover what the config asks and which knob to turn when a role does not fit.
Everything is an estimate: see the README section "Will it fit? ``rlrestore plan``".
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rlrestore.config import ActorGroupConfig, RunConfig, load_config
from rlrestore.models.loading import count_parameters
from rlrestore.orchestration import plan_roles as roles
from rlrestore.orchestration.plan_costs import (
    COMPUTE_BYTES,
    LinkBytes,
    StateBytes,
    StepShapes,
    allreduce_bytes,
    compute_seconds,
    human_bytes,
    human_count,
    human_flops,
    link_bytes,
    parse_bytes,
    transfer_seconds,
)


@dataclass(frozen=True)
class PlanOptions:
    """The hardware the plan is made for."""

    gpus: int | None = None
    gpu_memory: int = 80 * 2**30
    tflops: float = 312.0  # dense peak at the compute dtype (A100 bf16)
    bandwidth: float = 12.5e9  # bytes/s of a link between actors (100 Gbit/s)
    efficiency: float = 0.4  # achieved fraction of the peak


@dataclass
class RoleRow:
    """One role: per actor (or rank) memory, FLOPs and predicted compute time."""

    role: str
    group: ActorGroupConfig
    params: int
    trained: int
    state: StateBytes
    copies: int
    activations: int
    micro: str
    flops: float
    seconds: float
    knobs: list[str] = field(default_factory=list)
    note: str = ""
    batch_key: str = ""  # the config key of the micro-batch the activations scale with
    batch_per_actor: int = 1  # that micro-batch per actor (the key's value / batch_scale)
    batch_scale: int = 1

    @property
    def total(self) -> int:
        return self.state.total + self.copies + self.activations

    def budget(self, gpu_memory: int) -> int | None:
        """GPU memory this actor may use (its share of a GPU), None when it runs on the CPU."""
        gpus = self.group.num_gpus
        return None if gpus <= 0 else int(gpu_memory * min(gpus, 1.0))


@dataclass
class Plan:
    """Everything ``rlrestore plan`` prints."""

    config: RunConfig
    options: PlanOptions
    rows: list[RoleRow]
    links: LinkBytes
    phases: dict[str, float]
    stage2_step: float
    gpus_asked: dict[str, float]
    notes: list[str]


def _compute(flops: float, options: PlanOptions) -> float:
    return compute_seconds(flops, options.tflops, options.efficiency)


def _stage1_rows(meta: roles.MetaPolicy, config: RunConfig, options: PlanOptions) -> list[RoleRow]:
    rows, workers = [], config.ray.train_workers
    for stage in ("stage1.1", "stage1.2"):
        cost = roles.stage1_cost(meta, config, stage)
        sync = transfer_seconds(allreduce_bytes(cost.trained * 4, workers.num_actors), options.bandwidth)
        section = "stage1_1" if stage == "stage1.1" else "stage1_2"
        rows.append(RoleRow(
            f"{stage} worker", workers, cost.trained + cost.frozen, cost.trained, cost.state, 0,
            cost.step.activation_bytes, f"{cost.micro_batch} faces", cost.step.flops,
            _compute(cost.step.flops, options) + sync,
            knobs=["ray.train_workers.num_actors (more workers)", f"{section}.trainable (fewer trained components)"],
            note=f"incl. {sync:.2f} s gradient all-reduce",
            batch_key=f"{section}.batch_size", batch_per_actor=cost.micro_batch, batch_scale=workers.num_actors,
        ))
    return rows


def _rollout_row(meta: roles.MetaPolicy, config: RunConfig, options: PlanOptions, cost: roles.RolloutCost) -> RoleRow:
    stage2, group = config.stage2, config.stage2.resources.rollout
    inputs = math.ceil(stage2.inputs_per_step / group.num_actors)
    flops = cost.flops / cost.inputs * inputs
    params = count_parameters(meta.policy)
    weights = params * COMPUTE_BYTES[config.precision]
    return RoleRow(
        "rollout actor", group, params, 0, StateBytes(weights, 0, 0), 0, cost.activation_bytes,
        f"{cost.inputs} x {stage2.candidates} candidates", flops, _compute(flops, options),
        knobs=["precision=bf16-mixed (bf16 inference weights)"],
        note=f"{inputs} inputs per step, {stage2.rollout.sampler_steps} sampler steps",
        batch_key="stage2.rollout.batch_size", batch_per_actor=cost.inputs,
    )


def _reward_rows(config: RunConfig, options: PlanOptions) -> tuple[list[RoleRow], dict[str, list[roles.RewardCost]]]:
    """One row per reward-actor group (its actors hold all its rewards), and each group's rewards."""
    stage2, rows, costs = config.stage2, [], {}
    chunk = stage2.rollout.batch_size * stage2.candidates
    for name, (group, specs) in stage2.reward_actor_groups().items():
        found = costs[name] = [roles.reward_cost(spec, chunk) for spec in specs]
        params = sum(c.params for c in found)
        images = math.ceil(stage2.inputs_per_step * stage2.candidates / group.num_actors)
        flops = images * sum(c.flops_per_image for c in found)
        unmodelled = [c.name for c in found if c.unmodelled]
        rows.append(RoleRow(
            f"reward actor [{name}]", group, params, 0, StateBytes(params * 4, 0, 0), 0,
            max((c.activation_bytes for c in found), default=0), f"{chunk} images", flops, _compute(flops, options),
            knobs=[f"stage2.resources.reward_groups.{name}.num_gpus (a larger GPU share)",
                   "stage2.rewards.*.actor (split the models over more reward-actor groups)"],
            note=", ".join(c.name for c in found) + (f"; NOT MODELLED: {', '.join(unmodelled)}" if unmodelled else ""),
        ))
    return rows, costs


def _learner_row(config: RunConfig, options: PlanOptions, model: roles.LearnerModel) -> RoleRow:
    stage2 = config.stage2
    learner, ranks = stage2.learner, stage2.resources.learner.num_actors
    samples = math.ceil(stage2.inputs_per_step * stage2.candidates / ranks)
    passes = samples * stage2.nft.timesteps_per_sample / learner.micro_batch
    forwards = 1 + (1 if stage2.nft.base_penalty > 0 else 0)  # v_old, v_base
    flops = passes * (model.train.flops + forwards * model.train.forward_flops)
    state, copies = roles.learner_state(model, config)
    knobs = []
    if learner.zero_stage < 2:
        knobs.append("stage2.learner.zero_stage=2 (splits gradients and optimizer state)")
    if learner.finetune == "full":
        knobs.append("stage2.learner.finetune=lora (adapters train, the DiT stays frozen)")
    if stage2.nft.base_penalty > 0:
        knobs.append("stage2.nft.base_penalty=0 (drops the v_base copy)")
    if learner.zero_stage >= 1:
        knobs.append("stage2.resources.learner.num_actors (more ranks share the optimizer state)")
    return RoleRow(
        "learner rank", stage2.resources.learner, model.trained + model.frozen, model.trained, state, copies,
        model.train.activation_bytes, f"{learner.micro_batch} samples", flops, _compute(flops, options), knobs,
        note=f"{samples} samples x {stage2.nft.timesteps_per_sample} timesteps; copies: v_old fp32"
        + (", v_base" if stage2.nft.base_penalty > 0 else ""),
        batch_key="stage2.learner.micro_batch", batch_per_actor=learner.micro_batch,
    )


def _links(meta: roles.MetaPolicy, config: RunConfig, rollout: roles.RolloutCost, model: roles.LearnerModel) -> LinkBytes:
    stage2 = config.stage2
    return link_bytes(StepShapes(
        inputs=stage2.inputs_per_step, candidates=stage2.candidates, call_inputs=stage2.rollout.batch_size,
        image_side=meta.policy.resolution, latent_bytes=rollout.latent_bytes, condition_bytes=rollout.condition_bytes,
        reward_actors=tuple(group.num_actors for group, _ in stage2.reward_actor_groups().values()),
        reward_components=len(stage2.rewards), rollout_actors=stage2.resources.rollout.num_actors,
        learner_ranks=stage2.resources.learner.num_actors,
        sync_bytes=model.sync_params * COMPUTE_BYTES[config.precision],
    ))


def _phases(rows: list[RoleRow], links: LinkBytes, config: RunConfig, options: PlanOptions) -> tuple[dict, float]:
    """Seconds of each Stage 2 phase (compute of the slowest actor + its link) and of the step."""
    def move(nbytes: int) -> float:
        return transfer_seconds(nbytes, options.bandwidth)

    by_role = {row.role: row for row in rows}
    reward = max((row.seconds for row in rows if row.role.startswith("reward")), default=0.0)
    phases = {
        "rollout": by_role["rollout actor"].seconds,
        "reward": reward + move(links.rollout_to_reward),
        "learn": by_role["learner rank"].seconds + move(links.rollout_to_learner),
        "sync": move(links.sync_put + links.sync_pull),
        "driver": move(links.driver_in + links.driver_out),
    }
    if config.stage2.rollout.asynchronous:  # rollouts of step i+1 overlap the rest of step i
        step = max(phases["rollout"], phases["reward"] + phases["learn"] + phases["sync"]) + phases["driver"]
    else:
        step = sum(phases.values())
    return phases, step


def _gpus_asked(config: RunConfig) -> dict[str, float]:
    stage2 = config.stage2.resources
    groups = [group for group, _ in config.stage2.reward_actor_groups().values()]
    asked = [stage2.rollout, stage2.learner, *groups]
    workers = config.ray.train_workers
    return {
        "stage1": workers.num_actors * workers.num_gpus,
        "stage2": sum(group.num_actors * group.num_gpus for group in asked),
    }


@contextlib.contextmanager
def _library_logs_off() -> Iterator[None]:
    """Silence the libraries' notices while networks are built on meta ("no pretrained weights
    loaded", "cast with to()"): true of every network here, and not the plan's output."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def make_plan(config: RunConfig, options: PlanOptions) -> Plan:
    """Measure every role of ``config`` on the meta device and put the plan together."""
    with _library_logs_off():
        return _make_plan(config, options)


def _make_plan(config: RunConfig, options: PlanOptions) -> Plan:
    meta = roles.build_meta_policy(config)
    rows = _stage1_rows(meta, config, options)
    rollout = roles.rollout_cost(meta, config)
    model = roles.learner_model(meta, config)
    rewards_rows, reward_costs = _reward_rows(config, options)
    rows += [_rollout_row(meta, config, options, rollout), *rewards_rows, _learner_row(config, options, model)]
    links = _links(meta, config, rollout, model)
    phases, step = _phases(rows, links, config, options)
    notes = list(meta.notes)
    notes += [f"reward {c.name}: {c.unmodelled}" for cs in reward_costs.values() for c in cs if c.unmodelled]
    return Plan(config, options, rows, links, phases, step, _gpus_asked(config), notes)


def batch_knob(row: RoleRow, budget: int) -> str:
    """The micro-batch that fits ``budget``, activations taken as linear in it."""
    per_item = row.activations / row.batch_per_actor
    fit = int((budget - (row.total - row.activations)) // per_item) if per_item else 0
    if fit < 1:
        return f"{row.batch_key}: not even 1 per actor fits (weights and state alone need {human_bytes(row.total - row.activations)})"
    return f"{row.batch_key}={fit * row.batch_scale} ({fit} per actor, {human_bytes(per_item)} of activations each)"


def problems(plan: Plan) -> list[str]:
    """Roles that do not fit their GPU memory (with the knobs to turn) and a GPU count that falls short."""
    found, options = [], plan.options
    for row in plan.rows:
        budget = row.budget(options.gpu_memory)
        if budget is not None and row.total > budget:
            knobs = ([batch_knob(row, budget)] if row.batch_key else []) + row.knobs
            found.append(
                f"{row.role} needs {human_bytes(row.total)} > {human_bytes(budget)} "
                f"({row.group.num_gpus:g} x {human_bytes(options.gpu_memory)}); turn: " + "; ".join(knobs)
            )
    if options.gpus is not None:
        for stage, asked in plan.gpus_asked.items():
            if math.ceil(asked) > options.gpus:
                found.append(f"{stage} asks for {asked:g} GPUs, more than --gpus {options.gpus}: "
                             "add GPUs or lower the num_actors / num_gpus of its roles")
    return found


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return [line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)]


def _role_table(plan: Plan) -> list[str]:
    header = ["role", "actors x GPU", "params", "trained", "weights", "grads", "optimizer", "copies",
              "activations (micro-batch)", "total", "fits", "FLOPs/step", "compute s"]
    rows = []
    for row in plan.rows:
        budget = row.budget(plan.options.gpu_memory)
        fits = "cpu" if budget is None else ("yes" if row.total <= budget else "NO")
        rows.append([
            row.role, f"{row.group.num_actors} x {row.group.num_gpus:g}", human_count(row.params),
            human_count(row.trained) if row.trained else "-", human_bytes(row.state.params),
            human_bytes(row.state.grads), human_bytes(row.state.optimizer), human_bytes(row.copies),
            f"{human_bytes(row.activations)} ({row.micro})", human_bytes(row.total), fits,
            human_flops(row.flops), f"{row.seconds:.3g}",
        ])
    return _table(header, rows) + [f"  {row.role}: {row.note}" for row in plan.rows if row.note]


def _link_table(plan: Plan) -> list[str]:
    links, bandwidth = plan.links, plan.options.bandwidth
    entries = [
        ("rollout -> reward (uint8 candidates, clean and LQ faces)", links.rollout_to_reward),
        ("rollout -> learner (x0 float32, 1 condition/input)", links.rollout_to_learner),
        ("learner -> object store (sync, once per version)", links.sync_put),
        ("object store -> rollout actors (sync pulls)", links.sync_pull),
        ("-> driver (scores, ids; estimate)", links.driver_in),
        ("driver -> (references only)", links.driver_out),
    ]
    rows = [[name, human_bytes(n), f"{transfer_seconds(n, bandwidth):.3g}"] for name, n in entries]
    return _table(["link", "bytes/step", "seconds"], rows)


def format_plan(plan: Plan, source: str) -> str:
    """The plan as text: roles, links, step time, GPUs, problems and notes."""
    config, options = plan.config, plan.options
    learner = config.stage2.learner
    title = (
        f"rlrestore plan {source}: precision {config.precision}, ZeRO {learner.zero_stage}, "
        f"finetune {learner.finetune}; estimates at {options.efficiency:.0%} of {options.tflops:g} TFLOP/s, "
        f"links at {human_bytes(options.bandwidth)}/s, {human_bytes(options.gpu_memory)} per GPU"
    )
    lines = [
        title,
        "", *_role_table(plan), "", *_link_table(plan), "",
        "Stage 2 step (predicted): "
        + ", ".join(f"{name} {seconds:.3g} s" for name, seconds in plan.phases.items())
        + f" -> {plan.stage2_step:.3g} s per step"
        + (" (asynchronous rollouts overlap)" if config.stage2.rollout.asynchronous else ""),
    ]
    asked = ", ".join(f"{stage} asks {n:g}" for stage, n in plan.gpus_asked.items())
    if options.gpus is not None:
        covered = all(math.ceil(n) <= options.gpus for n in plan.gpus_asked.values())
        asked += f"; --gpus {options.gpus} {'covers' if covered else 'does NOT cover'} it"
    lines += [f"GPUs: {asked}", ""]
    found = problems(plan)
    lines += ["DOES NOT FIT:", *(f"  - {p}" for p in found)] if found else ["Fits: every role within its GPU memory."]
    if plan.notes:
        lines += ["", "Notes:", *(f"  - {note}" for note in plan.notes)]
    return "\n".join(lines)


def plan_from_args(
    config_path: str, overrides: list[str], *, gpus: int | None, gpu_memory: str, tflops: float,
    bandwidth: str, efficiency: float,
) -> str:
    """``rlrestore plan``: load the config, check the options, make and format the plan."""
    if gpus is not None and gpus < 1:
        raise ValueError(f"--gpus {gpus}: need at least 1 GPU")
    if tflops <= 0 or not 0 < efficiency <= 1:
        raise ValueError(f"--tflops {tflops:g} must be > 0 and --efficiency {efficiency:g} in (0, 1]")
    options = PlanOptions(
        gpus=gpus, gpu_memory=parse_bytes(gpu_memory, "--gpu-memory"), tflops=tflops,
        bandwidth=parse_bytes(bandwidth, "--bandwidth"), efficiency=efficiency,
    )
    config = load_config(config_path, overrides)
    return format_plan(make_plan(config, options), Path(config_path).name)
