"""The Pref-Restore policy at tiny size (real classes, random init) and the full-size one on meta.

The AR integrator generates 64 tokens one at a time, the slow part on CPU; the batched restore
and the checkpoint are built once per module and shared by the tests that only read them.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderDC, SanaTransformer2DModel
from transformers import AutoTokenizer, Qwen3ForCausalLM, SiglipVisionModel

from rlrestore.config import ComponentSpec, SamplerConfig, load_config
from rlrestore.models import CheckpointError, count_parameters
from rlrestore.models.loading import load_component
from rlrestore.policies import RestoreOutput
from rlrestore.policies.prefrestore import PrefRestorePolicy
from rlrestore.policies.prefrestore.integrator import pick_token as _pick_token
from tests.conftest import build_tiny_policy, tiny_config

FULL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "prefrestore.yaml"
CAPTIONS = ["", "a smiling woman with short dark hair"]  # one uncaptioned, one longer prompt
SEEDS = torch.tensor([[11, 12, 13], [21, 22, 23]])
SDE_SAMPLER = SamplerConfig(steps=4, sde_eta=0.5)  # greedy AR, per-candidate SDE noise
ODE_SAMPLER = SamplerConfig(steps=4)  # greedy AR, deterministic ODE


def _faces(batch: int, seed: int) -> torch.Tensor:
    """Smooth random 'faces' in [-1, 1] at the tiny generation size (64 px)."""
    low = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return torch.tanh(torch.nn.functional.interpolate(low, size=(64, 64), mode="bilinear"))


LQ = _faces(2, 0)
HQ = _faces(2, 1)


@pytest.fixture(scope="module")
def policy() -> PrefRestorePolicy:
    """A read-only tiny policy shared by the module (tests that change it use `tiny_policy`)."""
    return build_tiny_policy()


@pytest.fixture(scope="module")
def batched(policy: PrefRestorePolicy) -> RestoreOutput:
    return policy.restore(LQ, CAPTIONS, SEEDS, SDE_SAMPLER)


@pytest.fixture(scope="module")
def ode_reference(policy: PrefRestorePolicy) -> RestoreOutput:
    return policy.restore(LQ[:1], CAPTIONS[:1], torch.tensor([[5, 5, 9]]), ODE_SAMPLER)


@pytest.fixture(scope="module")
def checkpoint(policy: PrefRestorePolicy, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "checkpoint"
    policy.save_pretrained(path)
    return path


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record (and refuse) every socket connection a test attempts."""
    attempts: list = []

    def refuse(self: socket.socket, address: object, *args: object) -> None:
        attempts.append(address)
        raise OSError(f"test tried to connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key, value in state_a.items():
        assert torch.equal(value, state_b[key]), key


# ----------------------------------------------------------------------------- restore
def test_restore_shapes_and_ranges(policy: PrefRestorePolicy, batched: RestoreOutput) -> None:
    assert batched.latents.shape == (2, 3, 32, 8, 8)
    assert batched.images.shape == (2, 3, 3, 64, 64)
    assert batched.condition.codes.shape == (2, 64) and batched.condition.codes.dtype == torch.long
    assert torch.equal(batched.seeds, SEEDS)
    assert batched.images.min() >= -1 and batched.images.max() <= 1
    assert batched.images.std() > 0.05
    assert torch.isfinite(batched.latents).all()
    assert batched.condition.codes.min() >= 0 and batched.condition.codes.max() < policy.config.codebook_size
    decoded = policy.decode(batched.latents.flatten(0, 1)).view_as(batched.images)
    torch.testing.assert_close(decoded, batched.images)


@pytest.mark.parametrize(("b", "k"), [(0, 2), (1, 1)])
def test_candidate_restored_alone_equals_the_batched_one(
    policy: PrefRestorePolicy, batched: RestoreOutput, b: int, k: int
) -> None:
    alone = policy.restore(LQ[b : b + 1], CAPTIONS[b : b + 1], SEEDS[b : b + 1, k : k + 1], SDE_SAMPLER)
    assert torch.equal(alone.condition.codes[0], batched.condition.codes[b])
    torch.testing.assert_close(alone.latents[0, 0], batched.latents[b, k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone.images[0, 0], batched.images[b, k], rtol=1e-5, atol=1e-5)


def test_different_seeds_give_different_candidates(batched: RestoreOutput) -> None:
    flat = batched.latents.flatten(0, 1)
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            assert (flat[i] - flat[j]).abs().mean() > 0.1, (i, j)


def test_deterministic_sampler_repeats_exactly(
    policy: PrefRestorePolicy, ode_reference: RestoreOutput
) -> None:
    again = policy.restore(LQ[:1], CAPTIONS[:1], torch.tensor([[5, 5, 9]]), ODE_SAMPLER)
    assert torch.equal(again.latents, ode_reference.latents)
    assert torch.equal(again.images, ode_reference.images)
    assert torch.equal(again.condition.codes, ode_reference.condition.codes)
    # Same seed within a batch, same candidate; another seed, another one.
    assert torch.equal(ode_reference.latents[0, 0], ode_reference.latents[0, 1])
    assert (ode_reference.latents[0, 0] - ode_reference.latents[0, 2]).abs().mean() > 0.1


# ----------------------------------------------------------------------------- prompts
def test_captioned_and_uncaptioned_prompts(policy: PrefRestorePolicy) -> None:
    vocab = policy.vocabulary
    codes = torch.randint(0, vocab.codebook_size, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    plain = vocab.prompt_ids(policy.config.prompt, codes)
    captioned = vocab.prompt_ids(policy.config.caption_prompt.replace("{caption}", "a man"), codes)
    assert plain != captioned and len(captioned) > len(plain)
    block = [vocab.im_start, vocab.scales[0], *[vocab.first_image_id + c for c in codes], vocab.im_end]
    for ids in (plain, captioned):
        assert ids[: len(block)] == block  # both prompts start with "<image>"
        assert ids[-2:] == [vocab.im_start, vocab.scales[0]]  # the trigger of the N target tokens
        assert sum(i >= vocab.first_image_id for i in ids) == 64  # the image block only once
        assert max(ids) < vocab.size
    text = vocab.tokenizer.decode(plain[len(block) : -2])
    assert text == "\nPlease reconstruct the given image."
    assert vocab.tokenizer.decode(captioned[len(block) : -2]).endswith("image content: a man")
    with pytest.raises(ValueError, match="exactly once"):
        vocab.prompt_ids("no image here", codes)


def test_prompt_batch_pads_on_the_left(policy: PrefRestorePolicy) -> None:
    vocab = policy.vocabulary
    codes = torch.randint(0, vocab.codebook_size, (2, 64), generator=torch.Generator().manual_seed(1))
    ids, mask = policy.semantic.prompt_batch(codes, CAPTIONS)
    plain = vocab.prompt_ids(policy.config.prompt, codes[0].tolist())
    captioned = vocab.prompt_ids(
        policy.config.caption_prompt.replace("{caption}", CAPTIONS[1]), codes[1].tolist()
    )
    pad = len(captioned) - len(plain)
    assert pad > 0 and ids.shape == mask.shape == (2, len(captioned))
    assert ids[1].tolist() == captioned and mask[1].tolist() == [1] * len(captioned)
    assert ids[0, pad:].tolist() == plain
    assert ids[0, :pad].tolist() == [vocab.pad] * pad
    assert mask[0].tolist() == [0] * pad + [1] * len(plain)


# ----------------------------------------------------------------------------- condition / AR
def test_condition_with_target_codes(policy: PrefRestorePolicy) -> None:
    codes = policy.target_codes(HQ)
    assert codes.shape == (2, 64) and codes.min() >= 0 and codes.max() < 1024
    cond = policy.conditioning(LQ, CAPTIONS, target_codes=codes)
    assert cond.encoder_hidden_states.shape == (2, 64 + 1 + 64, 64)
    assert cond.logits.shape == (2, 64, policy.vocabulary.size)
    assert cond.logits.shape[-1] == 1287
    assert cond.codes is codes
    torch.testing.assert_close(cond.encoder_hidden_states[:, 65:], policy.velocity_model.texture_tokens(policy.encode_lq(LQ)))
    # The diffusion connector ends in an RMSNorm with weight sqrt(5.5): rms of each vector = sqrt(5.5).
    rms = cond.encoder_hidden_states[:, :65].pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 5.5**0.5), rtol=1e-3, atol=1e-3)


def test_teacher_forced_pass_is_padding_invariant_and_aligned(policy: PrefRestorePolicy) -> None:
    codes = policy.target_codes(HQ)
    batch = policy.conditioning(LQ, CAPTIONS, target_codes=codes)
    for b in range(2):
        alone = policy.conditioning(LQ[b : b + 1], CAPTIONS[b : b + 1], target_codes=codes[b : b + 1])
        torch.testing.assert_close(alone.logits[0], batch.logits[b], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            alone.encoder_hidden_states[0], batch.encoder_hidden_states[b], rtol=1e-4, atol=1e-4
        )
    # logits[:, i] is the prediction made at the token before code i (a plain unpadded forward).
    lq_codes = policy.visual_tokenizer(policy.to_tokenizer_size(LQ[1:]))
    prompt, _ = policy.semantic.prompt_batch(lq_codes, CAPTIONS[1:])
    ids = torch.cat([prompt, codes[1:] + policy.vocabulary.first_image_id], dim=1)
    with torch.no_grad():
        full = policy.integrator(input_ids=ids).logits
    start = prompt.shape[1] - 1
    torch.testing.assert_close(batch.logits[1], full[0, start : start + 64], rtol=1e-4, atol=1e-4)


def test_greedy_generation_agrees_with_the_teacher_forced_pass(
    policy: PrefRestorePolicy, batched: RestoreOutput
) -> None:
    """The KV-cached generation loop and the single teacher-forced pass see the same sequence."""
    vocab = policy.vocabulary
    generated = batched.condition.codes
    assert generated.min() >= 0 and generated.max() < vocab.codebook_size
    assert generated.unique().numel() > 1
    cond = policy.conditioning(LQ, CAPTIONS, target_codes=generated)
    assert torch.equal(cond.logits[..., vocab.first_image_id :].argmax(-1), generated)


def test_sampled_generation(policy: PrefRestorePolicy, batched: RestoreOutput) -> None:
    lq_codes = policy.visual_tokenizer(policy.to_tokenizer_size(LQ[1:]))
    ids, mask = policy.semantic.prompt_batch(lq_codes, CAPTIONS[1:])
    sampler = SamplerConfig(ar_sampling="sample", ar_top_k=50, ar_top_p=0.9)
    first = policy.semantic.generate_codes(ids, mask, sampler, torch.Generator().manual_seed(3))
    second = policy.semantic.generate_codes(ids, mask, sampler, torch.Generator().manual_seed(3))
    assert first.shape == (1, 64)
    assert first.min() >= 0 and first.max() < policy.config.codebook_size
    assert torch.equal(first, second)
    assert not torch.equal(first[0], batched.condition.codes[1])  # not the greedy codes
    top1 = policy.semantic.generate_codes(
        ids, mask, SamplerConfig(ar_sampling="sample", ar_top_k=1), torch.Generator()
    )
    assert torch.equal(top1[0], batched.condition.codes[1])  # top-k 1 is greedy


def test_top_k_top_p_token_choice() -> None:
    """Probabilities 0.5 / 0.3 / 0.15 / 0.05: top-p 0.7 keeps the first two, top-k 3 the first three."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)

    def draw(**options: object) -> torch.Tensor:
        sampler = SamplerConfig(ar_sampling="sample", **options)
        return _pick_token(logits, sampler, torch.Generator().manual_seed(0))

    top_p = draw(ar_top_p=0.7)
    assert set(top_p.tolist()) == {0, 1}
    assert (top_p == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)
    top_k = draw(ar_top_k=3, ar_top_p=1.0)
    assert set(top_k.tolist()) == {0, 1, 2}
    assert (top_k == 2).float().mean().item() == pytest.approx(0.15 / 0.95, abs=0.03)
    assert set(draw(ar_top_k=1).tolist()) == {0}
    assert set(draw(ar_temperature=0.01, ar_top_p=1.0).tolist()) == {0}
    assert torch.equal(draw(ar_top_p=0.9), draw(ar_top_p=0.9))
    assert torch.equal(
        _pick_token(logits[:3], SamplerConfig(), torch.Generator()), torch.zeros(3, dtype=torch.long)
    )


def test_condition_without_codes_needs_a_sampler(policy: PrefRestorePolicy) -> None:
    with pytest.raises(ValueError, match="sampler config and a generator"):
        policy.conditioning(LQ, CAPTIONS)


# ----------------------------------------------------------------------------- trainable components
def test_set_trainable(tiny_policy: PrefRestorePolicy) -> None:
    assert not any(p.requires_grad for p in tiny_policy.parameters())  # frozen after construction
    params = tiny_policy.set_trainable(["transformer"])
    expected = list(tiny_policy.transformer.parameters())
    assert len(params) == len(expected) and all(a is b for a, b in zip(params, expected, strict=True))
    trainable = {id(p) for p in tiny_policy.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in expected}
    params = tiny_policy.set_trainable(["integrator", "diffusion_connector"])
    assert {id(p) for p in tiny_policy.parameters() if p.requires_grad} == {id(p) for p in params}
    assert not any(p.requires_grad for p in tiny_policy.transformer.parameters())
    assert tiny_policy.set_trainable([]) == []
    assert not any(p.requires_grad for p in tiny_policy.parameters())
    with pytest.raises(KeyError, match="no component 'visual_tokenizer'; its components are"):
        tiny_policy.set_trainable(["visual_tokenizer"])


def test_mismatched_components_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer_resolution=48"):
        PrefRestorePolicy.from_config(tiny_config(tmp_path, "policy.tokenizer_resolution=48").policy)
    with pytest.raises(ValueError, match="latent_channels=16"):
        PrefRestorePolicy.from_config(tiny_config(tmp_path, "policy.vae.arch.latent_channels=16").policy)


# ----------------------------------------------------------------------------- checkpoints
def test_save_and_load_round_trip(
    policy: PrefRestorePolicy, checkpoint: Path, ode_reference: RestoreOutput, no_network: list
) -> None:
    loaded = PrefRestorePolicy.from_pretrained(checkpoint)
    _assert_same_state(policy, loaded)
    assert loaded.config == policy.config
    assert loaded.vocabulary.first_image_id == policy.vocabulary.first_image_id
    assert loaded.vocabulary.size == policy.vocabulary.size
    again = loaded.restore(LQ[:1], CAPTIONS[:1], torch.tensor([[5, 5, 9]]), ODE_SAMPLER)
    assert torch.equal(again.condition.codes, ode_reference.condition.codes)
    assert torch.equal(again.latents, ode_reference.latents)
    assert torch.equal(again.images, ode_reference.images)
    assert no_network == []


def test_components_load_from_the_hugging_face_cache(policy: PrefRestorePolicy, no_network: list) -> None:
    """A hub id resolves through the local HF cache layout (models--org--name/snapshots/REV).

    conftest points HF_HOME at a temporary folder before any import, so this is that cache."""
    hub = Path(os.environ["HF_HOME"]) / "hub"
    commit = "0123456789abcdef" * 2 + "01234567"  # refs hold full 40-hex commit ids
    snapshot = hub / "models--rlrestore-test--tiny-pref-restore" / "snapshots" / commit
    policy.transformer.save_pretrained(snapshot / "transformer")
    policy.vae.save_pretrained(snapshot / "vae")
    policy.integrator.save_pretrained(snapshot)  # like Qwen/Qwen3-0.6B: model and tokenizer at the root
    policy.vocabulary.tokenizer.save_pretrained(snapshot)
    (hub / "models--rlrestore-test--tiny-pref-restore" / "refs").mkdir()
    (hub / "models--rlrestore-test--tiny-pref-restore" / "refs" / "main").write_text(commit)
    repo = "rlrestore-test/tiny-pref-restore"
    config = policy.config.model_copy(deep=True)
    config.transformer = ComponentSpec(pretrained=repo, subfolder="transformer")
    config.vae = ComponentSpec(pretrained=repo, subfolder="vae")
    config.integrator = ComponentSpec(pretrained=repo)
    config.text_tokenizer = repo
    loaded = PrefRestorePolicy.from_config(config)
    for name in ("transformer", "vae", "integrator"):
        for key, value in getattr(policy, name).state_dict().items():
            assert torch.equal(value, getattr(loaded, name).state_dict()[key]), f"{name}.{key}"
    assert loaded.vocabulary.first_image_id == policy.vocabulary.first_image_id
    assert no_network == []


def test_fitted_scaling_factor_and_trained_weights_survive_a_checkpoint(
    tiny_policy: PrefRestorePolicy, tmp_path: Path
) -> None:
    with torch.no_grad():
        tiny_policy.vae_connector[0].weight.add_(1.0)
        tiny_policy.visual_tokenizer.quantizer.proj.weight.mul_(-1.0)
    scale = tiny_policy.adopt_fitted_vae(HQ)
    assert scale != 1.0
    tiny_policy.save_pretrained(tmp_path / "fitted")
    loaded = PrefRestorePolicy.from_pretrained(tmp_path / "fitted")
    assert loaded.scaling_factor == pytest.approx(scale)
    _assert_same_state(tiny_policy, loaded)
    torch.testing.assert_close(loaded.encode(HQ), tiny_policy.encode(HQ), rtol=0, atol=0)


def test_checkpoint_subfolders_load_with_diffusers_and_transformers(
    policy: PrefRestorePolicy, checkpoint: Path
) -> None:
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "integrator",
        "policy_config.json",
        "rlrestore_modules.safetensors",
        "transformer",
        "vae",
        "vision",
    ]
    _assert_same_state(SanaTransformer2DModel.from_pretrained(checkpoint / "transformer"), policy.transformer)
    _assert_same_state(AutoencoderDC.from_pretrained(checkpoint / "vae"), policy.vae)
    integrator = Qwen3ForCausalLM.from_pretrained(checkpoint / "integrator")
    _assert_same_state(integrator, policy.integrator)
    assert integrator.get_input_embeddings().num_embeddings == policy.vocabulary.size
    _assert_same_state(
        SiglipVisionModel.from_pretrained(checkpoint / "vision"), policy.visual_tokenizer.tower
    )
    assert len(AutoTokenizer.from_pretrained(checkpoint / "integrator")) == policy.vocabulary.first_image_id


def test_missing_checkpoint_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(CheckpointError, match="policy_config.json is missing") as info:
        PrefRestorePolicy.from_pretrained(missing)
    assert str(missing) in str(info.value)


def test_directory_without_policy_config(checkpoint: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(checkpoint / "transformer", partial / "transformer")
    with pytest.raises(CheckpointError, match="is not a policy checkpoint") as info:
        PrefRestorePolicy.from_pretrained(partial)
    assert str(partial) in str(info.value)


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)
    return copy


def test_truncated_module_weights(checkpoint: Path, tmp_path: Path) -> None:
    copy = _copy(checkpoint, tmp_path)
    weights = copy / "rlrestore_modules.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="rlrestore_modules.safetensors is corrupt"):
        PrefRestorePolicy.from_pretrained(copy)


def test_missing_module_weights_and_unreadable_config(checkpoint: Path, tmp_path: Path) -> None:
    copy = _copy(checkpoint, tmp_path)
    (copy / "rlrestore_modules.safetensors").unlink()
    with pytest.raises(CheckpointError, match="rlrestore_modules.safetensors is missing"):
        PrefRestorePolicy.from_pretrained(copy)
    (copy / "policy_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="policy_config.json is unreadable"):
        PrefRestorePolicy.from_pretrained(copy)


def test_missing_component_subfolder(checkpoint: Path, tmp_path: Path) -> None:
    copy = _copy(checkpoint, tmp_path)
    shutil.rmtree(copy / "vae")
    with pytest.raises(CheckpointError, match=r"policy\.vae\.pretrained") as info:
        PrefRestorePolicy.from_pretrained(copy)
    assert str(copy / "vae") in str(info.value)


def test_unknown_hub_id_fails_offline_with_a_download_hint(tmp_path: Path, no_network: list) -> None:
    repo = "rlrestore-tests/no-such-sana"
    config = tiny_config(tmp_path, f"policy.transformer.pretrained={repo}")
    with pytest.raises(CheckpointError) as info:
        PrefRestorePolicy.from_config(config.policy)
    message = str(info.value)
    assert "policy.transformer.pretrained" in message and repo in message
    assert "hf download" in message
    # The loader itself (reached when the config file is cached but the weights are not) says the same.
    with pytest.raises(CheckpointError) as info:
        load_component(
            "transformer",
            ComponentSpec(pretrained=repo),
            lambda arch: None,
            SanaTransformer2DModel.from_pretrained,
        )
    assert f"hf download {repo}" in str(info.value)
    assert no_network == []


def test_missing_local_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-vae"
    config = tiny_config(tmp_path, f"policy.vae.pretrained={missing}")
    with pytest.raises(CheckpointError, match=r"policy\.vae\.pretrained") as info:
        PrefRestorePolicy.from_config(config.policy)
    assert str(missing) in str(info.value)


def test_full_size_config_lists_every_missing_source_at_once(no_network: list) -> None:
    config = load_config(FULL_CONFIG)
    with pytest.raises(CheckpointError) as info:
        PrefRestorePolicy.from_config(config.policy)
    message = str(info.value)
    for key, source in [
        ("policy.vision.pretrained", "google/siglip2-so400m-patch14-384/config.json"),
        ("policy.integrator.pretrained", "Qwen/Qwen3-0.6B/config.json"),
        (
            "policy.transformer.pretrained",
            "Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers/transformer/config.json",
        ),
        ("policy.vae.pretrained", "Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers/vae/config.json"),
        ("policy.text_tokenizer", "Qwen/Qwen3-0.6B/tokenizer_config.json"),
    ]:
        assert f"{key}: {source}" in message
    assert "hf download" in message
    assert no_network == []


# ----------------------------------------------------------------------------- full size on meta
def test_full_size_policy_on_the_meta_device() -> None:
    config = load_config(FULL_CONFIG).policy
    for name in ("vision", "integrator", "transformer", "vae"):
        getattr(config, name).pretrained = None
    config.text_tokenizer = None
    start = time.perf_counter()
    with torch.device("meta"):
        policy = PrefRestorePolicy.from_config(config)
    built = time.perf_counter() - start
    assert all(p.device.type == "meta" for p in policy.parameters())

    embedding = policy.integrator.get_input_embeddings()
    vocab = policy.vocabulary
    counts = {
        "transformer (SANA-1.5 1.6B)": count_parameters(policy.transformer),
        "vae (DC-AE f32c32)": count_parameters(policy.vae),
        "vision tower (SigLIP2 so400m)": count_parameters(policy.visual_tokenizer.tower),
        "integrator body (Qwen3-0.6B)": count_parameters(policy.integrator) - embedding.weight.numel(),
        "integrator embedding": embedding.weight.numel(),
        "connectors": count_parameters(policy.diffusion_connector) + count_parameters(policy.vae_connector),
    }
    print(f"\nfull-size policy on meta (built in {built:.2f} s)")
    for name, count in counts.items():
        print(f"  {name:<32} {count / 1e6:10.1f} M")

    assert counts["transformer (SANA-1.5 1.6B)"] / 1e6 == pytest.approx(1604.6, abs=0.1)
    assert counts["vae (DC-AE f32c32)"] / 1e6 == pytest.approx(312.3, abs=0.1)
    assert counts["vision tower (SigLIP2 so400m)"] / 1e6 == pytest.approx(428.2, abs=0.1)
    # Qwen3-0.6B is 596.0 M with its 151,936 x 1024 tied embedding; the body keeps its size.
    assert counts["integrator body (Qwen3-0.6B)"] / 1e6 == pytest.approx(
        (596.0e6 - 151936 * 1024) / 1e6, abs=0.1
    )
    assert vocab.size == vocab.first_image_id + 65536
    assert embedding.weight.shape == (vocab.size, 1024)
    assert policy.integrator.lm_head.weight is embedding.weight
    assert policy.num_semantic_tokens == 729

    with torch.device("meta"), torch.no_grad():
        v = policy.velocity(torch.empty(1, 32, 16, 16), torch.ones(1), torch.empty(1, 730 + 256, 2304))
    assert v.shape == (1, 32, 16, 16) and v.device.type == "meta"


def test_a_policy_with_new_dit_weights_is_written_without_building_a_model(tmp_path: Path) -> None:
    from rlrestore.policies import write_policy_with_velocity

    policy = build_tiny_policy(0)
    policy.save_pretrained(tmp_path / "base")
    trained = {key: value + 0.5 for key, value in policy.velocity_model.state_dict().items()}
    write_policy_with_velocity(tmp_path / "base", trained, tmp_path / "out")

    loaded = PrefRestorePolicy.from_pretrained(tmp_path / "out")
    for key, value in loaded.velocity_model.state_dict().items():
        assert torch.equal(value, trained[key]), key
    for name in ("vae", "integrator", "diffusion_connector", "lq_encoder"):
        ours, base = getattr(loaded, name).state_dict(), getattr(policy, name).state_dict()
        assert all(torch.equal(ours[key], base[key]) for key in base), name
    with pytest.raises(CheckpointError, match="not a policy checkpoint"):
        write_policy_with_velocity(tmp_path / "missing", trained, tmp_path / "out2")
