"""``rlrestore eval``: restore a test set with one or more checkpoints and score every restoration.

The test set is either synthetic (clean faces degraded with Eq. 16, each seeded by a hash of
``eval.seed`` and its id, as CelebA-Test is made; the clean faces are the ground truth) or a folder
of real low-quality faces (no ground truth, so full-reference metrics are skipped). ``--data`` is
a folder of images (searched recursively) or a directory of Parquet shards from ``data build``
(their captions then reach the policy and the text metrics).

Every per-image metric is a reward of the reward registry (``rewards``), reported as its raw
value (a lower-is-better reward's negation is undone); ``deg`` is the angle in degrees between the
ArcFace embeddings of the ``identity`` reward, ``fid`` is set-level (pyiqa's Inception FID of each
checkpoint's restorations against the clean set or ``--reference``). A metric is skipped, with the
reason in every summary, when its weights are missing (e.g. ``lmd``: facexlib's AWing FAN landmark
weights, ``rewards.landmarks``) or when it needs ground truth on a real set.

Work is split into chunks of ``eval.chunk_size`` inputs per checkpoint, run in this process or on
``eval.actors.num_actors`` Ray actors; a chunk's rows are saved when it completes, so a rerun of the same
command skips finished chunks.

Devices and numerics: an eval actor runs on the GPU Ray assigned it when ``eval.actors.num_gpus`` > 0,
else on the CPU; in-process evaluation uses CUDA when ``device`` is ``cuda`` or ``auto`` with a
GPU present (``rlrestore.devices``). The policy is loaded in float32 and cast to the compute dtype
of ``precision`` (bf16 under bf16-mixed; the sampler state and t stay float32); the metrics always
compute in float32, so numbers stay comparable across precisions. Layout of ``OUT``::

    eval_manifest.json                  settings and checkpoints; a rerun with other settings is refused
    devices.json                        device, node and dtype of each eval worker (rlrestore.devices)
    inputs.json                         every input (id, source, Eq. 16 parameters) and skipped files
    inputs/lq/<id>.png, inputs/gt/<id>.png   what the policy restored, and the ground truth
    restored/<model>/<id>_s<seed>.png   every restoration
    parts/<model>/chunk-00000.parquet   per-image rows of one chunk (written last, atomically)
    per_image.parquet                   model, image, seed, one column per metric (raw values)
    summary.csv, summary.md, summary.json   one row per checkpoint, best per metric marked
    grid.png                            LQ | checkpoints | GT, with two or more checkpoints
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tqdm import tqdm

from rewards import Reward, RewardBatch, RewardError, build_reward, check_reward_args, reward_class
from rlrestore.checkpoints import resolve_policy_dir
from rlrestore.config import ConfigError, EvalConfig, RewardSpec, RunConfig, SamplerConfig
from rlrestore.data import (
    ImageLoadError,
    degrade_seeded,
    iter_image_files,
    load_image,
    read_shards,
    sample_seed,
    save_image,
    square_resize,
    to_tensor,
)
from rlrestore.devices import (
    DeviceName,
    DeviceRecord,
    actor_device,
    check_cluster_gpus,
    check_run_devices,
    local_device,
    write_devices,
)
from rlrestore.plotting import captioned_grid
from rlrestore.policies import RestorationPolicy, load_policy
from rlrestore.precision import Precision, PrecisionName
from rlrestore.restore import restore_arrays

log = logging.getLogger(__name__)

MANIFEST = "eval_manifest.json"
PER_IMAGE = "per_image.parquet"
KEY_COLUMNS = ("model", "image", "seed")
_NOTES_KEY = b"rlrestore.notes"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]*")
_GRID_CELL_MAX = 256
# Table labels and units of the paper's metrics; these names are skipped (not refused) when no
# reward of that name is available.
_KNOWN = {
    "psnr": ("PSNR", "dB"),
    "ssim": ("SSIM", ""),
    "ms_ssim": ("MS-SSIM", ""),
    "lpips": ("LPIPS", ""),
    "fid": ("FID", ""),
    "musiq": ("MUSIQ", ""),
    "clipiqa+": ("CLIPIQA+", ""),
    "maniqa": ("MANIQA", ""),
    "topiq_nr-face": ("topiq_nr-face", ""),
    "niqe": ("NIQE", ""),
    "brisque": ("BRISQUE", ""),
    "piqe": ("PIQE", ""),
    "deg": ("Deg", "°"),
    "lmd": ("LMD", "px"),
    "hpsv2": ("HPSv2", ""),
    "pickscore": ("PickScore", ""),
    "clipscore": ("CLIP score", ""),
}


@dataclass(frozen=True)
class Metric:
    """One evaluated metric: how it is computed (``reward``; None for the set-level FID) and reported."""

    key: str
    label: str
    unit: str
    higher_is_better: bool
    needs_gt: bool
    reward: RewardSpec | None = None
    negate: bool = False  # the reward reports -metric (a lower-is-better metric): undo it
    angle: bool = False  # the reward's cosine is reported as the angle in degrees ("deg")
    min_size: int = 1  # smallest image side the reward can score

    @property
    def heading(self) -> str:
        """Column heading with unit and direction, e.g. ``PSNR (dB) ↑``."""
        unit = f" ({self.unit})" if self.unit else ""
        return f"{self.label}{unit} {'↑' if self.higher_is_better else '↓'}"

    def values(self, scores: torch.Tensor) -> torch.Tensor:
        """Raw metric values from the reward's (higher-is-better) scores."""
        raw = -scores if self.negate else scores
        return torch.rad2deg(torch.arccos(raw.clamp(-1.0, 1.0))) if self.angle else raw


def plan_metrics(
    config: EvalConfig, has_gt: bool, has_reference: bool
) -> tuple[list[Metric], dict[str, str]]:
    """The metrics of ``config.metrics`` that can run here, and the others with the reason each is skipped.

    Raises ``ConfigError`` for a name that is neither a registered reward nor a metric of the paper.
    """
    metrics: list[Metric] = []
    skipped: dict[str, str] = {}
    for key in config.metrics:
        args = config.metric_args.get(key, {})
        label, unit = _KNOWN.get(key, (key, ""))
        if key == "fid":
            if args:
                raise ConfigError(
                    f"eval.metric_args.fid = {args}: FID takes no args (its Inception weights are read from "
                    "pyiqa's cache, see the skip reason when they are missing)"
                )
            weights = fid_weights()
            if not (has_gt or has_reference):
                skipped[key] = (
                    "set-level metric against clean faces: a real set has none; pass --reference DIR "
                    "(e.g. FFHQ faces)"
                )
            elif not weights.present():
                skipped[key] = f"weights missing: {weights.instructions()}"
            else:
                metrics.append(Metric(key, label, unit, higher_is_better=False, needs_gt=False))
            continue
        reward_name = "identity" if key == "deg" else key
        try:
            cls = reward_class(reward_name)
        except RewardError as exc:
            if key not in _KNOWN:
                raise ConfigError(f"eval.metrics: {exc}") from None
            skipped[key] = f"not available here: {exc}"
            continue
        if cls.needs_clean and not has_gt:
            skipped[key] = (
                "full-reference metric (compares with the clean face); a real set has no ground truth"
            )
            continue
        try:
            missing = cls.missing_weights(**args)
        except TypeError as exc:
            raise ConfigError(f"eval.metric_args.{key} = {args}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - e.g. an optional package missing: the metric cannot run
            skipped[key] = f"cannot check its weights ({type(exc).__name__}: {exc})"
            continue
        if missing:
            skipped[key] = "weights missing: " + "; ".join(missing)
            continue
        try:
            check_reward_args(RewardSpec(name=reward_name, args=args))
        except RewardError as exc:
            raise ConfigError(f"eval.metric_args.{key}: {exc}") from None
        metrics.append(
            Metric(
                key,
                label,
                unit,
                higher_is_better=cls.higher_is_better and key != "deg",
                needs_gt=cls.needs_clean,
                reward=RewardSpec(name=reward_name, args=args),
                negate=not cls.higher_is_better,
                angle=key == "deg",
                min_size=_min_size(cls),
            )
        )
    return metrics, skipped


def _min_size(cls: type[Reward]) -> int:
    """The smallest image side a pyiqa-based reward declares in its ``metric_spec`` (1 otherwise)."""
    return int(getattr(getattr(cls, "metric_spec", None), "min_size", 1))


def fid_weights() -> Any:
    """The Inception-v3 file pyiqa's ``fid`` reads (a ``rewards.iqa.WeightFile``)."""
    from pyiqa.archs.inception import FID_WEIGHTS_URL
    from pyiqa.utils.download_util import DEFAULT_CACHE_DIR

    from rewards.iqa import WeightFile

    name = Path(urlparse(FID_WEIGHTS_URL).path).name
    return WeightFile(
        "FID Inception-v3 (pt_inception-2015-12-05)", FID_WEIGHTS_URL, Path(DEFAULT_CACHE_DIR) / name
    )


def frechet_inception_distance(images: Path, reference: Path, device: torch.device) -> float:
    """pyiqa's clean-FID (Inception-v3 pool features, Fréchet distance) between two image folders."""
    import pyiqa

    metric = pyiqa.create_metric("fid", device=device)
    return float(metric(str(images), str(reference), mode="clean", num_workers=0, verbose=False))


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class EvalInputs:
    """The prepared test set: ids in order, their captions, where the LQ (and GT) PNGs are."""

    ids: list[str]
    captions: dict[str, str]
    lq_dir: Path
    gt_dir: Path | None
    skipped: list[dict[str, str]]


def prepare_inputs(data: Path, out: Path, real: bool, config: RunConfig, progress: bool = True) -> EvalInputs:
    """Read the test set once and write what is restored to ``OUT/inputs`` (existing files are kept).

    Each image is first centre-cropped and resized to ``eval.resolution`` (unless null).
    Synthetic: each clean face is degraded with Eq. 16 (``config.degradation``), seeded by
    ``sample_seed(eval.seed, id, 0)``. Real: the images are the inputs. Unreadable files are
    skipped and listed; an empty or missing ``data`` is an error.
    """
    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data} does not exist or is not a directory")
    lq_dir, gt_dir = out / "inputs" / "lq", None if real else out / "inputs" / "gt"
    sources, skipped = _read_sources(data), []
    ids: list[str] = []
    captions: dict[str, str] = {}
    records: list[dict[str, Any]] = []
    for sample_id, source, caption, read in tqdm(sources, desc="inputs", disable=not progress):
        try:
            image = read()
        except ImageLoadError as exc:
            skipped.append({"path": source, "reason": exc.reason})  # unreadable: reported, not fatal
            continue
        record: dict[str, Any] = {"id": sample_id, "source": source, "size": [image.shape[1], image.shape[0]]}
        if config.eval.resolution is not None:
            image = square_resize(image, config.eval.resolution)
            record["resized_to"] = config.eval.resolution
        lq = image
        if gt_dir is not None:
            seed = sample_seed(config.eval.seed, sample_id, 0)
            lq, params = degrade_seeded(image, config.degradation, seed)
            record.update(degradation_seed=seed, degradation=vars(params))
            _save_once(image, gt_dir / f"{sample_id}.png")
        _save_once(lq, lq_dir / f"{sample_id}.png")
        ids.append(sample_id)
        captions[sample_id] = caption
        records.append(record)
    if not ids:
        reasons = "; ".join(f"{item['path']}: {item['reason']}" for item in skipped[:3])
        raise FileNotFoundError(
            f"--data {data} holds no readable image ({len(skipped)} file(s) skipped{': ' + reasons if reasons else ''})"
        )
    payload = {
        "data": str(data.resolve()),
        "kind": "real" if real else "synthetic",
        "inputs": records,
        "skipped": skipped,
    }
    (out / "inputs.json").write_text(json.dumps(payload, indent=2) + "\n")
    return EvalInputs(ids, captions, lq_dir, gt_dir, skipped)


Source = tuple[str, str, str, Callable[[], np.ndarray]]  # id, source, caption, reader


def _read_sources(data: Path) -> list[Source]:
    """(id, source, caption, reader) of every input: the records of Parquet shards, or image files
    (id: the path relative to ``data`` without suffix, or with it when two files share a stem)."""
    if any(data.glob("shard-*.parquet")):
        return [
            (record.id, f"{data}#{record.id}", record.caption or "", lambda image=record.image: image)
            for record in read_shards(data)
        ]
    files = iter_image_files(data)
    stems = Counter(path.relative_to(data).with_suffix("").as_posix() for path in files)
    sources: list[Source] = []
    for path in files:
        stem = path.relative_to(data).with_suffix("").as_posix()
        sample_id = stem if stems[stem] == 1 else path.relative_to(data).as_posix()
        sources.append((sample_id, str(path), "", lambda path=path: load_image(path)))
    return sources


def _save_once(image: np.ndarray, path: Path) -> None:
    """Write ``path`` unless it exists, through a temporary file (a kill leaves no half-written PNG)."""
    if not path.is_file():
        temporary = save_image(image, path.with_name(f".{path.stem}.tmp-{os.getpid()}.png"))
        os.replace(temporary, path)


# ----------------------------------------------------------------------------------- checkpoints
def parse_checkpoints(specs: Sequence[str]) -> dict[str, Path]:
    """``[NAME=]PATH`` specs -> model name -> policy directory (run, checkpoint or policy dirs).

    Without a name, a checkpoint ``.../checkpoints/<stage>/step_N`` is named ``<stage>-N``.
    """
    if not specs:
        raise ValueError("give at least one --ckpt")
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not (sep and _MODEL_NAME.fullmatch(name)):
            name, path = "", spec
        policy_dir = resolve_policy_dir(path).resolve()
        name = name or _default_name(policy_dir)
        if name in models:
            raise ValueError(f"--ckpt {spec}: the model name {name!r} is taken; name each one with NAME=PATH")
        models[name] = policy_dir
    return models


def _default_name(policy_dir: Path) -> str:
    checkpoint = policy_dir.parent if policy_dir.name == "policy" else policy_dir
    match = re.fullmatch(r"step_0*(\d+)", checkpoint.name)
    if match and checkpoint.parent.parent.name == "checkpoints":
        return f"{checkpoint.parent.name}-{match.group(1)}"
    return checkpoint.name


# ----------------------------------------------------------------------------------------- chunks
@dataclass
class ChunkTask:
    """One checkpoint's restorations and scores of ``eval.chunk_size`` inputs."""

    model: str
    policy_dir: str
    index: int
    ids: list[str]
    captions: list[str]
    lq: list[np.ndarray]
    gt: list[np.ndarray] | None


@dataclass
class ChunkResult:
    """Rows (model, image, seed, metric values), the restorations by file stem, and scoring notes."""

    model: str
    index: int
    rows: list[dict[str, Any]]
    restored: dict[str, np.ndarray]
    notes: list[dict[str, Any]]


def restored_stem(image_id: str, seed: int) -> str:
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
        self._policy: tuple[str, RestorationPolicy] | None = None

    def policy(self, policy_dir: str) -> RestorationPolicy:
        """The policy of ``policy_dir``, loaded when it differs from the one held."""
        if self._policy is None or self._policy[0] != policy_dir:
            self._policy = None  # free the previous checkpoint first
            policy = self.precision.for_inference(load_policy(policy_dir))
            self._policy = (policy_dir, policy.to(self.device).eval())
        return self._policy[1]

    def device_record(self, actor: str) -> DeviceRecord:
        """Where this worker restores and scores, and in what dtype (for ``devices.json``)."""
        return DeviceRecord.here("eval", "eval", actor, self.device, self.precision.name, self.precision.compute_dtype)

    @torch.no_grad()
    def run(self, task: ChunkTask) -> ChunkResult:
        """Restore every input of ``task`` under every seed, then score each restoration."""
        policy = self.policy(task.policy_dir)
        # eval.noise_seed: every restoration starts from the same noise (a deterministic sampler).
        noise = self.seeds if self.config.noise_seed is None else [self.config.noise_seed] * len(self.seeds)
        restored: list[np.ndarray] = []  # input-major, seed-minor
        for start in range(0, len(task.ids), self.config.batch_size):
            stop = start + self.config.batch_size
            lq = task.lq[start:stop]
            batch = restore_arrays(
                policy, lq, task.captions[start:stop], torch.tensor([noise] * len(lq)), self.sampler
            )
            restored.extend(image for per_input in batch for image in per_input)
        count = len(self.seeds)
        rows = [
            {"model": task.model, "image": image_id, "seed": seed}
            for image_id in task.ids
            for seed in self.seeds
        ]
        clean = None if task.gt is None else [image for image in task.gt for _ in range(count)]
        captions = [caption for caption in task.captions for _ in range(count)]
        notes: list[dict[str, Any]] = []
        for metric in self.metrics:
            values = self.score(metric, restored, clean, captions, notes)
            for row, value in zip(rows, values, strict=True):
                row[metric.key] = float(value)
        images = {
            restored_stem(row["image"], row["seed"]): image for row, image in zip(rows, restored, strict=True)
        }
        return ChunkResult(task.model, task.index, rows, images, notes)

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


def _upscale(images: torch.Tensor, side: int) -> torch.Tensor:
    """Bicubic upscale so the shorter side is ``side`` (aspect kept), clamped to [-1, 1]."""
    height, width = images.shape[-2:]
    scale = side / min(height, width)
    size = (max(side, round(height * scale)), max(side, round(width * scale)))
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False).clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------------------- driver
@dataclass
class EvalReport:
    """What an evaluation computed and wrote (see the module docstring for the files)."""

    out: Path
    kind: str
    models: dict[str, str]
    metrics: list[Metric]
    skipped_metrics: dict[str, str]
    skipped_inputs: list[dict[str, str]]
    notes: list[dict[str, Any]]
    per_image: pd.DataFrame
    summary: pd.DataFrame
    best: dict[str, list[str]]
    computed: list[tuple[str, int]]
    reused: list[tuple[str, int]]
    grid: Path | None

    def markdown(self) -> str:
        """The summary table (best per metric in bold, ↑/↓ directions), then what was skipped and why."""
        inputs = int(self.summary["images"].max())
        samples = int(self.summary["restorations"].max()) // max(inputs, 1)
        lines = [
            f"# Evaluation: {self.kind} set, {inputs} input(s) x {samples} restoration(s) per checkpoint",
            "",
            "| model | images | " + " | ".join(metric.heading for metric in self.metrics) + " |",
            "|---|---:|" + "---:|" * len(self.metrics),
        ]
        for row in self.summary.to_dict("records"):
            cells = []
            for metric in self.metrics:
                text = format_value(row[metric.key])
                cells.append(f"**{text}**" if row["model"] in self.best.get(metric.key, []) else text)
            lines.append(f"| {row['model']} | {row['images']} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Means over every restoration with a finite value (FID: one value per checkpoint, set-level); "
            + "↑ higher is better, ↓ lower is better; best per metric in bold (with two or more checkpoints).",
        ]
        if self.skipped_metrics:
            lines += ["", "## Skipped metrics", ""]
            lines += [f"- `{key}`: {reason}" for key, reason in self.skipped_metrics.items()]
        if self.notes:
            lines += ["", "## Notes", ""]
            lines += [
                f"- {note['model']}, `{note['metric']}`: {note['reason']} ({note['images']} image(s))"
                for note in self.notes
            ]
        if self.skipped_inputs:
            lines += ["", "## Skipped inputs", ""]
            lines += [f"- {item['path']}: {item['reason']}" for item in self.skipped_inputs]
        lines += ["", "Checkpoints: " + ", ".join(f"{name} = {path}" for name, path in self.models.items())]
        return "\n".join(lines) + "\n"


def format_value(value: float) -> str:
    """4 decimals (2 from 100 up), 'n/a' for NaN."""
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}" if abs(value) >= 100 else f"{value:.4f}"


def run_evaluation(
    config: RunConfig,
    checkpoints: Sequence[str],
    data: str | Path,
    out: str | Path,
    *,
    real: bool = False,
    reference: str | Path | None = None,
    progress: bool = True,
) -> EvalReport:
    """Restore ``data`` with every checkpoint (``[NAME=]PATH``), score, summarise; resumes in ``out``.

    ``real``: ``data`` holds real low-quality faces (no ground truth); otherwise clean faces that
    are degraded with Eq. 16. ``reference``: folder of clean faces FID compares against (default:
    the clean set of a synthetic evaluation).
    """
    check_run_devices(config, ["eval"])
    models = parse_checkpoints(checkpoints)
    out = Path(out)
    ev = config.eval
    if reference is not None and not Path(reference).is_dir():
        raise FileNotFoundError(f"--reference {reference} does not exist or is not a directory")
    metrics, skipped_metrics = plan_metrics(ev, has_gt=not real, has_reference=reference is not None)
    per_image_metrics = [metric for metric in metrics if metric.reward is not None]
    settings = _settings(config, Path(data), real, per_image_metrics)
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(out, settings, models)
    inputs = prepare_inputs(Path(data), out, real, config, progress)
    models = _check_manifest(out, {**settings, "inputs": inputs.ids}, models)

    seeds = [ev.seed + k for k in range(ev.samples)]
    chunks = [inputs.ids[start : start + ev.chunk_size] for start in range(0, len(inputs.ids), ev.chunk_size)]
    tasks = [(model, index, ids) for model in models for index, ids in enumerate(chunks)]
    reused = [(model, index) for model, index, ids in tasks if _chunk_done(out, model, index, ids, seeds)]
    pending = [task for task in tasks if (task[0], task[1]) not in reused]
    columns = [metric.key for metric in per_image_metrics]

    load = functools.partial(_load_chunk, inputs, models)
    bar = tqdm(total=len(tasks), initial=len(reused), desc="eval chunks", disable=not progress)
    if pending:
        log.info("eval: %d chunk(s) done earlier, %d to compute", len(reused), len(pending))
        worker_args = (metrics, config.sampler, ev, config.device, config.precision)
        if ev.actors.num_actors == 0:
            worker = EvalWorker(*worker_args)
            write_devices(out, "eval", [worker.device_record("local")])
            for task in pending:
                _save_chunk(out, worker.run(load(task)), columns)
                bar.update(1)
        else:
            _run_on_ray(config, worker_args, pending, load, out, columns, bar)
    bar.close()

    per_image, notes = _merge_parts(out, tasks, columns)
    per_image.to_parquet(out / PER_IMAGE, index=False)
    # FID runs in this process: with eval actors (on other nodes, maybe) on a GPU only if it has one.
    fid_device = local_device("auto" if ev.actors.num_actors > 0 and config.device == "cuda" else config.device)
    set_level = _set_level_metrics(metrics, models, out, inputs, reference, fid_device, notes)
    summary = summarize(per_image, metrics, set_level, list(models))
    best = best_models(summary, metrics)
    grid = _write_grid(out, inputs, list(models), seeds[0], ev.grid_images) if len(models) > 1 else None
    report = EvalReport(
        out=out,
        kind=settings["kind"],
        models={name: str(path) for name, path in models.items()},
        metrics=metrics,
        skipped_metrics=skipped_metrics,
        skipped_inputs=inputs.skipped,
        notes=notes,
        per_image=per_image,
        summary=summary,
        best=best,
        computed=[(model, index) for model, index, _ in pending],
        reused=reused,
        grid=grid,
    )
    _write_summaries(report)
    return report


def _settings(config: RunConfig, data: Path, real: bool, per_image_metrics: list[Metric]) -> dict[str, Any]:
    """What an evaluation's numbers depend on (an ``out`` folder holds one setting)."""
    return {
        "data": str(data.resolve()),
        "kind": "real" if real else "synthetic",
        "degradation": None if real else config.degradation.model_dump(mode="json"),
        "sampler": config.sampler.model_dump(mode="json"),
        "precision": config.precision,
        "eval": config.eval.model_dump(
            include={"seed", "samples", "noise_seed", "batch_size", "chunk_size", "upscale_small"}
        ),
        "metrics": {metric.key: metric.reward.args for metric in per_image_metrics},
    }


def _load_chunk(inputs: EvalInputs, models: dict[str, Path], task: tuple[str, int, list[str]]) -> ChunkTask:
    """What one chunk (checkpoint, index, input ids) of the evaluation restores and scores."""
    model, index, ids = task
    gt = None if inputs.gt_dir is None else [load_image(inputs.gt_dir / f"{i}.png") for i in ids]
    lq = [load_image(inputs.lq_dir / f"{i}.png") for i in ids]
    return ChunkTask(model, str(models[model]), index, ids, [inputs.captions[i] for i in ids], lq, gt)


def _check_manifest(out: Path, settings: dict[str, Any], models: dict[str, Path]) -> dict[str, Path]:
    """Refuse to mix settings in one ``out``; record the settings and checkpoints (models may be added)."""
    path = out / MANIFEST
    settings = json.loads(json.dumps(settings))
    stored = json.loads(path.read_text()) if path.is_file() else {"settings": {}, "models": {}}
    differing = [
        key
        for key, value in settings.items()
        if key in stored["settings"] and stored["settings"][key] != value
    ]
    if differing:
        raise ValueError(
            f"{out} holds an evaluation with other settings ({', '.join(differing)} differ; see {path}): "
            "rerun with the same config, data and metrics to resume, or pass another --out"
        )
    for name, policy_dir in models.items():
        if stored["models"].get(name, str(policy_dir)) != str(policy_dir):
            raise ValueError(
                f"{out}: model {name!r} was evaluated from {stored['models'][name]}, now {policy_dir}; "
                "name it differently (--ckpt NAME=PATH) or pass another --out"
            )
    stored["settings"].update(settings)
    stored["models"].update({name: str(policy_dir) for name, policy_dir in models.items()})
    path.write_text(json.dumps(stored, indent=2) + "\n")
    return models


def _part_path(out: Path, model: str, index: int) -> Path:
    return out / "parts" / model / f"chunk-{index:05d}.parquet"


def _restored_path(out: Path, model: str, image_id: str, seed: int) -> Path:
    return out / "restored" / model / f"{restored_stem(image_id, seed)}.png"


def _chunk_done(out: Path, model: str, index: int, ids: list[str], seeds: list[int]) -> bool:
    """A chunk is done when its part file is complete and all its restorations are on disk."""
    try:
        rows = pq.read_metadata(_part_path(out, model, index)).num_rows
    except (OSError, pa.ArrowException):  # missing, or cut short by a crash or a copy
        return False
    return rows == len(ids) * len(seeds) and all(
        _restored_path(out, model, image_id, seed).is_file() for image_id in ids for seed in seeds
    )


def _save_chunk(out: Path, result: ChunkResult, columns: list[str]) -> None:
    """The restorations, then the part file (atomically), so a part on disk means a finished chunk."""
    for row in result.rows:
        stem = restored_stem(row["image"], row["seed"])
        save_image(result.restored[stem], _restored_path(out, result.model, row["image"], row["seed"]))
    schema = pa.schema(
        [("model", pa.string()), ("image", pa.string()), ("seed", pa.int64())]
        + [(key, pa.float64()) for key in columns]
    )
    table = pa.Table.from_pylist(result.rows, schema=schema)
    table = table.replace_schema_metadata({_NOTES_KEY: json.dumps(result.notes)})
    path = _part_path(out, result.model, result.index)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, temporary)
    os.replace(temporary, path)


def _run_on_ray(
    config: RunConfig,
    worker_args: tuple[Any, ...],
    pending: list[tuple[str, int, list[str]]],
    load: Callable[[tuple[str, int, list[str]]], ChunkTask],
    out: Path,
    columns: list[str],
    bar: tqdm,
) -> None:
    """Run ``pending`` chunks on ``eval.actors.num_actors`` Ray actors, one chunk in flight per actor (its
    images go through the object store), saving each result here as it arrives."""
    import ray

    from rlrestore.jobs import ray_session

    group = config.eval.actors
    with ray_session(config.ray):
        check_cluster_gpus(config, ["eval"])
        actor_class = ray.remote(EvalWorker).options(num_cpus=group.num_cpus, num_gpus=group.num_gpus)
        threads = max(1, int(group.num_cpus))
        actors = [
            actor_class.remote(*worker_args, num_gpus=group.num_gpus, threads=threads)
            for _ in range(min(group.num_actors, len(pending)))
        ]
        queue = deque(pending)
        running: dict[Any, Any] = {}

        def submit(actor: Any) -> None:
            if queue:
                running[actor.run.remote(load(queue.popleft()))] = actor

        try:
            records = ray.get([actor.device_record.remote(f"actor {i}") for i, actor in enumerate(actors)])
            write_devices(out, "eval", records)
            for actor in actors:
                submit(actor)
            while running:
                (ref,), _ = ray.wait(list(running), num_returns=1)
                actor = running.pop(ref)
                _save_chunk(out, ray.get(ref), columns)
                bar.update(1)
                submit(actor)
        finally:
            for actor in actors:
                ray.kill(actor)


def _merge_parts(
    out: Path, tasks: list[tuple[str, int, list[str]]], columns: list[str]
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """All parts in task order as one table, and the scoring notes summed per (model, metric, reason)."""
    frames, counts = [], {}
    for model, index, _ in tasks:
        table = pq.read_table(_part_path(out, model, index))
        frames.append(table.to_pandas())
        for note in json.loads(table.schema.metadata[_NOTES_KEY]):
            key = (model, note["metric"], note["reason"])
            counts[key] = counts.get(key, 0) + note["images"]
    per_image = pd.concat(frames, ignore_index=True)[[*KEY_COLUMNS, *columns]]
    notes = [
        {"model": model, "metric": metric, "reason": reason, "images": images}
        for (model, metric, reason), images in counts.items()
    ]
    return per_image, notes


def _set_level_metrics(
    metrics: list[Metric],
    models: dict[str, Path],
    out: Path,
    inputs: EvalInputs,
    reference: str | Path | None,
    device: torch.device,
    notes: list[dict[str, Any]],
) -> dict[str, dict[str, float]]:
    """FID of each checkpoint's restorations against ``reference`` (default: the clean set)."""
    values: dict[str, dict[str, float]] = {model: {} for model in models}
    if not any(metric.key == "fid" for metric in metrics):
        return values
    against = Path(reference) if reference is not None else inputs.gt_dir
    for model in models:
        try:
            values[model]["fid"] = frechet_inception_distance(out / "restored" / model, against, device)
        except Exception as exc:  # noqa: BLE001 - e.g. an unreadable reference file: reported, not fatal
            values[model]["fid"] = math.nan
            reason = f"FID failed ({type(exc).__name__}: {exc})"
            notes.append({"model": model, "metric": "fid", "reason": reason, "images": len(inputs.ids)})
    return values


def summarize(
    per_image: pd.DataFrame, metrics: list[Metric], set_level: dict[str, dict[str, float]], models: list[str]
) -> pd.DataFrame:
    """One row per model: inputs, restorations, and each metric's mean over finite values (or set-level value)."""
    rows = []
    for model in models:
        part = per_image[per_image["model"] == model]
        row: dict[str, Any] = {"model": model, "images": part["image"].nunique(), "restorations": len(part)}
        for metric in metrics:
            if metric.reward is None:
                row[metric.key] = set_level[model].get(metric.key, math.nan)
            else:
                finite = part[metric.key][np.isfinite(part[metric.key])]
                row[metric.key] = float(finite.mean()) if len(finite) else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "images", "restorations", *(m.key for m in metrics)])


def best_models(summary: pd.DataFrame, metrics: list[Metric]) -> dict[str, list[str]]:
    """Metric key -> the model(s) with the best value (ties share it); empty with fewer than two models."""
    if len(summary) < 2:
        return {}
    best = {}
    for metric in metrics:
        values = summary[metric.key].astype("float64")
        finite = values[np.isfinite(values)]
        if len(finite):
            target = finite.max() if metric.higher_is_better else finite.min()
            best[metric.key] = summary.loc[values == target, "model"].tolist()
    return best


def _write_summaries(report: EvalReport) -> None:
    """summary.csv (columns ``<key>↑``/``<key>↓``; ``best`` lists the metrics where the row is best,
    ';'-separated), summary.md and summary.json."""
    out, metrics = report.out, report.metrics
    table = report.summary.rename(
        columns={metric.key: f"{metric.key}{'↑' if metric.higher_is_better else '↓'}" for metric in metrics}
    )
    table["best"] = [
        ";".join(key for key, models in report.best.items() if model in models)
        for model in report.summary["model"]
    ]
    table.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(report.markdown())
    payload = {
        "kind": report.kind,
        "models": report.models,
        "metrics": [
            {
                "key": metric.key,
                "label": metric.label,
                "unit": metric.unit,
                "higher_is_better": metric.higher_is_better,
                "full_reference": metric.needs_gt,
                "set_level": metric.reward is None,
            }
            for metric in metrics
        ],
        "summary": json.loads(report.summary.to_json(orient="records")),
        "best": report.best,
        "skipped_metrics": report.skipped_metrics,
        "notes": report.notes,
        "skipped_inputs": report.skipped_inputs,
        "per_image": str(out / PER_IMAGE),
        "grid": None if report.grid is None else str(report.grid),
    }
    (out / "summary.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def _write_grid(out: Path, inputs: EvalInputs, models: list[str], seed: int, count: int) -> Path | None:
    """LQ | each model | GT (synthetic sets) for the first ``count`` inputs, captioned, to grid.png."""
    ids = inputs.ids[:count]
    if not ids:
        return None
    rows = []
    for image_id in ids:
        row = [load_image(inputs.lq_dir / f"{image_id}.png")]
        row += [load_image(_restored_path(out, model, image_id, seed)) for model in models]
        if inputs.gt_dir is not None:
            row.append(load_image(inputs.gt_dir / f"{image_id}.png"))
        rows.append(row)
    titles = ["LQ", *(f"{model} (seed {seed})" for model in models)] + (["GT"] if inputs.gt_dir else [])
    cell = min(_GRID_CELL_MAX, max(rows[0][0].shape[:2]))
    return save_image(captioned_grid(rows, titles, ids, cell), out / "grid.png")
