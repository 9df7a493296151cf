"""Build a policy component from a config, or load it from a local path / the Hugging Face cache.

One code path serves tiny random-init test models and real checkpoints: a component is either
`arch`-built (random weights) or loaded with the library's own ``from_pretrained`` with
``local_files_only=True``; rlrestore never downloads weights at run time.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from rlrestore.config import ComponentSpec

T = TypeVar("T", bound=nn.Module)


class CheckpointError(FileNotFoundError):
    """Weights a config or checkpoint points at are missing or unreadable."""


def check_arch_keys(name: str, arch: dict[str, Any], accepted: set[str]) -> None:
    """Reject architecture keys the component's config class does not know."""
    unknown = sorted(set(arch) - accepted)
    if unknown:
        raise ValueError(
            f"policy.{name}.arch: unknown key(s) {unknown}; allowed keys: {', '.join(sorted(accepted))}"
        )


def init_signature_keys(cls: type) -> set[str]:
    """Keyword arguments accepted by a (diffusers) class constructor."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(cls.__init__).parameters
    return {key for key, param in params.items() if key != "self" and param.kind in named}


def hint_download(key: str, source: str) -> str:
    """The message telling a user how to get missing weights onto the machine."""
    return (
        f"{key}: {source!r} was not found locally (neither a directory nor in the Hugging Face "
        f"cache at $HF_HOME). rlrestore never downloads at run time: on a machine with internet run "
        f"`hf download {source}` (with the same HF_HOME), or copy the model directory "
        f"here and set {key} to its path."
    )


def is_available(source: str, filename: str, subfolder: str | None = None) -> bool:
    """Whether a local directory or the HF cache holds ``filename`` of ``source`` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    local = Path(source).expanduser()
    if local.exists():
        return (local / (subfolder or "") / filename).is_file()
    if source.startswith((".", "/", "~")):
        return False
    path = f"{subfolder}/{filename}" if subfolder else filename
    return isinstance(try_to_load_from_cache(source, path), str)


def require_available(sources: list[tuple[str, str, str, str | None]]) -> None:
    """Fail early, listing every missing (config key, source, file, subfolder) at once."""
    missing = [item for item in sources if not is_available(item[1], item[2], item[3])]
    if missing:
        lines = [f"  {key}: {source}{'/' + sub if sub else ''}/{name}" for key, source, name, sub in missing]
        raise CheckpointError(
            "weights are missing locally (rlrestore never downloads at run time):\n"
            + "\n".join(lines)
            + "\nOn a machine with internet, `hf download REPO` each repo (same HF_HOME), "
            "or point these keys at local directories."
        )


def load_component(
    name: str,
    spec: ComponentSpec,
    build: Callable[[dict[str, Any]], T],
    load: Callable[..., T],
) -> T:
    """Random-init from ``spec.arch`` (``build``) or ``load(source, local_files_only=True, ...)``."""
    if spec.pretrained is None:
        return build(dict(spec.arch))
    source = spec.pretrained
    # safetensors only: never fall back to unpickling a .bin file that sits next to (or instead of) it
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    if spec.subfolder:
        kwargs["subfolder"] = spec.subfolder
    local = Path(source).expanduser()
    looks_like_path = source.startswith((".", "/", "~")) or local.exists()
    if looks_like_path and not local.exists():
        raise CheckpointError(f"policy.{name}.pretrained: directory {source!r} does not exist")
    try:
        return load(str(local) if looks_like_path else source, **kwargs)
    except (OSError, ValueError) as exc:
        if looks_like_path:
            raise CheckpointError(f"policy.{name}: cannot load weights from {source!r}: {exc}") from None
        raise CheckpointError(hint_download(f"policy.{name}.pretrained", source)) from None


def count_parameters(module: nn.Module) -> int:
    """Parameters of a module, each shared tensor counted once (tied embeddings)."""
    seen: set[int] = set()
    total = 0
    for param in module.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def resolve_dtype(name: str) -> torch.dtype:
    """Map a config dtype string to torch."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
