"""Restoration policies behind one interface (``base``), the restoration pipeline (``pipeline``)
and the registry by policy type (``registry``). Pref-Restore (``prefrestore``) is the first
policy; ``flow_unet`` is a small conditional UNet flow written only against the interface."""

from rlrestore.policies.base import POLICY_CONFIG, Condition, RestorationPolicy, RestoreOutput, VelocityModel
from rlrestore.policies.registry import (
    build_policy,
    load_policy,
    load_velocity_model,
    policy_class,
    register_policy,
    write_policy_with_velocity,
)

__all__ = [
    "POLICY_CONFIG",
    "Condition",
    "RestorationPolicy",
    "RestoreOutput",
    "VelocityModel",
    "build_policy",
    "load_policy",
    "load_velocity_model",
    "policy_class",
    "register_policy",
    "write_policy_with_velocity",
]
