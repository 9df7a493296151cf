"""Rollout workers: K candidate restorations per degraded face from the current policy."""

from rollouts.worker import RolloutBatch, RolloutWorker, make_rollout_actor

__all__ = ["RolloutBatch", "RolloutWorker", "make_rollout_actor"]
