"""The integrator's text tokenizer and its extended vocabulary.

Pref-Restore extends the Qwen3 vocabulary with ``<im_start>``, ``<im_end>``, scale tokens
``<S0>..<S2>`` and image tokens ``<I0>..<I{V-1}>``. The special tokens are added to the text
tokenizer; the V image tokens are kept out of it (65,536 added strings make it slow) and mapped
arithmetically: ``image token id = first_image_id + code``.
"""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from rlrestore.models.loading import CheckpointError, hint_download

IMAGE_PLACEHOLDER = "<image>"
IM_START, IM_END = "<im_start>", "<im_end>"
SCALE_TOKENS = ("<S0>", "<S1>", "<S2>")
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (IMAGE_PLACEHOLDER, IM_START, IM_END, *SCALE_TOKENS)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A 256-symbol byte-level tokenizer for tiny random-init integrators (no download needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    vocab[PAD_TOKEN] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD_TOKEN, eos_token=PAD_TOKEN)


def load_text_tokenizer(source: str | None) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a directory/HF cache (never downloading), or build the byte-level one."""
    if source is None:
        tokenizer = byte_level_tokenizer()
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError):
            raise CheckpointError(hint_download("policy.text_tokenizer", source)) from None
    missing = [token for token in SPECIAL_TOKENS if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or PAD_TOKEN
    return tokenizer


class Vocabulary:
    """Ids of the special and image tokens of one text tokenizer + codebook size."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, codebook_size: int) -> None:
        self.tokenizer = tokenizer
        self.codebook_size = codebook_size
        ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        self.image_placeholder, self.im_start, self.im_end, *self.scales = ids
        self.pad = tokenizer.pad_token_id
        self.first_image_id = len(tokenizer)

    @property
    def size(self) -> int:
        """Rows the integrator's embedding needs: text tokens + V image tokens."""
        return self.first_image_id + self.codebook_size

    def image_ids(self, codes: list[int]) -> list[int]:
        """``<I{code}>`` ids of visual codes."""
        return [self.first_image_id + code for code in codes]

    def prompt_ids(self, template: str, lq_codes: list[int]) -> list[int]:
        """Token ids of a prompt whose ``<image>`` is the LQ image block, ending with the trigger.

        Layout: text before <image> | <im_start><S0> <I..> x N <im_end> | text after |
        <im_start><S0> (the trigger after which the N target image tokens follow).
        """
        if template.count(IMAGE_PLACEHOLDER) != 1:
            raise ValueError(f"prompt {template!r} must contain {IMAGE_PLACEHOLDER} exactly once")
        before, after = template.split(IMAGE_PLACEHOLDER)
        encode = lambda text: self.tokenizer.encode(text, add_special_tokens=False)
        image_block = [self.im_start, self.scales[0], *self.image_ids(lq_codes), self.im_end]
        return [*encode(before), *image_block, *encode(after), self.im_start, self.scales[0]]
