"""Tiny random checkpoints in the layout of the released Pref-Restore model and of BLIP3o-NEXT.

What their HF Trainer writes, at toy sizes: ``config.json`` (model_type ``blip3o_qwen`` with the token
ids, ``diffusion_name_or_path``, ``mm_vision_tower``), bf16 tensors in two safetensors shards with
``model.safetensors.index.json`` and the key names of their ``blip3oQwenForCausalLMVAE``, and the
tokenizer directory (Qwen-style BPE with ``<|im_start|>``/``<|im_end|>``, then ``<im_start>``,
``<im_end>``, ``<S0>``..``<S2>``, ``<I0>``.., and ``<image>`` added at training time). Next to it: a
base SANA diffusers folder (transformer/, vae/, scheduler/ with SANA's DPM-Solver config,
model_index.json) and a TA-Tok pickle ``{"model": {"args": ..., "sd": ...}}`` whose teacher is a
local SigLIP config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderDC, SanaTransformer2DModel
from safetensors.torch import save_file
from tokenizers import pre_tokenizers
from transformers import (
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

CODES, CODE_DIM, SIGLIP_HIDDEN, CAPTION = 64, 16, 32, 64
TOWER = "model.vision_tower.vision_tower."
# The chat template their preprocess_qwen installs (a fact of their code: one turn per message).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SANA_SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.32.0.dev0",
    "algorithm_type": "dpmsolver++", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995, "euler_at_final": False, "final_sigmas_type": "zero",
    "flow_shift": 3.0, "lower_order_final": True, "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction", "solver_order": 2, "solver_type": "midpoint", "steps_offset": 0,
    "thresholding": False, "timestep_spacing": "linspace", "use_flow_sigmas": True,
}  # fmt: skip
SIGLIP = {
    "hidden_size": SIGLIP_HIDDEN,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 16,
    "patch_size": 4,
}  # 4 x 4 = 16 codes per image
SANA = {
    "in_channels": 32,
    "out_channels": 32,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 2,
    "num_cross_attention_heads": 2,
    "cross_attention_head_dim": 16,
    "cross_attention_dim": 32,
    "caption_channels": CAPTION,
    "sample_size": 16,
    "patch_size": 1,
    "mlp_ratio": 2.5,
    "qk_norm": "rms_norm_across_heads",
}
DCAE = {"latent_channels": 32, "encoder_block_types": "ResBlock", "decoder_block_types": "ResBlock",
        "encoder_block_out_channels": [8, 16, 32, 32], "decoder_block_out_channels": [8, 16, 32, 32],
        "encoder_layers_per_block": [1, 1, 1, 1], "decoder_layers_per_block": [1, 1, 1, 1],
        "encoder_qkv_multiscales": [[], [], [], []], "decoder_qkv_multiscales": [[], [], [], []],
        "scaling_factor": 0.5}  # fmt: skip


@dataclass
class OfficialLayout:
    """Paths of one tiny official-layout checkpoint and the tensors written into it."""

    checkpoint: Path
    sana: Path
    ta_tok: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # checkpoint keys -> tensors
    ta_tok_sd: dict[str, torch.Tensor] = field(default_factory=dict)


def build_tokenizer(codes: int = CODES, with_image: bool = True) -> Qwen2Tokenizer:
    """A Qwen-style byte-level BPE, extended in the order BLIP3o's initialize_vision_tokenizer does."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    tokenizer.add_tokens(["<S0>", "<S1>", "<S2>"], special_tokens=False)
    tokenizer.add_tokens([f"<I{i}>" for i in range(codes)], special_tokens=False)
    if with_image:  # their preprocess adds it at training time, after the image tokens, with no embedding row
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    return tokenizer


def write_tokenizer(tokenizer: Qwen2Tokenizer, directory: Path) -> None:
    """Save it, plus the transformers-4.x files their HF Trainer writes alongside tokenizer.json."""
    tokenizer.save_pretrained(directory)
    data = json.loads((directory / "tokenizer.json").read_text())
    added = data["added_tokens"]
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.update(
        added_tokens_decoder={str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added},
        additional_special_tokens=[
            t["content"] for t in added if t["special"] and t["content"] != "<|endoftext|>"
        ],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        padding_side="right",
        tokenizer_class="Qwen2Tokenizer",
    )
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "added_tokens.json").write_text(json.dumps({t["content"]: t["id"] for t in added}))
    (directory / "special_tokens_map.json").write_text(
        json.dumps(
            {"additional_special_tokens": config["additional_special_tokens"], "pad_token": "<|endoftext|>"}
        )
    )
    (directory / "vocab.json").write_text(json.dumps(data["model"]["vocab"]))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in data["model"]["merges"])
    )


def _prefixed(prefix: str, module: torch.nn.Module, strip: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k.removeprefix(strip): v.detach().clone() for k, v in module.state_dict().items()}


def build_ta_tok_sd(seed: int) -> dict[str, torch.Tensor]:
    """TA-Tok's state dict at toy size, with its real key names (teacher included)."""
    torch.manual_seed(seed)
    encoder = SiglipVisionModel(SiglipVisionConfig(**SIGLIP))
    decoder = Siglip2VisionModel(
        Siglip2VisionConfig(
            patch_size=1,
            num_hidden_layers=1,
            num_channels=CODE_DIM,
            hidden_size=SIGLIP_HIDDEN,
            intermediate_size=64,
            num_attention_heads=2,
        )
    )
    linear = torch.nn.Linear
    sd = {**_prefixed("encoder.", encoder, "vision_model."), **_prefixed("decoder.", decoder)}
    sd.update(_prefixed("encode_task_layer.0.", linear(SIGLIP_HIDDEN, SIGLIP_HIDDEN)))
    sd.update(_prefixed("decode_task_layer.0.", linear(SIGLIP_HIDDEN, SIGLIP_HIDDEN)))
    sd.update(_prefixed("decode_task_layer.2.", linear(SIGLIP_HIDDEN, SIGLIP_HIDDEN)))
    sd.update(_prefixed("bottleneck.in_linear.", linear(SIGLIP_HIDDEN, CODE_DIM)))
    sd.update(_prefixed("bottleneck.out_linear.", linear(CODE_DIM, CODE_DIM)))
    sd["bottleneck.regularizer.embedding.weight"] = torch.randn(CODES, CODE_DIM)
    sd.update(_prefixed("bottleneck.regularizer.embedding_proj.", linear(CODE_DIM, CODE_DIM)))
    sd["scale_layer.shift"] = torch.full((1, 3, 1, 1), 0.5)
    sd["scale_layer.scale"] = torch.full((1, 3, 1, 1), 0.5)
    sd["teacher.embeddings.patch_embedding.weight"] = torch.randn(SIGLIP_HIDDEN, 3, 4, 4)
    return sd


def ta_tok_args(teacher: str) -> dict[str, Any]:
    """TA-Tok's args, with the fields of the released file (SimVQ, l2-normalised, stochastic lookup)."""
    regularizer = {
        "codebook_size": CODES,
        "commitment_loss_weight": 0.25,
        "codebook_loss_weight": 1.0,
        "entropy_loss_weight": 0.0,
        "entropy_loss_temperature": 0.01,
        "l2_normalized": True,
        "stochastic": True,
        "stochastic_temperature": 0.03,
    }
    return {
        "bottleneck": {"name": "bottleneck", "args": {"bottleneck_dim": CODE_DIM, "norm": "none",
                                                       "regularizer": {"name": "simvq", "args": regularizer}}},
        "bottleneck_token_num": 16, "input_size": SIGLIP["image_size"], "teacher": teacher,
        "pool_scale": 1, "rand_scale": True, "select_layer_id": -2,
    }  # fmt: skip


def write_sana(directory: Path, seed: int) -> tuple[SanaTransformer2DModel, AutoencoderDC]:
    """The base SANA diffusers folder: transformer/, vae/, scheduler/ and model_index.json."""
    torch.manual_seed(seed)
    transformer, vae = SanaTransformer2DModel(**SANA), AutoencoderDC(**DCAE)
    transformer.save_pretrained(directory / "transformer")
    vae.save_pretrained(directory / "vae")
    (directory / "scheduler").mkdir(parents=True)
    (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(SANA_SCHEDULER))
    (directory / "model_index.json").write_text(json.dumps({
        "_class_name": "SanaPipeline", "transformer": ["diffusers", "SanaTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderDC"], "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    }))  # fmt: skip
    return transformer, vae


def qwen_config(vocab_size: int, tied: bool, eos: int) -> dict[str, Any]:
    """The Qwen3 part of config.json as transformers 4.51 writes it (rope_theta, rope_scaling)."""
    return {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
            "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
            "tie_word_embeddings": tied, "attention_bias": False, "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": 2, "bos_token_id": None, "eos_token_id": eos,
            "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True}  # fmt: skip


def _connector(in_dim: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    first, second = torch.nn.Linear(in_dim, CAPTION), torch.nn.Linear(CAPTION, CAPTION)
    norm = 5.5**0.5 + 0.1 * torch.randn(CAPTION)
    return {**_prefixed("0.", first), **_prefixed("2.", second), "3.weight": norm}


def _integrator(vocab_size: int, tied: bool, save_lm_head: bool, eos: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    config = {
        k: v for k, v in qwen_config(vocab_size, tied, eos).items() if k not in ("rope_theta", "rope_scaling")
    }
    model = Qwen3ForCausalLM(
        Qwen3Config(**config, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    )
    tensors = _prefixed("", model)
    if tied:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        if not save_lm_head:
            del tensors["lm_head.weight"]
    return tensors


def _texture(kind: str, base_vae: AutoencoderDC, fixed_vae: bool) -> dict[str, torch.Tensor]:
    """model.sana (a DiT other than the base one), model.sana_vae and, for Pref-Restore, the connectors'
    texture half and fixed_vae; the vae connector's norm is the diffusion connector's (shared module)."""
    torch.manual_seed(4)
    tensors = _prefixed("model.sana.", SanaTransformer2DModel(**SANA))
    tensors.update(_prefixed("model.sana_vae.decoder.", base_vae.decoder))
    encoder = (
        AutoencoderDC(**DCAE).encoder if kind == "pref-restore" else base_vae.encoder
    )  # fine-tuned E_theta
    tensors.update(_prefixed("model.sana_vae.encoder.", encoder))
    tensors.update({f"model.diffusion_connector.{k}": v for k, v in _connector(64, 5).items()})
    if kind == "pref-restore":
        vae_connector = _connector(SANA["num_attention_heads"] * SANA["attention_head_dim"], 6)
        vae_connector["3.weight"] = tensors["model.diffusion_connector.3.weight"].clone()
        tensors.update({f"model.vae_connector.{k}": v for k, v in vae_connector.items()})
        if fixed_vae:
            tensors.update(_prefixed("fixed_vae.", base_vae))
    return tensors


def write_shards(directory: Path, tensors: dict[str, torch.Tensor], shards: int = 2) -> None:
    """safetensors shards + model.safetensors.index.json, as save_pretrained writes them."""
    keys = sorted(tensors)
    weight_map, total = {}, 0
    for index in range(shards):
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: tensors[key].contiguous() for key in keys[index::shards]}
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))


def write_official_checkpoint(
    root: Path,
    kind: str = "pref-restore",
    *,
    tied: bool = True,
    save_lm_head: bool = True,
    fixed_vae: bool = True,
    tower_in_checkpoint: bool = True,
    diffusion_name_or_path: str | None = None,
) -> OfficialLayout:
    """Write a tiny ``kind`` checkpoint ('pref-restore' or 'blip3o-next') with its SANA folder and TA-Tok
    file under ``root``; every tensor is bf16 as their bf16 trainer saves it."""
    sana = root / "SANA1.5_tiny_diffusers"
    _, base_vae = write_sana(sana, seed=1)
    teacher = root / "siglip2-tiny"
    teacher.mkdir(parents=True)
    vision = {**SIGLIP, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
    (teacher / "config.json").write_text(json.dumps({"model_type": "siglip", "vision_config": vision}))
    ta_tok_sd = build_ta_tok_sd(seed=2)
    ta_tok = root / "ta_tok.pth"
    torch.save({"model": {"args": ta_tok_args(str(teacher)), "sd": ta_tok_sd}}, ta_tok)

    checkpoint = root / f"{kind}-checkpoint"
    checkpoint.mkdir()
    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(
        ["<im_start>", "<im_end>", "<S0>", "<S2>", "<I0>", f"<I{CODES - 1}>"]
    )
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tensors = _integrator(ids[-1] + 1, tied, save_lm_head, eos)
    if tower_in_checkpoint:
        tower = {k: v for k, v in ta_tok_sd.items() if not k.startswith("teacher.")}
        tower["scale_layer.shift"], tower["scale_layer.scale"] = (
            torch.zeros(1, 3, 1, 1),
            torch.ones(1, 3, 1, 1),
        )
        tensors.update({TOWER + k: v for k, v in tower.items()})
    tensors.update(_texture(kind, base_vae, fixed_vae))
    tensors = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    write_shards(checkpoint, tensors)
    config = {
        "architectures": ["blip3oQwenForCausalLMVAE"], "model_type": "blip3o_qwen", "torch_dtype": "bfloat16",
        "transformers_version": "4.51.3", **qwen_config(ids[-1] + 1, tied, eos),
        "diffusion_name_or_path": diffusion_name_or_path or str(sana), "mm_vision_tower": str(ta_tok),
        "image_start_tag_id": ids[0], "image_end_tag_id": ids[1], "scale_start_token_id": ids[2],
        "scale_end_token_id": ids[3], "num_scale_tokens": 3, "image_start_token_id": ids[4],
        "image_end_token_id": ids[5], "num_image_tokens": CODES, "num_new_tokens": CODES, "mm_hidden_size": 32,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_patch_merge_type": "flat",
        "mm_use_im_start_end": True, "image_aspect_ratio": "square", "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right", "use_mm_proj": True, "mm_tunable_parts": "sana",
    }  # fmt: skip
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2))
    (checkpoint / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos, "transformers_version": "4.51.3"})
    )
    write_tokenizer(tokenizer, checkpoint)
    return OfficialLayout(checkpoint, sana, ta_tok, config, tensors, ta_tok_sd)


def reference_prompt_ids(tokenizer: Qwen2Tokenizer, user: str, lq_ids: list[int]) -> list[int]:
    """The prompt their preprocess_qwen builds: one chat-template turn per message (system, user,
    assistant '<im_start><S0>' cut before its '<|im_end|>\\n'), <image> replaced by the LQ image ids."""
    tokenizer.chat_template = CHAT_TEMPLATE
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens(["<image>"], special_tokens=True)

    def turn(role: str, content: str) -> list[int]:
        text = tokenizer.apply_chat_template([{"role": role, "content": content}], tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)

    ids = (
        turn("system", "You are a helpful assistant.")
        + turn("user", user)
        + turn("assistant", "<im_start><S0>")[:-2]
    )
    at = ids.index(tokenizer.convert_tokens_to_ids("<image>"))
    return ids[:at] + lq_ids + ids[at + 1 :]
