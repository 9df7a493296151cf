"""``rlrestore restore``: restore face images of any size and mode with a trained policy.

Each input is padded to a square (edge pixels), resized to the policy's resolution, restored, and
resized/cropped back, so the output has the input's size. Unreadable inputs are skipped and
listed in ``restore_report.json`` next to the outputs.

The policy runs in this process on ``device`` (``auto``: CUDA when there is a GPU,
``rlrestore.runtime.devices.local_device``), loaded in float32 and cast to the compute dtype of
``precision`` (default ``fp32``; ``bf16-mixed`` restores with bf16 weights, the sampler state and t
in float32). ``devices.json`` in the output folder records both.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rlrestore.checkpoints import resolve_policy_dir, stage2_base_policy_dir
from rlrestore.config import SamplerConfig
from rlrestore.data.images import ImageLoadError, iter_image_files, load_image, save_image
from rlrestore.policies.blend import check_quality, load_dialled_policy
from rlrestore.restore import restore_arrays
from rlrestore.runtime.devices import DeviceName, DeviceRecord, local_device, write_devices
from rlrestore.runtime.precision import Precision, PrecisionName


@dataclass
class RestoreReport:
    """What a restore call wrote and skipped."""

    checkpoint: str
    quality: float = 1.0
    base: str | None = None
    outputs: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        return f"restored {len(self.outputs)} image(s), skipped {len(self.skipped)} (see restore_report.json)"


def collect_inputs(inputs: list[str | Path]) -> tuple[list[Path], list[dict]]:
    """Image files named directly or found (recursively) in folders; missing paths are reported."""
    files: list[Path] = []
    missing: list[dict] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files.extend(iter_image_files(item))
        elif item.is_file():
            files.append(item)
        else:
            missing.append({"path": str(item), "reason": "no such file or directory"})
    return files, missing


def restore_files(
    checkpoint: str | Path,
    inputs: list[str | Path],
    out_dir: str | Path,
    sampler: SamplerConfig,
    samples: int = 1,
    seed: int = 0,
    batch_size: int = 4,
    progress: bool = True,
    device: DeviceName = "auto",
    precision: PrecisionName = "fp32",
    quality: float = 1.0,
    base: str | Path | None = None,
) -> RestoreReport:
    """Restore every readable input; write ``<stem>.png`` (first candidate) and, with ``samples > 1``,
    ``<stem>_sample<k>.png`` for each candidate, plus ``restore_report.json`` with the seeds and
    ``devices.json`` (device and dtype of the policy).

    ``quality`` s < 1 restores with the Stage 2 weights dialled back towards the Stage 1 policy F,
    F + s (Q - F) (``rlrestore.policies.blend``); F is ``base`` or the run's Stage 1.2 policy.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    quality = check_quality(quality)
    target = local_device(device)
    numerics = Precision(precision)
    policy_dir = resolve_policy_dir(checkpoint)
    base_dir = None if quality == 1.0 else stage2_base_policy_dir(policy_dir, base)
    policy = numerics.for_inference(load_dialled_policy(policy_dir, base_dir, quality)).to(target).eval()
    out_dir = Path(out_dir)
    files, skipped = collect_inputs(inputs)
    inside = [f for f in files if out_dir.resolve() in f.resolve().parents]
    if inside:
        raise ValueError(
            f"--out {out_dir} contains input {inside[0]}: restored images would overwrite or be mixed with "
            "the inputs; choose an output folder outside the inputs"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_devices(
        out_dir, "restore", [DeviceRecord.here("restore", "restore", "local", target, numerics.name, numerics.compute_dtype)]
    )
    report = RestoreReport(
        checkpoint=str(policy_dir), quality=quality, base=None if base_dir is None else str(base_dir), skipped=skipped
    )
    used_names: set[str] = set()
    done = 0  # readable inputs so far: the i-th gets seeds seed + i * samples + k
    for start in tqdm(range(0, len(files), batch_size), desc="restore", disable=not progress):
        # Decoded one batch at a time, so memory does not grow with the number of inputs.
        chunk: list[tuple[Path, np.ndarray]] = []
        for path in files[start : start + batch_size]:
            try:
                chunk.append((path, load_image(path)))
            except ImageLoadError as exc:
                report.skipped.append({"path": str(path), "reason": exc.reason})
        if not chunk:
            continue
        index = torch.arange(done, done + len(chunk))[:, None] * samples + torch.arange(samples)[None, :]
        seeds = seed + index
        done += len(chunk)
        restored = restore_arrays(policy, [image for _, image in chunk], [""] * len(chunk), seeds, sampler)
        for row, ((path, image), candidates) in enumerate(zip(chunk, restored, strict=True)):
            stem = _unique_stem(path, used_names)
            h, w = image.shape[:2]
            written = []
            for k, candidate in enumerate(candidates):
                name = f"{stem}.png" if k == 0 else f"{stem}_sample{k}.png"
                save_image(candidate, out_dir / name)
                written.append({"file": name, "seed": int(seeds[row, k])})
            report.outputs.append({"input": str(path), "size": [w, h], "candidates": written})
    (out_dir / "restore_report.json").write_text(json.dumps(asdict(report), indent=2))
    return report


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 1
    while stem in used:
        n += 1
        stem = f"{path.stem}_{n}"
    used.add(stem)
    return stem
