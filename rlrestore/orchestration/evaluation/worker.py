"""The eval worker: restores a chunk of inputs with one checkpoint and scores every restoration.

The row ``inputs.INPUT_MODEL`` (``input``) is the degraded input itself, the baseline every restoration
paper reports: its "restoration" is the LQ image (upsampled to the ground truth's size if it
differs), scored once by the same metrics and repeated for every seed.

A plain class (the in-process path) that ``evaluation.run`` wraps as a Ray actor for the parallel
one. The policy runs in the compute dtype of ``precision``; the metrics always compute in float32,
so numbers stay comparable across precisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rewards import RewardBatch, build_reward
from rlrestore.config import EvalConfig, SamplerConfig
from rlrestore.data import to_tensor
from rlrestore.orchestration.evaluation.metrics import Metric
from rlrestore.policies import RestorationPolicy
from rlrestore.policies.blend import load_dialled_policy
from rlrestore.restore import restore_arrays
from rlrestore.runtime.devices import DeviceName, DeviceRecord, actor_device, local_device
from rlrestore.runtime.precision import Precision, PrecisionName


@dataclass
class ChunkTask:
    """One checkpoint's restorations and scores of ``eval.chunk_size`` inputs (``policy_dir`` None:
    the degraded input itself, the ``input`` row)."""

    model: str
    policy_dir: str | None
    index: int
    ids: list[str]
    captions: list[str]
    lq: list[np.ndarray]
    gt: list[np.ndarray] | None
    base_dir: str | None = None  # F of the fidelity-quality dial, with quality < 1
    quality: float = 1.0  # the dial s: weights F + s (Q - F)


@dataclass
class ChunkResult:
    """Rows (model, image, seed, metric values), the restorations by file stem, and scoring notes."""

    model: str
    index: int
    rows: list[dict[str, Any]]
    restored: dict[str, np.ndarray]
    notes: list[dict[str, Any]]


def restored_stem(image_id: str, seed: int) -> str:
    """File stem of the restoration of ``image_id`` under ``seed``."""
    return f"{image_id}_s{seed}"


class EvalWorker:
    """Restores and scores chunks: a plain class (in-process path), wrapped as a Ray actor for the parallel one.

    Holds the per-image rewards (built once) and one policy at a time (chunks come model by model).
    ``device`` is the config's request (auto | cpu | cuda); ``num_gpus`` what the Ray actor
    reserved (``eval.actors.num_gpus``), None in this process. ``precision``: the policy's inference
    dtype (the metrics stay float32).
    """

    def __init__(
        self,
        metrics: list[Metric],
        sampler: SamplerConfig,
        config: EvalConfig,
        device: DeviceName,
        precision: PrecisionName = "fp32",
        num_gpus: float | None = None,
        threads: int | None = None,
    ) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        if num_gpus is None:
            self.device = local_device(device)
        else:
            self.device = actor_device(device, num_gpus, "eval actors", "eval.actors.num_gpus")
        self.precision = Precision(precision)
        self.metrics = [metric for metric in metrics if metric.reward is not None]
        self.rewards = {metric.key: build_reward(metric.reward, self.device) for metric in self.metrics}
        self.sampler = sampler
        self.config = config
        self.seeds = [config.seed + k for k in range(config.samples)]
        self._policy: tuple[tuple[str, str | None, float], RestorationPolicy] | None = None

    def policy(self, policy_dir: str, base_dir: str | None = None, quality: float = 1.0) -> RestorationPolicy:
        """The policy of ``policy_dir`` (dialled to ``quality`` towards ``base_dir``), loaded when it
        differs from the one held."""
        key = (policy_dir, base_dir, quality)
        if self._policy is None or self._policy[0] != key:
            self._policy = None  # free the previous checkpoint first
            policy = self.precision.for_inference(load_dialled_policy(policy_dir, base_dir, quality))
            self._policy = (key, policy.to(self.device).eval())
        return self._policy[1]

    def device_record(self, actor: str) -> DeviceRecord:
        """Where this worker restores and scores, and in what dtype (for ``devices.json``)."""
        return DeviceRecord.here(
            "eval", "eval", actor, self.device, self.precision.name, self.precision.compute_dtype
        )

    @torch.no_grad()
    def run(self, task: ChunkTask) -> ChunkResult:
        """Restore every input of ``task`` under every seed (the ``input`` row: the LQ image once),
        then score each restoration."""
        if task.policy_dir is None:
            restored, per_input = [_as_output(lq, gt) for lq, gt in zip(task.lq, task.gt or task.lq)], 1
        else:
            restored, per_input = self.restore(task), len(self.seeds)
        rows = [
            {"model": task.model, "image": image_id, "seed": seed}
            for image_id in task.ids
            for seed in self.seeds
        ]
        clean = None if task.gt is None else [image for image in task.gt for _ in range(per_input)]
        captions = [caption for caption in task.captions for _ in range(per_input)]
        notes: list[dict[str, Any]] = []
        repeat = len(self.seeds) // per_input  # the input row: one score, the same for every seed
        for metric in self.metrics:
            values = np.repeat(self.score(metric, restored, clean, captions, notes), repeat)
            for row, value in zip(rows, values, strict=True):
                row[metric.key] = float(value)
        for note in notes:
            note["images"] *= repeat
        images = {
            restored_stem(row["image"], row["seed"]): restored[index // repeat] for index, row in enumerate(rows)
        }
        return ChunkResult(task.model, task.index, rows, images, notes)

    def restore(self, task: ChunkTask) -> list[np.ndarray]:
        """Restorations of ``task``'s inputs under every seed, input-major, seed-minor."""
        policy = self.policy(task.policy_dir, task.base_dir, task.quality)
        # eval.noise_seed: every restoration starts from the same noise (a deterministic sampler).
        noise = self.seeds if self.config.noise_seed is None else [self.config.noise_seed] * len(self.seeds)
        restored: list[np.ndarray] = []
        for start in range(0, len(task.ids), self.config.batch_size):
            stop = start + self.config.batch_size
            lq = task.lq[start:stop]
            batch = restore_arrays(
                policy, lq, task.captions[start:stop], torch.tensor([noise] * len(lq)), self.sampler
            )
            restored.extend(image for per_input in batch for image in per_input)
        return restored

    def score(
        self,
        metric: Metric,
        images: list[np.ndarray],
        clean: list[np.ndarray] | None,
        captions: list[str],
        notes: list[dict[str, Any]],
    ) -> np.ndarray:
        """Raw values of ``metric`` per image (NaN where it could not score; each such case noted).

        Images are scored in batches of one size (inputs of a real set differ), at most as many
        per call as one restore call makes.
        """
        values = np.full(len(images), np.nan)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(index)
        step = self.config.batch_size * len(self.seeds)

        def note(reason: str, count: int) -> None:
            notes.append({"metric": metric.key, "reason": reason, "images": count})

        for shape, indices in by_shape.items():
            side = min(shape[:2])
            small = side < metric.min_size
            if small and not self.config.upscale_small:
                note(
                    f"smaller than its minimum side of {metric.min_size} px; not scored (eval.upscale_small=false)",
                    len(indices),
                )
                continue
            if small:
                note(
                    f"upscaled (bicubic, GT alike) from {side} px to its minimum side of {metric.min_size} px",
                    len(indices),
                )
            for start in range(0, len(indices), step):
                part = indices[start : start + step]
                restored = torch.stack([to_tensor(images[i]) for i in part])
                reference = None
                if metric.needs_gt:
                    reference = torch.stack([to_tensor(clean[i]) for i in part])
                if small:
                    restored = _upscale(restored, metric.min_size)
                    reference = None if reference is None else _upscale(reference, metric.min_size)
                try:
                    scores = self.rewards[metric.key](
                        restored, RewardBatch([captions[i] for i in part], reference)
                    )
                except Exception as exc:  # noqa: BLE001 - a failing reward costs its values, not the evaluation
                    note(f"scoring failed ({type(exc).__name__}: {exc})", len(part))
                    continue
                scored = metric.values(scores).double().numpy()
                if not np.isfinite(scored).all():
                    note("non-finite score", int((~np.isfinite(scored)).sum()))
                values[part] = scored
        return values


def _as_output(lq: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The degraded input as an output image: ``lq``, bicubic-resized to ``reference``'s size if it differs."""
    if lq.shape[:2] == reference.shape[:2]:
        return lq
    height, width = reference.shape[:2]
    return np.asarray(Image.fromarray(lq).resize((width, height), Image.Resampling.BICUBIC))


def _upscale(images: torch.Tensor, side: int) -> torch.Tensor:
    """Bicubic upscale so the shorter side is ``side`` (aspect kept), clamped to [-1, 1]."""
    height, width = images.shape[-2:]
    scale = side / min(height, width)
    size = (max(side, round(height * scale)), max(side, round(width * scale)))
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False).clamp(-1.0, 1.0)
