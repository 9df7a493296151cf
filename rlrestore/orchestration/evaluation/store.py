"""The evaluation's files under ``OUT``: the manifest that guards a resume, one Parquet part and
the restorations per finished chunk (a part on disk means a finished chunk), and their merge."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rlrestore.config import EvalConfig
from rlrestore.data import save_image
from rlrestore.orchestration.evaluation.worker import ChunkResult, restored_stem

MANIFEST = "eval_manifest.json"
PER_IMAGE = "per_image.parquet"
KEY_COLUMNS = ("model", "image", "seed")
NOTES_KEY = b"rlrestore.notes"


def check_manifest(out: Path, settings: dict[str, Any], models: Mapping[str, Path | str]) -> None:
    """Refuse to mix settings in one ``out``; record the settings and checkpoints (models may be added).
    ``models`` maps a name to its policy directory, or to a description of it (a dialled model)."""
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


def part_path(out: Path, model: str, index: int) -> Path:
    """The Parquet part of one model's chunk."""
    return out / "parts" / model / f"chunk-{index:05d}.parquet"


def restored_path(out: Path, model: str, image_id: str, seed: int) -> Path:
    """The PNG of one restoration."""
    return out / "restored" / model / f"{restored_stem(image_id, seed)}.png"


def chunk_done(out: Path, model: str, index: int, ids: list[str], seeds: list[int]) -> bool:
    """A chunk is done when its part file is complete and all its restorations are on disk."""
    try:
        rows = pq.read_metadata(part_path(out, model, index)).num_rows
    except (OSError, pa.ArrowException):  # missing, or cut short by a crash or a copy
        return False
    return rows == len(ids) * len(seeds) and all(
        restored_path(out, model, image_id, seed).is_file() for image_id in ids for seed in seeds
    )


Task = tuple[str, int, list[str]]  # model, chunk index, image ids


@dataclass
class ChunkPlan:
    """Every (model, chunk) task of an evaluation, those an earlier run finished, and those to compute."""

    tasks: list[Task]
    reused: list[tuple[str, int]]
    pending: list[Task]


def plan_chunks(out: Path, models: Sequence[str], ids: list[str], config: EvalConfig) -> ChunkPlan:
    """Chunks of ``eval.chunk_size`` inputs per model; a chunk complete on disk is reused."""
    seeds = [config.seed + k for k in range(config.samples)]
    chunks = [ids[start : start + config.chunk_size] for start in range(0, len(ids), config.chunk_size)]
    tasks = [(model, index, chunk) for model in models for index, chunk in enumerate(chunks)]
    reused = [(model, index) for model, index, chunk in tasks if chunk_done(out, model, index, chunk, seeds)]
    pending = [task for task in tasks if (task[0], task[1]) not in reused]
    return ChunkPlan(tasks, reused, pending)


def save_chunk(out: Path, result: ChunkResult, columns: list[str]) -> None:
    """The restorations, then the part file (atomically), so a part on disk means a finished chunk."""
    for row in result.rows:
        stem = restored_stem(row["image"], row["seed"])
        save_image(result.restored[stem], restored_path(out, result.model, row["image"], row["seed"]))
    schema = pa.schema(
        [("model", pa.string()), ("image", pa.string()), ("seed", pa.int64())]
        + [(key, pa.float64()) for key in columns]
    )
    table = pa.Table.from_pylist(result.rows, schema=schema)
    table = table.replace_schema_metadata({NOTES_KEY: json.dumps(result.notes)})
    path = part_path(out, result.model, result.index)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, temporary)
    os.replace(temporary, path)


def merge_parts(
    out: Path, tasks: list[tuple[str, int, list[str]]], columns: list[str]
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """All parts in task order as one table, and the scoring notes summed per (model, metric, reason)."""
    frames, counts = [], {}
    for model, index, _ in tasks:
        table = pq.read_table(part_path(out, model, index))
        frames.append(table.to_pandas())
        for note in json.loads(table.schema.metadata[NOTES_KEY]):
            key = (model, note["metric"], note["reason"])
            counts[key] = counts.get(key, 0) + note["images"]
    per_image = pd.concat(frames, ignore_index=True)[[*KEY_COLUMNS, *columns]]
    notes = [
        {"model": model, "metric": metric, "reason": reason, "images": images}
        for (model, metric, reason), images in counts.items()
    ]
    return per_image, notes
