"""The AR semantic integrator of Pref-Restore: prompts, the teacher-forced pass and code generation.

The Qwen3 causal LM reads the prompt (the degraded face's codes in the configured layout) and,
after the trigger ``<im_start><S0>``, the N semantic codes S as image tokens ``first_image_id + code``.
Its last-layer hidden states of the trigger and the N image positions become the semantic condition.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, Qwen3ForCausalLM

from rlrestore.config import PolicyConfig, SamplerConfig
from rlrestore.models.text_tokenizer import Vocabulary


class SemanticIntegrator:
    """Prompting and decoding around the integrator network (which the policy owns and trains)."""

    def __init__(self, integrator: Qwen3ForCausalLM, vocabulary: Vocabulary, config: PolicyConfig, num_codes: int) -> None:
        self.integrator = integrator
        self.vocabulary = vocabulary
        self.config = config
        self.num_codes = num_codes

    @property
    def device(self) -> torch.device:
        return self.integrator.get_input_embeddings().weight.device

    def prompt_batch(self, lq_codes: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and attention mask, one prompt per input (captioned or not)."""
        config = self.config
        prompts = []
        for codes, caption in zip(lq_codes.tolist(), captions, strict=True):
            template = config.caption_prompt.replace("{caption}", caption) if caption else config.prompt
            prompts.append(self.vocabulary.prompt_ids(template, codes, config.prompt_format, config.system_prompt))
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.vocabulary.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, length - len(prompt):] = torch.tensor(prompt)
            mask[row, length - len(prompt):] = 1
        return ids.to(self.device), mask.to(self.device)

    def semantic_states(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, codes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass over prompt + image tokens.

        Returns the last-layer hidden states of the trigger ``<S0>`` and the N image positions
        ([B, N + 1, H]) and the logits predicting the N codes ([B, N, vocab]).
        """
        n = codes.shape[1]
        ids = torch.cat([prompt_ids, codes + self.vocabulary.first_image_id], dim=1)
        mask = torch.cat([prompt_mask, torch.ones_like(codes)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.integrator(
            input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True, logits_to_keep=n + 1
        )
        return out.hidden_states[-1][:, -(n + 1):], out.logits[:, :n]

    @torch.no_grad()
    def generate_codes(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampler: SamplerConfig, generator: torch.Generator
    ) -> torch.Tensor:
        """Autoregressively generate N image codes (restricted to the image-token range), KV-cached."""
        vocab = self.vocabulary
        mask = prompt_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.integrator(
            input_ids=prompt_ids, attention_mask=mask, position_ids=positions, past_key_values=DynamicCache(),
            use_cache=True, logits_to_keep=1,
        )  # fmt: skip
        codes = []
        for _ in range(self.num_codes):
            code = pick_token(out.logits[:, -1, vocab.first_image_id : vocab.size].float(), sampler, generator)
            codes.append(code)
            mask = torch.cat([mask, torch.ones_like(code[:, None])], dim=1)
            positions = positions[:, -1:] + 1
            out = self.integrator(
                input_ids=code[:, None] + vocab.first_image_id, attention_mask=mask, position_ids=positions,
                past_key_values=out.past_key_values, use_cache=True,
            )  # fmt: skip
        return torch.stack(codes, dim=1)


def pick_token(logits: torch.Tensor, sampler: SamplerConfig, generator: torch.Generator) -> torch.Tensor:
    """Greedy or top-k / top-p sampling over image-token logits [B, V]."""
    if sampler.ar_sampling == "greedy":
        return logits.argmax(-1)
    logits = logits / sampler.ar_temperature
    top_k = min(sampler.ar_top_k, logits.shape[-1])
    values, indices = logits.topk(top_k, dim=-1)
    probs = values.softmax(-1)
    cumulative = probs.cumsum(-1)
    probs = probs.masked_fill(cumulative - probs > sampler.ar_top_p, 0.0)
    choice = torch.multinomial(probs.cpu() / probs.sum(-1, keepdim=True).cpu(), 1, generator=generator)
    return indices.gather(-1, choice.to(indices.device)).squeeze(-1)
