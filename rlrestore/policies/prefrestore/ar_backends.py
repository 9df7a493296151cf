"""vLLM as the integrator's code generator (``policy.ar_backend: vllm``).

vLLM generates the N semantic codes from token-id prompts; the hidden states the DiT is conditioned
on still come from the integrator's own teacher-forced pass (``SemanticIntegrator.semantic_states``),
since vLLM's ``generate`` returns token ids only. Coded against vLLM's documented offline API (pinned
in the ``vllm`` extra of pyproject.toml): ``LLM(model=..., skip_tokenizer_init=True, dtype, seed,
gpu_memory_utilization, enforce_eager, max_model_len)``, ``SamplingParams(n, temperature, top_k, top_p,
seed, max_tokens, min_tokens, ignore_eos, detokenize, allowed_token_ids)``, ``vllm.inputs.TokensPrompt``
and ``LLM.generate(prompts, sampling_params=[...], use_tqdm=False)`` returning one ``RequestOutput`` per
prompt, in order, whose ``outputs[0].token_ids`` are the generated ids.

vLLM loads the integrator from a Hugging Face folder: :func:`export_integrator` writes it once per
weights fingerprint. The integrator is frozen wherever codes are generated (Stage 2 rollouts, Stage
1.2), so an engine is built once per policy object; :class:`VLLMCodeGenerator` refuses to decode
with an engine whose weights no longer match the integrator's.

vLLM is imported lazily (:func:`import_vllm`), so nothing here needs it until an engine is built.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rlrestore.config import SamplerConfig, VLLMOptions
from rlrestore.models.text_tokenizer import Vocabulary

INSTALL_HINT = (
    "install vLLM (the `vllm` extra of pyproject.toml, a CUDA build; README, 'policy.ar_backend') where the "
    "policy decodes, or set policy.ar_backend=hf (or policy.vllm.fallback=hf to decode with hf where vLLM "
    "cannot run)"
)
EXPORT_MARKER = "rlrestore_export.json"  # written last: a folder without it is incomplete
VLLM_MAX_TEMPERATURE = 2.0  # SamplingParams refuses temperatures above it


class VLLMUnavailableError(RuntimeError):
    """``policy.ar_backend=vllm`` where vLLM cannot run; the message says why and what to do."""


@dataclass(frozen=True)
class VLLMApi:
    """The three names of vLLM's offline API this module uses (tests put a fake engine here)."""

    LLM: Any
    SamplingParams: Any
    TokensPrompt: Any


def import_vllm() -> VLLMApi:
    """vLLM's ``LLM``, ``SamplingParams`` and ``TokensPrompt``, imported now."""
    import vllm
    from vllm.inputs import TokensPrompt

    return VLLMApi(LLM=vllm.LLM, SamplingParams=vllm.SamplingParams, TokensPrompt=TokensPrompt)


def unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why vLLM cannot decode here (None if it can): not installed, no CUDA, or a non-CUDA device."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed in this Python environment"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to this process (vLLM's wheels run on CUDA GPUs only)"
    if device is not None and device.type != "cuda":
        return f"the integrator is on {device}, not on a CUDA device"
    return None


def vllm_usable(options: VLLMOptions, device: torch.device | None = None) -> bool:
    """Whether to decode with vLLM: True if it can run here; False (with a warning) if it cannot and
    ``policy.vllm.fallback`` is 'hf'; otherwise :class:`VLLMUnavailableError`."""
    reason = unavailable_reason(device)
    if reason is None:
        return True
    if options.fallback == "hf":
        warnings.warn(
            f"policy.ar_backend=vllm: {reason}; decoding with the hf backend (policy.vllm.fallback=hf)",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    raise VLLMUnavailableError(f"policy.ar_backend=vllm, but {reason}: {INSTALL_HINT}")


# ----------------------------------------------------------------------------- requests
def prompt_token_lists(prompt_ids: Tensor, prompt_mask: Tensor) -> list[list[int]]:
    """The unpadded token ids of each left-padded prompt row."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)]


def input_seeds(sampler: SamplerConfig, batch: int, generator: torch.Generator) -> list[int | None]:
    """One vLLM seed per input, drawn from ``generator`` when sampling; greedy decoding draws none
    (so the generator's later draws are those of the hf backend)."""
    if sampler.ar_sampling == "greedy":
        return [None] * batch
    return torch.randint(0, 2**31 - 1, (batch,), generator=generator).tolist()


def sampling_arguments(
    sampler: SamplerConfig, vocabulary: Vocabulary, num_codes: int, seed: int | None
) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments of one input: only image tokens, exactly ``num_codes`` of
    them, greedy (temperature 0) or temperature / top-k / top-p as the hf backend samples."""
    first, count = vocabulary.first_image_id, vocabulary.codebook_size
    arguments: dict[str, Any] = {
        "n": 1,
        "max_tokens": num_codes,
        "min_tokens": num_codes,
        "ignore_eos": True,
        "detokenize": False,
        "allowed_token_ids": list(range(first, first + count)),
        "seed": seed,
    }
    if sampler.ar_sampling == "greedy":
        return {**arguments, "temperature": 0.0}
    if sampler.ar_temperature > VLLM_MAX_TEMPERATURE:
        raise ValueError(
            f"sampler.ar_temperature={sampler.ar_temperature}: vLLM samples at temperatures up to "
            f"{VLLM_MAX_TEMPERATURE}; lower it or set policy.ar_backend=hf"
        )
    top_k = min(sampler.ar_top_k, count)
    return {**arguments, "temperature": sampler.ar_temperature, "top_k": top_k, "top_p": sampler.ar_top_p}


def codes_from_outputs(outputs: list[Any], vocabulary: Vocabulary, num_codes: int) -> Tensor:
    """[B, N] codes of vLLM's ``RequestOutput`` list (``outputs[0].token_ids`` image-token ids)."""
    first, count = vocabulary.first_image_id, vocabulary.codebook_size
    rows = []
    for index, output in enumerate(outputs):
        ids = list(output.outputs[0].token_ids)
        if len(ids) != num_codes:
            raise RuntimeError(
                f"vLLM returned {len(ids)} tokens for input {index}, expected {num_codes} codes"
            )
        outside = [token for token in ids if not first <= token < first + count]
        if outside:
            raise RuntimeError(
                f"vLLM returned token ids {outside[:5]} for input {index}, outside the image tokens "
                f"[{first}, {first + count})"
            )
        rows.append(ids)
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), num_codes) - first


# ----------------------------------------------------------------------------- the model folder
CONFIG_BOOKKEEPING = ("architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path")


def integrator_fingerprint(integrator: nn.Module) -> str:
    """sha256 of the integrator's config (less what ``save_pretrained`` fills in) and its tensors'
    names, dtypes, shapes and bytes."""
    config = {k: v for k, v in integrator.config.to_dict().items() if k not in CONFIG_BOOKKEEPING}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(integrator.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return digest.hexdigest()


def export_integrator(integrator: nn.Module, root: Path, fingerprint: str) -> Path:
    """The integrator as a Hugging Face folder vLLM loads (``save_pretrained``: config.json +
    safetensors), at ``root/integrator-<fingerprint>``; written once (into a temporary folder renamed
    into place, so actors sharing ``root`` reuse it and never see a partial one)."""
    folder = root / f"integrator-{fingerprint[:24]}"
    if (folder / EXPORT_MARKER).is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-integrator-", dir=root))
    try:
        integrator.save_pretrained(staging)
        (staging / EXPORT_MARKER).write_text(json.dumps({"fingerprint": fingerprint}))
        if folder.exists():  # an incomplete folder of an interrupted write
            shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    except OSError:
        if not (folder / EXPORT_MARKER).is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def export_root(options: VLLMOptions) -> Path:
    return Path(options.export_dir) if options.export_dir else Path(tempfile.gettempdir()) / "rlrestore-vllm"


def _weight_versions(integrator: nn.Module) -> list[tuple[int, int]]:
    """(storage address, in-place version counter) of every tensor: changes with any optimizer step,
    ``load_state_dict`` or move, at no cost (the exact fingerprint is taken only when it changes)."""
    tensors = [*integrator.parameters(), *integrator.buffers()]
    return [(tensor.data_ptr(), tensor._version) for tensor in tensors]


# ----------------------------------------------------------------------------- the generator
class VLLMCodeGenerator:
    """A vLLM engine over one integrator's weights and the requests that generate codes with it."""

    def __init__(self, options: VLLMOptions) -> None:
        self.options = options
        self.engine: Any = None
        self.api: VLLMApi | None = None
        self.folder: Path | None = None
        self.fingerprint: str | None = None
        self._versions: list[tuple[int, int]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies (``copy.deepcopy`` of a policy, pickling) start without an engine."""
        return {"options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["options"])

    def engine_for(self, integrator: nn.Module) -> Any:
        """The engine over ``integrator``'s current weights: built on first use; refused if the
        weights changed since (the vllm backend decodes a frozen integrator)."""
        if self.engine is None:
            self.api = import_vllm()
            self.fingerprint = integrator_fingerprint(integrator)
            self.folder = export_integrator(integrator, export_root(self.options), self.fingerprint)
            dtype = str(next(integrator.parameters()).dtype).removeprefix("torch.")
            self.engine = self.api.LLM(
                model=str(self.folder), skip_tokenizer_init=True, dtype=dtype, seed=0,
                gpu_memory_utilization=self.options.gpu_memory_utilization,
                enforce_eager=self.options.enforce_eager, max_model_len=self.options.max_model_len,
            )  # fmt: skip
        elif (
            _weight_versions(integrator) != self._versions
            and integrator_fingerprint(integrator) != self.fingerprint
        ):
            raise RuntimeError(
                "policy.ar_backend=vllm decodes a frozen integrator, but its weights changed after the vLLM "
                f"engine was built from {self.folder}: train the integrator with ar_backend=hf, or load the "
                "changed policy again (a new policy object builds a new engine)"
            )
        self._versions = _weight_versions(integrator)
        return self.engine

    def generate(
        self, integrator: nn.Module, vocabulary: Vocabulary, num_codes: int,
        prompt_ids: Tensor, prompt_mask: Tensor, sampler: SamplerConfig, generator: torch.Generator,
    ) -> Tensor:  # fmt: skip
        """[B, N] codes of the prompts, on the integrator's device."""
        engine = self.engine_for(integrator)
        assert self.api is not None
        seeds = input_seeds(sampler, prompt_ids.shape[0], generator)
        prompts = [
            self.api.TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_lists(prompt_ids, prompt_mask)
        ]
        params = [
            self.api.SamplingParams(**sampling_arguments(sampler, vocabulary, num_codes, s)) for s in seeds
        ]
        outputs = engine.generate(prompts, sampling_params=params, use_tqdm=False)
        return codes_from_outputs(outputs, vocabulary, num_codes).to(prompt_ids.device)


def vllm_generator(options: VLLMOptions, device: torch.device | None = None) -> VLLMCodeGenerator | None:
    """The vLLM generator of ``policy.ar_backend=vllm``, or None where the fallback decodes with hf."""
    return VLLMCodeGenerator(options) if vllm_usable(options, device) else None
