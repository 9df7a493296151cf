"""What an evaluation restores: the test set, prepared once under ``OUT/inputs``, and the
checkpoints named on the command line.

A synthetic set is clean faces degraded with Eq. 16, each seeded by ``eval.seed`` and its id (as
CelebA-Test is made; the clean faces are the ground truth); a real set is low-quality faces as
they are (no ground truth). ``--data`` is a folder of images (searched recursively) or a directory
of Parquet shards from ``data build`` (their captions then reach the policy and the text metrics).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from rlrestore.checkpoints import resolve_policy_dir, stage2_base_policy_dir
from rlrestore.config import RunConfig
from rlrestore.data import (
    ImageLoadError,
    degrade_seeded,
    iter_image_files,
    load_image,
    read_shards,
    save_image,
    square_resize,
)
from rlrestore.policies.blend import quality_names
from rlrestore.runtime.seeds import sample_seed

INPUT_MODEL = "input"  # the row of the degraded input itself (no checkpoint); never a checkpoint's name
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]*")


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
        if name == INPUT_MODEL:
            raise ValueError(
                f"--ckpt {spec}: the model name {name!r} is the degraded input's row; name the checkpoint "
                "otherwise with NAME=PATH"
            )
        if name in models:
            raise ValueError(f"--ckpt {spec}: the model name {name!r} is taken; name each one with NAME=PATH")
        models[name] = policy_dir
    return models


@dataclass(frozen=True)
class Dial:
    """A model row of a ``--quality`` sweep: Q's weights dialled to ``quality`` towards F (``base_dir``,
    None at s = 1)."""

    base_dir: Path | None
    quality: float


def dial_models(
    models: dict[str, Path], qualities: Sequence[float], base: str | Path | None
) -> tuple[dict[str, Path], dict[str, Dial]]:
    """Every model once per dial setting, named ``NAME@s=S``: their policy directories (Q) and dials.
    F is ``base`` or each run's Stage 1.2 policy (``stage2_base_policy_dir``), needed when some s < 1."""
    dialled: dict[str, Path] = {}
    dials: dict[str, Dial] = {}
    for name, policy_dir in models.items():
        base_dir = None if all(s == 1.0 for s in qualities) else stage2_base_policy_dir(policy_dir, base)
        for s, row in zip(qualities, quality_names(name, qualities), strict=True):
            dialled[row] = policy_dir
            dials[row] = Dial(None if s == 1.0 else base_dir, s)
    return dialled, dials


def _default_name(policy_dir: Path) -> str:
    checkpoint = policy_dir.parent if policy_dir.name == "policy" else policy_dir
    match = re.fullmatch(r"step_0*(\d+)", checkpoint.name)
    if match and checkpoint.parent.parent.name == "checkpoints":
        return f"{checkpoint.parent.name}-{match.group(1)}"
    return checkpoint.name
