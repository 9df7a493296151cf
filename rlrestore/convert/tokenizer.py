"""The integrator's tokenizer of a BLIP3o-family checkpoint, rewritten for rlrestore's vocabulary.

BLIP3o's tokenizer holds Qwen's text tokens, then ``<im_start>``, ``<im_end>``, ``<S0>..<S2>`` and the
V image tokens ``<I0>..<I{V-1}>`` as added tokens (and often ``<image>`` after them, added at training
time without an embedding row). rlrestore maps image tokens arithmetically, so the converted
tokenizer keeps everything before ``<I0>``: the ids of every kept token are unchanged and the first
image id is the tokenizer's length (the ``blip3o`` layout of ``policy.vocabulary``).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlrestore.convert.sources import ConversionError, read_json

IMAGE_TOKEN = re.compile(r"<I\d+>")
DROPPABLE = "<image>"  # BLIP3o's prompt placeholder: replaced by the image before embedding, no row
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
COPIED_FILES = ("vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class TokenIds:
    """The token ids config.json records (``image_start_tag_id`` is ``<im_start>``, ...)."""

    im_start: int
    im_end: int
    scale_start: int
    scale_end: int
    image_start: int
    image_end: int

    @classmethod
    def from_config(cls, config: dict[str, Any], path: Path) -> TokenIds:
        fields = {
            "im_start": "image_start_tag_id",
            "im_end": "image_end_tag_id",
            "scale_start": "scale_start_token_id",
            "scale_end": "scale_end_token_id",
            "image_start": "image_start_token_id",
            "image_end": "image_end_token_id",
        }
        missing = [name for name in fields.values() if not isinstance(config.get(name), int)]
        if missing:
            raise ConversionError(f"{path}: token id field(s) {', '.join(missing)} missing or not integers")
        return cls(**{attr: config[name] for attr, name in fields.items()})

    def expected_tokens(self) -> dict[str, tuple[str, int]]:
        """token -> (config.json field, id)."""
        scales = self.scale_end - self.scale_start
        return {
            "<im_start>": ("image_start_tag_id", self.im_start),
            "<im_end>": ("image_end_tag_id", self.im_end),
            "<S0>": ("scale_start_token_id", self.scale_start),
            f"<S{scales}>": ("scale_end_token_id", self.scale_end),
            "<I0>": ("image_start_token_id", self.image_start),
            f"<I{self.image_end - self.image_start}>": ("image_end_token_id", self.image_end),
        }

    def check_layout(self, path: Path) -> None:
        """<im_start>, <im_end>, <S0>..<S2> at consecutive ids, then <I0>: the blip3o layout."""
        order = [self.im_start, self.im_end, self.scale_start, self.scale_end, self.image_start]
        expected = [self.im_start, self.im_start + 1, self.im_start + 2, self.im_start + 4, self.im_start + 5]
        if order != expected:
            raise ConversionError(
                f"{path}: token ids {self} do not follow the BLIP3o layout <im_start>, <im_end>, <S0>..<S2>, <I0> "
                "at consecutive ids"
            )


def convert_tokenizer(source: Path, ids: TokenIds, out: Path) -> int:
    """Write ``source``'s tokenizer without its image tokens to ``out``; returns the number of tokens
    removed. Refuses when the token ids disagree with config.json."""
    tokenizer_json = source / "tokenizer.json"
    data = read_json(tokenizer_json, "tokenizer")
    added = data.get("added_tokens")
    if not isinstance(added, list):
        raise ConversionError(f"{tokenizer_json} has no 'added_tokens' list")
    by_content = {token.get("content"): token.get("id") for token in added if isinstance(token, dict)}
    vocab = data.get("model", {}).get("vocab", {})
    for token, (field, expected) in ids.expected_tokens().items():
        found = by_content.get(token, vocab.get(token) if isinstance(vocab, dict) else None)
        if found != expected:
            raise ConversionError(
                f"{tokenizer_json}: token {token} has id {found}, but config.json's {field} is {expected}"
            )
    removed = _strip_images(data, ids.image_start, tokenizer_json)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    for name in TOKENIZER_FILES[1:]:
        if (source / name).is_file():
            (out / name).write_text(
                json.dumps(_filtered(read_json(source / name, "tokenizer")), ensure_ascii=False)
            )
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    return removed


def _strip_images(data: dict[str, Any], first_image: int, path: Path) -> int:
    """Drop the added tokens from ``first_image`` on: the image tokens and a trailing ``<image>``."""
    kept, removed = [], 0
    for token in data["added_tokens"]:
        if token["id"] < first_image:
            kept.append(token)
        elif IMAGE_TOKEN.fullmatch(token["content"]) or token["content"] == DROPPABLE:
            removed += 1
        else:
            raise ConversionError(
                f"{path}: added token {token['content']!r} (id {token['id']}) sits among the image tokens; "
                "the BLIP3o layout puts only <I0>.. and <image> there"
            )
    vocab = data.get("model", {}).get("vocab", {})
    beyond = (
        [token for token, index in vocab.items() if index >= first_image] if isinstance(vocab, dict) else []
    )
    if beyond:
        raise ConversionError(
            f"{path}: base vocabulary token {beyond[0]!r} has an id at or above <I0> ({first_image})"
        )
    data["added_tokens"] = kept
    return removed


def _is_image(token: Any) -> bool:
    content = token.get("content") if isinstance(token, dict) else token
    return isinstance(content, str) and (IMAGE_TOKEN.fullmatch(content) is not None or content == DROPPABLE)


def _filtered(config: Any) -> Any:
    """A tokenizer config without image tokens (in added_tokens_decoder, token lists and added_tokens.json)."""
    if isinstance(config, list):
        return [item for item in config if not _is_image(item)]
    if not isinstance(config, dict):
        return config
    return {
        key: _filtered(value) for key, value in config.items() if not _is_image(key) and not _is_image(value)
    }
