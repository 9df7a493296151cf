"""Training pairs: each stored face gives HQ/LQ tensors at the generation resolution.

Per item: the stored HQ face is resized to ``resolution`` R and degraded at R (Eq. 16) with the
seed ``sample_seed(seed, id, epoch)``. The LQ image is therefore a pure function of
(face, base seed, epoch). The policy resizes both for its SigLIP2 tower itself.

``set_epoch`` changes the degradation of every item; call it before building the epoch's
DataLoader iterator (workers copy the dataset when the iterator starts, so with
``persistent_workers=True`` a later change would not reach them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from rlrestore.config import DegradationConfig
from rlrestore.data.degradation import degrade_seeded
from rlrestore.data.images import square_resize, to_tensor
from rlrestore.data.shards import FaceRecord
from rlrestore.runtime.seeds import sample_seed


class FaceDataset(Dataset):
    """HQ/LQ face pairs; items are dicts ``hq, lq, caption, id, seed``."""

    def __init__(
        self,
        records: Sequence[FaceRecord],
        resolution: int,
        degradation: DegradationConfig,
        seed: int,
        fixed_degradation: bool = False,
    ) -> None:
        if not records:
            raise ValueError("FaceDataset needs at least one face record")
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.records = list(records)
        self.resolution = resolution
        self.degradation = degradation
        self.seed = seed
        self.fixed_degradation = fixed_degradation
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the degradation draw of ``epoch`` for every item (with ``fixed_degradation`` every
        epoch uses the draw of epoch 0)."""
        self.epoch = 0 if self.fixed_degradation else epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str | int]:
        record = self.records[index]
        seed = sample_seed(self.seed, record.id, self.epoch)
        hq = square_resize(record.image, self.resolution)
        lq, _ = degrade_seeded(hq, self.degradation, seed)
        return {
            "hq": to_tensor(hq),
            "lq": to_tensor(lq),
            "caption": record.caption or "",
            "id": record.id,
            "seed": seed,
        }


def collate_faces(items: list[dict[str, torch.Tensor | str | int]]) -> dict[str, torch.Tensor | list]:
    """Stack tensor fields into ``[B, ...]`` batches; other fields (caption, id, seed) become lists."""
    if not items:
        raise ValueError("collate_faces got an empty batch")
    return {
        key: torch.stack([item[key] for item in items])
        if isinstance(items[0][key], torch.Tensor)
        else [item[key] for item in items]
        for key in items[0]
    }
