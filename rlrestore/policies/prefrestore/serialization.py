"""Pref-Restore's policy directory: write it, read it, and read or replace only its velocity model.

    policy_config.json                 {"format_version", "first_image_id", "policy": {type: prefrestore, ...}}
    vision/ integrator/ transformer/ vae/   transformers / diffusers directories (they load with those libraries)
    rlrestore_modules.safetensors      quantizer, codebook, both connectors, the LQ encoder (and
                                       z_low_projection with policy.z_low_injection=aligned)

Everything is read without running pickled code (safetensors only, no ``.bin`` fallback).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import SanaTransformer2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rlrestore.config import PolicyConfig
from rlrestore.models.loading import CheckpointError
from rlrestore.policies.base import POLICY_CONFIG, read_policy_config
from rlrestore.policies.prefrestore.networks import build_vae_connector
from rlrestore.policies.prefrestore.velocity import (
    PrefRestoreVelocity,
    build_z_low_projection,
    z_low_source_noise,
)

if TYPE_CHECKING:
    from rlrestore.policies.prefrestore.policy import PrefRestorePolicy

FORMAT_VERSION = 1
OWN_MODULES = "rlrestore_modules.safetensors"
DIT_WEIGHTS = "diffusion_pytorch_model.safetensors"  # the file name diffusers loads
COMPONENT_DIRS = ("vision", "integrator", "transformer", "vae")
OWN_VELOCITY_PARTS = ("vae_connector", "z_low_projection")  # velocity weights kept in OWN_MODULES


def _own_modules(policy: PrefRestorePolicy) -> dict[str, nn.Module]:
    """The rlrestore-own parts by their prefix in ``rlrestore_modules.safetensors``."""
    parts: dict[str, nn.Module] = {
        "quantizer": policy.visual_tokenizer.pre_quant,
        "codebook": policy.visual_tokenizer.quantizer,
        "diffusion_connector": policy.diffusion_connector,
        "vae_connector": policy.vae_connector,
        "lq_encoder": policy.lq_encoder,
    }
    if policy.velocity_model.z_low_projection is not None:
        parts["z_low_projection"] = policy.velocity_model.z_low_projection
    return parts


def save_policy(policy: PrefRestorePolicy, path: str | Path) -> None:
    """Write ``policy`` as a directory of component subfolders plus ``policy_config.json``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    policy.visual_tokenizer.tower.save_pretrained(path / "vision")
    policy.integrator.save_pretrained(path / "integrator")
    policy.vocabulary.tokenizer.save_pretrained(path / "integrator")
    policy.transformer.save_pretrained(path / "transformer")
    policy.vae.save_pretrained(path / "vae")
    own = {
        f"{prefix}.{key}": value.contiguous()
        for prefix, module in _own_modules(policy).items()
        for key, value in module.state_dict().items()
    }
    save_file(own, str(path / OWN_MODULES))
    meta = {
        "format_version": FORMAT_VERSION,
        "first_image_id": policy.vocabulary.first_image_id,
        "policy": policy.config.without_runtime_options().model_dump(mode="json"),
    }
    (path / POLICY_CONFIG).write_text(json.dumps(meta, indent=2))


def _own_tensors(path: Path) -> dict[str, torch.Tensor]:
    own_file = path / OWN_MODULES
    if not own_file.is_file():
        raise CheckpointError(f"{path}: {OWN_MODULES} is missing")
    try:
        return load_file(str(own_file))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{own_file} is corrupt: {exc}") from None


def _load_part(tensors: dict[str, torch.Tensor], prefix: str, module: nn.Module, source: Path) -> None:
    part = {key[len(prefix) + 1 :]: value for key, value in tensors.items() if key.startswith(prefix + ".")}
    try:
        module.load_state_dict(part)
    except RuntimeError as exc:
        raise CheckpointError(f"{source / OWN_MODULES}: weights of {prefix} do not fit: {exc}") from None


def load_policy(cls: type[PrefRestorePolicy], path: str | Path) -> PrefRestorePolicy:
    """Load a directory written by :func:`save_policy` (and every earlier format version)."""
    path = Path(path)
    meta, config = read_policy_config(path, PolicyConfig)
    local = config.model_copy(deep=True)
    for name in COMPONENT_DIRS:
        getattr(local, name).pretrained = str(path / name)
        getattr(local, name).subfolder = None
    local.text_tokenizer = str(path / "integrator")
    policy = cls.from_config(local)
    if policy.vocabulary.first_image_id != meta.get("first_image_id"):
        raise CheckpointError(
            f"{path}: tokenizer gives first image id {policy.vocabulary.first_image_id}, "
            f"checkpoint expects {meta.get('first_image_id')}"
        )
    tensors = _own_tensors(path)
    for prefix, module in _own_modules(policy).items():
        _load_part(tensors, prefix, module, path)
    policy.config = config
    policy.semantic.use_config(config)
    return policy


def load_velocity(path: str | Path) -> PrefRestoreVelocity:
    """Only the DiT and the vae connector of a policy directory, in float32: the learners need
    nothing else, which spares each rank the integrator, the vision tower and the DC-AE."""
    path = Path(path)
    _, config = read_policy_config(path, PolicyConfig)
    try:
        transformer = SanaTransformer2DModel.from_pretrained(
            path / "transformer", local_files_only=True, use_safetensors=True
        )
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}/transformer: cannot load the DiT: {exc}") from None
    connector = build_vae_connector(config, transformer)
    tensors = _own_tensors(path)
    _load_part(tensors, "vae_connector", connector, path)
    projection = None
    if config.z_low_injection == "aligned":
        projection = build_z_low_projection(transformer)
        _load_part(tensors, "z_low_projection", projection, path)
        projection = projection.float()
    source = z_low_source_noise(config.flow_source, config.source_noise)
    return PrefRestoreVelocity(transformer.float(), connector.float(), config.flow_shift, projection, source)


def write_velocity(base: Path, state: dict[str, torch.Tensor], out: Path) -> None:
    """A policy directory equal to ``base`` except for the velocity model's weights ``state`` (keys
    ``transformer.*``, ``vae_connector.*`` and ``z_low_projection.*``), written without building any
    network: every other file is copied and the DiT's weights go into one safetensors file next to its
    config.json."""
    base, out = Path(base), Path(out)
    read_policy_config(base, PolicyConfig)
    parts = {prefix: {k[len(prefix) + 1 :]: v.contiguous() for k, v in state.items() if k.startswith(prefix + ".")}
             for prefix in ("transformer", *OWN_VELOCITY_PARTS)}  # fmt: skip
    if not parts["transformer"]:
        raise CheckpointError("the velocity weights hold no transformer.* tensors")
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("transformer"))
    (out / "transformer").mkdir()
    shutil.copy2(base / "transformer" / "config.json", out / "transformer" / "config.json")
    save_file(parts["transformer"], str(out / "transformer" / DIT_WEIGHTS), metadata={"format": "pt"})
    if any(parts[prefix] for prefix in OWN_VELOCITY_PARTS):
        own = _own_tensors(base)
        own.update({f"{prefix}.{key}": value for prefix in OWN_VELOCITY_PARTS for key, value in parts[prefix].items()})
        save_file({k: v.contiguous() for k, v in own.items()}, str(out / OWN_MODULES))
