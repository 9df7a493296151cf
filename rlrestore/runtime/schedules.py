"""Learning-rate schedules (``optim.schedule``, ``optim.warmup_ratio``) of Stage 1 and Stage 2."""

from __future__ import annotations

import math


def lr_lambda(step: int, total: int, warmup_ratio: float, schedule: str) -> float:
    """Linear warm-up over ceil(warmup_ratio * total) steps, then cosine decay to 0 or constant."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
