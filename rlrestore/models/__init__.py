"""The networks policies are built from (tokenizers, connectors, LoRA) and how they load."""

from rlrestore.models.loading import CheckpointError, count_parameters

__all__ = ["CheckpointError", "count_parameters"]
