"""Conversion of BLIP3o-family HF Trainer directories (BLIP3o-NEXT, the released Pref-Restore model)
into an rlrestore policy directory.

The directory holds ``config.json`` and sharded safetensors whose keys are those of their
``blip3oQwen*`` model: ``model.embed_tokens`` / ``model.layers.*`` / ``model.norm`` / ``lm_head``
(Qwen3), ``model.vision_tower.vision_tower.*`` (TA-Tok), ``model.sana.*`` (SANA DiT),
``model.sana_vae.*`` (DC-AE), ``model.diffusion_connector.*`` and, for Pref-Restore,
``model.vae_connector.*`` and possibly ``fixed_vae.*`` (the frozen DC-AE its Stage 1.2 encodes clean
faces with). Loading it also needs the base SANA folder (component and scheduler configs) and the
TA-Tok file (the tokenizer's construction arguments).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from rlrestore.convert.blip3o_config import (
    Blip3oCheckpoint,
    SanaFolder,
    build_policy_config,
    find_sana,
    read_checkpoint,
    read_sana,
)
from rlrestore.convert.formats import Blip3oFormat
from rlrestore.convert.keymap import Ignore, Plan, Rename, SameAs, plan
from rlrestore.convert.sources import (
    ConversionError,
    TensorStore,
    diffusers_weights,
    hf_weights,
    resolve_model_dir,
)
from rlrestore.convert.ta_tok import TATok, find_ta_tok, load_ta_tok, siglip_arch
from rlrestore.convert.writer import ConversionReport, write_policy

TOWER = "model.vision_tower.vision_tower."
UNUSED_BY_CODES = (
    "TA-Tok's feature decoder (codes -> SigLIP features, for understanding); restoration reads only the codes"
)


@functools.cache
def _tower_prefix() -> str:
    """Policy key prefix of the SigLIP transformer: transformers 4 nests it in ``vision_model``, 5 does not."""
    with torch.device("meta"):
        tower = SiglipVisionModel(
            SiglipVisionConfig(
                hidden_size=8,
                intermediate_size=8,
                num_hidden_layers=1,
                num_attention_heads=1,
                image_size=8,
                patch_size=4,
            )
        )
    return (
        "visual_tokenizer.tower.vision_model."
        if hasattr(tower, "vision_model")
        else "visual_tokenizer.tower."
    )


def tower_rules(prefix: str) -> tuple[list[Rename], list[Ignore]]:
    """TA-Tok's parts that tokenise an image, and those restoration never runs."""
    renames = [
        Rename(f"{prefix}encoder.", _tower_prefix()),
        Rename(f"{prefix}encode_task_layer.0.", "visual_tokenizer.pre_quant.0."),
        Rename(f"{prefix}bottleneck.in_linear.", "visual_tokenizer.pre_quant.2."),
        Rename(f"{prefix}bottleneck.regularizer.embedding.weight", "visual_tokenizer.quantizer.basis"),
        Rename(f"{prefix}bottleneck.regularizer.embedding_proj.", "visual_tokenizer.quantizer.proj."),
    ]
    ignores = [
        Ignore(f"{prefix}decoder.", UNUSED_BY_CODES),
        Ignore(f"{prefix}decode_task_layer.", UNUSED_BY_CODES),
        Ignore(
            f"{prefix}bottleneck.out_linear.",
            "maps a quantised code back to features; the code lookup does not",
        ),
        Ignore(
            f"{prefix}bottleneck.regularizer.stochastic_temperature_inv",
            "temperature of TA-Tok's stochastic training-time lookup; inference takes the nearest code",
        ),
        Ignore(
            f"{prefix}teacher.",
            "TA-Tok's distillation teacher; their loader drops it too (load_teacher=False)",
        ),
    ]
    return renames, ignores


def checkpoint_rules(fmt: Blip3oFormat, checkpoint: Blip3oCheckpoint, store: TensorStore) -> Plan:
    """Rules for the checkpoint's own tensors."""
    renames = [
        Rename("model.embed_tokens.", "integrator.model.embed_tokens."),
        Rename("model.layers.", "integrator.model.layers."),
        Rename("model.norm.", "integrator.model.norm."),
        Rename("model.sana.", "transformer."),
        Rename("model.sana_vae.decoder.", "vae.decoder."),
        Rename("model.diffusion_connector.", "diffusion_connector."),
        Rename("model.sana_vae.encoder.", "lq_encoder."),
    ]
    ignores: list[Ignore] = [
        Ignore(f"{TOWER}scale_layer.", "TA-Tok input scaling, identity in their vision tower (checked)")
    ]
    same = []
    if checkpoint.tied:
        same.append(SameAs("lm_head.", "model.embed_tokens.", "config.json ties lm_head to embed_tokens"))
    else:
        renames.append(Rename("lm_head.", "integrator.lm_head."))
    if fmt.has_vae_connector:
        renames.append(Rename("model.vae_connector.", "vae_connector."))
    if fmt.tie_connector_norms:
        same.append(
            SameAs(
                "model.vae_connector.3.",
                "model.diffusion_connector.3.",
                "their model class gives both connectors one RMSNorm module",
            )
        )
    if not fmt.lq_encoder_trained:
        renames.append(Rename("model.sana_vae.encoder.", "vae.encoder."))  # E_theta starts as a copy of E
    elif any(key.startswith("fixed_vae.") for key in store.names()):
        renames.append(Rename("fixed_vae.encoder.", "vae.encoder."))
        same.append(
            SameAs(
                "fixed_vae.decoder.",
                "model.sana_vae.decoder.",
                "the frozen DC-AE of their Stage 1.2 loss; its decoder is the one they decode with",
            )
        )
    tower_renames, tower_ignores = tower_rules(TOWER)
    return plan(store, renames + tower_renames, ignores + tower_ignores, same)


def ta_tok_rules(ta_tok: TATok, checkpoint_store: TensorStore) -> Plan:
    """The TA-Tok file's tensors: the tokenizer's weights when the checkpoint lacks them, else checked
    against the checkpoint's copy (their loader overwrites the file's weights with the checkpoint's)."""
    scale = Ignore(
        "scale_layer.",
        "TA-Tok's [0, 1] -> [-1, 1] input scaling; their vision tower replaces it "
        "with the identity (images arrive in [-1, 1])",
    )
    if not any(key.startswith(TOWER) for key in checkpoint_store.names()):
        renames, ignores = tower_rules("")
        return plan(ta_tok.weights, renames, [scale, *ignores])
    _, ignores = tower_rules("")
    teacher = [rule for rule in ignores if rule.prefix == "teacher."]
    copy = SameAs(
        "",
        TOWER,
        "the checkpoint's vision tower is the one their model runs",
        other=checkpoint_store,
        strict=False,
    )
    return plan(ta_tok.weights, [], [scale, *teacher], [copy])


def vae_encoder_rules(fmt: Blip3oFormat, checkpoint_store: TensorStore, sana: SanaFolder) -> Plan:
    """The clean-face DC-AE encoder E (Stage 1.2's frozen reference) from the base SANA folder when the
    Pref-Restore checkpoint does not carry ``fixed_vae``; only the encoder is read from that folder."""
    if not fmt.lq_encoder_trained or any(key.startswith("fixed_vae.") for key in checkpoint_store.names()):
        return Plan()
    base = diffusers_weights(sana.directory / "vae", "base SANA vae")
    encoder = TensorStore(base.name, files={k: f for k, f in base.files.items() if k.startswith("encoder.")})
    return plan(encoder, [Rename("encoder.", "vae.encoder.")], [])


def convert_blip3o(
    fmt: Blip3oFormat, src: str, out: Path, sana: str | None = None, ta_tok: str | None = None
) -> ConversionReport:
    """Convert ``src`` (a directory or an HF id in the local cache) into a policy directory ``out``."""
    directory = resolve_model_dir(src, f"{fmt.name} checkpoint")
    checkpoint = read_checkpoint(directory)
    sana_folder = read_sana(find_sana(sana, checkpoint.diffusion_name_or_path))
    tatok = load_ta_tok(find_ta_tok(ta_tok, checkpoint.vision_tower))
    store = hf_weights(directory, f"{fmt.name} checkpoint")
    checkpoint.token_ids.check_layout(directory / "config.json")
    tower_store, prefix = (
        (store, f"{TOWER}encoder.")
        if f"{TOWER}encoder.embeddings.patch_embedding.weight" in store
        else (tatok.weights, "encoder.")
    )
    vision = siglip_arch(tower_store, prefix, tatok.args.teacher)
    config = build_policy_config(checkpoint, sana_folder, tatok.args, vision, src)
    _check_scale_layer(store)
    result = checkpoint_rules(fmt, checkpoint, store)
    result.merge(ta_tok_rules(tatok, store))
    result.merge(vae_encoder_rules(fmt, store, sana_folder))
    fresh = () if fmt.has_vae_connector else ("vae_connector.",)
    report = ConversionReport(
        format=fmt.name,
        source=src,
        sana=str(sana_folder.directory),
        ta_tok=str(tatok.path),
        notes=[*checkpoint.notes, *sana_folder.notes],
    )
    if fresh:
        report.notes.append(f"{fmt.name} has no vae connector: it starts freshly initialised (seed 0)")
    return write_policy(config, directory, checkpoint.token_ids, result, out, report, fresh=fresh)


def _check_scale_layer(store: TensorStore) -> None:
    """Their vision tower feeds TA-Tok images already in [-1, 1] through an identity scaling layer."""
    for key, identity in ((f"{TOWER}scale_layer.shift", 0.0), (f"{TOWER}scale_layer.scale", 1.0)):
        if key in store and not bool((store.get(key).float() == identity).all()):
            raise ConversionError(
                f"checkpoint key {key} = {store.get(key).flatten().tolist()}, expected {identity} (their vision "
                "tower's identity scaling; rlrestore feeds the tower images in [-1, 1])"
            )
