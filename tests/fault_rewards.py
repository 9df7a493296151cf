"""Fault-injecting rewards for the error-policy tests, named by ``tests.fault_rewards:Class`` paths.

Each scores an image by its mean pixel value when it does not misbehave.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor

from rewards import Reward, RewardBatch


def _brightness(images: Tensor) -> Tensor:
    return images.mean(dim=(1, 2, 3))


class Raising(Reward):
    """Raises on every call."""

    name = "raising"

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        raise RuntimeError("scorer exploded")


class WrongShape(Reward):
    """Returns two scores per image."""

    name = "wrong_shape"

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        return torch.zeros(images.shape[0], 2)


class NaNScores(Reward):
    """Scores NaN for every image whose metadata says ``nan``, brightness for the others."""

    name = "nan_scores"

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        nan = torch.tensor([bool(meta.get("nan")) for meta in batch.metadata])
        return torch.where(nan, torch.nan, _brightness(images))


class Sleeping(Reward):
    """Sleeps ``seconds`` in every call, then scores."""

    name = "sleeping"

    def __init__(self, device: torch.device | str = "cpu", seconds: float = 10.0) -> None:
        super().__init__(device)
        self.seconds = seconds

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        time.sleep(self.seconds)
        return _brightness(images)


class FirstCallsFail(Reward):
    """Raises on the first ``failures`` calls of an instance, then scores."""

    name = "first_calls_fail"

    def __init__(self, device: torch.device | str = "cpu", failures: int = 1) -> None:
        super().__init__(device)
        self.failures = failures
        self.calls = 0

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"transient failure {self.calls} of {self.failures}")
        return _brightness(images)


class RaiseOnce(Reward):
    """Raises on the first call in a run (across processes: ``marker`` is created then), then scores."""

    name = "raise_once"

    def __init__(self, device: torch.device | str = "cpu", *, marker: str) -> None:
        super().__init__(device)
        self.marker = Path(marker)

    def first_call(self) -> bool:
        """True only for the first call of all instances sharing ``marker``."""
        try:
            self.marker.touch(exist_ok=False)
        except FileExistsError:
            return False
        return True

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        if self.first_call():
            raise RuntimeError("first call of the run fails")
        return _brightness(images)


class HangOnce(RaiseOnce):
    """Hangs (sleeps 60 s) on the first call in a run, then scores."""

    name = "hang_once"

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        if self.first_call():
            time.sleep(60.0)
        return _brightness(images)
