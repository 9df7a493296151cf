"""Pref-Restore: the first policy behind the interface of ``rlrestore.policies``."""

from rlrestore.policies.prefrestore.policy import Conditioning, PrefRestorePolicy
from rlrestore.policies.prefrestore.velocity import PrefRestoreCondition, PrefRestoreVelocity

__all__ = ["Conditioning", "PrefRestoreCondition", "PrefRestorePolicy", "PrefRestoreVelocity"]
