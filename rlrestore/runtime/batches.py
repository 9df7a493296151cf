"""Which samples a rank uses at a step, as a pure function of (seed, step, rank).

Stage 1 workers and the Stage 2 driver draw their batches here, so a resumed run neither repeats
nor skips data.
"""

from __future__ import annotations

import torch

from rlrestore.runtime.seeds import derived_seed


class EpochBatches:
    """Which samples rank r uses at step s: epoch-wise permutations split across ranks."""

    def __init__(self, num_samples: int, per_rank: int, rank: int, world: int, seed: int) -> None:
        self.steps_per_epoch = (num_samples // world) // per_rank
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{num_samples} training faces cannot fill a batch of {per_rank} on each of {world} workers; "
                "lower the stage's batch_size or add data"
            )
        self.num_samples, self.per_rank, self.rank, self.world, self.seed = num_samples, per_rank, rank, world, seed

    def at(self, step: int) -> tuple[int, list[int]]:
        """(epoch, sample indices) of this rank at ``step``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(derived_seed(self.seed, epoch)))
        mine = order[self.rank :: self.world].tolist()
        return epoch, mine[position * self.per_rank : (position + 1) * self.per_rank]
