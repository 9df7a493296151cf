"""The TA-Tok tokenizer file (``ta_tok.pth``): a ``torch.save`` pickle ``{"model": {"args": {...},
"sd": {...}}}`` read with ``torch.load(weights_only=True)``, so it may hold plain types and tensors only
(an ``easydict.EasyDict``, the dict subclass of TA-Tok's training configs, is read as a plain ordered
dict: no code of that class runs).

``args`` are the constructor arguments of TA-Tok's ``TextAlignedTokenizer``: the SimVQ codebook
(``bottleneck.args.regularizer.args``: ``codebook_size``, ``l2_normalized``), the code dimension
(``bottleneck.args.bottleneck_dim``), tokens per image, input size, the SigLIP2 hidden layer read
(``select_layer_id``) and the SigLIP2 ``teacher`` whose configuration built the encoder.
"""

from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlrestore.convert.sources import ConversionError, TensorStore, cached_file, looks_like_path, read_json

TA_TOK_REPO, TA_TOK_FILE = "csuhan/TA-Tok", "ta_tok.pth"
# SigLIP2 configurations TA-Tok encoders use. The head count cannot be read from the weights.
KNOWN_TEACHERS: dict[str, dict[str, Any]] = {
    "google/siglip2-so400m-patch14-384": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 14,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    },
}


@dataclass(frozen=True)
class TATokArgs:
    """What the conversion needs from TA-Tok's ``args``."""

    codebook_size: int
    codebook_dim: int
    l2_normalized: bool
    tokens: int
    input_size: int
    select_layer: int
    teacher: str


@dataclass(frozen=True)
class TATok:
    path: Path
    args: TATokArgs
    weights: TensorStore


def load_ta_tok(path: Path) -> TATok:
    """Read and validate a TA-Tok file without running pickled code."""
    if not path.is_file():
        raise ConversionError(f"TA-Tok file {path} does not exist")
    try:
        with torch.serialization.safe_globals([(OrderedDict, "easydict.EasyDict")]):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise ConversionError(
            f"TA-Tok file {path} holds objects other than plain Python types and tensors ({reason}); rlrestore "
            "loads it with torch.load(weights_only=True) and never runs pickled code. If you trust the file, "
            "re-save its args as plain types where the class is installed: ckpt = torch.load(p, weights_only=False); "
            "torch.save({'model': {'args': json.loads(json.dumps(ckpt['model']['args'])), "
            "'sd': dict(ckpt['model']['sd'])}}, 'ta_tok_plain.pth')"
        ) from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise ConversionError(f"TA-Tok file {path} is not a readable torch.save file ({exc})") from None
    model = _field(payload, "model", dict, path)
    args, sd = _field(model, "args", dict, path, "model"), _field(model, "sd", dict, path, "model")
    bad = [key for key, value in sd.items() if not (isinstance(key, str) and isinstance(value, torch.Tensor))]
    if bad:
        raise ConversionError(f"TA-Tok file {path}: model.sd[{bad[0]!r}] is not a tensor")
    return TATok(
        path=path, args=_parse_args(args, path), weights=TensorStore(f"TA-Tok file {path.name}", memory=sd)
    )


def _field(node: Any, key: str, kind: type, path: Path, where: str = "") -> Any:
    name = f"{where}.{key}" if where else key
    if not isinstance(node, dict) or key not in node:
        raise ConversionError(
            f"TA-Tok file {path}: {name} is missing (expected {{'model': {{'args', 'sd'}}}})"
        )
    if not isinstance(node[key], kind):
        raise ConversionError(
            f"TA-Tok file {path}: {name} must be a {kind.__name__}, got {type(node[key]).__name__}"
        )
    return node[key]


def _parse_args(args: dict[str, Any], path: Path) -> TATokArgs:
    bottleneck = _field(args, "bottleneck", dict, path, "model.args")
    inner = _field(bottleneck, "args", dict, path, "model.args.bottleneck")
    regularizer = _field(inner, "regularizer", dict, path, "model.args.bottleneck.args")
    if regularizer.get("name") != "simvq":
        raise ConversionError(
            f"TA-Tok file {path}: model.args.bottleneck.args.regularizer.name = {regularizer.get('name')!r}; "
            "only the SimVQ quantiser ('simvq') is supported"
        )
    reg_args = _field(regularizer, "args", dict, path, "model.args.bottleneck.args.regularizer")
    values = {
        "codebook_size": reg_args.get("codebook_size"),
        "codebook_dim": inner.get("bottleneck_dim"),
        "l2_normalized": bool(reg_args.get("l2_normalized", False)),
        "tokens": args.get("bottleneck_token_num", 256),
        "input_size": args.get("input_size", 384),
        "select_layer": args.get("select_layer_id", -2),
        "teacher": args.get("teacher", "google/siglip2-so400m-patch14-384"),
    }
    for name in ("codebook_size", "codebook_dim", "tokens", "input_size"):
        if not isinstance(values[name], int) or values[name] <= 0:
            raise ConversionError(f"TA-Tok file {path}: {name} = {values[name]!r} must be a positive integer")
    return TATokArgs(**values)


def find_ta_tok(explicit: str | None, named: str | None) -> Path:
    """``--ta-tok``, else the path config.json names (``mm_vision_tower``) if it exists here, else the
    HF cache's ``csuhan/TA-Tok/ta_tok.pth``."""
    if explicit is not None:
        return Path(explicit).expanduser()
    if named and Path(named).expanduser().is_file():
        return Path(named).expanduser()
    cached = cached_file(TA_TOK_REPO, TA_TOK_FILE)
    if cached is not None:
        return cached
    raise ConversionError(
        f"the TA-Tok file is needed (config.json names {named!r}, not present here) and is not in the Hugging "
        f"Face cache; on a machine with internet run `hf download {TA_TOK_REPO} {TA_TOK_FILE}` (same HF_HOME) "
        "or pass --ta-tok FILE"
    )


def siglip_arch(weights: TensorStore, prefix: str, teacher: str) -> dict[str, Any]:
    """SiglipVisionConfig keyword arguments of the TA-Tok encoder under ``prefix``: sizes read from the
    weights, head count, activation and norm epsilon from the teacher's configuration (a known one, or
    a local / HF-cache directory with its config.json), cross-checked."""
    patch = weights.shape(f"{prefix}embeddings.patch_embedding.weight")  # [hidden, channels, p, p]
    positions = weights.shape(f"{prefix}embeddings.position_embedding.weight")[0]
    layer = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    layers = {int(m.group(1)) for key in weights.names() if (m := layer.match(key))}
    side = round(positions**0.5) * patch[-1]
    measured = {
        "hidden_size": patch[0],
        "num_channels": patch[1],
        "patch_size": patch[-1],
        "image_size": side,
        "num_hidden_layers": len(layers),
        "intermediate_size": weights.shape(f"{prefix}encoder.layers.0.mlp.fc1.weight")[0],
        "vision_use_head": f"{prefix}head.probe" in weights,
    }
    known = _teacher_config(teacher)
    for key in ("hidden_size", "patch_size", "image_size", "num_hidden_layers", "intermediate_size"):
        if key in known and known[key] != measured[key]:
            raise ConversionError(
                f"TA-Tok encoder weights have {key}={measured[key]}, but its teacher {teacher!r} has {known[key]}"
            )
    return {
        **measured,
        "num_attention_heads": known["num_attention_heads"],
        "hidden_act": known.get("hidden_act", "gelu_pytorch_tanh"),
        "layer_norm_eps": known.get("layer_norm_eps", 1e-6),
        "attention_dropout": 0.0,
    }


def _teacher_config(teacher: str) -> dict[str, Any]:
    if teacher in KNOWN_TEACHERS:
        return KNOWN_TEACHERS[teacher]
    local = (
        Path(teacher).expanduser() / "config.json"
        if looks_like_path(teacher)
        else cached_file(teacher, "config.json")
    )
    if local is None or not local.is_file():
        raise ConversionError(
            f"TA-Tok's teacher {teacher!r} is not a known SigLIP2 configuration ({', '.join(KNOWN_TEACHERS)}) and "
            "its config.json is not here: the encoder's head count cannot be read from the weights"
        )
    config = read_json(local, "TA-Tok teacher")
    vision = config.get("vision_config", config)
    if "num_attention_heads" not in vision:
        raise ConversionError(f"TA-Tok teacher config {local} has no vision_config.num_attention_heads")
    return vision
