"""Where a conversion reads from: model directories (local or in the Hugging Face cache, never
downloaded), JSON files and safetensors tensors, each refused with a message naming the file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open


class ConversionError(ValueError):
    """A source cannot be converted; the message names the file, key and value and what to do."""


def _download_hint(repo: str, filename: str | None = None) -> str:
    target = f"{repo} {filename}" if filename else repo
    return f"on a machine with internet run `hf download {target}` (same HF_HOME) or pass a local path"


def looks_like_path(source: str) -> bool:
    """Whether ``source`` names a local path rather than a Hugging Face repo id."""
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists()


def resolve_model_dir(source: str, what: str) -> Path:
    """A local directory, or the HF-cache snapshot of repo id ``source`` (never downloaded)."""
    if looks_like_path(source):
        path = Path(source).expanduser()
        if not path.is_dir():
            raise ConversionError(f"{what}: directory {source!r} does not exist")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=source, local_files_only=True))
    except HFValidationError:
        raise ConversionError(f"{what}: {source!r} is neither an existing directory nor a repo id") from None
    except LocalEntryNotFoundError:
        raise ConversionError(
            f"{what}: {source!r} is not in the Hugging Face cache ($HF_HOME) and rlrestore never downloads; "
            + _download_hint(source)
        ) from None


def cached_file(repo: str, filename: str) -> Path | None:
    """``filename`` of ``repo`` from the HF cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    return Path(found) if isinstance(found, str) else None


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``, refused with the file named when missing or malformed."""
    if not path.is_file():
        raise ConversionError(f"{what}: {path} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{what}: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{what}: {path} must hold a JSON object, got {type(data).__name__}")
    return data


@dataclass(eq=False)
class TensorStore:
    """Named tensors of one source, read lazily: from safetensors files or from memory (a pickle).
    Compared (and hashed) by identity."""

    name: str
    files: dict[str, Path] = field(default_factory=dict)  # key -> safetensors file
    memory: dict[str, torch.Tensor] = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted({*self.files, *self.memory})

    def where(self, key: str) -> str:
        """``key`` named with its source (and safetensors file), for messages."""
        file = f" ({self.files[key].name})" if key in self.files else ""
        return f"{self.name}{file}: {key}"

    def __contains__(self, key: str) -> bool:
        return key in self.files or key in self.memory

    def shape(self, key: str) -> torch.Size:
        if key in self.memory:
            return self.memory[key].shape
        with _open(self._file(key)) as handle:
            return torch.Size(handle.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        if key in self.memory:
            return self.memory[key]
        with _open(self._file(key)) as handle:
            return handle.get_tensor(key)

    def _file(self, key: str) -> Path:
        if key not in self.files:
            raise ConversionError(f"{self.name}: tensor {key!r} is missing")
        return self.files[key]

    @classmethod
    def from_safetensors(cls, name: str, paths: list[Path]) -> TensorStore:
        """Every tensor of the given safetensors files (a key in two files is refused)."""
        files: dict[str, Path] = {}
        for path in paths:
            with _open(path) as handle:
                names = handle.keys()
            for key in names:
                if key in files:
                    raise ConversionError(f"{name}: key {key!r} is in both {files[key].name} and {path.name}")
                files[key] = path
        return cls(name=name, files=files)


class _open:
    """``safe_open`` whose failures name the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self):
        try:
            self.handle = safe_open(str(self.path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise ConversionError(f"{self.path} is not a readable safetensors file ({exc})") from None
        return self.handle.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.handle.__exit__(*exc)


def hf_weights(directory: Path, what: str, stem: str = "model") -> TensorStore:
    """The weights of a Hugging Face directory: ``{stem}.safetensors.index.json`` and its shards, or a
    single ``{stem}.safetensors``. Pickled ``.bin`` weights are refused (never unpickled)."""
    index_file = directory / f"{stem}.safetensors.index.json"
    if index_file.is_file():
        weight_map = read_json(index_file, what).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{what}: {index_file} has no 'weight_map'")
        shards = sorted({str(name) for name in weight_map.values()})
        missing = [name for name in shards if not (directory / name).is_file()]
        if missing:
            raise ConversionError(
                f"{what}: {index_file.name} names shard(s) missing from {directory}: {', '.join(missing)} "
                "(an interrupted download? fetch the repo again)"
            )
        store = TensorStore.from_safetensors(what, [directory / name for name in shards])
        unlisted = [key for key, file in weight_map.items() if store.files.get(key, Path()).name != file]
        if unlisted:
            raise ConversionError(
                f"{what}: {index_file.name} maps {unlisted[0]!r} to {weight_map[unlisted[0]]}, "
                f"which does not hold it ({len(unlisted)} such keys)"
            )
        return store
    single = directory / f"{stem}.safetensors"
    if single.is_file():
        return TensorStore.from_safetensors(what, [single])
    pickles = sorted(path.name for path in directory.glob("*.bin"))
    found = (
        f"; it holds only pickled weights ({', '.join(pickles)}), which rlrestore never loads"
        if pickles
        else ""
    )
    raise ConversionError(f"{what}: no {stem}.safetensors or {index_file.name} in {directory}{found}")


def diffusers_weights(directory: Path, what: str) -> TensorStore:
    """The weights of a diffusers component folder (``diffusion_pytorch_model`` safetensors; a
    precision variant such as ``.bf16.safetensors`` when it is the only file)."""
    stem = "diffusion_pytorch_model"
    if (directory / f"{stem}.safetensors").is_file() or (
        directory / f"{stem}.safetensors.index.json"
    ).is_file():
        return hf_weights(directory, what, stem)
    variants = sorted(directory.glob(f"{stem}.*.safetensors"))
    if len(variants) == 1:
        return TensorStore.from_safetensors(what, variants)
    raise ConversionError(f"{what}: no {stem}.safetensors in {directory}")
