"""Tiny random-weight checkpoints of the model rewards, in each reward's real on-disk format.

For tests, for ``rlrestore bench`` and for trying a config without downloading any weights: each
``write_tiny_*`` function builds the reward's real library model from a tiny config, with random
weights (seeded; the global RNG is left as it was), saves it the way the published weights are
saved, and returns the reward ``args`` that load it through the reward's normal code path::

    args = write_tiny_clip(tmp / "clip")
    reward = build_reward(RewardSpec(name="pickscore", args=args))

- ``hpsv2``: an open_clip ``{'state_dict': ...}`` file of ``ViT-H-14`` with the tiny
  :data:`TINY_OPEN_CLIP` architecture (passed as ``model_config``), like ``HPS_v2.1_compressed.pt``;
- ``pickscore`` / ``clipscore`` / ``clipscore_image``: a transformers ``CLIPModel`` and its
  ``CLIPProcessor`` (``save_pretrained`` directory), 32 px images and a letters-only BPE vocabulary;
- ``identity``: an arcface_torch IResNet state dict like ``backbone.pth``. The IResNet widths are
  fixed, so the network is the smallest published architecture (``iresnet18``, 13 M parameters,
  about 0.1 s per face on one CPU thread) with a 64-d embedding.

The scores mean nothing; shapes, formats, loading and speed are those of the real models.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPProcessor

__all__ = [
    "TINY_OPEN_CLIP",
    "tiny_clip",
    "tiny_reward_args",
    "write_tiny_arcface",
    "write_tiny_clip",
    "write_tiny_hpsv2",
]

TINY_OPEN_CLIP: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
"""open_clip ``model_config`` of the tiny HPSv2 model: a 2-layer ViT on 32 px images and a 2-layer
text tower; the text keeps CLIP's BPE vocabulary (49408) and context (77), so open_clip's shipped
tokenizer fits it."""

_CLIP_SIZE = 32  # image side of the tiny transformers CLIP (processor resize and crop)


def write_tiny_hpsv2(path: str | Path, seed: int = 0) -> dict[str, Any]:
    """Save a random tiny open_clip model as an HPS checkpoint file at ``path``; returns the ``hpsv2`` args."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model("ViT-H-14", pretrained=None, **TINY_OPEN_CLIP)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, path)
    return {"checkpoint": str(path), "model_config": copy.deepcopy(TINY_OPEN_CLIP)}


def tiny_clip(seed: int = 0) -> tuple[CLIPModel, CLIPProcessor]:
    """A random tiny transformers ``CLIPModel`` (eval mode) and its ``CLIPProcessor`` (same seed, same model)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    # A valid BPE vocabulary: the letters, word-final letters and a few merges.
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>")]
    tokens = [*letters, *(f"{c}</w>" for c in letters), *("".join(pair) for pair in merges)]
    vocab = {token: index for index, token in enumerate([*tokens, "<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**tower, "image_size": _CLIP_SIZE, "patch_size": 8},
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": _CLIP_SIZE}, crop_size={"height": _CLIP_SIZE, "width": _CLIP_SIZE}
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def write_tiny_clip(directory: str | Path, seed: int = 0) -> dict[str, Any]:
    """Save :func:`tiny_clip` (model and processor) to ``directory``; returns the args of
    ``pickscore``, ``clipscore`` and ``clipscore_image`` (``model`` and ``processor``)."""
    model, processor = tiny_clip(seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return {"model": str(directory), "processor": str(directory)}


def write_tiny_arcface(
    path: str | Path, arch: str = "iresnet18", num_features: int = 64, seed: int = 0
) -> dict[str, Any]:
    """Save a random ``arch`` IResNet state dict at ``path`` like ``backbone.pth``; returns the ``identity`` args.

    The BatchNorm running statistics are random too (not the identity), so a test of the forward
    pass sees them used.
    """
    from rewards.networks.arcface import iresnet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = iresnet(arch, num_features)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                    module.running_mean.uniform_(-0.1, 0.1)
                    module.running_var.uniform_(0.5, 2.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return {"checkpoint": str(path), "arch": arch}


_WRITERS = {
    "hpsv2": lambda directory: write_tiny_hpsv2(directory / "hps_tiny.pt"),
    "pickscore": write_tiny_clip,
    "clipscore": write_tiny_clip,
    "clipscore_image": write_tiny_clip,
    "identity": lambda directory: write_tiny_arcface(directory / "backbone.pth"),
}


def tiny_reward_args(name: str, directory: str | Path) -> dict[str, Any]:
    """Args of reward ``name`` with tiny weights written under ``directory`` (created).

    Rewards without a tiny model get ``{}``: enough for those that need no weights (``sharpness``,
    ``psnr``, ...); any other then refuses to build, listing the files it misses.
    """
    writer = _WRITERS.get(name)
    if writer is None:
        return {}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return writer(directory)
