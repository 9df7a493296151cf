"""Write a checked conversion plan as an rlrestore policy directory.

The policy is built on the meta device from its config (no memory, no random init), its expected
tensors are compared with the plan, and the source tensors are assigned as they are (dtype kept,
bf16 stays bf16); ``PrefRestorePolicy.save_pretrained`` then writes the directory that
``PrefRestorePolicy.from_pretrained`` reads. The directory appears only once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlrestore.config import PolicyConfig
from rlrestore.convert.keymap import IgnoredGroup, Plan, check
from rlrestore.convert.sources import ConversionError
from rlrestore.convert.tokenizer import TokenIds, convert_tokenizer
from rlrestore.policies.prefrestore import PrefRestorePolicy

REPORT = "convert_report.json"
LM_HEAD, EMBED = "integrator.lm_head.weight", "integrator.model.embed_tokens.weight"


@dataclass
class ConversionReport:
    """What a conversion did; written to ``<out>/convert_report.json``."""

    format: str = ""
    source: str = ""
    sana: str = ""
    ta_tok: str = ""
    output: str = ""
    tensors: int = 0
    parameters: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    tokenizer_tokens_removed: int = 0
    checked_copies: int = 0
    ignored: list[IgnoredGroup] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        counts = (
            f"  {self.tensors} tensors ({self.parameters / 1e6:.1f} M values, {self.dtypes}), "
            f"{self.checked_copies} duplicate tensors checked, {self.tokenizer_tokens_removed} image tokens "
            "moved out of the tokenizer"
        )
        lines = [f"converted {self.format} {self.source} -> {self.output}", counts]
        lines += [f"  left out {g.count} tensors {g.source}: {g.prefix}* ({g.reason})" for g in self.ignored]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _prepare_output(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"--out {out} already exists and is not empty; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def _meta_policy(config: PolicyConfig, tokenizer_dir: Path) -> PrefRestorePolicy:
    build = config.model_copy(update={"text_tokenizer": str(tokenizer_dir)})
    with torch.device("meta"):
        return PrefRestorePolicy.from_config(build)


# The DiT and the z_low connector live in the policy's velocity model; conversion rules name them
# as the policy directory does (transformer/, vae_connector.*).
VELOCITY_PARTS = ("transformer.", "vae_connector.")


def _module_key(key: str) -> str:
    """A conversion key as the policy module's state-dict key."""
    return f"velocity_model.{key}" if key.startswith(VELOCITY_PARTS) else key


def _conversion_key(key: str) -> str:
    """A policy module's state-dict key as the conversion rules name it."""
    return key.removeprefix("velocity_model.")


def _fresh_tensors(policy: PrefRestorePolicy, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """New modules' weights, initialised as PyTorch initialises them (seed 0)."""
    torch.manual_seed(0)
    tensors = {}
    for prefix in prefixes:
        module = policy.get_submodule(_module_key(prefix).rstrip("."))
        module.to_empty(device="cpu")
        for child in module.modules():
            if hasattr(child, "reset_parameters"):
                child.reset_parameters()
        tensors.update({prefix + key: value for key, value in module.state_dict().items()})
    return tensors


def write_policy(
    config: PolicyConfig,
    source_dir: Path,
    ids: TokenIds,
    result: Plan,
    out: Path,
    report: ConversionReport,
    fresh: tuple[str, ...] = (),
) -> ConversionReport:
    """Check ``result`` against the policy ``config`` builds, then write the policy directory ``out``
    (with ``report``, completed, as convert_report.json)."""
    staging = _prepare_output(out)
    report.output, report.fresh, report.ignored = str(out), list(fresh), result.ignored
    with tempfile.TemporaryDirectory(prefix="rlrestore-tokenizer-") as tokenizer_dir:
        report.tokenizer_tokens_removed = convert_tokenizer(source_dir, ids, Path(tokenizer_dir))
        try:
            policy = _meta_policy(config, Path(tokenizer_dir))
        except (OSError, ValueError) as exc:
            raise ConversionError(f"the converted configuration does not build: {exc}") from None
        expected = {_conversion_key(key): value.shape for key, value in policy.state_dict().items()}
        tied = bool(config.integrator.arch.get("tie_word_embeddings", False))
        if tied:
            expected.pop(LM_HEAD)
        report.notes += check(result, expected, fresh)
        report.checked_copies = sum(len(copy.keys) for copy in result.copies)
        tensors = {key: assignment.load() for key, assignment in result.assignments.items()}
        tensors.update(_fresh_tensors(policy, fresh))
        if tied:
            tensors[LM_HEAD] = tensors[EMBED]
        policy.load_state_dict({_module_key(k): v for k, v in tensors.items()}, strict=True, assign=True)
        if tied:
            policy.integrator.tie_weights()
        policy.config = config
        try:
            policy.save_pretrained(staging)
            report.tensors = len(tensors)
            report.parameters = sum(t.numel() for k, t in tensors.items() if not (tied and k == LM_HEAD))
            report.dtypes = dict(Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values()))
            (staging / REPORT).write_text(json.dumps(asdict(report), indent=2))
            if out.exists():
                out.rmdir()
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return report
