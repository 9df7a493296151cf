"""Policy types by name: build one from its config section, load one from its directory.

A policy class registers itself with :func:`register_policy` under its ``policy_type``, the value of
``policy.type`` in a config and of ``policy.type`` in a directory's ``policy_config.json`` (a file
without it, written before there were several policies, is Pref-Restore's). Everything above the
policies (stages, roles, restore, eval) goes through these functions and never names a class.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from rlrestore.models.loading import CheckpointError
from rlrestore.policies.base import POLICY_CONFIG, RestorationPolicy, VelocityModel

if TYPE_CHECKING:
    from rlrestore.config import PolicyBaseConfig

DEFAULT_POLICY = "prefrestore"
# Where the built-in policies live: imported on first use, so a process loads only what it needs.
BUILT_IN = {"prefrestore": "rlrestore.policies.prefrestore", "flow_unet": "rlrestore.policies.flow_unet"}
_REGISTRY: dict[str, type[RestorationPolicy]] = {}


def register_policy(cls: type[RestorationPolicy]) -> type[RestorationPolicy]:
    """Class decorator: make ``cls`` the policy of ``cls.policy_type``."""
    _REGISTRY[cls.policy_type] = cls
    return cls


def policy_class(policy_type: str) -> type[RestorationPolicy]:
    """The class registered under ``policy_type``."""
    if policy_type not in _REGISTRY and policy_type in BUILT_IN:
        importlib.import_module(BUILT_IN[policy_type])
    if policy_type not in _REGISTRY:
        raise ValueError(f"unknown policy type {policy_type!r}; known: {sorted(set(BUILT_IN) | set(_REGISTRY))}")
    return _REGISTRY[policy_type]


def trains_in(policy_type: str, stage: str) -> bool:
    """Whether the policy of ``policy_type`` has a Stage 1 step for ``stage``."""
    return stage in policy_class(policy_type).stages


def check_stage(policy_type: str, stage: str) -> None:
    """Refuse a Stage 1 stage the policy does not train in, naming the ones it does."""
    stages = policy_class(policy_type).stages
    if stage not in stages:
        raise ValueError(
            f"the {policy_type} policy (policy.type) trains in the Stage 1 stages {list(stages)}, not in {stage}"
        )


def policy_type_of(path: str | Path) -> str:
    """The policy type a policy directory was written by."""
    meta_file = Path(path) / POLICY_CONFIG
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a policy checkpoint: {POLICY_CONFIG} is missing")
    try:
        section: Any = json.loads(meta_file.read_text())["policy"]
        return str(section.get("type", DEFAULT_POLICY))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{meta_file} is unreadable or invalid: {exc}") from None


def build_policy(config: PolicyBaseConfig) -> RestorationPolicy:
    """The policy of a config section, networks random-initialised or read from ``pretrained``."""
    return policy_class(config.type).from_config(config)


def load_policy(path: str | Path, runtime: dict[str, Any] | None = None) -> RestorationPolicy:
    """The policy saved in a policy directory, in float32, running as the run's ``runtime`` options
    say (``config.policy.runtime_options()``; None keeps the directory's defaults)."""
    policy = policy_class(policy_type_of(path)).from_pretrained(path)
    if runtime is not None:
        policy.apply_runtime_options(runtime)
    return policy


def load_velocity_model(path: str | Path) -> VelocityModel:
    """Only the velocity model of a policy directory, in float32 (Stage 2 learners)."""
    return policy_class(policy_type_of(path)).velocity_from_pretrained(path)


def write_policy_with_velocity(base: Path, state: dict[str, Tensor], out: Path) -> None:
    """A policy directory equal to ``base`` but for the velocity model's weights ``state``."""
    policy_class(policy_type_of(base)).write_velocity(Path(base), state, Path(out))
