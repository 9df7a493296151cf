"""The Pref-Restore policy networks, built from config or loaded from local weights."""

from rlrestore.models.loading import CheckpointError, count_parameters
from rlrestore.models.policy import Condition, Conditioning, PrefRestorePolicy, RestoreOutput

__all__ = ["CheckpointError", "Condition", "Conditioning", "PrefRestorePolicy", "RestoreOutput", "count_parameters"]
