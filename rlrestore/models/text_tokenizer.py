"""The integrator's text tokenizer, its extended vocabulary and the AR prompt.

Pref-Restore extends the Qwen3 vocabulary with ``<im_start>``, ``<im_end>``, scale tokens
``<S0>..<S2>`` and image tokens ``<I0>..<I{V-1}>``. The special tokens live in the text tokenizer;
the V image tokens are kept out of it (65,536 added strings make it slow) and mapped
arithmetically: ``image token id = first_image_id + code``.

Two layouts (``policy.vocabulary``):

- ``rlrestore``: text tokens, then ``<image>``, ``<im_start>``, ``<im_end>``, ``<S0>..<S2>`` (each added
  where the tokenizer lacks it), then the image tokens.
- ``blip3o`` (BLIP3o-NEXT, the released Pref-Restore model): text tokens, then ``<im_start>``,
  ``<im_end>``, ``<S0>..<S2>`` at five consecutive ids, then ``<I0>``; ``<image>`` is no embedding row.

Two prompt formats (``policy.prompt_format``), see :meth:`Vocabulary.prompt_ids`.
"""

from __future__ import annotations

from typing import Literal

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from rlrestore.models.loading import CheckpointError, hint_download

IMAGE_PLACEHOLDER = "<image>"
IM_START, IM_END = "<im_start>", "<im_end>"
SCALE_TOKENS = ("<S0>", "<S1>", "<S2>")
PAD_TOKEN = "<|endoftext|>"
CHAT_START, CHAT_END = "<|im_start|>", "<|im_end|>"  # Qwen's chat-turn markers (text tokens)
SPECIAL_TOKENS = (IMAGE_PLACEHOLDER, IM_START, IM_END, *SCALE_TOKENS)
BLIP3O_SPECIAL_TOKENS = (IM_START, IM_END, *SCALE_TOKENS)
FIRST_IMAGE_TOKEN = "<I0>"

VocabularyLayout = Literal["rlrestore", "blip3o"]
PromptFormat = Literal["plain", "chat"]


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


def load_text_tokenizer(
    source: str | None, layout: VocabularyLayout = "rlrestore", prompt_format: PromptFormat = "plain"
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a directory/HF cache (never downloading), or build the byte-level one,
    and add the tokens the layout and prompt format need where it lacks them, in layout order."""
    if source is None:
        tokenizer = byte_level_tokenizer()
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError):
            raise CheckpointError(hint_download("policy.text_tokenizer", source)) from None
    vocab = tokenizer.get_vocab()
    if prompt_format == "chat":  # Qwen's chat markers are text tokens: they come before the layout's tokens
        markers = [token for token in (CHAT_START, CHAT_END) if token not in vocab]
        if markers:
            tokenizer.add_tokens(markers, special_tokens=True)
    wanted = SPECIAL_TOKENS if layout == "rlrestore" else BLIP3O_SPECIAL_TOKENS
    missing = [token for token in wanted if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or PAD_TOKEN
    return tokenizer


class Vocabulary:
    """Ids of the special and image tokens of one text tokenizer + codebook size."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, codebook_size: int, layout: VocabularyLayout = "rlrestore"
    ) -> None:
        self.tokenizer = tokenizer
        self.codebook_size = codebook_size
        self.layout = layout
        if layout == "rlrestore":
            ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
            self.image_placeholder, self.im_start, self.im_end, *self.scales = ids
            self.first_image_id = len(tokenizer)
        else:
            self.image_placeholder = None
            self.im_start, self.im_end, *self.scales = tokenizer.convert_tokens_to_ids(
                list(BLIP3O_SPECIAL_TOKENS)
            )
            self.first_image_id = _blip3o_first_image_id(
                tokenizer, [self.im_start, self.im_end, *self.scales]
            )
        self.pad = tokenizer.pad_token_id

    @property
    def size(self) -> int:
        """Rows the integrator's embedding needs: text tokens + V image tokens."""
        return self.first_image_id + self.codebook_size

    def image_ids(self, codes: list[int]) -> list[int]:
        """``<I{code}>`` ids of visual codes."""
        return [self.first_image_id + code for code in codes]

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text (no BOS/EOS added)."""
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def prompt_ids(
        self, template: str, lq_codes: list[int], prompt_format: PromptFormat = "plain", system: str = ""
    ) -> list[int]:
        """Token ids of a prompt whose ``<image>`` is the LQ image, ending with the trigger ``<im_start><S0>``
        after which the N target image tokens follow.

        ``plain``: text before <image> | <im_start><S0> <I..> x N <im_end> | text after | <im_start><S0>.
        ``chat``: the Qwen chat turns of the released model, the LQ codes bare in place of <image>::

            <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{before} <I..> x N {after}<|im_end|>\\n
            <|im_start|>assistant\\n<im_start><S0>
        """
        if template.count(IMAGE_PLACEHOLDER) != 1:
            raise ValueError(f"prompt {template!r} must contain {IMAGE_PLACEHOLDER} exactly once")
        before, after = template.split(IMAGE_PLACEHOLDER)
        trigger = [self.im_start, self.scales[0]]
        if prompt_format == "plain":
            image_block = [self.im_start, self.scales[0], *self.image_ids(lq_codes), self.im_end]
            return [*self.encode(before), *image_block, *self.encode(after), *trigger]
        head = f"{CHAT_START}system\n{system}{CHAT_END}\n{CHAT_START}user\n{before}"
        tail = f"{after}{CHAT_END}\n{CHAT_START}assistant\n"
        return [*self.encode(head), *self.image_ids(lq_codes), *self.encode(tail), *trigger]


def _blip3o_first_image_id(tokenizer: PreTrainedTokenizerBase, special_ids: list[int]) -> int:
    """First image id of the blip3o layout: right after the five consecutive special tokens.

    A tokenizer that still holds the image tokens (as BLIP3o's own files do) must have ``<I0>`` there;
    one without them (rlrestore's) must end there.
    """
    start = special_ids[0]
    if special_ids != list(range(start, start + len(special_ids))):
        names = dict(zip(BLIP3O_SPECIAL_TOKENS, special_ids, strict=True))
        raise ValueError(
            f"tokenizer does not follow the blip3o vocabulary layout: ids {names} are not consecutive"
        )
    expected = start + len(special_ids)
    first = tokenizer.convert_tokens_to_ids(FIRST_IMAGE_TOKEN)
    holds_images = FIRST_IMAGE_TOKEN in tokenizer.get_vocab()
    found = first if holds_images else len(tokenizer)
    if found != expected:
        where = (
            f"{FIRST_IMAGE_TOKEN} has id {first}"
            if holds_images
            else f"the tokenizer has {len(tokenizer)} tokens"
        )
        raise ValueError(
            f"tokenizer does not follow the blip3o vocabulary layout: the image tokens must start at {expected} "
            f"(right after <S2>), but {where}"
        )
    return expected
