"""Keys of the previous release and how they move to their place now."""

from __future__ import annotations

import warnings
from typing import Any

from pydantic import BaseModel

RENAMED_KEYS: dict[str, str] = {
    "stage2.rollout_batch": "stage2.rollout.batch_size",
    "stage2.sampler_steps": "stage2.rollout.sampler_steps",
    "stage2.sampler_method": "stage2.rollout.sampler_method",
    "stage2.async_rollouts": "stage2.rollout.asynchronous",
    "stage2.max_policy_lag": "stage2.rollout.max_policy_lag",
    "stage2.micro_batch": "stage2.learner.micro_batch",
    "stage2.finetune": "stage2.learner.finetune",
    "stage2.lora_rank": "stage2.learner.lora_rank",
    "stage2.lora_alpha": "stage2.learner.lora_alpha",
    "stage2.lora_init": "stage2.learner.lora_init",
    "stage2.lora_targets": "stage2.learner.lora_targets",
    "stage2.zero_stage": "stage2.learner.zero_stage",
    "stage2.rollout_workers": "stage2.resources.rollout",
    "stage2.reward_workers": "stage2.resources.reward",
    "stage2.reward_actors": "stage2.resources.reward_groups",
    "stage2.learners": "stage2.resources.learner",
    "stage2.placement_strategy": "stage2.resources.placement_strategy",
    "stage2.placement_timeout_s": "stage2.resources.placement_timeout_s",
    "stage2.max_actor_failures": "stage2.faults.max_actor_failures",
    "stage2.reward_errors": "stage2.faults.reward_errors",
    "stage2.checkpoint_every": "stage2.outputs.checkpoint_every",
    "stage2.keep_checkpoints": "stage2.outputs.keep_checkpoints",
    "stage2.sample_grid_every": "stage2.outputs.sample_grid_every",
    "ray.num_workers": "ray.train_workers.num_actors",
    "ray.cpus_per_worker": "ray.train_workers.num_cpus",
    "ray.gpus_per_worker": "ray.train_workers.num_gpus",
    "eval.num_actors": "eval.actors.num_actors",
    "eval.num_cpus": "eval.actors.num_cpus",
    "eval.num_gpus": "eval.actors.num_gpus",
}
"""Keys of the previous release -> their place now. The old keys are still read (YAML files,
``key=value`` overrides, dicts passed to the config classes), each with a FutureWarning naming
both, until the next release removes them."""

_UNSET = object()


def _warn_renamed(old: str, new: str) -> None:
    warnings.warn(
        f"config key {old} is deprecated and will be removed in the next release: use {new}",
        FutureWarning,
        stacklevel=4,
    )


def _as_dict(node: Any, where: str) -> dict[str, Any]:
    """A copy of a config section given as a dict or as a config object (only its set keys)."""
    if isinstance(node, BaseModel):
        return node.model_dump(exclude_unset=True)
    if not isinstance(node, dict):
        raise ValueError(f"{where} holds the value {node!r}, not a section")  # noqa: TRY004 - a validation error
    return dict(node)


def move_renamed_keys(data: Any, section: str) -> Any:
    """``data`` of config section ``section`` (``stage2``, ``ray``, ``eval``) with each of its
    :data:`RENAMED_KEYS` moved to the new place, with a FutureWarning. Raises ValueError naming
    both keys when a key is set under its old and its new name."""
    if not isinstance(data, dict):
        return data
    moved = dict(data)
    for old, new in RENAMED_KEYS.items():
        head, _, name = old.partition(".")
        if head != section or name not in moved:
            continue
        *parents, leaf = new.split(".")[1:]
        node, where = moved, section
        for part in parents:
            where = f"{where}.{part}"
            node[part] = node = _as_dict(node.get(part, {}), where)
        if node.get(leaf, _UNSET) is not _UNSET:
            raise ValueError(f"{old} and {new} are both set; {old} is the old name of {new}: keep only {new}")
        _warn_renamed(old, new)
        node[leaf] = moved.pop(name)
    return moved


def _renamed_path(path: list[str]) -> list[str]:
    """An override's key path with a renamed key (or section) replaced by its new name."""
    for length in range(len(path), 0, -1):
        new = RENAMED_KEYS.get(".".join(path[:length]))
        if new is not None:
            _warn_renamed(".".join(path[:length]), new)
            return [*new.split("."), *path[length:]]
    return path
