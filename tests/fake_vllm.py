"""A stand-in for vLLM's offline API (vLLM cannot be installed here: CUDA builds pinned to their own torch).

It implements the documented interface rlrestore codes against and nothing more, so a misnamed
argument fails as it would with vLLM: ``LLM(model=<HF folder>, ...)`` loads the folder with
transformers (so the exported integrator must be a loadable Hugging Face model), ``SamplingParams`` takes
exactly the documented fields rlrestore uses and validates them as vLLM does, ``TokensPrompt`` is a
TypedDict, and ``LLM.generate(prompts, sampling_params=[...], use_tqdm=False)`` returns, per prompt and
in order, an object whose ``outputs[0].token_ids`` are the generated ids: greedy at temperature 0, else
temperature, then top-k, then top-p (vLLM's order), seeded per request, only ``allowed_token_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, TypedDict

import torch
from transformers import AutoModelForCausalLM

from rlrestore.policies.prefrestore.ar_backends import VLLMApi


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]


@dataclass
class SamplingParams:
    """The documented fields of ``vllm.SamplingParams`` that rlrestore sets, with vLLM's defaults."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    detokenize: bool = True
    allowed_token_ids: list[int] | None = field(default=None)

    def __post_init__(self) -> None:  # vLLM's own checks of these fields
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must be less than or equal to max_tokens")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids is not None and empty!")


class LLM:
    """``vllm.LLM`` over a Hugging Face folder; every instance and call is recorded for the tests."""

    instances: ClassVar[list[LLM]] = []

    def __init__(self, model: str, skip_tokenizer_init: bool = False, dtype: str = "auto", seed: int = 0,
                 gpu_memory_utilization: float = 0.9, enforce_eager: bool = False,
                 max_model_len: int | None = None) -> None:  # fmt: skip
        self.model_path = Path(model)
        self.kwargs = {"skip_tokenizer_init": skip_tokenizer_init, "dtype": dtype, "seed": seed,
                       "gpu_memory_utilization": gpu_memory_utilization, "enforce_eager": enforce_eager,
                       "max_model_len": max_model_len}  # fmt: skip
        torch_dtype = getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(
            model, dtype=torch_dtype, local_files_only=True
        ).eval()
        self.calls: list[tuple[list[dict], list[SamplingParams]]] = []
        LLM.instances.append(self)

    @torch.no_grad()
    def generate(
        self, prompts: list[dict], sampling_params: list[SamplingParams], use_tqdm: bool = True
    ) -> list[Any]:
        self.calls.append((prompts, sampling_params))
        return [
            self._one(p["prompt_token_ids"], params)
            for p, params in zip(prompts, sampling_params, strict=True)
        ]

    def _one(self, prompt: list[int], params: SamplingParams) -> Any:
        assert params.ignore_eos and params.min_tokens == params.max_tokens, (
            "the fake generates exactly max_tokens"
        )
        generator = torch.Generator().manual_seed(params.seed if params.seed is not None else 0)
        vocab = self.model.config.vocab_size
        allowed = torch.zeros(vocab, dtype=torch.bool)
        allowed[params.allowed_token_ids if params.allowed_token_ids is not None else slice(None)] = True
        ids, generated = torch.tensor([prompt]), []
        out = self.model(input_ids=ids, use_cache=True)
        for _ in range(params.max_tokens):
            logits = out.logits[0, -1].float().masked_fill(~allowed, float("-inf"))
            token = _pick(logits, params, generator)
            generated.append(token)
            out = self.model(
                input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True
            )
        return SimpleNamespace(prompt_token_ids=prompt, outputs=[SimpleNamespace(token_ids=tuple(generated))])


def _pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    if params.temperature == 0.0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    ordered, order = probs.sort(descending=True)
    drop = ordered.cumsum(-1) - ordered > params.top_p
    probs[order[drop]] = 0.0
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def fake_api() -> VLLMApi:
    return VLLMApi(LLM=LLM, SamplingParams=SamplingParams, TokensPrompt=TokensPrompt)
