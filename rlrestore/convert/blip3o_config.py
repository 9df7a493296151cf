"""The configuration side of a BLIP3o-family checkpoint: its ``config.json`` (a ``blip3o_qwen`` Qwen3
config with the token ids and the SANA folder it was built on), that SANA folder's component and
scheduler configs, and the rlrestore :class:`PolicyConfig` they make together."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
from transformers import PreTrainedConfig, Qwen3Config

from rlrestore.config import ComponentSpec, PolicyConfig
from rlrestore.convert.sources import ConversionError, looks_like_path, read_json, resolve_model_dir
from rlrestore.convert.ta_tok import TATokArgs
from rlrestore.convert.tokenizer import TokenIds
from rlrestore.models.loading import init_signature_keys

MODEL_TYPES = ("blip3o_qwen",)
SANA_REPO_OWNER = "Efficient-Large-Model"
# Their inference samples a 16 x 16 latent (``latent_size = 16`` in generate_images_from_image), i.e.
# 512 px with SANA's f32 DC-AE: the generation resolution is 16 times the VAE's compression.
LATENT_SIDE = 16


@dataclass(frozen=True)
class Blip3oCheckpoint:
    """What config.json of a BLIP3o-family HF Trainer directory says."""

    directory: Path
    integrator_arch: dict[str, Any]
    token_ids: TokenIds
    diffusion_name_or_path: str | None
    vision_tower: str | None
    notes: tuple[str, ...]

    @property
    def tied(self) -> bool:
        return bool(self.integrator_arch.get("tie_word_embeddings", False))


def qwen3_arch_keys() -> set[str]:
    """Qwen3Config's own fields (those beyond PreTrainedConfig's bookkeeping), as configs/ list them."""
    common = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    return {f.name for f in dataclasses.fields(Qwen3Config)} - common


def read_checkpoint(directory: Path) -> Blip3oCheckpoint:
    """Parse config.json; refuse other model types and missing token ids."""
    path = directory / "config.json"
    config = read_json(path, "checkpoint config")
    if config.get("model_type") not in MODEL_TYPES:
        raise ConversionError(
            f"{path}: model_type = {config.get('model_type')!r}; expected one of {MODEL_TYPES} "
            "(a BLIP3o-NEXT / Pref-Restore HF Trainer directory)"
        )
    arch = {key: config[key] for key in sorted(qwen3_arch_keys()) if key in config}
    notes = []
    if "rope_parameters" not in arch and "rope_theta" in config:
        arch["rope_parameters"] = {"rope_type": "default", "rope_theta": float(config["rope_theta"])}
    if config.get("rope_scaling"):
        notes.append(
            f"config.json rope_scaling {config['rope_scaling']} ignored (their model class sets it to None)"
        )
    try:
        Qwen3Config(**arch)
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{path}: not a valid Qwen3 configuration ({exc})") from None
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        if not isinstance(arch.get(key), int):
            raise ConversionError(f"{path}: {key} missing or not an integer")
    return Blip3oCheckpoint(
        directory=directory,
        integrator_arch=arch,
        token_ids=TokenIds.from_config(config, path),
        diffusion_name_or_path=config.get("diffusion_name_or_path"),
        vision_tower=config.get("mm_vision_tower"),
        notes=tuple(notes),
    )


@dataclass(frozen=True)
class SanaFolder:
    """The base SANA diffusers folder a checkpoint was built on."""

    directory: Path
    transformer_arch: dict[str, Any]
    vae_arch: dict[str, Any]
    flow_shift: float
    notes: tuple[str, ...]

    @property
    def resolution(self) -> int:
        return LATENT_SIDE * 2 ** (len(self.vae_arch["encoder_block_out_channels"]) - 1)


def find_sana(explicit: str | None, named: str | None) -> Path:
    """``--sana``, else config.json's ``diffusion_name_or_path`` (a local directory or an HF id in the
    cache; an author-local path that is missing here is looked up as ``Efficient-Large-Model/<name>``)."""
    if explicit is not None:
        return resolve_model_dir(explicit, "--sana")
    if not named:
        raise ConversionError(
            "config.json names no diffusion_name_or_path: pass --sana DIR (the base SANA folder)"
        )
    if not looks_like_path(named) or Path(named).expanduser().is_dir():
        return resolve_model_dir(named, "config.json diffusion_name_or_path")
    repo = f"{SANA_REPO_OWNER}/{Path(named).name}"
    try:
        return resolve_model_dir(repo, "base SANA folder")
    except ConversionError:
        raise ConversionError(
            f"config.json names the base SANA folder {named!r}, which is not here, nor is {repo} in the Hugging "
            f"Face cache; on a machine with internet run `hf download {repo}` (same HF_HOME) or pass --sana DIR"
        ) from None


def read_sana(directory: Path) -> SanaFolder:
    """Component configs (keys the installed diffusers does not know are dropped and noted, as
    diffusers itself drops them) and the effective flow shift of the scheduler their loader builds."""
    notes: list[str] = []
    arches = {}
    for sub, cls in (("transformer", SanaTransformer2DModel), ("vae", AutoencoderDC)):
        config = read_json(directory / sub / "config.json", f"base SANA {sub}")
        accepted = init_signature_keys(cls)
        dropped = sorted(k for k in config if k not in accepted and not k.startswith("_"))
        if dropped:
            notes.append(f"base SANA {sub}/config.json keys unknown to diffusers, dropped: {dropped}")
        arches[sub] = {k: v for k, v in config.items() if k in accepted}
    return SanaFolder(
        directory, arches["transformer"], arches["vae"], _flow_shift(directory, notes), tuple(notes)
    )


def _flow_shift(directory: Path, notes: list[str]) -> float:
    """Their model builds FlowMatchEulerDiscreteScheduler from SANA's scheduler config, whatever class
    that config names; SANA ships a DPM-Solver config whose ``flow_shift`` that class does not read."""
    config = read_json(directory / "scheduler" / "scheduler_config.json", "base SANA scheduler")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    if scheduler.config.use_dynamic_shifting:
        raise ConversionError(
            f"{directory}/scheduler: use_dynamic_shifting is on; their sampler passes no shift parameter mu, "
            "so this scheduler cannot be reproduced"
        )
    shift = float(scheduler.config.shift)
    if "flow_shift" in config and not math.isclose(config["flow_shift"], shift):
        notes.append(
            f"scheduler_config.json says flow_shift={config['flow_shift']} ({config.get('_class_name')}), but "
            f"FlowMatchEulerDiscreteScheduler reads `shift`: the effective shift is {shift}"
        )
    return shift


def build_policy_config(
    checkpoint: Blip3oCheckpoint, sana: SanaFolder, args: TATokArgs, vision_arch: dict[str, Any], source: str
) -> PolicyConfig:
    """The rlrestore policy with the released model's conventions (vocabulary, chat prompt, TA-Tok
    codebook, tanh-GELU connectors with RMSNorm eps 1e-5, the effective flow shift)."""
    if args.input_size != vision_arch["image_size"]:
        raise ConversionError(
            f"TA-Tok input_size={args.input_size} differs from its encoder's image size {vision_arch['image_size']}"
        )
    grid = (vision_arch["image_size"] // vision_arch["patch_size"]) ** 2
    if grid != args.tokens:
        raise ConversionError(
            f"TA-Tok bottleneck_token_num={args.tokens}, but its encoder yields {grid} tokens"
        )
    codes = checkpoint.token_ids.image_end - checkpoint.token_ids.image_start + 1
    if codes != args.codebook_size:
        raise ConversionError(
            f"config.json has {codes} image tokens (<I0>..<I{codes - 1}>), the TA-Tok file {args.codebook_size} codes"
        )
    vocab = checkpoint.integrator_arch["vocab_size"]
    if vocab != checkpoint.token_ids.image_end + 1:
        raise ConversionError(
            f"config.json vocab_size={vocab}, but the vocabulary ends with image_end_token_id="
            f"{checkpoint.token_ids.image_end} (expected vocab_size {checkpoint.token_ids.image_end + 1})"
        )
    return PolicyConfig(
        resolution=sana.resolution,
        tokenizer_resolution=args.input_size,
        vision=ComponentSpec(arch=vision_arch),
        vision_feature_layer=args.select_layer,
        codebook_size=args.codebook_size,
        codebook_dim=args.codebook_dim,
        codebook_bias=True,
        codebook_l2_normalized=args.l2_normalized,
        integrator=ComponentSpec(arch=checkpoint.integrator_arch),
        text_tokenizer=source,
        transformer=ComponentSpec(arch=sana.transformer_arch),
        vae=ComponentSpec(arch=sana.vae_arch),
        vocabulary="blip3o",
        prompt_format="chat",
        flow_shift=sana.flow_shift,
        vae_connector_gelu="tanh",
        connector_norm_eps=1e-5,
    )
