"""Face shards: a folder of images becomes PNG-in-Parquet shards, and back into records.

Layout of ``out/``::

    shard-00000.parquet ...   columns id, source, caption, orig_width, orig_height, image (PNG)
    _manifest.json            image_size, count, shards, skipped, schema_version (written last)
    _report.json              files skipped (path + reason) and bad caption lines

The leading underscore makes pyarrow's dataset reader (``pyarrow.dataset.dataset(out)``, Spark,
pandas) skip the two JSON files, so the folder reads as one Parquet dataset. Folders built before
(``manifest.json``, ``report.json``) still load: :func:`read_manifest` falls back to the old name.

Ids are the image's path relative to ``src`` without its extension, with ``/`` replaced by ``__``
(so an id is a valid file name). Files whose ids would clash (``a.png`` and ``a.jpg``) all get a
short blake2b hash of their relative path appended. Ids are computed over every candidate file,
so an id never depends on which other files happen to be readable.

Captions come from ``src/captions.jsonl`` (one ``{"file": ..., "caption": ...}`` per line;
``file`` is the path relative to ``src``, or a bare file name when exactly one image has it) and
from sidecar ``name.txt`` files next to the image. A sidecar wins over ``captions.jsonl``: it sits
next to the one image it describes. Bad caption lines are reported, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from rlrestore.data.images import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    decode_png,
    encode_png,
    iter_image_files,
    load_image,
    square_resize,
)

SCHEMA_VERSION = 1
CAPTIONS_FILE = "captions.jsonl"
SHARD_GLOB = "shard-*.parquet"
MANIFEST = "_manifest.json"
REPORT = "_report.json"
LEGACY_NAMES = {MANIFEST: "manifest.json", REPORT: "report.json"}  # folders built before the rename

log = logging.getLogger(__name__)
SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=True),
        pa.field("orig_width", pa.int32(), nullable=False),
        pa.field("orig_height", pa.int32(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
    ],
    metadata={"rlrestore.schema_version": str(SCHEMA_VERSION)},
)


class ShardError(ValueError):
    """Shards cannot be built or read; the message names the directory or file and what to do."""


@dataclass(frozen=True)
class SkippedFile:
    """An input that was not stored, with the reason."""

    path: str
    reason: str


@dataclass(frozen=True)
class CaptionError:
    """A line of ``captions.jsonl`` that was ignored, with the reason."""

    line: int
    reason: str


@dataclass
class BuildReport:
    """What ``build_shards`` did: counts, shard files, skipped inputs and ignored caption lines."""

    src: Path
    out: Path
    image_size: int
    count: int
    captioned: int
    shards: list[str]
    skipped: list[SkippedFile] = field(default_factory=list)
    caption_errors: list[CaptionError] = field(default_factory=list)

    def summary(self) -> str:
        """A few human-readable lines for the CLI."""
        lines = [
            f"stored {self.count} faces ({self.image_size} px, {self.captioned} captioned) from {self.src}",
            f"  in {len(self.shards)} shard(s) under {self.out}",
        ]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s) (see {self.out / REPORT}):")
            lines.extend(f"  {item.path}: {item.reason}" for item in self.skipped)
        if self.caption_errors:
            lines.append(f"ignored {len(self.caption_errors)} line(s) of {CAPTIONS_FILE}:")
            lines.extend(f"  line {item.line}: {item.reason}" for item in self.caption_errors)
        return "\n".join(lines)


@dataclass(frozen=True)
class FaceRecord:
    """One stored face: ``image`` is the ``HxWx3`` uint8 array at the shards' image size."""

    id: str
    source: str
    caption: str | None
    image: np.ndarray


def _shard_row(
    sample_id: str, source: str, caption: str | None, image: np.ndarray, image_size: int
) -> dict[str, object]:
    """One Parquet row: the image square-resized to ``image_size`` as PNG, with its provenance."""
    return {
        "id": sample_id,
        "source": source,
        "caption": caption,
        "orig_width": image.shape[1],
        "orig_height": image.shape[0],
        "image": encode_png(square_resize(image, image_size)),
    }


def build_shards(
    src: Path, out: Path, image_size: int, shard_size: int, progress: bool = True
) -> BuildReport:
    """Store every readable image under ``src``, square-resized to ``image_size``, in Parquet shards.

    Unreadable inputs are skipped and listed in ``out/_report.json``. Earlier shards, manifest and
    report in ``out`` are removed first. Raises ``ShardError`` if ``src`` has no readable image.
    """
    src, out = Path(src), Path(out)
    if image_size <= 0 or shard_size <= 0:
        raise ValueError(f"image_size and shard_size must be positive, got {image_size} and {shard_size}")
    if not src.is_dir():
        raise ShardError(f"image source {src} does not exist or is not a directory")
    files = iter_image_files(src)
    if not files:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise ShardError(f"no readable image under {src}: no files with an image extension ({extensions})")
    relative = [path.relative_to(src).as_posix() for path in files]
    ids = _sample_ids(relative)
    captions, caption_errors = _read_captions(src, relative)

    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob(SHARD_GLOB), *(out / name for pair in LEGACY_NAMES.items() for name in pair)]:
        stale.unlink(missing_ok=True)

    rows: list[dict[str, object]] = []
    shards: list[str] = []
    skipped: list[SkippedFile] = []
    count = captioned = 0
    for path, rel, sample_id in tqdm(
        list(zip(files, relative, ids)), desc="building shards", unit="img", disable=not progress
    ):
        try:
            image = load_image(path)
        except ImageLoadError as exc:
            skipped.append(SkippedFile(rel, exc.reason))
            continue
        caption = _sidecar_caption(path) or captions.get(rel)
        rows.append(_shard_row(sample_id, rel, caption, image, image_size))
        count += 1
        captioned += caption is not None
        if len(rows) == shard_size:
            shards.append(_write_shard(out, len(shards), rows))
            rows = []
    if rows:
        shards.append(_write_shard(out, len(shards), rows))

    report = BuildReport(src, out, image_size, count, captioned, shards, skipped, caption_errors)
    _write_json(
        out / REPORT,
        {
            "src": str(src),
            "skipped": [vars(item) for item in skipped],
            "caption_errors": [vars(item) for item in caption_errors],
        },
    )
    if count == 0:
        raise ShardError(
            f"no readable image under {src}: {len(files)} image file(s), all unreadable "
            f"(reasons in {out / REPORT})"
        )
    _write_json(
        out / MANIFEST,
        {
            "schema_version": SCHEMA_VERSION,
            "image_size": image_size,
            "count": count,
            "shards": shards,
            "skipped": len(skipped),
        },
    )
    return report


def shard_file(directory: Path, name: str) -> Path | None:
    """``directory/name`` (``MANIFEST`` or ``REPORT``), or its pre-underscore name in a folder built
    before the rename (noted in the log); None when neither exists."""
    for candidate in (name, LEGACY_NAMES[name]):
        path = Path(directory) / candidate
        if path.is_file():
            if candidate != name:
                log.info("%s: old shard layout, read %s (a rebuild writes %s)", directory, candidate, name)
            return path
    return None


def read_manifest(directory: Path) -> dict[str, object] | None:
    """The shards' manifest (``_manifest.json``, or ``manifest.json`` of an older build); None when
    the folder has none (never built, or a build that did not finish)."""
    path = shard_file(directory, MANIFEST)
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ShardError(f"shard manifest {path} is not valid JSON ({exc.msg}); rebuild the shards") from None


def _sample_ids(relative: list[str]) -> list[str]:
    bases = [rel.rsplit(".", 1)[0].replace("/", "__") for rel in relative]
    clashes = {base for base, n in Counter(bases).items() if n > 1}
    ids = [
        f"{base}-{hashlib.blake2b(rel.encode(), digest_size=4).hexdigest()}" if base in clashes else base
        for base, rel in zip(bases, relative)
    ]
    if len(set(ids)) != len(ids):
        raise ShardError(f"could not derive unique sample ids from file names: {sorted(ids)}")
    return ids


def _read_captions(src: Path, relative: list[str]) -> tuple[dict[str, str], list[CaptionError]]:
    path = src / CAPTIONS_FILE
    if not path.is_file():
        return {}, []
    known = set(relative)
    by_name: dict[str, list[str]] = {}
    for rel in relative:
        by_name.setdefault(rel.rsplit("/", 1)[-1], []).append(rel)

    captions: dict[str, str] = {}
    errors: list[CaptionError] = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(CaptionError(number, f"not valid JSON ({exc.msg})"))
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            errors.append(CaptionError(number, 'expected an object with a string "file"'))
            continue
        caption = entry.get("caption")
        if caption is not None and not isinstance(caption, str):
            errors.append(CaptionError(number, f'"caption" must be a string or null, got {caption!r}'))
            continue
        name = entry["file"]
        matches = [name] if name in known else by_name.get(name, [])
        if len(matches) != 1:
            problem = "matches several images; give the relative path" if matches else "names no image"
            errors.append(CaptionError(number, f"file {name!r} {problem}"))
            continue
        if matches[0] in captions:
            errors.append(
                CaptionError(number, f"duplicate caption for {matches[0]!r}; the first one is kept")
            )
            continue
        if caption and caption.strip():
            captions[matches[0]] = caption.strip()
    return captions, errors


def _sidecar_caption(image_path: Path) -> str | None:
    sidecar = image_path.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    text = sidecar.read_text(encoding="utf-8", errors="replace").strip()
    return text or None


def _write_shard(out: Path, index: int, rows: list[dict[str, object]]) -> str:
    name = f"shard-{index:05d}.parquet"
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    pq.write_table(table, out / name)
    return name


def _write_json(path: Path, payload: dict[str, object]) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check_shards(directory: Path) -> int:
    """Number of records in the shards of ``directory``, after checking that each one is a
    readable Parquet file with the expected columns (footers only: cheap enough for the driver
    to run before any worker starts). Raises :class:`ShardError` naming the bad shard."""
    paths = sorted(Path(directory).glob(SHARD_GLOB)) if Path(directory).is_dir() else []
    if not paths:
        raise ShardError(
            f"no shards ({SHARD_GLOB}) in {directory}; build them with `rlrestore data build SRC {directory}`"
        )
    count = 0
    for path in paths:
        try:
            metadata = pq.read_metadata(path)
        except (pa.ArrowException, OSError) as exc:
            raise ShardError(f"shard {path} is not a readable Parquet file: {exc}") from None
        missing = [name for name in SCHEMA.names if name not in metadata.schema.names]
        if missing:
            raise ShardError(f"shard {path} lacks column(s) {missing}; rebuild the shards")
        count += metadata.num_rows
    return count


def read_shards(directory: Path) -> list[FaceRecord]:
    """Read every ``shard-*.parquet`` in ``directory`` (sorted) into records with decoded images."""
    directory = Path(directory)
    paths = sorted(directory.glob(SHARD_GLOB)) if directory.is_dir() else []
    if not paths:
        raise ShardError(
            f"no shards ({SHARD_GLOB}) in {directory}; build them with `rlrestore data build SRC {directory}`"
        )
    records: list[FaceRecord] = []
    for path in paths:
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise ShardError(f"shard {path} is not a readable Parquet file: {exc}") from None
        missing = [name for name in SCHEMA.names if name not in table.column_names]
        if missing:
            raise ShardError(f"shard {path} lacks column(s) {missing}; rebuild the shards")
        columns = table.select(["id", "source", "caption", "image"]).to_pydict()
        for sample_id, source, caption, data in zip(
            columns["id"], columns["source"], columns["caption"], columns["image"]
        ):
            try:
                image = decode_png(data, label=f"{path} (id {sample_id})")
            except ImageLoadError as exc:
                raise ShardError(str(exc)) from None
            records.append(FaceRecord(sample_id, source, caption, image))
    duplicates = [key for key, n in Counter(record.id for record in records).items() if n > 1]
    if duplicates:
        raise ShardError(f"shards in {directory} repeat id(s) {duplicates[:5]}; rebuild the shards")
    return records


def split_holdout(records: list[FaceRecord], n: int) -> tuple[list[FaceRecord], list[FaceRecord]]:
    """Split into (train, holdout): records sorted by id, the last ``n`` held out."""
    if n < 0:
        raise ValueError(f"holdout size must be >= 0, got {n}")
    if n > 0 and n >= len(records):
        raise ValueError(f"holdout of {n} leaves no training faces out of {len(records)}")
    ordered = sorted(records, key=lambda record: record.id)
    cut = len(ordered) - n
    return ordered[:cut], ordered[cut:]
