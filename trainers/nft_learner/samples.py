"""What a learner step trains on: candidates that point at their input's condition, split over ranks.

An input's condition crosses the wire once, not once per candidate: each candidate carries the
index of its input (``group``), and a rank's share keeps only the conditions its candidates use.

On Ray the driver never holds the latents or the conditions: it sends each rank a
:class:`StepShare` (references to the rollout parts its candidates lie in, which the rank
fetches, plus each candidate's r, validity and global index) made by :meth:`StepSamples.shares`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from rlrestore.policies import Condition
from rlrestore.runtime.dataplane import LearnerInputs, resolve


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
                raise ValueError(
                    f"{name} must have shape ({n},), one value per candidate; got {tuple(value.shape)}"
                )
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
            self.x0[rows],
            renumbered.reshape(-1),
            self.condition.select(used),
            self.r[rows],
            self.valid[rows],
            index,
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


@dataclass
class StepShare:
    """One rank's candidates of a step: rows ``start:stop`` of the concatenated candidates of the
    rollout ``parts`` (``LearnerInputs`` or references to them), with their r, validity and
    global index."""

    parts: list[Any]
    start: int
    stop: int
    r: Tensor
    valid: Tensor
    index: Tensor

    def samples(self) -> NFTSamples:
        """The share as :class:`NFTSamples` (fetching the parts it references)."""
        inputs: list[LearnerInputs] = [resolve(part) for part in self.parts]
        x0 = torch.cat([part.x0.flatten(0, 1) for part in inputs])
        groups, offset = [], 0
        for part in inputs:
            batch, k = part.x0.shape[:2]
            groups.append(torch.arange(offset, offset + batch).repeat_interleave(k))
            offset += batch
        condition = type(inputs[0].condition).cat([part.condition for part in inputs])
        group = torch.cat(groups)[self.start : self.stop]
        used, renumbered = torch.unique(group, return_inverse=True)
        return NFTSamples(
            x0[self.start : self.stop],
            renumbered.reshape(-1),
            condition.select(used),
            self.r,
            self.valid,
            self.index,
        )


@dataclass
class StepSamples:
    """A step's learner batch by reference: the rollout parts holding the candidates' x0 and the
    inputs' conditions (``LearnerInputs`` or references), the candidates of each part, and every
    candidate's r and validity (in part order)."""

    parts: list[Any]
    sizes: Sequence[int]
    r: Tensor
    valid: Tensor

    def __post_init__(self) -> None:
        total = sum(self.sizes)
        if len(self.parts) != len(self.sizes) or self.r.shape != (total,) or self.valid.shape != (total,):
            raise ValueError(
                f"StepSamples: {len(self.parts)} parts, {len(self.sizes)} sizes ({total} candidates), "
                f"r {tuple(self.r.shape)}, valid {tuple(self.valid.shape)}"
            )

    def shares(self, world_size: int) -> list[StepShare]:
        """Contiguous near-equal shares, one per rank, as :func:`split_samples` splits (each
        referencing only the parts its rows lie in)."""
        n = len(self.r)
        sizes = [len(part) for part in torch.tensor_split(torch.arange(n), world_size)]
        edges = [0, *itertools.accumulate(sizes)]
        starts = [0, *itertools.accumulate(self.sizes)]
        shares = []
        for low, high in itertools.pairwise(edges):
            used = (
                [i for i in range(len(self.parts)) if starts[i] < high and starts[i + 1] > low]
                if high > low
                else []
            )
            first = starts[used[0]] if used else 0
            shares.append(
                StepShare(
                    [self.parts[i] for i in used],
                    low - first,
                    high - first,
                    self.r[low:high],
                    self.valid[low:high],
                    torch.arange(low, high),
                )
            )
        return shares

    def local(self) -> NFTSamples:
        """All candidates as one :class:`NFTSamples` (a single learner in this process)."""
        return self.shares(1)[0].samples()
