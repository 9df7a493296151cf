"""What a learner step trains on: candidates that point at their input's condition, split over ranks.

An input's condition crosses the wire once, not once per candidate: each candidate carries the
index of its input (``group``), and a rank's share keeps only the conditions its candidates use.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from rlrestore.policies import Condition


@dataclass
class NFTSamples:
    """The samples of one learner step: N candidates, each pointing at its input's condition."""

    x0: Tensor  # [N, C, h, w] clean latents of the candidates
    group: Tensor  # [N] long: the row of ``condition`` (the input) each candidate belongs to
    condition: Condition  # G conditions, one per input (the policy's condition record)
    r: Tensor  # [N] optimality probabilities in [0, 1] (``rlrestore.nft.group_normalize``)
    valid: Tensor  # [N] bool; invalid candidates never enter the loss
    index: Tensor | None = None  # [N] global sample ids seeding noise and timesteps

    def __post_init__(self) -> None:
        n = self.x0.shape[0]
        if self.x0.ndim != 4:
            raise ValueError(f"x0 must be [N, C, h, w], got {tuple(self.x0.shape)}")
        for name in ("group", "r", "valid", "index"):
            value = getattr(self, name)
            if value is not None and value.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), one value per candidate; got {tuple(value.shape)}")
        if n and (int(self.group.min()) < 0 or int(self.group.max()) >= len(self.condition)):
            raise ValueError(f"group indices must lie in [0, {len(self.condition)}), the conditions given")

    def __len__(self) -> int:
        return self.x0.shape[0]

    def share(self, rows: slice) -> NFTSamples:
        """The candidates ``rows`` with only the conditions they use (group indices renumbered)."""
        group = self.group[rows]
        used, renumbered = torch.unique(group, return_inverse=True)
        index = None if self.index is None else self.index[rows]
        return NFTSamples(
            self.x0[rows], renumbered.reshape(-1), self.condition.select(used), self.r[rows], self.valid[rows], index
        )



def split_samples(samples: NFTSamples, world_size: int) -> list[NFTSamples]:
    """Contiguous near-equal shares, one per rank (sizes differ by at most one; the first
    ``N % world_size`` ranks get the extra sample), each with only the conditions its candidates
    use. Nothing is dropped or padded: the learners weight the loss by the step's global sample
    count, and each sample keeps its global ``index``."""
    n = len(samples)
    if samples.index is None:
        samples = replace(samples, index=torch.arange(n))
    sizes = [len(part) for part in torch.tensor_split(torch.arange(n), world_size)]
    edges = [0, *itertools.accumulate(sizes)]
    return [samples.share(slice(edges[rank], edges[rank + 1])) for rank in range(world_size)]


