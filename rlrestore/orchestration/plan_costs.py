"""The arithmetic of ``rlrestore plan``: bytes of training state, bytes on each Stage 2 link, seconds.

Pure functions of numbers (no models, no torch), so a test can redo every figure by hand.

Training state per rank (the ZeRO paper's model, Rajbhandari et al. 2020): Psi trained and Phi
frozen parameters; module weights in the compute dtype (4 bytes under ``fp32``, 2 under
``bf16-mixed`` / ``fp16-mixed``), gradients of the trained ones in the same dtype, AdamW's two
float32 moments plus, under mixed precision, float32 master weights. ZeRO-1 splits the optimizer
state over the ranks, ZeRO-2 the gradients too, ZeRO-3 the weights as well.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

COMPUTE_BYTES = {"fp32": 4, "bf16-mixed": 2, "fp16-mixed": 2}
ADAM_MOMENT_BYTES = 8  # exp_avg + exp_avg_sq, float32
MASTER_BYTES = 4  # float32 master weights of a mixed-precision optimizer
_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*(/s)?\s*$", re.IGNORECASE)


def parse_bytes(text: str, what: str = "size") -> int:
    """``'80GiB'``, ``'12.5GB/s'``, ``'1e9'`` -> bytes; anything else raises naming the value."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"{what} {text!r} is not a byte size: write a number with an optional unit "
            f"({', '.join(u for u in ('B', 'KB', 'MB', 'GB', 'TB', 'KiB', 'MiB', 'GiB', 'TiB'))}), e.g. 80GiB"
        )
    value = float(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise ValueError(f"{what} {text!r} must be positive")
    return int(value)


@dataclass(frozen=True)
class StateBytes:
    """Bytes one rank holds for training: weights, gradients, optimizer state."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def deepspeed_state(trained: int, frozen: int, precision: str, zero_stage: int, ranks: int) -> StateBytes:
    """A DeepSpeed rank's state (``stage2.learner``): weights and gradients in the compute dtype,
    AdamW moments (+ float32 masters under mixed precision), split over ``ranks`` per ZeRO stage."""
    if zero_stage not in (0, 1, 2, 3) or ranks < 1:
        raise ValueError(f"need a ZeRO stage in 0-3 and ranks >= 1; got {zero_stage=}, {ranks=}")
    weight = COMPUTE_BYTES[precision]
    optimizer_per_param = ADAM_MOMENT_BYTES + (MASTER_BYTES if precision != "fp32" else 0)
    params = (trained + frozen) * weight
    grads = trained * weight
    optimizer = trained * optimizer_per_param
    return StateBytes(
        params=math.ceil(params / ranks) if zero_stage >= 3 else params,
        grads=math.ceil(grads / ranks) if zero_stage >= 2 else grads,
        optimizer=math.ceil(optimizer / ranks) if zero_stage >= 1 else optimizer,
    )


def ddp_state(trained: int, frozen: int) -> StateBytes:
    """A Stage 1 DDP worker's state: float32 weights (AdamW's masters: autocast computes in the
    compute dtype), float32 gradients plus DDP's bucket copy of them, AdamW's moments; nothing split."""
    return StateBytes(params=(trained + frozen) * 4, grads=trained * 4 * 2, optimizer=trained * ADAM_MOMENT_BYTES)


def conditions_per_rank(inputs: int, candidates: int, ranks: int) -> list[int]:
    """Inputs whose candidates each learner rank trains on: candidates are split into contiguous
    near-equal shares (``trainers.nft_learner.split_samples``), a share touching each input once."""
    total = inputs * candidates
    return [len(parts_touched([candidates] * inputs, low, high)) for low, high in rank_bounds(total, ranks)]


def rank_bounds(total: int, ranks: int) -> list[tuple[int, int]]:
    """[low, high) of each learner rank's share: ``torch.tensor_split`` sizes (the first
    ``total % ranks`` ranks take one more)."""
    base, extra = divmod(total, ranks)
    bounds, low = [], 0
    for rank in range(ranks):
        high = low + base + (1 if rank < extra else 0)
        bounds.append((low, high))
        low = high
    return bounds


def actor_bounds(total: int, actors: int) -> list[tuple[int, int]]:
    """[low, high) of each reward actor of a group: ``np.linspace(0, total, actors + 1)`` truncated,
    as ``rewards.RewardActorPool`` splits a step's candidates."""
    step = total / actors
    edges = [int(i * step) for i in range(actors)] + [total]
    return list(itertools.pairwise(edges))


def parts_touched(part_sizes: list[int], low: int, high: int) -> list[int]:
    """Indices of the parts (rollout calls, ``part_sizes`` candidates each) that rows [low, high) lie in."""
    touched, start = [], 0
    for index, size in enumerate(part_sizes):
        if min(high, start + size) > max(low, start):
            touched.append(index)
        start += size
    return touched


@dataclass(frozen=True)
class StepShapes:
    """What one Stage 2 step moves, in the shapes and dtypes of the data plane."""

    inputs: int  # degraded inputs (groups) per step
    candidates: int  # K
    call_inputs: int  # inputs per rollout call (``stage2.rollout.batch_size``): one part each
    image_side: int  # R: images are uint8 [3, R, R]
    latent_bytes: int  # one clean latent x0 (float32)
    condition_bytes: int  # one input's condition, all its tensors
    reward_actors: tuple[int, ...]  # actors of each reward-actor group (each group scores every candidate)
    reward_components: int  # scores per candidate returned to the driver
    rollout_actors: int
    learner_ranks: int
    sync_bytes: int  # one weight version as synced (adapters, or the trained weights in the rollout dtype)


@dataclass(frozen=True)
class LinkBytes:
    """Bytes per step on each link (payload bytes as ``rlrestore.runtime.dataplane.payload_bytes``
    counts them; Ray's own serialisation not counted)."""

    rollout_to_reward: int
    rollout_to_learner: int
    sync_put: int  # one version into the object store (once per version): ``sync/bytes``
    sync_pull: int  # every rollout actor fetching it
    driver_in: int  # estimate: scores, each call's metadata, each rank's metrics (see driver_in_bytes)
    driver_out: int  # references only: no payload bytes counted


def link_bytes(shapes: StepShapes) -> LinkBytes:
    """The bytes of every Stage 2 link per step on the data plane (``rlrestore.runtime.dataplane``).

    A rollout call of b inputs leaves a reward part (b x K candidates, b clean and b degraded faces,
    uint8 [3, R, R]) and a learner part (b x K float32 x0, b conditions). Every reward-actor group
    scores every candidate, split evenly over its actors; each actor, and each learner rank (its
    contiguous share of the candidates), fetches the whole parts its rows lie in. A weight version is
    put once and pulled by every rollout actor; the driver receives scores and ids.
    """
    s = shapes
    n, image = s.inputs * s.candidates, 3 * s.image_side * s.image_side
    calls = [min(s.call_inputs, s.inputs - start) for start in range(0, s.inputs, s.call_inputs)]
    sizes = [b * s.candidates for b in calls]
    reward_part = [b * s.candidates * image + 2 * b * image for b in calls]
    learner_part = [b * s.candidates * s.latent_bytes + b * s.condition_bytes for b in calls]

    def fetched(part_bytes: list[int], bounds: list[tuple[int, int]]) -> int:
        return sum(part_bytes[i] for low, high in bounds for i in parts_touched(sizes, low, high))

    return LinkBytes(
        rollout_to_reward=sum(fetched(reward_part, actor_bounds(n, actors)) for actors in s.reward_actors),
        rollout_to_learner=fetched(learner_part, rank_bounds(n, s.learner_ranks)),
        sync_put=s.sync_bytes,
        sync_pull=s.rollout_actors * s.sync_bytes,
        driver_in=driver_in_bytes(s, calls),
        driver_out=0,
    )


ID_BYTES = 16
"""Assumed bytes of a sample id and caption in a rollout call's metadata."""
RANK_METRICS_BYTES = 200
"""Bytes of the metrics dict a learner rank returns (about 12 named floats)."""


def driver_in_bytes(s: StepShapes, calls: list[int]) -> int:
    """What the driver receives per step: a float32 score per reward component and candidate, each
    rollout call's metadata (ids, captions, [b, K] int64 seeds, its version and part sizes: 45
    bytes) and each learner rank's metrics. An estimate: ids and captions are assumed short."""
    scores = s.inputs * s.candidates * 4 * s.reward_components
    metadata = sum(b * (ID_BYTES + 8 * s.candidates) + 45 for b in calls)
    return scores + metadata + s.learner_ranks * RANK_METRICS_BYTES


def compute_seconds(flops: float, tflops: float, efficiency: float) -> float:
    """Seconds for ``flops`` at ``efficiency`` x the peak ``tflops`` (TFLOP/s)."""
    return flops / (tflops * 1e12 * efficiency)


def transfer_seconds(nbytes: float, bandwidth: float) -> float:
    """Seconds to move ``nbytes`` at ``bandwidth`` bytes/s."""
    return nbytes / bandwidth


def allreduce_bytes(grad_bytes: int, ranks: int) -> int:
    """Bytes a rank sends in a ring all-reduce of ``grad_bytes`` (2 (n - 1) / n of them)."""
    return 0 if ranks <= 1 else int(2 * (ranks - 1) / ranks * grad_bytes)


def human_bytes(nbytes: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def human_flops(flops: float) -> str:
    """3.2e12 -> '3.20 TFLOP'."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f} FLOP"


def human_count(count: float) -> str:
    """1.6e9 -> '1604.6 M'."""
    return f"{count / 1e6:.1f} M" if count >= 1e5 else f"{count / 1e3:.1f} K"
