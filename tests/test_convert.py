"""``rlrestore convert`` on tiny checkpoints in the released model's layout (tests/official_layout.py):
the policy directory it writes loads with ``PrefRestorePolicy.from_pretrained``, holds the source
tensors exactly, computes TA-Tok's codes and their chat prompt, and restores faces; broken sources are
refused with messages naming the key, the file or the value (no traceback)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer

from rlrestore.config import SamplerConfig
from rlrestore.policies.prefrestore import PrefRestorePolicy
from rlrestore.restore import restore_files
from tests.campaign import record
from tests.official_layout import TOWER, reference_prompt_ids, write_official_checkpoint, write_shards
from tests.test_bad_inputs import classify, error_message, run_cli


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The tiny Pref-Restore checkpoint, converted by the CLI with --sana / --ta-tok from config.json."""
    root = tmp_path_factory.mktemp("official")
    layout = write_official_checkpoint(root)
    out = root / "policy"
    from rlrestore.cli import main

    assert main(["convert", "pref-restore", str(layout.checkpoint), "--out", str(out)]) == 0
    return layout, out, PrefRestorePolicy.from_pretrained(out).eval()


def _same(module: torch.nn.Module, source: dict[str, torch.Tensor], prefix: str, strip: str = "") -> None:
    state = module.state_dict()
    assert state, prefix
    for key, value in state.items():
        assert torch.equal(value, source[prefix + key.removeprefix(strip)].float()), prefix + key


def test_tensors_round_trip_exactly(official) -> None:
    layout, _, policy = official
    src = layout.tensors
    _same(policy.transformer, src, "model.sana.")
    _same(policy.diffusion_connector, src, "model.diffusion_connector.")
    _same(policy.vae_connector, src, "model.vae_connector.")
    _same(policy.lq_encoder, src, "model.sana_vae.encoder.")  # the fine-tuned LQ encoder
    _same(policy.vae.decoder, src, "model.sana_vae.decoder.")
    _same(policy.vae.encoder, src, "fixed_vae.encoder.")  # the frozen clean-face encoder
    _same(policy.integrator.model, src, "model.")
    assert policy.integrator.lm_head.weight is policy.integrator.model.embed_tokens.weight
    _same(policy.visual_tokenizer.tower, src, f"{TOWER}encoder.", strip="vision_model.")
    _same(policy.visual_tokenizer.pre_quant[0], src, f"{TOWER}encode_task_layer.0.")
    _same(policy.visual_tokenizer.pre_quant[2], src, f"{TOWER}bottleneck.in_linear.")
    _same(policy.visual_tokenizer.quantizer.proj, src, f"{TOWER}bottleneck.regularizer.embedding_proj.")
    basis = src[f"{TOWER}bottleneck.regularizer.embedding.weight"].float()
    assert torch.equal(policy.visual_tokenizer.quantizer.basis, basis)


def test_conventions_and_vocabulary_of_the_converted_policy(official) -> None:
    layout, out, policy = official
    config, ids = policy.config, layout.config
    assert (config.vocabulary, config.prompt_format, config.flow_shift) == ("blip3o", "chat", 1.0)
    assert config.codebook_bias and config.codebook_l2_normalized
    assert (config.vae_connector_gelu, config.connector_norm_eps, config.resolution) == ("tanh", 1e-5, 128)
    vocab = policy.vocabulary
    assert (vocab.im_start, vocab.im_end, vocab.scales[0], vocab.scales[2], vocab.first_image_id) == (
        ids["image_start_tag_id"], ids["image_end_tag_id"], ids["scale_start_token_id"],
        ids["scale_end_token_id"], ids["image_start_token_id"],
    )  # fmt: skip
    assert len(vocab.tokenizer) == vocab.first_image_id and vocab.size == ids["vocab_size"]
    report = json.loads((out / "convert_report.json").read_text())
    assert (
        report["format"] == "pref-restore" and report["tokenizer_tokens_removed"] == 65
    )  # 64 <I*> + <image>
    assert {group["prefix"] for group in report["ignored"]} >= {f"{TOWER}decoder.", "teacher."}
    assert any("effective shift is 1.0" in note for note in report["notes"])
    written = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert {tensor.dtype for tensor in written.values()} == {torch.bfloat16}  # the source dtype is kept


def test_codes_and_prompt_match_their_computation(official) -> None:
    """TA-Tok's lookup done by hand from the source tensors, and their chat prompt built with the source
    tokenizer (image tokens and <image> included) equal what the converted policy computes."""
    layout, _, policy = official
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    hidden = policy.visual_tokenizer.tower(pixel_values=images, output_hidden_states=True).hidden_states[-2]
    src = {k: v.float() for k, v in layout.tensors.items() if k.startswith(TOWER)}
    features = torch.tanh(
        F.linear(hidden, src[f"{TOWER}encode_task_layer.0.weight"], src[f"{TOWER}encode_task_layer.0.bias"])
    )
    features = F.linear(
        features, src[f"{TOWER}bottleneck.in_linear.weight"], src[f"{TOWER}bottleneck.in_linear.bias"]
    )
    emb = F.linear(
        src[f"{TOWER}bottleneck.regularizer.embedding.weight"],
        src[f"{TOWER}bottleneck.regularizer.embedding_proj.weight"],
        src[f"{TOWER}bottleneck.regularizer.embedding_proj.bias"],
    )
    expected = (F.normalize(features, dim=-1) @ F.normalize(emb, dim=-1).T).argmax(-1)
    codes = policy.visual_tokenizer(images)
    assert torch.equal(codes, expected)
    source_tokenizer = AutoTokenizer.from_pretrained(layout.checkpoint, local_files_only=True)
    ids, _ = policy.semantic.prompt_batch(codes[:1], [""])
    lq_ids = [layout.config["image_start_token_id"] + c for c in codes[0].tolist()]
    assert ids[0].tolist() == reference_prompt_ids(source_tokenizer, policy.config.prompt, lq_ids)


def test_restore_faces_with_the_converted_policy(official, tmp_path) -> None:
    _, out, _ = official
    sizes = {"wide.png": (40, 30), "square.png": (50, 50)}
    for name, (w, h) in sizes.items():
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / name
        )
    sampler = SamplerConfig(
        steps=2, guidance_scale=2.0, ar_sampling="sample"
    )  # the released inference settings
    report = restore_files(
        out, [tmp_path / n for n in sizes], tmp_path / "restored", sampler, samples=2, progress=False
    )
    assert len(report.outputs) == 2 and not report.skipped
    for name, size in sizes.items():
        for file in (name, name.replace(".png", "_sample1.png")):
            assert Image.open(tmp_path / "restored" / file).size == size


def test_untied_lm_head_and_base_clean_encoder(tmp_path) -> None:
    """No fixed_vae in the checkpoint: the clean-face encoder comes from the base SANA folder."""
    layout = write_official_checkpoint(tmp_path, tied=False, fixed_vae=False)
    from rlrestore.convert import convert

    convert("pref-restore", str(layout.checkpoint), tmp_path / "policy")
    policy = PrefRestorePolicy.from_pretrained(tmp_path / "policy")
    assert torch.equal(policy.integrator.lm_head.weight, layout.tensors["lm_head.weight"].float())
    assert policy.integrator.lm_head.weight is not policy.integrator.model.embed_tokens.weight
    base = load_file(str(layout.sana / "vae" / "diffusion_pytorch_model.safetensors"))
    _same(policy.vae.encoder, base, "encoder.")


def test_tower_from_the_ta_tok_file_and_unsaved_tied_head(tmp_path) -> None:
    layout = write_official_checkpoint(tmp_path, save_lm_head=False, tower_in_checkpoint=False)
    from rlrestore.convert import convert

    convert("pref-restore", str(layout.checkpoint), tmp_path / "policy", ta_tok=str(layout.ta_tok))
    policy = PrefRestorePolicy.from_pretrained(tmp_path / "policy")
    _same(policy.visual_tokenizer.tower, layout.ta_tok_sd, "encoder.", strip="vision_model.")
    assert policy.integrator.lm_head.weight is policy.integrator.model.embed_tokens.weight


def test_blip3o_next(tmp_path) -> None:
    """The base model: its SANA encoder is both the clean and the starting LQ encoder; the vae
    connector starts fresh."""
    layout = write_official_checkpoint(tmp_path, "blip3o-next")
    from rlrestore.convert import convert

    report = convert("blip3o-next", str(layout.checkpoint), tmp_path / "policy")
    policy = PrefRestorePolicy.from_pretrained(tmp_path / "policy")
    _same(policy.vae.encoder, layout.tensors, "model.sana_vae.encoder.")
    _same(policy.lq_encoder, layout.tensors, "model.sana_vae.encoder.")
    assert report.fresh == ["vae_connector."] and torch.isfinite(policy.vae_connector[0].weight).all()
    assert policy.config.prompt_format == "chat"


def _fake_hub_snapshot(checkpoint: Path, repo: str) -> None:
    """Place a directory in $HF_HOME's hub cache as `hf download` would."""
    import os

    cache = Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo.replace('/', '--')}"
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text("0" * 40)
    shutil.copytree(checkpoint, cache / "snapshots" / ("0" * 40))


def test_source_from_the_hugging_face_cache(official, tmp_path, capsys) -> None:
    layout, _, _ = official
    _fake_hub_snapshot(layout.checkpoint, "tiny-org/pref-restore-tiny")
    code, _ = run_cli(
        ["convert", "pref-restore", "tiny-org/pref-restore-tiny", "--out", str(tmp_path / "p")], capsys
    )
    assert code == 0 and (tmp_path / "p" / "policy_config.json").is_file()
    code, err = run_cli(
        ["convert", "pref-restore", "tiny-org/not-downloaded", "--out", str(tmp_path / "q")], capsys
    )
    entry = record("convert", "repo id not in the HF cache", classify(code, err), error_message(err))
    assert entry.outcome == "clear error" and "hf download tiny-org/not-downloaded" in err


# ----------------------------------------------------------------------------- refusals
class Opaque:
    """An object a weights-only unpickler must refuse."""


def _rewrite(layout, directory: Path, **replace: torch.Tensor | None) -> list[str]:
    """Rewrite the shards with tensors replaced, added or (None) removed."""
    tensors = dict(layout.tensors)
    for key, value in replace.items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    for shard in directory.glob("model-*.safetensors"):
        shard.unlink()
    write_shards(directory, tensors)
    return []


def _edit_config(directory: Path, **fields) -> list[str]:
    config = json.loads((directory / "config.json").read_text())
    config.update(fields)
    (directory / "config.json").write_text(json.dumps(config))
    return []


def missing_tensor(directory: Path, layout) -> list[str]:
    return _rewrite(layout, directory, **{"model.sana.proj_out.weight": None})


def unexpected_tensor(directory: Path, layout) -> list[str]:
    return _rewrite(layout, directory, **{"model.extra_head.weight": torch.ones(2)})


def wrong_shape(directory: Path, layout) -> list[str]:
    key = "model.diffusion_connector.0.weight"
    return _rewrite(layout, directory, **{key: layout.tensors[key][:, :-1].clone()})


def differing_tied_head(directory: Path, layout) -> list[str]:
    return _rewrite(layout, directory, **{"lm_head.weight": layout.tensors["lm_head.weight"] + 1})


def opaque_ta_tok(directory: Path, layout) -> list[str]:
    path = directory.parent / "opaque_ta_tok.pth"
    torch.save({"model": {"args": {"bottleneck": Opaque()}, "sd": {}}}, path)
    return ["--ta-tok", str(path)]


def shifted_token_ids(directory: Path, layout) -> list[str]:
    keys = ("image_start_tag_id", "image_end_tag_id", "scale_start_token_id", "scale_end_token_id",
            "image_start_token_id", "image_end_token_id", "vocab_size")  # fmt: skip
    return _edit_config(directory, **{key: layout.config[key] + 1 for key in keys})


def missing_shard(directory: Path, layout) -> list[str]:
    next(directory.glob("model-00002-*")).unlink()
    return []


def pickled_weights_only(directory: Path, layout) -> list[str]:
    for path in directory.glob("model*safetensors*"):
        path.unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not loaded")
    return []


# case -> (change the copied checkpoint, returning extra CLI arguments; fragments the message must name)
CASES = {
    "missing tensor": (missing_tensor, ["transformer.proj_out.weight", "model.sana.proj_out.weight"]),
    "unexpected tensor": (unexpected_tensor, ["match no conversion rule", "model.extra_head.weight"]),
    "wrong shape": (wrong_shape, ["model.diffusion_connector.0.weight", "expected (64, 64), found (64, 63)"]),
    "TA-Tok file holding a non-plain object": (
        opaque_ta_tok,
        ["plain Python types", "weights_only=True", "Opaque"],
    ),
    "tied lm_head that differs": (differing_tied_head, ["lm_head.weight differs", "ties lm_head"]),
    "token ids disagreeing with the tokenizer": (
        shifted_token_ids,
        ["image_start_tag_id", "token <im_start> has id"],
    ),
    "other model_type": (
        lambda d, lay: _edit_config(d, model_type="llava_qwen"),
        ["model_type = 'llava_qwen'"],
    ),
    "base SANA folder not here": (
        lambda d, lay: _edit_config(d, diffusion_name_or_path="/data/x/SANA1.5_1.6B_1024px_diffusers"),
        ["hf download Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers", "--sana"],
    ),
    "TA-Tok file not here": (
        lambda d, lay: _edit_config(d, mm_vision_tower="/data/x/ta_tok.pth"),
        ["hf download csuhan/TA-Tok ta_tok.pth", "--ta-tok"],
    ),
    "shard missing": (missing_shard, ["model-00002-of-00002.safetensors"]),
    "pickled weights only": (pickled_weights_only, ["pickled weights", "pytorch_model.bin"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refusals_name_the_problem(official, tmp_path, capsys, case) -> None:
    layout, _, _ = official
    directory = tmp_path / "checkpoint"
    shutil.copytree(layout.checkpoint, directory)
    change, named = CASES[case]
    extra = change(directory, layout)
    code, err = run_cli(
        ["convert", "pref-restore", str(directory), "--out", str(tmp_path / "out"), *extra], capsys
    )
    entry = record("convert", case, classify(code, err), error_message(err))
    assert entry.outcome == "clear error", err
    for fragment in named:
        assert fragment in err, (fragment, err)
    assert not (tmp_path / "out").exists()


def test_ta_tok_args_in_an_easydict_load_as_plain_dicts(official, tmp_path, monkeypatch) -> None:
    """TA-Tok's training code keeps configs in EasyDict: read as a plain dict, the class never imported."""
    import sys

    from rlrestore.convert.ta_tok import load_ta_tok
    from tests.official_layout import ta_tok_args

    layout, _, _ = official
    (tmp_path / "easydict.py").write_text(
        "class EasyDict(dict):\n"
        "    def __init__(self, d=None):\n"
        "        super().__init__()\n"
        "        for k, v in (d or {}).items():\n"
        "            v = EasyDict(v) if isinstance(v, dict) else v\n"
        "            self[k] = v\n"
        "            setattr(self, k, v)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import easydict

    args = easydict.EasyDict(ta_tok_args("google/siglip2-so400m-patch14-384"))
    torch.save({"model": {"args": args, "sd": dict(layout.ta_tok_sd)}}, tmp_path / "ta_tok.pth")
    monkeypatch.delitem(sys.modules, "easydict")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    loaded = load_ta_tok(tmp_path / "ta_tok.pth")
    assert "easydict" not in sys.modules
    assert (loaded.args.codebook_size, loaded.args.l2_normalized, loaded.args.codebook_dim) == (64, True, 16)


def test_refuses_a_non_empty_output(official, tmp_path, capsys) -> None:
    layout, _, _ = official
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, err = run_cli(
        ["convert", "pref-restore", str(layout.checkpoint), "--out", str(tmp_path / "out")], capsys
    )
    assert classify(code, err) == "clear error" and "not empty" in err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
